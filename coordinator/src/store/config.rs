//! The store setting: which [`StateStore`](super::StateStore) a coordinator runs on, parsed
//! from one string in one place ([`StoreConfig::parse`]).
//!
//! - A path (or `file://PATH`) is the embedded [`FileStore`](super::FileStore) in that
//!   directory.
//! - `etcd://HOST:PORT[,HOST:PORT…][?OPTIONS]` is an etcd cluster. Options, `&`-separated
//!   `name=value`: `prefix` (the key prefix, default [`DEFAULT_ETCD_PREFIX`], so several
//!   clusters can share one etcd), `ca` (a PEM CA file: TLS, verifying the members),
//!   `cert` and `key` (a PEM client certificate and its key, for etcd's client-cert auth;
//!   both or neither, and only with `ca`), `user` and `password-file` (etcd's
//!   user/password auth; the password is read from a file so it never appears on a
//!   command line), `timeout-ms` (per request, default 5000).
//!
//! Invariants: a parsed [`EtcdConfig`] has at least one endpoint, each `host:port` with a
//! port; its prefix is non-empty; a client cert comes with its key; a password comes with
//! a user. Files are only named here; they are read when the store opens, so the errors
//! of reading them name the file.

use std::path::PathBuf;
use std::time::Duration;

/// The key prefix of an etcd store when the URL names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/flotilla/";

/// The default per-request timeout of an etcd store.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which store a coordinator runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreConfig {
    /// The embedded file store in this directory.
    File(PathBuf),
    /// An etcd cluster.
    Etcd(EtcdConfig),
}

/// How to reach an etcd cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `host:port` of each member the client may talk to.
    pub endpoints: Vec<String>,
    /// Every key of this store lives under it (e.g. `/flotilla/`).
    pub prefix: String,
    /// TLS towards the members; `None` is plaintext.
    pub tls: Option<EtcdTls>,
    /// etcd's user/password auth: the user and the file holding the password.
    pub user: Option<(String, PathBuf)>,
    /// The deadline of each request.
    pub timeout: Duration,
}

/// TLS towards etcd: the CA that signed the members' certificates and, for etcd's client
/// certificate auth, a certificate and its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// A store setting that cannot be parsed; `part` is the piece of the URL at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store URL {url:?}: {part}: {reason}")]
pub struct StoreConfigError {
    pub url: String,
    pub part: String,
    pub reason: String,
}

impl EtcdConfig {
    /// A plaintext, unauthenticated etcd at these endpoints, with the default prefix.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            prefix: DEFAULT_ETCD_PREFIX.to_string(),
            tls: None,
            user: None,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The endpoints as one string, for messages.
    pub fn endpoints_text(&self) -> String {
        self.endpoints.join(",")
    }
}

impl std::fmt::Display for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreConfig::File(dir) => write!(f, "file store in {}", dir.display()),
            StoreConfig::Etcd(etcd) => write!(f, "etcd://{} under {:?}", etcd.endpoints_text(), etcd.prefix),
        }
    }
}

impl std::str::FromStr for StoreConfig {
    type Err = StoreConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StoreConfig::parse(s)
    }
}

impl StoreConfig {
    /// Parses a store URL (see the module docs); the error names the part at fault.
    pub fn parse(url: &str) -> Result<Self, StoreConfigError> {
        let bad = |part: &str, reason: String| StoreConfigError {
            url: url.to_string(),
            part: part.to_string(),
            reason,
        };
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(bad("path", "a file store needs a directory".into()));
            }
            return Ok(StoreConfig::File(PathBuf::from(path)));
        }
        let Some(rest) = url.strip_prefix("etcd://") else {
            if url.is_empty() {
                return Err(bad("path", "empty: give a directory or etcd://HOST:PORT".into()));
            }
            if let Some((scheme, _)) = url.split_once("://") {
                return Err(bad(
                    "scheme",
                    format!("{scheme:?} is not a store: use a directory, file://DIR or etcd://HOST:PORT"),
                ));
            }
            return Ok(StoreConfig::File(PathBuf::from(url)));
        };
        let (hosts, query) = rest.split_once('?').unwrap_or((rest, ""));
        let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
        let mut config = EtcdConfig::new(Vec::<String>::new());
        for endpoint in hosts.split(',') {
            let Some((host, port)) = endpoint.rsplit_once(':') else {
                return Err(bad(
                    &format!("endpoint {endpoint:?}"),
                    "expected HOST:PORT (etcd's client port, usually 2379)".into(),
                ));
            };
            if host.is_empty() || host.contains('/') || host.contains('@') {
                return Err(bad(
                    &format!("endpoint {endpoint:?}"),
                    "the host is empty or not a host name".into(),
                ));
            }
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(bad(&format!("endpoint {endpoint:?}"), format!("port {port:?} is not 1-65535")));
            }
            config.endpoints.push(endpoint.to_string());
        }
        let (mut ca, mut cert, mut key, mut user, mut password) = (None, None, None, None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let Some((name, value)) = pair.split_once('=') else {
                return Err(bad(&format!("option {pair:?}"), "expected NAME=VALUE".into()));
            };
            if value.is_empty() {
                return Err(bad(&format!("option {name}"), "empty value".into()));
            }
            let seen = match name {
                "prefix" => {
                    config.prefix = value.to_string();
                    false
                }
                "ca" => ca.replace(PathBuf::from(value)).is_some(),
                "cert" => cert.replace(PathBuf::from(value)).is_some(),
                "key" => key.replace(PathBuf::from(value)).is_some(),
                "user" => user.replace(value.to_string()).is_some(),
                "password-file" => password.replace(PathBuf::from(value)).is_some(),
                "timeout-ms" => {
                    let ms = value
                        .parse::<u64>()
                        .ok()
                        .filter(|ms| (1..=3_600_000).contains(ms))
                        .ok_or_else(|| bad("option timeout-ms", format!("{value:?} is not 1-3600000")))?;
                    config.timeout = Duration::from_millis(ms);
                    false
                }
                other => {
                    return Err(bad(
                        &format!("option {other:?}"),
                        "unknown; known: prefix, ca, cert, key, user, password-file, timeout-ms".into(),
                    ));
                }
            };
            if seen {
                return Err(bad(&format!("option {name}"), "given twice".into()));
            }
        }
        config.tls = match (ca, cert, key) {
            (None, None, None) => None,
            (Some(ca), None, None) => Some(EtcdTls { ca, identity: None }),
            (Some(ca), Some(cert), Some(key)) => Some(EtcdTls { ca, identity: Some((cert, key)) }),
            (None, _, _) => return Err(bad("option cert/key", "a client certificate needs ca= too".into())),
            (Some(_), Some(_), None) => return Err(bad("option cert", "needs key= as well".into())),
            (Some(_), None, Some(_)) => return Err(bad("option key", "needs cert= as well".into())),
        };
        config.user = match (user, password) {
            (None, None) => None,
            (Some(user), Some(password)) => Some((user, password)),
            (Some(_), None) => return Err(bad("option user", "needs password-file= as well".into())),
            (None, Some(_)) => return Err(bad("option password-file", "needs user= as well".into())),
        };
        Ok(StoreConfig::Etcd(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_file_urls_are_file_stores() {
        assert_eq!(StoreConfig::parse("state").unwrap(), StoreConfig::File("state".into()));
        assert_eq!(StoreConfig::parse("file:///var/lib/f").unwrap(), StoreConfig::File("/var/lib/f".into()));
    }

    #[test]
    fn etcd_urls_with_options() {
        let StoreConfig::Etcd(c) = StoreConfig::parse(
            "etcd://a:2379,b:2380/?prefix=/c1/&ca=ca.pem&cert=c.pem&key=k.pem&user=u&password-file=p",
        )
        .unwrap() else {
            panic!("not etcd")
        };
        assert_eq!(c.endpoints, ["a:2379", "b:2380"]);
        assert_eq!(c.prefix, "/c1/");
        assert_eq!(
            c.tls,
            Some(EtcdTls { ca: "ca.pem".into(), identity: Some(("c.pem".into(), "k.pem".into())) })
        );
        assert_eq!(c.user, Some(("u".into(), "p".into())));
        let StoreConfig::Etcd(c) = StoreConfig::parse("etcd://127.0.0.1:2379").unwrap() else { panic!() };
        assert_eq!((c.prefix.as_str(), c.tls, c.user), (DEFAULT_ETCD_PREFIX, None, None));
    }

    #[test]
    fn errors_name_the_part() {
        let part = |url: &str| StoreConfig::parse(url).unwrap_err().part;
        assert_eq!(part("etcd://a:2379,b"), "endpoint \"b\"");
        assert_eq!(part("etcd://a:0"), "endpoint \"a:0\"");
        assert_eq!(part("etcd://a:1?colour=red"), "option \"colour\"");
        assert_eq!(part("etcd://a:1?cert=c&key=k"), "option cert/key");
        assert_eq!(part("etcd://a:1?ca=c&cert=c"), "option cert");
        assert_eq!(part("etcd://a:1?user=u"), "option user");
        assert_eq!(part("etcd://a:1?prefix="), "option prefix");
        assert_eq!(part("etcd://a:1?timeout-ms=0"), "option timeout-ms");
        assert_eq!(part("s3://bucket"), "scheme");
        assert_eq!(part(""), "path");
        let message = StoreConfig::parse("etcd://a:1?ca=x&ca=y").unwrap_err().to_string();
        assert!(message.contains("option ca") && message.contains("twice"), "{message}");
    }
}
