//! Who may use the local API. On a loopback address (the default), only requests whose
//! `Host` names loopback (`localhost`, `127.0.0.0/8`, `[::1]`, with an optional port)
//! and that no web page sent (no `Origin`) are served, so a page the volunteer visits
//! cannot reach the node, not even by DNS rebinding. An address other programs on the
//! network can reach is refused unless `--api-allow-remote` is given, and then every
//! request must carry `Authorization: Bearer <token>`, the token the node writes to a
//! 0600 file in its data dir ([`TOKEN_FILE`]) at each start; the CLI reads it by itself.

use axum::http::{HeaderMap, StatusCode, header};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// The token file's name in the data dir.
pub const TOKEN_FILE: &str = "api.token";

/// Random bytes in a token (written as twice as many hex digits).
const TOKEN_BYTES: usize = 32;

/// Who the API answers.
#[derive(Clone)]
pub enum Access {
    /// Local programs only: `Host` must name loopback.
    Loopback,
    /// Anyone holding the token (the API listens where others can reach it).
    Token(String),
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Loopback => f.write_str("Loopback"),
            Access::Token(_) => f.write_str("Token(..)"),
        }
    }
}

impl Access {
    /// Why a request with these headers is refused, if it is: the status and a line.
    pub fn refusal(&self, headers: &HeaderMap) -> Option<(StatusCode, &'static str)> {
        if headers.contains_key(header::ORIGIN) {
            return Some((
                StatusCode::FORBIDDEN,
                "the node API answers local programs, not web pages",
            ));
        }
        match self {
            Access::Loopback => {
                let host_ok = headers
                    .get(header::HOST)
                    .is_none_or(|h| h.to_str().is_ok_and(host_is_loopback));
                (!host_ok).then_some((
                    StatusCode::FORBIDDEN,
                    "the node API answers only requests for a loopback host (localhost, 127.0.0.1, [::1])",
                ))
            }
            Access::Token(token) => {
                let given = headers
                    .get(header::AUTHORIZATION)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.strip_prefix("Bearer "));
                let ok = given.is_some_and(|given| same(given.trim().as_bytes(), token.as_bytes()));
                (!ok).then_some((
                    StatusCode::UNAUTHORIZED,
                    "this node API needs its token (Authorization: Bearer <the data dir's api.token>)",
                ))
            }
        }
    }
}

/// Whether a `Host` header names loopback: `localhost`, an address of `127.0.0.0/8` or
/// `[::1]`, each with an optional port.
pub fn host_is_loopback(host: &str) -> bool {
    let port_ok = |port: &str| port.is_empty() || port.parse::<u16>().is_ok();
    if let Some(rest) = host.strip_prefix('[') {
        let Some((ip, after)) = rest.split_once(']') else {
            return false;
        };
        let port = match after {
            "" => "",
            after => match after.strip_prefix(':') {
                Some(port) if !port.is_empty() => port,
                _ => return false,
            },
        };
        return port_ok(port) && ip.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    let (name, port) = match host.split_once(':') {
        Some((name, port)) if !port.is_empty() => (name, port),
        Some(_) => return false,
        None => (host, ""),
    };
    port_ok(port)
        && (name.eq_ignore_ascii_case("localhost")
            || name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback()))
}

/// Compares in time that depends only on the lengths, not on where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token file of a data dir.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

/// Makes a new random token and writes it to the data dir's token file, readable by
/// its owner only (0600); any older file is replaced.
pub fn write_token(data_dir: &Path) -> std::io::Result<String> {
    let bytes: [u8; TOKEN_BYTES] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::create_dir_all(data_dir)?;
    let path = token_path(data_dir);
    let tmp = data_dir.join(format!("{TOKEN_FILE}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

/// The token in a token file, if there is one.
pub fn read_token(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let token = text.trim();
    (!token.is_empty()).then(|| token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for host in [
            "localhost",
            "LOCALHOST:4180",
            "127.0.0.1",
            "127.0.0.1:4180",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:4180",
        ] {
            assert!(host_is_loopback(host), "{host}");
        }
        for host in [
            "10.1.2.3",
            "10.1.2.3:4180",
            "0.0.0.0",
            "192.168.1.1:4180",
            "[::]",
            "[fe80::1]:4180",
            "[::ffff:127.0.0.1]",
            "evil.example",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "localhost:",
            "localhost:x",
            "[::1]:",
            "[::1]x",
            "[::1",
            "::1",
            "",
        ] {
            assert!(!host_is_loopback(host), "{host}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abcd", b"abcd"));
        assert!(!same(b"abcd", b"abce"));
        assert!(!same(b"abcd", b"abc"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn the_token_file_is_the_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        let token = write_token(dir.path()).unwrap();
        assert_eq!(token.len(), 2 * TOKEN_BYTES);
        assert_eq!(read_token(&token_path(dir.path())), Some(token.clone()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(token_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert_ne!(write_token(dir.path()).unwrap(), token);
    }
}
