//! Who may call the `/v1` routes.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Who may call the `/v1` routes: the SHA-256 digests of the accepted bearer tokens
/// (compared as digests, so a comparison's timing tells nothing about a token), or
/// anyone (`--no-auth`).
#[derive(Clone)]
pub enum Access {
    /// Any caller.
    Open,
    /// Callers with one of these token digests.
    Tokens(Arc<Vec<[u8; 32]>>),
}

impl Access {
    /// Access for `tokens` (trimmed; empty ones ignored); `None` when there is none.
    pub fn tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Option<Self> {
        let digests: Vec<[u8; 32]> = tokens
            .into_iter()
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(token_digest)
            .collect();
        (!digests.is_empty()).then(|| Self::Tokens(Arc::new(digests)))
    }

    /// The access of a server on `addr`: the configured `tokens`, or with `open`
    /// (`--no-auth`) anyone, which only a loopback address may serve. An error says what
    /// to set when neither or both are given.
    pub fn configured<'a>(
        tokens: impl IntoIterator<Item = &'a str>,
        open: bool,
        addr: SocketAddr,
    ) -> Result<Self> {
        match (Self::tokens(tokens), open) {
            (Some(_), true) => Err(Error::Config(
                "--no-auth with tokens configured: choose one".into(),
            )),
            (Some(access), false) => Ok(access),
            (None, true) if addr.ip().is_loopback() => {
                tracing::warn!("serving /v1 without credentials (--no-auth)");
                Ok(Self::Open)
            }
            (None, true) => Err(Error::Config(format!(
                "--no-auth serves credit decisions to anyone who can connect: only on a \
                 loopback address, not {addr}"
            ))),
            (None, false) => Err(Error::Config(
                "no credentials configured: set STREETFLOW_SERVE_TOKENS (comma-separated \
                 bearer tokens) or --tokens-file, or run with --no-auth on a loopback address"
                    .into(),
            )),
        }
    }

    /// Whether a caller presenting `presented` (the bearer token, if any) is let in.
    pub fn admits(&self, presented: Option<&str>) -> bool {
        match self {
            Self::Open => true,
            Self::Tokens(digests) => presented.is_some_and(|token| {
                let digest = token_digest(token);
                digests
                    .iter()
                    .fold(false, |found, d| found | (*d == digest))
            }),
        }
    }
}

fn token_digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::Access;

    fn loopback() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 8080))
    }

    #[test]
    fn only_configured_tokens_are_admitted() {
        let access = Access::configured(["alpha", " beta ", ""], false, loopback())
            .expect("tokens configured");
        assert!(access.admits(Some("alpha")));
        assert!(access.admits(Some("beta")));
        assert!(!access.admits(Some("gamma")));
        assert!(!access.admits(Some("")));
        assert!(!access.admits(None));
    }

    #[test]
    fn open_access_needs_a_loopback_address_and_no_tokens() {
        let anywhere = std::net::SocketAddr::from(([0, 0, 0, 0], 8080));
        assert!(Access::configured([], true, loopback()).is_ok_and(|a| a.admits(None)));
        assert!(Access::configured([], true, anywhere).is_err());
        assert!(Access::configured(["alpha"], true, loopback()).is_err());
        assert!(Access::configured([" "], false, loopback()).is_err());
    }
}
