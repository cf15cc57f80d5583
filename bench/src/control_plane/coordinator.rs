//! The coordinator under test: a child process of this binary, and what /proc says of it.

use super::ControlPlaneArgs;
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long the coordinator may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Linux's USER_HZ, the unit of utime and stime in /proc/<pid>/stat: 100 on every
/// architecture Linux exposes to user space through /proc.
const TICKS_PER_SECOND: f64 = 100.0;

/// What the coordinator wrote to stderr after it started listening.
#[derive(Default)]
pub(super) struct Log {
    pub(super) lines: u64,
    pub(super) tail: Vec<String>,
}

pub(super) const LOG_TAIL: usize = 20;

/// The coordinator child, killed and reaped when dropped, whatever way the bench ends.
pub(super) struct CoordinatorProcess {
    pub(super) child: Child,
    pub(super) addr: SocketAddr,
    pub(super) log: Arc<Mutex<Log>>,
    // Dropped after the child is reaped (fields drop after `drop`).
    pub(super) _state_dir: tempfile::TempDir,
}

impl CoordinatorProcess {
    /// Starts `flotilla-bench coordinator` on an ephemeral loopback port and waits for the line
    /// that says where it listens. Port 0 lets the kernel choose a free port atomically;
    /// choosing one here and passing it on would race other processes for it.
    pub(super) fn start(args: &ControlPlaneArgs) -> Result<CoordinatorProcess> {
        let exe =
            std::env::current_exe().context("locating the flotilla-bench binary to start the coordinator")?;
        let state_dir =
            tempfile::tempdir().context("creating a temporary state directory for the coordinator")?;
        let mut child = Command::new(&exe)
            .arg("coordinator")
            .args(["--listen", "127.0.0.1:0"])
            .arg("--state-dir")
            .arg(state_dir.path())
            .args(["--heartbeat-interval-ms", &args.heartbeat_interval_ms.to_string()])
            .args(["--heartbeat-timeout-ms", &args.heartbeat_timeout_ms.to_string()])
            // Warnings only, whatever the caller's RUST_LOG: logging per worker would be
            // measured as the coordinator's CPU.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting the coordinator ({} coordinator)", exe.display()))?;
        let stderr = child.stderr.take();
        let log = Arc::new(Mutex::new(Log::default()));
        // From here on, every way out kills and reaps the child.
        let mut process = CoordinatorProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: log.clone(),
            _state_dir: state_dir,
        };
        let stderr = stderr.context("the coordinator's stderr was not captured")?;
        let (found, listening) = std::sync::mpsc::channel::<std::result::Result<SocketAddr, String>>();
        std::thread::Builder::new()
            .name("coordinator-stderr".into())
            .spawn(move || read_stderr(stderr, found, log))
            .context("starting the thread that reads the coordinator's stderr")?;
        match listening.recv_timeout(START_TIMEOUT) {
            Ok(Ok(addr)) => {
                process.addr = addr;
                Ok(process)
            }
            Ok(Err(output)) => {
                let status = process.child.wait().context("waiting for the coordinator")?;
                bail!("the coordinator did not start ({status}): {}", output.trim())
            }
            Err(_) => {
                bail!("the coordinator did not say where it listens within {} s", START_TIMEOUT.as_secs())
            }
        }
    }

    pub(super) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills and reaps the child; returns what it logged.
    pub(super) fn stop(mut self) -> Log {
        self.kill();
        self.log.lock().map(|mut log| std::mem::take(&mut *log)).unwrap_or_default()
    }

    pub(super) fn kill(&mut self) {
        // Fails harmlessly when the child already exited; waiting reaps it either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the coordinator's stderr: until the "listening on ADDR" line, everything is kept
/// for an error message; after it, lines are counted and the last few kept.
pub(super) fn read_stderr(
    stderr: std::process::ChildStderr,
    found: std::sync::mpsc::Sender<std::result::Result<SocketAddr, String>>,
    log: Arc<Mutex<Log>>,
) {
    let mut before = String::new();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let Ok(line) = line else { break };
        let addr = line
            .split_once("listening on ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|addr| addr.parse::<SocketAddr>().ok());
        if let Some(addr) = addr {
            let _ = found.send(Ok(addr));
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Ok(mut log) = log.lock() {
                    log.lines += 1;
                    if log.tail.len() == LOG_TAIL {
                        log.tail.remove(0);
                    }
                    log.tail.push(line);
                }
            }
            return;
        }
        before.push_str(&line);
        before.push('\n');
    }
    let _ = found.send(Err(before));
}

/// CPU time (user + system) and memory of a process, from /proc.
pub(super) struct ProcSample {
    pub(super) at: Instant,
    pub(super) cpu_seconds: f64,
}

pub(super) fn cpu_sample(pid: &str) -> Result<ProcSample> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let at = Instant::now();
    // The command name (field 2) may hold spaces; the fields after its ')' are fixed.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let ticks = |field: usize| -> Result<f64> {
        let value = fields.get(field - 3).with_context(|| format!("{path}: no field {field}"))?;
        Ok(value.parse::<u64>().with_context(|| format!("{path}: field {field} is {value:?}"))? as f64)
    };
    Ok(ProcSample { at, cpu_seconds: (ticks(14)? + ticks(15)?) / TICKS_PER_SECOND })
}

pub(super) fn cores_between(start: &ProcSample, end: &ProcSample) -> f64 {
    let wall = end.at.duration_since(start.at).as_secs_f64();
    if wall > 0.0 { (end.cpu_seconds - start.cpu_seconds) / wall } else { 0.0 }
}

/// A field of /proc/<pid>/status: a number, in kB for the memory ones.
pub(super) fn status_field(pid: &str, name: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let value = status
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        .with_context(|| format!("{path}: no {name}"))?;
    let number = value.split_whitespace().next().unwrap_or_default();
    number.parse().with_context(|| format!("{path}: {name} is {value:?}"))
}
