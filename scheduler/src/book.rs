//! The book of detached jobs' records a node keeps for others: a deterministic machine
//! handed the time, generic over the record ([`Versioned`]) so its rules — what is kept,
//! for how long, what makes room — are decided here and tested without signatures.
//!
//! Each record is one version of a job's state, signed by the scheduler that took the
//! job. The book keeps the newest version per job, bounded in all and per scheduler.
//! A version expires [`BookLimits::ttl_ms`] after it was made — but never later than
//! that long after it arrived here, by this node's clock, so a record dated in the future
//! cannot outlive the others. Eviction goes by arrival, so such a record cannot push the
//! others out either. Republished copies keep their version's age, so records do not
//! live on forever by passing from peer to peer.
//!
//! A book kept for a scheduler ([`RecordBook::keeping_own`]) never makes room in a full
//! book with that scheduler's own records (they are bounded by its quota like anyone's),
//! so strangers storing records cannot push out the jobs it ran.

use libp2p::PeerId;
use std::collections::HashMap;

/// A signed, versioned record the book can keep.
pub trait Versioned: Clone {
    /// Why a record does not verify.
    type Invalid: std::error::Error;

    /// Checks the record's signature and that its id is its author's; answers the
    /// author (the scheduler that signed it).
    fn verify(&self) -> Result<PeerId, Self::Invalid>;
    /// The job it is a record of.
    fn id(&self) -> u64;
    /// Its version: higher is newer.
    fn seq(&self) -> u64;
    /// When its author made this version (Unix ms, the author's word).
    fn made_at_ms(&self) -> u64;
}

/// How much a book keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BookLimits {
    /// Records in all.
    pub max_records: usize,
    /// Records of one scheduler.
    pub max_per_author: usize,
    /// How long a version lives, in ms.
    pub ttl_ms: u64,
}

impl Default for BookLimits {
    fn default() -> Self {
        BookLimits {
            max_records: 4096,
            max_per_author: 1024,
            ttl_ms: 24 * 3600 * 1000,
        }
    }
}

/// Why a book did not keep a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused<E> {
    /// It does not verify.
    #[error(transparent)]
    Invalid(E),
    /// The book already has this version or a newer one.
    #[error("job {0:016x} has a newer version here")]
    Stale(u64),
    /// The version is older than the records' lifetime.
    #[error("job {0:016x}'s record has expired")]
    Expired(u64),
}

/// The records a node keeps (see the module's documentation).
#[derive(Debug)]
pub struct RecordBook<R> {
    limits: BookLimits,
    records: HashMap<u64, Kept<R>>,
    /// The scheduler whose records are not evicted for others'.
    own: Option<PeerId>,
}

/// One record in a [`RecordBook`], with this node's times for it (Unix ms).
#[derive(Debug)]
struct Kept<R> {
    author: PeerId,
    arrived_ms: u64,
    sent_ms: u64,
    expires_ms: u64,
    record: R,
}

impl<R: Versioned> RecordBook<R> {
    /// An empty book that keeps no one's records first.
    pub fn new(limits: BookLimits) -> RecordBook<R> {
        RecordBook {
            limits,
            records: HashMap::new(),
            own: None,
        }
    }

    /// A book on the node of scheduler `me`, which keeps its own records over others'.
    pub fn keeping_own(limits: BookLimits, me: PeerId) -> RecordBook<R> {
        RecordBook {
            own: Some(me),
            ..RecordBook::new(limits)
        }
    }

    /// Keeps `record` if it verifies, is unexpired and is newer than the version held.
    pub fn put(&mut self, now_ms: u64, record: R) -> Result<(), Refused<R::Invalid>> {
        let author = record.verify().map_err(Refused::Invalid)?;
        let id = record.id();
        // Verified ids are their author's own, so a held record of this id is too.
        if let Some(held) = self.records.get(&id)
            && held.record.seq() >= record.seq()
        {
            return Err(Refused::Stale(id));
        }
        let expires_ms = now_ms
            .min(record.made_at_ms())
            .saturating_add(self.limits.ttl_ms);
        if expires_ms <= now_ms {
            return Err(Refused::Expired(id));
        }
        self.records.retain(|_, kept| kept.expires_ms > now_ms);
        if !self.records.contains_key(&id) {
            let theirs = self
                .records
                .values()
                .filter(|kept| kept.author == author)
                .count();
            // An author at its quota makes room among its own records; otherwise a
            // full book drops its oldest — never one of this node's own jobs.
            let own = self.own;
            let victim = if theirs >= self.limits.max_per_author {
                self.oldest(|kept| kept.author == author)
            } else if self.records.len() >= self.limits.max_records {
                self.oldest(|kept| Some(kept.author) != own)
            } else {
                None
            };
            if let Some(victim) = victim {
                self.records.remove(&victim);
            }
        }
        let kept = Kept {
            author,
            arrived_ms: now_ms,
            sent_ms: now_ms,
            expires_ms,
            record,
        };
        self.records.insert(id, kept);
        Ok(())
    }

    /// Drops the record of `id` (a job its scheduler could not record durably, so did not
    /// take after all); answers whether there was one.
    pub fn remove(&mut self, id: u64) -> bool {
        self.records.remove(&id).is_some()
    }

    /// Up to `max` unexpired records this node has not sent on for the longest, none
    /// sent within `every_ms`; each is marked as sent now.
    pub fn due_for_republishing(&mut self, now_ms: u64, every_ms: u64, max: usize) -> Vec<R> {
        let mut due: Vec<(u64, u64)> = self
            .records
            .iter()
            .filter(|(_, kept)| {
                kept.expires_ms > now_ms && kept.sent_ms.saturating_add(every_ms) <= now_ms
            })
            .map(|(id, kept)| (kept.sent_ms, *id))
            .collect();
        due.sort_unstable();
        due.truncate(max);
        due.into_iter()
            .filter_map(|(_, id)| {
                let kept = self.records.get_mut(&id)?;
                kept.sent_ms = now_ms;
                Some(kept.record.clone())
            })
            .collect()
    }

    /// The id of the record that arrived first among those `pick` chooses.
    fn oldest(&self, pick: impl Fn(&Kept<R>) -> bool) -> Option<u64> {
        self.records
            .iter()
            .filter(|(_, kept)| pick(kept))
            .min_by_key(|(_, kept)| kept.arrived_ms)
            .map(|(id, _)| *id)
    }

    /// The newest version of job `id` held here.
    pub fn get(&self, id: u64) -> Option<&R> {
        self.records.get(&id).map(|kept| &kept.record)
    }

    /// How many records are held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record whose "signature" is a flag, so the book's rules are tested alone.
    #[derive(Debug, Clone, PartialEq)]
    struct Record {
        author: PeerId,
        id: u64,
        seq: u64,
        made_at_ms: u64,
        valid: bool,
    }

    #[derive(Debug, Clone, PartialEq, thiserror::Error)]
    #[error("bad signature")]
    struct BadSignature;

    impl Versioned for Record {
        type Invalid = BadSignature;
        fn verify(&self) -> Result<PeerId, BadSignature> {
            self.valid.then_some(self.author).ok_or(BadSignature)
        }
        fn id(&self) -> u64 {
            self.id
        }
        fn seq(&self) -> u64 {
            self.seq
        }
        fn made_at_ms(&self) -> u64 {
            self.made_at_ms
        }
    }

    /// Job `id` of `author` at version `seq`, made at 1 ms (ids are never shared by two
    /// authors in these tests, as verified ids never are).
    fn record(author: PeerId, id: u64, seq: u64) -> Record {
        Record {
            author,
            id,
            seq,
            made_at_ms: 1,
            valid: true,
        }
    }

    fn small() -> BookLimits {
        BookLimits {
            max_records: 40,
            max_per_author: 10,
            ttl_ms: 100_000,
        }
    }

    #[test]
    fn republishing_takes_the_longest_unsent_records_a_bounded_number_at_a_time() {
        let author = PeerId::random();
        let mut book = RecordBook::new(small());
        for id in 0..5 {
            book.put(1000 + id, record(author, id, 1)).unwrap();
        }
        assert!(
            book.due_for_republishing(1050, 100, 3).is_empty(),
            "sent on arrival"
        );
        let ids = |records: Vec<Record>| records.iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(book.due_for_republishing(1200, 100, 3)), vec![0, 1, 2]);
        assert_eq!(ids(book.due_for_republishing(1200, 100, 3)), vec![3, 4]);
        assert!(book.due_for_republishing(1250, 100, 3).is_empty());
        assert!(
            book.due_for_republishing(1000 + 100_000 + 10, 100, 9)
                .is_empty(),
            "expired"
        );
    }

    #[test]
    fn a_book_keeps_the_newest_valid_version() {
        let author = PeerId::random();
        let mut book = RecordBook::new(small());
        book.put(1, record(author, 7, 2)).unwrap();
        assert_eq!(book.put(1, record(author, 7, 1)), Err(Refused::Stale(7)));
        assert_eq!(book.put(1, record(author, 7, 2)), Err(Refused::Stale(7)));
        let forged = Record {
            valid: false,
            ..record(author, 7, 9)
        };
        assert_eq!(book.put(1, forged), Err(Refused::Invalid(BadSignature)));
        book.put(1, record(author, 7, 3)).unwrap();
        assert_eq!(book.get(7).unwrap().seq, 3);
        assert_eq!(book.len(), 1);
    }

    /// Ten of `me`'s records, then four strangers each filling their quota: 50 puts
    /// into a book of 40.
    fn flooded(mut book: RecordBook<Record>, me: PeerId) -> RecordBook<Record> {
        for id in 0..10 {
            book.put(id, record(me, id, 1)).unwrap();
        }
        for stranger in 1..=4u64 {
            let author = PeerId::random();
            for n in 0..10 {
                let id = stranger * 100 + n;
                book.put(10 + id, record(author, id, 1)).unwrap();
            }
        }
        book
    }

    #[test]
    fn strangers_filling_the_book_never_push_out_the_schedulers_own_records() {
        let me = PeerId::random();
        let book = flooded(RecordBook::keeping_own(small(), me), me);
        assert_eq!(book.len(), 40);
        for id in 0..10 {
            assert!(book.get(id).is_some(), "its own job {id} stays");
        }
        // A book that keeps no one's records first drops the oldest: those same jobs.
        let plain = flooded(RecordBook::new(small()), me);
        assert_eq!(plain.len(), 40);
        assert!(plain.get(0).is_none());
    }

    #[test]
    fn records_expire_and_the_book_is_bounded_in_all_and_per_author() {
        let authors: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        let mut book = RecordBook::new(small());
        // Five authors' worth: each at its quota, the book over its bound. Records dated
        // in the future do not count: arrival does.
        for n in 0..50u64 {
            let author = authors[(n / 10) as usize];
            let future = Record {
                made_at_ms: u64::MAX - n,
                ..record(author, n, 1)
            };
            book.put(n, future).unwrap();
        }
        assert_eq!(book.len(), 40);
        assert!(book.get(0).is_none(), "the oldest went first");
        assert!(book.get(49).is_some());
        // One author flooding the book pushes out only its own records.
        for n in 50..60u64 {
            book.put(n, record(authors[4], n, 1)).unwrap();
        }
        assert!(book.get(20).is_some(), "another author's record stays");
        assert!(book.get(40).is_none());
        assert_eq!(book.len(), 40);
        // A record dated in the future expires by its arrival here.
        let later = 100_000 + 60 + 100;
        let fresh = Record {
            made_at_ms: later,
            ..record(authors[0], 1000, 1)
        };
        book.put(later, fresh).unwrap();
        assert_eq!(book.len(), 1, "the rest expired");
        // A copy passed on from peer to peer keeps its version's age.
        let old = Record {
            made_at_ms: later - 100_000,
            ..record(authors[1], 1001, 1)
        };
        assert_eq!(book.put(later, old), Err(Refused::Expired(1001)));
    }
}
