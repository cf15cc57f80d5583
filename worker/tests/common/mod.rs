//! What the worker crate's integration tests share.
// Not every test binary that includes this module uses every helper.
#![allow(dead_code)]

use std::path::Path;

use flotilla_coordinator::placement::{Parallel, Placement};
use flotilla_model::ModelConfig;
use flotilla_model::train::TrainConfig;
use flotilla_worker::comm::{DataPlaneSecret, TcpCommunicator, TcpOptions, loopback_group};
use flotilla_worker::pipeline::{PipelinePlan, PipelineTrainer};

/// A run of the tiny model on synthetic data with one thread: `steps` steps of
/// `batch_size` sequences of `seq_len` tokens in `precision`, seeded with `seed`,
/// `warmup_steps` of warm-up then a constant learning rate.
pub fn tiny_run(
    seed: u64,
    steps: u64,
    batch_size: usize,
    seq_len: usize,
    precision: &str,
    warmup_steps: u64,
) -> String {
    format!(
        r#"
seed = {seed}
steps = {steps}
batch_size = {batch_size}
seq_len = {seq_len}
threads = 1
precision = "{precision}"

[model]
preset = "tiny"

[data]
kind = "synthetic"
tokens = 65536

[optimizer]
peak_lr = 3e-3
warmup_steps = {warmup_steps}
constant_steps = 10
decay_steps = 0
final_lr = 3e-3
"#
    )
}

/// A small run of the tiny model (4 sequences of 32 tokens, one thread, synthetic data)
/// with `steps` steps, as a run's TOML.
pub fn small_run(steps: u64) -> String {
    tiny_run(5, steps, 4, 32, "fp32", 2)
}

/// A run's TOML parsed (relative paths from the working directory).
pub fn parse(toml: &str) -> (TrainConfig, ModelConfig) {
    TrainConfig::from_toml(toml, Path::new(".")).expect("the test config parses")
}

/// What one rank of [`run_ranks`] gets: its world rank, its trainer (built from its
/// assignment, after `adjust` had the plan), its data plane and the runtime it waits on.
pub struct Rank<'a> {
    pub g: usize,
    pub trainer: PipelineTrainer,
    pub comm: &'a TcpCommunicator,
    pub handle: tokio::runtime::Handle,
    pub placement: &'a Placement,
}

/// Places `toml` under `layout` and runs `body` for every world rank on its own thread,
/// each with a loopback TCP data plane; `adjust` may change a rank's plan first (node ids).
/// Returns the ranks' results in world-rank order.
pub fn run_ranks<R: Send>(
    toml: &str,
    layout: Parallel,
    adjust: impl Fn(usize, PipelinePlan) -> PipelinePlan + Sync,
    body: impl Fn(Rank<'_>) -> R + Sync,
) -> Vec<R> {
    let (config, model) = parse(toml);
    let placement = Placement::new(layout, &model, config.seq_len as u32).expect("the layout places");
    let world = placement.world_size() as usize;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let comms = runtime
        .block_on(loopback_group(world, TcpOptions::new(7, DataPlaneSecret::random())))
        .expect("loopback data plane");
    let (model, placement, adjust, body) = (&model, &placement, &adjust, &body);
    std::thread::scope(|scope| {
        let runs: Vec<_> = comms
            .iter()
            .enumerate()
            .map(|(g, comm)| {
                let (config, handle) = (config.clone(), runtime.handle().clone());
                scope.spawn(move || {
                    let assignment = placement.assignment(g as u32);
                    let plan =
                        PipelinePlan::from_assignment(&assignment, g, world, model).expect("a valid plan");
                    let trainer =
                        PipelineTrainer::new(config, model, adjust(g, plan)).expect("the rank builds");
                    body(Rank { g, trainer, comm, handle, placement })
                })
            })
            .collect();
        runs.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
    })
}
