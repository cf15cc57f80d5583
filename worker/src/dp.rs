//! Data-parallel training over a [`Communicator`]: every rank holds the whole model,
//! computes the gradients of its share of the global batch, and the ranks average their
//! gradients and merge their statistics on the data plane before taking the same
//! optimizer step.
//!
//! One step ([`data_parallel_step`]):
//!
//! 1. `Trainer::forward_backward_shard(rank, world)` on this rank's windows of the step's
//!    batch, off the async reactor (see *Blocking compute* below).
//! 2. Every trainable parameter's gradient is copied into one `f32` buffer, parameters in
//!    `Model::trainable_params_mut` order (fixed by the model's structure, so identical on
//!    every rank), summed with [`Communicator::all_reduce_sum`], divided by the world size
//!    and written back: the mean over ranks of the shares' mean-loss gradients, which is
//!    the whole batch's gradient because shares are equal.
//! 3. The step statistics are summed in one `f64` [`Communicator::all_reduce_sum_f64`]:
//!    each loss multiplied by the rank's token count (so the result is the token-weighted
//!    mean, as `StepStats::merge` computes), the token counts, and every expert load.
//!    Loads are integers below 2⁵³, so their `f64` sums are exact: every rank ends with the
//!    same counts as one process would, and hence applies the same selection-bias update.
//! 4. `Trainer::apply_update` with the reduced gradients and statistics.
//!
//! # Invariants
//!
//! - **Every rank takes the same step, bit for bit.** The ring all-reduce leaves every rank
//!   with the bits one rank computed for each chunk, and the division and the update are
//!   deterministic, so weights, optimizer state and records (except the wall-clock
//!   `tokens_per_s`) agree across ranks.
//! - **The same layout gives the same bits on every run**: the all-reduce's summation order
//!   is a function of the world size and buffer length only (see [`crate::comm`]).
//! - **Against one process** the result differs only by rounding: the shares' losses and
//!   gradients are summed in another order than one forward pass over the whole batch would
//!   (the tests measure it; relative loss differences are around 1e-7).
//! - Ranks must run the same configuration; a rank whose gradient or statistics buffer has
//!   another length fails the collective (the data plane checks lengths), and a header in
//!   the statistics buffer catches ranks that disagree on the MTP depth or the MoE layout.
//!
//! # Blocking compute
//!
//! Forward, backward and the optimizer update run for a long time without yielding. On
//! tokio's multi-threaded runtime they run under [`tokio::task::block_in_place`], which
//! hands this worker thread's other tasks (heartbeats, the data plane's readers and
//! writers) to another thread for the duration; the trainer stays borrowed, so nothing has
//! to move in and out of a `'static` closure. On a current-thread runtime there is no other
//! thread to hand them to, so the compute runs inline and blocks the runtime for its
//! duration (correct, but the worker's heartbeats stall: `run_worker` therefore refuses
//! that runtime).

use std::time::{Duration, Instant};

use flotilla_model::model::StepStats;
use flotilla_model::train::{StepRecord, TrainError, Trainer};

use crate::comm::{CommError, Communicator};

/// What a data-parallel step can fail with.
#[derive(Debug, thiserror::Error)]
pub enum DpError {
    /// The trainer refused (bad shard, non-finite loss, a model error).
    #[error("step {step}: {source}")]
    Train {
        /// The step being taken (1-based).
        step: u64,
        /// The trainer's error.
        #[source]
        source: TrainError,
    },
    /// A collective failed: a peer died, aborted, or disagreed on a buffer's length.
    #[error("step {step}: all-reduce of the {what} failed: {source}")]
    Comm {
        /// The step being taken (1-based).
        step: u64,
        /// "gradients" or "statistics".
        what: &'static str,
        /// The data plane's error.
        #[source]
        source: CommError,
    },
    /// The ranks' statistics do not describe the same model.
    #[error("step {step}: ranks disagree: {detail}")]
    Mismatch {
        /// The step being taken (1-based).
        step: u64,
        /// What differs.
        detail: String,
    },
}

/// A data-parallel step's record and where its time went.
#[derive(Clone, Debug)]
pub struct TimedStep {
    /// The record `apply_update` returned (identical on every rank but for `tokens_per_s`).
    pub record: StepRecord,
    /// Forward, backward, packing and the optimizer update.
    pub compute: Duration,
    /// Waiting in the two all-reduces (including waiting for slower ranks).
    pub communication: Duration,
}

/// One data-parallel step of `trainer` as rank `comm.rank()` of `comm.world_size()` (see
/// the module documentation). Every rank of `comm` must call it for the same step with the
/// same configuration; the global batch is `trainer.config.batch_size`, which the world
/// size must divide.
pub async fn data_parallel_step<C: Communicator>(
    trainer: &mut Trainer,
    comm: &C,
) -> Result<StepRecord, DpError> {
    data_parallel_step_timed(trainer, comm).await.map(|timed| timed.record)
}

/// [`data_parallel_step`], also reporting the compute and communication time.
pub async fn data_parallel_step_timed<C: Communicator>(
    trainer: &mut Trainer,
    comm: &C,
) -> Result<TimedStep, DpError> {
    let start = Instant::now();
    let step = trainer.step() + 1;
    let (rank, world) = (comm.rank(), comm.world_size());

    let (stats, mut grads) = run_blocking(|| {
        let stats = trainer.forward_backward_shard(rank, world)?;
        Ok::<_, TrainError>((stats, flatten_grads(trainer)))
    })
    .map_err(|source| DpError::Train { step, source })?;
    let mut compute = start.elapsed();

    let comm_start = Instant::now();
    comm.all_reduce_sum(&mut grads).await.map_err(|source| DpError::Comm {
        step,
        what: "gradients",
        source,
    })?;
    let mut packed = pack_stats(&stats);
    comm.all_reduce_sum_f64(&mut packed).await.map_err(|source| DpError::Comm {
        step,
        what: "statistics",
        source,
    })?;
    let communication = comm_start.elapsed();

    let update_start = Instant::now();
    let merged = unpack_stats(&stats, &packed, world).map_err(|detail| DpError::Mismatch { step, detail })?;
    let record = run_blocking(|| {
        scatter_mean_grads(trainer, &grads, world);
        trainer.apply_update(&merged, start)
    })
    .map_err(|source| DpError::Train { step, source })?;
    compute += update_start.elapsed();
    Ok(TimedStep { record, compute, communication })
}

/// Runs `f` without blocking the reactor where the runtime allows it (see the module
/// documentation).
pub(crate) fn run_blocking<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Every trainable parameter's gradient, concatenated in `trainable_params_mut` order.
fn flatten_grads(trainer: &mut Trainer) -> Vec<f32> {
    let params = trainer.model.trainable_params_mut();
    let mut flat = Vec::with_capacity(params.iter().map(|p| p.grad.len()).sum());
    for p in &params {
        flat.extend_from_slice(p.grad.host());
    }
    flat
}

/// Writes `summed / world` back into the gradients, in the order [`flatten_grads`] read
/// them. Division (not multiplication by a reciprocal) matches the in-memory reference.
fn scatter_mean_grads(trainer: &mut Trainer, summed: &[f32], world: usize) {
    let divisor = world as f32;
    let mut rest = summed;
    for p in trainer.model.trainable_params_mut() {
        // The buffer was built from these very parameters, whose lengths do not change.
        let (mine, tail) = rest.split_at(p.grad.len().min(rest.len()));
        for (g, &s) in p.grad.host_mut().iter_mut().zip(mine) {
            *g = s / divisor;
        }
        rest = tail;
    }
}

/// Entries before the losses: the rank count, the MTP depth, the MoE layer count and the
/// expert layout `Σ_l (l + 1)·E_l` (`E_l` routed experts in the `l`-th MoE layer). Each
/// rank contributes its own values; after the sum each must equal `world` times this
/// rank's, or the ranks run different models (the buffer lengths alone can agree by
/// accident).
const HEADER: usize = 4;

/// `[1, D, L, Σ(l+1)·E_l | loss·t, main_ce·t, balance·t, mtp_ce[..]·t | t | loads..]` with
/// `t` this rank's token count.
fn pack_stats(stats: &StepStats) -> Vec<f64> {
    let tokens = stats.tokens as f64;
    let experts: usize = stats.expert_loads.iter().map(Vec::len).sum();
    let layout: f64 = stats.expert_loads.iter().enumerate().map(|(l, e)| ((l + 1) * e.len()) as f64).sum();
    let mut packed = Vec::with_capacity(HEADER + 4 + stats.mtp_ce.len() + experts);
    packed.extend([1.0, stats.mtp_ce.len() as f64, stats.expert_loads.len() as f64, layout]);
    packed.extend([stats.loss * tokens, stats.main_ce * tokens, stats.balance_loss * tokens]);
    packed.extend(stats.mtp_ce.iter().map(|ce| ce * tokens));
    packed.push(tokens);
    for layer in &stats.expert_loads {
        packed.extend(layer.iter().map(|&n| n as f64));
    }
    packed
}

/// The whole batch's statistics from the summed buffer; `local` supplies the layout (MoE
/// layer indices and per-layer expert counts), which the header has checked is shared.
fn unpack_stats(local: &StepStats, summed: &[f64], world: usize) -> Result<StepStats, String> {
    let mine = pack_stats(local);
    if summed.len() != mine.len() {
        return Err(format!("statistics buffer has {} entries, expected {}", summed.len(), mine.len()));
    }
    let names = ["rank count", "MTP depth", "MoE layer count", "expert layout"];
    for (i, name) in names.iter().enumerate() {
        let expected = mine[i] * world as f64;
        if summed[i] != expected {
            return Err(format!(
                "the {name} summed over ranks is {}, expected {expected} ({} on this rank × {world} ranks)",
                summed[i], mine[i]
            ));
        }
    }
    let depth = local.mtp_ce.len();
    let tokens_at = HEADER + 3 + depth;
    let total_tokens = summed[tokens_at];
    // Also refuses NaN, which no comparison would.
    if total_tokens.is_nan() || total_tokens <= 0.0 {
        return Err(format!("the ranks scored {total_tokens} tokens in all"));
    }
    let mean = |x: f64| x / total_tokens;
    let mut loads_at = tokens_at + 1;
    let mut expert_loads = Vec::with_capacity(local.expert_loads.len());
    for layer in &local.expert_loads {
        let sums = &summed[loads_at..loads_at + layer.len()];
        // Integer-valued sums of integers below 2⁵³: the conversion is exact.
        expert_loads.push(sums.iter().map(|&n| n as u64).collect());
        loads_at += layer.len();
    }
    Ok(StepStats {
        loss: mean(summed[HEADER]),
        main_ce: mean(summed[HEADER + 1]),
        balance_loss: mean(summed[HEADER + 2]),
        mtp_ce: summed[HEADER + 3..tokens_at].iter().map(|&x| mean(x)).collect(),
        tokens: total_tokens as usize,
        moe_layers: local.moe_layers.clone(),
        expert_loads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(loss: f64, tokens: usize, loads: Vec<Vec<u64>>) -> StepStats {
        StepStats {
            loss,
            main_ce: loss / 2.0,
            mtp_ce: vec![loss / 4.0],
            balance_loss: 0.01,
            tokens,
            moe_layers: (0..loads.len()).collect(),
            expert_loads: loads,
        }
    }

    #[test]
    fn packed_sums_merge_like_step_stats() {
        let a = stats(2.0, 64, vec![vec![1, 2, 3], vec![4, 5, 6]]);
        let b = stats(3.0, 64, vec![vec![10, 20, 30], vec![40, 50, 60]]);
        let summed: Vec<f64> = pack_stats(&a).iter().zip(pack_stats(&b)).map(|(x, y)| x + y).collect();
        let got = unpack_stats(&a, &summed, 2).unwrap();
        let mut want = a.clone();
        want.merge(&b).unwrap();
        assert_eq!(got.tokens, 128);
        assert_eq!(got.expert_loads, want.expert_loads);
        assert_eq!(got.moe_layers, want.moe_layers);
        assert!((got.loss - want.loss).abs() < 1e-15);
        assert!((got.mtp_ce[0] - want.mtp_ce[0]).abs() < 1e-15);
        assert!((got.balance_loss - want.balance_loss).abs() < 1e-15);
    }

    #[test]
    fn a_rank_with_another_layout_is_named() {
        let a = stats(2.0, 64, vec![vec![1, 2, 3], vec![4, 5, 6]]);
        let mut b = stats(3.0, 64, vec![vec![10, 20], vec![40, 50, 60, 70]]);
        let summed: Vec<f64> = pack_stats(&a).iter().zip(pack_stats(&b)).map(|(x, y)| x + y).collect();
        let err = unpack_stats(&a, &summed, 2).unwrap_err();
        assert!(err.contains("expert layout"), "{err}");
        b.expert_loads = a.expert_loads.clone();
        b.mtp_ce.clear();
        b.expert_loads.push(vec![0]);
        b.moe_layers.push(2);
        let mut summed = pack_stats(&a);
        summed.iter_mut().zip(pack_stats(&b)).for_each(|(x, y)| *x += y);
        let err = unpack_stats(&a, &summed, 2).unwrap_err();
        assert!(err.contains("MTP depth"), "{err}");
        let err = unpack_stats(&a, &pack_stats(&a), 2).unwrap_err();
        assert!(err.contains("rank count"), "{err}");
    }
}
