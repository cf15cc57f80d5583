//! `flotilla run` when a worker process dies: the run names the dead process and what the
//! coordinator made of it, fails, and leaves no process behind. (The coordinator's own
//! detection times are tested in the coordinator crate's `service` tests.)

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the test waits for anything before it gives up (not a performance bound).
const PATIENCE: Duration = Duration::from_secs(180);

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-faults-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The pids of `pid`'s children (of any of its threads).
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return found };
    for task in tasks.flatten() {
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        found.extend(list.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    found.sort_unstable();
    found.dedup();
    found
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn metrics_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|s| s.lines().count()).unwrap_or(0)
}

/// Whether a process exists (a zombie counts: it was not reaped).
fn exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_killed_worker_fails_the_run_with_the_reason_and_no_process_is_left_behind() {
    let dir = temp_dir("sigkill");
    let out = dir.join("out");
    // The README's main job, made too long to finish before the kill.
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tiny.toml");
    let mut run = Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(["run", config, "--workers", "2", "--steps", "100000", "--out", out.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flotilla run starts");

    // Mid-training: rank 0 has written a few steps.
    let started = Instant::now();
    while metrics_lines(&out.join("metrics.jsonl")) < 3 {
        if let Some(status) = run.try_wait().unwrap() {
            let output = run.wait_with_output().unwrap();
            panic!("the run ended early ({status}): {}", String::from_utf8_lossy(&output.stderr));
        }
        assert!(started.elapsed() < PATIENCE, "no training steps within {PATIENCE:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let workers = children(run.id());
    assert_eq!(workers.len(), 2, "two worker processes: {workers:?}");
    let victim =
        *workers.iter().find(|&&pid| cmdline(pid).contains("--worker-id worker-1")).unwrap_or_else(|| {
            panic!("no worker-1 among {:?}", workers.iter().map(|&p| cmdline(p)).collect::<Vec<_>>())
        });
    let killed = Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap();
    assert!(killed.success());

    let deadline = Instant::now() + PATIENCE;
    while run.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = run.kill();
            panic!("the run did not end within {PATIENCE:?} of a worker's death");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let output = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the run fails: {stderr}");
    // How the process ended, as the launcher saw it …
    assert!(stderr.contains(&format!("worker 1 (pid {victim}) exited: signal: 9")), "{stderr}");
    // … and the job's end as the coordinator recorded it.
    assert!(stderr.contains("job job-000001 ended failed: worker worker-"), "{stderr}");
    for pid in workers {
        assert!(!exists(pid), "worker pid {pid} is still there ({})", cmdline(pid));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
