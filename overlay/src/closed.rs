//! Closed networks: libp2p's pre-shared-key private networks. With a key, every TCP
//! connection first exchanges nonces and is then encrypted with XSalsa20 under the key,
//! before noise and yamux, so a peer without the key fails the noise handshake and never
//! connects. QUIC cannot carry this layer, so a closed network runs on TCP only.
//! Key files are go-ipfs' `swarm.key` format (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex
//! digits), so the same file closes a Kubo private network.

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, Transport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::pnet::PnetConfig;
pub use libp2p::pnet::PreSharedKey;
use libp2p::{PeerId, noise, quic, tcp, yamux};
use std::path::Path;
use std::time::Duration;

/// How long the key's nonce exchange may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of reading a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file could not be read.
    #[error("cannot read network key {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a swarm key.
    #[error(
        "{path} is not a network key (expected /key/swarm/psk/1.0.0/, /base16/, 64 hex digits): {reason}"
    )]
    Parse {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
}

/// Reads a `swarm.key` file.
pub fn read_key(path: &Path) -> Result<PreSharedKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.into(),
        source,
    })?;
    text.trim().parse().map_err(|e| KeyError::Parse {
        path: path.into(),
        reason: format!("{e}"),
    })
}

/// A new random key, as the text of a `swarm.key` file.
pub fn new_key_file() -> String {
    let key = PreSharedKey::new(rand::random());
    format!("{}\n", key.to_key_file())
}

/// The node's transport: TCP with noise and yamux, and QUIC; or, with a key, TCP
/// protected by the key and no QUIC.
pub fn transport(
    keypair: &Keypair,
    key: Option<PreSharedKey>,
    yamux: yamux::Config,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
    let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true));
    let noise = noise::Config::new(keypair)?;
    Ok(match key {
        Some(key) => tcp
            .and_then(move |socket, _| async move {
                tokio::time::timeout(HANDSHAKE_TIMEOUT, PnetConfig::new(key).handshake(socket))
                    .await
                    .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
                    .map_err(std::io::Error::other)
            })
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        None => tcp
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .or_transport(
                quic::tokio::Transport::new(quic::Config::new(keypair))
                    .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer))),
            )
            .map(|either, _| either.into_inner())
            .boxed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("swarm.key");
        let text = new_key_file();
        assert!(text.starts_with("/key/swarm/psk/1.0.0/\n/base16/\n"));
        std::fs::write(&path, &text).unwrap();
        let key = read_key(&path).unwrap();
        assert_eq!(format!("{}\n", key.to_key_file()), text);
        assert_ne!(new_key_file(), text);
        std::fs::write(&path, "/key/swarm/psk/1.0.0/\n/base16/\nnothex\n").unwrap();
        assert!(matches!(read_key(&path), Err(KeyError::Parse { .. })));
        assert!(matches!(
            read_key(&dir.path().join("absent")),
            Err(KeyError::Read { .. })
        ));
    }
}
