//! Splitting a Testground run: each instance asks its sidecar to drop traffic to the other
//! side's addresses, and to drop nothing when healed.

use super::{LinkError, Links, Side};
use std::net::IpAddr;
use testground::network_conf::{
    DEFAULT_DATA_NETWORK, FilterAction, LinkRule, LinkShape, NetworkConfiguration,
    RoutingPolicyType,
};

/// Network shaping through the sidecar of a Testground instance.
#[derive(Clone)]
pub struct SidecarLinks {
    client: testground::client::Client,
    latency_ms: u32,
    loss_percent: f64,
}

impl SidecarLinks {
    /// Shapes through `client`, keeping every link's `latency_ms` and `loss_percent`.
    pub fn new(client: testground::client::Client, latency_ms: u32, loss_percent: f64) -> Self {
        SidecarLinks {
            client,
            latency_ms,
            loss_percent,
        }
    }

    fn shape(&self, filter: FilterAction) -> LinkShape {
        LinkShape {
            latency: u64::from(self.latency_ms) * 1_000_000,
            jitter: 0,
            bandwidth: 0,
            filter,
            loss: self.loss_percent as f32,
            corrupt: 0.0,
            corrupt_corr: 0.0,
            reorder: 0.0,
            reorder_corr: 0.0,
            duplicate: 0.0,
            duplicate_corr: 0.0,
        }
    }

    /// Applies `rules` over the default shape and waits for the sidecar.
    pub async fn configure(&self, state: &str, rules: Vec<LinkRule>) -> Result<(), LinkError> {
        let config = NetworkConfiguration {
            network: DEFAULT_DATA_NETWORK.to_owned(),
            ipv4: None,
            ipv6: None,
            enable: true,
            default: self.shape(FilterAction::Accept),
            rules: Some(rules),
            callback_state: state.to_owned(),
            callback_target: None,
            routing_policy: RoutingPolicyType::DenyAll,
        };
        self.client
            .configure_network(config)
            .await
            .map_err(|e| LinkError::Command {
                command: format!("configure network ({state})"),
                reason: e.to_string(),
            })
    }
}

impl Links for SidecarLinks {
    async fn split(&self, side: Side, others: &[IpAddr]) -> Result<(), LinkError> {
        let rules = others
            .iter()
            .map(|ip| LinkRule {
                link_shape: self.shape(FilterAction::Drop),
                subnet: ipnetwork::IpNetwork::from(*ip),
            })
            .collect();
        self.configure(&format!("split-{side:?}"), rules).await
    }

    async fn heal(&self) -> Result<(), LinkError> {
        self.configure("healed", Vec::new()).await
    }
}
