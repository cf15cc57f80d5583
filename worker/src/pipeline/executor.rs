//! Running a rank's stream for one step: every instruction in order, the tensors kept
//! between instructions ([`Inflight`]), the transfers to and from the pipeline peers, and
//! the step's statistics as this rank saw them ([`Tally`]).
//!
//! # The stream (steps 1 and 2 of [`PipelineTrainer::run_step`])
//! 1. The stream runs in order. `F`, `B`, `W`, `BW` and the overlapped `F&B` call the
//!    [`RankModel`](flotilla_model::pipeline::RankModel) chunk functions; transfers move `[rows, hidden]` f32 tensors with
//!    tags that encode (kind, micro-batch, producing stage), so a message can only be
//!    taken by the receive it is meant for. Sends never wait (the data plane queues them
//!    and its writer tasks send while this rank computes); a receive waits. In `F&B` the
//!    forward chunk and the backward chunk's B run on two threads at once (the layout's
//!    `overlap`, on by default; off, one after the other), each with its own MoE
//!    exchanges, so one's all-to-all waits while the other computes; the W part
//!    follows once both are done (W is the only part that writes the weights). Each
//!    instruction's start and end are recorded and reported; the coordinator compares
//!    the executed stream with the compiled one.
//! 2. MoE dispatch and combine go point to point to the EP group's ranks with tags that
//!    add (layer, phase) to the chunk's, so two chunks' exchanges can be in flight at once.

use std::collections::{BTreeMap, HashMap};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flotilla_layout::{Chunk, Coordinates, Instruction};
use flotilla_model::ModelError;
use flotilla_model::pipeline::{ChunkCache, ChunkStats, ChunkWeightGrads};
use flotilla_proto::v1::{ExecutedOp, ScheduledOp};
use tokio::runtime::Handle;

use super::{MicroBatch, PipelineError, PipelineTrainer, decode_f32, encode_f32};
use crate::comm::Communicator;
use crate::expert_exchange::{DataPlaneExchange, EpTopology, ExchangeStats};
use crate::tags;
use flotilla_model::packing::{BatchCounts, LossNormalization, Sft};
use flotilla_model::train::batch_counts;

/// What executing the stream produced.
pub(super) struct StreamRun {
    pub(super) executed: Vec<ExecutedOp>,
    pub(super) tally: Tally,
    /// Seconds in compute instructions.
    pub(super) busy: f64,
    /// Seconds from the first instruction to the end of the last.
    pub(super) seconds: f64,
    pub(super) exchange: ExchangeStats,
}

/// The step's statistics as this rank saw them, summed over its chunks.
#[derive(Default)]
pub(super) struct Tally {
    /// Positions scored by the last stage's chunks here.
    pub(super) tokens: f64,
    pub(super) main_ce: f64,
    pub(super) mtp_ce: Vec<f64>,
    pub(super) balance: f64,
    /// `[MoE layer][expert]`, in `PipelineTrainer::moe_layers` order.
    pub(super) loads: Vec<Vec<u64>>,
}

impl Tally {
    fn add(&mut self, stats: &ChunkStats, moe_layers: &[usize]) -> Result<(), String> {
        let t = stats.tokens as f64;
        if let Some(ce) = stats.main_ce {
            self.tokens += t;
            self.main_ce += ce * t;
            if self.mtp_ce.len() < stats.mtp_ce.len() {
                self.mtp_ce.resize(stats.mtp_ce.len(), 0.0);
            }
            for (sum, ce) in self.mtp_ce.iter_mut().zip(&stats.mtp_ce) {
                *sum += ce * t;
            }
        }
        self.balance += stats.balance_loss * t;
        for (layer, loads) in stats.moe_layers.iter().zip(&stats.expert_loads) {
            let j = moe_layers
                .iter()
                .position(|l| l == layer)
                .ok_or_else(|| format!("MoE layer {layer} is unknown"))?;
            for (sum, &n) in self.loads[j].iter_mut().zip(loads) {
                *sum += n;
            }
        }
        Ok(())
    }
}

/// The tensors a step keeps between instructions.
#[derive(Default)]
struct Inflight {
    /// Activations by the chunk that produced them (computed here or received).
    activations: HashMap<Chunk, Vec<f32>>,
    /// Input gradients by the chunk whose B computed them (here or received).
    gradients: HashMap<Chunk, Vec<f32>>,
    /// Forwards waiting for their B.
    caches: HashMap<Chunk, ChunkCache<f32>>,
    /// B done, W deferred.
    deferred: BTreeMap<Chunk, (ChunkCache<f32>, ChunkWeightGrads<f32>)>,
}

fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl PipelineTrainer {
    /// Executes the stream; returns the executed instructions, the statistics, and the busy
    /// and total seconds.
    pub(super) fn run_stream<C: Communicator>(
        &mut self,
        step: u64,
        comm: &C,
        handle: &Handle,
    ) -> Result<StreamRun, PipelineError> {
        let plan = &self.plan;
        let me = plan.me();
        let ep_group = plan.ep_group();
        let ep_topology = EpTopology::new(
            ep_group.iter().map(|&g| plan.nodes.get(g).map_or("", String::as_str)),
            self.model.config().n_routed_experts / ep_group.len(),
            self.model.config().hidden_size,
        );
        let overlap = plan.parallel.overlap;
        let mut xstats = ExchangeStats::default();
        let last = plan.parallel.pp - 1;
        let seq = self.config.seq_len;
        let loss = self.config.loss;
        let threads = self.threads;
        let windows: Vec<MicroBatch> =
            (0..plan.parallel.micro_batches).map(|m| self.windows(step, m)).collect::<Result<_, _>>()?;
        let normalization = self.config.sft_normalization().unwrap_or_default();
        let heads = 1 + self.model.config().num_nextn_predict_layers;
        let counts = batch_counts(&self.sampler, &self.config, step, heads)
            .map_err(|e| PipelineError::Step { step, detail: format!("reading the data: {e}") })?;
        let counts = counts.as_ref();
        fn sft<'a>(
            mb: &'a MicroBatch,
            normalization: LossNormalization,
            batch: Option<&'a BatchCounts>,
        ) -> Option<Sft<'a>> {
            mb.masks.as_deref().map(|masks| Sft { masks, normalization, batch })
        }
        let mut tally = Tally {
            loads: vec![vec![0; self.model.config().n_routed_experts]; self.moe_layers.len()],
            ..Tally::default()
        };
        let mut inflight = Inflight::default();
        let mut executed = Vec::with_capacity(plan.stream.len());
        let (mut busy, stream_start) = (0.0f64, Instant::now());
        let stream = plan.stream.clone();
        for (index, op) in stream.iter().enumerate() {
            let started = (unix_micros(), Instant::now());
            let op_name = op.to_string();
            let model_err =
                |source: ModelError| PipelineError::Model { step, index, op: op_name.clone(), source };
            let stream_err =
                |detail: String| PipelineError::Stream { step, index, op: op_name.clone(), detail };
            let exchange = |chunk: Chunk| DataPlaneExchange {
                comm,
                handle,
                group: &ep_group,
                me: me.ep_rank as usize,
                topology: &ep_topology,
                chunk,
                stats: ExchangeStats::default(),
            };
            let peer_rank = |peer: u32| self.plan.world_rank(Coordinates { pipeline_rank: peer, ..me });
            match *op {
                Instruction::Forward { chunk: c } => {
                    let input = Self::forward_input(&mut inflight, c).map_err(stream_err)?;
                    let mut ex = exchange(c);
                    let mb = &windows[c.micro_batch as usize];
                    let out = self
                        .model
                        .forward_packed(
                            c.stage as usize,
                            &mb.tokens,
                            sft(mb, normalization, counts).as_ref(),
                            seq,
                            input,
                            &loss,
                            threads,
                            &mut ex,
                        )
                        .map_err(model_err)?;
                    xstats.add(&ex.stats);
                    self.finish_forward(&mut inflight, &mut tally, c, out).map_err(stream_err)?;
                }
                Instruction::BackwardInput { chunk: c } | Instruction::Backward { chunk: c } => {
                    let (cache, dy) = Self::backward_inputs(&mut inflight, c, last).map_err(stream_err)?;
                    let mut ex = exchange(c);
                    let b = self.model.backward_input(&cache, dy, threads, &mut ex).map_err(model_err)?;
                    xstats.add(&ex.stats);
                    if let Some(g) = b.input_grad {
                        inflight.gradients.insert(c, g);
                    }
                    if matches!(op, Instruction::Backward { .. }) {
                        self.model.backward_weight(cache, b.weight, threads).map_err(model_err)?;
                    } else {
                        inflight.deferred.insert(c, (cache, b.weight));
                    }
                }
                Instruction::BackwardWeight { chunk: c } => {
                    let (cache, grads) = inflight
                        .deferred
                        .remove(&c)
                        .ok_or_else(|| stream_err(format!("no B of {c:?} ran before its W")))?;
                    self.model.backward_weight(cache, grads, threads).map_err(model_err)?;
                }
                Instruction::OverlappedForwardBackward { forward, backward } => {
                    let input = Self::forward_input(&mut inflight, forward).map_err(stream_err)?;
                    let (cache, dy) =
                        Self::backward_inputs(&mut inflight, backward, last).map_err(stream_err)?;
                    let model = &self.model;
                    let fwd_windows = &windows[forward.micro_batch as usize];
                    let fwd_sft = sft(fwd_windows, normalization, counts);
                    let (mut fx, mut bx) = (exchange(forward), exchange(backward));
                    let run_forward = |fx: &mut DataPlaneExchange<'_, C>| {
                        model.forward_packed(
                            forward.stage as usize,
                            &fwd_windows.tokens,
                            fwd_sft.as_ref(),
                            seq,
                            input,
                            &loss,
                            threads,
                            fx,
                        )
                    };
                    let (fwd, bwd) = if overlap {
                        // The two chunks on two threads: one's all-to-all waits while the
                        // other computes.
                        std::thread::scope(|scope| {
                            let f = scope.spawn(|| run_forward(&mut fx));
                            let b = model.backward_input(&cache, dy, threads, &mut bx);
                            let f = f.join().unwrap_or_else(|_| {
                                Err(ModelError::Tensor {
                                    tensor: format!("{forward:?}"),
                                    detail: "the forward thread panicked".into(),
                                })
                            });
                            (f, b)
                        })
                    } else {
                        let f = run_forward(&mut fx);
                        (f, model.backward_input(&cache, dy, threads, &mut bx))
                    };
                    xstats.add(&fx.stats);
                    xstats.add(&bx.stats);
                    let (fwd, bwd) = (fwd.map_err(model_err)?, bwd.map_err(model_err)?);
                    self.finish_forward(&mut inflight, &mut tally, forward, fwd).map_err(stream_err)?;
                    if let Some(g) = bwd.input_grad {
                        inflight.gradients.insert(backward, g);
                    }
                    self.model.backward_weight(cache, bwd.weight, threads).map_err(model_err)?;
                }
                Instruction::SendActivation { chunk, peer } => {
                    let tensor = inflight.activations.remove(&chunk).ok_or_else(|| {
                        stream_err(format!("the activation of {chunk:?} was not computed here"))
                    })?;
                    let to = peer_rank(peer);
                    handle.block_on(comm.send(to, tags::activation(chunk), encode_f32(&tensor))).map_err(
                        |source| PipelineError::Comm {
                            step,
                            what: format!("{op_name} (world rank {to})"),
                            source,
                        },
                    )?;
                }
                Instruction::SendGrad { chunk, peer } => {
                    let tensor = inflight.gradients.remove(&chunk).ok_or_else(|| {
                        stream_err(format!("the input gradient of {chunk:?} was not computed here"))
                    })?;
                    let to = peer_rank(peer);
                    handle.block_on(comm.send(to, tags::gradient(chunk), encode_f32(&tensor))).map_err(
                        |source| PipelineError::Comm {
                            step,
                            what: format!("{op_name} (world rank {to})"),
                            source,
                        },
                    )?;
                }
                Instruction::RecvActivation { chunk, peer } | Instruction::RecvGrad { chunk, peer } => {
                    let from = peer_rank(peer);
                    let (tag, map) = match op {
                        Instruction::RecvActivation { .. } => {
                            (tags::activation(chunk), &mut inflight.activations)
                        }
                        _ => (tags::gradient(chunk), &mut inflight.gradients),
                    };
                    let bytes = handle.block_on(comm.recv(from, tag)).map_err(|source| {
                        PipelineError::Comm { step, what: format!("{op_name} (world rank {from})"), source }
                    })?;
                    let tensor = decode_f32(&bytes).ok_or_else(|| {
                        stream_err(format!("world rank {from} sent {} bytes, not f32s", bytes.len()))
                    })?;
                    map.insert(chunk, tensor);
                }
            }
            let elapsed = started.1.elapsed();
            if op.is_compute() {
                busy += elapsed.as_secs_f64();
            }
            executed.push(ExecutedOp {
                op: Some(ScheduledOp::from(*op)),
                start_unix_us: started.0,
                end_unix_us: started.0 + elapsed.as_micros() as u64,
            });
        }
        let leftover = [
            ("activations", inflight.activations.len()),
            ("input gradients", inflight.gradients.len()),
            ("forwards without backward", inflight.caches.len()),
            ("deferred weight gradients", inflight.deferred.len()),
        ];
        if let Some((what, n)) = leftover.iter().find(|(_, n)| *n > 0) {
            return Err(PipelineError::Step {
                step,
                detail: format!("the stream ended with {n} {what} left over"),
            });
        }
        Ok(StreamRun {
            executed,
            tally,
            busy,
            seconds: stream_start.elapsed().as_secs_f64(),
            exchange: xstats,
        })
    }

    /// The input of a forward chunk: none for stage 0, else the previous stage's output.
    fn forward_input(inflight: &mut Inflight, c: Chunk) -> Result<Option<Vec<f32>>, String> {
        if c.stage == 0 {
            return Ok(None);
        }
        let prev = Chunk { stage: c.stage - 1, ..c };
        inflight
            .activations
            .remove(&prev)
            .map(Some)
            .ok_or_else(|| format!("the activation of {prev:?} was neither computed here nor received"))
    }

    fn finish_forward(
        &self,
        inflight: &mut Inflight,
        tally: &mut Tally,
        c: Chunk,
        out: flotilla_model::pipeline::ChunkForward<f32>,
    ) -> Result<(), String> {
        tally.add(&out.stats, &self.moe_layers)?;
        if let Some(output) = out.output {
            inflight.activations.insert(c, output);
        }
        if inflight.caches.insert(c, out.cache).is_some() {
            return Err(format!("{c:?} ran its forward twice"));
        }
        Ok(())
    }

    /// The cache and output gradient a backward chunk needs.
    fn backward_inputs(
        inflight: &mut Inflight,
        c: Chunk,
        last: u32,
    ) -> Result<(ChunkCache<f32>, Option<Vec<f32>>), String> {
        let cache =
            inflight.caches.remove(&c).ok_or_else(|| format!("{c:?} has no forward to go back through"))?;
        if c.stage == last {
            return Ok((cache, None));
        }
        let next = Chunk { stage: c.stage + 1, ..c };
        let dy = inflight
            .gradients
            .remove(&next)
            .ok_or_else(|| format!("the gradient of {next:?} was neither computed here nor received"))?;
        Ok((cache, Some(dy)))
    }
}
