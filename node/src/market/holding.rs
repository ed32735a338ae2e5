//! The holder side: offers other peers publish under keys this node is closest to, and
//! schedulers' questions about them.

use super::Market;
use super::metrics::MarketMetrics;
use super::protocol::{MAX_FOUND_OFFERS, Response};
use flotilla_offers::holder::{Accepted, Delivery};
use flotilla_offers::offer::SignedOffer;
use flotilla_overlay::presence::Prefix;
use flotilla_overlay::regions::Tier;
use libp2p::PeerId;

impl Market {
    /// Takes a new version of an offer (create, refresh or withdraw) that `from` sent
    /// under `key`: the holder's rules for strangers apply (see
    /// `flotilla_offers::holder`), with the prefix of `from`'s connection and how many
    /// peers this node knows closer to the key.
    pub(super) async fn hold_offer(
        &self,
        from: PeerId,
        key: Vec<u8>,
        offer: SignedOffer,
    ) -> Response {
        let network = &self.shared.network;
        let prefix = network.presence().ip(&from).map(Prefix::of);
        let Ok(closer_known) = network.closer_peers_known(key.clone()).await else {
            return Response::stopping();
        };
        let delivery = Delivery {
            from,
            prefix,
            closer_known,
        };
        let held = self
            .with(move |m, now| {
                let outcome = m.holder.receive_from(now, &key, offer, delivery);
                (outcome, m.holder.live(now).count())
            })
            .await;
        let Ok((outcome, live)) = held else {
            return Response::stopping();
        };
        let metrics = &self.shared.metrics;
        metrics.held.set(live as i64);
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
    pub(super) async fn find_offers(&self, tier: Tier, min_free_mib: u32) -> Response {
        let found = self
            .with(move |m, now| {
                let matching = m.holder.answer(now, tier, min_free_mib);
                let matched = matching.len() as u32;
                let offers: Vec<SignedOffer> = matching
                    .into_iter()
                    .take(MAX_FOUND_OFFERS)
                    .cloned()
                    .collect();
                (matched, offers)
            })
            .await;
        match found {
            Ok((matched, offers)) => Response::Offers { matched, offers },
            Err(_) => Response::stopping(),
        }
    }
}
