//! Per-caller rate limits on the RPCs that create state: `SubmitJob` (a job each) and
//! `Register` (a worker each).
//!
//! Each caller has a token bucket per limited RPC: up to `burst` calls at once, refilled at
//! `rate` calls per second. A caller is its bearer token (by digest, so every holder of one
//! token shares its bucket), or, on a coordinator without a token file, its peer's address
//! (an IPv4 address, or an IPv6 address's /64 network, which one host can fill with
//! addresses). A call over the limit is refused with `RESOURCE_EXHAUSTED` saying when to
//! retry, before it reaches a handler, so it changes nothing.
//!
//! Invariants: the time is an argument ([`RateLimiter::admit`] takes `now`; the layer
//! passes tokio's clock, so paused-time tests and simulations control it); the table of
//! buckets stays bounded: a bucket that has refilled is the same as none and is forgotten
//! once the table holds [`MAX_BUCKETS`]. The lock on the table is held for one lookup and
//! never across an await.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::tokens::Role;

/// Buckets kept before the full ones are forgotten.
pub const MAX_BUCKETS: usize = 4096;

/// One token bucket's settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Calls per second, refilled continuously.
    pub rate: f64,
    /// The most calls at once (the bucket's size).
    pub burst: u32,
}

impl RateLimit {
    /// Checks the settings; the error says what is wrong (the caller names the field).
    pub fn validate(&self) -> Result<(), String> {
        if !(self.rate.is_finite() && self.rate > 0.0) {
            return Err(format!("the rate must be a positive number of calls per second, got {}", self.rate));
        }
        if self.burst == 0 {
            return Err("the burst must be at least 1".into());
        }
        Ok(())
    }
}

/// The limits of the limited RPCs; `None` leaves one unlimited.
#[derive(Clone, Debug, PartialEq)]
pub struct RateLimits {
    pub submit: Option<RateLimit>,
    pub register: Option<RateLimit>,
}

impl Default for RateLimits {
    /// Far above what a person or a cluster's start does (a whole cluster shares one worker
    /// token and registers at once), low enough that a flood cannot fill the store.
    fn default() -> Self {
        RateLimits {
            submit: Some(RateLimit { rate: 10.0, burst: 100 }),
            register: Some(RateLimit { rate: 1000.0, burst: 10_000 }),
        }
    }
}

impl RateLimits {
    /// Checks both limits; the error names the setting (`rate_limits.submit`).
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (name, limit) in [("submit", &self.submit), ("register", &self.register)] {
            if let Some(limit) = limit {
                limit.validate().map_err(|reason| (format!("rate_limits.{name}"), reason))?;
            }
        }
        Ok(())
    }
}

/// A rate-limited RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limited {
    Submit,
    Register,
}

impl Limited {
    /// The limited RPC at `path`, if it is one.
    pub fn of(path: &str) -> Option<Limited> {
        match path {
            "/flotilla.v1.JobService/SubmitJob" => Some(Limited::Submit),
            "/flotilla.v1.CoordinatorService/Register" => Some(Limited::Register),
            _ => None,
        }
    }

    fn rpc(self) -> &'static str {
        match self {
            Limited::Submit => "SubmitJob",
            Limited::Register => "Register",
        }
    }
}

/// Who a bucket belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Caller {
    /// A bearer token, by its digest, with its role (for messages: never the token).
    Token { digest: [u8; 32], role: Role },
    /// A peer without a token: its IPv4 address or IPv6 /64 network (`None`: a transport
    /// that does not say).
    Peer(Option<IpAddr>),
}

impl Caller {
    /// The caller for a peer address: IPv6 addresses by their /64 network.
    pub fn peer(ip: Option<IpAddr>) -> Caller {
        Caller::Peer(ip.map(|ip| match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let network = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(network))
            }
            v4 => v4,
        }))
    }

    fn describe(&self) -> String {
        match self {
            Caller::Token { role, .. } => format!("this {role} token"),
            Caller::Peer(Some(IpAddr::V6(network))) => format!("peer network {network}/64"),
            Caller::Peer(Some(ip)) => format!("peer {ip}"),
            Caller::Peer(None) => "callers of unknown address".into(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Calls left at `at` (fractional while refilling).
    calls: f64,
    at: Instant,
}

impl Bucket {
    /// The calls left at `now`, refilled since `at` up to the burst.
    fn level(&self, limit: &RateLimit, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        (self.calls + elapsed * limit.rate).min(f64::from(limit.burst))
    }
}

/// The buckets of every caller; shared by every connection's copy of the layer.
#[derive(Debug)]
pub struct RateLimiter {
    limits: RateLimits,
    buckets: Mutex<HashMap<(Limited, Caller), Bucket>>,
}

impl RateLimiter {
    pub fn new(limits: RateLimits) -> RateLimiter {
        RateLimiter { limits, buckets: Mutex::new(HashMap::new()) }
    }

    fn limit(&self, rpc: Limited) -> Option<&RateLimit> {
        match rpc {
            Limited::Submit => self.limits.submit.as_ref(),
            Limited::Register => self.limits.register.as_ref(),
        }
    }

    /// Takes one call of `rpc` from `caller`'s bucket at `now`, or refuses it with
    /// `RESOURCE_EXHAUSTED` saying the limit and when the next call would pass.
    pub fn admit(&self, rpc: Limited, caller: Caller, now: Instant) -> Result<(), Status> {
        let Some(limit) = self.limit(rpc) else { return Ok(()) };
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&(rpc, caller)) {
            buckets.retain(|(rpc, _), bucket| {
                self.limit(*rpc).is_some_and(|limit| bucket.level(limit, now) < f64::from(limit.burst))
            });
        }
        let full = Bucket { calls: f64::from(limit.burst), at: now };
        let bucket = buckets.entry((rpc, caller)).or_insert(full);
        let level = bucket.level(limit, now);
        if level >= 1.0 {
            *bucket = Bucket { calls: level - 1.0, at: now };
            return Ok(());
        }
        let wait = Duration::from_secs_f64((1.0 - level) / limit.rate);
        Err(Status::resource_exhausted(format!(
            "{} refused: {} is over its rate limit of {} calls per second (bursts of {}); retry in {} ms",
            rpc.rpc(),
            caller.describe(),
            limit.rate,
            limit.burst,
            wait.as_millis().max(1)
        )))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tonic::Code;

    use super::*;

    fn limiter(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter::new(RateLimits { submit: Some(RateLimit { rate, burst }), register: None })
    }

    fn peer(last: u8) -> Caller {
        Caller::peer(Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))))
    }

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = limiter(2.0, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.admit(Limited::Submit, peer(1), t0).unwrap();
        }
        let refused = limiter.admit(Limited::Submit, peer(1), t0).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("SubmitJob refused: peer 10.0.0.1"), "{}", refused.message());
        assert!(refused.message().contains("retry in 500 ms"), "{}", refused.message());
        // Another caller has its own bucket; another RPC without a limit is not limited.
        limiter.admit(Limited::Submit, peer(2), t0).unwrap();
        limiter.admit(Limited::Register, peer(1), t0).unwrap();
        // Half a second refills one call, and only one.
        let t1 = t0 + Duration::from_millis(500);
        limiter.admit(Limited::Submit, peer(1), t1).unwrap();
        assert!(limiter.admit(Limited::Submit, peer(1), t1).is_err());
        // A long pause refills up to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(3600);
        for _ in 0..3 {
            limiter.admit(Limited::Submit, peer(1), t2).unwrap();
        }
        assert!(limiter.admit(Limited::Submit, peer(1), t2).is_err());
    }

    #[test]
    fn a_token_is_one_caller_and_its_message_names_only_the_role() {
        let limiter = limiter(1.0, 1);
        let now = Instant::now();
        let caller = Caller::Token { digest: [7; 32], role: Role::Admin };
        limiter.admit(Limited::Submit, caller, now).unwrap();
        let refused = limiter.admit(Limited::Submit, caller, now).unwrap_err();
        assert!(refused.message().contains("this admin token"), "{}", refused.message());
        let other = Caller::Token { digest: [8; 32], role: Role::Admin };
        limiter.admit(Limited::Submit, other, now).unwrap();
    }

    #[test]
    fn ipv6_peers_share_their_network_s_bucket() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(Caller::peer(Some(a)), Caller::peer(Some(b)));
        assert_ne!(Caller::peer(Some(a)), Caller::peer(Some(c)));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(Caller::peer(Some(mapped)), peer(1));
    }

    #[test]
    fn the_table_forgets_refilled_buckets_and_stays_bounded() {
        let limiter = limiter(1.0, 1);
        let t0 = Instant::now();
        let caller = |i: usize| Caller::peer(Some(IpAddr::V4(Ipv4Addr::from(i as u32))));
        for i in 0..MAX_BUCKETS {
            limiter.admit(Limited::Submit, caller(i), t0).unwrap();
        }
        // A second later every bucket has refilled: a new caller clears them.
        let t1 = t0 + Duration::from_secs(1);
        limiter.admit(Limited::Submit, caller(MAX_BUCKETS), t1).unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }

    #[test]
    fn settings_are_checked() {
        assert!(RateLimit { rate: 0.0, burst: 1 }.validate().is_err());
        assert!(RateLimit { rate: f64::NAN, burst: 1 }.validate().is_err());
        assert!(RateLimit { rate: 1.0, burst: 0 }.validate().is_err());
        let limits = RateLimits { submit: None, register: Some(RateLimit { rate: -1.0, burst: 1 }) };
        assert_eq!(limits.validate().unwrap_err().0, "rate_limits.register");
        RateLimits::default().validate().unwrap();
    }
}
