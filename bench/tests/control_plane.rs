//! `flotilla-bench control-plane` end to end: bad arguments refused, the coordinator's
//! own refusal passed on, and a small cluster measured with every figure present, of
//! simulated workers and of real agents.

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla-bench")).args(args).output().expect("run flotilla-bench")
}

#[test]
fn control_plane_measures_a_small_cluster_and_refuses_bad_arguments() {
    let out = bench(&["control-plane", "--workers", "0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("--workers must be at least 1"), "{stderr}");

    // The coordinator child refuses this pair; its reason is passed on and it is reaped.
    let out = bench(&[
        "control-plane",
        "--workers",
        "4",
        "--kills",
        "1",
        "--heartbeat-interval-ms",
        "1000",
        "--heartbeat-timeout-ms",
        "1000",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the coordinator did not start") && stderr.contains("heartbeat_timeout"),
        "{stderr}"
    );

    // A few seconds end to end: 8 workers, one hung and one dropped.
    let out = bench(&[
        "control-plane",
        "--workers",
        "8",
        "--kills",
        "1",
        "--heartbeat-interval-ms",
        "100",
        "--heartbeat-timeout-ms",
        "1000",
        "--measure-seconds",
        "1",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["heartbeats"]["listed"], 8, "{report}");
    assert!(report["heartbeats"]["handled_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert!(report["coordinator"]["rss_kib"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["detection"]["hung"]["detect_ms"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["detection"]["dropped"]["detect_ms"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["detection"]["false_losses"], 0, "{report}");
}

#[test]
fn control_plane_measures_real_agents() {
    let out = bench(&["control-plane", "--workers", "4", "--kills", "1", "--agent-job-steps", "2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--agent-job-steps needs --worker-kind agent"),
        "{stderr}"
    );

    // The real agent as the workers: 4 of them training the tiny model for 2 steps, then
    // one hung and one dropped.
    let out = bench(&[
        "control-plane",
        "--worker-kind",
        "agent",
        "--workers",
        "4",
        "--kills",
        "1",
        "--heartbeat-interval-ms",
        "100",
        "--heartbeat-timeout-ms",
        "1000",
        "--measure-seconds",
        "1",
        "--agent-job-steps",
        "2",
        "--json",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["worker_kind"], "agent", "{report}");
    assert_eq!(report["job"]["steps"], 2, "{report}");
    assert!(report["job"]["seconds"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["heartbeats"]["listed"], 4, "{report}");
    assert!(report["heartbeats"]["handled_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["heartbeats"]["unexpected_session_ends"], 0, "{report}");
    assert_eq!(report["detection"]["hung"]["detect_ms"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["detection"]["dropped"]["detect_ms"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["detection"]["false_losses"], 0, "{report}");
}
