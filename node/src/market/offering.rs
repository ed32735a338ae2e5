//! The offerer side: publishing this node's offers (Algorithm 1), answering reservations,
//! and feeding schedulers' super-trader lists.

use super::metrics::MarketMetrics;
use super::protocol::{MAX_NOTIFY_OFFERS, Request, Response};
use super::{MAX_HOLD_MS, Market, lock, now_ms};
use flotilla_offers::offer::SignedOffer;
use flotilla_offers::offerer::{Action, Event};
use rand::SeedableRng;
use rand::rngs::StdRng;
use std::time::Duration;
use tokio::sync::mpsc;

/// Most reservations held at once: each may become a guest, and the executor runs at most
/// this many.
const MAX_RESERVATIONS: usize = crate::executor::POOL_SLOTS as usize;
/// How long the offerer task waits when nothing is due.
const IDLE_WAIT: Duration = Duration::from_secs(3600);
/// Pause before reporting a holder lookup that failed at once (the network stopping, say),
/// so a failing lookup is not retried in a tight loop.
const LOOKUP_RETRY_PAUSE: Duration = Duration::from_secs(1);

impl Market {
    /// Runs the offerer state machine: polls it when its timers are due, performs its
    /// actions, and feeds it their results, until the node stops.
    pub(super) async fn drive_offerer(self, mut events: mpsc::Receiver<Event>) {
        let Some(offerer) = &self.shared.offerer else {
            return;
        };
        let mut rng = StdRng::from_os_rng();
        let mut stop = self.stopping();
        loop {
            let actions = lock(offerer).poll(now_ms(), &mut rng);
            self.perform_all(actions);
            let wait = lock(offerer).next_wakeup().map_or(IDLE_WAIT, |t| {
                Duration::from_millis(t.saturating_sub(now_ms()))
            });
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.shared.wake_offerer.notified() => {}
                Some(event) = events.recv() => {
                    let actions = lock(offerer).on_event(now_ms(), event);
                    self.perform_all(actions);
                }
                _ = stop.changed() => return,
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

    /// Sets memory of one of this node's offers aside for a scheduler.
    pub(super) fn reserve(
        &self,
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
        let hold_ms = hold_ms.clamp(1, MAX_HOLD_MS);
        let mut offerer = lock(offerer);
        // Every reservation may become a running guest: no more than the executor runs.
        let known = offerer
            .reservations()
            .any(|r| r.reservation_id == reservation_id);
        if !known && offerer.reservations().count() >= MAX_RESERVATIONS {
            drop(offerer);
            MarketMetrics::count(&metrics.reservations_refused, "busy");
            return Response::Refused {
                reason: format!("busy: {MAX_RESERVATIONS} calls are reserved here"),
            };
        }
        let outcome = offerer.reserve(now_ms(), offer_id, mib, reservation_id, hold_ms);
        // The version this reservation made, sent to the holder or not: the scheduler's
        // list takes it in place of the one it reserved on.
        let offer = offerer.latest(offer_id).cloned().map(Box::new);
        drop(offerer);
        match outcome {
            Ok((reservation, actions)) => {
                metrics.reservations.inc();
                self.perform_all(Ok::<_, std::convert::Infallible>(actions));
                // Its hold deadline is a new timer.
                self.shared.wake_offerer.notify_one();
                Response::Reserved { reservation, offer }
            }
            Err(e) => {
                let reason = match &e {
                    flotilla_offers::offerer::ReserveError::UnknownOffer(_) => "unknown_offer",
                    flotilla_offers::offerer::ReserveError::NotEnoughMemory { .. } => {
                        "not_enough_memory"
                    }
                    flotilla_offers::offerer::ReserveError::Conflict(_) => "conflict",
                    flotilla_offers::offerer::ReserveError::Offer(_) => "signing",
                };
                MarketMetrics::count(&metrics.reservations_refused, reason);
                Response::Refused {
                    reason: e.to_string(),
                }
            }
        }
    }

    /// Gives a reservation's memory back for a scheduler that did not use it; one that a
    /// call runs on is released by that call when it ends, and only then.
    pub(super) fn release(&self, reservation_id: u64) -> Response {
        if self.release_unless_running(reservation_id) {
            Response::Released
        } else {
            Response::Refused {
                reason: format!(
                    "reservation {reservation_id} is running a call; it is released when the call ends"
                ),
            }
        }
    }

    /// Releases a reservation no call runs on; `false` (and nothing done) if one does.
    pub(super) fn release_unless_running(&self, reservation_id: u64) -> bool {
        let Some(offerer) = &self.shared.offerer else {
            return true;
        };
        let mut offerer = lock(offerer);
        let running = offerer
            .reservations()
            .any(|r| r.reservation_id == reservation_id && r.hold_until_ms.is_none());
        if running {
            return false;
        }
        // Checked and released under one lock: no call is admitted on it in between.
        let actions = offerer.release(now_ms(), reservation_id);
        drop(offerer);
        self.announce_release(actions);
        true
    }

    /// Gives a reservation's memory back; returns the offer's new version (sent to its
    /// holder or not), for the scheduler whose call it was.
    pub(super) fn release_and_tell(&self, reservation_id: u64) -> Option<Box<SignedOffer>> {
        let offerer = self.shared.offerer.as_ref()?;
        let mut offerer = lock(offerer);
        let offer_id = offerer
            .reservations()
            .find(|r| r.reservation_id == reservation_id)?
            .offer_id;
        let actions = offerer.release(now_ms(), reservation_id);
        let newer = offerer.latest(offer_id).cloned().map(Box::new);
        drop(offerer);
        self.announce_release(actions);
        newer
    }

    /// Sends what a release changed to the offer's holder.
    fn announce_release(&self, actions: Result<Vec<Action>, flotilla_offers::offer::OfferError>) {
        self.perform_all(actions);
        self.shared.wake_offerer.notify_one();
    }

    /// Every `notify_interval`, tells a random scheduler what this node has free.
    pub(super) async fn feed_schedulers(self) {
        let Some(offerer) = &self.shared.offerer else {
            return;
        };
        let mut rng = StdRng::from_os_rng();
        let mut stop = self.stopping();
        let mut ticks = tokio::time::interval(self.shared.config.notify_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop.changed() => return,
            }
            let mut offers = lock(offerer).current_offers(now_ms());
            if offers.is_empty() {
                continue;
            }
            offers.truncate(MAX_NOTIFY_OFFERS);
            let schedulers = self.schedulers().await;
            let Some(scheduler) = flotilla_scheduler::registry::pick(&schedulers, None, &mut rng)
            else {
                continue;
            };
            let request = Request::Notify { offers };
            let timeout = self.shared.config.answer_timeout;
            match self.call(scheduler, Vec::new(), request, timeout).await {
                Ok(Response::Notified { accepted }) => {
                    tracing::debug!(%scheduler, accepted, "told a scheduler what is free");
                }
                other => tracing::debug!(%scheduler, ?other, "scheduler not notified"),
            }
        }
    }
}
