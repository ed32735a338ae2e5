//! The coordinator of Testground runs: the Rust SDK's client of the sync service.
//!
//! The SDK reads the run from `TEST_*` environment variables, connects to
//! `testground-sync-service:5050` and waits for the sidecar to set the network up.

use super::{CoordError, Coordinator, Subscription};
use futures::StreamExt;
use std::borrow::Cow;

/// Signal, barrier, publish and subscribe through Testground's sync service.
#[derive(Clone)]
pub struct SdkCoordinator {
    client: testground::client::Client,
}

impl SdkCoordinator {
    /// Wraps a client made by `testground::client::Client::new_and_init`.
    pub fn new(client: testground::client::Client) -> SdkCoordinator {
        SdkCoordinator { client }
    }

    /// The SDK's client, for what only Testground has (network shaping, outcomes).
    pub fn client(&self) -> &testground::client::Client {
        &self.client
    }
}

fn sync_error(e: testground::errors::Error) -> CoordError {
    CoordError::Sync(e.to_string())
}

impl Coordinator for SdkCoordinator {
    async fn signal(&self, state: &str) -> Result<u64, CoordError> {
        self.client
            .signal(state.to_string())
            .await
            .map_err(sync_error)
    }

    async fn barrier(&self, state: &str, target: u64) -> Result<(), CoordError> {
        // The SDK turns a target of 0 into the instance count; here 0 is reached at once,
        // as in the local coordinator.
        if target == 0 {
            return Ok(());
        }
        self.client
            .barrier(state.to_string(), target)
            .await
            .map_err(sync_error)
    }

    async fn publish(&self, topic: &str, message: serde_json::Value) -> Result<u64, CoordError> {
        self.client
            .publish(topic.to_string(), Cow::Owned(message))
            .await
            .map_err(sync_error)
    }

    async fn subscribe(&self, topic: &str) -> Result<Subscription, CoordError> {
        // The SDK blocks all of the client's work while this buffer is full; scenarios
        // read their subscriptions to the end or drop them.
        let stream = self.client.subscribe(topic.to_string(), 4096).await;
        Ok(stream.map(|item| item.map_err(sync_error)).boxed())
    }
}
