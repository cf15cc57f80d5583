//! Property tests over the coordinator's parsers of user files: a checkpoint's
//! `manifest.json` (read when a job resumes) and the token file, fed arbitrary bytes and
//! valid files mutated (bytes overwritten, truncated). None may panic; each error names
//! the file. Case counts are small: the file runs in seconds.

use std::path::Path;

use flotilla_coordinator::checkpoint::{MANIFEST_FORMAT, Manifest, ShardEntry, read_manifest};
use flotilla_coordinator::service::auth::TokenTable;
use proptest::prelude::*;

/// `valid` with each `(position, byte)` written over it (positions wrap), cut to `keep`
/// of its length when `keep` is below 1.
fn mutate(valid: &[u8], edits: &[(usize, u8)], keep: f64) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    if !bytes.is_empty() {
        for &(at, byte) in edits {
            let at = at % bytes.len();
            bytes[at] = byte;
        }
    }
    if keep < 1.0 {
        bytes.truncate((bytes.len() as f64 * keep.max(0.0)) as usize);
    }
    bytes
}

fn edits() -> impl Strategy<Value = (Vec<(usize, u8)>, f64)> {
    (prop::collection::vec((any::<usize>(), any::<u8>()), 0..8), prop_oneof![Just(1.0), 0.0..1.0f64])
}

fn valid_manifest() -> Vec<u8> {
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        job_id: "job-1".into(),
        run_id: "job-1-1000".into(),
        step: 4,
        created_unix_ms: 1000,
        workers: 2,
        layout: "dp=2".into(),
        config_toml: "steps = 8\n".into(),
        shards: (0..2)
            .map(|rank| ShardEntry {
                rank,
                file: format!("shard-{rank:05}-of-00002.safetensors"),
                bytes: 64,
                crc32: 7,
            })
            .collect(),
        bytes: 128,
    };
    serde_json::to_vec_pretty(&manifest).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn a_manifest_never_panics(noise in prop::collection::vec(any::<u8>(), 0..256), (edits, keep) in edits()) {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("step-00000004");
        std::fs::create_dir_all(&dir).unwrap();
        for bytes in [noise, mutate(&valid_manifest(), &edits, keep)] {
            std::fs::write(dir.join("manifest.json"), &bytes).unwrap();
            if let Err(error) = read_manifest(&dir) {
                let message = error.to_string();
                prop_assert!(message.contains("step-00000004"), "{message}");
            }
        }
    }

    #[test]
    fn a_token_file_never_panics(text in "(?s).{0,300}", (edits, keep) in edits()) {
        let valid = b"# tokens\nadmin admin-0123456789abcdef\nviewer viewer-0123456789abcdef\nworker worker-0123456789abcdef\n";
        let mutated = String::from_utf8_lossy(&mutate(valid, &edits, keep)).into_owned();
        let path = Path::new("/etc/flotilla/tokens");
        for text in [text, mutated] {
            if let Err(error) = TokenTable::parse(path, &text) {
                let message = error.to_string();
                prop_assert!(message.contains("/etc/flotilla/tokens"), "{message}");
                prop_assert!(!message.contains("0123456789abcdef"), "a token in an error: {message}");
            }
        }
    }
}
