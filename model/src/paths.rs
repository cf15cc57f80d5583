//! Path confinement: the one rule for which files a job may read or write. The
//! coordinator applies it at submission to a job's output directory, `resume_from` and the
//! run's data, tokenizer and `init_from` paths; every worker applies it again, under its own
//! roots, before it opens or creates anything an assignment names.
//!
//! A path is allowed when it has no `..` component and, made absolute against a base
//! directory and with every symlink in its existing part resolved, it lies under one of
//! the [`AllowedRoots`]. The part that does not exist yet cannot hold a symlink, so
//! creating it stays under the root; a dangling symlink in the path is refused (creating
//! through it would follow it).
//!
//! Invariant: the refusal of a path outside the roots does not depend on whether, or as
//! what, that path exists: one message for every such path, so errors cannot be used to
//! probe the filesystem.

use std::path::{Component, Path, PathBuf};

/// Why a path was refused: the field that named it, the path as given, and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct PathError {
    /// The request or config field (`output_dir`, `data.path`, …), or `allowed_root`.
    pub field: String,
    /// The path as given.
    pub path: String,
    /// What is wrong with it.
    pub kind: PathErrorKind,
    /// `path` and `kind` in words (what [`PathError`] displays after the field).
    pub detail: String,
}

/// The rule a refused path breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathErrorKind {
    /// It has a `..` component.
    ParentComponent,
    /// Resolved, it is not under any root (or it reaches outside through a symlink).
    OutsideRoots,
    /// It must be a plain file name and is not one.
    NotAFileName,
    /// A configured root (or base) cannot be resolved.
    Root,
}

impl PathError {
    fn new(field: &str, path: &str, kind: PathErrorKind, detail: String) -> PathError {
        PathError { field: field.into(), path: path.into(), kind, detail }
    }
}

/// The directories a process lets jobs read and write under, resolved (canonical).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowedRoots {
    /// Canonical roots, in the order configured.
    roots: Vec<PathBuf>,
    /// Relative paths are relative to this (canonical) directory.
    base: PathBuf,
}

impl AllowedRoots {
    /// The roots `roots` (each must exist), relative paths resolved against `base` (the
    /// working directory for output paths; a config file's directory for its data).
    pub fn new(roots: &[PathBuf], base: &Path) -> Result<AllowedRoots, PathError> {
        let resolve = |root: &Path| {
            std::fs::canonicalize(root).map_err(|e| {
                let shown = root.display().to_string();
                PathError::new("allowed_root", &shown, PathErrorKind::Root, format!("`{shown}`: {e}"))
            })
        };
        let base = resolve(base)?;
        let roots = roots.iter().map(|r| resolve(&base.join(r))).collect::<Result<Vec<_>, _>>()?;
        Ok(AllowedRoots { roots, base })
    }

    /// The same roots with relative paths resolved against `base` instead.
    pub fn with_base(&self, base: &Path) -> Result<AllowedRoots, PathError> {
        let base = std::fs::canonicalize(self.base.join(base)).map_err(|e| {
            let shown = base.display().to_string();
            PathError::new("base", &shown, PathErrorKind::Root, format!("`{shown}`: {e}"))
        })?;
        Ok(AllowedRoots { roots: self.roots.clone(), base })
    }

    /// The canonical roots.
    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// `path` (named by `field`) resolved, if it is allowed; see the module docs.
    pub fn confine(&self, field: &str, path: &Path) -> Result<PathBuf, PathError> {
        let shown = path.display().to_string();
        if path.components().any(|c| c == Component::ParentDir) {
            let detail = format!("`{shown}` contains `..`; give a path without parent components");
            return Err(PathError::new(field, &shown, PathErrorKind::ParentComponent, detail));
        }
        let outside = || {
            let roots = self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ");
            let detail = format!(
                "`{shown}` is not under the allowed roots ({roots}): paths outside them, or through a symlink leading out of them, are refused"
            );
            PathError::new(field, &shown, PathErrorKind::OutsideRoots, detail)
        };
        let absolute = self.base.join(path);
        let resolved = resolve_existing(&absolute).ok_or_else(outside)?;
        if self.roots.iter().any(|root| resolved.starts_with(root)) { Ok(resolved) } else { Err(outside()) }
    }
}

/// `path` (absolute, no `..`) with its longest existing ancestor canonicalized and the
/// rest appended; `None` when an entry of it exists but cannot be resolved (a dangling or
/// looping symlink, an unreadable directory).
fn resolve_existing(path: &Path) -> Option<PathBuf> {
    let mut rest = Vec::new();
    let mut existing = path;
    loop {
        match std::fs::canonicalize(existing) {
            Ok(canonical) => {
                let mut resolved = canonical;
                resolved.extend(rest.iter().rev());
                return Some(resolved);
            }
            // The entry itself exists (a symlink to nowhere, a loop): refuse.
            Err(_) if std::fs::symlink_metadata(existing).is_ok() => return None,
            Err(_) => {
                rest.push(existing.file_name()?.to_os_string());
                existing = existing.parent()?;
            }
        }
    }
}

/// Checks that `name` (named by `field`) is a plain file name: not empty, no separator,
/// not `.` or `..`, no NUL. Names a peer reports before they are joined to a directory.
pub fn check_file_name(field: &str, name: &str) -> Result<(), PathError> {
    let mut components = Path::new(name).components();
    let plain = matches!((components.next(), components.next()), (Some(Component::Normal(_)), None))
        && !name.contains(['/', '\\', '\0']);
    if plain {
        return Ok(());
    }
    let detail = format!("`{name}` is not a plain file name (no separators, no `.` or `..`, not empty)");
    Err(PathError::new(field, name, PathErrorKind::NotAFileName, detail))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_are_plain() {
        for ok in ["rank-00000.shard", "a", "a.b.c"] {
            check_file_name("f", ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "/a", "../a", "a\\b", "a\0b", "./a"] {
            assert!(check_file_name("f", bad).is_err(), "{bad:?}");
        }
    }
}
