//! The memoized results a node keeps for others: a deterministic machine handed the time,
//! generic over the memo ([`Memoized`]) so its rules are decided and tested here without
//! signatures.
//!
//! A memo is one volunteer's signed answer to a pure call, kept under a digest of the
//! call (its key). A key holds the memos of up to [`MemoLimits::max_per_key`] distinct
//! volunteers that all gave the same result. Nothing lets a stranger replace what is
//! kept with something else:
//!
//! * a volunteer's memo is replaced only by a newer one it signed, with the same result;
//! * a memo whose result differs from those kept — a volunteer lied, or the call was not
//!   pure after all — makes the key *contested*: its memos are dropped and the key
//!   answers nothing until the newest of them would have expired, so the call runs again
//!   instead of being answered by either side;
//! * memos expire [`MemoLimits::ttl_ms`] after they were signed, never later than that
//!   long after they arrived here, and one signed further ahead than
//!   [`MemoLimits::max_skew_ms`] is refused;
//! * the book is bounded in keys, in bytes and in memos per volunteer: a volunteer past
//!   its quota loses its own oldest memo, and a full book drops the key that arrived
//!   first, contested keys last (so flooding the book does not clear a contest for a
//!   liar to sign first again as cheaply).
//!
//! A liar can therefore at worst answer a call nobody ran before it (as it could by being
//! placed on the call), or make a key contested, which costs a run; `--replicas` guards
//! against the first.

use libp2p::PeerId;
use std::collections::{BTreeSet, HashMap};

/// A memo the book can keep.
pub trait Memoized: Clone {
    /// Why a memo does not check.
    type Invalid: std::error::Error;

    /// Checks it at `now_ms` (signature, purity, that its answer matches its receipt);
    /// answers the volunteer that signed it.
    fn check(&self, now_ms: u64) -> Result<PeerId, Self::Invalid>;
    /// The digest of the call it answers.
    fn key(&self) -> [u8; 32];
    /// When its volunteer signed it (Unix ms, the volunteer's word).
    fn signed_at_ms(&self) -> u64;
    /// A digest of the result (exit status, stdout, stderr, output files): memos agree
    /// when their results are equal.
    fn result(&self) -> [u8; 32];
    /// Its size, as kept.
    fn bytes(&self) -> usize;
}

/// How much a book keeps, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoLimits {
    /// Keys (calls) in all.
    pub max_keys: usize,
    /// Memos under one key (distinct volunteers agreeing).
    pub max_per_key: usize,
    /// Memos one volunteer signed.
    pub max_per_signer: usize,
    /// Bytes of memos in all.
    pub max_bytes: usize,
    /// How long a memo lives after it was signed, in ms.
    pub ttl_ms: u64,
    /// How far ahead of this node's clock a memo may be signed, in ms.
    pub max_skew_ms: u64,
}

impl Default for MemoLimits {
    fn default() -> Self {
        MemoLimits {
            max_keys: 16_384,
            max_per_key: 4,
            max_per_signer: 1024,
            max_bytes: 16 * 1024 * 1024,
            ttl_ms: 24 * 3600 * 1000,
            max_skew_ms: 10 * 60 * 1000,
        }
    }
}

/// Why a book did not keep a memo.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoRefused<E> {
    /// It does not check.
    #[error(transparent)]
    Invalid(E),
    /// It is past its lifetime.
    #[error("the memo has expired")]
    Expired,
    /// It was signed too far ahead of this node's clock.
    #[error("the memo is signed in the future")]
    FromTheFuture,
    /// Its volunteer's memo under this key here is as new or newer.
    #[error("a memo as new from the same volunteer is kept")]
    Stale,
    /// The key is contested: volunteers gave different results for it.
    #[error("volunteers disagree on this call's result; it is not memoized")]
    Contested,
    /// It is larger than the whole book.
    #[error("the memo is too large")]
    TooLarge,
}

/// What became of a memo the book was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Kept: the first for its key, or another volunteer agreeing.
    Kept,
    /// Kept in place of its volunteer's older memo.
    Replaced,
    /// The key already has as many agreeing volunteers as it keeps.
    Enough,
    /// It disagreed with the memos kept: they are dropped and the key is contested.
    Contested,
}

/// What a book answers for a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup<M> {
    /// Nothing is kept.
    Unknown,
    /// Volunteers disagreed: run the call.
    Contested,
    /// The memos of the distinct volunteers that agree, newest first.
    Agreed(Vec<M>),
}

struct Kept<M> {
    memo: M,
    signer: PeerId,
    expires_ms: u64,
    bytes: usize,
}

struct Entry<M> {
    arrived_ms: u64,
    /// Set while the key is contested: until when (Unix ms).
    contested_until: Option<u64>,
    memos: Vec<Kept<M>>,
    result: [u8; 32],
}

/// The memos a node keeps (see the module's documentation).
pub struct MemoBook<M> {
    limits: MemoLimits,
    entries: HashMap<[u8; 32], Entry<M>>,
    /// Keys by arrival, uncontested ones apart: what a full book drops first.
    arrivals: BTreeSet<(u64, [u8; 32])>,
    contested: BTreeSet<(u64, [u8; 32])>,
    /// Each signer's memos, by arrival of their key.
    per_signer: HashMap<PeerId, BTreeSet<(u64, [u8; 32])>>,
    bytes: usize,
}

impl<M: Memoized> MemoBook<M> {
    /// An empty book.
    pub fn new(limits: MemoLimits) -> MemoBook<M> {
        MemoBook {
            limits,
            entries: HashMap::new(),
            arrivals: BTreeSet::new(),
            contested: BTreeSet::new(),
            per_signer: HashMap::new(),
            bytes: 0,
        }
    }

    /// Keeps `memo` if it checks and agrees with the memos under its key (see the
    /// module's documentation).
    pub fn put(&mut self, now_ms: u64, memo: M) -> Result<Stored, MemoRefused<M::Invalid>> {
        let signer = memo.check(now_ms).map_err(MemoRefused::Invalid)?;
        let signed = memo.signed_at_ms();
        if signed > now_ms.saturating_add(self.limits.max_skew_ms) {
            return Err(MemoRefused::FromTheFuture);
        }
        let expires_ms = signed.min(now_ms).saturating_add(self.limits.ttl_ms);
        if expires_ms <= now_ms {
            return Err(MemoRefused::Expired);
        }
        let size = memo.bytes();
        if size > self.limits.max_bytes {
            return Err(MemoRefused::TooLarge);
        }
        let key = memo.key();
        let result = memo.result();
        self.expire(now_ms, key);
        let kept = Kept {
            memo,
            signer,
            expires_ms,
            bytes: size,
        };
        let Some(entry) = self.entries.get_mut(&key) else {
            self.make_room(signer, size, None);
            self.arrivals.insert((now_ms, key));
            self.entries.insert(
                key,
                Entry {
                    arrived_ms: now_ms,
                    contested_until: None,
                    memos: Vec::new(),
                    result,
                },
            );
            self.add(key, kept);
            return Ok(Stored::Kept);
        };
        if entry.contested_until.is_some() {
            return Err(MemoRefused::Contested);
        }
        if entry.result != result {
            let until = entry
                .memos
                .iter()
                .map(|k| k.expires_ms)
                .chain([expires_ms])
                .max()
                .unwrap_or(expires_ms);
            entry.contested_until = Some(until);
            let arrived = entry.arrived_ms;
            let dropped = std::mem::take(&mut entry.memos);
            self.arrivals.remove(&(arrived, key));
            self.contested.insert((arrived, key));
            for old in dropped {
                self.forget(key, arrived, old);
            }
            return Ok(Stored::Contested);
        }
        let arrived = entry.arrived_ms;
        match entry.memos.iter().position(|k| k.signer == signer) {
            Some(i) if entry.memos[i].memo.signed_at_ms() >= signed => Err(MemoRefused::Stale),
            Some(i) => {
                let old = entry.memos.remove(i);
                self.forget(key, arrived, old);
                self.make_room(signer, size, Some(key));
                self.add(key, kept);
                Ok(Stored::Replaced)
            }
            None if entry.memos.len() >= self.limits.max_per_key => Ok(Stored::Enough),
            None => {
                self.make_room(signer, size, Some(key));
                self.add(key, kept);
                Ok(Stored::Kept)
            }
        }
    }

    /// What is kept under `key` at `now_ms`.
    pub fn get(&self, now_ms: u64, key: &[u8; 32]) -> Lookup<M> {
        let Some(entry) = self.entries.get(key) else {
            return Lookup::Unknown;
        };
        if entry.contested_until.is_some_and(|until| until > now_ms) {
            return Lookup::Contested;
        }
        let mut memos: Vec<&Kept<M>> = entry
            .memos
            .iter()
            .filter(|k| k.expires_ms > now_ms)
            .collect();
        if memos.is_empty() {
            return Lookup::Unknown;
        }
        memos.sort_by_key(|k| std::cmp::Reverse(k.memo.signed_at_ms()));
        Lookup::Agreed(memos.into_iter().map(|k| k.memo.clone()).collect())
    }

    /// How many keys are held (contested ones included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of the memos held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds `kept` under `key`, whose entry exists (unless making room took it).
    fn add(&mut self, key: [u8; 32], kept: Kept<M>) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        self.bytes += kept.bytes;
        self.per_signer
            .entry(kept.signer)
            .or_default()
            .insert((entry.arrived_ms, key));
        entry.memos.push(kept);
    }

    /// Accounts for `kept`, taken out of the entry of `key` (arrived at `arrived`).
    fn forget(&mut self, key: [u8; 32], arrived: u64, kept: Kept<M>) {
        self.bytes -= kept.bytes;
        if let Some(keys) = self.per_signer.get_mut(&kept.signer) {
            keys.remove(&(arrived, key));
            if keys.is_empty() {
                self.per_signer.remove(&kept.signer);
            }
        }
    }

    /// Drops what expired under `key`, and the key once nothing is left or its contest
    /// is over.
    fn expire(&mut self, now_ms: u64, key: [u8; 32]) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let arrived = entry.arrived_ms;
        let (live, dead): (Vec<_>, Vec<_>) = std::mem::take(&mut entry.memos)
            .into_iter()
            .partition(|k| k.expires_ms > now_ms);
        entry.memos = live;
        let over = match entry.contested_until {
            Some(until) => until <= now_ms,
            None => entry.memos.is_empty(),
        };
        for kept in dead {
            self.forget(key, arrived, kept);
        }
        if over {
            self.remove_key(key);
        }
    }

    fn remove_key(&mut self, key: [u8; 32]) {
        if let Some(entry) = self.entries.remove(&key) {
            let arrived = entry.arrived_ms;
            self.arrivals.remove(&(arrived, key));
            self.contested.remove(&(arrived, key));
            for kept in entry.memos {
                self.forget(key, arrived, kept);
            }
        }
    }

    /// Removes `signer`'s memo under `key` (only its own).
    fn remove_memo(&mut self, key: [u8; 32], signer: PeerId) {
        let Some(entry) = self.entries.get_mut(&key) else {
            return;
        };
        let arrived = entry.arrived_ms;
        let Some(i) = entry.memos.iter().position(|k| k.signer == signer) else {
            return;
        };
        let kept = entry.memos.remove(i);
        let empty = entry.memos.is_empty();
        self.forget(key, arrived, kept);
        if empty {
            self.remove_key(key);
        }
    }

    /// Makes room for one more memo of `size` bytes signed by `signer` (under `keep`, a
    /// key that must stay, if any): past the signer's quota its own oldest memo goes;
    /// past the book's bounds whole keys go, the oldest uncontested first. Each step is
    /// a lookup in an ordered index, never a scan.
    fn make_room(&mut self, signer: PeerId, size: usize, keep: Option<[u8; 32]>) {
        let theirs = self.per_signer.get(&signer).map_or(0, |k| k.len());
        if theirs >= self.limits.max_per_signer
            && let Some(&(_, key)) = self.per_signer.get(&signer).and_then(|k| k.first())
        {
            self.remove_memo(key, signer);
        }
        let new_key = usize::from(keep.is_none());
        while self.entries.len() + new_key > self.limits.max_keys
            || self.bytes + size > self.limits.max_bytes
        {
            let victim = self
                .arrivals
                .iter()
                .chain(self.contested.iter())
                .map(|&(_, key)| key)
                .find(|key| Some(*key) != keep);
            let Some(victim) = victim else {
                break;
            };
            self.remove_key(victim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A memo whose "signature" is a flag, so the book's rules are tested alone.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Memo {
        signer: PeerId,
        valid: bool,
        key: u8,
        result: u8,
        signed_at_ms: u64,
        bytes: usize,
    }

    #[derive(Debug, PartialEq, Eq, thiserror::Error)]
    #[error("bad signature")]
    struct BadSignature;

    impl Memoized for Memo {
        type Invalid = BadSignature;
        fn check(&self, _now_ms: u64) -> Result<PeerId, BadSignature> {
            self.valid.then_some(self.signer).ok_or(BadSignature)
        }
        fn key(&self) -> [u8; 32] {
            [self.key; 32]
        }
        fn signed_at_ms(&self) -> u64 {
            self.signed_at_ms
        }
        fn result(&self) -> [u8; 32] {
            [self.result; 32]
        }
        fn bytes(&self) -> usize {
            self.bytes
        }
    }

    fn memo(signer: PeerId, key: u8, result: u8, signed_at_ms: u64) -> Memo {
        Memo {
            signer,
            valid: true,
            key,
            result,
            signed_at_ms,
            bytes: 100,
        }
    }

    const HOUR: u64 = 3600 * 1000;

    fn agreed(book: &MemoBook<Memo>, now: u64, key: u8) -> Vec<PeerId> {
        match book.get(now, &[key; 32]) {
            Lookup::Agreed(memos) => memos.into_iter().map(|m| m.signer).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn agreeing_volunteers_are_kept_and_a_memo_is_replaced_only_by_its_own_newer_one() {
        let mut book = MemoBook::new(MemoLimits::default());
        let (a, b) = (PeerId::random(), PeerId::random());
        let now = 10 * HOUR;
        assert_eq!(book.put(now, memo(a, 1, 7, now)), Ok(Stored::Kept));
        assert_eq!(book.put(now, memo(b, 1, 7, now - 5)), Ok(Stored::Kept));
        assert_eq!(agreed(&book, now, 1), vec![a, b]);
        // Its own older or equal memo is stale; a newer one replaces it.
        assert_eq!(book.put(now, memo(a, 1, 7, now)), Err(MemoRefused::Stale));
        assert_eq!(
            book.put(now + 1, memo(a, 1, 7, now + 1)),
            Ok(Stored::Replaced)
        );
        assert_eq!(book.len(), 1);
        assert_eq!(book.bytes(), 200);
        // Forged ones never count.
        let forged = Memo {
            valid: false,
            ..memo(PeerId::random(), 1, 9, now)
        };
        assert!(matches!(
            book.put(now, forged),
            Err(MemoRefused::Invalid(_))
        ));
        assert_eq!(agreed(&book, now, 1).len(), 2);
        // At most `max_per_key` volunteers.
        for _ in 0..2 {
            assert_eq!(
                book.put(now, memo(PeerId::random(), 1, 7, now)),
                Ok(Stored::Kept)
            );
        }
        assert_eq!(
            book.put(now, memo(PeerId::random(), 1, 7, now)),
            Ok(Stored::Enough)
        );
        assert_eq!(agreed(&book, now, 1).len(), 4);
    }

    #[test]
    fn a_disagreeing_memo_contests_the_key_and_nothing_is_answered_until_it_expires() {
        let mut book = MemoBook::new(MemoLimits::default());
        let (honest, liar) = (PeerId::random(), PeerId::random());
        let now = 10 * HOUR;
        book.put(now, memo(honest, 1, 7, now)).unwrap();
        assert_eq!(book.put(now, memo(liar, 1, 66, now)), Ok(Stored::Contested));
        assert_eq!(book.get(now, &[1; 32]), Lookup::Contested);
        assert_eq!(book.bytes(), 0);
        // Neither side, nor a newer memo, is kept while it is contested.
        assert_eq!(
            book.put(now + 1, memo(honest, 1, 7, now + 1)),
            Err(MemoRefused::Contested)
        );
        assert_eq!(
            book.put(now + 1, memo(liar, 1, 66, now + 1)),
            Err(MemoRefused::Contested)
        );
        // A volunteer contradicting itself contests its key too.
        book.put(now, memo(honest, 2, 7, now)).unwrap();
        assert_eq!(
            book.put(now + 1, memo(honest, 2, 8, now + 1)),
            Ok(Stored::Contested)
        );
        // Once the newest memo involved would have expired, the key starts again.
        let later = now + 24 * HOUR;
        assert_eq!(book.get(later, &[1; 32]), Lookup::Unknown);
        assert_eq!(book.put(later, memo(honest, 1, 7, later)), Ok(Stored::Kept));
        assert_eq!(agreed(&book, later, 1), vec![honest]);
    }

    #[test]
    fn memos_expire_and_future_or_old_ones_are_refused() {
        let limits = MemoLimits::default();
        let mut book = MemoBook::new(limits);
        let a = PeerId::random();
        let now = 100 * HOUR;
        assert_eq!(
            book.put(now, memo(a, 1, 7, now - limits.ttl_ms)),
            Err(MemoRefused::Expired)
        );
        assert_eq!(
            book.put(now, memo(a, 1, 7, now + limits.max_skew_ms + 1)),
            Err(MemoRefused::FromTheFuture)
        );
        // Signed a little ahead: it lives a lifetime from its arrival, no longer.
        book.put(now, memo(a, 1, 7, now + 1000)).unwrap();
        assert_eq!(agreed(&book, now + limits.ttl_ms - 1, 1), vec![a]);
        assert!(agreed(&book, now + limits.ttl_ms, 1).is_empty());
    }

    #[test]
    fn the_book_is_bounded_in_keys_bytes_and_per_signer() {
        let limits = MemoLimits {
            max_keys: 8,
            max_per_signer: 3,
            max_bytes: 650,
            ..MemoLimits::default()
        };
        let mut book = MemoBook::new(limits);
        let now = 10 * HOUR;
        let flooder = PeerId::random();
        for key in 0..10u8 {
            book.put(now + u64::from(key), memo(flooder, key, 1, now))
                .unwrap();
        }
        // One signer keeps its 3 newest keys.
        assert_eq!(book.len(), 3);
        assert_eq!(agreed(&book, now + 20, 9), vec![flooder]);
        assert!(agreed(&book, now + 20, 0).is_empty());
        // Many signers: bounded in keys and bytes, the oldest keys out first.
        for key in 10..40u8 {
            book.put(
                now + 100 + u64::from(key),
                memo(PeerId::random(), key, 1, now),
            )
            .unwrap();
        }
        assert!(book.len() <= 6, "{} keys", book.len());
        assert!(book.bytes() <= 650);
        assert_eq!(agreed(&book, now + 200, 39).len(), 1);
        assert!(agreed(&book, now + 200, 10).is_empty());
        let huge = Memo {
            bytes: 651,
            ..memo(PeerId::random(), 50, 1, now)
        };
        assert_eq!(book.put(now + 300, huge), Err(MemoRefused::TooLarge));
    }

    #[test]
    fn replacing_a_memo_with_a_larger_one_stays_within_the_bytes() {
        let limits = MemoLimits {
            max_bytes: 1000,
            ..MemoLimits::default()
        };
        let mut book = MemoBook::new(limits);
        let now = 10 * HOUR;
        let signers: Vec<PeerId> = (0..10).map(|_| PeerId::random()).collect();
        for (i, signer) in signers.iter().enumerate() {
            book.put(now, memo(*signer, i as u8, 1, now)).unwrap();
        }
        assert_eq!(book.bytes(), 1000);
        // Each signer swaps its memo for a newer, five times larger one.
        for (i, signer) in signers.iter().enumerate() {
            let larger = Memo {
                bytes: 500,
                ..memo(*signer, i as u8, 1, now + 1)
            };
            let _ = book.put(now + 1, larger);
            assert!(book.bytes() <= 1000, "{} bytes", book.bytes());
        }
    }

    #[test]
    fn a_signer_over_its_quota_loses_only_its_own_memo_and_contests_outlive_floods() {
        let limits = MemoLimits {
            max_keys: 4,
            max_per_signer: 2,
            ..MemoLimits::default()
        };
        let mut book = MemoBook::new(limits);
        let now = 10 * HOUR;
        let (honest, liar, sybil) = (PeerId::random(), PeerId::random(), PeerId::random());
        // The sybil co-signs the honest memo, then signs more: only its own memo goes.
        book.put(now, memo(honest, 1, 7, now)).unwrap();
        book.put(now, memo(sybil, 1, 7, now)).unwrap();
        book.put(now + 1, memo(sybil, 2, 7, now)).unwrap();
        book.put(now + 2, memo(sybil, 3, 7, now)).unwrap();
        assert_eq!(agreed(&book, now + 3, 1), vec![honest]);
        // A contested key stays while strangers flood the book with new keys.
        book.put(now + 3, memo(liar, 1, 66, now)).unwrap();
        assert_eq!(book.get(now + 4, &[1; 32]), Lookup::Contested);
        for key in 10..30u8 {
            book.put(
                now + 10 + u64::from(key),
                memo(PeerId::random(), key, 1, now),
            )
            .unwrap();
        }
        assert_eq!(book.get(now + 100, &[1; 32]), Lookup::Contested);
        assert!(book.len() <= 4);
        assert_eq!(
            book.put(now + 100, memo(liar, 1, 66, now + 100)),
            Err(MemoRefused::Contested)
        );
    }
}
