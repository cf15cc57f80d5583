//! The tower layer in front of every service the coordinator serves: it checks each
//! request's path and bearer token against `policy`, then takes the call from its caller's
//! rate limit (`limits`), before the request reaches a handler, so a refused call changes
//! nothing. It also counts every request and refusal into the metrics. A refused gRPC call
//! gets a gRPC status; a refused plain-HTTP request (`/metrics`) gets HTTP 401 (with
//! `WWW-Authenticate: Bearer`) or 403.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tonic::Status;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::limits::{Caller, Limited, RateLimiter};
use super::policy;
use super::tokens::TokenStore;
use crate::service::metrics::Metrics;

/// Wraps the server's routes. Without a token store every request passes the role check
/// (a coordinator without `--token-file`), and the rate limits count callers by address.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenStore>>,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
}

impl AuthLayer {
    pub fn new(tokens: Option<Arc<TokenStore>>, limiter: Arc<RateLimiter>, metrics: Arc<Metrics>) -> Self {
        AuthLayer { tokens, limiter, metrics }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
            limiter: self.limiter.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// [`AuthLayer`]'s service.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<TokenStore>>,
    limiter: Arc<RateLimiter>,
    metrics: Arc<Metrics>,
}

/// The peer of a request, over plain TCP or TLS.
fn peer<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions.get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr).or_else(|| {
        extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.get_ref().remote_addr())
    })
}

impl<S> Auth<S> {
    /// The role check, then the rate limit; the status of a refusal.
    fn admit<B>(&self, request: &http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path();
        let caller = match &self.tokens {
            Some(tokens) => {
                let authorization = request.headers().get(http::header::AUTHORIZATION).map(|v| v.as_bytes());
                policy::authorize(path, authorization, &tokens.current())?
                    .map(|(role, digest)| Caller::Token { digest, role })
            }
            None => None,
        };
        let Some(limited) = Limited::of(path) else { return Ok(()) };
        let caller = caller.unwrap_or_else(|| Caller::peer(peer(request).map(|addr| addr.ip())));
        self.limiter.admit(limited, caller, tokio::time::Instant::now())
    }
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<Self::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.metrics.request(request.uri().path());
        match self.admit(&request) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(status) => {
                // The peer and the RPC, never the header.
                let peer = peer(&request);
                let rpc = request.uri().path();
                tracing::info!(rpc, ?peer, code = ?status.code(), reason = status.message(), "refused a call");
                self.metrics.refused(rpc, status.code());
                let response = if policy::is_http(rpc) { http_refusal(&status) } else { status.into_http() };
                Either::Left(ready(Ok(response)))
            }
        }
    }
}

/// A refusal of a plain-HTTP request: 401 (with the scheme to use) without a known token,
/// 403 for the wrong role, 429 over a rate limit; the status's message as the body.
fn http_refusal(status: &Status) -> http::Response<tonic::body::Body> {
    let code = match status.code() {
        tonic::Code::Unauthenticated => http::StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => http::StatusCode::FORBIDDEN,
        tonic::Code::ResourceExhausted => http::StatusCode::TOO_MANY_REQUESTS,
        _ => http::StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = axum::body::Body::from(format!("{}\n", status.message()));
    let mut response = http::Response::new(tonic::body::Body::new(body));
    *response.status_mut() = code;
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    if code == http::StatusCode::UNAUTHORIZED {
        headers.insert(http::header::WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    }
    response
}
