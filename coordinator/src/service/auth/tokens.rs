//! Bearer tokens and their roles: the token file's parser, the table looked up on every
//! request, and the store that reloads the file when it changes.
//!
//! The file has one `ROLE TOKEN` per line (roles `admin`, `viewer`, `worker`); blank lines
//! and lines starting with `#` are skipped, and a `#` field after the token starts a
//! comment. A token is at least [`MIN_TOKEN_CHARS`] visible ASCII characters (what an HTTP
//! header value may carry), and appears once.
//!
//! Invariants: a token's text is never logged, printed or put in an error (errors name the
//! file and the line); the table keeps only SHA-256 digests, and a lookup compares the
//! presented token's digest with every entry in constant time, so neither the time taken
//! nor the digest's length says how much of a guess was right.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ring::digest::{SHA256, digest};
use subtle::ConstantTimeEq;

use super::AuthError;

/// The fewest characters a token may have: a short token can be guessed.
pub const MIN_TOKEN_CHARS: usize = 16;

/// What a token lets its holder do (the table of RPCs is in `policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Submit and cancel jobs, and everything a viewer may.
    Admin,
    /// Read jobs, their events and timelines, and the workers: what a dashboard gets.
    Viewer,
    /// Register, hold a session (heartbeats, acknowledgements, step reports).
    Worker,
}

impl Role {
    /// Every role, in the order the docs list them.
    pub const ALL: [Role; 3] = [Role::Admin, Role::Viewer, Role::Worker];

    /// The role's name in the token file.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Viewer => "viewer",
            Role::Worker => "worker",
        }
    }

    fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|role| role.as_str() == text)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The tokens of one version of the token file, as digests.
#[derive(Clone)]
pub struct TokenTable {
    entries: Vec<(Role, [u8; 32])>,
}

fn sha256(token: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, token).as_ref());
    out
}

impl TokenTable {
    /// Parses a token file's text; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<TokenTable, AuthError> {
        let entries = parse_lines(path, text)?.into_iter().map(|(role, hash, _)| (role, hash)).collect();
        Ok(TokenTable { entries })
    }

    /// Reads and parses a token file.
    pub fn read(path: &Path) -> Result<TokenTable, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_path_buf(),
            what: "token file",
            source,
        })?;
        TokenTable::parse(path, &text)
    }

    /// The role of `token`, if the table has it. Every entry is compared, in constant
    /// time, whatever matches.
    pub fn role_of(&self, token: &[u8]) -> Option<Role> {
        self.identify(token).map(|(role, _)| role)
    }

    /// The role of `token` and its digest (what identifies the caller to the rate limits),
    /// if the table has it; compared as [`TokenTable::role_of`] does.
    pub fn identify(&self, token: &[u8]) -> Option<(Role, [u8; 32])> {
        let hash = sha256(token);
        let mut found = None;
        for (role, known) in &self.entries {
            if bool::from(known.ct_eq(&hash)) {
                found = Some(*role);
            }
        }
        found.map(|role| (role, hash))
    }

    /// How many tokens each role has (admin, viewer, worker), for the start-up log.
    pub fn counts(&self) -> [usize; 3] {
        Role::ALL.map(|role| self.entries.iter().filter(|(r, _)| *r == role).count())
    }
}

impl fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [admin, viewer, worker] = self.counts();
        f.debug_struct("TokenTable")
            .field("admin", &admin)
            .field("viewer", &viewer)
            .field("worker", &worker)
            .finish()
    }
}

/// A token line: its role, the token's digest and its text.
type Line<'a> = (Role, [u8; 32], &'a str);

/// A token file's lines: each token's role, digest and text, in file order, checked as
/// the module doc says.
fn parse_lines<'a>(path: &Path, text: &'a str) -> Result<Vec<Line<'a>>, AuthError> {
    let mut entries: Vec<(Role, [u8; 32])> = Vec::new();
    let mut lines_of: Vec<usize> = Vec::new();
    let mut tokens: Vec<&str> = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        let bad = |reason: String| AuthError::TokenLine { path: path.to_path_buf(), line: number, reason };
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields = line.split_whitespace();
        // The fields are never quoted in errors: a line written `TOKEN ROLE` would
        // print the token.
        let role = fields.next().and_then(Role::parse).ok_or_else(|| {
            bad("the first field is not a role (admin, viewer or worker): lines are `ROLE TOKEN`".into())
        })?;
        let token = fields.next().ok_or_else(|| bad(format!("role {role} has no token after it")))?;
        if let Some(extra) = fields.next()
            && !extra.starts_with('#')
        {
            return Err(bad("text after the token (a token has no spaces; comments start with `#`)".into()));
        }
        if let Some(at) = token.chars().position(|c| !c.is_ascii_graphic()) {
            return Err(bad(format!(
                "the token's character {} is not visible ASCII (a token travels in an HTTP header)",
                at + 1
            )));
        }
        if token.len() < MIN_TOKEN_CHARS {
            return Err(bad(format!(
                "the token has {} characters; at least {MIN_TOKEN_CHARS} are required",
                token.len()
            )));
        }
        let hash = sha256(token.as_bytes());
        if let Some(first) = entries.iter().position(|(_, known)| *known == hash) {
            return Err(bad(format!("the same token as line {}: a token has one role", lines_of[first])));
        }
        entries.push((role, hash));
        lines_of.push(number);
        tokens.push(token);
    }
    if entries.is_empty() {
        return Err(AuthError::NoTokens { path: path.to_path_buf() });
    }
    Ok(entries.into_iter().zip(tokens).map(|((role, hash), token)| (role, hash, token)).collect())
}

/// The first token of `role` in the token file at `path` (after checking the whole file),
/// for a launcher that starts clients of its own coordinator (`flotilla run`).
pub fn first_token(path: &Path, role: Role) -> Result<Option<String>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_path_buf(),
        what: "token file",
        source,
    })?;
    let entries = parse_lines(path, &text)?;
    Ok(entries.into_iter().find(|(r, _, _)| *r == role).map(|(_, _, token)| token.to_string()))
}

/// A file's identity and version, as far as `stat` tells.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path)?;
        Ok(Stamp { modified: meta.modified()?, len: meta.len(), inode: meta.ino() })
    }
}

/// File systems stamp modification times from a coarse clock: a file changed twice within
/// this long may keep its stamp, so one loaded this soon after its stamp is read again.
const STAMP_GRANULARITY: Duration = Duration::from_secs(2);

struct Loaded {
    stamp: Stamp,
    /// The file was loaded within [`STAMP_GRANULARITY`] of its stamp: it may have changed
    /// since without the stamp saying so.
    racy: bool,
    table: Arc<TokenTable>,
    /// The stamp of the last version that failed to load, so its error is logged once.
    failed: Option<Stamp>,
}

/// The token file, reloaded when it changes: every request asks [`TokenStore::current`],
/// which `stat`s the file and parses it again when its modification time, size or inode
/// changed (so both editing in place and replacing by rename are seen at the next
/// request). A version that does not parse, or a file that vanished, is logged with the
/// file and line and the previous table stays in force.
pub struct TokenStore {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl TokenStore {
    /// Loads the file; its errors name the file and the line.
    pub fn open(path: impl Into<PathBuf>) -> Result<TokenStore, AuthError> {
        let path = path.into();
        let stamp = Stamp::of(&path).map_err(|source| AuthError::Read {
            path: path.clone(),
            what: "token file",
            source,
        })?;
        let table = TokenTable::read(&path)?;
        let racy = is_racy(stamp);
        Ok(TokenStore {
            path,
            loaded: Mutex::new(Loaded { stamp, racy, table: Arc::new(table), failed: None }),
        })
    }

    /// The token file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table in force, reloaded first if the file changed. The lock is held only
    /// while a small file is `stat`ed (and, when it changed, read): never across an await.
    pub fn current(&self) -> Arc<TokenTable> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let stamp = match Stamp::of(&self.path) {
            Ok(stamp) => stamp,
            Err(e) => {
                if loaded.failed.is_none() {
                    tracing::error!(
                        path = %self.path.display(),
                        error = %e,
                        "the token file cannot be read; the tokens loaded before stay in force"
                    );
                    loaded.failed = Some(loaded.stamp);
                }
                return loaded.table.clone();
            }
        };
        if stamp == loaded.stamp && !loaded.racy {
            return loaded.table.clone();
        }
        match TokenTable::read(&self.path) {
            Ok(table) => {
                let table = Arc::new(table);
                if stamp != loaded.stamp || loaded.failed.is_some() {
                    tracing::info!(path = %self.path.display(), tokens = ?table, "token file reloaded");
                }
                *loaded = Loaded { stamp, racy: is_racy(stamp), table, failed: None };
            }
            Err(e) => {
                if loaded.failed != Some(stamp) {
                    tracing::error!(error = %e, "the token file does not load; the tokens loaded before stay in force");
                    loaded.failed = Some(stamp);
                }
                loaded.stamp = stamp;
                loaded.racy = is_racy(stamp);
            }
        }
        loaded.table.clone()
    }
}

fn is_racy(stamp: Stamp) -> bool {
    SystemTime::now().duration_since(stamp.modified).map_or(true, |age| age < STAMP_GRANULARITY)
}

impl fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStore").field("path", &self.path).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "admin-token-0123456789";
    const VIEWER: &str = "viewer-token-0123456789";

    fn parse(text: &str) -> Result<TokenTable, AuthError> {
        TokenTable::parse(Path::new("tokens.txt"), text)
    }

    #[test]
    fn roles_comments_and_blank_lines() {
        let table =
            parse(&format!("# the cluster's tokens\n\nadmin {ADMIN}\n  viewer\t{VIEWER}  # grafana\n"))
                .unwrap();
        assert_eq!(table.role_of(ADMIN.as_bytes()), Some(Role::Admin));
        assert_eq!(table.role_of(VIEWER.as_bytes()), Some(Role::Viewer));
        assert_eq!(table.role_of(b"admin-token-012345678"), None);
        assert_eq!(table.role_of(b""), None);
        assert_eq!(table.counts(), [1, 1, 0]);
    }

    #[test]
    fn errors_name_the_file_and_line_and_never_the_token() {
        let cases = [
            (format!("{ADMIN} admin\n"), 1, "not a role"),
            ("\n\nadmin\n".to_string(), 3, "no token"),
            (format!("worker {ADMIN} extra\n"), 1, "text after the token"),
            ("viewer short\n".to_string(), 1, "at least 16"),
            (format!("admin {ADMIN}\nviewer {ADMIN}\n"), 2, "same token as line 1"),
            (format!("root {ADMIN}\n"), 1, "not a role"),
        ];
        for (text, line, what) in cases {
            let error = parse(&text).unwrap_err().to_string();
            assert!(error.starts_with(&format!("tokens.txt:{line}: ")), "{error}");
            assert!(error.contains(what), "{error}");
            assert!(!error.contains(ADMIN), "{error}");
        }
        let error = parse("# nothing\n").unwrap_err().to_string();
        assert!(error.contains("tokens.txt") && error.contains("no tokens"), "{error}");
        let error = TokenTable::read(Path::new("/nonexistent/tokens")).unwrap_err().to_string();
        assert!(error.contains("/nonexistent/tokens"), "{error}");
    }

    #[test]
    fn the_first_token_of_a_role() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("viewer {VIEWER}\nadmin {ADMIN}\nadmin {ADMIN}x\n")).unwrap();
        assert_eq!(first_token(&path, Role::Admin).unwrap().as_deref(), Some(ADMIN));
        assert_eq!(first_token(&path, Role::Worker).unwrap(), None);
        std::fs::write(&path, format!("admin {ADMIN}\nworker short\n")).unwrap();
        assert!(first_token(&path, Role::Admin).unwrap_err().to_string().contains(":2:"));
    }

    #[test]
    fn debug_shows_counts_not_digests() {
        let table = parse(&format!("admin {ADMIN}\n")).unwrap();
        assert_eq!(format!("{table:?}"), "TokenTable { admin: 1, viewer: 0, worker: 0 }");
    }

    #[test]
    fn the_store_reloads_a_changed_file_and_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, format!("admin {ADMIN}\n")).unwrap();
        let store = TokenStore::open(&path).unwrap();
        assert_eq!(store.current().role_of(ADMIN.as_bytes()), Some(Role::Admin));
        // Same length, same second: the content is read again all the same.
        std::fs::write(&path, format!("viewer {ADMIN}\n")).unwrap();
        assert_eq!(store.current().role_of(ADMIN.as_bytes()), Some(Role::Viewer));
        std::fs::write(&path, "viewer short\n").unwrap();
        assert_eq!(store.current().role_of(ADMIN.as_bytes()), Some(Role::Viewer));
        std::fs::remove_file(&path).unwrap();
        assert_eq!(store.current().role_of(ADMIN.as_bytes()), Some(Role::Viewer));
        std::fs::write(&path, format!("worker {VIEWER}\n")).unwrap();
        let table = store.current();
        assert_eq!(table.role_of(VIEWER.as_bytes()), Some(Role::Worker));
        assert_eq!(table.role_of(ADMIN.as_bytes()), None);
    }
}
