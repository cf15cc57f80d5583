//! The generators: 1F1B, ZB1P (ZB-H1), DualPipe and DualPipeV as instruction streams.
//!
//! DualPipe and DualPipeV are ports of the op order of DeepSeek's reference
//! (deepseek-ai/DualPipe, `dualpipe.py` and `dualpipev.py`): the same eight phases per rank,
//! the middle ranks' non-overlapped first pair, the zero-bubble deferral of W from the
//! middle of phase 6, and the reference's communication points:
//! - a receive is waited on right before the compute that consumes it, except the ones the
//!   reference posts ahead (the next F0's input during phase 2, the next F1's input before
//!   the W of phase 3), which are waited on at the reference's next commit;
//! - sends are issued where the reference commits them: at the next compute instruction.
//!   The middle ranks' delayed sends in the first main-loop pair are kept.

use super::{
    Chunk, Instruction, MAX_CHUNKS, MAX_STAGES, Schedule, ScheduleError, ScheduleKind, ScheduleSpec,
};
use std::collections::VecDeque;

/// Compiles `spec` into one instruction stream per rank.
pub fn compile(spec: &ScheduleSpec) -> Result<Schedule, ScheduleError> {
    check(spec)?;
    let ScheduleSpec { kind, pp, micro_batches } = *spec;
    let ranks = match kind {
        ScheduleKind::OneFOneB => (0..pp).map(|r| one_f_one_b(pp, micro_batches, r)).collect(),
        ScheduleKind::Zb1p => (0..pp).map(|r| zb_h1(pp, micro_batches, r)).collect(),
        ScheduleKind::DualPipe => (0..pp).map(|r| dualpipe(pp, micro_batches, r)).collect(),
        ScheduleKind::DualPipeV => {
            let ranks = kind.ranks_for(pp);
            (0..ranks).map(|r| dualpipe_v(ranks, micro_batches, r)).collect()
        }
    };
    Ok(Schedule { kind, num_stages: pp, num_micro_batches: micro_batches, ranks })
}

/// The inputs each generator accepts, with an error that says what is allowed.
fn check(spec: &ScheduleSpec) -> Result<(), ScheduleError> {
    let ScheduleSpec { kind, pp, micro_batches } = *spec;
    let bad = |why: String| {
        Err(ScheduleError::Spec(format!("{kind} with pp = {pp}, micro-batches = {micro_batches}: {why}")))
    };
    if pp > MAX_STAGES {
        return bad(format!("at most {MAX_STAGES} stages are supported"));
    }
    if u64::from(pp) * u64::from(micro_batches) > MAX_CHUNKS {
        return bad(format!("pp × micro-batches must be at most {MAX_CHUNKS}"));
    }
    // How many stages each kind runs is the layout's rule.
    if let Err(why) = kind.check_stages(pp) {
        return bad(why.to_string());
    }
    match kind {
        ScheduleKind::OneFOneB | ScheduleKind::Zb1p => {
            if micro_batches == 0 {
                return bad("micro-batches must be at least 1".into());
            }
        }
        ScheduleKind::DualPipe => {
            if micro_batches % 2 != 0 || micro_batches < 2 * pp {
                return bad(format!(
                    "DualPipe needs an even number of micro-batches ≥ 2·pp = {} (half enter from each end)",
                    2 * pp
                ));
            }
        }
        ScheduleKind::DualPipeV => {
            if micro_batches < pp {
                return bad(format!(
                    "DualPipeV needs micro-batches ≥ pp = {pp} (twice its {} ranks)",
                    pp / 2
                ));
            }
        }
    }
    Ok(())
}

/// Which rank runs a chunk, per generator.
#[derive(Clone, Copy)]
enum Layout {
    /// Stage s on rank s.
    Linear,
    /// DualPipe: the first half of the micro-batches on stage s at rank s, the second half
    /// at rank pp−1−s.
    Bidirectional { pp: u32, half: u32 },
    /// DualPipeV on n ranks: stage s on rank s for s < n, else on rank 2n−1−s.
    V { ranks: u32 },
}

impl Layout {
    fn rank_of(self, chunk: Chunk) -> u32 {
        match self {
            Layout::Linear => chunk.stage,
            Layout::Bidirectional { pp, half } => {
                if chunk.micro_batch < half {
                    chunk.stage
                } else {
                    pp - 1 - chunk.stage
                }
            }
            Layout::V { ranks } => {
                if chunk.stage < ranks {
                    chunk.stage
                } else {
                    2 * ranks - 1 - chunk.stage
                }
            }
        }
    }
}

/// Builds one rank's stream: each compute instruction is preceded by the receives it needs
/// and its sends are issued at the next commit point.
struct Stream {
    rank: u32,
    stages: u32,
    layout: Layout,
    out: Vec<Instruction>,
    pending_sends: Vec<Instruction>,
    /// Receives posted ahead of the compute that needs them (as the reference posts them);
    /// they are waited on at the next commit.
    posted_recvs: Vec<Instruction>,
    /// Forward inputs already received through `posted_recvs`.
    prefetched: Vec<Chunk>,
}

impl Stream {
    fn new(rank: u32, stages: u32, layout: Layout) -> Self {
        Stream {
            rank,
            stages,
            layout,
            out: Vec::new(),
            pending_sends: Vec::new(),
            posted_recvs: Vec::new(),
            prefetched: Vec::new(),
        }
    }

    /// Where the reference waits on its batch of point-to-point operations: the sends
    /// queued since the last commit, then the receives posted ahead.
    fn commit(&mut self) {
        self.out.append(&mut self.pending_sends);
        self.out.append(&mut self.posted_recvs);
    }

    /// Posts the receive of `chunk`'s forward input now; it is waited on at the next commit.
    fn post_recv_of_forward(&mut self, chunk: Chunk) {
        if let Some((previous, peer)) = self.remote(chunk, -1) {
            self.posted_recvs.push(Instruction::RecvActivation { chunk: previous, peer });
            self.prefetched.push(chunk);
        }
    }

    /// The rank running the chunk `delta` stages from `chunk`, when it is another rank.
    fn remote(&self, chunk: Chunk, delta: i64) -> Option<(Chunk, u32)> {
        let stage = chunk.stage as i64 + delta;
        if !(0..self.stages as i64).contains(&stage) {
            return None;
        }
        let neighbour = Chunk::new(chunk.micro_batch, stage as u32);
        let rank = self.layout.rank_of(neighbour);
        (rank != self.rank).then_some((neighbour, rank))
    }

    fn recv_inputs_of_forward(&mut self, chunk: Chunk) {
        if let Some(at) = self.prefetched.iter().position(|c| *c == chunk) {
            self.prefetched.swap_remove(at);
            return;
        }
        if let Some((previous, peer)) = self.remote(chunk, -1) {
            self.out.push(Instruction::RecvActivation { chunk: previous, peer });
        }
    }

    fn recv_inputs_of_backward(&mut self, chunk: Chunk) {
        if let Some((next, peer)) = self.remote(chunk, 1) {
            self.out.push(Instruction::RecvGrad { chunk: next, peer });
        }
    }

    fn queue_send_activation(&mut self, chunk: Chunk) {
        if let Some((_, peer)) = self.remote(chunk, 1) {
            self.pending_sends.push(Instruction::SendActivation { chunk, peer });
        }
    }

    fn queue_send_grad(&mut self, chunk: Chunk) {
        if let Some((_, peer)) = self.remote(chunk, -1) {
            self.pending_sends.push(Instruction::SendGrad { chunk, peer });
        }
    }

    fn forward(&mut self, chunk: Chunk) {
        self.commit();
        self.recv_inputs_of_forward(chunk);
        self.out.push(Instruction::Forward { chunk });
    }

    fn backward(&mut self, chunk: Chunk, defer_weight: bool) {
        self.commit();
        self.recv_inputs_of_backward(chunk);
        self.out.push(if defer_weight {
            Instruction::BackwardInput { chunk }
        } else {
            Instruction::Backward { chunk }
        });
    }

    fn overlapped(&mut self, forward: Chunk, backward: Chunk) {
        self.commit();
        self.recv_inputs_of_forward(forward);
        self.recv_inputs_of_backward(backward);
        self.out.push(Instruction::OverlappedForwardBackward { forward, backward });
    }

    fn weight(&mut self, chunk: Chunk) {
        self.commit();
        self.out.push(Instruction::BackwardWeight { chunk });
    }

    fn finish(mut self) -> Vec<Instruction> {
        self.commit();
        self.out
    }
}

/// 1F1B on rank `rank`: pp−1−rank warm-up forwards, then one forward and one full backward
/// in turn, then the cool-down backwards.
fn one_f_one_b(pp: u32, micro_batches: u32, rank: u32) -> Vec<Instruction> {
    let mut s = Stream::new(rank, pp, Layout::Linear);
    let warmup = (pp - 1 - rank).min(micro_batches);
    let chunk = |m| Chunk::new(m, rank);
    for m in 0..warmup {
        s.forward(chunk(m));
        s.queue_send_activation(chunk(m));
    }
    for m in 0..micro_batches - warmup {
        s.forward(chunk(warmup + m));
        s.queue_send_activation(chunk(warmup + m));
        s.backward(chunk(m), false);
        s.queue_send_grad(chunk(m));
    }
    for m in micro_batches - warmup..micro_batches {
        s.backward(chunk(m), false);
        s.queue_send_grad(chunk(m));
    }
    s.finish()
}

/// ZB-H1 on rank `rank`: 1F1B's order with the backward split into B and W; rank r holds
/// back r weight gradients during the steady phase (its 1F1B activation count is pp−r, so
/// the peak stays pp) and runs them in the cool-down, where 1F1B leaves the rank idle.
fn zb_h1(pp: u32, micro_batches: u32, rank: u32) -> Vec<Instruction> {
    let mut s = Stream::new(rank, pp, Layout::Linear);
    let warmup = (pp - 1 - rank).min(micro_batches);
    let chunk = |m| Chunk::new(m, rank);
    let mut deferred = VecDeque::new();
    let held_back = rank as usize;
    let backward = |s: &mut Stream, m: u32, deferred: &mut VecDeque<Chunk>| {
        s.backward(chunk(m), true);
        s.queue_send_grad(chunk(m));
        deferred.push_back(chunk(m));
        if deferred.len() > held_back {
            let w = deferred.pop_front().expect("non-empty");
            s.weight(w);
        }
    };
    for m in 0..warmup {
        s.forward(chunk(m));
        s.queue_send_activation(chunk(m));
    }
    for m in 0..micro_batches - warmup {
        s.forward(chunk(warmup + m));
        s.queue_send_activation(chunk(warmup + m));
        backward(&mut s, m, &mut deferred);
    }
    for m in micro_batches - warmup..micro_batches {
        backward(&mut s, m, &mut deferred);
    }
    while let Some(w) = deferred.pop_front() {
        s.weight(w);
    }
    s.finish()
}

/// One rank of DualPipe or DualPipeV, driven through "phases" exactly as the reference is.
/// `stage[p]` is the stage phase p runs on this rank and `first_micro_batch[p]` the first
/// micro-batch phase p sees; the counters match the reference's `current_*_chunk_id`.
struct Phased {
    s: Stream,
    stage: [u32; 2],
    first_micro_batch: [u32; 2],
    forwards: [Vec<Chunk>; 2],
    backwards: [Vec<Chunk>; 2],
    sent_forward: [usize; 2],
    sent_backward: [usize; 2],
    weights: VecDeque<Chunk>,
}

impl Phased {
    fn new(s: Stream, stage: [u32; 2], first_micro_batch: [u32; 2]) -> Self {
        Phased {
            s,
            stage,
            first_micro_batch,
            forwards: Default::default(),
            backwards: Default::default(),
            sent_forward: [0; 2],
            sent_backward: [0; 2],
            weights: VecDeque::new(),
        }
    }

    fn next_forward(&mut self, phase: usize) -> Chunk {
        let chunk =
            Chunk::new(self.first_micro_batch[phase] + self.forwards[phase].len() as u32, self.stage[phase]);
        self.forwards[phase].push(chunk);
        chunk
    }

    fn next_backward(&mut self, phase: usize) -> Chunk {
        let chunk =
            Chunk::new(self.first_micro_batch[phase] + self.backwards[phase].len() as u32, self.stage[phase]);
        self.backwards[phase].push(chunk);
        chunk
    }

    /// The reference's `_recv_forward(phase)` ahead of its `_forward_chunk(phase, recv=False)`.
    fn post_recv_forward(&mut self, phase: usize) {
        let chunk =
            Chunk::new(self.first_micro_batch[phase] + self.forwards[phase].len() as u32, self.stage[phase]);
        self.s.post_recv_of_forward(chunk);
    }

    fn forward_chunk(&mut self, phase: usize, send: bool) {
        let chunk = self.next_forward(phase);
        self.s.forward(chunk);
        if send {
            self.send_forward(phase);
        }
    }

    fn backward_chunk(&mut self, phase: usize, defer_weight: bool, send: bool) {
        let chunk = self.next_backward(phase);
        self.s.backward(chunk, defer_weight);
        if defer_weight {
            self.weights.push_back(chunk);
        }
        if send {
            self.send_backward(phase);
        }
    }

    fn forward_backward_chunk(&mut self, forward_phase: usize, backward_phase: usize) {
        let forward = self.next_forward(forward_phase);
        let backward = self.next_backward(backward_phase);
        self.s.overlapped(forward, backward);
        self.send_forward(forward_phase);
        self.send_backward(backward_phase);
    }

    fn weight_chunk(&mut self) {
        let chunk = self.weights.pop_front().expect("the reference's W queue is FIFO and never underflows");
        self.s.weight(chunk);
    }

    /// Sends the oldest unsent forward output of `phase` (nothing at a pipeline end).
    fn send_forward(&mut self, phase: usize) {
        let chunk = self.forwards[phase][self.sent_forward[phase]];
        self.sent_forward[phase] += 1;
        self.s.queue_send_activation(chunk);
    }

    fn send_backward(&mut self, phase: usize) {
        let chunk = self.backwards[phase][self.sent_backward[phase]];
        self.sent_backward[phase] += 1;
        self.s.queue_send_grad(chunk);
    }

    fn finish(self) -> Vec<Instruction> {
        debug_assert!(self.weights.is_empty());
        self.s.finish()
    }
}

/// DualPipe on rank `rank` of `pp` (DeepSeek's `DualPipe.step`). Phase 0 is the forward
/// direction for the first half of the ranks and the reverse one for the second half.
fn dualpipe(pp: u32, micro_batches: u32, rank: u32) -> Vec<Instruction> {
    let half_ranks = pp / 2;
    let half_rank = rank.min(pp - 1 - rank);
    let half_chunks = micro_batches / 2;
    let second_half = rank >= half_ranks;
    let is_middle = rank == half_ranks - 1 || rank == half_ranks;
    // Direction 0: micro-batches 0..C/2 on stage `rank`; direction 1: C/2..C on pp−1−rank.
    let by_direction = |d: [u32; 2]| if second_half { [d[1], d[0]] } else { d };
    let mut p = Phased::new(
        Stream::new(rank, pp, Layout::Bidirectional { pp, half: half_chunks }),
        by_direction([rank, pp - 1 - rank]),
        by_direction([0, half_chunks]),
    );
    run_dual_phases(
        &mut p,
        DualShape {
            step_1: (half_ranks - half_rank - 1) * 2,
            step_2: half_rank + 1,
            step_3: half_ranks - half_rank - 1,
            step_4: half_chunks - pp + half_rank + 1,
            half_rank,
            // The middle ranks of DualPipe, the last rank of DualPipeV: where the two
            // directions meet, the first main-loop pair is not overlapped.
            at_turn: is_middle,
        },
    );
    p.finish()
}

/// DualPipeV on rank `rank` of `ranks` (DeepSeek's `DualPipeV.step`): phase 0 runs stage
/// `rank`, phase 1 stage 2·ranks−1−rank; every micro-batch passes both.
fn dualpipe_v(ranks: u32, micro_batches: u32, rank: u32) -> Vec<Instruction> {
    let stages = 2 * ranks;
    let mut p =
        Phased::new(Stream::new(rank, stages, Layout::V { ranks }), [rank, stages - 1 - rank], [0, 0]);
    run_dual_phases(
        &mut p,
        DualShape {
            step_1: (ranks - rank - 1) * 2,
            step_2: rank + 1,
            step_3: ranks - rank - 1,
            step_4: micro_batches - stages + rank + 1,
            half_rank: rank,
            at_turn: rank == ranks - 1,
        },
    );
    p.finish()
}

/// The phase lengths of one rank; the two reference implementations differ only in these.
struct DualShape {
    step_1: u32,
    step_2: u32,
    step_3: u32,
    step_4: u32,
    /// Distance from the pipeline's end (DualPipe: min(r, N−1−r); DualPipeV: r).
    half_rank: u32,
    at_turn: bool,
}

/// The eight phases of DeepSeek's reference, shared by DualPipe and DualPipeV.
fn run_dual_phases(p: &mut Phased, shape: DualShape) {
    let DualShape { step_1, step_2, step_3, step_4, half_rank, at_turn } = shape;
    // 1. nF0
    for _ in 0..step_1 {
        p.forward_chunk(0, true);
    }
    // 2. nF0F1
    p.post_recv_forward(0);
    for i in 0..step_2 {
        p.forward_chunk(0, at_turn);
        p.post_recv_forward(0);
        p.forward_chunk(1, !at_turn || i < step_2 - 1);
        if !at_turn {
            p.send_forward(0);
        }
    }
    // 3. nB1W1F1, zero bubble: W right after its B
    for _ in 0..step_3 {
        p.backward_chunk(1, true, true);
        p.post_recv_forward(1);
        p.weight_chunk();
        p.forward_chunk(1, true);
    }
    // 4. main loop: nF0B1F1B0, overlapped pairs
    for i in 0..step_4 {
        if i == 0 && at_turn {
            // Not overlapped, to shrink the bubble where the directions meet.
            p.forward_chunk(0, false);
            p.send_forward(1);
            p.backward_chunk(1, false, false);
            p.send_forward(0);
            p.send_backward(1);
        } else {
            p.forward_backward_chunk(0, 1);
        }
        p.forward_backward_chunk(1, 0);
    }
    // 5. nB1F1B0
    for _ in 0..step_3 {
        p.backward_chunk(1, false, true);
        p.forward_backward_chunk(1, 0);
    }
    // 6. nB1B0, W deferred from the middle on
    let step_6 = half_rank + 1;
    let mut defer = false;
    for i in 0..step_6 {
        if i == step_6 / 2 && half_rank % 2 == 1 {
            defer = true;
        }
        p.backward_chunk(1, defer, true);
        if i == step_6 / 2 && half_rank % 2 == 0 {
            defer = true;
        }
        p.backward_chunk(0, defer, true);
    }
    // 7. nWB0
    for _ in 0..step_3 {
        p.weight_chunk();
        p.backward_chunk(0, true, true);
    }
    // 8. nW
    for _ in 0..step_2 {
        p.weight_chunk();
    }
}
