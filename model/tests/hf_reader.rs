//! HF-layout checkpoints as they come: sharded writing like `save_pretrained` (sizes,
//! names, index), the lazy reader (only the tensors asked for are decoded: one rank of a
//! 4-rank pipeline × expert layout reads its share), checkpoints without MTP, and every
//! error naming the file and the tensor.

use flotilla_model::checkpoint::NamedTensor;
use flotilla_model::checkpoint::{
    CheckpointError, HfReader, INDEX_FILE, MtpPolicy, WEIGHTS_FILE, WeightDtype, fill_from_reader, load_hf,
    parse_shard_size, save_hf_sharded, shard_file_name,
};
use flotilla_model::config::ModelConfig;
use flotilla_model::model::Model;
use flotilla_model::moe::ExpertShard;
use flotilla_model::param::Param;
use flotilla_model::pipeline::{RankModel, StageLayout};
use flotilla_model::train::save_model;
use flotilla_model::{Precision, Preset};
use safetensors::tensor::{Dtype, TensorView};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-hfreader-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn tiny() -> ModelConfig {
    Preset::Tiny.config()
}

fn weights_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors") || n == INDEX_FILE)
        .collect();
    names.sort();
    names
}

#[test]
fn shard_sizes_parse_like_transformers() {
    assert_eq!(parse_shard_size("5GB"), Ok(5_000_000_000));
    assert_eq!(parse_shard_size("500MB"), Ok(500_000_000));
    assert_eq!(parse_shard_size("10KiB"), Ok(10 * 1024));
    assert_eq!(parse_shard_size("2gib"), Ok(2 << 30));
    assert_eq!(parse_shard_size("1.5KB"), Ok(1500));
    assert_eq!(parse_shard_size("123456"), Ok(123_456));
    for bad in ["", "GB", "five GB", "0", "-1MB", "5 PB"] {
        let err = parse_shard_size(bad).unwrap_err();
        assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
    }
}

/// A model over `max_shard_size` is written as `model-0000i-of-0000N.safetensors` shards
/// (each within the limit unless one tensor alone exceeds it), with an index whose
/// `total_size` is the stored bytes and whose `weight_map` names every tensor's file; it
/// reads back to the same values, and a later save that fits one file replaces the shards.
#[test]
fn sharded_save_splits_like_save_pretrained_and_reads_back() {
    let config = tiny();
    let model = Model::<f32>::new(&config, 7, false).unwrap();
    let dir = temp_dir("sharded");
    let limit = 100_000;
    let files = save_model(&model, &dir, WeightDtype::F32, limit).unwrap();
    let count = files.len();
    assert!(count > 3, "{count} shards");
    for (i, f) in files.iter().enumerate() {
        assert_eq!(f.file_name().unwrap().to_str().unwrap(), shard_file_name(i, count));
    }
    assert_eq!(shard_file_name(0, 12), "model-00001-of-00012.safetensors");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
    let reader = HfReader::open(&dir).unwrap();
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), reader.total_bytes());
    let weight_map = index["weight_map"].as_object().unwrap();
    assert_eq!(weight_map.len(), reader.names().count());
    // Every shard's tensors fit the limit, except a tensor that alone exceeds it.
    for f in &files {
        let r = std::fs::read(f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&r).unwrap();
        let bytes: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
        assert!(bytes as u64 <= limit || st.len() == 1, "{}: {bytes} bytes", f.display());
    }
    assert!(weight_map.values().all(|f| files.iter().any(|p| p.ends_with(f.as_str().unwrap()))));

    let mut loaded = Model::<f32>::new(&config, 8, false).unwrap();
    let report = fill_from_reader(&reader, &mut loaded.params_mut(), MtpPolicy::Require).unwrap();
    assert_eq!(report.loaded, model.params().len());
    assert!(report.seeded.is_empty());
    for (a, b) in model.params().iter().zip(loaded.params()) {
        assert_eq!(a.value, b.value, "{}", a.name);
    }
    assert_eq!(reader.bytes_decoded(), model.params().iter().map(|p| 4 * p.len() as u64).sum::<u64>());

    // One file when it fits: the shards and the index of the earlier save are gone.
    drop(reader);
    let files = save_model(&model, &dir, WeightDtype::Bf16, u64::MAX).unwrap();
    assert_eq!(files, vec![dir.join(WEIGHTS_FILE)]);
    assert_eq!(weights_files(&dir), vec![WEIGHTS_FILE.to_string()]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// FP8 with 128×128 block scales, shapes not multiples of 128 (full and partial blocks),
/// written in shards and read back: the reader dequantizes each weight with its scales
/// whichever shard each lands in.
#[test]
fn fp8_shards_dequantize_with_partial_blocks() {
    let mut config = tiny();
    config.hidden_size = 200; // 200 = one full block and a partial one
    config.intermediate_size = 300;
    let model = Model::<f32>::new(&config, 3, false).unwrap();
    let dir = temp_dir("fp8");
    let files = save_model(&model, &dir, WeightDtype::Fp8, 150_000).unwrap();
    assert!(files.len() > 2);
    let reader = HfReader::open(&dir).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    assert_eq!(reader.shape(name), Some(&[300, 200][..]));
    assert_eq!(reader.shape(&format!("{name}_scale_inv")), Some(&[3, 2][..]));
    let whole = load_hf(&dir).unwrap();
    let (_, values) = reader.tensor(name).unwrap();
    assert_eq!(values, whole.tensors[name].1);
    let original = model.params().into_iter().find(|p| p.name == name).unwrap().value.host();
    let max_err = values.iter().zip(original).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    let max_abs = original.iter().map(|v| v.abs()).fold(0.0, f32::max);
    assert!(max_err > 0.0 && max_err <= max_abs / 8.0, "E4M3 rounding: {max_err} of {max_abs}");
    assert!(!whole.tensors.contains_key(&format!("{name}_scale_inv")), "scales fold into their weights");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Each rank of a 4-rank layout (2 pipeline stages × 2 expert shards) decodes exactly the
/// tensors it holds from a multi-shard checkpoint: its counter equals its tensors' stored
/// bytes, which is well under the checkpoint's, and the four ranks' tensors cover the
/// model; their values equal the whole model's.
#[test]
fn each_rank_of_a_pipeline_expert_layout_decodes_only_its_tensors() {
    let config = tiny();
    let model = Model::<f32>::new(&config, 11, false).unwrap();
    let dir = temp_dir("ranks");
    let files = save_model(&model, &dir, WeightDtype::Bf16, 200_000).unwrap();
    assert!(files.len() >= 4, "{} shards", files.len());
    let whole: std::collections::HashMap<&str, &[f32]> =
        model.params().into_iter().map(|p| (p.name.as_str(), p.value.host())).collect();
    let mut covered = BTreeSet::new();
    let total = HfReader::open(&dir).unwrap().total_bytes();
    for stage in 0..2 {
        for ep_rank in 0..2 {
            let layout = StageLayout::new(&config, &[2, 2]).unwrap();
            let shard = ExpertShard { rank: ep_rank, size: 2 };
            let mut rank =
                RankModel::<f32>::new(&config, layout, &[stage], shard, 99, false, Precision::Fp32).unwrap();
            let reader = HfReader::open(&dir).unwrap();
            assert_eq!(reader.bytes_decoded(), 0, "opening decodes nothing");
            let report = fill_from_reader(&reader, &mut rank.params_mut(), MtpPolicy::Require).unwrap();
            let held: u64 = rank.params().iter().map(|p| 2 * p.len() as u64).sum();
            assert_eq!(report.loaded, rank.params().len());
            assert_eq!(reader.bytes_decoded(), held, "stage {stage}, EP rank {ep_rank}");
            assert!(held * 2 < total, "a rank's share ({held} B) is well under the checkpoint ({total} B)");
            for p in rank.params() {
                let expected: Vec<f32> =
                    whole[p.name.as_str()].iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
                assert_eq!(p.value.host(), expected, "{}", p.name);
                covered.insert(p.name.clone());
            }
        }
    }
    let all: BTreeSet<String> = model.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(covered, all, "the four ranks hold the whole model");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A checkpoint without the MTP module (as transformers saves): `Require` names the first
/// missing MTP tensor and changes nothing; `SeedIfAbsent` loads the rest and leaves the MTP
/// module at its seeded init; some MTP tensors without the others is an error.
#[test]
fn checkpoints_without_mtp_seed_it_or_say_what_is_missing() {
    let config = tiny();
    let model = Model::<f32>::new(&config, 5, false).unwrap();
    let layers = config.num_hidden_layers;
    let prefix = format!("model.layers.{layers}.");
    let dir = temp_dir("no-mtp");
    let main: Vec<_> = model.params().into_iter().filter(|p| !p.name.starts_with(&prefix)).collect();
    save_hf_sharded(&dir, &config, &named(&main), WeightDtype::F32, 300_000).unwrap();
    let reader = HfReader::open(&dir).unwrap();

    let fresh = Model::<f32>::new(&config, 9, false).unwrap();
    let mut target = Model::<f32>::new(&config, 9, false).unwrap();
    match fill_from_reader(&reader, &mut target.params_mut(), MtpPolicy::Require) {
        Err(CheckpointError::Tensor { tensor, detail, path }) => {
            assert!(tensor.starts_with(&prefix), "{tensor}");
            assert!(detail.contains("missing"), "{detail}");
            assert_eq!(path, dir);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(reader.bytes_decoded(), 0, "checked before anything is decoded");
    for (a, b) in fresh.params().iter().zip(target.params()) {
        assert_eq!(a.value, b.value, "nothing changed: {}", a.name);
    }

    let report = fill_from_reader(&reader, &mut target.params_mut(), MtpPolicy::SeedIfAbsent).unwrap();
    assert_eq!(report.loaded, main.len());
    assert!(!report.seeded.is_empty() && report.seeded.iter().all(|n| n.starts_with(&prefix)));
    for ((a, b), c) in model.params().iter().zip(target.params()).zip(fresh.params()) {
        let expected = if a.name.starts_with(&prefix) { c.value.host() } else { a.value.host() };
        assert_eq!(b.value.host(), expected, "{}", a.name);
    }

    // Half an MTP module is neither loadable nor seedable.
    let mut partial = main.clone();
    partial.extend(model.params().into_iter().filter(|p| p.name == format!("{prefix}enorm.weight")));
    save_hf_sharded(&dir, &config, &named(&partial), WeightDtype::F32, u64::MAX).unwrap();
    let reader = HfReader::open(&dir).unwrap();
    let err = fill_from_reader(&reader, &mut target.params_mut(), MtpPolicy::SeedIfAbsent).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("1 of the") && text.contains("loaded whole or initialized whole"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn named<'a>(ps: &[&'a Param<f32>]) -> Vec<NamedTensor<'a>> {
    ps.iter().map(|p| NamedTensor { name: &p.name, shape: &p.shape, data: p.value.host() }).collect()
}

fn write_raw(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(&str, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn error_of(dir: &Path) -> CheckpointError {
    HfReader::open(dir).unwrap_err()
}

/// Every way a checkpoint can be broken, each error naming the file and the tensor.
#[test]
fn broken_checkpoints_name_the_file_and_the_tensor() {
    let config = tiny();
    let dir = temp_dir("broken");
    let model = Model::<f32>::new(&config, 1, false).unwrap();
    save_model(&model, &dir, WeightDtype::F32, 400_000).unwrap();
    let index_path = dir.join(INDEX_FILE);
    let index_text = std::fs::read_to_string(&index_path).unwrap();
    let second = shard_file_name(1, weights_files(&dir).len() - 1);

    // An index naming a shard that is not there.
    std::fs::rename(dir.join(&second), dir.join("moved")).unwrap();
    let text = error_of(&dir).to_string();
    assert!(text.contains(INDEX_FILE) && text.contains(&second) && text.contains("does not exist"), "{text}");
    std::fs::rename(dir.join("moved"), dir.join(&second)).unwrap();

    // A truncated shard: the first tensor whose data runs past the end is named.
    let bytes = std::fs::read(dir.join(&second)).unwrap();
    std::fs::write(dir.join(&second), &bytes[..bytes.len() - 10]).unwrap();
    match error_of(&dir) {
        CheckpointError::Tensor { path, tensor, detail } => {
            assert_eq!(path, dir.join(&second));
            assert!(!tensor.is_empty());
            assert!(detail.contains("truncated"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    // Truncated inside the header.
    std::fs::write(dir.join(&second), &bytes[..20]).unwrap();
    let text = error_of(&dir).to_string();
    assert!(text.contains(&second) && text.contains("truncated"), "{text}");
    std::fs::write(dir.join(&second), &bytes).unwrap();

    // An index mapping a tensor to a file that does not hold it.
    let index: serde_json::Value = serde_json::from_str(&index_text).unwrap();
    let (name, file) = index["weight_map"].as_object().unwrap().iter().next().unwrap();
    let moved = index_text.replacen(
        &format!("\"{name}\": \"{}\"", file.as_str().unwrap()),
        &format!("\"{name}\": \"{second}\""),
        1,
    );
    assert_ne!(moved, index_text);
    std::fs::write(&index_path, &moved).unwrap();
    let text = error_of(&dir).to_string();
    assert!(text.contains(name.as_str()) && text.contains(&second), "{text}");
    std::fs::write(&index_path, "{\"metadata\": {}}").unwrap();
    let text = error_of(&dir).to_string();
    assert!(text.contains(INDEX_FILE) && text.contains("weight_map"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();

    // Without an index: a tensor in two files; dtype, shape and scale errors on use.
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_hf_json()).unwrap();
    let norm = "model.norm.weight";
    let f32s = |n: usize| vec![0u8; 4 * n];
    write_raw(&dir.join("a.safetensors"), &[(norm, Dtype::F32, vec![128], f32s(128))]);
    write_raw(&dir.join("b.safetensors"), &[(norm, Dtype::F32, vec![128], f32s(128))]);
    match error_of(&dir) {
        CheckpointError::Tensor { path, tensor, detail } => {
            assert_eq!(tensor, norm);
            assert_eq!(path, dir.join("b.safetensors"));
            assert!(detail.contains("a.safetensors"), "{detail}");
        }
        other => panic!("{other:?}"),
    }
    let w = "model.layers.0.mlp.up_proj.weight";
    write_raw(
        &dir.join("b.safetensors"),
        &[
            ("model.layers.0.input_layernorm.weight", Dtype::I32, vec![128], f32s(128)),
            (w, Dtype::F8_E4M3, vec![384, 128], vec![0; 384 * 128]),
            ("model.layers.0.mlp.up_proj.weight_scale_inv", Dtype::F32, vec![3, 2], f32s(6)),
            ("model.layers.0.mlp.down_proj.weight", Dtype::F8_E4M3, vec![128, 384], vec![0; 384 * 128]),
        ],
    );
    let reader = HfReader::open(&dir).unwrap();
    let b = dir.join("b.safetensors");
    let cases = [
        ("model.layers.0.input_layernorm.weight", vec![128], &b, "dtype I32 is not supported"),
        (norm, vec![64], &dir.join("a.safetensors"), "has shape [128]"),
        ("model.layers.0.mlp.up_proj.weight_scale_inv", vec![3, 2], &b, "must be F32 of shape [3, 1]"),
        (
            "model.layers.0.mlp.down_proj.weight",
            vec![128, 384],
            &b,
            "`model.layers.0.mlp.down_proj.weight_scale_inv` (its block scales) is missing",
        ),
        ("lm_head.weight", vec![256, 128], &dir, "missing from the checkpoint"),
    ];
    for (tensor, shape, file, needle) in cases {
        let asked = if tensor.ends_with("_scale_inv") { w } else { tensor };
        let shape = if asked == w { vec![384, 128] } else { shape };
        let err = reader.check(asked, &shape).unwrap_err();
        let text = err.to_string();
        assert!(text.contains(needle), "{asked}: {text}");
        match err {
            CheckpointError::Tensor { path, tensor: named, .. } => {
                assert_eq!(&path, file, "{asked}");
                assert_eq!(named, tensor);
            }
            other => panic!("{other:?}"),
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
