//! Who may talk to the coordinator: TLS on its port (optionally mutual), bearer tokens with
//! roles from a token file, and the one table of which role may call which RPC.
//!
//! - `tokens`: the token file (`ROLE TOKEN` per line), its table of digests, and the
//!   [`TokenStore`] that reloads it when it changes.
//! - `policy`: [`RPCS`], every RPC with what it needs (admin, viewer or worker),
//!   [`HTTP_ROUTES`] (`/metrics`), the open services (health, reflection), and the check
//!   of one request.
//! - `limits`: per-caller token buckets on `SubmitJob` and `Register` ([`RateLimits`]), a
//!   caller being its token, or its address without a token file.
//! - `layer`: the tower layer in front of all services that applies the check and the
//!   limits, so a refused call reaches no handler: `UNAUTHENTICATED` without a known token,
//!   `PERMISSION_DENIED` for the wrong role, `RESOURCE_EXHAUSTED` over the rate limit
//!   (HTTP 401 and 403 on the plain-HTTP routes).
//! - `tls`: the server's and the clients' TLS files ([`ServerTls`], [`ClientTls`]) and
//!   what a client presents ([`ClientAuth`]: TLS and a [`BearerToken`]).
//!
//! Invariants: a token's text is never logged or put in an error; every RPC is in the
//! table or under an open prefix, and anything else needs admin; where the coordinator
//! listens beyond loopback, it has TLS and a token file unless the operator said
//! `insecure` (see `bind_and_serve`).

mod layer;
mod limits;
mod policy;
mod tls;
mod tokens;

use std::path::PathBuf;

pub use layer::{Auth, AuthLayer};
pub use limits::{Caller, Limited, MAX_BUCKETS, RateLimit, RateLimiter, RateLimits};
pub use policy::{Access, HTTP_ROUTES, OPEN_SERVICES, RPCS, access, authorize, check, is_http};
pub use tls::{
    AuthChannel, BearerInterceptor, BearerToken, ClientAuth, ClientTls, HANDSHAKE_TIMEOUT, ServerTls,
    coordinator_url,
};
pub use tokens::{MIN_TOKEN_CHARS, Role, TokenStore, TokenTable, first_token};

/// Errors of the authentication settings; each names the file (and line) at fault, never
/// a token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading the {what} {}: {source}", path.display())]
    Read {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    TokenLine { path: PathBuf, line: usize, reason: String },
    #[error("the token file {} has no tokens (lines `ROLE TOKEN`, roles admin, viewer, worker)", path.display())]
    NoTokens { path: PathBuf },
    #[error("the {what} {}: {reason}", path.display())]
    Pem { path: PathBuf, what: &'static str, reason: String },
    #[error("TLS with the certificate {} and the key {}: {reason}", cert.display(), key.display())]
    Tls { cert: PathBuf, key: PathBuf, reason: String },
    #[error("the coordinator URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("the token is empty or has characters other than visible ASCII")]
    BadToken,
}
