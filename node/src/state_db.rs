//! The node's own database (redb, `<data dir>/node.redb`): the state of the market that
//! must outlive a restart. (The store's pins and cache order are in the blockstore's own
//! database, `flotilla_overlay::store_db`.)
//!
//! | table | key → value | what |
//! |---|---|---|
//! | `scheduled_jobs` | job id → CBOR of the job (client, call, latest record) | the detached jobs this node schedules that have not ended: taken durably before the client is told the job id, updated at each new version of its record, removed when it ends; a scheduler restarted on its data dir carries them on |
//! | `runs` | the run's owner (PeerId bytes) ‖ invocation id (8 bytes, big-endian) → the call's digest (32 bytes) ‖ when it started (Unix ms, 8 bytes) | the runs this volunteer started, the newest few thousand: reloaded into the ledger at start, so a call asked again after a restart is answered as a repeat (its answer forgotten), never run twice here; written off the call's path by the same batching task, so a crash in the first 100 ms of a run can lose its row |
//! | `kept_jobs` | job id → CBOR of a signed job record | the records this node keeps for other schedulers (near their keys): written before it answers that it keeps one, removed when its book drops one; back in the book at start, so a keeper's restart loses no job. The market batches these writes, one commit at most every 100 ms, so a flood of records costs the disk a bounded number of syncs |
//!
//! Every write is one transaction, durable when it returns; redb recovers a file a crash
//! left mid-transaction to its last commit.

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

const SCHEDULED_JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("scheduled_jobs");
const KEPT_JOBS: TableDefinition<u64, &[u8]> = TableDefinition::new("kept_jobs");
const RUNS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("runs");

/// A row of table `runs`: key and value.
pub type Row = (Vec<u8>, Vec<u8>);

/// A change to the job records kept for others — records to keep (id and encoded
/// signed record) and ids the book dropped — and to the runs recorded.
#[derive(Debug, Clone, Default)]
pub struct StateChange {
    /// Records kept now.
    pub put: Vec<(u64, Vec<u8>)>,
    /// Records no longer kept.
    pub dropped: Vec<u64>,
    /// Runs started (key and value of table `runs`).
    pub runs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Runs no longer remembered.
    pub runs_dropped: Vec<Vec<u8>>,
}

/// A database error, with the file's path.
#[derive(Debug, thiserror::Error)]
#[error("node database {path}: {source}")]
pub struct StateDbError {
    path: PathBuf,
    source: Box<redb::Error>,
}

/// The open database.
#[derive(Debug)]
pub struct StateDb {
    db: Database,
    path: PathBuf,
}

impl StateDb {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<StateDb, StateDbError> {
        let db = Database::create(path).map_err(|e| StateDbError {
            path: path.to_owned(),
            source: Box::new(e.into()),
        })?;
        let state = StateDb {
            db,
            path: path.to_owned(),
        };
        state.write(|txn| {
            txn.open_table(SCHEDULED_JOBS)?;
            txn.open_table(KEPT_JOBS)?;
            txn.open_table(RUNS)?;
            Ok(())
        })?;
        Ok(state)
    }

    fn failed(&self, e: impl Into<redb::Error>) -> StateDbError {
        StateDbError {
            path: self.path.clone(),
            source: Box::new(e.into()),
        }
    }

    fn write(
        &self,
        body: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StateDbError> {
        let txn = self.db.begin_write().map_err(|e| self.failed(e))?;
        body(&txn).map_err(|e| self.failed(e))?;
        txn.commit().map_err(|e| self.failed(e))
    }

    /// Records (or replaces) scheduled job `id`, encoded; durable when this returns.
    pub fn put_job(&self, id: u64, encoded: &[u8]) -> Result<(), StateDbError> {
        self.write(|txn| {
            txn.open_table(SCHEDULED_JOBS)?.insert(id, encoded)?;
            Ok(())
        })
    }

    /// Forgets scheduled job `id` (it ended).
    pub fn remove_job(&self, id: u64) -> Result<(), StateDbError> {
        self.write(|txn| {
            txn.open_table(SCHEDULED_JOBS)?.remove(id)?;
            Ok(())
        })
    }

    /// Every scheduled job recorded, encoded, by id.
    pub fn jobs(&self) -> Result<Vec<(u64, Vec<u8>)>, StateDbError> {
        self.all(SCHEDULED_JOBS)
    }

    /// Applies `changes` in order, in one transaction: each keeps its job records (id,
    /// encoded signed record) after forgetting those it dropped; durable when this
    /// returns.
    pub fn keep_records(&self, changes: &[StateChange]) -> Result<(), StateDbError> {
        self.write(|txn| {
            let mut table = txn.open_table(KEPT_JOBS)?;
            let mut runs = txn.open_table(RUNS)?;
            for change in changes {
                for id in &change.dropped {
                    table.remove(*id)?;
                }
                for (id, bytes) in &change.put {
                    table.insert(*id, bytes.as_slice())?;
                }
                for key in &change.runs_dropped {
                    runs.remove(key.as_slice())?;
                }
                for (key, value) in &change.runs {
                    runs.insert(key.as_slice(), value.as_slice())?;
                }
            }
            Ok(())
        })
    }

    /// Every run recorded: key and value of table `runs`.
    pub fn runs(&self) -> Result<Vec<Row>, StateDbError> {
        let read = || -> Result<Vec<Row>, redb::Error> {
            let txn = self.db.begin_read()?;
            let mut rows = Vec::new();
            for row in txn.open_table(RUNS)?.iter()? {
                let (key, value) = row?;
                rows.push((key.value().to_vec(), value.value().to_vec()));
            }
            Ok(rows)
        };
        read().map_err(|e| self.failed(e))
    }

    /// Every job record kept for others, encoded, by id.
    pub fn kept_records(&self) -> Result<Vec<(u64, Vec<u8>)>, StateDbError> {
        self.all(KEPT_JOBS)
    }

    fn all(&self, table: TableDefinition<u64, &[u8]>) -> Result<Vec<(u64, Vec<u8>)>, StateDbError> {
        let read = || -> Result<Vec<(u64, Vec<u8>)>, redb::Error> {
            let txn = self.db.begin_read()?;
            let mut rows = Vec::new();
            for row in txn.open_table(table)?.iter()? {
                let (id, bytes) = row?;
                rows.push((id.value(), bytes.value().to_vec()));
            }
            Ok(rows)
        };
        read().map_err(|e| self.failed(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_survive_reopening_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let db = StateDb::open(&path).unwrap();
            db.put_job(1, b"one").unwrap();
            db.put_job(2, b"two").unwrap();
            db.put_job(1, b"one, newer").unwrap();
        }
        let db = StateDb::open(&path).unwrap();
        assert_eq!(
            db.jobs().unwrap(),
            vec![(1, b"one, newer".to_vec()), (2, b"two".to_vec())]
        );
        db.remove_job(1).unwrap();
        assert_eq!(db.jobs().unwrap(), vec![(2, b"two".to_vec())]);
    }

    #[test]
    fn kept_records_survive_reopening_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.redb");
        {
            let db = StateDb::open(&path).unwrap();
            let change = |put: &[(u64, &[u8])], dropped: &[u64]| StateChange {
                put: put.iter().map(|(id, b)| (*id, b.to_vec())).collect(),
                dropped: dropped.to_vec(),
                ..StateChange::default()
            };
            db.keep_records(&[change(&[(1, b"a"), (2, b"b")], &[])])
                .unwrap();
            // In order: 4 kept then dropped, 3 dropped then kept again.
            db.keep_records(&[
                change(&[(3, b"c"), (4, b"d")], &[1]),
                change(&[(3, b"c, newer")], &[3, 4]),
            ])
            .unwrap();
        }
        let db = StateDb::open(&path).unwrap();
        assert_eq!(
            db.kept_records().unwrap(),
            vec![(2, b"b".to_vec()), (3, b"c, newer".to_vec())]
        );
        assert!(db.jobs().unwrap().is_empty(), "the tables are apart");
        let runs = StateChange {
            runs: vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec()),
            ],
            ..StateChange::default()
        };
        let forget = StateChange {
            runs_dropped: vec![b"a".to_vec()],
            ..StateChange::default()
        };
        db.keep_records(&[runs, forget]).unwrap();
        drop(db);
        let db = StateDb::open(&path).unwrap();
        assert_eq!(db.runs().unwrap(), vec![(b"b".to_vec(), b"2".to_vec())]);
    }
}
