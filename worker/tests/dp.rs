//! Data-parallel training over the TCP data plane: 1, 2 and 4 ranks in this process on
//! 127.0.0.1, each on its own task of a multi-threaded runtime, against one trainer taking
//! the whole batch.
//!
//! - Every rank's records are equal bit for bit (but for the wall-clock `tokens_per_s`),
//!   and so are the final weights.
//! - Losses equal single-process `Trainer::train_step`'s within a relative 1e-5 (the
//!   in-memory data-parallel test in `flotilla-model` holds the same bound; the measured
//!   differences are printed), gradient norms within 1e-4, expert loads exactly.
//! - Repeating a layout repeats its bits.

mod common;

use std::path::Path;
use std::time::Duration;

use flotilla_model::train::{StepRecord, TrainConfig, Trainer};
use flotilla_worker::comm::{DataPlaneSecret, TcpOptions, loopback_group};
use flotilla_worker::dp::{data_parallel_step, data_parallel_step_timed};
use tokio::time::timeout;

const STEPS: u64 = 3;
/// Generous: the machine running the suite may be small and shared.
const LIMIT: Duration = Duration::from_secs(300);

fn trainer() -> Trainer {
    let text = common::small_run(STEPS);
    let (config, model) = TrainConfig::from_toml(&text, Path::new(".")).expect("a valid config");
    Trainer::new(config, &model).expect("a trainer")
}

/// What must agree bit for bit: everything but the wall-clock throughput.
fn bits(r: &StepRecord) -> (u64, Vec<u64>, u64, Vec<Vec<u64>>) {
    let mut floats =
        vec![r.loss, r.main_ce, r.balance_loss, r.lr, r.grad_norm, r.max_expert_load, r.mean_expert_load];
    floats.extend(&r.mtp_ce);
    (
        r.step,
        floats.iter().map(|x| x.to_bits()).collect(),
        r.expert_loads.len() as u64,
        r.expert_loads.iter().map(|l| l.tokens.clone()).collect(),
    )
}

/// Per rank: the records of `STEPS` steps and the final weights.
async fn run_group(world: usize, session: u64) -> Vec<(Vec<StepRecord>, Vec<Vec<f32>>)> {
    let comms = timeout(LIMIT, loopback_group(world, TcpOptions::new(session, DataPlaneSecret::random())))
        .await
        .expect("rendezvous hung")
        .expect("rendezvous");
    let tasks: Vec<_> = comms
        .into_iter()
        .map(|comm| {
            tokio::spawn(async move {
                let mut t = trainer();
                let mut records = Vec::new();
                for _ in 0..STEPS {
                    records.push(data_parallel_step(&mut t, &comm).await.expect("a data-parallel step"));
                }
                comm.shutdown().await.expect("a clean shutdown");
                let weights = t.model.params().iter().map(|p| p.value.to_host_vec()).collect();
                (records, weights)
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.push(timeout(LIMIT, task).await.expect("a rank hung").expect("a rank panicked"));
    }
    out
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b { 0.0 } else { (a - b).abs() / b.abs() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranks_agree_and_match_one_process() {
    let mut single = trainer();
    let whole: Vec<StepRecord> = (0..STEPS).map(|_| single.train_step().expect("a step")).collect();
    let single_weights: Vec<Vec<f32>> = single.model.params().iter().map(|p| p.value.to_host_vec()).collect();

    for (world, session) in [(1, 11), (2, 12), (4, 14)] {
        let ranks = run_group(world, session).await;
        for (rank, (records, weights)) in ranks.iter().enumerate().skip(1) {
            for (a, b) in records.iter().zip(&ranks[0].0) {
                assert_eq!(
                    bits(a),
                    bits(b),
                    "world {world}: rank {rank} differs from rank 0 at step {}",
                    a.step
                );
            }
            assert!(weights == &ranks[0].1, "world {world}: rank {rank}'s weights differ from rank 0's");
        }
        let (mut max_loss, mut max_ce, mut max_norm) = (0.0f64, 0.0f64, 0.0f64);
        for (dp, one) in ranks[0].0.iter().zip(&whole) {
            assert_eq!(dp.step, one.step);
            assert_eq!(dp.expert_loads, one.expert_loads, "world {world} step {}: the same routing", dp.step);
            assert_eq!(dp.lr.to_bits(), one.lr.to_bits());
            max_loss = max_loss.max(rel(dp.loss, one.loss));
            max_ce = max_ce.max(rel(dp.main_ce, one.main_ce));
            for (a, b) in dp.mtp_ce.iter().zip(&one.mtp_ce) {
                max_ce = max_ce.max(rel(*a, *b));
            }
            max_norm = max_norm.max(rel(dp.grad_norm, one.grad_norm));
        }
        let max_weight = ranks[0]
            .1
            .iter()
            .flatten()
            .zip(single_weights.iter().flatten())
            .map(|(&a, &b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!(
            "world {world}: max relative difference to one process over {STEPS} steps: \
             loss {max_loss:.3e}, cross-entropies {max_ce:.3e}, grad norm {max_norm:.3e}; \
             max |Δweight| {max_weight:.3e}"
        );
        assert!(max_loss < 1e-5, "world {world}: loss differs by {max_loss:e}");
        assert!(max_ce < 1e-5, "world {world}: cross-entropy differs by {max_ce:e}");
        assert!(max_norm < 1e-4, "world {world}: grad norm differs by {max_norm:e}");
        if world == 1 {
            // One rank sums nothing and divides by 1; only the statistics' token weighting
            // (x·t/t with t = 128, a power of two) touches the values, exactly.
            for (dp, one) in ranks[0].0.iter().zip(&whole) {
                assert_eq!(bits(dp), bits(one), "one rank is the single process, bit for bit");
            }
            assert!(ranks[0].1 == single_weights);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_layout_repeats_its_bits() {
    for world in [2, 4] {
        let first = run_group(world, 21).await;
        let second = run_group(world, 22).await;
        for (a, b) in first[0].0.iter().zip(&second[0].0) {
            assert_eq!(bits(a), bits(b), "world {world}: step {} differs between runs", a.step);
        }
        assert!(first[0].1 == second[0].1, "world {world}: weights differ between runs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timings_are_reported_and_a_dead_peer_fails_the_step() {
    let mut comms =
        loopback_group(2, TcpOptions::new(31, DataPlaneSecret::random())).await.expect("rendezvous");
    let survivor = comms.remove(0);
    // Rank 1 dies before the step: rank 0 computes, then its all-reduce fails naming rank 1.
    drop(comms);
    let mut t = trainer();
    let err = timeout(LIMIT, data_parallel_step_timed(&mut t, &survivor))
        .await
        .expect("the step hung")
        .expect_err("a step without its peer must fail");
    let text = err.to_string();
    assert!(text.contains("step 1") && text.contains("gradients"), "{text}");
    assert_eq!(t.step(), 0, "no update was applied");

    let comms = loopback_group(1, TcpOptions::new(32, DataPlaneSecret::random())).await.expect("rendezvous");
    let timed = data_parallel_step_timed(&mut t, &comms[0]).await.expect("a step");
    assert_eq!(timed.record.step, 1);
    assert!(timed.compute > Duration::ZERO);
}

#[tokio::test(flavor = "current_thread")]
async fn a_current_thread_runtime_still_steps() {
    let comms = loopback_group(1, TcpOptions::new(41, DataPlaneSecret::random())).await.expect("rendezvous");
    let mut t = trainer();
    let mut one = trainer();
    let record = data_parallel_step(&mut t, &comms[0]).await.expect("a step");
    assert_eq!(bits(&record), bits(&one.train_step().expect("a step")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uneven_split_is_refused() {
    let comms = loopback_group(3, TcpOptions::new(51, DataPlaneSecret::random())).await.expect("rendezvous");
    let mut t = trainer();
    let err = data_parallel_step(&mut t, &comms[0]).await.expect_err("4 windows over 3 ranks");
    assert!(err.to_string().contains("batch_size 4 cannot be split evenly over 3"), "{err}");
}
