//! The `flotilla` binary end to end: the README's main command, its JSON output, and its
//! errors on bad input.

use std::process::Command;

fn flotilla(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().expect("run flotilla")
}

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
