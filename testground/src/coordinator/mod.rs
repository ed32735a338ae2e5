//! How instances of a scenario agree on who does what and when: counters that instances
//! signal and wait on (barriers), and topics they publish to and read in order.
//!
//! The scenario code only sees [`Coordinator`]; [`sdk::SdkCoordinator`] implements it over
//! the Testground sync service, [`local::LocalCoordinator`] in memory for local runs.

pub mod local;
pub mod sdk;

use futures::StreamExt;
use futures::stream::BoxStream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::time::Duration;

/// Why a coordination step failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The sync service failed or went away.
    #[error("sync service: {0}")]
    Sync(String),
    /// A barrier or subscription did not complete in time.
    #[error("timed out after {after:?} waiting for {what}")]
    TimedOut {
        /// What was awaited.
        what: String,
        /// How long.
        after: Duration,
    },
    /// A topic's message could not be encoded or decoded.
    #[error("topic {topic}: {reason}")]
    Payload {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
    /// A subscription ended before enough messages came.
    #[error("topic {0} ended early")]
    Ended(String),
}

/// The messages of a topic, in the order they were published, from the first.
pub type Subscription = BoxStream<'static, Result<serde_json::Value, CoordError>>;

/// Signal, barrier, publish, subscribe: the coordination a scenario needs.
pub trait Coordinator: Clone + Send + Sync + 'static {
    /// Adds one to `state`'s counter and returns its new value (1 for the first).
    fn signal(&self, state: &str) -> impl Future<Output = Result<u64, CoordError>> + Send;

    /// Waits until `state`'s counter reaches `target`. A target of 0 is reached at once
    /// (the Testground SDK would read 0 as "every instance"; neither coordinator does).
    fn barrier(
        &self,
        state: &str,
        target: u64,
    ) -> impl Future<Output = Result<(), CoordError>> + Send;

    /// Appends `message` to `topic`; returns its position (1 for the first).
    fn publish(
        &self,
        topic: &str,
        message: serde_json::Value,
    ) -> impl Future<Output = Result<u64, CoordError>> + Send;

    /// Every message of `topic`, from the first, including ones published later.
    fn subscribe(
        &self,
        topic: &str,
    ) -> impl Future<Output = Result<Subscription, CoordError>> + Send;
}

/// Signals `state` and waits until `target` instances have, within `limit`.
pub async fn signal_and_wait<C: Coordinator>(
    coordinator: &C,
    state: &str,
    target: u64,
    limit: Duration,
) -> Result<u64, CoordError> {
    let position = coordinator.signal(state).await?;
    tokio::time::timeout(limit, coordinator.barrier(state, target))
        .await
        .map_err(|_| CoordError::TimedOut {
            what: format!("{target} instances at '{state}'"),
            after: limit,
        })??;
    Ok(position)
}

/// Publishes `value` as JSON on `topic`.
pub async fn publish_as<C: Coordinator, T: Serialize>(
    coordinator: &C,
    topic: &str,
    value: &T,
) -> Result<u64, CoordError> {
    let message = serde_json::to_value(value).map_err(|e| CoordError::Payload {
        topic: topic.into(),
        reason: e.to_string(),
    })?;
    coordinator.publish(topic, message).await
}

/// The first `count` messages of `topic`, decoded, waiting at most `limit` for them.
pub async fn collect<C: Coordinator, T: DeserializeOwned>(
    coordinator: &C,
    topic: &str,
    count: usize,
    limit: Duration,
) -> Result<Vec<T>, CoordError> {
    let read = async {
        let mut messages = coordinator.subscribe(topic).await?;
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let message = messages
                .next()
                .await
                .ok_or_else(|| CoordError::Ended(topic.into()))??;
            out.push(
                serde_json::from_value(message).map_err(|e| CoordError::Payload {
                    topic: topic.into(),
                    reason: e.to_string(),
                })?,
            );
        }
        Ok(out)
    };
    tokio::time::timeout(limit, read)
        .await
        .map_err(|_| CoordError::TimedOut {
            what: format!("{count} messages on '{topic}'"),
            after: limit,
        })?
}
