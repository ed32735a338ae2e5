//! The node's persistent ed25519 identity, kept in the data directory so the PeerId
//! survives restarts.

use libp2p::identity::Keypair;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The identity file's name inside the data directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Errors of loading or creating the identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The file could not be read or written.
    #[error("identity file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file does not hold a valid key.
    #[error("identity file {0} is corrupt; move it away to create a new identity")]
    Corrupt(PathBuf),
}

/// Loads the keypair from `data_dir`, creating and saving a new ed25519 one if there is
/// none. The file is written atomically, readable by its owner only.
pub fn load_or_create(data_dir: &Path) -> Result<Keypair, IdentityError> {
    let path = data_dir.join(IDENTITY_FILE);
    let io = |source| IdentityError::Io {
        path: path.clone(),
        source,
    };
    match fs::read(&path) {
        Ok(bytes) => Keypair::from_protobuf_encoding(&bytes)
            .map_err(|_| IdentityError::Corrupt(path.clone())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            fs::create_dir_all(data_dir).map_err(io)?;
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair.to_protobuf_encoding().expect("ed25519 keys encode");
            let tmp = data_dir.join(format!("{IDENTITY_FILE}.tmp"));
            let write = || -> std::io::Result<()> {
                let mut options = fs::OpenOptions::new();
                options.write(true).create(true).truncate(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
                let mut file = options.open(&tmp)?;
                file.write_all(&bytes)?;
                file.sync_all()?;
                fs::rename(&tmp, &path)
            };
            write().map_err(io)?;
            Ok(keypair)
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        let second = load_or_create(dir.path()).unwrap();
        assert_eq!(first.public().to_peer_id(), second.public().to_peer_id());
    }

    #[test]
    fn corrupt_identity_is_an_error_not_a_new_identity() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(IDENTITY_FILE), b"garbage").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(IdentityError::Corrupt(_))
        ));
    }
}
