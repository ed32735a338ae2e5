//! The typed parameters of the test cases, read from `key=value` pairs (Testground's
//! `TEST_INSTANCE_PARAMS`, or `--param` locally) over the defaults that
//! `testground/manifest.toml` declares too.
//!
//! Unknown keys and bad values are refused, naming the key, so a typo never runs an
//! experiment with a silent default.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Why parameters were refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParamError {
    /// No parameter of that name.
    #[error("unknown parameter '{0}' (known: {known})", known = KNOWN.join(", "))]
    Unknown(String),
    /// The value does not parse or is out of range.
    #[error("parameter {key}={value}: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What it must be.
        reason: String,
    },
}

/// Every parameter's name, as in the manifest.
pub const KNOWN: &[&str] = &[
    "schedulers",
    "clients",
    "duration_s",
    "utilisation",
    "call_ms",
    "max_tries",
    "key_space",
    "fallback",
    "offer_tiers",
    "max_in_flight",
    "offer_ttl_s",
    "notify_interval_s",
    "warmup_s",
    "latency_ms",
    "loss_percent",
    "churn_per_min",
    "session_shape",
    "graceful",
    "split_after_s",
    "heal_after_s",
    "seed",
    "input_kib",
    "store_mib",
];

/// The parameters of one run; every instance of it reads the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Instances that are schedulers (the first ones; the first also bootstraps the rest).
    pub schedulers: u32,
    /// Instances that invoke (after the schedulers); the rest are volunteers.
    pub clients: u32,
    /// How long the clients invoke, in seconds.
    pub duration_s: u64,
    /// Share of the lent memory the clients aim to keep reserved (0–1).
    pub utilisation: f64,
    /// How long each call holds its memory (the `sleep` function's argument), in ms.
    pub call_ms: u64,
    /// Region probes before the super-trader fallback.
    pub max_tries: u32,
    /// `regions` (Flotilla) or `whole` (the baseline: keys anywhere).
    pub key_space: String,
    /// Whether schedulers fall back to their super-trader list (off for the baseline).
    pub fallback: bool,
    /// What volunteers lend: `MiB:weight` pairs, e.g. `512:40,1024:30,2048:20,4096:10`.
    pub offer_tiers: Vec<(u32, u32)>,
    /// Most calls one client has in flight.
    pub max_in_flight: u32,
    /// How long an offer lives unless refreshed, in seconds.
    pub offer_ttl_s: u64,
    /// How often a volunteer tells a random scheduler what it has free, in seconds.
    pub notify_interval_s: u64,
    /// Seconds between everyone being ready and the workload, for the schedulers'
    /// super-trader lists to fill (nothing is recorded meanwhile).
    pub warmup_s: u64,
    /// Added one-way latency of every node's link, in ms (needs network namespaces).
    pub latency_ms: u32,
    /// Packet loss of every node's link, in % (needs network namespaces).
    pub loss_percent: f64,
    /// Share of the volunteers replaced per minute (churn case): 0.1 replaces a tenth of
    /// them each minute; above 1 each is replaced more than once a minute on average (for
    /// short smoke runs).
    pub churn_per_min: f64,
    /// Pareto shape of session lengths (smaller: heavier tail); above 1.
    pub session_shape: f64,
    /// Share of departures that are graceful (the rest crash).
    pub graceful: f64,
    /// When the network splits, seconds into the workload (partition case).
    pub split_after_s: u64,
    /// When it heals, seconds into the workload (partition case).
    pub heal_after_s: u64,
    /// Seed of the scenario's random choices (offset by instance): what volunteers lend,
    /// when clients call and with how much memory, session lengths and how sessions end.
    /// The nodes' own choices (identities, which keys a scheduler probes) are not seeded,
    /// so two runs with one seed are alike, not identical.
    pub seed: u64,
    /// Bytes of distinct random stdin each call brings, in KiB (0: none): uploaded on the
    /// client's node, fetched and stored by the volunteer that runs it.
    pub input_kib: u64,
    /// Each node's store capacity, in MiB (0: the node's default, 10 GiB).
    pub store_mib: u64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            schedulers: 2,
            clients: 2,
            duration_s: 120,
            utilisation: 0.3,
            call_ms: 2000,
            max_tries: 3,
            key_space: "regions".into(),
            fallback: true,
            offer_tiers: vec![(512, 40), (1024, 30), (2048, 20), (4096, 10)],
            max_in_flight: 256,
            offer_ttl_s: 30,
            notify_interval_s: 2,
            warmup_s: 10,
            latency_ms: 0,
            loss_percent: 0.0,
            churn_per_min: 0.1,
            session_shape: 1.5,
            graceful: 0.5,
            split_after_s: 40,
            heal_after_s: 80,
            seed: 1,
            input_kib: 0,
            store_mib: 0,
        }
    }
}

fn invalid(key: &str, value: &str, reason: &str) -> ParamError {
    ParamError::Invalid {
        key: key.into(),
        value: value.into(),
        reason: reason.into(),
    }
}

fn number<T: std::str::FromStr>(key: &str, value: &str, what: &str) -> Result<T, ParamError> {
    value.trim().parse().map_err(|_| invalid(key, value, what))
}

fn share(key: &str, value: &str) -> Result<f64, ParamError> {
    let v: f64 = number(key, value, "a number from 0 to 1")?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(invalid(key, value, "a number from 0 to 1"))
    }
}

fn tiers(key: &str, value: &str) -> Result<Vec<(u32, u32)>, ParamError> {
    let what = "MiB:weight pairs, e.g. 512:40,1024:30 (MiB 128–10240)";
    let pairs = value
        .split(',')
        .map(|pair| {
            let (mib, weight) = pair
                .split_once(':')
                .ok_or_else(|| invalid(key, value, what))?;
            let mib: u32 = number(key, mib, what)?;
            let weight: u32 = number(key, weight, what)?;
            if !(128..=10240).contains(&mib) || weight == 0 {
                return Err(invalid(key, value, what));
            }
            Ok((mib, weight))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if pairs.is_empty() {
        return Err(invalid(key, value, what));
    }
    Ok(pairs)
}

impl Params {
    /// The defaults with `pairs` applied over them.
    pub fn from_pairs<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Params, ParamError> {
        let mut p = Params::default();
        for (key, value) in pairs {
            p.set(key, value)?;
        }
        p.check()?;
        Ok(p)
    }

    /// The defaults with Testground's instance parameters applied.
    pub fn from_map(map: &HashMap<String, String>) -> Result<Params, ParamError> {
        // Sorted, so the first error is the same every time.
        let sorted: BTreeMap<&str, &str> =
            map.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Params::from_pairs(sorted)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), ParamError> {
        let count = "a whole number";
        match key {
            "schedulers" => self.schedulers = number(key, value, count)?,
            "clients" => self.clients = number(key, value, count)?,
            "duration_s" => self.duration_s = number(key, value, count)?,
            "utilisation" => self.utilisation = share(key, value)?,
            "call_ms" => self.call_ms = number(key, value, count)?,
            "max_tries" => self.max_tries = number(key, value, count)?,
            "key_space" => match value {
                "regions" | "whole" => self.key_space = value.into(),
                _ => return Err(invalid(key, value, "regions or whole")),
            },
            "fallback" => self.fallback = number(key, value, "true or false")?,
            "offer_tiers" => self.offer_tiers = tiers(key, value)?,
            "max_in_flight" => self.max_in_flight = number(key, value, count)?,
            "offer_ttl_s" => self.offer_ttl_s = number(key, value, count)?,
            "notify_interval_s" => self.notify_interval_s = number(key, value, count)?,
            "warmup_s" => self.warmup_s = number(key, value, count)?,
            "latency_ms" => self.latency_ms = number(key, value, count)?,
            "loss_percent" => self.loss_percent = number(key, value, "a percentage")?,
            "churn_per_min" => {
                let what = "a share of the volunteers per minute, from 0 to 60";
                self.churn_per_min = number(key, value, what)?;
                if !(0.0..=60.0).contains(&self.churn_per_min) {
                    return Err(invalid(key, value, what));
                }
            }
            "session_shape" => self.session_shape = number(key, value, "a number above 1")?,
            "graceful" => self.graceful = share(key, value)?,
            "split_after_s" => self.split_after_s = number(key, value, count)?,
            "heal_after_s" => self.heal_after_s = number(key, value, count)?,
            "seed" => self.seed = number(key, value, count)?,
            "input_kib" => self.input_kib = number(key, value, count)?,
            "store_mib" => self.store_mib = number(key, value, count)?,
            _ => return Err(ParamError::Unknown(key.into())),
        }
        Ok(())
    }

    fn check(&self) -> Result<(), ParamError> {
        let show = |v: &dyn std::fmt::Display| v.to_string();
        if self.schedulers == 0 {
            return Err(invalid("schedulers", "0", "at least 1"));
        }
        if self.call_ms > 600_000 {
            return Err(invalid("call_ms", &show(&self.call_ms), "at most 600000"));
        }
        // A call's stdin is held in memory by the volunteer: no more than the smallest
        // call's 128 MiB.
        if self.input_kib > 128 * 1024 {
            return Err(invalid(
                "input_kib",
                &show(&self.input_kib),
                "at most 131072",
            ));
        }
        if self.store_mib != 0 && self.store_mib < 64 {
            return Err(invalid(
                "store_mib",
                &show(&self.store_mib),
                "0 or at least 64",
            ));
        }
        if !(1..=64).contains(&self.max_tries) {
            return Err(invalid("max_tries", &show(&self.max_tries), "1 to 64"));
        }
        if !(1..=4096).contains(&self.max_in_flight) {
            return Err(invalid(
                "max_in_flight",
                &show(&self.max_in_flight),
                "1 to 4096",
            ));
        }
        if self.offer_ttl_s < 4 {
            return Err(invalid(
                "offer_ttl_s",
                &show(&self.offer_ttl_s),
                "at least 4",
            ));
        }
        if self.notify_interval_s == 0 {
            return Err(invalid("notify_interval_s", "0", "at least 1"));
        }
        if !(0.0..=100.0).contains(&self.loss_percent) {
            return Err(invalid(
                "loss_percent",
                &show(&self.loss_percent),
                "0 to 100",
            ));
        }
        if self.session_shape <= 1.0 {
            return Err(invalid(
                "session_shape",
                &show(&self.session_shape),
                "above 1 (a finite mean)",
            ));
        }
        if self.heal_after_s <= self.split_after_s {
            return Err(invalid(
                "heal_after_s",
                &show(&self.heal_after_s),
                "after split_after_s",
            ));
        }
        Ok(())
    }

    /// Instances needed besides the volunteers.
    pub fn fixed_instances(&self) -> u32 {
        self.schedulers + self.clients
    }

    /// Whether links need shaping (latency or loss), hence network namespaces.
    pub fn shapes_links(&self) -> bool {
        self.latency_ms > 0 || self.loss_percent > 0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_apply_and_pairs_override_them() {
        let p = Params::from_pairs([("utilisation", "0.8"), ("offer_tiers", "256:1,1024:3")])
            .expect("valid");
        assert_eq!(p.utilisation, 0.8);
        assert_eq!(p.offer_tiers, vec![(256, 1), (1024, 3)]);
        assert_eq!(p.max_tries, Params::default().max_tries);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let err = Params::from_pairs([("utilization", "0.3")]).expect_err("typo");
        assert!(
            err.to_string()
                .starts_with("unknown parameter 'utilization'")
        );
        for (key, value) in [
            ("utilisation", "1.5"),
            ("max_tries", "zero"),
            ("offer_tiers", "512"),
            ("offer_tiers", "64:1"),
            ("key_space", "ring"),
            ("session_shape", "1"),
            ("churn_per_min", "61"),
        ] {
            let err = Params::from_pairs([(key, value)]).expect_err(key);
            assert!(err.to_string().contains(key), "{err}");
        }
        let err = Params::from_pairs([("split_after_s", "50"), ("heal_after_s", "50")])
            .expect_err("heal before split");
        assert!(err.to_string().contains("heal_after_s"));
    }

    /// The parameters only one case has.
    fn only_in(case: &str) -> &'static [&'static str] {
        match case {
            "churn" => &["churn_per_min", "session_shape", "graceful"],
            "partition" => &["split_after_s", "heal_after_s"],
            _ => &[],
        }
    }

    #[test]
    fn the_manifest_declares_every_parameter_with_the_same_default() {
        let manifest: toml::Table = toml::from_str(include_str!("../manifest.toml")).expect("toml");
        let cases = manifest["testcases"].as_array().expect("testcases");
        assert_eq!(cases.len(), 3);
        let defaults = Params::default();
        let specific: Vec<&str> = ["churn", "partition"]
            .into_iter()
            .flat_map(only_in)
            .copied()
            .collect();
        for case in cases {
            let name = case["name"].as_str().expect("name");
            let params = case["params"].as_table().expect("params");
            // Both ways: the case declares exactly the common parameters and its own.
            let mut declared: Vec<&str> = params.keys().map(String::as_str).collect();
            let mut expected: Vec<&str> = KNOWN
                .iter()
                .copied()
                .filter(|k| !specific.contains(k) || only_in(name).contains(k))
                .collect();
            declared.sort_unstable();
            expected.sort_unstable();
            assert_eq!(declared, expected, "the parameters of {name}");
            let mut pairs = Vec::new();
            for (key, spec) in params {
                let value = &spec["default"];
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                pairs.push((key.clone(), text));
            }
            let p = Params::from_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .expect("manifest defaults are valid");
            assert_eq!(p, defaults, "{name}");
        }
    }
}
