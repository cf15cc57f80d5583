//! Checkpoints across layouts: a pipeline job's ranks each write their shard
//! (`PipelineTrainer::snapshot`, `write_shard`), and the checkpoint is read back
//! (`CheckpointReader`) by the same layout, by another one and by single-process training,
//! and the other way round. Ranks are threads with their own TCP data plane on loopback,
//! as in `tests/pipeline.rs`, on the same tiny configuration.
//!
//! - The same layout continues bit for bit: a run interrupted after step 2 and resumed
//!   from its checkpoint takes steps 3 and 4 exactly as the uninterrupted run does.
//! - Another layout, or one process, continues within the equivalence tolerance of
//!   `tests/pipeline.rs` (relative 1e-5 in fp32: only the summation order differs), and
//!   the values it restores are exactly the ones the writers held.
//! - With data-parallel replicas (pp 2, ep 2, dp 2) the shards still make up the whole
//!   state, and a checkpoint of another seed or model is refused, changing nothing.

mod common;
use std::collections::HashMap;
use std::path::Path;

use flotilla_coordinator::placement::{Parallel, Placement};
use flotilla_coordinator::schedule::ScheduleKind;
use flotilla_model::ModelConfig;
use flotilla_model::shard::{CheckpointReader, ShardFile, step_dir, write_shard};
use flotilla_model::train::{StepRecord, TrainConfig, Trainer};
use flotilla_worker::pipeline::{PipelinePlan, PipelineTrainer};

/// Steps of the whole run.
const STEPS: u64 = 4;
/// The step after which the checkpoint is taken.
const CUT: u64 = 2;
/// `tests/pipeline.rs`'s tolerance between layouts in fp32.
const TOLERANCE: f64 = 1e-5;

/// `tests/pipeline.rs`'s configuration: the tiny model, 16 windows of 16 tokens per step.
fn run_toml() -> String {
    common::tiny_run(11, STEPS, 16, 16, "fp32", 1)
}

use common::parse;

fn parallel(pp: u32, ep: u32, dp: u32) -> Parallel {
    Parallel { pp, ep, dp, schedule: ScheduleKind::DualPipe, micro_batches: 2 * pp, overlap: true }
}

type Params = HashMap<String, Vec<f32>>;

/// One rank's outcome.
struct RankRun {
    /// The records of the steps it ran.
    records: Vec<StepRecord>,
    /// Its tensors after the restore (resumed runs only).
    restored: Option<Params>,
    /// Its shard and its tensors at the checkpoint (runs that write one).
    written: Option<(ShardFile, Params)>,
    /// Its tensors at the end.
    last: Params,
}

fn params_of(trainer: &PipelineTrainer) -> Params {
    trainer.model.params().into_iter().map(|p| (p.name.clone(), p.value.to_host_vec())).collect()
}

/// Runs every rank of `layout` up to step `STEPS`: each restores the checkpoint `resume`
/// first if given, and writes its shard of the checkpoint at step `CUT` under `root` if
/// given.
fn run_layout(
    toml: &str,
    layout: Parallel,
    resume: Option<(&Path, &[ShardFile])>,
    root: Option<&Path>,
) -> Vec<RankRun> {
    common::run_ranks(
        toml,
        layout,
        |_, plan| plan,
        |rank| {
            let common::Rank { g, mut trainer, comm, handle, .. } = rank;
            let restored = resume.map(|(dir, files)| {
                let reader = CheckpointReader::open(dir, files).expect("the checkpoint opens");
                trainer.restore(&reader).unwrap_or_else(|e| panic!("rank {g} restores: {e}"));
                assert_eq!(trainer.step(), reader.step());
                params_of(&trainer)
            });
            let (mut records, mut written) = (Vec::new(), None);
            while trainer.step() < STEPS {
                let step = trainer.run_step(comm, &handle).unwrap_or_else(|e| panic!("rank {g}: {e}"));
                records.push(step.record);
                if let Some(root) = root.filter(|_| trainer.step() == CUT) {
                    let snapshot = trainer.snapshot();
                    assert_eq!((snapshot.header.step, snapshot.header.rank), (CUT, g as u32));
                    let file = write_shard(&step_dir(root, CUT), &snapshot).expect("the shard is written");
                    written = Some((file, params_of(&trainer)));
                }
            }
            RankRun { records, restored, written, last: params_of(&trainer) }
        },
    )
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

/// The records of the same steps agree within `TOLERANCE` (losses, gradient norm) and
/// have the same expert loads.
fn assert_close(what: &str, got: &[StepRecord], want: &[StepRecord]) {
    assert_eq!(got.len(), want.len(), "{what}: steps run");
    for (got, want) in got.iter().zip(want) {
        assert_eq!(got.step, want.step, "{what}");
        for (field, a, b) in [
            ("loss", got.loss, want.loss),
            ("main_ce", got.main_ce, want.main_ce),
            ("mtp_ce", got.mtp_ce[0], want.mtp_ce[0]),
            ("balance_loss", got.balance_loss, want.balance_loss),
            ("grad_norm", got.grad_norm, want.grad_norm),
        ] {
            assert!(rel(a, b) < TOLERANCE, "{what}, step {}: {field} {a} vs {b}", got.step);
        }
        assert_eq!(got.expert_loads, want.expert_loads, "{what}, step {}: expert loads", got.step);
    }
}

/// Every tensor of `got` equals the one of that name in `want`, bit for bit.
fn assert_same_values(what: &str, got: &Params, want: &Params) {
    for (name, value) in got {
        let other = want.get(name).unwrap_or_else(|| panic!("{what}: {name} is missing"));
        assert_eq!(value.len(), other.len(), "{what}: {name}");
        assert!(value.iter().zip(other).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: {name} differs");
    }
}

fn trainer_params(trainer: &Trainer) -> Params {
    trainer.model.params().into_iter().map(|p| (p.name.clone(), p.value.to_host_vec())).collect()
}

#[test]
fn a_pipeline_checkpoint_resumes_bit_for_bit_and_reshards() {
    let toml = run_toml();
    let root = tempfile::tempdir().expect("a temporary directory");
    let layout = parallel(2, 2, 1);
    let whole = run_layout(&toml, layout, None, Some(root.path()));
    let dir = step_dir(root.path(), CUT);
    let files: Vec<ShardFile> =
        whole.iter().map(|r| r.written.as_ref().expect("a shard").0.clone()).collect();
    // What the ranks held at the checkpoint, every copy (replicas agree bit for bit).
    let mut held: Params = HashMap::new();
    for (g, run) in whole.iter().enumerate() {
        let at_cut = &run.written.as_ref().unwrap().1;
        let seen: Params = at_cut
            .iter()
            .filter(|(k, _)| held.contains_key(*k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_same_values(&format!("rank {g} vs the other holders"), &seen, &held);
        held.extend(at_cut.iter().map(|(k, v)| (k.clone(), v.clone())));
    }

    // The shards together name every tensor of the model (and the reader has checked
    // that the pieces cover each exactly once when it assembles them below).
    let (config, model) = parse(&toml);
    let reader = CheckpointReader::open(&dir, &files).expect("the checkpoint opens");
    assert_eq!((reader.step(), reader.world()), (CUT, 4));
    let mut trainer = Trainer::new(config, &model).expect("a single-process trainer");
    let mut names: Vec<String> = trainer.model.params().iter().map(|p| p.name.clone()).collect();
    let mut in_checkpoint = reader.value_names();
    names.sort();
    in_checkpoint.sort();
    assert_eq!(in_checkpoint, names, "the checkpoint's tensors are the model's");

    // The same layout: steps 3 and 4 bit for bit.
    let resumed = run_layout(&toml, layout, Some((&dir, &files)), None);
    for (g, (a, b)) in resumed.iter().zip(&whole).enumerate() {
        assert_same_values(&format!("rank {g} restored"), a.restored.as_ref().unwrap(), &held);
        assert_eq!(a.records.len(), 2);
        for (r, s) in a.records.iter().zip(&b.records[CUT as usize..]) {
            assert_eq!(r.step, s.step);
            assert_eq!(r.loss.to_bits(), s.loss.to_bits(), "rank {g} step {}: loss", r.step);
            assert_eq!(r.grad_norm.to_bits(), s.grad_norm.to_bits(), "rank {g} step {}: grad norm", r.step);
            assert_eq!(r.expert_loads, s.expert_loads, "rank {g} step {}", r.step);
        }
        assert_same_values(&format!("rank {g} at the end"), &a.last, &b.last);
    }
    let uninterrupted = &whole[0].records[CUT as usize..];

    // One process: exactly the values the ranks held, then the same steps to rounding.
    trainer.restore(&reader).expect("a single process restores a pipeline checkpoint");
    assert_eq!(trainer.step(), CUT);
    let restored = trainer_params(&trainer);
    assert_eq!(restored.len(), held.len());
    assert_same_values("the single process restored", &restored, &held);
    let records: Vec<StepRecord> = (CUT..STEPS).map(|_| trainer.train_step().expect("a step")).collect();
    assert_close("one process after a pp 2 / ep 2 checkpoint", &records, uninterrupted);

    // Another layout: pp 2, ep 1.
    let other = run_layout(&toml, parallel(2, 1, 1), Some((&dir, &files)), None);
    for (g, run) in other.iter().enumerate() {
        assert_same_values(&format!("pp 2 / ep 1 rank {g} restored"), run.restored.as_ref().unwrap(), &held);
        assert_close(&format!("pp 2 / ep 1 rank {g}"), &run.records, uninterrupted);
    }
}

#[test]
fn a_single_process_checkpoint_resumes_a_pipeline_layout() {
    let toml = run_toml();
    let root = tempfile::tempdir().expect("a temporary directory");
    let (config, model) = parse(&toml);
    let mut trainer = Trainer::new(config, &model).expect("a single-process trainer");
    for _ in 0..CUT {
        trainer.train_step().expect("a step");
    }
    // Written as two data-parallel ranks would.
    let dir = step_dir(root.path(), CUT);
    let files: Vec<ShardFile> =
        (0..2).map(|r| write_shard(&dir, &trainer.snapshot(r, 2)).expect("the shard is written")).collect();
    let held = trainer_params(&trainer);
    let records: Vec<StepRecord> = (CUT..STEPS).map(|_| trainer.train_step().expect("a step")).collect();

    let runs = run_layout(&toml, parallel(2, 2, 1), Some((&dir, &files)), None);
    for (g, run) in runs.iter().enumerate() {
        assert_same_values(&format!("rank {g} restored"), run.restored.as_ref().unwrap(), &held);
        assert_close(
            &format!("pp 2 / ep 2 rank {g} after a single-process checkpoint"),
            &run.records,
            &records,
        );
    }
}

#[test]
fn a_checkpoint_of_another_seed_or_model_is_refused_and_nothing_changes() {
    let toml = run_toml();
    let root = tempfile::tempdir().expect("a temporary directory");
    let (config, model) = parse(&toml);
    let mut trainer = Trainer::new(config.clone(), &model).expect("a single-process trainer");
    trainer.train_step().expect("a step");
    let dir = step_dir(root.path(), 1);
    let files = vec![write_shard(&dir, &trainer.snapshot(0, 1)).expect("the shard is written")];
    let reader = CheckpointReader::open(&dir, &files).expect("the checkpoint opens");

    let placement =
        Placement::new(parallel(2, 2, 1), &model, config.seq_len as u32).expect("the layout places");
    let rank = |config: TrainConfig, model: &ModelConfig| {
        let plan =
            PipelinePlan::from_assignment(&placement.assignment(1), 1, 4, model).expect("a valid plan");
        PipelineTrainer::new(config, model, plan).expect("the rank builds")
    };

    let mut other_seed = config.clone();
    other_seed.seed += 1;
    let mut pipeline = rank(other_seed, &model);
    let before = params_of(&pipeline);
    let err = pipeline.restore(&reader).expect_err("another seed is refused");
    assert!(err.contains("seed"), "{err}");
    assert_eq!(pipeline.step(), 0);
    assert_same_values("after a refused restore", &params_of(&pipeline), &before);

    let mut other_model = model.clone();
    other_model.rms_norm_eps *= 2.0;
    let err = rank(config, &other_model).restore(&reader).expect_err("another model is refused");
    assert!(err.contains("rms_norm_eps"), "{err}");
}

/// With data-parallel replicas too (pp 2, ep 2, dp 2: every holder group has replicas, so
/// ZeRO-1 parts are smaller than tensors and experts' groups span replicas), the shards
/// still make up the whole state: one process restores exactly what the ranks held and
/// continues as the layout does.
#[test]
fn a_layout_with_replicas_writes_a_whole_checkpoint() {
    let toml = run_toml();
    let root = tempfile::tempdir().expect("a temporary directory");
    let whole = run_layout(&toml, parallel(2, 2, 2), None, Some(root.path()));
    let dir = step_dir(root.path(), CUT);
    let files: Vec<ShardFile> =
        whole.iter().map(|r| r.written.as_ref().expect("a shard").0.clone()).collect();
    let reader = CheckpointReader::open(&dir, &files).expect("the checkpoint opens");
    assert_eq!(reader.world(), 8);
    let (config, model) = parse(&toml);
    let mut trainer = Trainer::new(config, &model).expect("a single-process trainer");
    trainer.restore(&reader).expect("a single process restores the checkpoint");
    let restored = trainer_params(&trainer);
    for (g, run) in whole.iter().enumerate() {
        assert_same_values(
            &format!("rank {g}'s tensors at the checkpoint"),
            &run.written.as_ref().unwrap().1,
            &restored,
        );
    }
    let records: Vec<StepRecord> = (CUT..STEPS).map(|_| trainer.train_step().expect("a step")).collect();
    assert_close(
        "one process after a pp 2 / ep 2 / dp 2 checkpoint",
        &records,
        &whole[0].records[CUT as usize..],
    );
}
