//! The data plane's handshake: how two ends of a new TCP connection prove to each other
//! that both belong to the same rendezvous before either reads a frame.
//!
//! Every rendezvous (one job attempt) has a [`DataPlaneSecret`], 32 random bytes the
//! coordinator hands each rank in its assignment. A connection goes:
//!
//! ```text
//! dialer → acceptor   hello_d   (60 bytes, with a fresh 32-byte nonce)
//! acceptor → dialer   hello_a   (60 bytes, with a fresh 32-byte nonce)
//! dialer → acceptor   proof_d = HMAC-SHA256(secret, TAG | 1 | hello_d | hello_a)
//! acceptor → dialer   proof_a = HMAC-SHA256(secret, TAG | 2 | hello_d | hello_a)
//! ```
//!
//! A hello is `b"FLOTILLA" | version: u32 | rank: u32 | world size: u32 | session: u64 |
//! nonce: [u8; 32]`, little-endian; `TAG` is [`PROOF_DOMAIN`]. Each proof covers both
//! hellos whole (both nonces, both ranks, the world size, the session, the version) and its
//! direction, so a proof is good for one connection and one direction only: replayed on
//! another connection (whose acceptor drew another nonce) or reflected back, it fails.
//! Proofs are checked in constant time (`ring::hmac::verify`).
//!
//! The acceptor answers only a well-formed hello of its own version, and sends its proof
//! only to a dialer that proved itself: a stranger learns the acceptor's hello and
//! nothing that helps it elsewhere. Only once both proofs check are the hellos compared
//! (world size, session, ranks): a mismatch between two holders of the secret is a real
//! misconfiguration and fails the rendezvous, whereas a connection that cannot prove
//! itself is a *stranger*, dropped without failing anything (`tcp` does that).
//!
//! Invariant: the secret never appears in a `Debug`, `Display` or error string; neither
//! does the session (an authenticated session mismatch is reported without values).

use std::fmt;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::CommError;

/// The first bytes of every hello.
pub const MAGIC: [u8; 8] = *b"FLOTILLA";
/// The data plane's wire version: 2 added the nonces and proofs.
pub const DATA_PLANE_VERSION: u32 = 2;
/// Bytes in a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in a hello.
pub const HELLO_LEN: usize = 28 + NONCE_LEN;
/// Bytes in a proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;
/// Bytes in a [`DataPlaneSecret`].
pub const SECRET_LEN: usize = 32;
/// Domain separation: these HMACs mean nothing anywhere else.
pub const PROOF_DOMAIN: &[u8] = b"flotilla data-plane handshake v2\0";

/// Which end a proof speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    /// The dialer's proof, checked by the acceptor.
    DialerToAcceptor = 1,
    /// The acceptor's proof, checked by the dialer.
    AcceptorToDialer = 2,
}

/// A rendezvous's shared secret (the assignment's `data_plane_secret`). Its `Debug` is
/// redacted and it has no `Display`: it is never logged or put into an error.
#[derive(Clone)]
pub struct DataPlaneSecret(hmac::Key);

impl DataPlaneSecret {
    /// The secret from its bytes, which must be exactly [`SECRET_LEN`] long; the error
    /// names the field and the length, never the bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<DataPlaneSecret, CommError> {
        if bytes.len() != SECRET_LEN {
            return Err(CommError::InvalidArgument {
                op: "data_plane_secret",
                reason: format!("must be {SECRET_LEN} bytes, got {}", bytes.len()),
            });
        }
        Ok(DataPlaneSecret(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// A fresh random secret, for ranks that rendezvous from one process (tests,
    /// benchmarks, [`super::loopback_group`]'s callers); the coordinator makes the real ones.
    pub fn random() -> DataPlaneSecret {
        let mut bytes = [0u8; SECRET_LEN];
        fill_random(&mut bytes);
        let secret = DataPlaneSecret::from_bytes(&bytes).expect("SECRET_LEN bytes");
        bytes.fill(0);
        secret
    }

    /// The proof `direction`'s end sends on the connection whose hellos are `dialer` and
    /// `acceptor` (as encoded on the wire).
    pub fn proof(
        &self,
        direction: Direction,
        dialer: &[u8; HELLO_LEN],
        acceptor: &[u8; HELLO_LEN],
    ) -> [u8; PROOF_LEN] {
        let tag = hmac::sign(&self.0, &transcript(direction, dialer, acceptor));
        let mut out = [0u8; PROOF_LEN];
        out.copy_from_slice(tag.as_ref());
        out
    }

    /// Whether `proof` is `direction`'s proof for these hellos (constant time).
    pub fn verify(
        &self,
        direction: Direction,
        dialer: &[u8; HELLO_LEN],
        acceptor: &[u8; HELLO_LEN],
        proof: &[u8],
    ) -> bool {
        hmac::verify(&self.0, &transcript(direction, dialer, acceptor), proof).is_ok()
    }
}

impl fmt::Debug for DataPlaneSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataPlaneSecret(<redacted>)")
    }
}

fn transcript(direction: Direction, dialer: &[u8; HELLO_LEN], acceptor: &[u8; HELLO_LEN]) -> Vec<u8> {
    let mut t = Vec::with_capacity(PROOF_DOMAIN.len() + 1 + 2 * HELLO_LEN);
    t.extend_from_slice(PROOF_DOMAIN);
    t.push(direction as u8);
    t.extend_from_slice(dialer);
    t.extend_from_slice(acceptor);
    t
}

/// Fills `out` from the operating system's CSPRNG.
fn fill_random(out: &mut [u8]) {
    // `SystemRandom` is getrandom(2) on Linux; it fails only where the system has no
    // randomness at all, where nothing about this process could be secure.
    SystemRandom::new().fill(out).expect("the operating system's random number generator failed");
}

/// What both ends of a new connection send first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u32,
    pub rank: usize,
    pub world_size: usize,
    pub session: u64,
    pub nonce: [u8; NONCE_LEN],
}

/// Why bytes are not a hello this rank can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadHello {
    /// Not a flotilla data-plane peer at all.
    Magic,
    /// A flotilla peer of another data-plane version (its layout may differ after the
    /// version field, so nothing else is read).
    Version(u32),
    /// The right magic and version, but not [`HELLO_LEN`] bytes.
    Length(usize),
}

impl fmt::Display for BadHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BadHello::Magic => f.write_str("not a flotilla data-plane peer (bad magic)"),
            BadHello::Version(v) => {
                write!(f, "speaks data-plane version {v}, this rank speaks {DATA_PLANE_VERSION}")
            }
            BadHello::Length(n) => write!(f, "a hello of {n} bytes, not {HELLO_LEN}"),
        }
    }
}

impl Hello {
    /// This rank's hello with a fresh nonce.
    pub fn new(rank: usize, world_size: usize, session: u64) -> Hello {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        Hello { version: DATA_PLANE_VERSION, rank, world_size, session, nonce }
    }

    pub fn encode(&self) -> [u8; HELLO_LEN] {
        let mut out = [0u8; HELLO_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..12].copy_from_slice(&self.version.to_le_bytes());
        // Ranks and world sizes are below MAX_WORLD_SIZE, which fits u32.
        out[12..16].copy_from_slice(&(self.rank as u32).to_le_bytes());
        out[16..20].copy_from_slice(&(self.world_size as u32).to_le_bytes());
        out[20..28].copy_from_slice(&self.session.to_le_bytes());
        out[28..].copy_from_slice(&self.nonce);
        out
    }

    /// Decodes a hello from the network. Any bytes are accepted as input: too few, a bad
    /// magic or another version are errors, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Hello, BadHello> {
        if bytes.len() < 8 || bytes[..8] != MAGIC {
            return Err(BadHello::Magic);
        }
        if bytes.len() < 12 {
            return Err(BadHello::Length(bytes.len()));
        }
        let u32_at = |at: usize| u32::from_le_bytes(std::array::from_fn(|i| bytes[at + i]));
        let version = u32_at(8);
        if version != DATA_PLANE_VERSION {
            return Err(BadHello::Version(version));
        }
        if bytes.len() != HELLO_LEN {
            return Err(BadHello::Length(bytes.len()));
        }
        Ok(Hello {
            version,
            rank: u32_at(12) as usize,
            world_size: u32_at(16) as usize,
            session: u64::from_le_bytes(std::array::from_fn(|i| bytes[20 + i])),
            nonce: std::array::from_fn(|i| bytes[28 + i]),
        })
    }

    /// Why an authenticated peer's hello `theirs` cannot join `self`'s group, if it
    /// cannot. Names no session value.
    pub fn mismatch(&self, theirs: &Hello) -> Option<String> {
        if theirs.session != self.session {
            Some(format!("its hello names another session than rank {}'s", self.rank))
        } else if theirs.world_size != self.world_size {
            Some(format!("world size {}, this rank's is {}", theirs.world_size, self.world_size))
        } else {
            None
        }
    }
}

/// How a handshake that did not authenticate ended: the other end is a stranger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAPeer {
    /// Its hello could not be answered.
    Hello(BadHello),
    /// Its proof was wrong: it does not hold this rendezvous's secret (or replayed a
    /// proof of another connection).
    Proof,
    /// The connection failed or closed before the handshake ended.
    Io(String),
}

impl fmt::Display for NotAPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotAPeer::Hello(bad) => bad.fmt(f),
            NotAPeer::Proof => f.write_str("failed to prove it holds this rendezvous's secret"),
            NotAPeer::Io(e) => write!(f, "connection failed during the handshake: {e}"),
        }
    }
}

fn io(e: std::io::Error) -> NotAPeer {
    NotAPeer::Io(e.to_string())
}

/// The dialing end of the handshake on `stream`: sends `me`, then proves itself and checks
/// the acceptor's proof. Returns the acceptor's (authenticated) hello; the caller compares
/// it with its own ([`Hello::mismatch`], the rank it meant to reach). `tcp`'s rendezvous
/// runs this for every connection it dials; public so that tools and tests can speak the
/// data plane from outside a communicator.
pub async fn dial<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    me: &Hello,
    secret: &DataPlaneSecret,
) -> Result<Hello, NotAPeer> {
    let mine = me.encode();
    stream.write_all(&mine).await.map_err(io)?;
    let mut theirs = [0u8; HELLO_LEN];
    stream.read_exact(&mut theirs).await.map_err(io)?;
    let hello = Hello::decode(&theirs).map_err(NotAPeer::Hello)?;
    stream.write_all(&secret.proof(Direction::DialerToAcceptor, &mine, &theirs)).await.map_err(io)?;
    let mut proof = [0u8; PROOF_LEN];
    stream.read_exact(&mut proof).await.map_err(io)?;
    if !secret.verify(Direction::AcceptorToDialer, &mine, &theirs, &proof) {
        return Err(NotAPeer::Proof);
    }
    Ok(hello)
}

/// The accepting end: reads the dialer's hello, answers with `me` (whose nonce must be
/// fresh for this connection), checks the dialer's proof and only then sends its own.
/// Returns the dialer's authenticated hello.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    me: &Hello,
    secret: &DataPlaneSecret,
) -> Result<Hello, NotAPeer> {
    let mut theirs = [0u8; HELLO_LEN];
    // The magic and version first: a stranger that sends fewer bytes than a hello is
    // told apart from a peer of another version without waiting for the rest.
    stream.read_exact(&mut theirs[..12]).await.map_err(io)?;
    // Twelve bytes of our magic and version decode as a short hello: read the rest.
    if let Err(bad @ (BadHello::Magic | BadHello::Version(_))) = Hello::decode(&theirs[..12]) {
        return Err(NotAPeer::Hello(bad));
    }
    stream.read_exact(&mut theirs[12..]).await.map_err(io)?;
    let hello = Hello::decode(&theirs).map_err(NotAPeer::Hello)?;
    let mine = me.encode();
    stream.write_all(&mine).await.map_err(io)?;
    let mut proof = [0u8; PROOF_LEN];
    stream.read_exact(&mut proof).await.map_err(io)?;
    if !secret.verify(Direction::DialerToAcceptor, &theirs, &mine, &proof) {
        return Err(NotAPeer::Proof);
    }
    stream.write_all(&secret.proof(Direction::AcceptorToDialer, &theirs, &mine)).await.map_err(io)?;
    Ok(hello)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_round_trips_and_strangers_do_not_decode() {
        let hello = Hello::new(3, 8, 77);
        assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        assert_eq!(Hello::decode(b"GET / HTTP/1.1\r\n"), Err(BadHello::Magic));
        assert_eq!(Hello::decode(&[]), Err(BadHello::Magic));
        let mut old = hello.encode();
        old[8..12].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(Hello::decode(&old[..28]), Err(BadHello::Version(1)));
        assert_ne!(Hello::new(3, 8, 77).nonce, hello.nonce, "nonces are fresh");
    }

    #[test]
    fn proofs_bind_the_secret_both_hellos_and_the_direction() {
        let secret = DataPlaneSecret::random();
        let (d, a) = (Hello::new(0, 2, 1).encode(), Hello::new(1, 2, 1).encode());
        let proof = secret.proof(Direction::DialerToAcceptor, &d, &a);
        assert!(secret.verify(Direction::DialerToAcceptor, &d, &a, &proof));
        assert!(!secret.verify(Direction::AcceptorToDialer, &d, &a, &proof), "reflected");
        let other = Hello::new(1, 2, 1).encode();
        assert!(!secret.verify(Direction::DialerToAcceptor, &d, &other, &proof), "replayed");
        assert!(!DataPlaneSecret::random().verify(Direction::DialerToAcceptor, &d, &a, &proof));
        assert!(!secret.verify(Direction::DialerToAcceptor, &d, &a, &proof[..31]));
        assert_eq!(format!("{secret:?}"), "DataPlaneSecret(<redacted>)");
        let err = DataPlaneSecret::from_bytes(&[7; 5]).unwrap_err().to_string();
        assert!(err.contains("data_plane_secret") && err.contains("got 5"), "{err}");
    }
}
