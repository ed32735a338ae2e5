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
//!
//! A job's scheduler can be replaced. A version signed by another author than the held
//! one's is kept only if it is a takeover ([`Versioned::takes_over`]), newer by at most
//! [`MAX_TAKEOVER_JUMP`] (so a takeover cannot put the job out of everyone's reach with
//! a huge sequence number), and the held version is of a job not yet ended that this
//! node has held for [`BookLimits::takeover_grace_ms`] with no newer version arriving —
//! silence measured by this node's clock only, so neither a version dated in the past
//! nor an old version replayed into an emptied book counts as silence — while a live
//! scheduler, which makes a version at least every third of that time, keeps its jobs.
//! A takeover of a job this book holds no version of is refused.
//! [`RecordBook::abandoned`] picks the jobs silent that long, for this node to consider
//! taking over.

use libp2p::PeerId;
use std::collections::HashMap;

/// How long a keeper of a silent job waits before taking it over: the grace, plus half
/// of it for each peer it knows closer to the job's key — so the closest keeper goes
/// first and the others find its takeover before their turn (saturating, in ms).
pub fn takeover_wait_ms(grace_ms: u64, closer_known: usize) -> u64 {
    let per_peer = grace_ms / 2;
    grace_ms.saturating_add(per_peer.saturating_mul(closer_known as u64))
}

/// How much newer than the held version a takeover may be.
pub const MAX_TAKEOVER_JUMP: u64 = 4;

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
    /// Whether the job has ended in this version (nothing changes after).
    fn is_final(&self) -> bool;
    /// Whether this version takes the job over from the scheduler that took it.
    fn takes_over(&self) -> bool;
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
    /// How long an unfinished job's versions must have been silent before another peer
    /// may take it over, in ms.
    pub takeover_grace_ms: u64,
}

impl Default for BookLimits {
    fn default() -> Self {
        BookLimits {
            max_records: 4096,
            max_per_author: 1024,
            ttl_ms: 24 * 3600 * 1000,
            takeover_grace_ms: 5 * 60 * 1000,
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
    /// Another author's version is held, of a job not ended or not silent long enough to
    /// be taken over (or none is held).
    #[error(
        "job {0:016x} is held by its scheduler, which is not silent long enough to be taken over"
    )]
    NotTakenOver(u64),
}

/// The records a node keeps (see the module's documentation).
#[derive(Debug)]
pub struct RecordBook<R> {
    limits: BookLimits,
    records: HashMap<u64, Kept<R>>,
    /// The scheduler whose records are not evicted for others'.
    own: Option<PeerId>,
    /// Ids of records dropped (evicted or expired) since [`RecordBook::take_dropped`],
    /// at most `max_records` (more are forgotten: a store that mirrors the book is
    /// pruned again when it is loaded).
    dropped: Vec<u64>,
}

/// One record in a [`RecordBook`], with this node's times for it (Unix ms).
#[derive(Debug)]
struct Kept<R> {
    author: PeerId,
    arrived_ms: u64,
    sent_ms: u64,
    /// When this node last considered taking the job over.
    considered_ms: u64,
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
            dropped: Vec::new(),
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
        match self.records.get(&id) {
            Some(held) if held.record.seq() >= record.seq() => return Err(Refused::Stale(id)),
            Some(held) if held.author != author => {
                let silent = held
                    .arrived_ms
                    .saturating_add(self.limits.takeover_grace_ms)
                    <= now_ms;
                let jump = record.seq() - held.record.seq();
                if !record.takes_over()
                    || held.record.is_final()
                    || !silent
                    || jump > MAX_TAKEOVER_JUMP
                {
                    return Err(Refused::NotTakenOver(id));
                }
            }
            None if record.takes_over() => return Err(Refused::NotTakenOver(id)),
            _ => {}
        }
        let expires_ms = now_ms
            .min(record.made_at_ms())
            .saturating_add(self.limits.ttl_ms);
        if expires_ms <= now_ms {
            return Err(Refused::Expired(id));
        }
        let dropped = &mut self.dropped;
        self.records.retain(|id, kept| {
            let live = kept.expires_ms > now_ms;
            if !live {
                dropped.push(*id);
            }
            live
        });
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
                self.dropped.push(victim);
            }
            if self.dropped.len() > self.limits.max_records {
                self.dropped.clear();
            }
        }
        let kept = Kept {
            author,
            arrived_ms: now_ms,
            sent_ms: now_ms,
            considered_ms: 0,
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

    /// The ids of the records dropped (evicted or expired) since the last call.
    pub fn take_dropped(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dropped)
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

    /// Up to `max` jobs of other authors than `me`, not ended, held here with no newer
    /// version for the takeover grace period at `now_ms`, none considered within the last
    /// `every_ms`, those considered longest ago first: candidates for this node to take
    /// over, each with how long it has been silent here (each marked as considered).
    pub fn abandoned(
        &mut self,
        now_ms: u64,
        me: PeerId,
        every_ms: u64,
        max: usize,
    ) -> Vec<(R, u64)> {
        let grace = self.limits.takeover_grace_ms;
        let mut due: Vec<(u64, u64)> = self
            .records
            .iter()
            .filter(|(_, kept)| {
                kept.author != me
                    && !kept.record.is_final()
                    && kept.expires_ms > now_ms
                    && kept.arrived_ms.saturating_add(grace) <= now_ms
                    && kept.considered_ms.saturating_add(every_ms) <= now_ms
            })
            .map(|(id, kept)| (kept.considered_ms, *id))
            .collect();
        due.sort_unstable();
        due.truncate(max);
        due.into_iter()
            .filter_map(|(_, id)| {
                let kept = self.records.get_mut(&id)?;
                kept.considered_ms = now_ms;
                Some((kept.record.clone(), now_ms - kept.arrived_ms))
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
        done: bool,
        takeover: bool,
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
        fn is_final(&self) -> bool {
            self.done
        }
        fn takes_over(&self) -> bool {
            self.takeover
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
            done: false,
            takeover: false,
        }
    }

    fn small() -> BookLimits {
        BookLimits {
            max_records: 40,
            max_per_author: 10,
            ttl_ms: 100_000,
            takeover_grace_ms: 1000,
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
        // What it dropped is told, once, for a store that mirrors it.
        assert_eq!(book.take_dropped(), (0..10).collect::<Vec<u64>>());
        assert!(book.take_dropped().is_empty());
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

    #[test]
    fn a_silent_unfinished_job_is_taken_over_and_a_live_or_ended_one_is_not() {
        let mut book = RecordBook::new(small());
        let (scheduler, taker, rival) = (PeerId::random(), PeerId::random(), PeerId::random());
        let takeover = |author, seq, made_at_ms| Record {
            takeover: true,
            made_at_ms,
            ..record(author, 7, seq)
        };
        // A takeover of a job held nowhere here is refused.
        assert_eq!(
            book.put(500, takeover(taker, 5, 500)),
            Err(Refused::NotTakenOver(7))
        );
        book.put(
            500,
            Record {
                made_at_ms: 500,
                ..record(scheduler, 7, 3)
            },
        )
        .unwrap();
        // Within the grace period its scheduler keeps it, and only a takeover can ever
        // replace another author's version.
        assert_eq!(
            book.put(1400, takeover(taker, 4, 1400)),
            Err(Refused::NotTakenOver(7))
        );
        assert!(book.abandoned(1400, taker, 0, 8).is_empty());
        assert_eq!(
            book.put(
                1600,
                Record {
                    made_at_ms: 1600,
                    ..record(taker, 7, 4)
                }
            ),
            Err(Refused::NotTakenOver(7))
        );
        // Silent past it: candidates once per `every_ms`, and a newer takeover is kept.
        assert_eq!(book.abandoned(1600, taker, 1000, 8).len(), 1);
        assert!(book.abandoned(1700, taker, 1000, 8).is_empty());
        assert!(
            book.abandoned(1700, scheduler, 0, 8).is_empty(),
            "not its own"
        );
        assert_eq!(
            book.put(1600, takeover(taker, 3, 1600)),
            Err(Refused::Stale(7))
        );
        book.put(1600, takeover(taker, 4, 1600)).unwrap();
        // The taker now holds it: a rival, or the old scheduler back, cannot take it
        // while the taker is live.
        assert_eq!(
            book.put(1700, takeover(rival, 9, 1700)),
            Err(Refused::NotTakenOver(7))
        );
        assert_eq!(
            book.put(
                1700,
                Record {
                    made_at_ms: 1700,
                    ..record(scheduler, 7, 9)
                }
            ),
            Err(Refused::NotTakenOver(7))
        );
        book.put(1800, takeover(taker, 5, 1800)).unwrap();
        // The taker's own later versions are its to number.
        book.put(1850, takeover(taker, 50, 1850)).unwrap();
        // An ended job is never taken over.
        let done = Record {
            done: true,
            takeover: true,
            made_at_ms: 1900,
            ..record(taker, 7, 51)
        };
        book.put(1900, done).unwrap();
        assert!(book.abandoned(10_000, rival, 0, 8).is_empty());
        assert_eq!(
            book.put(10_000, takeover(rival, 52, 10_000)),
            Err(Refused::NotTakenOver(7))
        );
    }

    #[test]
    fn the_closest_keeper_takes_over_first() {
        assert_eq!(takeover_wait_ms(1000, 0), 1000);
        assert_eq!(takeover_wait_ms(1000, 3), 2500);
        assert!(takeover_wait_ms(1000, 2) < takeover_wait_ms(1000, 3));
        assert_eq!(takeover_wait_ms(u64::MAX, usize::MAX), u64::MAX);
    }
}
