//! `--init-from HF_DIR`, `--max-shard-size` and `score` on checkpoints as transformers
//! saves them (sharded, without MTP), through the `flotilla` binary: fine-tuning starts
//! from the exported weights under single-process `train` and under a pipeline × expert
//! parallel `run` (each worker loading its rank's tensors), with the first step's loss that
//! of the exported model on the same batch.

use flotilla_model::checkpoint::{HfReader, INDEX_FILE, WeightDtype, load_hf, save_hf_sharded};
use flotilla_model::data::Sampler;
use flotilla_model::model::Model;
use flotilla_model::train::TrainConfig;
use std::path::Path;

mod common;
use common::{flotilla, ok, records, temp_dir};

/// Two pipeline stages under DualPipe × 2-way expert parallelism (4 workers), one
/// sequence per micro-batch; single-process `train` ignores `[parallel]`.
const RUN: &str = r#"
seed = 3
steps = 3
batch_size = 8
seq_len = 32
threads = 1

[model]
preset = "tiny"
num_hidden_layers = 2

[data]
kind = "synthetic"
tokens = 65536

[optimizer]
peak_lr = 3e-3
warmup_steps = 1
constant_steps = 10
decay_steps = 0
final_lr = 3e-3

[loss]
mtp_lambda = 0.3
balance_alpha = 1e-4

[parallel]
pp = 2
ep = 2
micro_batches = 4
"#;

/// The losses of the HF checkpoint `dir` on step 1's batch of the run `config`, computed
/// through the library: what the first step of a run that starts from it must see.
fn first_batch_loss(config: &Path, dir: &Path) -> (f64, f64) {
    let text = std::fs::read_to_string(config).unwrap();
    let (run, model_config) = TrainConfig::from_toml(&text, Path::new(".")).unwrap();
    let mut model = Model::<f32>::new(&model_config, run.seed, false).unwrap();
    let checkpoint = load_hf(dir).unwrap();
    let mut params = model.params_mut();
    for p in params.iter_mut() {
        if let Some((_, values)) = checkpoint.tensors.get(&p.name) {
            p.value.host_mut().copy_from_slice(values);
        }
    }
    drop(params);
    let sampler = Sampler::new(
        run.load_tokens().unwrap(),
        run.seed,
        run.seq_len,
        model_config.num_nextn_predict_layers,
    )
    .unwrap();
    let windows: Vec<Vec<u32>> = (0..run.batch_size as u64).map(|i| sampler.window(1, i).tokens).collect();
    let stats: flotilla_model::StepStats = model.loss(&windows, run.seq_len, &run.loss, 1).unwrap();
    (stats.loss, stats.main_ce)
}

#[test]
fn init_from_an_exported_checkpoint_under_train_and_a_pipeline_expert_run() {
    let dir = temp_dir("pp-ep");
    let config = dir.join("run.toml");
    std::fs::write(&config, RUN).unwrap();
    let cfg = config.to_str().unwrap();

    // The checkpoint to start from: 3 steps of training, sharded like save_pretrained.
    let base = dir.join("base");
    let stdout = ok(&flotilla(&["train", cfg, "--out", base.to_str().unwrap(), "--max-shard-size", "300KB"]));
    assert!(stdout.contains("with model.safetensors.index.json"), "{stdout}");
    assert!(base.join(INDEX_FILE).exists());
    let shards = HfReader::open(&base).unwrap().files().len();
    assert!(shards > 3, "{shards} shards");

    // The same weights as transformers would save them: no MTP module.
    let no_mtp = dir.join("no-mtp");
    let whole = load_hf(&base).unwrap();
    let layers = whole.config.num_hidden_layers;
    let kept: Vec<_> = whole
        .tensors
        .iter()
        .filter(|(name, _)| flotilla_model::checkpoint::mtp_layer(name, layers).is_none())
        .map(|(name, (shape, data))| flotilla_model::checkpoint::NamedTensor { name, shape, data })
        .collect();
    save_hf_sharded(&no_mtp, &whole.config, &kept, WeightDtype::F32, 500_000).unwrap();

    // `score` reads the checkpoint without MTP and scores as the whole one does.
    let tokens = "5,17,99,3,250,42,42,7,0,128";
    let scored = |model: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(&flotilla(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--tokens",
            tokens,
            "--json",
        ])))
        .unwrap()
    };
    assert_eq!(scored(&no_mtp)["total_nll"], scored(&base)["total_nll"]);

    // Single process from the whole checkpoint: step 1's loss is the exported model's on
    // that batch, bit for bit.
    let (loss, main_ce) = first_batch_loss(&config, &base);
    let ft = dir.join("ft");
    let args =
        ["train", cfg, "--steps", "2", "--init-from", base.to_str().unwrap(), "--out", ft.to_str().unwrap()];
    let stdout = ok(&flotilla(&args));
    let loaded = whole.tensors.len() - 2; // the MTP module's copies of the embedding and head
    assert!(stdout.contains(&format!("init-from {}: {loaded} tensors loaded\n", base.display())), "{stdout}");
    let got = records(&ft.join("metrics.jsonl"));
    assert_eq!(got[0]["loss"].as_f64().unwrap().to_bits(), loss.to_bits(), "{} vs {loss}", got[0]["loss"]);

    // From the checkpoint without MTP: the MTP module comes from the seed, and says so;
    // the main loss is the exported model's.
    let ft = dir.join("ft-no-mtp");
    let args = [
        "train",
        cfg,
        "--steps",
        "2",
        "--init-from",
        no_mtp.to_str().unwrap(),
        "--out",
        ft.to_str().unwrap(),
    ];
    let stdout = ok(&flotilla(&args));
    assert!(
        stdout.contains("MTP module (")
            && stdout.contains("initialized from seed 3: the checkpoint has none"),
        "{stdout}"
    );
    let single = records(&ft.join("metrics.jsonl"));
    assert_eq!(single[0]["main_ce"].as_f64().unwrap().to_bits(), main_ce.to_bits());

    // The seeded init sees another loss: the runs above did start from the checkpoint.
    let fresh = dir.join("fresh");
    ok(&flotilla(&["train", cfg, "--steps", "1", "--out", fresh.to_str().unwrap()]));
    let seeded = records(&fresh.join("metrics.jsonl"))[0]["main_ce"].as_f64().unwrap();
    assert!((seeded - main_ce).abs() > 1e-3, "seeded {seeded} vs checkpoint {main_ce}");

    // PP 2 × EP 2 over 4 worker processes, each loading its rank's tensors: the steps of
    // the single-process run to rounding (gradients are summed in another order).
    let run_dir = dir.join("run");
    let args = [
        "run",
        cfg,
        "--steps",
        "2",
        "--init-from",
        no_mtp.to_str().unwrap(),
        "--out",
        run_dir.to_str().unwrap(),
    ];
    let stdout = ok(&flotilla(&args));
    assert!(stdout.contains("initialized from seed 3: the checkpoint has none"), "{stdout}");
    assert!(stdout.contains("trained 2 steps on 4 workers"), "{stdout}");
    let got = records(&run_dir.join("metrics.jsonl"));
    assert_eq!(got.len(), 2);
    for (step, (a, b)) in got.iter().zip(&single).enumerate() {
        let (a, b) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5 * b.abs(), "step {}: {a} vs {b}", step + 1);
    }
    let (a, b) = (got[0]["main_ce"].as_f64().unwrap(), main_ce);
    assert!((a - b).abs() <= 1e-5 * b, "{a} vs {b}");

    // `--resume` takes precedence: the committed checkpoint holds the fine-tuned state, and
    // the HF directory is not read (here it no longer exists).
    let resumable = dir.join("resumable.toml");
    std::fs::write(&resumable, format!("{RUN}\n[checkpoint]\ninterval = 1\n")).unwrap();
    let (res, run_dir) = (resumable.to_str().unwrap(), dir.join("resumed"));
    let out = run_dir.to_str().unwrap();
    ok(&flotilla(&["run", res, "--steps", "2", "--init-from", no_mtp.to_str().unwrap(), "--out", out]));
    let before = records(&run_dir.join("metrics.jsonl"));
    let gone = dir.join("gone");
    let stdout = ok(&flotilla(&[
        "run",
        res,
        "--steps",
        "3",
        "--resume",
        "--init-from",
        gone.to_str().unwrap(),
        "--out",
        out,
    ]));
    assert!(!stdout.contains("init-from"), "{stdout}");
    let after = records(&run_dir.join("metrics.jsonl"));
    assert_eq!(after.len(), 3);
    assert_eq!(after[..2], before[..], "the resumed run keeps the first two steps");

    // A checkpoint of another model is refused before anything starts, naming the field.
    std::fs::write(&config, RUN.replace("num_hidden_layers = 2", "num_hidden_layers = 3")).unwrap();
    for command in ["train", "run"] {
        let out = flotilla(&[
            command,
            cfg,
            "--init-from",
            base.to_str().unwrap(),
            "--out",
            dir.join("x").to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{command}");
        assert!(
            stderr.contains("`num_hidden_layers` is 2 in its config.json, 3 in the run's [model]"),
            "{command}: {stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `flotilla bench hf-load` on a small model: every rank decodes exactly what it holds, the
/// whole model everything, and the figures are reported.
#[test]
fn bench_hf_load_reports_each_rank_and_the_whole_model() {
    let dir = temp_dir("bench");
    let ckpt = dir.join("ckpt");
    let args = [
        "bench",
        "hf-load",
        "--layers",
        "2",
        "--hidden",
        "64",
        "--experts",
        "8",
        "--moe-intermediate",
        "16",
        "--max-shard-size",
        "20KB",
        "--dir",
        ckpt.to_str().unwrap(),
        "--json",
    ];
    let report: serde_json::Value = serde_json::from_str(&ok(&flotilla(&args))).unwrap();
    assert!(report["files"].as_u64().unwrap() > 2, "{report}");
    let ranks = report["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    let whole = &report["whole"];
    assert_eq!(whole["decoded_bytes"], whole["held_bytes"]);
    assert_eq!(whole["held_bytes"].as_u64().unwrap(), 4 * report["parameters"].as_u64().unwrap());
    for r in ranks {
        assert_eq!(r["decoded_bytes"], r["held_bytes"], "{r}");
        assert!(r["held_bytes"].as_u64() < whole["held_bytes"].as_u64(), "{r}");
        assert!(r["peak_kib"].as_u64() >= r["baseline_kib"].as_u64(), "{r}");
    }
    assert!(!ckpt.exists(), "the bench removes its checkpoint");
    std::fs::remove_dir_all(&dir).unwrap();
}
