//! Layout-free checkpoint shards: a trainer resumed from shards takes the uninterrupted
//! run's steps bit for bit, under any number of shards; pieces of one tensor spread over
//! shards reassemble, and gaps, overlaps, corrupt, truncated or missing files, another
//! model or another seed are refused naming the tensor, file or field (the trainer left
//! unchanged). Also DeepSeek's FP8 export of the HF layout, read back by `load_hf`.

use flotilla_kernels::fp8::E4M3_TO_F32;
use flotilla_kernels::quant::{Granularity, QuantConfig, quantize};
use flotilla_model::checkpoint::{WeightDtype, is_fp8_weight, load_hf};
use flotilla_model::shard::{
    CheckpointReader, Piece, PieceData, PieceKind, SHARD_FORMAT, ShardError, ShardFile, ShardHeader,
    Snapshot, shard_file_name, step_dir, write_shard,
};
use flotilla_model::train::{StepRecord, TrainConfig, TrainError, Trainer};
use flotilla_model::{ModelConfig, Preset};
use half::bf16;
use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-shard-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A tiny run: `seed`, and `model_extra` lines added to the `[model]` table.
fn trainer_with(seed: u64, model_extra: &str) -> Trainer {
    let text = format!(
        r#"
seed = {seed}
steps = 4
batch_size = 4
seq_len = 16
threads = 2

[model]
preset = "tiny"
{model_extra}

[data]
kind = "synthetic"
tokens = 65536

[optimizer]
peak_lr = 3e-3
warmup_steps = 2
constant_steps = 10
decay_steps = 0
final_lr = 3e-3

[loss]
mtp_lambda = 0.3
balance_alpha = 1e-4
"#
    );
    let (config, model) = TrainConfig::from_toml(&text, Path::new(".")).unwrap();
    Trainer::new(config, &model).unwrap()
}

fn trainer() -> Trainer {
    trainer_with(5, "")
}

fn steps(trainer: &mut Trainer, n: usize) -> Vec<StepRecord> {
    (0..n).map(|_| trainer.train_step().unwrap()).collect()
}

/// What must repeat bit for bit: the step, the loss (and its parts) and the gradient norm.
fn bits(records: &[StepRecord]) -> Vec<(u64, u64, u64, u64)> {
    records.iter().map(|r| (r.step, r.loss.to_bits(), r.main_ce.to_bits(), r.grad_norm.to_bits())).collect()
}

/// Writes `world` shards of `trainer`'s state into `dir`.
fn write_all(trainer: &Trainer, dir: &Path, world: usize) -> Vec<ShardFile> {
    (0..world).map(|r| write_shard(dir, &trainer.snapshot(r, world)).unwrap()).collect()
}

/// The whole state as bits: every tensor's values, and its moments where it has them
/// (from a world-1 snapshot, which holds everything).
fn state_bits(trainer: &Trainer) -> Vec<(String, PieceKind, Vec<u32>)> {
    let mut out: Vec<_> = trainer
        .snapshot(0, 1)
        .pieces
        .into_iter()
        .map(|p| {
            let bits = match p.data {
                PieceData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
                PieceData::Bf16(v) => v.iter().map(|x| x.to_bits() as u32).collect(),
            };
            (p.name, p.kind, bits)
        })
        .collect();
    out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    out
}

#[test]
fn restored_trainer_takes_the_uninterrupted_steps_bit_for_bit() {
    let mut whole = trainer();
    let uninterrupted = steps(&mut whole, 4);

    let mut first = trainer();
    let before = steps(&mut first, 2);
    assert_eq!(bits(&before), bits(&uninterrupted[..2]));
    let root = temp_dir("resume");
    let dir = step_dir(&root, first.step());
    assert!(dir.ends_with("step-00000002"), "{}", dir.display());
    let files = write_all(&first, &dir, 2);
    assert_eq!(files[0].file, "shard-00000-of-00002.safetensors");
    assert_eq!(files[1].file, shard_file_name(1, 2));
    for f in &files {
        let bytes = std::fs::read(dir.join(&f.file)).unwrap();
        assert_eq!(bytes.len() as u64, f.bytes);
        assert_eq!(crc32fast::hash(&bytes), f.crc32);
        assert!(!dir.join(format!("{}.tmp", f.file)).exists());
    }

    // The two ranks' shares are disjoint and together hold every tensor of the model.
    let shares: Vec<BTreeSet<String>> = (0..2)
        .map(|r| {
            first
                .snapshot(r, 2)
                .pieces
                .iter()
                .filter(|p| p.kind == PieceKind::Value)
                .map(|p| p.name.clone())
                .collect()
        })
        .collect();
    assert!(!shares[0].is_empty() && !shares[1].is_empty());
    assert!(shares[0].is_disjoint(&shares[1]));
    let all: BTreeSet<String> = first.model.params().iter().map(|p| p.name.clone()).collect();
    assert_eq!(shares[0].union(&shares[1]).cloned().collect::<BTreeSet<_>>(), all);

    let reader = CheckpointReader::open(&dir, &files).unwrap();
    assert_eq!(reader.step(), 2);
    assert_eq!(reader.seed(), 5);
    assert_eq!(reader.model(), first.model.config());
    assert_eq!(reader.value_names(), all.iter().cloned().collect::<Vec<_>>());
    let bias = all.iter().find(|n| n.ends_with("e_score_correction_bias")).unwrap();
    assert!(
        reader.values(bias, 16).unwrap().iter().any(|&b| b != 0.0),
        "selection biases are saved after their updates"
    );
    assert!(matches!(reader.moments(bias, 16), Err(ShardError::Coverage { .. })), "biases have no moments");

    let mut resumed = trainer();
    resumed.restore(&reader).unwrap();
    assert_eq!(resumed.step(), 2);
    assert_eq!(state_bits(&resumed), state_bits(&first));
    let after = steps(&mut resumed, 2);
    assert_eq!(bits(&after), bits(&uninterrupted[2..]));
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn any_number_of_shards_restores_the_same_state() {
    let mut source = trainer();
    steps(&mut source, 2);
    let root = temp_dir("reshard");
    let mut restored = Vec::new();
    for world in [1usize, 3] {
        let dir = root.join(format!("world-{world}"));
        let files = write_all(&source, &dir, world);
        let snapshots: Vec<Snapshot> = (0..world).map(|r| source.snapshot(r, world)).collect();
        assert!(snapshots.iter().all(|s| !s.pieces.is_empty()), "every rank gets tensors");
        let reader = CheckpointReader::open(&dir, &files).unwrap();
        let mut target = trainer();
        assert_ne!(state_bits(&target), state_bits(&source));
        target.restore(&reader).unwrap();
        restored.push(state_bits(&target));
    }
    assert_eq!(restored[0], state_bits(&source));
    assert_eq!(restored[1], restored[0]);
    // The dealing balances bytes: no rank holds more than half of the state.
    let bytes = |s: &Snapshot| {
        s.pieces
            .iter()
            .map(|p| match &p.data {
                PieceData::F32(v) => 4 * v.len(),
                PieceData::Bf16(v) => 2 * v.len(),
            })
            .sum::<usize>()
    };
    let total: usize = bytes(&source.snapshot(0, 1));
    for r in 0..3 {
        assert!(bytes(&source.snapshot(r, 3)) < total / 2, "rank {r}");
    }
    std::fs::remove_dir_all(&root).unwrap();
}

fn header(rank: u32, world: u32) -> ShardHeader {
    ShardHeader { step: 7, rank, world, seed: 1, model: Preset::Tiny.config() }
}

fn value(name: &str, shape: &[usize], start: usize, data: &[f32]) -> Piece {
    Piece {
        name: name.into(),
        kind: PieceKind::Value,
        start,
        shape: shape.to_vec(),
        data: PieceData::F32(data.to_vec()),
    }
}

fn moment(name: &str, kind: PieceKind, shape: &[usize], start: usize, data: &[f32]) -> Piece {
    Piece {
        name: name.into(),
        kind,
        start,
        shape: shape.to_vec(),
        data: PieceData::Bf16(data.iter().map(|&x| bf16::from_f32(x)).collect()),
    }
}

/// Writes two shards (ranks 0 and 1 of 2) with the given pieces into a fresh `dir`.
fn two_shards(dir: &Path, a: Vec<Piece>, b: Vec<Piece>) -> Vec<ShardFile> {
    let _ = std::fs::remove_dir_all(dir);
    vec![
        write_shard(dir, &Snapshot { header: header(0, 2), pieces: a }).unwrap(),
        write_shard(dir, &Snapshot { header: header(1, 2), pieces: b }).unwrap(),
    ]
}

#[test]
fn pieces_across_shards_reassemble_and_gaps_and_overlaps_are_named() {
    let root = temp_dir("pieces");
    let dir = root.join("ok");
    let name = "model.layers.0.mlp.up_proj.weight";
    let shape = [2, 5];
    let full: Vec<f32> = (0..10).map(|i| i as f32 * 0.25 - 1.0).collect();
    let files = two_shards(
        &dir,
        vec![
            value(name, &shape, 6, &full[6..]),
            moment(name, PieceKind::ExpAvg, &shape, 0, &full),
            moment(name, PieceKind::ExpAvgSq, &shape, 0, &full[..3]),
            value("model.norm.weight", &[3], 0, &[1.0, 2.0, 3.0]),
        ],
        vec![value(name, &shape, 0, &full[..6]), moment(name, PieceKind::ExpAvgSq, &shape, 3, &full[3..])],
    );
    // The partial pieces are 1-D `name@start` keys, the whole ones keep the tensor's shape.
    let bytes = std::fs::read(dir.join(&files[0].file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut keys = st.names();
    keys.sort();
    assert_eq!(
        keys,
        [
            "model.layers.0.mlp.up_proj.weight.exp_avg",
            "model.layers.0.mlp.up_proj.weight.exp_avg_sq@0",
            "model.layers.0.mlp.up_proj.weight@6",
            "model.norm.weight",
        ]
    );
    assert_eq!(st.tensor("model.layers.0.mlp.up_proj.weight@6").unwrap().shape(), [4]);
    assert_eq!(st.tensor("model.layers.0.mlp.up_proj.weight.exp_avg").unwrap().shape(), [2, 5]);
    assert_eq!(st.tensor("model.layers.0.mlp.up_proj.weight.exp_avg").unwrap().dtype(), Dtype::BF16);
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    assert_eq!(meta["format"], SHARD_FORMAT);
    assert_eq!(meta["step"], "7");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&meta["shapes"]).unwrap(),
        serde_json::json!({ name: [2, 5], "model.norm.weight": [3] })
    );

    let reader = CheckpointReader::open(&dir, &files).unwrap();
    assert_eq!(reader.values(name, 10).unwrap(), full);
    let rounded: Vec<bf16> = full.iter().map(|&x| bf16::from_f32(x)).collect();
    assert_eq!(reader.moments(name, 10).unwrap(), (rounded.clone(), rounded));
    assert_eq!(reader.shape(name), Some(&shape[..]));
    assert_eq!(reader.value_names(), [name, "model.norm.weight"]);
    let err = reader.values(name, 12).unwrap_err().to_string();
    assert!(err.contains(name) && err.contains("12"), "{err}");
    let err = reader.values("model.layers.9.nothing", 3).unwrap_err();
    assert!(matches!(err, ShardError::NotInCheckpoint { .. }));
    assert_eq!(err.to_string(), "tensor `model.layers.9.nothing` is not in the checkpoint");

    // A gap: elements 6..7 are in no shard.
    let dir = root.join("gap");
    let files =
        two_shards(&dir, vec![value(name, &shape, 0, &full[..6])], vec![value(name, &shape, 7, &full[7..])]);
    let err = CheckpointReader::open(&dir, &files).unwrap().values(name, 10).unwrap_err();
    assert!(matches!(err, ShardError::Coverage { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains(name) && text.contains("6..7"), "{text}");
    // Missing the tail.
    let dir = root.join("tail");
    let files =
        two_shards(&dir, vec![value(name, &shape, 0, &full[..6])], vec![value(name, &shape, 6, &full[6..9])]);
    let text = CheckpointReader::open(&dir, &files).unwrap().values(name, 10).unwrap_err().to_string();
    assert!(text.contains(name) && text.contains("9..10"), "{text}");
    // An overlap: elements 5..6 are in both shards.
    let dir = root.join("overlap");
    let files =
        two_shards(&dir, vec![value(name, &shape, 0, &full[..6])], vec![value(name, &shape, 5, &full[5..])]);
    let text = CheckpointReader::open(&dir, &files).unwrap().values(name, 10).unwrap_err().to_string();
    assert!(text.contains(name) && text.contains("5..6") && text.contains("two pieces"), "{text}");
    assert!(text.contains(&shard_file_name(0, 2)) && text.contains(&shard_file_name(1, 2)), "{text}");

    // Invalid snapshots are refused before anything is written, naming the tensor.
    let dir = root.join("invalid");
    let refuse = |pieces: Vec<Piece>, what: &str| {
        let err = write_shard(&dir, &Snapshot { header: header(0, 1), pieces }).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ShardError::Piece { .. }) && text.contains(name) && text.contains(what),
            "{text}"
        );
        assert!(!dir.join(shard_file_name(0, 1)).exists());
    };
    refuse(vec![value(name, &shape, 8, &full[..3])], "8..11");
    refuse(vec![value(name, &shape, 0, &full[..3]), value(name, &shape, 0, &full[..2])], "two value pieces");
    refuse(vec![value(name, &shape, 0, &full), value(name, &[10], 0, &full)], "two shapes");
    let mut wrong_type = moment(name, PieceKind::ExpAvg, &shape, 0, &full);
    wrong_type.kind = PieceKind::Value;
    refuse(vec![wrong_type], "F32");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn corrupt_truncated_and_missing_shards_are_named() {
    let root = temp_dir("corrupt");
    let name = "model.norm.weight";
    let full = [0.5f32, 1.5, 2.5, 3.5];
    let files =
        two_shards(&root, vec![value(name, &[4], 0, &full[..2])], vec![value(name, &[4], 2, &full[2..])]);
    assert!(CheckpointReader::open(&root, &files).is_ok());
    let second = root.join(&files[1].file);
    let good = std::fs::read(&second).unwrap();

    // A flipped byte in the data.
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    std::fs::write(&second, &flipped).unwrap();
    let err = CheckpointReader::open(&root, &files).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ShardError::Checksum { .. }), "{err:?}");
    assert!(
        text.contains("shard-00001-of-00002.safetensors") && text.contains("checksum mismatch"),
        "{text}"
    );
    assert!(text.contains(&format!("{:#010x}", files[1].crc32)), "{text}");

    // A truncated file.
    std::fs::write(&second, &good[..good.len() - 3]).unwrap();
    let err = CheckpointReader::open(&root, &files).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, ShardError::Size { .. }), "{err:?}");
    assert!(
        text.contains("shard-00001-of-00002.safetensors") && text.contains(&files[1].bytes.to_string()),
        "{text}"
    );

    // A missing file.
    std::fs::remove_file(&second).unwrap();
    let err = CheckpointReader::open(&root, &files).unwrap_err();
    assert!(matches!(err, ShardError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("shard-00001-of-00002.safetensors"), "{err}");

    // A manifest whose checksum matches garbage: the parse error names the file.
    std::fs::write(&second, b"not a shard").unwrap();
    let garbage =
        ShardFile { file: files[1].file.clone(), bytes: 11, crc32: crc32fast::hash(b"not a shard") };
    let text = CheckpointReader::open(&root, &[files[0].clone(), garbage]).unwrap_err().to_string();
    assert!(text.contains("shard-00001-of-00002.safetensors") && text.contains("not a valid"), "{text}");

    // Shards of different steps do not mix.
    std::fs::write(&second, &good).unwrap();
    let mut later = header(1, 2);
    later.step = 8;
    let other = write_shard(&root.join("later"), &Snapshot { header: later, pieces: vec![] }).unwrap();
    std::fs::copy(root.join("later").join(&other.file), &second).unwrap();
    let text = CheckpointReader::open(&root, &[files[0].clone(), other]).unwrap_err().to_string();
    assert!(text.contains("`step`") && text.contains("7") && text.contains("8"), "{text}");

    assert!(matches!(CheckpointReader::open(&root, &[]), Err(ShardError::NoShards)));
    assert_eq!(ShardError::NoShards.to_string(), "a checkpoint needs at least one shard");
    std::fs::remove_dir_all(&root).unwrap();
}

/// Asserts that `trainer`'s next step is that of a trainer that never saw a checkpoint.
fn assert_untouched(mut refused: Trainer) {
    assert_eq!(refused.step(), 0);
    let mut fresh = trainer();
    assert_eq!(state_bits(&refused), state_bits(&fresh));
    assert_eq!(bits(&steps(&mut refused, 1)), bits(&steps(&mut fresh, 1)));
}

#[test]
fn another_model_seed_or_an_incomplete_checkpoint_is_refused_and_changes_nothing() {
    let root = temp_dir("refuse");

    // Another model.
    let mut narrow = trainer_with(5, "hidden_size = 64");
    steps(&mut narrow, 1);
    let dir = root.join("narrow");
    let files = write_all(&narrow, &dir, 2);
    let reader = CheckpointReader::open(&dir, &files).unwrap();
    let mut target = trainer();
    let err = target.restore(&reader).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TrainError::Shard(ShardError::ModelMismatch { .. })), "{err:?}");
    assert_eq!(
        text, "the checkpoint was saved from a different model: `hidden_size` is 64 there, 128 here",
        "{text}"
    );
    let wide: &ModelConfig = target.model.config();
    assert!(reader.check_model(narrow.model.config()).is_ok());
    assert!(reader.check_model(wide).is_err());
    assert_untouched(target);

    // Another seed.
    let mut reseeded = trainer_with(6, "");
    steps(&mut reseeded, 1);
    let dir = root.join("seed");
    let files = write_all(&reseeded, &dir, 1);
    let mut target = trainer();
    let text = target.restore(&CheckpointReader::open(&dir, &files).unwrap()).unwrap_err().to_string();
    assert!(text.contains("`seed`") && text.contains('6') && text.contains('5'), "{text}");
    assert_untouched(target);

    // Half of the shards: the first tensors are there, a later one is not.
    let mut source = trainer();
    steps(&mut source, 1);
    let dir = root.join("half");
    let files = write_all(&source, &dir, 2);
    let reader = CheckpointReader::open(&dir, &files[..1]).unwrap();
    let missing: Vec<String> = source.snapshot(1, 2).pieces.iter().map(|p| p.name.clone()).collect();
    let mut target = trainer();
    let err = target.restore(&reader).unwrap_err();
    match &err {
        TrainError::Shard(ShardError::NotInCheckpoint { tensor }) => {
            assert!(missing.contains(tensor), "{tensor}")
        }
        other => panic!("{other:?}"),
    }
    assert_untouched(target);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn fp8_export_is_deepseeks_form_and_loads_back() {
    let mut trained = trainer();
    steps(&mut trained, 1);
    let dir = temp_dir("fp8-export");
    trained.save(&dir, WeightDtype::Fp8).unwrap();

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["quantization_config"],
        serde_json::json!({
            "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]
        })
    );
    let raw = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&raw).unwrap();

    let model = &trained.model;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        model.params().iter().map(|p| (p.name.clone(), p.shape.clone(), p.value.to_host_vec())).collect();
    tensors.extend(
        model.mtp_shared_copies().into_iter().map(|(n, p)| (n, p.shape.clone(), p.value.to_host_vec())),
    );
    let ckpt = load_hf(&dir).unwrap();
    assert_eq!(&ckpt.config, model.config());
    assert_eq!(ckpt.tensors.len(), tensors.len());

    let mut quantized = 0;
    for (name, shape, original) in &tensors {
        let (loaded_shape, loaded) = &ckpt.tensors[name];
        assert_eq!(loaded_shape, shape, "{name}");
        let view = st.tensor(name).unwrap();
        let scale_name = format!("{name}_scale_inv");
        if is_fp8_weight(name, shape) {
            quantized += 1;
            assert_eq!(view.dtype(), Dtype::F8_E4M3, "{name}");
            let scales = st.tensor(&scale_name).unwrap();
            let (rows, cols) = (shape[0], shape[1]);
            assert_eq!(scales.dtype(), Dtype::F32, "{scale_name}");
            assert_eq!(scales.shape(), [rows.div_ceil(128), cols.div_ceil(128)], "{scale_name}");
            let scale: Vec<f32> =
                scales.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            // Within E4M3's rounding of each block: half a step of 3 mantissa bits, or half
            // the smallest subnormal step (2^-9 of the scale) near zero.
            for (i, (&w, &d)) in original.iter().zip(loaded).enumerate() {
                let s = scale[(i / cols / 128) * cols.div_ceil(128) + (i % cols) / 128];
                assert!((w - d).abs() <= w.abs() / 16.0 + s / 1024.0 + 1e-12, "{name}[{i}]: {w} vs {d}");
            }
            // Exactly the kernels' 128×128 quantization.
            let q =
                quantize(original, rows, cols, Granularity::Block128x128, &QuantConfig::default()).unwrap();
            assert_eq!(*loaded, q.dequantize(), "{name}");
            assert_eq!(scale, q.scales, "{name}");
            assert_eq!(E4M3_TO_F32[view.data()[0] as usize] * scale[0], loaded[0], "{name}");
        } else {
            assert_eq!(view.dtype(), Dtype::BF16, "{name}");
            assert!(st.tensor(&scale_name).is_err(), "{scale_name}");
            let rounded: Vec<f32> = original.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            assert_eq!(*loaded, rounded, "{name}");
        }
    }
    // What stays BF16, as in DeepSeek's release; what does not.
    let l = model.config().num_hidden_layers;
    for name in [
        "model.embed_tokens.weight".to_string(),
        "lm_head.weight".into(),
        "model.layers.1.mlp.gate.weight".into(),
        format!("model.layers.{l}.embed_tokens.weight"),
        format!("model.layers.{l}.shared_head.head.weight"),
        "model.norm.weight".into(),
    ] {
        assert_eq!(st.tensor(&name).unwrap().dtype(), Dtype::BF16, "{name}");
    }
    for name in [
        "model.layers.0.mlp.down_proj.weight".to_string(),
        "model.layers.1.mlp.experts.3.up_proj.weight".into(),
        "model.layers.2.self_attn.q_b_proj.weight".into(),
        format!("model.layers.{l}.eh_proj.weight"),
    ] {
        assert_eq!(st.tensor(&name).unwrap().dtype(), Dtype::F8_E4M3, "{name}");
    }
    assert!(quantized > 50, "{quantized}");
    assert_eq!(st.names().len(), tensors.len() + quantized);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The same state written twice gives the same bytes: a step redone after a recovery
/// rewrites its shard with the checksum already recorded for it.
#[test]
fn a_shard_is_a_function_of_the_state() {
    let dir = temp_dir("deterministic");
    let mut trainer = trainer();
    steps(&mut trainer, 1);
    let first = write_all(&trainer, &dir.join("a"), 2);
    let second = write_all(&trainer, &dir.join("b"), 2);
    assert_eq!(first, second);
    for shard in &first {
        let a = std::fs::read(dir.join("a").join(&shard.file)).unwrap();
        let b = std::fs::read(dir.join("b").join(&shard.file)).unwrap();
        assert!(a == b, "{} differs", shard.file);
    }
    // And another state does not.
    steps(&mut trainer, 1);
    assert_ne!(write_all(&trainer, &dir.join("c"), 2), first);
    std::fs::remove_dir_all(&dir).unwrap();
}
