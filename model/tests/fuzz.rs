//! Property tests over the parsers of user files: the run TOML, HF `config.json`, a
//! safetensors file's header (through `HfReader::open`) and an indexed dataset's `.idx`
//! header, each fed arbitrary bytes and valid files mutated (bytes overwritten, truncated).
//! None may panic; each error names the file or the field at fault. Case counts are small:
//! the whole file runs in seconds.

use std::path::{Path, PathBuf};

use flotilla_model::ModelConfig;
use flotilla_model::checkpoint::HfReader;
use flotilla_model::data::{IndexedDataset, IndexedWriter, TokenDtype};
use flotilla_model::train::TrainConfig;
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

const TINY_TOML: &str = include_str!("../../examples/tiny.toml");

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
    let len = ((bytes.len() as f64) * keep.clamp(0.0, 1.0)) as usize;
    bytes.truncate(len.max(if keep >= 1.0 { bytes.len() } else { 0 }));
    bytes
}

fn edits() -> impl Strategy<Value = (Vec<(usize, u8)>, f64)> {
    (prop::collection::vec((any::<usize>(), any::<u8>()), 0..8), prop_oneof![Just(1.0), 0.0..1.0f64])
}

/// A fresh directory under the system's temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir(name: &str) -> TempDir {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("flotilla-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn the_run_toml_never_panics(text in ".{0,400}", (edits, keep) in edits()) {
        let mutated = String::from_utf8_lossy(&mutate(TINY_TOML.as_bytes(), &edits, keep)).into_owned();
        for text in [text, mutated] {
            if let Err(error) = TrainConfig::from_toml(&text, Path::new(".")) {
                prop_assert!(!error.to_string().is_empty());
            }
            let _ = ModelConfig::from_toml(&text);
        }
    }

    #[test]
    fn an_hf_config_json_never_panics(text in ".{0,400}", (edits, keep) in edits()) {
        let valid = std::fs::read(fixtures().join("hf_configs/released.json")).unwrap();
        let mutated = String::from_utf8_lossy(&mutate(&valid, &edits, keep)).into_owned();
        for text in [text, mutated] {
            if let Err(error) = ModelConfig::from_hf_json(&text) {
                prop_assert!(!error.to_string().is_empty());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn a_safetensors_header_never_panics(
        noise in prop::collection::vec(any::<u8>(), 0..256),
        (edits, keep) in edits(),
    ) {
        let source = fixtures().join("hf_checkpoints/sharded_bf16");
        let valid = std::fs::read(source.join("model-00001-of-00008.safetensors")).unwrap();
        let header_len = 8 + u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
        // Mutations land in the length and the JSON header, where the parser reads.
        let edits: Vec<(usize, u8)> = edits.into_iter().map(|(at, b)| (at % header_len, b)).collect();
        let config = std::fs::read(source.join("config.json")).unwrap();
        for bytes in [noise, mutate(&valid, &edits, keep)] {
            let dir = temp_dir("fuzz-safetensors");
            std::fs::write(dir.path().join("config.json"), &config).unwrap();
            std::fs::write(dir.path().join("model.safetensors"), &bytes).unwrap();
            if let Err(error) = HfReader::open(dir.path()) {
                let message = error.to_string();
                prop_assert!(message.contains("model.safetensors"), "{message}");
            }
        }
    }

    #[test]
    fn an_indexed_dataset_header_never_panics(
        noise in prop::collection::vec(any::<u8>(), 0..128),
        (edits, keep) in edits(),
    ) {
        let dir = temp_dir("fuzz-indexed");
        let prefix = dir.path().join("valid");
        let mut writer = IndexedWriter::create(&prefix, TokenDtype::U16).unwrap();
        for document in [&[1u32, 2, 3][..], &[4, 5], &[6, 7, 8, 9]] {
            writer.add_document(document).unwrap();
        }
        writer.finish().unwrap();
        let valid = std::fs::read(prefix.with_extension("idx")).unwrap();
        let bin = std::fs::read(prefix.with_extension("bin")).unwrap();
        for (i, idx) in [noise, mutate(&valid, &edits, keep)].into_iter().enumerate() {
            let prefix = dir.path().join(format!("case-{i}"));
            std::fs::write(prefix.with_extension("idx"), &idx).unwrap();
            std::fs::write(prefix.with_extension("bin"), &bin).unwrap();
            match IndexedDataset::open(&prefix) {
                Ok(data) => {
                    for s in 0..data.sequences() {
                        let _ = data.sequence(s);
                    }
                    for d in 0..data.documents() {
                        let _ = data.document(d);
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    prop_assert!(message.contains(&format!("case-{i}")), "{message}");
                }
            }
        }
    }
}
