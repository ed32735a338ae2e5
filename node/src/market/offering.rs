//! The offerer side: publishing this node's offers (Algorithm 1), answering reservations,
//! and feeding schedulers' super-trader lists.
//!
//! Every decision is the [`flotilla_offers::offerer::Offerer`]'s and its ledger's (who
//! may reserve, run on or release what); this module carries out their actions: holder
//! lookups and deliveries, reports to a scheduler, and the check that the owners of held
//! reservations are still connected.

use super::metrics::MarketMetrics;
use super::protocol::{MAX_NOTIFY_OFFERS, Request, Response};
use super::{Market, lock, now_ms};
use flotilla_offers::ledger::AdmitError;
use flotilla_offers::offer::SignedOffer;
use flotilla_offers::offerer::{Action, Event, ReserveError};
use libp2p::PeerId;
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long the offerer task waits when nothing is due.
const IDLE_WAIT: Duration = Duration::from_secs(3600);
/// Pause before reporting a holder lookup that failed at once (the network stopping, say),
/// so a failing lookup is not retried in a tight loop.
const LOOKUP_RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How often the owners of held reservations are checked for still being connected.
const OWNER_CHECK_INTERVAL: Duration = Duration::from_secs(2);

impl Market {
    /// Runs the offerer state machine: polls it when its timers are due, performs its
    /// actions and reports, and feeds it their results, until the node stops.
    pub(super) async fn drive_offerer(self, mut events: mpsc::Receiver<Event>) {
        let Some(offerer) = &self.shared.offerer else {
            return;
        };
        let mut rng = StdRng::from_os_rng();
        let mut stop = self.stopping();
        let mut owner_checks = tokio::time::interval(OWNER_CHECK_INTERVAL);
        owner_checks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (actions, report, wakeup) = {
                let mut offerer = lock(offerer);
                let now = now_ms();
                let actions = offerer.poll(now, &mut rng);
                let report = offerer.poll_report(now);
                let wakeup = [offerer.next_wakeup(), offerer.next_report()]
                    .into_iter()
                    .flatten()
                    .min();
                (actions, report, wakeup)
            };
            self.perform_all(actions);
            if let Some(offers) = report {
                tokio::spawn(self.clone().report_free(offers));
            }
            let wait = wakeup.map_or(IDLE_WAIT, |t| {
                Duration::from_millis(t.saturating_sub(now_ms()))
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.wake_offerer.notified() => {}
                Some(event) = events.recv() => {
                    let actions = lock(offerer).on_event(now_ms(), event);
                    self.perform_all(actions);
                }
                _ = owner_checks.tick() => self.lapse_vanished_owners().await,
                _ = stop.changed() => return,
            }
        }
    }

    /// Held reservations whose owner is no longer connected lapse now.
    async fn lapse_vanished_owners(&self) {
        let Some(offerer) = &self.shared.offerer else {
            return;
        };
        let owners = lock(offerer).ledger().holding_owners();
        let me = self.peer_id();
        if owners.iter().all(|o| *o == me) {
            return;
        }
        let Ok(connected) = self.shared.network.connected_peers().await else {
            return;
        };
        for owner in owners {
            if owner != me && !connected.contains(&owner) {
                tracing::debug!(%owner, "owner of held reservations left; they lapse");
                let actions = lock(offerer).owner_gone(now_ms(), owner);
                self.perform_all(actions);
            }
        }
    }

    fn perform_all<E: std::fmt::Display>(&self, actions: Result<Vec<Action>, E>) {
        match actions {
            Ok(actions) => {
                for action in actions {
                    tokio::spawn(self.clone().perform(action));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot sign an offer"),
        }
    }

    /// Does what the offerer asked and reports the result to it.
    async fn perform(self, action: Action) {
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
        let _ = self.shared.offerer_events.send(event).await;
    }

    /// Sends withdrawals of every published offer and waits for them (at most the answer
    /// timeout); the offers are not published again.
    pub(super) async fn withdraw_all(&self) {
        let Some(offerer) = &self.shared.offerer else {
            return;
        };
        let actions = match lock(offerer).withdraw_all(now_ms()) {
            Ok(actions) => actions,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sign withdrawals");
                return;
            }
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

    /// Sets memory of one of this node's offers aside for `owner`, the peer asking.
    pub(super) fn reserve(
        &self,
        owner: PeerId,
        reservation_id: u64,
        offer_id: u64,
        mib: u32,
        hold_ms: u64,
    ) -> Response {
        let metrics = &self.shared.metrics;
        let Some(offerer) = &self.shared.offerer else {
            MarketMetrics::count(&metrics.reservations_refused, "not_offering");
            return Response::Refused {
                reason: "this node lends no memory".into(),
            };
        };
        let mut offerer = lock(offerer);
        let outcome = offerer.reserve(now_ms(), owner, offer_id, mib, reservation_id, hold_ms);
        // The version this reservation made, sent to the holder or not: the scheduler's
        // list takes it in place of the one it reserved on.
        let offer = offerer.latest(offer_id).cloned().map(Box::new);
        drop(offerer);
        match outcome {
            Ok((reservation, actions)) => {
                metrics.reservations.inc();
                self.perform_all(Ok::<_, std::convert::Infallible>(actions));
                // Its hold deadline is a new timer, and schedulers hear of the change.
                self.shared.wake_offerer.notify_one();
                Response::Reserved { reservation, offer }
            }
            Err(e) => {
                MarketMetrics::count(&metrics.reservations_refused, refusal_label(&e));
                Response::Refused {
                    reason: e.to_string(),
                }
            }
        }
    }

    /// Gives `owner`'s held reservation back; one that a call runs on is released by that
    /// call when it ends, and only then; someone else's is not touched.
    pub(super) fn release(&self, owner: PeerId, reservation_id: u64) -> Response {
        let Some(offerer) = &self.shared.offerer else {
            return Response::Released;
        };
        let released = lock(offerer).release(now_ms(), owner, reservation_id);
        match released {
            Ok(actions) => {
                self.announce_release(Ok::<_, std::convert::Infallible>(actions));
                Response::Released
            }
            Err(e) => Response::Refused {
                reason: e.to_string(),
            },
        }
    }

    /// Ends the run on reservation `reservation_id`: its memory goes back; returns the
    /// offer's new version (sent to its holder or not), for the scheduler whose call it
    /// was.
    pub(super) fn finish_run(&self, reservation_id: u64) -> Option<Box<SignedOffer>> {
        let offerer = self.shared.offerer.as_ref()?;
        let mut offerer = lock(offerer);
        let offer_id = offerer.ledger().get(reservation_id)?.offer_id;
        let actions = offerer.finish_run(now_ms(), reservation_id)?;
        let newer = offerer.latest(offer_id).cloned().map(Box::new);
        drop(offerer);
        self.announce_release(actions);
        newer
    }

    /// Sends what a release changed to the offer's holder.
    pub(super) fn announce_release<E: std::fmt::Display>(&self, actions: Result<Vec<Action>, E>) {
        self.perform_all(actions);
        self.shared.wake_offerer.notify_one();
    }

    /// Tells a random scheduler what this node has free (the offerer's report); if none
    /// is known or it does not answer, the offerer tries again shortly.
    async fn report_free(self, mut offers: Vec<SignedOffer>) {
        let Some(offerer) = &self.shared.offerer else {
            return;
        };
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
            lock(offerer).report_failed(now_ms());
            self.shared.wake_offerer.notify_one();
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
        ReserveError::Offer(_) => "signing",
    }
}
