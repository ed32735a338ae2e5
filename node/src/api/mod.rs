//! The local HTTP API: the node serves it ([`server`]), the CLI calls it ([`client`]),
//! and both share the message types in [`types`]; the client and the types are the crate
//! `flotilla-api` (`node/api`), re-exported here, so clients build without the node.
//!
//! | method | path            | what                                                        |
//! |--------|-----------------|-------------------------------------------------------------|
//! | GET    | `/v0/status`    | PeerId, addresses, connected peers, routing table, blocks    |
//! | POST   | `/v0/add`       | body = file bytes → root CID, size, blocks                   |
//! | POST   | `/v0/fetch?cid=`| fetch a DAG; NDJSON progress lines, then `done` or `error`   |
//! | GET    | `/v0/cat?cid=`  | the file under a CID held locally, as bytes                  |
//! | GET    | `/metrics`      | Prometheus text: libp2p's metrics and ours                   |

pub mod guard;
pub mod server;
pub use flotilla_api::{client, types};

#[cfg(test)]
mod tests {
    /// A call is checked before anything is reserved (`flotilla-api`, without the
    /// executor) by the rule the executor applies when it writes the inputs.
    #[test]
    fn calls_are_checked_by_the_executors_rule_for_input_names() {
        let long = "x".repeat(256);
        let names = [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a/",
            "/etc/passwd",
            ".hidden",
            "in.txt",
            "a..b",
            "x\\y",
            "é",
            &long,
            &long[1..],
        ];
        for name in names {
            assert_eq!(
                flotilla_api::function::check_input_name(name).is_ok(),
                crate::executor::jobdir::check_name(name).is_ok(),
                "{name:?}"
            );
            if let Err(e) = crate::executor::jobdir::check_name(name) {
                assert_eq!(
                    flotilla_api::function::check_input_name(name)
                        .unwrap_err()
                        .to_string(),
                    e.to_string()
                );
            }
        }
    }
}
