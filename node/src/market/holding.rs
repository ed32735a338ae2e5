//! The holder side: offers other peers publish under keys this node is closest to, and
//! schedulers' questions about them.

use super::metrics::MarketMetrics;
use super::protocol::{MAX_FOUND_OFFERS, Response};
use super::{HeldOffer, Market, lock, now_ms};
use flotilla_offers::holder::Accepted;
use flotilla_offers::offer::SignedOffer;
use flotilla_overlay::regions::Tier;
use std::time::Duration;

/// Longest the eviction task sleeps, so the `held` gauge follows expiries closely.
const EVICTION_TICK: Duration = Duration::from_secs(1);

impl Market {
    /// Takes a new version of an offer (create, refresh or withdraw) sent under `key`.
    pub(super) fn hold_offer(&self, key: &[u8], offer: SignedOffer) -> Response {
        let now = now_ms();
        let metrics = &self.shared.metrics;
        let mut holder = lock(&self.shared.holder);
        let outcome = holder.receive(now, key, offer);
        metrics.held.set(holder.live(now).count() as i64);
        match outcome {
            Ok(accepted) => {
                let outcome = match accepted {
                    Accepted::Stored => "stored",
                    Accepted::Refreshed => "refreshed",
                    Accepted::Withdrawn => "withdrawn",
                };
                if accepted != Accepted::Withdrawn {
                    metrics.received.inc();
                }
                Response::Offer {
                    outcome: outcome.into(),
                }
            }
            Err(rejection) => {
                MarketMetrics::count(&metrics.rejected, rejection.as_str());
                Response::Refused {
                    reason: format!("offer refused: {}", rejection.as_str()),
                }
            }
        }
    }

    /// The live offers held here with at least `min_free_mib` free: of `tier` only, or of
    /// any tier in the whole-key-space baseline (where holders keep every tier).
    pub(super) fn find_offers(&self, tier: Tier, min_free_mib: u32) -> Response {
        let now = now_ms();
        let holder = lock(&self.shared.holder);
        let matching: Vec<&SignedOffer> = holder.answer(now, tier, min_free_mib);
        Response::Offers {
            matched: matching.len() as u32,
            offers: matching
                .into_iter()
                .take(MAX_FOUND_OFFERS)
                .cloned()
                .collect(),
        }
    }

    pub(super) fn held_offers(&self, now: u64) -> Vec<HeldOffer> {
        lock(&self.shared.holder)
            .live(now)
            .map(|o| HeldOffer {
                offer: o.into(),
                expires_at_ms: o.body.expires_at_ms,
            })
            .collect()
    }

    /// Drops expired offers as they expire, until the node stops.
    pub(super) async fn evict_expired_offers(self) {
        let mut stop = self.stopping();
        loop {
            let now = now_ms();
            let next = {
                let mut holder = lock(&self.shared.holder);
                let expired = holder.evict_expired(now);
                self.shared.metrics.expired.inc_by(expired as u64);
                self.shared
                    .metrics
                    .held
                    .set(holder.live(now).count() as i64);
                holder.next_expiry()
            };
            let wait = next.map_or(EVICTION_TICK, |t| {
                Duration::from_millis(t.saturating_sub(now)).min(EVICTION_TICK)
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
