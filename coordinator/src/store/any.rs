//! [`AnyStore`]: the store a [`StoreConfig`] names, opened, as one type the coordinator is
//! generic over (the trait is not object-safe). Every call is forwarded unchanged.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;

#[cfg(not(feature = "etcd"))]
use super::StoreError;
#[cfg(feature = "etcd")]
use super::{EtcdStore, EtcdWatch};
use super::{
    FileStore, LeaseId, Result, Revision, StateStore, StoreConfig, Txn, TxnResponse, WatchEvent, WatchStream,
};

/// An opened store of either kind.
#[derive(Clone)]
pub enum AnyStore {
    File(FileStore),
    #[cfg(feature = "etcd")]
    Etcd(EtcdStore),
}

/// The watch stream of an [`AnyStore`].
pub enum AnyWatch {
    File(WatchStream),
    #[cfg(feature = "etcd")]
    Etcd(EtcdWatch),
}

impl AnyStore {
    /// Opens the store the setting names. An etcd setting in a build without the `etcd`
    /// feature is an error saying so.
    pub async fn open(config: &StoreConfig) -> Result<Self> {
        match config {
            StoreConfig::File(dir) => Ok(AnyStore::File(FileStore::open(dir).await?)),
            #[cfg(feature = "etcd")]
            StoreConfig::Etcd(etcd) => Ok(AnyStore::Etcd(EtcdStore::connect(etcd.clone()).await?)),
            #[cfg(not(feature = "etcd"))]
            StoreConfig::Etcd(etcd) => Err(StoreError::Config {
                field: "store".into(),
                reason: format!(
                    "etcd://{} needs a flotilla built with the `etcd` cargo feature \
                     (cargo build --release --features etcd)",
                    etcd.endpoints_text()
                ),
            }),
        }
    }

    /// Closes the store: the file store flushes and ends its task; an etcd client just
    /// drops its connections (everything it wrote is already committed).
    pub async fn close(&self) -> Result<()> {
        match self {
            AnyStore::File(store) => store.close().await,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(_) => Ok(()),
        }
    }
}

impl Stream for AnyWatch {
    type Item = Result<WatchEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            AnyWatch::File(watch) => Pin::new(watch).poll_next(cx),
            #[cfg(feature = "etcd")]
            AnyWatch::Etcd(watch) => Pin::new(watch).poll_next(cx),
        }
    }
}

/// Forwards a call to whichever store this is.
macro_rules! forward {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::File($store) => $call,
            #[cfg(feature = "etcd")]
            AnyStore::Etcd($store) => $call,
        }
    };
}

impl StateStore for AnyStore {
    type Watch = AnyWatch;

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        forward!(self, store => store.txn(txn).await)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        forward!(self, store => store.grant_lease(ttl).await)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        forward!(self, store => store.keep_alive(lease).await)
    }

    async fn revoke(&self, lease: LeaseId) -> Result<Option<Revision>> {
        forward!(self, store => store.revoke(lease).await)
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<AnyWatch> {
        match self {
            AnyStore::File(store) => Ok(AnyWatch::File(store.watch(prefix, from_revision).await?)),
            #[cfg(feature = "etcd")]
            AnyStore::Etcd(store) => Ok(AnyWatch::Etcd(store.watch(prefix, from_revision).await?)),
        }
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        forward!(self, store => store.compact(revision).await)
    }

    async fn current_revision(&self) -> Result<Revision> {
        forward!(self, store => store.current_revision().await)
    }
}
