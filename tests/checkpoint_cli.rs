//! `flotilla checkpoint ls|verify|export` on hand-made committed checkpoints: shards of a
//! tiny model written by `flotilla_model::shard::write_shard`, committed by
//! `flotilla_coordinator::checkpoint::commit`, as a training job would.

use flotilla_coordinator::checkpoint::{
    MANIFEST_FILE, MANIFEST_FORMAT, Manifest, ShardEntry, commit, run_root,
};
use flotilla_model::checkpoint::load_hf;
use flotilla_model::shard::{Piece, PieceData, PieceKind, ShardHeader, Snapshot, step_dir, write_shard};
use flotilla_model::{Model, ModelConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;
use common::flotilla;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn arg(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 temporary path")
}

const RUN_ID: &str = "job1-1700000000000";
const CREATED: u64 = 1_700_000_000_000;

fn tiny() -> ModelConfig {
    ModelConfig::from_toml("preset = \"tiny\"\nnum_hidden_layers = 2\n").expect("the tiny preset")
}

/// The tensors of step `step`'s checkpoint: a seeded model moved away from its
/// initialization (so an export cannot pass by re-initializing).
fn tensors(step: u64) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let model = Model::<f32>::new(&tiny(), 5, false).unwrap();
    model
        .params()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let value = p
                .value
                .host()
                .iter()
                .enumerate()
                .map(|(j, v)| v + 1e-3 * ((i + j) % 7) as f32 + step as f32 * 1e-2)
                .collect();
            (p.name.clone(), (p.shape.clone(), value))
        })
        .collect()
}

/// Writes step `step` as two ranks would (whole tensors alternately, the first tensor split
/// in two pieces as ZeRO-1 owns it) and commits it. Returns the checkpoint's directory.
fn commit_step(run_dir: &Path, step: u64, committed: bool) -> PathBuf {
    let root = run_root(run_dir, RUN_ID);
    let dir = step_dir(&root, step);
    let world = 2;
    let mut pieces: Vec<Vec<Piece>> = vec![Vec::new(), Vec::new()];
    for (i, (name, (shape, value))) in tensors(step).into_iter().enumerate() {
        let piece = |start: usize, data: &[f32]| Piece {
            name: name.clone(),
            kind: PieceKind::Value,
            start,
            shape: shape.clone(),
            data: PieceData::F32(data.to_vec()),
        };
        if i == 0 {
            let half = value.len() / 2;
            pieces[0].push(piece(0, &value[..half]));
            pieces[1].push(piece(half, &value[half..]));
        } else {
            pieces[i % 2].push(piece(0, &value));
        }
    }
    let shards: Vec<ShardEntry> = pieces
        .into_iter()
        .enumerate()
        .map(|(rank, pieces)| {
            let header = ShardHeader { step, rank: rank as u32, world, seed: 5, model: tiny() };
            let file = write_shard(&dir, &Snapshot { header, pieces }).unwrap();
            ShardEntry { rank: rank as u32, file: file.file, bytes: file.bytes, crc32: file.crc32 }
        })
        .collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        job_id: "job1".into(),
        run_id: RUN_ID.into(),
        step,
        created_unix_ms: CREATED,
        workers: world,
        layout: "dp=2".into(),
        config_toml: "seed = 5\n".into(),
        bytes: shards.iter().map(|s| s.bytes).sum(),
        shards,
    };
    if committed {
        commit(&dir, &manifest).unwrap();
    }
    dir
}

#[test]
fn checkpoint_ls_lists_committed_checkpoints_and_says_when_there_are_none() {
    let run_dir = tempfile::tempdir().unwrap();
    let out = flotilla(&["checkpoint", "ls", arg(run_dir.path())]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("no committed checkpoints under"), "{}", text(&out.stdout));

    let first = commit_step(run_dir.path(), 10, true);
    commit_step(run_dir.path(), 20, true);
    commit_step(run_dir.path(), 30, false); // shards written, never committed

    let out = flotilla(&["checkpoint", "ls", arg(run_dir.path())]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    for (line, step) in lines.iter().zip([10, 20]) {
        assert!(line.starts_with(&format!("step {step:>8}")), "{line}");
        for needle in [RUN_ID, "2 shards", "MiB", "dp=2", "2023-11-14T22:13:20.000Z"] {
            assert!(line.contains(needle), "{line} lacks {needle}");
        }
    }
    assert!(lines[0].contains(arg(&first)), "{}", lines[0]);

    let out = flotilla(&["checkpoint", "ls", arg(run_dir.path()), "--json"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(rows.iter().map(|r| r["step"].as_u64().unwrap()).collect::<Vec<_>>(), [10, 20]);
    let manifest: Manifest =
        serde_json::from_slice(&std::fs::read(first.join(MANIFEST_FILE)).unwrap()).unwrap();
    assert_eq!(rows[0]["bytes"].as_u64(), Some(manifest.bytes));
    assert_eq!(rows[0]["shards"].as_u64(), Some(2));
    assert_eq!(rows[0]["run_id"], RUN_ID);
    assert_eq!(rows[0]["layout"], "dp=2");
    assert_eq!(rows[0]["created_unix_ms"].as_u64(), Some(CREATED));
    assert_eq!(rows[0]["dir"].as_str(), Some(arg(&first)));
}

#[test]
fn checkpoint_verify_passes_then_names_a_flipped_shard() {
    let run_dir = tempfile::tempdir().unwrap();
    let good = commit_step(run_dir.path(), 10, true);
    let bad = commit_step(run_dir.path(), 20, true);
    let out = flotilla(&["checkpoint", "verify", arg(run_dir.path())]);
    assert!(out.status.success(), "stdout: {} stderr: {}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().filter(|l| l.starts_with("OK")).count(), 2, "{}", text(&out.stdout));

    let shard = bad.join("shard-00001-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&shard, &bytes).unwrap();

    let out = flotilla(&["checkpoint", "verify", arg(run_dir.path())]);
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("OK") && l.contains("step 10")), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("BAD") && l.contains("step 20")), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("shard-00001-of-00002.safetensors") && l.contains("checksum mismatch")),
        "{stdout}"
    );
    assert!(!stdout.contains("shard-00000-of-00002.safetensors"), "only the bad shard is named: {stdout}");
    assert!(text(&out.stderr).contains("1 of 2 checkpoints failed verification"), "{}", text(&out.stderr));

    // One checkpoint by its directory.
    let out = flotilla(&["checkpoint", "verify", arg(&good)]);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let out = flotilla(&["checkpoint", "verify", arg(&bad)]);
    assert!(!out.status.success() && text(&out.stdout).contains("checksum mismatch"));

    // Nothing to verify is an error, and an uncommitted step directory says so.
    let empty = tempfile::tempdir().unwrap();
    let out = flotilla(&["checkpoint", "verify", arg(empty.path())]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("no committed checkpoints"),
        "{}",
        text(&out.stderr)
    );
    let uncommitted = commit_step(run_dir.path(), 30, false);
    let out = flotilla(&["checkpoint", "verify", arg(&uncommitted)]);
    assert!(!out.status.success() && text(&out.stderr).contains("never committed"), "{}", text(&out.stderr));
}

#[test]
fn checkpoint_export_writes_an_hf_model_with_the_checkpoints_tensors() {
    let run_dir = tempfile::tempdir().unwrap();
    commit_step(run_dir.path(), 10, true);
    let latest = commit_step(run_dir.path(), 20, true);
    commit_step(run_dir.path(), 30, false);
    let out_dir = tempfile::tempdir().unwrap();

    // A run directory means its latest committed checkpoint: step 20.
    let f32_dir = out_dir.path().join("f32");
    let out =
        flotilla(&["checkpoint", "export", arg(run_dir.path()), "--out", arg(&f32_dir), "--dtype", "f32"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(text(&out.stdout).contains("step 20") && text(&out.stdout).contains("model.safetensors"));
    let loaded = load_hf(&f32_dir).unwrap();
    assert_eq!(loaded.config, tiny());
    let expected = tensors(20);
    for (name, (shape, value)) in &expected {
        let (got_shape, got) = loaded.tensors.get(name).unwrap_or_else(|| panic!("{name} not exported"));
        assert_eq!(got_shape, shape, "{name}");
        assert!(got == value, "{name} differs");
    }

    // The default, bf16, and DeepSeek's fp8 load back within their rounding.
    for (dtype, tolerance) in [(None, 1.0 / 128.0), (Some("fp8"), 0.15)] {
        let dir = out_dir.path().join(dtype.unwrap_or("default"));
        let mut args = vec!["checkpoint", "export", arg(&latest), "--out", arg(&dir)];
        args.extend(dtype.map(|d| ["--dtype", d]).into_iter().flatten());
        let out = flotilla(&args);
        assert!(out.status.success(), "{dtype:?}: {}", text(&out.stderr));
        let loaded = load_hf(&dir).unwrap();
        for (name, (_, value)) in &expected {
            let (_, got) = &loaded.tensors[name];
            let scale = value.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got.iter().zip(value).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= tolerance * scale, "{dtype:?} {name}: error {err} at scale {scale}");
        }
    }

    // --max-shard-size splits the export like save_pretrained: shards and an index, the
    // same tensors; exporting again into the same directory replaces the shards.
    let sharded = out_dir.path().join("sharded");
    for _ in 0..2 {
        let args = [
            "checkpoint",
            "export",
            arg(&latest),
            "--out",
            arg(&sharded),
            "--dtype",
            "f32",
            "--max-shard-size",
            "100KB",
        ];
        let out = flotilla(&args);
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
        assert!(text(&out.stdout).contains("shards with"), "{}", text(&out.stdout));
    }
    assert!(sharded.join("model.safetensors.index.json").exists());
    assert!(!sharded.join("model.safetensors").exists());
    assert_eq!(load_hf(&sharded).unwrap().tensors, loaded_f32_tensors(&f32_dir));
    let out = flotilla(&[
        "checkpoint",
        "export",
        arg(&latest),
        "--out",
        arg(&sharded),
        "--max-shard-size",
        "5 parsecs",
    ]);
    assert!(!out.status.success() && text(&out.stderr).contains("is not a size"), "{}", text(&out.stderr));

    // A damaged shard, an uncommitted checkpoint and an empty run directory are refused.
    let shard = latest.join("shard-00000-of-00002.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let out = flotilla(&["checkpoint", "export", arg(&latest), "--out", arg(&out_dir.path().join("bad"))]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success() && stderr.contains("shard-00000-of-00002.safetensors"), "{stderr}");
    let out = flotilla(&[
        "checkpoint",
        "export",
        arg(&step_dir(&run_root(run_dir.path(), RUN_ID), 30)),
        "--out",
        "x",
    ]);
    assert!(!out.status.success() && text(&out.stderr).contains("never committed"), "{}", text(&out.stderr));
    let empty = tempfile::tempdir().unwrap();
    let out = flotilla(&["checkpoint", "export", arg(empty.path()), "--out", "x"]);
    assert!(!out.status.success() && text(&out.stderr).contains("no manifest.json"), "{}", text(&out.stderr));
}

fn loaded_f32_tensors(dir: &Path) -> std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    load_hf(dir).unwrap().tensors
}

/// `checkpoint export --eplb-replicas` writes eplb.json beside the model: the placement of
/// the loads the run recorded up to the exported checkpoint's step (not those of later
/// steps, which are of a later model), over the model's expert groups; the same placement
/// `experts plan` computes from those loads.
#[test]
fn checkpoint_export_writes_the_expert_placement_of_the_loads_up_to_its_step() {
    use flotilla_model::train::{LayerLoad, StepRecord};
    let run_dir = tempfile::tempdir().unwrap();
    let early = commit_step(run_dir.path(), 2, true);
    commit_step(run_dir.path(), 4, true);
    // Steps 1–2 load expert 0 most; steps 3–4 load expert 15 most, so the placement says
    // which steps it summed.
    let loads = |step: u64| -> Vec<u64> {
        (0..16u64).map(|e| if step <= 2 { 200 - 10 * e } else { 50 + 10 * e + step }).collect()
    };
    let record = |step: u64| StepRecord {
        step,
        loss: 5.0,
        main_ce: 5.0,
        mtp_ce: vec![],
        balance_loss: 0.0,
        lr: 1e-3,
        grad_norm: 1.0,
        tokens_per_s: 1.0,
        max_expert_load: 1.0,
        mean_expert_load: 1.0,
        expert_loads: vec![LayerLoad { layer: 1, tokens: loads(step) }],
    };
    let metrics: String = (1..=4).map(|s| serde_json::to_string(&record(s)).unwrap() + "\n").collect();
    std::fs::write(run_dir.path().join("metrics.jsonl"), metrics).unwrap();

    let placed = |checkpoint: &Path| -> serde_json::Value {
        let out_dir = tempfile::tempdir().unwrap();
        let out = flotilla(&[
            "checkpoint",
            "export",
            arg(checkpoint),
            "--out",
            arg(out_dir.path()),
            "--eplb-replicas",
            "20",
            "--eplb-nodes",
            "2",
            "--eplb-gpus-per-node",
            "2",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("eplb.json (Hierarchical placement of 1 layers"),
            "{}",
            text(&out.stdout)
        );
        serde_json::from_str(&std::fs::read_to_string(out_dir.path().join("eplb.json")).unwrap()).unwrap()
    };
    let planned = |steps: std::ops::RangeInclusive<u64>| -> serde_json::Value {
        let dir = tempfile::tempdir().unwrap();
        let summed: Vec<u64> = (0..16).map(|e| steps.clone().map(|s| loads(s)[e]).sum()).collect();
        let file = dir.path().join("loads.json");
        std::fs::write(&file, serde_json::to_string(&[summed]).unwrap()).unwrap();
        let out = flotilla(&[
            "experts",
            "plan",
            "--loads",
            arg(&file),
            "--replicas",
            "20",
            "--nodes",
            "2",
            "--gpus-per-node",
            "2",
            "--groups",
            "4",
            "--json",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };

    let at_2 = placed(&early);
    assert_eq!(at_2["steps"], 2);
    assert_eq!(at_2["layers"], serde_json::json!(["1"]));
    assert_eq!(at_2["cluster"]["groups"], 4, "the tiny model's n_group");
    assert_eq!(at_2["phy2log"], planned(1..=2)["phy2log"]);
    // The run directory exports its latest checkpoint, step 4, with all four steps' loads.
    let at_4 = placed(run_dir.path());
    assert_eq!(at_4["steps"], 4);
    assert_eq!(at_4["phy2log"], planned(1..=4)["phy2log"]);
    assert_ne!(at_2["phy2log"], at_4["phy2log"]);

    // A checkpoint moved out of its run has no metrics to read: the error says what to give.
    let moved = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&early).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), moved.path().join(entry.file_name())).unwrap();
    }
    let out = flotilla(&["checkpoint", "export", arg(moved.path()), "--out", "x", "--eplb-replicas", "20"]);
    assert!(!out.status.success() && text(&out.stderr).contains("--eplb-loads"), "{}", text(&out.stderr));
    // The cluster flags mean nothing without --eplb-replicas.
    let out = flotilla(&["checkpoint", "export", arg(&early), "--out", "x", "--eplb-nodes", "2"]);
    assert!(!out.status.success() && text(&out.stderr).contains("--eplb-replicas"), "{}", text(&out.stderr));
}

/// `flotilla generate --json`'s lines for `model` and `extra` flags.
fn generate_lines(model: &Path, extra: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["generate", "--model", arg(model), "--max-new-tokens", "12", "--json"];
    args.extend_from_slice(extra);
    let out = flotilla(&args);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    text(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn generate_reads_a_committed_checkpoint_as_its_export_and_speculates_losslessly() {
    let run_dir = tempfile::tempdir().unwrap();
    commit_step(run_dir.path(), 10, true);
    let out_dir = tempfile::tempdir().unwrap();
    let hf = out_dir.path().join("hf");
    let out = flotilla(&["checkpoint", "export", arg(run_dir.path()), "--out", arg(&hf), "--dtype", "f32"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let prompts = out_dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"prompt\": \"To be, or not\"}\n{\"tokens\": [84, 104, 101]}\n").unwrap();
    let file = ["--prompts", arg(&prompts)];

    // The run directory (its latest checkpoint) and its f32 export are the same model; the
    // export keeps the MTP module, so both can speculate.
    let from_run = generate_lines(run_dir.path(), &file);
    let from_export = generate_lines(&hf, &file);
    assert_eq!(from_run.len(), 2);
    for (a, b) in from_run.iter().zip(&from_export) {
        assert_eq!(a["tokens"], b["tokens"]);
        assert_eq!(a["tokens"].as_array().unwrap().len(), 12);
        // A byte vocabulary decodes to text.
        assert!(a["text"].is_string(), "{a}");
    }
    assert_eq!(from_run[0]["prompt_tokens"].as_array().unwrap().len(), "To be, or not".len());

    // MTP speculation gives plain greedy's tokens, in no more steps.
    for model in [run_dir.path(), hf.as_path()] {
        let speculative = generate_lines(model, &[file[0], file[1], "--speculative", "mtp"]);
        for (plain, spec) in from_run.iter().zip(&speculative) {
            assert_eq!(plain["tokens"], spec["tokens"], "{}", model.display());
        }
        let stats = &speculative[0]["stats"];
        let (drafts, accepted) = (stats["drafts"].as_u64().unwrap(), stats["accepted"].as_u64().unwrap());
        assert!(drafts > 0 && accepted <= drafts, "{stats}");
        assert_eq!(stats["acceptance_rate"].as_f64().unwrap(), accepted as f64 / drafts as f64);
        let plain_steps = from_run[0]["stats"]["decode_steps"].as_u64().unwrap();
        assert!(stats["decode_steps"].as_u64().unwrap() <= plain_steps, "{stats}");
    }
    // Batches of one give the same tokens as one batch of two.
    let alone = generate_lines(run_dir.path(), &[file[0], file[1], "--batch-size", "1"]);
    for (a, b) in from_run.iter().zip(&alone) {
        assert_eq!(a["tokens"], b["tokens"]);
    }
}
