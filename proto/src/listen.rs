//! The listening rule, the one home of it: the coordinator's gRPC port and a worker's
//! data-plane port both ask [`check_listen`] before they serve.
//!
//! A port on a loopback address is reachable only from this machine; beyond loopback it
//! must have what protects it (the coordinator: TLS and a token file; a worker's data
//! plane: a confidential control connection, since the secret that authenticates data-plane
//! connections arrives over it), unless the operator accepted an unprotected port with
//! `--insecure`, which is then warned about at every start, loopback or not.

use std::net::SocketAddr;

/// Whether `addr` is a loopback address (IPv4-mapped IPv6 loopback included).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// What [`check_listen`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Serve: the port has every protection it needs, or is on loopback.
    Allowed,
    /// Serve, lacking `missing`, because the operator said `insecure`: the caller warns.
    Insecure { missing: &'static str },
    /// Do not serve: a non-loopback address lacking `missing`, without `insecure`.
    Refused { missing: &'static str },
}

/// The rule for a port about to serve on `addr` (the bound address: a host name has been
/// resolved, port 0 chosen). `missing` names the protection the port lacks, `None` when it
/// has all it needs.
pub fn check_listen(addr: SocketAddr, missing: Option<&'static str>, insecure: bool) -> Listen {
    match missing {
        None => Listen::Allowed,
        Some(missing) if insecure => Listen::Insecure { missing },
        Some(_) if is_loopback(&addr) => Listen::Allowed,
        Some(missing) => Listen::Refused { missing },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn loopback_needs_nothing_and_the_rest_needs_protection_or_insecure() {
        let lacking = Some("no TLS");
        assert_eq!(check_listen(addr("127.0.0.1:1"), lacking, false), Listen::Allowed);
        assert_eq!(check_listen(addr("[::1]:1"), lacking, false), Listen::Allowed);
        assert_eq!(check_listen(addr("[::ffff:127.0.0.1]:1"), lacking, false), Listen::Allowed);
        assert_eq!(check_listen(addr("0.0.0.0:0"), lacking, false), Listen::Refused { missing: "no TLS" });
        assert_eq!(check_listen(addr("[::]:0"), lacking, false), Listen::Refused { missing: "no TLS" });
        assert_eq!(check_listen(addr("0.0.0.0:0"), lacking, true), Listen::Insecure { missing: "no TLS" });
        assert_eq!(check_listen(addr("127.0.0.1:1"), lacking, true), Listen::Insecure { missing: "no TLS" });
        assert_eq!(check_listen(addr("10.0.0.1:1"), None, false), Listen::Allowed);
    }
}
