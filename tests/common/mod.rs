//! What the binary's end-to-end tests share: running `flotilla`, checking how it ended,
//! fresh temporary directories and reading `metrics.jsonl`. Each test file uses some.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs the `flotilla` binary built for this test with `args`, to completion.
pub fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla")).args(args).output().expect("run flotilla")
}

/// Runs `flotilla` with `args` in the working directory `dir`, to completion.
pub fn flotilla_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla")).current_dir(dir).args(args).output().expect("run flotilla")
}

/// Its stdout, after asserting that it succeeded (its stderr in the message otherwise).
pub fn ok(out: &Output) -> String {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Its stderr, after asserting that it failed cleanly (an error, not a panic).
pub fn failure(out: &Output) -> String {
    assert!(!out.status.success(), "should fail; stdout: {}", String::from_utf8_lossy(&out.stdout));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// An empty directory `flotilla-test-{name}-{pid}` under the system's temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every record of a run's `metrics.jsonl`, in order.
pub fn records(metrics: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(metrics)
        .unwrap_or_else(|e| panic!("{}: {e}", metrics.display()))
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The `loss` of every record of a run's `metrics.jsonl`.
pub fn losses(metrics: &Path) -> Vec<f64> {
    records(metrics).iter().map(|r| r["loss"].as_f64().unwrap()).collect()
}
