//! The offerer side (offers sent): Algorithm 1 of FaaS@Edge, with refresh, republish and
//! withdrawal.
//!
//! The volunteer's memory is sliced into offers ("virtual nodes"), largest tiers first.
//! For each offer the machine picks a random key in its tier's region and asks the caller
//! to find the closest peer ([`Action::FindHolder`]); it then signs the offer and asks the
//! caller to send it there ([`Action::Send`]). A delivered offer is refreshed — a new
//! version with a later expiry, to the same holder — before it expires. A holder that does
//! not confirm in time, or a failed delivery, sends the offer to a fresh random key, so a
//! holder that left is replaced within one refresh interval. [`Offerer::withdraw_all`]
//! sends signed withdrawals when the node stops.
//!
//! Time is passed in as Unix milliseconds; randomness as an `RngCore`.

use crate::offer::{OfferBody, OfferError, SignedOffer};
use flotilla_overlay::regions::Tier;
use libp2p::identity::Keypair;
use libp2p::{Multiaddr, PeerId};
use rand::RngCore;

/// Settings of an offerer.
#[derive(Debug, Clone)]
pub struct OffererConfig {
    /// Memory lent in all, in MiB.
    pub memory_mib: u64,
    /// Addresses put in the offers.
    pub addresses: Vec<Multiaddr>,
    /// How long a published offer lasts, in ms (default 60 s).
    pub ttl_ms: u64,
    /// How long before expiry an offer is refreshed, in ms (default 20 s).
    pub refresh_margin_ms: u64,
    /// How long a holder lookup or a delivery may take before trying elsewhere, in ms
    /// (default 5 s).
    pub answer_timeout_ms: u64,
}

impl OffererConfig {
    /// Default timings for `memory_mib` MiB offered at `addresses`.
    pub fn new(memory_mib: u64, addresses: Vec<Multiaddr>) -> OffererConfig {
        OffererConfig {
            memory_mib,
            addresses,
            ttl_ms: 60_000,
            refresh_margin_ms: 20_000,
            answer_timeout_ms: 5_000,
        }
    }
}

/// What the caller must do for the offerer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Find the peer closest to `key` (a Kademlia lookup) and report it with
    /// [`Event::HolderFound`] or [`Event::NoHolder`].
    FindHolder {
        /// The offer concerned.
        offer_id: u64,
        /// The key, inside the offer's tier region.
        key: Vec<u8>,
    },
    /// Send `offer` to `holder` under `key` and report [`Event::Delivered`] or
    /// [`Event::DeliveryFailed`] (withdrawals need no report).
    Send {
        /// The offer concerned.
        offer_id: u64,
        /// The peer to send it to.
        holder: PeerId,
        /// The key it is published under.
        key: Vec<u8>,
        /// The signed offer (or withdrawal).
        offer: Box<SignedOffer>,
    },
}

/// What the caller reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The closest peer to the offer's key.
    HolderFound {
        /// The offer concerned.
        offer_id: u64,
        /// The closest peer.
        holder: PeerId,
    },
    /// No peer could be found.
    NoHolder {
        /// The offer concerned.
        offer_id: u64,
    },
    /// The holder accepted the offer.
    Delivered {
        /// The offer concerned.
        offer_id: u64,
        /// The holder.
        holder: PeerId,
    },
    /// The holder could not be reached or refused the offer.
    DeliveryFailed {
        /// The offer concerned.
        offer_id: u64,
        /// The holder.
        holder: PeerId,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Needs a new key and holder.
    Idle,
    Finding {
        key: Vec<u8>,
        since: u64,
    },
    Sending {
        key: Vec<u8>,
        holder: PeerId,
        since: u64,
        expires_at_ms: u64,
    },
    Published {
        key: Vec<u8>,
        holder: PeerId,
        expires_at_ms: u64,
    },
    Withdrawn,
}

/// One offer this node makes.
#[derive(Debug, Clone)]
struct Slot {
    offer_id: u64,
    tier: Tier,
    memory_mib: u32,
    seq: u64,
    state: State,
}

/// Where one offer stands, for `flotilla offers`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SentOffer {
    /// The offer's id.
    pub offer_id: u64,
    /// Its tier, in MiB.
    pub tier_mib: u32,
    /// Memory it lends, in MiB.
    pub memory_mib: u32,
    /// Its latest sequence number.
    pub seq: u64,
    /// Its holder, once known.
    pub holder: Option<String>,
    /// When it expires, once published.
    pub expires_at_ms: Option<u64>,
    /// `idle`, `finding`, `sending`, `published` or `withdrawn`.
    pub state: &'static str,
}

/// The offers a volunteer makes.
pub struct Offerer {
    keypair: Keypair,
    config: OffererConfig,
    slots: Vec<Slot>,
}

/// Cuts `memory_mib` into offers, largest tier first; what is left below the smallest
/// tier is not offered.
pub fn slice(memory_mib: u64) -> Vec<Tier> {
    let mut left = memory_mib;
    let mut tiers = Vec::new();
    while let Some(tier) = Tier::largest_within(left) {
        tiers.push(tier);
        left -= u64::from(tier.mib());
    }
    tiers
}

impl Offerer {
    /// An offerer for `config.memory_mib` MiB; offer ids start at `first_offer_id` (pick
    /// it at random, so ids do not repeat across restarts).
    pub fn new(keypair: Keypair, config: OffererConfig, first_offer_id: u64) -> Offerer {
        let slots = slice(config.memory_mib)
            .into_iter()
            .enumerate()
            .map(|(i, tier)| Slot {
                offer_id: first_offer_id.wrapping_add(i as u64),
                tier,
                memory_mib: tier.mib(),
                seq: 0,
                state: State::Idle,
            })
            .collect();
        Offerer {
            keypair,
            config,
            slots,
        }
    }

    fn sign(
        &self,
        slot: &Slot,
        expires_at_ms: u64,
        withdrawn: bool,
    ) -> Result<SignedOffer, OfferError> {
        let body = OfferBody {
            offerer: self.keypair.public().to_peer_id(),
            addresses: self.config.addresses.clone(),
            tier: slot.tier,
            memory_mib: slot.memory_mib,
            in_use_mib: 0,
            offer_id: slot.offer_id,
            seq: slot.seq,
            expires_at_ms,
            withdrawn,
        };
        SignedOffer::sign(body, &self.keypair)
    }

    /// Drives the timers: starts publishing idle offers, gives up on holders that did not
    /// answer in time, refreshes offers about to expire. Call it at [`Offerer::next_wakeup`].
    pub fn poll<R: RngCore + ?Sized>(
        &mut self,
        now_ms: u64,
        rng: &mut R,
    ) -> Result<Vec<Action>, OfferError> {
        let mut actions = Vec::new();
        for i in 0..self.slots.len() {
            let timeout = self.config.answer_timeout_ms;
            let slot = &self.slots[i];
            let restart = match &slot.state {
                State::Idle => true,
                State::Finding { since, .. } | State::Sending { since, .. } => {
                    now_ms >= since + timeout
                }
                State::Published { .. } | State::Withdrawn => false,
            };
            if restart {
                let (key, _) = slot.tier.region().random_key(rng);
                let slot = &mut self.slots[i];
                slot.state = State::Finding {
                    key: key.clone(),
                    since: now_ms,
                };
                actions.push(Action::FindHolder {
                    offer_id: slot.offer_id,
                    key,
                });
                continue;
            }
            if let State::Published {
                key,
                holder,
                expires_at_ms,
            } = &slot.state
                && *expires_at_ms <= now_ms + self.config.refresh_margin_ms
            {
                let (key, holder) = (key.clone(), *holder);
                actions.push(self.send_new_version(i, key, holder, now_ms)?);
            }
        }
        Ok(actions)
    }

    /// Signs the next version of slot `i`'s offer and sends it to `holder`.
    fn send_new_version(
        &mut self,
        i: usize,
        key: Vec<u8>,
        holder: PeerId,
        now_ms: u64,
    ) -> Result<Action, OfferError> {
        let expires_at_ms = now_ms + self.config.ttl_ms;
        self.slots[i].seq += 1;
        let offer = self.sign(&self.slots[i], expires_at_ms, false)?;
        let slot = &mut self.slots[i];
        slot.state = State::Sending {
            key: key.clone(),
            holder,
            since: now_ms,
            expires_at_ms,
        };
        Ok(Action::Send {
            offer_id: slot.offer_id,
            holder,
            key,
            offer: Box::new(offer),
        })
    }

    /// Takes a report from the caller.
    pub fn on_event(&mut self, now_ms: u64, event: Event) -> Result<Vec<Action>, OfferError> {
        let offer_id = match &event {
            Event::HolderFound { offer_id, .. }
            | Event::NoHolder { offer_id }
            | Event::Delivered { offer_id, .. }
            | Event::DeliveryFailed { offer_id, .. } => *offer_id,
        };
        let Some(i) = self.slots.iter().position(|s| s.offer_id == offer_id) else {
            return Ok(Vec::new());
        };
        match (event, self.slots[i].state.clone()) {
            (Event::HolderFound { holder, .. }, State::Finding { key, .. }) => {
                Ok(vec![self.send_new_version(i, key, holder, now_ms)?])
            }
            (Event::NoHolder { .. }, State::Finding { .. }) => {
                self.slots[i].state = State::Idle;
                Ok(Vec::new())
            }
            (
                Event::Delivered { holder, .. },
                State::Sending {
                    key,
                    holder: to,
                    expires_at_ms,
                    ..
                },
            ) if holder == to => {
                self.slots[i].state = State::Published {
                    key,
                    holder,
                    expires_at_ms,
                };
                Ok(Vec::new())
            }
            (Event::DeliveryFailed { holder, .. }, State::Sending { holder: to, .. })
                if holder == to =>
            {
                // Republish at a new random key, hence (most likely) to another holder.
                self.slots[i].state = State::Idle;
                Ok(Vec::new())
            }
            // Late or stray reports change nothing.
            _ => Ok(Vec::new()),
        }
    }

    /// Withdraws every offer that has a holder (when the node stops, say): returns the
    /// signed withdrawals to send; the offers are not published again.
    pub fn withdraw_all(&mut self, now_ms: u64) -> Result<Vec<Action>, OfferError> {
        let mut actions = Vec::new();
        for i in 0..self.slots.len() {
            let target = match &self.slots[i].state {
                State::Sending {
                    key,
                    holder,
                    expires_at_ms,
                    ..
                }
                | State::Published {
                    key,
                    holder,
                    expires_at_ms,
                } => Some((key.clone(), *holder, (*expires_at_ms).max(now_ms + 1))),
                _ => None,
            };
            self.slots[i].seq += 1;
            if let Some((key, holder, expires_at_ms)) = target {
                let offer = self.sign(&self.slots[i], expires_at_ms, true)?;
                actions.push(Action::Send {
                    offer_id: self.slots[i].offer_id,
                    holder,
                    key,
                    offer: Box::new(offer),
                });
            }
            self.slots[i].state = State::Withdrawn;
        }
        Ok(actions)
    }

    /// When [`Offerer::poll`] next has something to do.
    pub fn next_wakeup(&self) -> Option<u64> {
        let timeout = self.config.answer_timeout_ms;
        self.slots
            .iter()
            .filter_map(|s| match &s.state {
                State::Idle => Some(0),
                State::Finding { since, .. } | State::Sending { since, .. } => {
                    Some(since + timeout)
                }
                State::Published { expires_at_ms, .. } => {
                    Some(expires_at_ms.saturating_sub(self.config.refresh_margin_ms))
                }
                State::Withdrawn => None,
            })
            .min()
    }

    /// Where every offer stands.
    pub fn sent(&self) -> Vec<SentOffer> {
        self.slots
            .iter()
            .map(|s| {
                let (holder, expires, state) = match &s.state {
                    State::Idle => (None, None, "idle"),
                    State::Finding { .. } => (None, None, "finding"),
                    State::Sending { holder, .. } => (Some(holder.to_string()), None, "sending"),
                    State::Published {
                        holder,
                        expires_at_ms,
                        ..
                    } => (Some(holder.to_string()), Some(*expires_at_ms), "published"),
                    State::Withdrawn => (None, None, "withdrawn"),
                };
                SentOffer {
                    offer_id: s.offer_id,
                    tier_mib: s.tier.mib(),
                    memory_mib: s.memory_mib,
                    seq: s.seq,
                    holder,
                    expires_at_ms: expires,
                    state,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::holder::{Accepted, Holder, HolderConfig, Rejection};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn offerer(memory_mib: u64) -> Offerer {
        let config =
            OffererConfig::new(memory_mib, vec!["/ip4/127.0.0.1/tcp/4100".parse().unwrap()]);
        Offerer::new(Keypair::generate_ed25519(), config, 100)
    }

    fn find_key(actions: &[Action]) -> (u64, Vec<u8>) {
        match &actions[0] {
            Action::FindHolder { offer_id, key } => (*offer_id, key.clone()),
            other => panic!("expected FindHolder, got {other:?}"),
        }
    }

    fn sent(actions: &[Action]) -> (PeerId, Vec<u8>, SignedOffer) {
        match &actions[0] {
            Action::Send {
                holder, key, offer, ..
            } => (*holder, key.clone(), (**offer).clone()),
            other => panic!("expected Send, got {other:?}"),
        }
    }

    #[test]
    fn memory_is_sliced_largest_tier_first() {
        let mibs = |m| slice(m).iter().map(|t| t.mib()).collect::<Vec<_>>();
        assert_eq!(mibs(2048), [2048]);
        assert_eq!(mibs(3000), [2048, 512, 256, 128]);
        assert_eq!(mibs(100), Vec::<u32>::new());
        assert_eq!(mibs(25_000), [10240, 10240, 4096, 256, 128]);
    }

    #[test]
    fn an_offer_is_published_to_a_key_in_its_region_and_refreshed_before_expiry() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut offerer = offerer(512);
        let mut holder = Holder::new(HolderConfig::default());
        let holder_id = PeerId::random();

        let (offer_id, key) = find_key(&offerer.poll(0, &mut rng).unwrap());
        assert!(Tier::from_mib(512).unwrap().region().contains_key(&key));
        let actions = offerer
            .on_event(
                10,
                Event::HolderFound {
                    offer_id,
                    holder: holder_id,
                },
            )
            .unwrap();
        let (to, sent_key, offer) = sent(&actions);
        assert_eq!((to, &sent_key), (holder_id, &key));
        assert_eq!(
            holder.receive(10, &sent_key, offer.clone()),
            Ok(Accepted::Stored)
        );
        offerer
            .on_event(
                20,
                Event::Delivered {
                    offer_id,
                    holder: holder_id,
                },
            )
            .unwrap();
        assert_eq!(offerer.sent()[0].state, "published");

        // Nothing to do until the refresh margin; then a newer version to the same holder.
        let wakeup = offerer.next_wakeup().unwrap();
        assert_eq!(wakeup, 10 + 60_000 - 20_000);
        assert!(offerer.poll(wakeup - 1, &mut rng).unwrap().is_empty());
        let (to, refresh_key, refreshed) = sent(&offerer.poll(wakeup, &mut rng).unwrap());
        assert_eq!((to, &refresh_key), (holder_id, &key));
        assert!(
            refreshed.body.seq > offer.body.seq
                && refreshed.body.expires_at_ms > offer.body.expires_at_ms
        );
        assert_eq!(
            holder.receive(wakeup, &refresh_key, refreshed),
            Ok(Accepted::Refreshed)
        );
    }

    #[test]
    fn a_silent_holder_is_replaced_within_the_answer_timeout() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut offerer = offerer(128);
        let (offer_id, first_key) = find_key(&offerer.poll(0, &mut rng).unwrap());
        let gone = PeerId::random();
        offerer
            .on_event(
                0,
                Event::HolderFound {
                    offer_id,
                    holder: gone,
                },
            )
            .unwrap();
        // No Delivered: after the timeout the offer goes to a fresh key.
        assert!(offerer.poll(4_999, &mut rng).unwrap().is_empty());
        let (again, second_key) = find_key(&offerer.poll(5_000, &mut rng).unwrap());
        assert_eq!(again, offer_id);
        assert_ne!(second_key, first_key);
        assert!(Tier::SMALLEST.region().contains_key(&second_key));
        // A late confirmation from the old holder changes nothing.
        assert!(
            offerer
                .on_event(
                    5_001,
                    Event::Delivered {
                        offer_id,
                        holder: gone
                    }
                )
                .unwrap()
                .is_empty()
        );
        assert_eq!(offerer.sent()[0].state, "finding");
        // A failed delivery republishes at once.
        let other = PeerId::random();
        offerer
            .on_event(
                5_002,
                Event::HolderFound {
                    offer_id,
                    holder: other,
                },
            )
            .unwrap();
        offerer
            .on_event(
                5_003,
                Event::DeliveryFailed {
                    offer_id,
                    holder: other,
                },
            )
            .unwrap();
        assert!(matches!(
            offerer.poll(5_003, &mut rng).unwrap()[0],
            Action::FindHolder { .. }
        ));
    }

    #[test]
    fn offers_are_withdrawn_with_signed_newer_versions() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut offerer = offerer(256 + 128);
        let mut holder = Holder::new(HolderConfig::default());
        let holder_id = PeerId::random();
        let mut offers = Vec::new();
        for action in offerer.poll(0, &mut rng).unwrap() {
            let Action::FindHolder { offer_id, .. } = action else {
                panic!()
            };
            let (_, key, offer) = sent(
                &offerer
                    .on_event(
                        0,
                        Event::HolderFound {
                            offer_id,
                            holder: holder_id,
                        },
                    )
                    .unwrap(),
            );
            holder.receive(0, &key, offer.clone()).unwrap();
            offerer
                .on_event(
                    0,
                    Event::Delivered {
                        offer_id,
                        holder: holder_id,
                    },
                )
                .unwrap();
            offers.push((key, offer));
        }
        assert_eq!(holder.live(1).count(), 2);
        let withdrawals = offerer.withdraw_all(1).unwrap();
        assert_eq!(withdrawals.len(), 2);
        for action in withdrawals {
            let Action::Send { key, offer, .. } = action else {
                panic!()
            };
            assert!(offer.body.withdrawn);
            assert_eq!(holder.receive(1, &key, *offer), Ok(Accepted::Withdrawn));
        }
        assert_eq!(holder.live(1).count(), 0);
        // The old versions cannot bring them back, and nothing is republished.
        for (key, offer) in offers {
            assert_eq!(holder.receive(2, &key, offer), Err(Rejection::Replayed));
        }
        assert!(offerer.poll(100_000, &mut rng).unwrap().is_empty());
        assert_eq!(offerer.next_wakeup(), None);
    }
}
