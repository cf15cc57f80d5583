//! Identifiers the coordinator hands out that nobody may guess: a worker's session id
//! (binding its `Session` stream to its registration) and a rendezvous's data-plane
//! session (so a peer left over from an earlier rendezvous is refused), and a rendezvous's
//! data-plane secret, the one of these that is a credential: drawn from the operating
//! system's CSPRNG (`ring::rand::SystemRandom`), never logged or stored.
//!
//! Invariant: two calls in one process never return the same inputs to the hash (a
//! process-wide counter is part of them), so ids differ even within one millisecond.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use super::records;

/// 64 bits nobody can predict without the process's random hashing keys. Not a
/// cryptographic secret: it names a data-plane rendezvous (one job incarnation), which
/// peers prove they belong to with the [`data_plane_secret`], not with this id.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u64(records::unix_ms());
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// A worker's session id: 128 bits from the operating system's CSPRNG, in hex. It binds a
/// worker's stream to its registration, so it must not be guessable; if the system cannot
/// supply randomness, the hashed [`random_u64`] stands in (registration still needs the
/// worker token).
pub(crate) fn session_id() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        return format!("{:016x}{:016x}", random_u64(), random_u64());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes in a data-plane secret.
pub(crate) const DATA_PLANE_SECRET_LEN: usize = 32;

/// A fresh data-plane secret: 32 bytes from the operating system's CSPRNG. `None` only if
/// the system cannot supply randomness, which the caller treats as an internal failure.
pub(crate) fn data_plane_secret() -> Option<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut secret = vec![0u8; DATA_PLANE_SECRET_LEN];
    ring::rand::SystemRandom::new().fill(&mut secret).ok()?;
    Some(secret)
}
