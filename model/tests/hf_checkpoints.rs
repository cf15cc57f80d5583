//! Checkpoints as transformers writes them, read by [`HfReader`]: the fixtures under
//! `tests/fixtures/hf_checkpoints/` are written by `tools/hf_checkpoint_fixtures.py`
//! (transformers 5.24.0, torch 2.15.0; not run by CI): `DeepseekV3ForCausalLM(config)`'s
//! random init saved by `save_pretrained(max_shard_size = "60KB")` in bf16 — 8 shards and
//! an index, a config with `num_nextn_predict_layers = 1` and no MTP tensors, as
//! transformers saves — and the same weights in DeepSeek's FP8 form (E4M3 with 128×128
//! `weight_scale_inv` blocks, partial at the 144- and 160-wide edges), with transformers'
//! float32 logits for a fixed input on each.
//!
//! Checked: the sharded and FP8 layouts open, the MTP module is seeded (and required, it
//! is named as missing), and flotilla's logits on the loaded weights match transformers'
//! (`max |Δ| / max |ref| < 1e-5`).

use flotilla_model::Model;
use flotilla_model::checkpoint::{CheckpointError, HfReader, MtpPolicy, fill_from_reader};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use std::path::{Path, PathBuf};

const LOGITS_TOL: f64 = 1e-5;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_checkpoints")
}

/// `input_ids` and the two logits tensors of `reference.safetensors`.
fn reference() -> (Vec<u32>, Vec<f32>, Vec<f32>) {
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("input_ids").unwrap();
    assert_eq!(ids.dtype(), Dtype::I64);
    let ids = ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect();
    let f32s = |name: &str| -> Vec<f32> {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    };
    (ids, f32s("logits_bf16"), f32s("logits_fp8"))
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|&y| (y as f64).abs()).fold(0.0, f64::max);
    assert!(scale > 0.0);
    diff / scale
}

/// The model of fixture `name` with its weights, the MTP module seeded.
fn loaded(name: &str) -> (HfReader, Model<f32>) {
    let reader = HfReader::open(&fixtures().join(name)).unwrap();
    let config = reader.config().clone();
    assert_eq!(config.num_nextn_predict_layers, 1, "{name}: the config has an MTP module");
    let mut model = Model::<f32>::new(&config, 0, false).unwrap();
    let report = fill_from_reader(&reader, &mut model.params_mut(), MtpPolicy::SeedIfAbsent).unwrap();
    assert!(!report.seeded.is_empty(), "{name}: transformers saved no MTP tensor");
    assert!(report.seeded.iter().all(|n| n.starts_with("model.layers.2.")), "{:?}", report.seeded);
    assert_eq!(report.loaded + report.seeded.len(), model.params().len());
    (reader, model)
}

#[test]
fn transformers_sharded_checkpoint_without_mtp_gives_its_logits() {
    let (reader, model) = loaded("sharded_bf16");
    assert_eq!(reader.files().len(), 8, "save_pretrained's shards");
    let (ids, expected, _) = reference();
    let err = rel_err(&model.logits(&ids, 2).unwrap(), &expected);
    eprintln!("bf16 shards: logits relative error {err:.3e}");
    assert!(err < LOGITS_TOL, "{err:e}");

    // Requiring the MTP module names its first tensor as missing.
    let mut again = Model::<f32>::new(reader.config(), 0, false).unwrap();
    match fill_from_reader(&reader, &mut again.params_mut(), MtpPolicy::Require) {
        Err(CheckpointError::Tensor { tensor, detail, .. }) => {
            assert!(tensor.starts_with("model.layers.2."), "{tensor}");
            assert!(detail.contains("missing"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn deepseek_fp8_checkpoint_with_partial_blocks_gives_its_logits() {
    let (reader, model) = loaded("sharded_fp8");
    assert!(reader.files().len() > 1);
    let up = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(reader.shape(up), Some(&[160, 144][..]));
    assert_eq!(
        reader.shape(&format!("{up}_scale_inv")),
        Some(&[2, 2][..]),
        "a full and a partial block each way"
    );
    let (ids, _, expected) = reference();
    let err = rel_err(&model.logits(&ids, 2).unwrap(), &expected);
    eprintln!("FP8 shards: logits relative error {err:.3e}");
    assert!(err < LOGITS_TOL, "{err:e}");
    // The FP8 weights are a quantization of the bf16 ones, not the same values.
    let (_, fp8) = reader.tensor(up).unwrap();
    let (_, bf16) = HfReader::open(&fixtures().join("sharded_bf16")).unwrap().tensor(up).unwrap();
    assert_ne!(fp8, bf16);
    assert!(rel_err(&fp8, &bf16) < 0.07, "E4M3 keeps 3 mantissa bits");
}
