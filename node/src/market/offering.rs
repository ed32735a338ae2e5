//! The offerer side: publishing this node's offers (Algorithm 1), answering reservations,
//! and feeding schedulers' super-trader lists.
//!
//! Every decision is the [`flotilla_offers::offerer::Offerer`]'s and its ledger's (who
//! may reserve, run on or release what), taken in the market's loop (`state`); this
//! module carries out their actions — holder lookups and deliveries, reports to a
//! scheduler — and feeds the results back.

use super::Market;
use super::metrics::MarketMetrics;
use super::protocol::{MAX_NOTIFY_OFFERS, Request, Response};
use super::state::LOOKUP_RETRY_PAUSE;
use flotilla_offers::ledger::AdmitError;
use flotilla_offers::offer::SignedOffer;
use flotilla_offers::offerer::{Action, Event, ReserveError};
use libp2p::PeerId;
use rand::SeedableRng;
use rand::rngs::StdRng;

impl Market {
    /// Does what the offerer asked and reports the result to it.
    pub(super) async fn perform(self, action: Action) {
        let timeout = self.shared.config.answer_timeout;
        let event = match action {
            Action::FindHolder { offer_id, key } => {
                let lookup = self.shared.network.responsible_peer(key);
                match tokio::time::timeout(timeout, lookup).await {
                    Ok(Ok((holder, _))) => Event::HolderFound { offer_id, holder },
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "holder lookup failed");
                        tokio::time::sleep(LOOKUP_RETRY_PAUSE).await;
                        Event::NoHolder { offer_id }
                    }
                    Err(_) => Event::NoHolder { offer_id },
                }
            }
            Action::Send {
                offer_id,
                holder,
                key,
                offer,
            } => {
                let withdrawal = offer.body.withdrawn;
                let request = Request::Offer { key, offer: *offer };
                let answer = self.call(holder, Vec::new(), request, timeout).await;
                let delivered = matches!(answer, Ok(Response::Offer { .. }));
                if !delivered {
                    tracing::debug!(%holder, ?answer, "offer not delivered");
                }
                if withdrawal {
                    return;
                }
                if delivered {
                    self.shared.metrics.published.inc();
                    Event::Delivered { offer_id, holder }
                } else {
                    Event::DeliveryFailed { offer_id, holder }
                }
            }
        };
        let _ = self
            .with(move |m, now| {
                if let Some(offerer) = m.offerer.as_mut() {
                    let actions = offerer.on_event(now, event);
                    m.carry_out(actions);
                }
            })
            .await;
    }

    /// Sends withdrawals of every published offer and waits for them (at most the answer
    /// timeout); the offers are not published again.
    pub(super) async fn withdraw_all(&self) {
        let actions = self
            .with(|m, now| m.offerer.as_mut().map(|o| o.withdraw_all(now)))
            .await;
        let actions = match actions {
            Ok(Some(Ok(actions))) => actions,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "cannot sign withdrawals");
                return;
            }
            Ok(None) | Err(_) => return,
        };
        let sends = actions
            .into_iter()
            .map(|action| self.clone().perform(action));
        let all = futures::future::join_all(sends);
        if tokio::time::timeout(self.shared.config.answer_timeout, all)
            .await
            .is_err()
        {
            tracing::warn!("some holders did not confirm withdrawals in time");
        }
    }

    /// Publishes again the offers [`Market::withdraw_all`] withdrew.
    pub(super) async fn resume_lending(&self) {
        let _ = self
            .with(|m, _| {
                if let Some(offerer) = m.offerer.as_mut() {
                    offerer.resume();
                }
            })
            .await;
    }

    /// Sets memory of one of this node's offers aside for `owner`, the peer asking.
    pub(super) async fn reserve(
        &self,
        owner: PeerId,
        reservation_id: u64,
        offer_id: u64,
        mib: u32,
        hold_ms: u64,
    ) -> Response {
        let metrics = &self.shared.metrics;
        if !self.is_offering() {
            MarketMetrics::count(&metrics.reservations_refused, "not_offering");
            return Response::Refused {
                reason: "this node lends no memory".into(),
            };
        }
        if !self.shared.allowed.allow(&owner) {
            MarketMetrics::count(&metrics.reservations_refused, "not_listed");
            return Response::Refused {
                reason: super::allowed::NOT_LISTED.into(),
            };
        }
        let reserved = self
            .with(move |m, now| {
                let offerer = m.offerer.as_mut()?;
                let outcome = offerer.reserve(now, owner, offer_id, mib, reservation_id, hold_ms);
                // The version this reservation made: the scheduler's list takes it in
                // place of the one it reserved on.
                Some(outcome.map(|reservation| {
                    let offer = current_version(offerer, now, offer_id);
                    (reservation, offer)
                }))
            })
            .await;
        match reserved {
            Ok(Some(Ok((reservation, offer)))) => {
                metrics.reservations.inc();
                Response::Reserved { reservation, offer }
            }
            Ok(Some(Err(e))) => {
                MarketMetrics::count(&metrics.reservations_refused, refusal_label(&e));
                Response::Refused {
                    reason: e.to_string(),
                }
            }
            Ok(None) | Err(_) => Response::stopping(),
        }
    }

    /// Gives `owner`'s held reservation back; one that a call runs on is released by that
    /// call when it ends, and only then; someone else's is not touched.
    pub(super) async fn release(&self, owner: PeerId, reservation_id: u64) -> Response {
        if !self.is_offering() {
            return Response::Released;
        }
        let released = self
            .with(move |m, now| {
                let offerer = m.offerer.as_mut()?;
                Some(offerer.release(now, owner, reservation_id))
            })
            .await;
        match released {
            Ok(Some(Ok(()))) => Response::Released,
            Ok(Some(Err(e))) => Response::Refused {
                reason: e.to_string(),
            },
            Ok(None) | Err(_) => Response::stopping(),
        }
    }

    /// Ends the run on reservation `reservation_id`: its memory goes back; returns the
    /// offer's new version (sent to its holder or not), for the scheduler whose call it
    /// was.
    pub(super) async fn finish_run(&self, reservation_id: u64) -> Option<Box<SignedOffer>> {
        self.with(move |m, now| finish_run(m, now, reservation_id))
            .await
            .ok()
            .flatten()
    }

    /// Ends the run on reservation `reservation_id` without waiting (a call dropped
    /// before it ended its run).
    pub(super) fn finish_run_later(&self, reservation_id: u64) {
        self.later(move |m, now| {
            finish_run(m, now, reservation_id);
        });
    }

    /// Tells a random scheduler what this node has free (the offerer's report); if none
    /// is known or it does not answer, the offerer tries again shortly.
    pub(super) async fn report_free(self, mut offers: Vec<SignedOffer>) {
        offers.truncate(MAX_NOTIFY_OFFERS);
        let mut rng = StdRng::from_os_rng();
        let schedulers = self.schedulers().await;
        let delivered = match flotilla_scheduler::registry::pick(&schedulers, None, &mut rng) {
            Some(scheduler) => {
                let request = Request::Notify { offers };
                let timeout = self.shared.config.answer_timeout;
                match self.call(scheduler, Vec::new(), request, timeout).await {
                    Ok(Response::Notified { accepted }) => {
                        tracing::debug!(%scheduler, accepted, "told a scheduler what is free");
                        true
                    }
                    other => {
                        tracing::debug!(%scheduler, ?other, "scheduler not notified");
                        false
                    }
                }
            }
            None => false,
        };
        if !delivered {
            let _ = self
                .with(|m, now| {
                    if let Some(offerer) = m.offerer.as_mut() {
                        offerer.report_failed(now);
                    }
                })
                .await;
        }
    }
}

/// Ends a run in the offerer (its holder hears after the update delay) and returns the
/// offer's current version.
pub(super) fn finish_run(
    m: &mut super::state::Machines,
    now: u64,
    reservation_id: u64,
) -> Option<Box<SignedOffer>> {
    let offerer = m.offerer.as_mut()?;
    let done = offerer.finish_run(now, reservation_id)?;
    current_version(offerer, now, done.offer_id)
}

/// Offer `offer_id`'s current version, signed anew if its memory in use changed, for the
/// scheduler a reservation or a call answers; `None` if there is none (or signing failed,
/// which is logged: the answer goes without it).
fn current_version(
    offerer: &mut flotilla_offers::offerer::Offerer,
    now: u64,
    offer_id: u64,
) -> Option<Box<SignedOffer>> {
    match offerer.current(now, offer_id) {
        Ok(offer) => offer.map(Box::new),
        Err(e) => {
            tracing::warn!(error = %e, offer_id, "cannot sign the offer's current version");
            None
        }
    }
}

/// The metric label of a refused reservation.
pub(super) fn refusal_label(e: &ReserveError) -> &'static str {
    match e {
        ReserveError::UnknownOffer(_) => "unknown_offer",
        ReserveError::NotEnoughMemory { .. } => "not_enough_memory",
        ReserveError::Admit(AdmitError::Conflict(_)) => "conflict",
        ReserveError::Admit(AdmitError::Full(_) | AdmitError::OwnerFull { .. }) => "busy",
    }
}
