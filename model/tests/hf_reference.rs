//! flotilla's model against Hugging Face transformers' `DeepseekV3ForCausalLM`.
//!
//! The fixtures under `tests/fixtures/hf/<name>/` are written by `tools/hf_reference.py`
//! (transformers 5.24.0, torch 2.15.0, float32; not run by CI): `checkpoint/` is a small
//! random model as `save_pretrained` writes it, `reference.json` holds the two input
//! sequences (12 tokens each), HF's `labels = input_ids` loss and the names of the
//! parameters whose gradients `reference.safetensors` holds next to the logits
//! `[2, 12, vocab]`. The script also checks HF against an independent float64
//! implementation of DeepSeek's reference code on the saved tensors (see its docstring).
//!
//! Each fixture is loaded with [`load_hf`] + [`fill_params`], unchanged: DeepSeek's
//! checkpoints store the rope rows of `q_b_proj`/`q_proj` and `kv_a_proj_with_mqa` in
//! DeepSeek's interleaved-pair layout, HF's default `rope_interleave = true` rotates those
//! pairs and only writes the result de-interleaved (the same permutation on queries and
//! keys, so every attention score is DeepSeek's), and flotilla rotates the same pairs in
//! place: no row permutation is needed (`kernels/src/rope.rs` documents the permutation a
//! half-split checkpoint would need).
//!
//! Checked per fixture: logits (`max |Δ| / max |ref| < 1e-5`), the main cross-entropy
//! against HF's loss (relative 1e-5), and the listed gradients (`max |Δ| / max |ref| <
//! 1e-4`) from [`Model::forward_backward`] with λ = 0 and α = 0 (no MTP module in these
//! configs; HF has no sequence-wise balance loss). Windows are the 12-token sequences with
//! `seq_len = 11`, so the main CE is HF's mean over the 2 × 11 shifted positions.

use flotilla_model::checkpoint::{HfCheckpoint, fill_params, load_hf};
use flotilla_model::{LossConfig, Model};
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FIXTURES: [&str; 2] = ["lowrank_rope", "plainq_yarn"];
const LOGITS_TOL: f64 = 1e-5;
const LOSS_TOL: f64 = 1e-5;
const GRAD_TOL: f64 = 1e-4;
const THREADS: usize = 2;

fn fixture_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

/// What `reference.json` and `reference.safetensors` hold.
struct Reference {
    input_ids: Vec<Vec<u32>>,
    loss: f64,
    grads: Vec<String>,
    /// `logits` and `grad.<name>`, f32, with their shapes.
    tensors: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
}

fn read_reference(name: &str) -> Reference {
    let dir = fixture_dir(name);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let input_ids = json["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|seq| seq.as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect())
        .collect();
    let grads = json["grads"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect();
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(n, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}: reference tensor {n}");
            let values =
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (n, (view.shape().to_vec(), values))
        })
        .collect();
    Reference { input_ids, loss: json["loss"].as_f64().unwrap(), grads, tensors }
}

/// The fixture's checkpoint through [`load_hf`], as `save_pretrained` wrote it
/// (transformers 5's `rope_parameters` form of the RoPE keys included).
fn load_checkpoint(name: &str) -> HfCheckpoint {
    load_hf(&fixture_dir(name).join("checkpoint")).unwrap()
}

/// `max |a − b| / max |b|`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).abs()).fold(0.0, f64::max);
    let scale = b.iter().map(|&y| (y as f64).abs()).fold(0.0, f64::max);
    assert!(scale > 0.0, "reference is all zeros");
    diff / scale
}

/// The model of the fixture with the checkpoint's weights, every parameter filled and
/// every checkpoint tensor used.
fn model_of(name: &str) -> Model<f32> {
    let ckpt = load_checkpoint(name);
    assert_eq!(ckpt.config.num_nextn_predict_layers, 0, "{name}: the fixtures have no MTP module");
    let mut model = Model::<f32>::new(&ckpt.config, 0, false).unwrap();
    let names: Vec<String> = model.params().iter().map(|p| p.name.clone()).collect();
    let unused: Vec<&String> = ckpt.tensors.keys().filter(|k| !names.contains(k)).collect();
    assert!(unused.is_empty(), "{name}: checkpoint tensors the model does not have: {unused:?}");
    fill_params(&mut model.params_mut(), &ckpt).unwrap();
    model
}

fn no_extra_losses() -> LossConfig {
    LossConfig { mtp_lambda: 0.0, balance_alpha: 0.0 }
}

#[test]
fn fixture_configs_are_the_intended_ones() {
    let lowrank = load_checkpoint("lowrank_rope").config;
    assert_eq!(lowrank.q_lora_rank, Some(16));
    assert!(lowrank.rope_scaling.is_none());
    let yarn = load_checkpoint("plainq_yarn").config;
    assert_eq!(yarn.q_lora_rank, None);
    let scaling = yarn.rope_scaling.as_ref().expect("YaRN");
    assert_eq!((scaling.factor, scaling.original_max_position_embeddings), (4.0, 16));
    // YaRN applies only past the original context; HF applies it whenever it is configured.
    assert!(yarn.max_position_embeddings > scaling.original_max_position_embeddings);
    for config in [&lowrank, &yarn] {
        assert_eq!((config.num_hidden_layers, config.first_k_dense_replace), (3, 1));
        assert_eq!((config.n_routed_experts, config.n_group, config.topk_group), (8, 4, 2));
        assert_eq!(config.rms_norm_eps, 1e-6);
    }
}

#[test]
fn logits_match_transformers() {
    for name in FIXTURES {
        let model = model_of(name);
        let reference = read_reference(name);
        let (shape, expected) = &reference.tensors["logits"];
        let vocab = model.config().vocab_size;
        assert_eq!(shape, &[reference.input_ids.len(), reference.input_ids[0].len(), vocab]);
        let mut logits = Vec::with_capacity(expected.len());
        for seq in &reference.input_ids {
            logits.extend(model.logits(seq, THREADS).unwrap());
        }
        let err = rel_err(&logits, expected);
        eprintln!("{name}: logits relative error {err:.3e}");
        assert!(err < LOGITS_TOL, "{name}: logits relative error {err:e} ≥ {LOGITS_TOL:e}");
    }
}

#[test]
fn loss_and_gradients_match_transformers() {
    for name in FIXTURES {
        let mut model = model_of(name);
        let reference = read_reference(name);
        let seq_len = reference.input_ids[0].len() - 1;
        let windows = &reference.input_ids;

        let stats = model.loss(windows, seq_len, &no_extra_losses(), THREADS).unwrap();
        let loss_err = (stats.main_ce - reference.loss).abs() / reference.loss.abs();
        eprintln!("{name}: loss {} vs HF {} (relative error {loss_err:.3e})", stats.main_ce, reference.loss);
        assert!(loss_err < LOSS_TOL, "{name}: loss {} vs HF {}", stats.main_ce, reference.loss);
        assert_eq!(stats.loss, stats.main_ce, "{name}: no loss term besides the main CE");

        model.zero_grad();
        let trained = model.forward_backward(windows, seq_len, &no_extra_losses(), THREADS).unwrap();
        assert_eq!(trained.loss, stats.loss, "{name}: forward_backward reports the loss of loss()");
        let params = model.params();
        for grad_name in &reference.grads {
            let param = params
                .iter()
                .find(|p| &p.name == grad_name)
                .unwrap_or_else(|| panic!("{name}: the model has no parameter {grad_name}"));
            let (shape, expected) = &reference.tensors[&format!("grad.{grad_name}")];
            assert_eq!(shape, &param.shape, "{name}: {grad_name}");
            let err = rel_err(param.grad.host(), expected);
            eprintln!("{name}: d{grad_name} relative error {err:.3e}");
            assert!(err < GRAD_TOL, "{name}: gradient of {grad_name}: relative error {err:e} ≥ {GRAD_TOL:e}");
        }
    }
}
