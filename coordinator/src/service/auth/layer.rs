//! The tower layer in front of every service the coordinator serves: it checks each
//! request's path and bearer token against `policy` before the request reaches a handler,
//! so a refused call changes nothing.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::{Either, Ready, ready};
use tower::{Layer, Service};

use super::policy;
use super::tokens::TokenStore;

/// Wraps the server's routes; without a token store every request passes (a coordinator
/// without `--token-file`).
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Option<Arc<TokenStore>>,
}

impl AuthLayer {
    pub fn new(tokens: Option<Arc<TokenStore>>) -> Self {
        AuthLayer { tokens }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Auth<S> {
        Auth { inner, tokens: self.tokens.clone() }
    }
}

/// [`AuthLayer`]'s service.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Arc<TokenStore>>,
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
        let Some(tokens) = &self.tokens else { return Either::Right(self.inner.call(request)) };
        let path = request.uri().path();
        let authorization = request.headers().get(http::header::AUTHORIZATION).map(|value| value.as_bytes());
        match policy::check(path, authorization, &tokens.current()) {
            Ok(_) => Either::Right(self.inner.call(request)),
            Err(status) => {
                // The peer and the RPC, never the header.
                let peer = request
                    .extensions()
                    .get::<tonic::transport::server::TcpConnectInfo>()
                    .and_then(|info| info.remote_addr())
                    .or_else(|| {
                        request
                                .extensions()
                                .get::<tonic::transport::server::TlsConnectInfo<
                                    tonic::transport::server::TcpConnectInfo,
                                >>()
                                .and_then(|info| info.get_ref().remote_addr())
                    });
                tracing::info!(rpc = path, ?peer, code = ?status.code(), reason = status.message(), "refused a call");
                Either::Left(ready(Ok(status.into_http())))
            }
        }
    }
}
