//! flotilla's process supervisor: child processes started from a typed spec, watched,
//! started again under a restart policy, and stopped.
//!
//! A [`Supervisor`] starts each process from a [`ProcessSpec`] (program, arguments,
//! environment, where its output goes, whether it gets a lifeline, its [`RestartPolicy`]).
//! The caller drives it: [`Supervisor::poll`] notices exits and starts processes again once
//! their backoff has passed, [`Supervisor::kill`] kills one so that its policy replaces it,
//! [`Supervisor::stop`] stops one for good, and [`Supervisor::shutdown`] stops them all.
//! `flotilla run` supervises its workers with it; the node agent will supervise its node's
//! workers the same way.
//!
//! It knows nothing of what it runs: no flags, no training, no coordinator. What to start
//! and how often to restart it are the caller's.
//!
//! Invariants:
//! - No orphan: every child it started is either held by it or has been reaped. Dropping
//!   the supervisor sends SIGKILL to every child still running (tokio reaps them in the
//!   background); [`Supervisor::shutdown`] and [`Supervisor::stop`] return only once their
//!   children have been reaped.
//! - A process with a lifeline has its stdin on a pipe only the supervisor holds. The pipe
//!   closes when the process is stopped, and when the supervisor's process ends however it
//!   ends (even SIGKILL: the kernel closes it), so a child that exits when its stdin closes
//!   never outlives its supervisor.
//! - A process is started again only by [`Supervisor::poll`], only once its backoff has
//!   passed, and at most `max_restarts` times. Any exit counts, successful or not: a
//!   supervised process is meant to run until it is stopped. A process stopped with
//!   [`Supervisor::stop`] or out of restarts is never started again.
//! - Events name the process by its [`ProcessId`] and the pid it had; a pid is never
//!   reported for a process other than the one that had it.
//!
//! Unix only: exit statuses carry signals, and `kill` is SIGKILL.

use std::ffi::OsString;
use std::fmt;
use std::fs::OpenOptions;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// What to run, and how to restart it.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    /// What errors and logs call the process (`worker 3`).
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Set in the child's environment, over what it inherits.
    pub env: Vec<(OsString, OsString)>,
    pub stdout: Output,
    pub stderr: Output,
    /// Give the child a stdin pipe that only the supervisor holds (see the module doc);
    /// otherwise its stdin is `/dev/null`.
    pub lifeline: bool,
    pub restart: RestartPolicy,
}

impl ProcessSpec {
    /// `program` with no arguments, its output inherited, no lifeline, never restarted.
    pub fn new(name: impl Into<String>, program: impl Into<PathBuf>) -> ProcessSpec {
        ProcessSpec {
            name: name.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            stdout: Output::Inherit,
            stderr: Output::Inherit,
            lifeline: false,
            restart: RestartPolicy::NEVER,
        }
    }

    pub fn arg(mut self, arg: impl Into<OsString>) -> ProcessSpec {
        self.args.push(arg.into());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<OsString>>(mut self, args: I) -> ProcessSpec {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> ProcessSpec {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// Where a child's stdout or stderr goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// The supervisor's own.
    Inherit,
    Null,
    /// Appended to this file (created if missing), so a restarted process's log follows its
    /// previous run's.
    Append(PathBuf),
}

/// How often a process that exits is started again, and how long after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed over the process's life; once used up, an exit is final.
    pub max_restarts: u32,
    /// The wait before the first restart; it doubles with each restart after.
    pub backoff: Duration,
}

impl RestartPolicy {
    /// An exit is final.
    pub const NEVER: RestartPolicy = RestartPolicy { max_restarts: 0, backoff: Duration::ZERO };

    /// The wait before the restart that follows `restarts` earlier ones:
    /// `backoff × 2^restarts`, the doubling capped at 2^20.
    pub fn delay(&self, restarts: u32) -> Duration {
        self.backoff.saturating_mul(1 << restarts.min(20))
    }
}

/// A process this supervisor started, across its restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProcessId(usize);

impl ProcessId {
    /// The order it was started in: 0 for the first [`Supervisor::start`].
    pub fn index(self) -> usize {
        self.0
    }
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    Status(ExitStatus),
    /// Its status could not be read (the wait failed); it is gone either way.
    Unknown(String),
}

impl Exit {
    /// The exit code, if it exited rather than being killed by a signal.
    pub fn code(&self) -> Option<i32> {
        match self {
            Exit::Status(status) => status.code(),
            Exit::Unknown(_) => None,
        }
    }

    /// The signal that killed it, if one did.
    pub fn signal(&self) -> Option<i32> {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Exit::Status(status) => status.signal(),
            Exit::Unknown(_) => None,
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Status(status) => write!(f, "{status}"),
            Exit::Unknown(why) => f.write_str(why),
        }
    }
}

/// What [`Supervisor::poll`] saw happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The process (then `pid`) ended; it starts again after `restart_in`.
    Exited { id: ProcessId, pid: u32, exit: Exit, restart_in: Duration },
    /// The process (then `pid`) ended with no restarts left: it stays down.
    GaveUp { id: ProcessId, pid: u32, exit: Exit },
    /// The process was started again, as `pid`.
    Restarted { id: ProcessId, pid: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The program could not be started (missing, not executable, out of processes).
    #[error("starting {name} ({program}): {error}")]
    Spawn { name: String, program: String, error: std::io::Error },
    /// A log file given as [`Output::Append`] could not be opened.
    #[error("starting {name}: opening its log {path}: {error}")]
    Log { name: String, path: String, error: std::io::Error },
    /// Waiting for a process to end failed.
    #[error("{name} (pid {pid}): waiting for it to exit: {error}")]
    Wait { name: String, pid: u32, error: std::io::Error },
}

enum State {
    Running(Child),
    /// Exited; starts again at this instant.
    Backoff(Instant),
    /// Exited with no restarts left, or stopped: never starts again.
    Down,
}

struct Slot {
    spec: ProcessSpec,
    state: State,
    /// The pid of the last process started: kept apart because a reaped child no longer
    /// tells it.
    pid: u32,
    /// Times the process was started again.
    restarts: u32,
}

/// Child processes, held until they are stopped; see the module doc for the invariants.
#[derive(Default)]
pub struct Supervisor {
    slots: Vec<Slot>,
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::default()
    }

    /// Starts `spec` now. Needs a tokio runtime (with its I/O and process drivers).
    pub fn start(&mut self, spec: ProcessSpec) -> Result<ProcessId, SupervisorError> {
        let child = spawn(&spec)?;
        let pid = child.id().unwrap_or_default();
        self.slots.push(Slot { spec, state: State::Running(child), pid, restarts: 0 });
        Ok(ProcessId(self.slots.len() - 1))
    }

    /// The name its spec gave the process.
    pub fn name(&self, id: ProcessId) -> Option<&str> {
        self.slots.get(id.0).map(|s| s.spec.name.as_str())
    }

    /// Its pid, while it runs.
    pub fn pid(&self, id: ProcessId) -> Option<u32> {
        let slot = self.slots.get(id.0)?;
        matches!(slot.state, State::Running(_)).then_some(slot.pid)
    }

    /// The process that runs as `pid`, if it is one of these.
    pub fn by_pid(&self, pid: u32) -> Option<ProcessId> {
        self.slots.iter().position(|s| s.pid == pid && matches!(s.state, State::Running(_))).map(ProcessId)
    }

    /// Times the process has been started again.
    pub fn restarts(&self, id: ProcessId) -> u32 {
        self.slots.get(id.0).map_or(0, |s| s.restarts)
    }

    /// Processes running (not exited or waiting out a backoff).
    pub fn alive(&self) -> usize {
        self.slots.iter().filter(|s| matches!(s.state, State::Running(_))).count()
    }

    /// Notices exits, and starts again the processes whose backoff has passed. Never
    /// blocks. A restart that fails to start is an error; the process stays due, so a
    /// later call tries again.
    pub fn poll(&mut self) -> Result<Vec<Event>, SupervisorError> {
        let mut events = Vec::new();
        let now = Instant::now();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            let id = ProcessId(index);
            match &mut slot.state {
                State::Running(child) => {
                    let exit = match child.try_wait() {
                        Ok(None) => continue,
                        Ok(Some(status)) => Exit::Status(status),
                        Err(e) => Exit::Unknown(e.to_string()),
                    };
                    if slot.restarts >= slot.spec.restart.max_restarts {
                        slot.state = State::Down;
                        events.push(Event::GaveUp { id, pid: slot.pid, exit });
                        continue;
                    }
                    let restart_in = slot.spec.restart.delay(slot.restarts);
                    slot.state = State::Backoff(now + restart_in);
                    events.push(Event::Exited { id, pid: slot.pid, exit, restart_in });
                }
                State::Backoff(at) if *at <= now => {
                    let child = spawn(&slot.spec)?;
                    slot.pid = child.id().unwrap_or_default();
                    slot.state = State::Running(child);
                    slot.restarts += 1;
                    events.push(Event::Restarted { id, pid: slot.pid });
                }
                State::Backoff(_) | State::Down => {}
            }
        }
        Ok(events)
    }

    /// Sends SIGKILL to the process if it still runs, and returns its pid; its restart
    /// policy applies when [`Supervisor::poll`] sees it exit. For a process that is alive
    /// but useless (stopped, hung).
    pub fn kill(&mut self, id: ProcessId) -> Option<u32> {
        let slot = self.slots.get_mut(id.0)?;
        let State::Running(child) = &mut slot.state else { return None };
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.start_kill();
            return Some(slot.pid);
        }
        None
    }

    /// Stops the process for good: its lifeline closes, it has `grace` to exit on its own,
    /// then it is killed; it is reaped either way and never started again. Returns how it
    /// ended, or `None` if it was not running.
    pub async fn stop(&mut self, id: ProcessId, grace: Duration) -> Result<Option<Exit>, SupervisorError> {
        let Some(slot) = self.slots.get_mut(id.0) else { return Ok(None) };
        let State::Running(child) = &mut slot.state else {
            slot.state = State::Down;
            return Ok(None);
        };
        drop(child.stdin.take());
        let exit = end(child, tokio::time::Instant::now() + grace).await;
        slot.state = State::Down;
        match exit {
            Ok(status) => Ok(Some(Exit::Status(status))),
            Err(error) => Err(SupervisorError::Wait { name: slot.spec.name.clone(), pid: slot.pid, error }),
        }
    }

    /// Stops every process: all lifelines close at once, each process has until `grace`
    /// from now to exit on its own, then it is killed. All are reaped before this returns.
    /// Returns how each that was running ended.
    pub async fn shutdown(mut self, grace: Duration) -> Vec<(ProcessId, Exit)> {
        for slot in &mut self.slots {
            if let State::Running(child) = &mut slot.state {
                drop(child.stdin.take());
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut ended = Vec::new();
        for (index, slot) in self.slots.iter_mut().enumerate() {
            if let State::Running(child) = &mut slot.state {
                let exit = match end(child, deadline).await {
                    Ok(status) => Exit::Status(status),
                    Err(e) => Exit::Unknown(e.to_string()),
                };
                ended.push((ProcessId(index), exit));
            }
            slot.state = State::Down;
        }
        ended
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // kill_on_drop would do the same as each child drops; done here so that the
        // invariant does not rest on how each was spawned.
        for slot in &mut self.slots {
            if let State::Running(child) = &mut slot.state {
                let _ = child.start_kill();
            }
        }
    }
}

/// Waits for `child` until `deadline`, then kills it; reaps it either way.
async fn end(child: &mut Child, deadline: tokio::time::Instant) -> std::io::Result<ExitStatus> {
    match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            // An already-exited child makes kill fail harmlessly; waiting reaps it.
            let _ = child.start_kill();
            child.wait().await
        }
    }
}

fn stdio(spec: &ProcessSpec, output: &Output) -> Result<Stdio, SupervisorError> {
    Ok(match output {
        Output::Inherit => Stdio::inherit(),
        Output::Null => Stdio::null(),
        Output::Append(path) => {
            let file = OpenOptions::new().create(true).append(true).open(path).map_err(|error| {
                SupervisorError::Log { name: spec.name.clone(), path: path.display().to_string(), error }
            })?;
            Stdio::from(file)
        }
    })
}

fn spawn(spec: &ProcessSpec) -> Result<Child, SupervisorError> {
    let mut command = Command::new(&spec.program);
    command
        .args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(if spec.lifeline { Stdio::piped() } else { Stdio::null() })
        .stdout(stdio(spec, &spec.stdout)?)
        .stderr(stdio(spec, &spec.stderr)?)
        .kill_on_drop(true);
    command.spawn().map_err(|error| SupervisorError::Spawn {
        name: spec.name.clone(),
        program: spec.program.display().to_string(),
        error,
    })
}
