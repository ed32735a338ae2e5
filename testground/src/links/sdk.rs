//! Splitting a Testground run: each instance asks its sidecar to drop traffic to the other
//! side's addresses, and to drop nothing when healed.
//!
//! The SDK's `configure_network` returns only once the configuration's callback state has
//! been signalled `callback_target` times, and each sidecar signals it once, when it has
//! applied its own instance's change. So every change of a run uses one state name that
//! every instance's sidecar signals, with the run's instance count as the target: the
//! call returns when the whole network is in the new state. (A target left unset means the
//! instance count to the SDK too, but a side-specific state with it never completes: only
//! half the sidecars signal each side's state.)

use super::{LinkError, Links, Side};
use std::net::IpAddr;
use testground::network_conf::{
    DEFAULT_DATA_NETWORK, FilterAction, LinkRule, LinkShape, NetworkConfiguration,
    RoutingPolicyType,
};

/// The state every sidecar signals once the network is split.
pub const SPLIT_STATE: &str = "network-split";
/// The state every sidecar signals once the network is healed.
pub const HEALED_STATE: &str = "network-healed";
/// The state every sidecar signals once the links have their latency and loss.
pub const SHAPED_STATE: &str = "links-shaped";

/// The network configurations of one run: every link's latency and loss, and how many
/// sidecars each change waits for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shapes {
    /// Added one-way latency of every link, in ms.
    pub latency_ms: u32,
    /// Packet loss of every link, in %.
    pub loss_percent: f64,
    /// Instances of the run, each with its own sidecar.
    pub instances: u64,
}

impl Shapes {
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

    /// The default shape with traffic to `dropped` cut, signalling `state`, complete once
    /// every instance's sidecar has signalled it.
    pub fn configuration(&self, state: &str, dropped: &[IpAddr]) -> NetworkConfiguration {
        let rules = dropped
            .iter()
            .map(|ip| LinkRule {
                link_shape: self.shape(FilterAction::Drop),
                subnet: ipnetwork::IpNetwork::from(*ip),
            })
            .collect();
        NetworkConfiguration {
            network: DEFAULT_DATA_NETWORK.to_owned(),
            ipv4: None,
            ipv6: None,
            enable: true,
            default: self.shape(FilterAction::Accept),
            rules: Some(rules),
            callback_state: state.to_owned(),
            callback_target: Some(self.instances),
            routing_policy: RoutingPolicyType::DenyAll,
        }
    }
}

/// Network shaping through the sidecar of a Testground instance.
#[derive(Clone)]
pub struct SidecarLinks {
    client: testground::client::Client,
    shapes: Shapes,
}

impl SidecarLinks {
    /// Shapes through `client`, keeping every link's latency and loss.
    pub fn new(client: testground::client::Client, shapes: Shapes) -> Self {
        SidecarLinks { client, shapes }
    }

    /// Applies the default shape with traffic to `dropped` cut, and waits until every
    /// instance's sidecar has signalled `state`.
    pub async fn configure(&self, state: &str, dropped: &[IpAddr]) -> Result<(), LinkError> {
        self.client
            .configure_network(self.shapes.configuration(state, dropped))
            .await
            .map_err(|e| LinkError::Command {
                command: format!("configure network ({state})"),
                reason: e.to_string(),
            })
    }
}

impl Links for SidecarLinks {
    async fn split(&self, _side: Side, others: &[IpAddr]) -> Result<(), LinkError> {
        self.configure(SPLIT_STATE, others).await
    }

    async fn heal(&self) -> Result<(), LinkError> {
        self.configure(HEALED_STATE, &[]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn shapes() -> Shapes {
        Shapes {
            latency_ms: 25,
            loss_percent: 0.5,
            instances: 7,
        }
    }

    #[test]
    fn both_sides_signal_one_split_state_and_wait_for_every_instance() {
        let (a, b) = (Side::of(0), Side::of(1));
        assert_ne!(a, b);
        // What instance 0 (side A) and instance 1 (side B) ask their sidecars for.
        let side_a = shapes().configuration(SPLIT_STATE, &[IpAddr::V4(Ipv4Addr::new(16, 0, 0, 2))]);
        let side_b = shapes().configuration(SPLIT_STATE, &[IpAddr::V4(Ipv4Addr::new(16, 0, 0, 3))]);
        for config in [&side_a, &side_b] {
            assert_eq!(config.callback_state, SPLIT_STATE);
            // All 7 sidecars signal the one state, so a target of 7 is reached.
            assert_eq!(config.callback_target, Some(7));
        }
        let rules = side_a.rules.as_ref().expect("rules");
        assert_eq!(rules.len(), 1);
        assert!(matches!(rules[0].link_shape.filter, FilterAction::Drop));
        assert_eq!(rules[0].subnet.to_string(), "16.0.0.2/32");
        assert!(matches!(side_a.default.filter, FilterAction::Accept));
    }

    #[test]
    fn a_heal_drops_nothing_and_keeps_latency_and_loss() {
        let config = shapes().configuration(HEALED_STATE, &[]);
        assert_eq!(config.callback_state, HEALED_STATE);
        assert_eq!(config.callback_target, Some(7));
        assert!(config.rules.as_ref().is_some_and(Vec::is_empty));
        assert_eq!(config.default.latency, 25_000_000);
        assert!((config.default.loss - 0.5).abs() < 1e-6);
        // The sidecar reads the target from the JSON the SDK sends it.
        let json = serde_json::to_value(&config).expect("json");
        assert_eq!(json["callback_target"], 7);
        assert_eq!(json["callback_state"], HEALED_STATE);
    }

    /// A state's counter only grows: were the heal to reuse the split's state, its wait
    /// would end at once, on the split's signals.
    #[test]
    fn every_change_has_its_own_state() {
        let states = [SPLIT_STATE, HEALED_STATE, SHAPED_STATE];
        let distinct: std::collections::HashSet<_> = states.iter().collect();
        assert_eq!(distinct.len(), states.len());
    }
}
