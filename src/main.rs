//! The `flotilla` command: parses arguments, dispatches to the library crates, prints.
//! Nothing here computes; see ARCHITECTURE.md for where each thing lives.

mod bench;
mod checkpoint;
mod cluster;
mod data;
mod experts;
mod generate;
mod model_info;
mod plan;
mod repro;
mod schedule;
mod train;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tracing_subscriber::EnvFilter;

/// flotilla: a distributed training orchestrator for DeepSeek-V3-style Mixture-of-Experts
/// models (FP8 compute, expert parallelism, DualPipe, automatic recovery).
#[derive(Parser)]
#[command(name = "flotilla", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reproduce a numerical finding of the DeepSeek-V3 report on flotilla's kernels.
    Repro {
        #[command(subcommand)]
        experiment: repro::Experiment,
    },
    /// Train a model in this process (see examples/tiny.toml).
    Train(train::TrainArgs),
    /// Score tokens or text under a saved HF-layout DeepSeek-V3 checkpoint.
    Score(train::ScoreArgs),
    /// Generate text or tokens from a trained model (greedy, temperature, top-p; MTP
    /// speculative decoding), over MLA's compressed KV cache.
    Generate(generate::GenerateArgs),
    /// Print a model configuration's parameter breakdown (total, activated per token, MTP).
    ModelInfo(model_info::ModelInfoArgs),
    /// Lay a model out over a cluster (pipeline stages, expert shards, data parallelism) and
    /// estimate its memory per GPU, all-to-all traffic and step time; without --pp/--ep,
    /// propose the fastest layout that fits.
    Plan(plan::PlanArgs),
    /// Time a kernel on this machine (the thorough suite is `cargo bench`).
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
    /// Train across data-parallel worker processes: an in-process coordinator, N workers of
    /// this binary, progress until the job ends (see examples/tiny.toml).
    Run(cluster::RunArgs),
    /// Serve the coordinator: workers register with it, clients submit and watch jobs.
    Coordinator(cluster::CoordinatorArgs),
    /// Run a worker that registers with a coordinator and executes its assignments.
    Worker(cluster::WorkerArgs),
    /// Submit a run to a coordinator; prints the job id.
    Submit(cluster::SubmitArgs),
    /// List a coordinator's jobs.
    Jobs(cluster::JobsArgs),
    /// Follow a job's events (state changes, steps, workers joining and lost).
    Watch(cluster::WatchArgs),
    /// Cancel a job (needs an admin token where the coordinator has a token file).
    Cancel(cluster::CancelArgs),
    /// List the workers a coordinator counts alive, and its heartbeat handling latency.
    Workers(cluster::WorkersArgs),
    /// Compile, validate, simulate and draw a pipeline schedule (DualPipe, DualPipeV, 1F1B, ZB1P).
    Schedule(schedule::ScheduleArgs),
    /// Prepare (tokenize) text into a Megatron-LM indexed dataset, or inspect one.
    Data {
        #[command(subcommand)]
        command: data::DataCommand,
    },
    /// Plan redundant experts for deployment from recorded expert loads (DeepSeek's EPLB).
    Experts {
        #[command(subcommand)]
        command: experts::ExpertsCommand,
    },
    /// List, verify and export the checkpoints a run committed under RUN_DIR/checkpoints.
    Checkpoint {
        #[command(subcommand)]
        command: checkpoint::CheckpointCommand,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole chain of causes on one line, without a backtrace:
            // these are errors in what the user asked for, not bugs.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Repro { experiment } => repro::run(experiment),
        Command::Bench { bench } => bench::run(bench),
        Command::ModelInfo(args) => model_info::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Train(args) => train::train(args),
        Command::Score(args) => train::score(args),
        Command::Generate(args) => generate::run(args),
        Command::Schedule(args) => schedule::run(args),
        Command::Run(args) => cluster::run(args),
        Command::Coordinator(args) => cluster::coordinator(args),
        Command::Worker(args) => cluster::worker(args),
        Command::Submit(args) => cluster::submit(args),
        Command::Jobs(args) => cluster::jobs(args),
        Command::Watch(args) => cluster::watch(args),
        Command::Workers(args) => cluster::workers(args),
        Command::Cancel(args) => cluster::cancel(args),
        Command::Checkpoint { command } => checkpoint::run(command),
        Command::Data { command } => data::run(command),
        Command::Experts { command } => experts::run(command),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks its definitions (flag names that `requires` refers to, duplicates) only
    /// when asked: a mistake would otherwise surface as a panic on a user's command line.
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
