//! The `flotilla` binary end to end: the README's main command, its JSON output, and its
//! errors on bad input.

mod common;
use common::{failure, flotilla, flotilla_in, losses, temp_dir};

fn max_rel(row: &serde_json::Value, reference: &str) -> f64 {
    row[reference]["relative"]["max"].as_f64().expect("max relative error")
}

#[test]
fn fp8_accumulation_reproduces_the_reports_finding() {
    let out = flotilla(&["repro", "fp8-accumulation", "--m", "64", "--n", "64", "--k", "4096", "--json"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 5);
    let by_name = |prefix: &str| {
        rows.iter()
            .find(|r| r["name"].as_str().unwrap().starts_with(prefix))
            .unwrap_or_else(|| panic!("row {prefix}"))
    };
    let unpromoted = max_rel(by_name("FP8, 14-bit accumulator, no promotion"), "vs_fp8_inputs");
    let promoted = max_rel(by_name("FP8, 14-bit accumulator, promoted every 128"), "vs_fp8_inputs");
    let exact = max_rel(by_name("FP8, exact f32 accumulation"), "vs_fp8_inputs");
    // The report: "a maximum relative error of nearly 2%" at K = 4096 without promotion.
    assert!((0.01..0.04).contains(&unpromoted), "unpromoted max relative error {unpromoted}");
    assert!(promoted * 10.0 < unpromoted, "promotion must remove most of it: {promoted} vs {unpromoted}");
    assert!(exact < promoted, "exact f32 accumulation {exact} vs promoted {promoted}");
}

#[test]
fn fp8_accumulation_table_names_every_gemm() {
    let out = flotilla(&["repro", "fp8-accumulation", "--m", "8", "--n", "8", "--k", "256"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    for name in ["f32 inputs", "BF16 inputs", "FP8, exact f32", "no promotion", "promoted every 128"] {
        assert!(table.contains(name), "table lacks {name}:\n{table}");
    }
}

#[test]
fn bad_arguments_fail_with_a_message_naming_the_field() {
    for (args, field) in [
        (vec!["--k", "0"], "k"),
        (vec!["--promote-every", "100"], "promote_every"),
        (vec!["--products-per-add", "0"], "products_per_add"),
    ] {
        let mut full = vec!["repro", "fp8-accumulation", "--m", "4", "--n", "4"];
        full.extend(args.iter().copied());
        let out = flotilla(&full);
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("`{field}`")), "{args:?}: stderr does not name `{field}`: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn model_info_counts_the_released_model() {
    let out = flotilla(&["model-info", "--preset", "deepseek-v3-671b", "--json"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let main = &info["parameters"]["main"];
    let total: u64 =
        ["embedding", "attention", "dense_ffn", "shared_experts", "routed_experts", "gates", "norms", "head"]
            .iter()
            .map(|k| main[k].as_u64().unwrap())
            .sum();
    assert_eq!(total, 671_026_419_200);
    let table = String::from_utf8(flotilla(&["model-info", "--preset", "deepseek-v3-671b"]).stdout).unwrap();
    for needle in ["671.03B", "36.63B", "37.55B", "684.49B", "routed experts", "MTP projections"] {
        assert!(table.contains(needle), "table lacks {needle}:\n{table}");
    }
}

#[test]
fn model_info_reads_config_files_and_names_bad_fields() {
    let dir = std::env::temp_dir().join(format!("flotilla-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("model.toml");
    std::fs::write(&good, "preset = \"tiny\"\nhidden_size = 192\n").unwrap();
    let out = flotilla(&["model-info", "--config", good.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["parameters"]["main"]["embedding"].as_u64(), Some(256 * 192));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "preset = \"tiny\"\ntopk_group = 7\n").unwrap();
    let out = flotilla(&["model-info", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("`topk_group`") && stderr.contains("bad.toml"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

const SHORT_RUN: &str = r#"
seed = 3
steps = 40
batch_size = 4
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
warmup_steps = 5
constant_steps = 35
decay_steps = 0
final_lr = 3e-3
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.1
"#;

#[test]
fn train_learns_writes_metrics_and_weights_that_score_agrees_with() {
    let dir = temp_dir("train");
    let config = dir.join("run.toml");
    std::fs::write(&config, SHORT_RUN).unwrap();
    let out = dir.join("out");
    let run = flotilla(&["train", config.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "stderr: {}", String::from_utf8_lossy(&run.stderr));

    let records: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 40);
    for key in
        ["loss", "main_ce", "mtp_ce", "balance_loss", "lr", "grad_norm", "tokens_per_s", "max_expert_load"]
    {
        assert!(!records[0][key].is_null(), "metrics lack {key}");
    }
    // Loads per MoE layer: the tiny preset's layer 1 (layer 0 is dense) and the MTP layer 2,
    // each counting every token's num_experts_per_tok = 4 choices.
    let loads = records[0]["expert_loads"].as_array().unwrap();
    assert_eq!(loads.iter().map(|l| l["layer"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2]);
    for l in loads {
        let total: u64 = l["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).sum();
        assert_eq!(total, 4 * 32 * 4);
    }
    let ce = |r: &serde_json::Value| r["main_ce"].as_f64().unwrap();
    let first = records[..5].iter().map(ce).sum::<f64>() / 5.0;
    let last = records[35..].iter().map(ce).sum::<f64>() / 5.0;
    assert!(last < first - 0.5, "the loss must fall: {first} → {last}");

    // The same run again gives bit-identical losses.
    let again = dir.join("again");
    assert!(
        flotilla(&["train", config.to_str().unwrap(), "--out", again.to_str().unwrap()]).status.success()
    );
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["loss"].as_f64().unwrap().to_bits()
            })
            .collect::<Vec<_>>(),
        std::fs::read_to_string(again.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["loss"].as_f64().unwrap().to_bits()
            })
            .collect::<Vec<_>>()
    );

    // Scoring the saved weights on a window of the training data gives the training loss
    // of that window, computed through the library on the same weights.
    let tokens = flotilla_model::data::synthetic_corpus(3, 65536)[1000..1034].to_vec();
    let list = tokens.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let scored = flotilla(&["score", "--model", out.to_str().unwrap(), "--tokens", &list, "--json"]);
    assert!(scored.status.success(), "stderr: {}", String::from_utf8_lossy(&scored.stderr));
    let report: serde_json::Value = serde_json::from_slice(&scored.stdout).unwrap();
    let checkpoint = flotilla_model::checkpoint::load_hf(&out).unwrap();
    let mut model = flotilla_model::Model::<f32>::new(&checkpoint.config, 0, false).unwrap();
    flotilla_model::checkpoint::fill_params(&mut model.params_mut(), &checkpoint).unwrap();
    let window = tokens[..32 + 2].to_vec();
    let stats = model.loss(&[window], 32, &flotilla_model::LossConfig::default(), 1).unwrap();
    let scored_mean = report["total_nll"].as_f64().unwrap() / 33.0;
    // score predicts 33 next tokens, the window's main loss 32 of them: compare sums.
    let first_32: f64 =
        -report["log_probs"].as_array().unwrap()[..32].iter().map(|v| v.as_f64().unwrap()).sum::<f64>();
    assert!(
        (first_32 / 32.0 - stats.main_ce).abs() < 1e-5,
        "score {} vs training loss {}",
        first_32 / 32.0,
        stats.main_ce
    );
    assert!(scored_mean.is_finite());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn train_and_score_reject_bad_input_naming_the_field() {
    let dir = temp_dir("bad-train");
    let config = dir.join("bad.toml");
    std::fs::write(&config, SHORT_RUN.replace("seq_len = 32", "seq_len = 0")).unwrap();
    let out = flotilla(&["train", config.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`seq_len`"));

    std::fs::write(&config, SHORT_RUN.replace("num_hidden_layers = 2", "topk_group = 9")).unwrap();
    let out = flotilla(&["train", config.to_str().unwrap(), "--out", dir.join("o").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`topk_group`"));

    let out = flotilla(&["score", "--model", dir.to_str().unwrap(), "--tokens", "1,2,3"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The bubble column of `flotilla schedule --table` for one schedule.
fn table_bubble(table: &str, kind: &str) -> f64 {
    let row = table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} row:\n{table}"));
    row.split_whitespace().nth(2).unwrap().parse().unwrap_or_else(|_| panic!("bubble of {row}"))
}

#[test]
fn schedule_table_compares_all_four_and_dualpipe_wins() {
    let out = flotilla(&["schedule", "--table", "--pp", "8", "--micro-batches", "20"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    for kind in ["1f1b", "zb1p", "dualpipe", "dualpipev"] {
        assert!(table.lines().any(|l| l.starts_with(kind)), "table lacks {kind}:\n{table}");
    }
    let dualpipe = table_bubble(&table, "dualpipe");
    assert!(dualpipe < table_bubble(&table, "zb1p"), "{table}");
    assert!(table_bubble(&table, "zb1p") < table_bubble(&table, "1f1b"), "{table}");
    assert!(dualpipe <= table_bubble(&table, "dualpipev"), "{table}");
    assert!(
        table.contains("exact when F = B−W, W ≤ F, B ≤ F&B ≤ F+B"),
        "the footnote on exactness:\n{table}"
    );
    assert!(table.contains("(true for these costs)"), "{table}");
}

#[test]
fn schedule_svg_and_chrome_trace_write_their_files() {
    let dir = temp_dir("schedule");
    let svg = dir.join("dualpipe.svg");
    let svg_path = svg.to_str().unwrap();
    // --kind defaults to dualpipe.
    let out = flotilla(&["schedule", "--pp", "8", "--micro-batches", "20", "--svg", svg_path]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        stdout.starts_with("dualpipe") && stdout.contains("bubble 6") && stdout.contains(svg_path),
        "{stdout}"
    );
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));

    let trace = dir.join("zb1p.json");
    let trace_path = trace.to_str().unwrap();
    let args = ["schedule", "--kind", "zb1p", "--pp", "4", "--micro-batches", "8"];
    let out = flotilla(&[&args[..], &["--chrome-trace", trace_path]].concat());
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let compute = trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["ph"] == "X" && e["cat"] != "wait")
        .count();
    assert_eq!(compute, 3 * 4 * 8, "one event for each F, B and W of every chunk");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn schedule_json_has_one_stream_per_rank_and_the_simulated_summary() {
    let out = flotilla(&["schedule", "--kind", "dualpipe", "--pp", "8", "--micro-batches", "20", "--json"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["schedule"]["ranks"].as_array().unwrap().len(), 8);
    assert_eq!(report["schedule"]["kind"], "dualpipe");
    assert_eq!(report["report"]["stages"][0], serde_json::json!([0, 7]));
    assert_eq!(report["summary"]["bubble"].as_f64().unwrap(), 6.0);
    assert_eq!(report["summary"]["idle"].as_array().unwrap().len(), 8);
    assert!(report["summary"]["makespan"].as_f64().unwrap() > 0.0);
}

#[test]
fn schedule_bad_input_says_what_is_allowed() {
    for (args, needle) in [
        (vec!["--pp", "3", "--micro-batches", "20", "--kind", "dualpipe"], "even pp"),
        (vec!["--micro-batches", "10", "--pp", "8", "--kind", "dualpipe"], "≥ 2·pp = 16"),
        (vec!["--pp", "8", "--micro-batches", "20", "--costs", "1,2"], "F,B,W,FB"),
        (vec!["--pp", "8", "--micro-batches", "20", "--kind", "2f2b"], "1f1b, zb1p, dualpipe or dualpipev"),
        (vec!["--pp", "8", "--micro-batches", "20", "--latency", "-1"], "--latency"),
    ] {
        let mut full = vec!["schedule", "--json"];
        full.extend(args.iter().copied());
        let out = flotilla(&full);
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{args:?}: stderr does not say {needle:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    let out = flotilla(&["schedule", "--pp", "8", "--micro-batches", "20"]);
    assert!(!out.status.success(), "an output mode is required");
}

#[test]
fn plan_lays_out_the_reports_cluster_and_it_fits() {
    let paper = [
        "plan",
        "--preset",
        "deepseek-v3-671b",
        "--nodes",
        "256",
        "--gpus-per-node",
        "8",
        "--gpu-memory",
        "80GiB",
        "--pp",
        "16",
        "--ep",
        "64",
    ];
    let out = flotilla(&paper);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "PP 16 ranks (16 stages) × DP 128",
        "EP 64",
        "4 per GPU",
        "activations",
        "free)",
        "bubble",
        "IB (inter)",
    ] {
        assert!(report.contains(needle), "report lacks {needle:?}:\n{report}");
    }

    let out = flotilla(&[&paper[..], &["--json"]].concat());
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON plan");
    assert_eq!(plan["layout"]["dp"], 128);
    assert_eq!(plan["experts"]["experts_per_gpu"], 4);
    let memory = &plan["memory"];
    assert!(memory["total"].as_u64().unwrap() <= memory["capacity"].as_u64().unwrap());
    assert_eq!(memory["capacity"].as_u64(), Some(80 << 30));
}

#[test]
fn plan_refuses_bad_sizes_and_layouts_naming_the_cause() {
    let base = ["plan", "--preset", "deepseek-v3-671b", "--nodes", "256", "--pp", "16"];
    for (extra, needle) in [
        (vec!["--gpu-memory", "80XB", "--ep", "64"], "--gpu-memory"),
        (vec!["--gpu-memory", "80GiB", "--ep", "48"], "does not divide the 256 routed experts"),
        (vec!["--gpu-memory", "16GiB", "--ep", "64"], "does not fit"),
    ] {
        let out = flotilla(&[&base[..], &extra[..]].concat());
        assert!(!out.status.success(), "{extra:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(needle), "{extra:?}: stderr lacks {needle:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{extra:?} panicked: {stderr}");
    }
}

#[test]
fn plan_errors_say_what_went_wrong_with_the_users_own_input() {
    let tiny = ["plan", "--preset", "tiny"];
    let one_node = |extra: &[&'static str]| [&["--nodes", "1", "--gpu-memory", "1GiB"], extra].concat();
    for (extra, needles) in [
        // Totals past 64 bits are refused, not wrapped to "0 sequences".
        (
            vec![
                "--seq-len",
                "256",
                "--gpu-memory",
                "1TiB",
                "--nodes",
                "2147483648",
                "--gpus-per-node",
                "2147483648",
                "--pp",
                "2",
                "--ep",
                "1",
                "--micro-batches",
                "8",
            ],
            vec!["sequences per step", "do not fit in 64 bits"],
        ),
        (one_node(&["--gpus-per-node", "1"]), vec!["even pp ≥ 2", "--schedule 1f1b"]),
        (one_node(&["--pp", "0"]), vec!["pp must be at least 1"]),
        (one_node(&["--micro-batch-size", "0"]), vec!["micro-batch size must be at least 1"]),
        (one_node(&["--seq-len", "4096"]), vec!["max_position_embeddings = 512"]),
        (
            vec!["--nodes", "1", "--gpu-memory", "1KiB", "--pp", "2", "--ep", "1"],
            vec!["a GPU has 1.0 KiB", "MiB per GPU"],
        ),
    ] {
        let out = flotilla(&[&tiny[..], &extra[..]].concat());
        assert!(!out.status.success(), "{extra:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for needle in needles {
            assert!(stderr.contains(needle), "{extra:?}: stderr lacks {needle:?}: {stderr}");
        }
        assert!(!stderr.contains("0.00 GiB") && !stderr.contains("(1 tried)"), "{extra:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{extra:?} panicked: {stderr}");
    }
    // Without --seq-len the tiny model plans at its own 512 positions.
    let out = flotilla(&[&tiny[..], &one_node(&["--global-batch", "64"])].concat());
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(report.contains("× 512 tokens per pipeline"), "{report}");
    assert!(!report.contains("-0.00"), "{report}");
}

#[test]
fn plan_counts_pp_in_ranks_and_says_so() {
    let out = flotilla(&["plan", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("pipeline ranks") && help.contains("2·pp under dualpipev"), "{help}");
    let out = flotilla(&[
        "plan",
        "--preset",
        "deepseek-v3-671b",
        "--nodes",
        "256",
        "--gpu-memory",
        "80GiB",
        "--schedule",
        "dualpipev",
        "--pp",
        "8",
        "--ep",
        "64",
    ]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(report.contains("PP 8 ranks (16 stages) × DP 256"), "{report}");
}

#[test]
fn plan_without_a_layout_proposes_one_that_fits() {
    let out = flotilla(&[
        "plan",
        "--preset",
        "deepseek-v3-671b",
        "--nodes",
        "256",
        "--gpu-memory",
        "80GB",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let proposal: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON proposal");
    let memory = &proposal["chosen"]["memory"];
    assert!(memory["total"].as_u64().unwrap() <= 80_000_000_000);
    assert!(!proposal["candidates"].as_array().unwrap().is_empty());
}

/// `flotilla run` with 1, 2 and 4 data-parallel worker processes takes, step by step, the
/// steps of single-process `flotilla train` on the same global batch (to rounding: the
/// gradients are summed in another order), and repeats itself bit for bit, also when
/// started from the config's directory by its bare file name.
#[test]
fn run_with_data_parallel_workers_matches_single_process_training() {
    let dir = temp_dir("run");
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        SHORT_RUN.replace("steps = 40", "steps = 6").replace("constant_steps = 35", "constant_steps = 1"),
    )
    .unwrap();
    let single = dir.join("single");
    let out = flotilla(&["train", config.to_str().unwrap(), "--out", single.to_str().unwrap()]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let reference = losses(&single.join("metrics.jsonl"));
    assert_eq!(reference.len(), 6);

    for workers in ["1", "2", "4"] {
        let run_dir = dir.join(format!("dp{workers}"));
        let args =
            ["run", config.to_str().unwrap(), "--workers", workers, "--out", run_dir.to_str().unwrap()];
        let out = flotilla(&args);
        assert!(out.status.success(), "{workers} workers: stderr: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("trained 6 steps on {workers} workers")), "{stdout}");
        let got = losses(&run_dir.join("metrics.jsonl"));
        assert_eq!(got.len(), reference.len(), "{workers} workers");
        for (step, (a, b)) in got.iter().zip(&reference).enumerate() {
            assert!((a - b).abs() <= 1e-5 * b.abs(), "{workers} workers, step {}: {a} vs {b}", step + 1);
        }
        assert!(run_dir.join("model.safetensors").exists(), "{workers} workers: weights");
        if workers == "2" {
            // Again, from the config's own directory by its bare file name (its parent is
            // then the empty path).
            let again = dir.join("dp2-again");
            let out = flotilla_in(&dir, &["run", "run.toml", "--workers", "2", "--out", "dp2-again"]);
            assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
            let repeat = losses(&again.join("metrics.jsonl"));
            assert_eq!(
                repeat.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                got.iter().map(|l| l.to_bits()).collect::<Vec<_>>(),
                "the same layout repeats bit for bit"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `flotilla run examples/tiny-pp-ep.toml` (PP 2 × EP 2 under DualPipe, 4 worker
/// processes) trains end to end like single-process `flotilla train` of the same file,
/// writes the whole model's weights, a per-step pipeline log and a Chrome trace of the last
/// step with one track per rank in which the bidirectional schedule shows: forward chunks
/// of both directions and overlapped forward&backward pairs.
#[test]
fn run_trains_a_pipeline_expert_parallel_layout_and_traces_it() {
    let dir = temp_dir("run-pp-ep");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-pp-ep.toml");
    let config = example.to_str().unwrap();
    let single = dir.join("single");
    let out = flotilla(&["train", config, "--steps", "4", "--out", single.to_str().unwrap()]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let reference = losses(&single.join("metrics.jsonl"));

    let run_dir = dir.join("pp-ep");
    let trace = dir.join("trace.json");
    let args = [
        "run",
        config,
        "--steps",
        "4",
        "--out",
        run_dir.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ];
    let out = flotilla(&args);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("trained 4 steps on 4 workers"), "{stdout}");
    assert!(stdout.contains("pipeline bubble at the last step"), "{stdout}");
    let got = losses(&run_dir.join("metrics.jsonl"));
    assert_eq!(got.len(), reference.len());
    for (step, (a, b)) in got.iter().zip(&reference).enumerate() {
        assert!((a - b).abs() <= 1e-5 * b.abs(), "step {}: {a} vs {b}", step + 1);
    }
    assert!(run_dir.join("model.safetensors").exists(), "the whole model's weights");
    let log = std::fs::read_to_string(run_dir.join("pipeline.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4, "{log}");
    for line in log.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let bubble = row["bubble_fraction"].as_f64().unwrap();
        assert!((0.0..1.0).contains(&bubble), "{line}");
        assert!(row["exchange_bytes"].as_u64().unwrap() > 0, "MoE tokens crossed ranks: {line}");
    }

    let trace: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let tracks: std::collections::BTreeSet<u64> =
        events.iter().filter(|e| e["ph"] == "X").map(|e| e["pid"].as_u64().unwrap()).collect();
    assert_eq!(tracks.len(), 4, "one track per worker");
    let names: Vec<&str> =
        events.iter().filter(|e| e["ph"] == "X").filter_map(|e| e["name"].as_str()).collect();
    // DualPipe with 4 micro-batches: 0 and 1 enter at pipeline rank 0, 2 and 3 at rank 1,
    // so every rank runs stage 0 forwards of one direction and stage 1 of the other.
    assert!(names.iter().any(|n| n.starts_with("F mb 0 stage 0")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("F mb 2 stage 0")), "{names:?}");
    assert!(names.iter().any(|n| n.starts_with("F&B")), "overlapped pairs: {names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_refuses_bad_input_before_starting_anything() {
    let dir = temp_dir("run-bad");
    let config = dir.join("run.toml");
    std::fs::write(&config, SHORT_RUN).unwrap();
    let out = flotilla(&["run", config.to_str().unwrap(), "--workers", "3"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("batch_size 4 must divide evenly"), "{stderr}");
    let out = flotilla(&["run", config.to_str().unwrap(), "--trace", "t.json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("needs a [parallel] layout"), "{stderr}");
    std::fs::write(&config, SHORT_RUN.replace("seq_len = 32", "seq_len = 0")).unwrap();
    let out = flotilla(&["run", config.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("seq_len"), "{stderr}");
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-pp-ep.toml");
    let out = flotilla(&["run", example.to_str().unwrap(), "--workers", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("layout needs 4 workers"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `flotilla experts plan` prints DeepSeek's EPLB README example's `phy2log` as JSON, reads
/// a run's own metrics.jsonl with the imbalance falling on every layer, and names the file
/// and the count at fault on bad input.
#[test]
fn experts_plan_places_redundant_experts_from_recorded_loads() {
    let dir = temp_dir("experts");
    let weights = dir.join("weights.json");
    std::fs::write(
        &weights,
        "[[90,132,40,61,104,165,39,4,73,56,183,86],[20,107,104,64,19,197,187,157,172,86,16,27]]",
    )
    .unwrap();
    let w = weights.to_str().unwrap();
    let out = flotilla(&[
        "experts",
        "plan",
        "--loads",
        w,
        "--replicas",
        "16",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--groups",
        "4",
        "--json",
    ]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["policy"], "hierarchical");
    assert_eq!(
        plan["phy2log"],
        serde_json::json!([
            [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
        ])
    );
    assert_eq!(plan["logcnt"][0].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum::<u64>(), 16);

    // A short run's recorded loads: 4 MoE layers of 16 experts, 4 GPUs, 4 redundant copies.
    let config = dir.join("run.toml");
    std::fs::write(&config, SHORT_RUN.replace("steps = 40", "steps = 3")).unwrap();
    let run = dir.join("run");
    let out = flotilla(&["train", config.to_str().unwrap(), "--out", run.to_str().unwrap()]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let metrics = run.join("metrics.jsonl");
    let m = metrics.to_str().unwrap();
    // 16 experts → 20 copies on one node of 4 GPUs, as text or JSON.
    let plan_run = |extra: &[&str]| {
        let args = [
            &["experts", "plan", "--loads", m, "--replicas", "20", "--nodes", "1", "--gpus-per-node", "4"],
            extra,
        ]
        .concat();
        flotilla(&args)
    };
    let out = plan_run(&["--json"]);
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["steps"], 3);
    let balance = plan["balance"].as_array().unwrap();
    assert!(!balance.is_empty());
    for layer in balance {
        let (before, after) =
            (layer["before_ratio"].as_f64().unwrap(), layer["after_ratio"].as_f64().unwrap());
        assert!(after < before, "max/mean per GPU {before} → {after}");
    }
    let text = String::from_utf8_lossy(&plan_run(&[]).stdout).into_owned();
    assert!(text.contains("(loads summed over 3 steps)") && text.contains("node 0 gpu 3: experts"), "{text}");

    let bad = flotilla(&[
        "experts",
        "plan",
        "--loads",
        w,
        "--replicas",
        "18",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
    ]);
    let stderr = failure(&bad);
    assert!(
        stderr.contains("weights.json") && stderr.contains("replicas = 18 does not divide over the 8 GPUs"),
        "{stderr}"
    );
    std::fs::write(dir.join("junk.jsonl"), "{\"step\": 1}\n").unwrap();
    let junk = dir.join("junk.jsonl");
    let stderr = failure(&flotilla(&[
        "experts",
        "plan",
        "--loads",
        junk.to_str().unwrap(),
        "--replicas",
        "16",
        "--nodes",
        "1",
    ]));
    assert!(stderr.contains("junk.jsonl:1: not a metrics.jsonl step record"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
