//! `flotilla-bench`: load benchmarks of flotilla's services, kept out of the user's binary
//! (`flotilla bench` times kernels and checkpoints on a node; this binary loads a
//! coordinator with thousands of simulated workers).
//!
//! `control-plane` starts the coordinator under test as a child process of this binary,
//! with the hidden `coordinator` subcommand: the same service, configured from the same
//! flags, as `flotilla coordinator`.

mod control_plane;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use flotilla_coordinator::service::{CoordinatorConfig, bind_and_serve};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// flotilla-bench: load benchmarks of flotilla's control plane (see BENCHMARKS.md).
#[derive(Parser)]
#[command(name = "flotilla-bench", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One coordinator (a child process) against many simulated workers over gRPC on
    /// loopback: its CPU, heartbeat handling latency, memory, and failure detection time.
    ControlPlane(control_plane::ControlPlaneArgs),
    /// The coordinator under test (what `control-plane` starts): serves until Ctrl-C.
    #[command(hide = true)]
    Coordinator(CoordinatorArgs),
}

/// The flags of `flotilla coordinator` that the bench sets.
#[derive(Args)]
struct CoordinatorArgs {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long)]
    heartbeat_interval_ms: u64,
    #[arg(long)]
    heartbeat_timeout_ms: u64,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let result = match Cli::parse().command {
        Command::ControlPlane(args) => control_plane::run(args),
        Command::Coordinator(args) => coordinator(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Serves the coordinator as `flotilla coordinator` does, and says where it listens on
/// stderr (the line the bench waits for).
fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let config = CoordinatorConfig {
            listen: args.listen,
            heartbeat_interval: Duration::from_millis(args.heartbeat_interval_ms),
            heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
            ..CoordinatorConfig::new(args.state_dir)
        };
        let handle = bind_and_serve(config).await?;
        eprintln!("flotilla coordinator listening on {} (Ctrl-C stops it)", handle.local_addr());
        tokio::signal::ctrl_c().await.context("waiting for Ctrl-C")?;
        handle.shutdown().await?;
        Ok(())
    })
}
