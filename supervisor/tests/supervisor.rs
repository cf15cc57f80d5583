//! The supervisor on real child processes (`sh`, `sleep`): exit statuses, the restart
//! policy, logs, kill and stop by pid, and that nothing it started outlives it.
//!
//! Every wait is bounded by [`PATIENCE`], which is how long a test waits before it fails,
//! not a performance bound: no assertion is on elapsed time.

use flotilla_supervisor::{Event, Exit, Output, ProcessSpec, RestartPolicy, Supervisor, SupervisorError};
use std::path::PathBuf;
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(60);

fn temp_file(name: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("flotilla-supervisor-{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn sh(name: &str, script: &str) -> ProcessSpec {
    ProcessSpec::new(name, "sh").args(["-c", script])
}

/// Polls until `done` says the events so far are enough.
async fn poll_until(supervisor: &mut Supervisor, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut events = Vec::new();
    while !done(&events) {
        assert!(tokio::time::Instant::now() < deadline, "no end within {PATIENCE:?}: {events:?}");
        events.extend(supervisor.poll().expect("poll"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    events
}

/// Whether `pid` is gone or a zombie: killed, whether or not reaped yet.
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn a_failing_process_is_restarted_as_often_as_allowed_with_doubling_backoff() {
    let log = temp_file("restarts.log");
    let mut spec = sh("failer", "echo \"$GREETING\"; exit 3").env("GREETING", "hello");
    spec.stdout = Output::Append(log.clone());
    spec.restart = RestartPolicy { max_restarts: 2, backoff: Duration::from_millis(1) };
    let mut supervisor = Supervisor::new();
    let id = supervisor.start(spec).unwrap();
    assert_eq!(supervisor.name(id), Some("failer"));
    let first = supervisor.pid(id).expect("running");
    let events = poll_until(&mut supervisor, |e| matches!(e.last(), Some(Event::GaveUp { .. }))).await;

    // Started, exited, restarted, exited, restarted, exited with none left.
    assert_eq!(events.len(), 5, "{events:?}");
    let mut pids = vec![first];
    for (k, event) in events.iter().enumerate() {
        match (k, event) {
            (0 | 2, Event::Exited { id: got, pid, exit, restart_in }) => {
                assert_eq!(*got, id);
                assert_eq!(*pid, *pids.last().unwrap(), "the exit names the pid that exited");
                assert_eq!(exit.code(), Some(3), "{exit}");
                assert_eq!(exit.to_string(), "exit status: 3");
                // Doubling from the first backoff: 1 ms, then 2 ms.
                assert_eq!(*restart_in, Duration::from_millis(1 << (k / 2)));
            }
            (1 | 3, Event::Restarted { id: got, pid }) => {
                assert_eq!(*got, id);
                assert!(!pids.contains(pid), "a restart is a new process: {pid} in {pids:?}");
                pids.push(*pid);
            }
            (4, Event::GaveUp { id: got, pid, exit }) => {
                assert_eq!(*got, id);
                assert_eq!(*pid, pids[2]);
                assert_eq!(exit.code(), Some(3));
            }
            _ => panic!("event {k} out of order: {events:?}"),
        }
    }
    assert_eq!(supervisor.restarts(id), 2);
    assert_eq!(supervisor.alive(), 0);
    assert_eq!(supervisor.pid(id), None);
    // Down for good: no further events.
    assert!(supervisor.poll().unwrap().is_empty());
    // Every run appended to the same log, with the environment it was given.
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello\nhello\nhello\n");
    std::fs::remove_file(&log).unwrap();
}

#[test]
fn the_backoff_doubles_per_restart_and_stops_doubling_at_two_to_the_twenty() {
    let policy = RestartPolicy { max_restarts: 100, backoff: Duration::from_millis(100) };
    assert_eq!(policy.delay(0), Duration::from_millis(100));
    assert_eq!(policy.delay(1), Duration::from_millis(200));
    assert_eq!(policy.delay(3), Duration::from_millis(800));
    assert_eq!(policy.delay(20), Duration::from_millis(100 << 20));
    assert_eq!(policy.delay(50), Duration::from_millis(100 << 20));
    assert_eq!(RestartPolicy::NEVER.max_restarts, 0);
}

#[tokio::test]
async fn a_process_killed_by_pid_is_replaced_and_shutdown_reaps_the_replacement() {
    let mut spec = ProcessSpec::new("sleeper", "sleep").arg("1000");
    spec.restart = RestartPolicy { max_restarts: 1, backoff: Duration::ZERO };
    let mut supervisor = Supervisor::new();
    let id = supervisor.start(spec).unwrap();
    let pid = supervisor.pid(id).unwrap();
    assert_eq!(supervisor.by_pid(pid), Some(id));
    assert_eq!(supervisor.by_pid(pid.wrapping_add(1_000_000)), None);
    assert!(supervisor.poll().unwrap().is_empty(), "sleep 1000 is still running");

    assert_eq!(supervisor.kill(id), Some(pid));
    let events =
        poll_until(&mut supervisor, |e| e.iter().any(|e| matches!(e, Event::Restarted { .. }))).await;
    let Event::Exited { pid: exited, exit, .. } = &events[0] else { panic!("{events:?}") };
    assert_eq!(*exited, pid);
    assert_eq!(exit.signal(), Some(9), "{exit}");
    assert!(exit.to_string().contains("SIGKILL"), "{exit}");
    let Some(Event::Restarted { pid: second, .. }) = events.last() else { panic!("{events:?}") };
    assert_ne!(*second, pid);
    assert!(dead(pid));
    assert_eq!(supervisor.by_pid(pid), None, "the old pid is no longer this process's");
    assert_eq!(supervisor.by_pid(*second), Some(id));

    // sleep ignores its stdin: the grace runs out and it is killed, then reaped.
    let ended = supervisor.shutdown(Duration::ZERO).await;
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].0, id);
    assert_eq!(ended[0].1.signal(), Some(9), "{}", ended[0].1);
    assert!(!std::path::Path::new(&format!("/proc/{second}")).exists(), "pid {second} was not reaped");
}

#[tokio::test]
async fn stop_closes_the_lifeline_first_and_kills_only_what_does_not_exit() {
    let mut supervisor = Supervisor::new();
    // Exits with 7 when its stdin closes.
    let mut listens = sh("listener", "read line; exit 7");
    listens.lifeline = true;
    listens.restart = RestartPolicy { max_restarts: 5, backoff: Duration::ZERO };
    let listener = supervisor.start(listens).unwrap();
    let mut deaf = ProcessSpec::new("deaf", "sleep").arg("1000");
    deaf.restart = RestartPolicy { max_restarts: 5, backoff: Duration::ZERO };
    let deaf = supervisor.start(deaf).unwrap();
    assert_eq!(supervisor.alive(), 2);

    let exit = supervisor.stop(listener, PATIENCE).await.unwrap().expect("it was running");
    assert_eq!(exit.code(), Some(7), "it exited on its own when its stdin closed: {exit}");
    let pid = supervisor.pid(deaf).unwrap();
    let exit = supervisor.stop(deaf, Duration::ZERO).await.unwrap().expect("it was running");
    assert_eq!(exit.signal(), Some(9), "{exit}");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "pid {pid} was not reaped");

    // Stopped for good despite their restarts left.
    assert_eq!(supervisor.alive(), 0);
    assert!(supervisor.poll().unwrap().is_empty());
    assert_eq!(supervisor.stop(deaf, Duration::ZERO).await.unwrap(), None);
    assert_eq!(supervisor.kill(deaf), None);
}

#[tokio::test]
async fn dropping_the_supervisor_kills_every_child() {
    let mut supervisor = Supervisor::new();
    let pids: Vec<u32> = (0..3)
        .map(|k| {
            let id = supervisor.start(ProcessSpec::new(format!("sleeper {k}"), "sleep").arg("1000")).unwrap();
            supervisor.pid(id).unwrap()
        })
        .collect();
    drop(supervisor);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !pids.iter().all(|&pid| dead(pid)) {
        assert!(tokio::time::Instant::now() < deadline, "children outlived the supervisor: {pids:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn errors_name_the_process_and_what_failed() {
    let mut supervisor = Supervisor::new();
    let missing = ProcessSpec::new("worker 4", "/nonexistent/flotilla");
    let error = supervisor.start(missing).unwrap_err();
    assert!(matches!(error, SupervisorError::Spawn { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.starts_with("starting worker 4 (/nonexistent/flotilla): "), "{message}");

    let mut logged = ProcessSpec::new("worker 5", "true");
    logged.stderr = Output::Append(PathBuf::from("/nonexistent/dir/worker.log"));
    let message = supervisor.start(logged).unwrap_err().to_string();
    assert!(message.contains("worker 5") && message.contains("/nonexistent/dir/worker.log"), "{message}");
    assert_eq!(supervisor.alive(), 0);

    assert_eq!(Exit::Unknown("no child".into()).to_string(), "no child");
}
