//! [`EtcdStore`]: the [`StateStore`] on a real etcd v3 cluster, through the `etcd-client`
//! crate (cargo feature `etcd`). The coordinator's state then survives the loss of its
//! node and of a minority of etcd members.
//!
//! How the trait maps onto etcd:
//!
//! - Keys live under the configured prefix (default `/flotilla/`), added on the way in and
//!   stripped on the way out, so several clusters can share one etcd.
//! - Revisions are etcd's own (`mod_revision`, `create_revision`, header revisions): they
//!   increase strictly but are cluster-wide, so another prefix's writes leave gaps here,
//!   and the first write of a fresh etcd is revision 2.
//! - A [`Txn`] is one etcd txn: compares and both branches translate one to one; puts ask
//!   for the previous key. Validation (empty keys, a key written twice) is the same
//!   function the file store runs; the size limit is [`ETCD_MAX_TXN_BYTES`] for the whole
//!   request, under etcd's default `--max-request-bytes` of 1.5 MiB. Larger values are
//!   refused with [`StoreError::TooLarge`] naming the key, never chunked (a chunked value
//!   could not be compared or watched as one).
//! - Leases are etcd leases. etcd counts TTLs in whole seconds and raises them to its
//!   minimum (1.5 × the election timeout, 2 s with the defaults); grants round up.
//! - The trait's `compact(r)` keeps revision `r`: it is etcd's compaction at `r - 1`, and
//!   a watch from `from` starts etcd's watch at `from - 1` and drops events below `from`,
//!   so etcd refuses exactly the watches the trait calls compacted. etcd compacts the
//!   whole keyspace, not only this prefix.
//! - A watch reconnects by itself when its stream breaks (a member died): it reopens from
//!   the revision after the last response it delivered, through any live member, so no
//!   event is skipped or repeated. It ends with [`StoreError::Unavailable`] when no member
//!   answers for `reconnect_window`, and with [`StoreError::Compacted`] when the revision
//!   it needs is gone.
//! - Reads (transactions without writes, the current revision) and keep-alives are retried
//!   while the store is unavailable, within the request timeout; writes are not, since one
//!   that failed may have been committed: the caller sees [`StoreError::Unavailable`].
//!
//! Invariant: every key handed to etcd starts with the prefix, and every key handed back
//! had it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_client as ec;
use futures::Stream;
use tokio::time::Instant;

use super::{
    CompareOp, CompareTarget, EtcdConfig, EventKind, KeyValue, LeaseId, Op, OpResponse, Result, Revision,
    StateStore, StoreError, Txn, TxnResponse, WatchEvent, branch_bytes, largest_put, validate_ttl,
    validate_txn,
};

/// The largest request payload (prefixed keys and values of both branches, compared
/// values) one transaction may carry: etcd's default `--max-request-bytes` (1.5 MiB) less
/// 64 KiB for the protobuf framing and the operations' own fields.
pub const ETCD_MAX_TXN_BYTES: usize = 1536 * 1024 - 64 * 1024;

/// The largest response decoded (a range over many job records can pass tonic's 4 MiB
/// default).
const MAX_DECODE_BYTES: usize = 256 << 20;

/// How long a broken watch keeps trying to reopen, in request timeouts.
const RECONNECT_TIMEOUTS: u32 = 3;

/// A store on an etcd cluster; cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: ec::Client,
    prefix: String,
    endpoints: String,
    timeout: Duration,
}

/// The watch stream of an [`EtcdStore`].
pub struct EtcdWatch(Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>);

impl Stream for EtcdWatch {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.as_mut().poll_next(cx)
    }
}

/// The gRPC status inside a client error, if it is one.
fn status(error: &ec::Error) -> Option<&tonic::Status> {
    match error {
        ec::Error::GRpcStatus(status) => Some(status),
        _ => None,
    }
}

fn message_has(error: &ec::Error, needle: &str) -> bool {
    status(error).is_some_and(|s| s.message().contains(needle))
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// etcd's revisions and versions are non-negative; a negative one would be a server bug,
/// read as 0.
fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn lease_of(id: i64) -> Option<LeaseId> {
    (id != 0).then_some(LeaseId(id as u64))
}

fn header_revision(header: Option<&ec::ResponseHeader>) -> Revision {
    header.map_or(0, |h| to_u64(h.revision()))
}

impl EtcdStore {
    /// Connects to the cluster: reads the TLS and password files (errors name them), then
    /// checks that a member answers, so a wrong address fails here, naming the endpoints.
    pub async fn connect(config: EtcdConfig) -> Result<Self> {
        let endpoints_text = config.endpoints_text();
        if config.endpoints.is_empty() {
            return Err(StoreError::Config { field: "endpoints".into(), reason: "none given".into() });
        }
        if config.prefix.is_empty() {
            return Err(StoreError::Config { field: "prefix".into(), reason: "must not be empty".into() });
        }
        let read = |field: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| StoreError::Config {
                field: field.into(),
                reason: format!("reading {}: {e}", path.display()),
            })
        };
        let mut options = ec::ConnectOptions::new()
            .with_timeout(config.timeout)
            .with_connect_timeout(config.timeout)
            // Finds a member that died without closing its socket.
            .with_keep_alive(Duration::from_secs(2), config.timeout)
            // A member cut off from the quorum refuses instead of serving stale reads and
            // holding watches that can no longer see writes.
            .with_require_leader(true);
        let scheme = if config.tls.is_some() { "https" } else { "http" };
        if let Some(tls) = &config.tls {
            let mut tls_options =
                ec::TlsOptions::new().ca_certificate(ec::Certificate::from_pem(read("ca", &tls.ca)?));
            if let Some((cert, key)) = &tls.identity {
                tls_options =
                    tls_options.identity(ec::Identity::from_pem(read("cert", cert)?, read("key", key)?));
            }
            options = options.with_tls(tls_options);
        }
        if let Some((user, password_file)) = &config.user {
            let password =
                String::from_utf8(read("password-file", password_file)?).map_err(|_| StoreError::Config {
                    field: "password-file".into(),
                    reason: format!("{} is not UTF-8", password_file.display()),
                })?;
            options = options.with_user(user.clone(), password.trim_end_matches(['\r', '\n']).to_string());
        }
        let urls: Vec<String> = config.endpoints.iter().map(|e| format!("{scheme}://{e}")).collect();
        let client =
            ec::Client::connect(&urls, Some(options)).await.map_err(|e| map_error(&endpoints_text, e))?;
        let store = EtcdStore {
            inner: Arc::new(Inner {
                client,
                prefix: config.prefix,
                endpoints: endpoints_text,
                timeout: config.timeout,
            }),
        };
        store.current_revision().await?;
        Ok(store)
    }

    /// The key prefix every key of this store lives under.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The endpoints, as configured.
    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    /// The trait's compaction point: the earliest revision a watch may start from (0 when
    /// etcd was never compacted past its empty first revision).
    pub async fn compacted_revision(&self) -> Result<Revision> {
        // A read at revision 1 fails exactly when etcd compacted past it; then a watch
        // from 1 is cancelled with the compaction revision.
        let probe = ec::GetOptions::new().with_revision(1).with_count_only();
        match self.kv().get(self.full(""), Some(probe)).await {
            Ok(_) => Ok(0),
            Err(e) if message_has(&e, "compacted") => self.compaction_from_watch().await,
            Err(e) => Err(self.error(e)),
        }
    }

    /// Opens a watch from revision 1 and reads etcd's compaction notice off it.
    async fn compaction_from_watch(&self) -> Result<Revision> {
        let options = ec::WatchOptions::new().with_start_revision(1);
        let mut stream = self
            .watch_client()
            .watch(self.full("\0probe"), Some(options))
            .await
            .map_err(|e| self.error(e))?;
        let deadline = Instant::now() + self.inner.timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, stream.message()).await.map_err(|_| {
                self.unavailable("no compaction notice from etcd within the request timeout".into())
            })?;
            match message.map_err(|e| self.error(e))? {
                Some(resp) if resp.compact_revision() > 0 => return Ok(to_u64(resp.compact_revision()) + 1),
                Some(resp) if resp.canceled() => {
                    return Err(self.remote(format!("watch cancelled: {}", resp.cancel_reason())));
                }
                Some(_) => {}
                None => return Err(self.unavailable("the watch stream ended".into())),
            }
        }
    }

    fn kv(&self) -> ec::KvClient {
        self.inner.client.kv_client().max_decoding_message_size(MAX_DECODE_BYTES)
    }

    fn watch_client(&self) -> ec::WatchClient {
        self.inner.client.watch_client().max_decoding_message_size(MAX_DECODE_BYTES)
    }

    fn full(&self, key: &str) -> Vec<u8> {
        let mut full = Vec::with_capacity(self.inner.prefix.len() + key.len());
        full.extend_from_slice(self.inner.prefix.as_bytes());
        full.extend_from_slice(key.as_bytes());
        full
    }

    fn unavailable(&self, reason: String) -> StoreError {
        StoreError::Unavailable { endpoint: self.inner.endpoints.clone(), reason }
    }

    fn remote(&self, reason: String) -> StoreError {
        StoreError::Remote { endpoint: self.inner.endpoints.clone(), reason }
    }

    fn error(&self, error: ec::Error) -> StoreError {
        map_error(&self.inner.endpoints, error)
    }

    /// A key from etcd, with the prefix taken off.
    fn key_value(&self, kv: &ec::KeyValue) -> Result<KeyValue> {
        let key = kv.key().strip_prefix(self.inner.prefix.as_bytes()).ok_or_else(|| {
            self.remote(format!("etcd returned a key outside the prefix {:?}", self.inner.prefix))
        })?;
        let key = String::from_utf8(key.to_vec()).map_err(|_| {
            self.remote(format!("key {:?} under the prefix is not UTF-8", String::from_utf8_lossy(key)))
        })?;
        Ok(KeyValue {
            key,
            value: kv.value().to_vec(),
            create_revision: to_u64(kv.create_revision()),
            mod_revision: to_u64(kv.mod_revision()),
            version: to_u64(kv.version()),
            lease: lease_of(kv.lease()),
        })
    }

    fn ops(&self, ops: &[Op]) -> Vec<ec::TxnOp> {
        ops.iter()
            .map(|op| match op {
                Op::Get { key } => ec::TxnOp::get(self.full(key), None),
                Op::Range { prefix } => {
                    ec::TxnOp::get(self.full(prefix), Some(ec::GetOptions::new().with_prefix()))
                }
                Op::Put { key, value, lease } => {
                    let mut options = ec::PutOptions::new().with_prev_key();
                    if let Some(lease) = lease {
                        options = options.with_lease(lease.0 as i64);
                    }
                    ec::TxnOp::put(self.full(key), value.clone(), Some(options))
                }
                Op::Delete { key } => ec::TxnOp::delete(self.full(key), None),
                Op::DeletePrefix { prefix } => {
                    ec::TxnOp::delete(self.full(prefix), Some(ec::DeleteOptions::new().with_prefix()))
                }
            })
            .collect()
    }

    fn etcd_txn(&self, txn: &Txn) -> ec::Txn {
        let compares: Vec<ec::Compare> = txn
            .compares
            .iter()
            .map(|c| {
                let op = match c.op {
                    CompareOp::Equal => ec::CompareOp::Equal,
                    CompareOp::NotEqual => ec::CompareOp::NotEqual,
                    CompareOp::Greater => ec::CompareOp::Greater,
                    CompareOp::Less => ec::CompareOp::Less,
                };
                let key = self.full(&c.key);
                match &c.target {
                    CompareTarget::ModRevision(r) => ec::Compare::mod_revision(key, op, to_i64(*r)),
                    CompareTarget::CreateRevision(r) => ec::Compare::create_revision(key, op, to_i64(*r)),
                    CompareTarget::Version(v) => ec::Compare::version(key, op, to_i64(*v)),
                    CompareTarget::Value(v) => ec::Compare::value(key, op, v.clone()),
                }
            })
            .collect();
        ec::Txn::new().when(compares).and_then(self.ops(&txn.success)).or_else(self.ops(&txn.failure))
    }

    /// The request bytes a transaction carries, as counted against [`ETCD_MAX_TXN_BYTES`].
    fn request_bytes(&self, txn: &Txn) -> usize {
        let prefix = self.inner.prefix.len();
        let ops = txn.success.iter().chain(&txn.failure).map(|op| match op {
            Op::Get { key } | Op::Delete { key } => prefix + key.len(),
            Op::Range { prefix: p } | Op::DeletePrefix { prefix: p } => prefix + p.len(),
            Op::Put { .. } => prefix,
        });
        let compares = txn.compares.iter().map(|c| {
            prefix
                + c.key.len()
                + match &c.target {
                    CompareTarget::Value(v) => v.len(),
                    _ => 0,
                }
        });
        ops.chain(compares).fold(
            branch_bytes(&txn.success).saturating_add(branch_bytes(&txn.failure)),
            usize::saturating_add,
        )
    }

    /// Runs `call` until it succeeds, fails for a reason other than unavailability, or the
    /// request timeout has passed since the first try: for requests that are safe to repeat.
    async fn retrying<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = Instant::now() + self.inner.timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            match call().await {
                Err(e) if e.is_retryable() && Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    /// The first lease a transaction attaches a key to: the one a "lease not found" names.
    fn txn_lease(txn: &Txn) -> LeaseId {
        txn.success
            .iter()
            .chain(&txn.failure)
            .find_map(|op| match op {
                Op::Put { lease: Some(lease), .. } => Some(*lease),
                _ => None,
            })
            .unwrap_or(LeaseId(0))
    }

    /// Opens etcd's watch for the trait's `watch(prefix, from)`: etcd's start revision is
    /// `from - 1` (see the module docs).
    async fn open_watch(&self, prefix: &str, from: Revision) -> Result<ec::WatchStream> {
        let start = to_i64(from.saturating_sub(1).max(1));
        let options = ec::WatchOptions::new().with_prefix().with_start_revision(start);
        self.watch_client().watch(self.full(prefix), Some(options)).await.map_err(|e| self.error(e))
    }
}

/// Classifies a client error: unreachable (retryable) or failed.
fn map_error(endpoints: &str, error: ec::Error) -> StoreError {
    let unavailable = |reason: String| StoreError::Unavailable { endpoint: endpoints.to_string(), reason };
    match &error {
        ec::Error::TransportError(_) | ec::Error::IoError(_) => unavailable(error_chain(&error)),
        ec::Error::GRpcStatus(s) => match s.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                unavailable(format!("{}: {}", s.code(), s.message()))
            }
            // tonic reports a refused or reset connection as Unknown with a transport source.
            tonic::Code::Unknown if s.message().contains("transport") || s.message().contains("connect") => {
                unavailable(s.message().to_string())
            }
            _ => StoreError::Remote {
                endpoint: endpoints.to_string(),
                reason: format!("{}: {}", s.code(), s.message()),
            },
        },
        ec::Error::WatchError(_) | ec::Error::LeaseKeepAliveError(_) => unavailable(error.to_string()),
        _ => StoreError::Remote { endpoint: endpoints.to_string(), reason: error_chain(&error) },
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Where a watch stands: the revision it delivers next, and the stream it reads.
struct WatchState {
    store: EtcdStore,
    prefix: String,
    /// Every event below it was delivered; events below it that etcd repeats are dropped.
    next: Revision,
    stream: Option<ec::WatchStream>,
    pending: VecDeque<WatchEvent>,
    /// Since when no member has answered (a reopen pending); `None` while healthy.
    broken_since: Option<Instant>,
    done: bool,
}

impl WatchState {
    /// Reads one etcd response into `pending` (reopening the stream if needed); an error
    /// ends the watch.
    async fn fill(&mut self) -> Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return self.reopen().await;
        };
        match stream.message().await {
            Ok(Some(resp)) => {
                if resp.compact_revision() > 0 {
                    return Err(StoreError::Compacted {
                        requested: self.next,
                        compacted: to_u64(resp.compact_revision()) + 1,
                    });
                }
                if resp.canceled() {
                    // Cancelled without compaction: the member lost its leader, or shut
                    // down. Reopen elsewhere.
                    tracing::debug!(reason = resp.cancel_reason(), "etcd cancelled a watch; reopening");
                    self.stream = None;
                    return Ok(());
                }
                self.broken_since = None;
                let mut last = None;
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let mut kv = self.store.key_value(kv)?;
                    let revision = kv.mod_revision;
                    if revision < self.next {
                        continue;
                    }
                    let kind = match event.event_type() {
                        ec::EventType::Put => EventKind::Put,
                        ec::EventType::Delete => {
                            // etcd's tombstone already has zero create revision and version.
                            kv.value.clear();
                            EventKind::Delete
                        }
                    };
                    last = Some(revision);
                    self.pending.push_back(WatchEvent { revision, kind, kv });
                }
                // etcd sends all events of one revision in one response (we never ask for
                // fragments), so the next revision is safe to resume from.
                if let Some(last) = last {
                    self.next = last + 1;
                }
                Ok(())
            }
            Ok(None) | Err(_) => {
                self.stream = None;
                Ok(())
            }
        }
    }

    async fn reopen(&mut self) -> Result<()> {
        let since = *self.broken_since.get_or_insert_with(Instant::now);
        let window = self.store.inner.timeout * RECONNECT_TIMEOUTS;
        match self.store.open_watch(&self.prefix, self.next).await {
            Ok(stream) => {
                self.stream = Some(stream);
                Ok(())
            }
            Err(e) if e.is_retryable() && since.elapsed() < window => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

impl StateStore for EtcdStore {
    type Watch = EtcdWatch;

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        validate_txn(&txn, ETCD_MAX_TXN_BYTES)?;
        let bytes = self.request_bytes(&txn);
        if bytes > ETCD_MAX_TXN_BYTES {
            let key = largest_put(txn.success.iter().chain(&txn.failure));
            return Err(StoreError::TooLarge { key, bytes, limit: ETCD_MAX_TXN_BYTES });
        }
        let writes = txn
            .success
            .iter()
            .chain(&txn.failure)
            .any(|op| matches!(op, Op::Put { .. } | Op::Delete { .. } | Op::DeletePrefix { .. }));
        let request = &self.etcd_txn(&txn);
        let txn = &txn;
        let call =
            || async move { self.kv().txn(request.clone()).await.map_err(|e| self.txn_error(txn, bytes, e)) };
        // A read-only transaction is safe to repeat; a write that failed may have been
        // committed, so its caller decides.
        let response = if writes { call().await? } else { self.retrying(call).await? };
        self.txn_response(txn, response)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        validate_ttl(ttl)?;
        // etcd counts whole seconds: round up, so a lease never ends before its TTL.
        let seconds = to_i64(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
        let response =
            self.inner.client.lease_client().grant(seconds, None).await.map_err(|e| self.error(e))?;
        if !response.error().is_empty() {
            return Err(self.remote(format!("granting a lease: {}", response.error())));
        }
        Ok(LeaseId(response.id() as u64))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let id = lease.0 as i64;
        self.retrying(|| async move {
            let mut client = self.inner.client.lease_client();
            // The crate sends the first keep-alive itself and fails when the lease is gone;
            // a second one tells the TTL.
            let (mut keeper, mut stream) = client.keep_alive(id).await.map_err(|e| match &e {
                ec::Error::LeaseKeepAliveError(m) if m.contains("not found") => {
                    StoreError::LeaseNotFound { lease }
                }
                _ => self.error(e),
            })?;
            keeper.keep_alive().await.map_err(|e| self.error(e))?;
            match stream.message().await.map_err(|e| self.error(e))? {
                Some(resp) if resp.ttl() > 0 => Ok(Duration::from_secs(to_u64(resp.ttl()))),
                Some(_) => Err(StoreError::LeaseNotFound { lease }),
                None => Err(self.unavailable("the keep-alive stream ended".into())),
            }
        })
        .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<Option<Revision>> {
        let id = lease.0 as i64;
        let mut client = self.inner.client.lease_client();
        let ttl = match client.time_to_live(id, Some(ec::LeaseTimeToLiveOptions::new().with_keys())).await {
            Ok(ttl) => ttl,
            Err(e) if message_has(&e, "lease not found") => return Err(StoreError::LeaseNotFound { lease }),
            Err(e) => return Err(self.error(e)),
        };
        if ttl.ttl() < 0 {
            return Err(StoreError::LeaseNotFound { lease });
        }
        let had_keys = !ttl.keys().is_empty();
        match client.revoke(id).await {
            Ok(response) => Ok(had_keys.then(|| header_revision(response.header()))),
            Err(e) if message_has(&e, "lease not found") => Err(StoreError::LeaseNotFound { lease }),
            Err(e) => Err(self.error(e)),
        }
    }

    async fn watch(&self, prefix: &str, from_revision: Revision) -> Result<EtcdWatch> {
        let stream = self.open_watch(prefix, from_revision).await?;
        // etcd reports a compacted start revision only later, on the stream: a read at the
        // same revision tells now.
        let start = to_i64(from_revision.saturating_sub(1).max(1));
        let probe = ec::GetOptions::new().with_revision(start).with_count_only();
        match self.kv().get(self.full(prefix), Some(probe)).await {
            Ok(_) => {}
            Err(e) if message_has(&e, "compacted") => {
                let compacted = self.compaction_from_watch().await?;
                return Err(StoreError::Compacted { requested: from_revision, compacted });
            }
            // A future revision: the watch waits for it.
            Err(e) if message_has(&e, "future revision") => {}
            Err(e) => return Err(self.error(e)),
        }
        let state = WatchState {
            store: self.clone(),
            prefix: prefix.to_string(),
            next: from_revision,
            stream: Some(stream),
            pending: VecDeque::new(),
            broken_since: None,
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut state| async move {
            loop {
                if let Some(event) = state.pending.pop_front() {
                    return Some((Ok(event), state));
                }
                if state.done {
                    return None;
                }
                if let Err(e) = state.fill().await {
                    state.done = true;
                    state.stream = None;
                    return Some((Err(e), state));
                }
            }
        });
        Ok(EtcdWatch(Box::pin(stream)))
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let current = self.current_revision().await?;
        if revision > current {
            return Err(StoreError::FutureRevision { requested: revision, current });
        }
        if revision == 0 {
            return Err(StoreError::Compacted { requested: 0, compacted: self.compacted_revision().await? });
        }
        let options = ec::CompactionOptions::new().with_physical();
        match self.kv().compact(to_i64(revision - 1), Some(options)).await {
            Ok(_) => Ok(()),
            Err(e) if message_has(&e, "compacted") => Err(StoreError::Compacted {
                requested: revision,
                compacted: self.compacted_revision().await?,
            }),
            Err(e) if message_has(&e, "future revision") => {
                Err(StoreError::FutureRevision { requested: revision, current })
            }
            Err(e) => Err(self.error(e)),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.retrying(|| async move {
            let options = ec::GetOptions::new().with_count_only();
            let response = self.kv().get(self.full(""), Some(options)).await.map_err(|e| self.error(e))?;
            Ok(header_revision(response.header()))
        })
        .await
    }
}

impl EtcdStore {
    /// Maps a failed txn to the trait's error, naming the lease or size at fault.
    fn txn_error(&self, txn: &Txn, bytes: usize, error: ec::Error) -> StoreError {
        if message_has(&error, "lease not found") {
            StoreError::LeaseNotFound { lease: Self::txn_lease(txn) }
        } else if message_has(&error, "request is too large") {
            let key = largest_put(txn.success.iter().chain(&txn.failure));
            StoreError::TooLarge { key, bytes, limit: ETCD_MAX_TXN_BYTES }
        } else {
            self.error(error)
        }
    }

    /// Translates etcd's txn response into the trait's, op by op.
    fn txn_response(&self, txn: &Txn, response: ec::TxnResponse) -> Result<TxnResponse> {
        let succeeded = response.succeeded();
        let ops = if succeeded { &txn.success } else { &txn.failure };
        let revision = header_revision(response.header());
        let etcd = response.op_responses();
        if etcd.len() != ops.len() {
            return Err(StoreError::UnexpectedResponse { op: "txn" });
        }
        let mut responses = Vec::with_capacity(ops.len());
        for (op, resp) in ops.iter().zip(etcd) {
            responses.push(match (op, resp) {
                (Op::Get { .. }, ec::TxnOpResponse::Get(get)) => {
                    OpResponse::Get(get.kvs().first().map(|kv| self.key_value(kv)).transpose()?)
                }
                (Op::Range { .. }, ec::TxnOpResponse::Get(get)) => {
                    OpResponse::Range(get.kvs().iter().map(|kv| self.key_value(kv)).collect::<Result<_>>()?)
                }
                (Op::Put { .. }, ec::TxnOpResponse::Put(put)) => {
                    OpResponse::Put { prev: put.prev_key().map(|kv| self.key_value(kv)).transpose()? }
                }
                (Op::Delete { .. } | Op::DeletePrefix { .. }, ec::TxnOpResponse::Delete(delete)) => {
                    OpResponse::Delete { deleted: to_u64(delete.deleted()) }
                }
                _ => return Err(StoreError::UnexpectedResponse { op: "txn" }),
            });
        }
        Ok(TxnResponse { succeeded, revision, responses })
    }
}
