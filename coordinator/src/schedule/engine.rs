//! Runs instruction streams against each other: the validator and the simulator are the
//! same in-order execution, one proving the rules of the execution model (see the module
//! above) and the other timing it.
//!
//! Each rank executes its stream strictly in order. Only receives can wait; every other
//! instruction's inputs are local, so an instruction whose inputs are missing is an error
//! at that instruction, not a wait. When no rank can move and some are unfinished, the
//! schedule deadlocks, and the error lists what each rank waits for.

use super::{Chunk, Instruction, MAX_CHUNKS, MAX_STAGES, Schedule, ScheduleError};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};

/// Time costs for the simulator, in any unit (the paper's tables use unit-free F, B, W).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    /// F: a forward chunk.
    pub forward: f64,
    /// B: a full backward chunk (input and weight gradients).
    pub backward: f64,
    /// W: the weight-gradient part of a backward chunk. A `BackwardInput` costs B − W.
    pub weight: f64,
    /// F&B: a forward chunk and a full backward chunk overlapped.
    pub overlapped: f64,
    /// Point-to-point latency of one transfer.
    pub latency: f64,
}

impl Default for Costs {
    /// F = 1, B = 2, W = 1, F&B = F + B (no gain from overlap), zero latency.
    fn default() -> Self {
        Costs { forward: 1.0, backward: 2.0, weight: 1.0, overlapped: 3.0, latency: 0.0 }
    }
}

/// `F=1 B=2 W=1 F&B=3`, as `--costs` takes them (B a full backward), then the latency if
/// there is one.
impl std::fmt::Display for Costs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use super::draw::number;
        write!(
            f,
            "F={} B={} W={} F&B={}",
            number(self.forward),
            number(self.backward),
            number(self.weight),
            number(self.overlapped)
        )?;
        if self.latency > 0.0 {
            write!(f, " latency={}", number(self.latency))?;
        }
        Ok(())
    }
}

impl Costs {
    /// Parses `F,B,W,FB` (e.g. `1,2,1,2.5`), with zero latency.
    pub fn parse(text: &str) -> Result<Costs, ScheduleError> {
        let values = text
            .split(',')
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .map_err(|_| ScheduleError::Costs(format!("{v:?} in {text:?} is not a number")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let [forward, backward, weight, overlapped] = values[..] else {
            return Err(ScheduleError::Costs(format!(
                "expected four comma-separated costs F,B,W,FB, got {} in {text:?}",
                values.len()
            )));
        };
        let costs = Costs { forward, backward, weight, overlapped, latency: 0.0 };
        costs.check()?;
        Ok(costs)
    }

    /// Checks that every cost is finite and non-negative and that W ≤ B.
    pub fn check(&self) -> Result<(), ScheduleError> {
        for (name, value) in [
            ("F", self.forward),
            ("B", self.backward),
            ("W", self.weight),
            ("F&B", self.overlapped),
            ("latency", self.latency),
        ] {
            if !value.is_finite() || value < 0.0 {
                return Err(ScheduleError::Costs(format!("{name} = {value} must be finite and ≥ 0")));
            }
        }
        if self.weight > self.backward {
            return Err(ScheduleError::Costs(format!(
                "W = {} exceeds B = {}: W is a part of the full backward B",
                self.weight, self.backward
            )));
        }
        Ok(())
    }

    /// Whether these are costs under which Table 2's DualPipe formula is the bubble of the
    /// reference's op order: no latency, the input-gradient part of B as long as F
    /// (F = B − W), W ≤ F, and B ≤ F&B ≤ F + B. The zero-bubble paper's F = B − W = W
    /// lies inside. Compared with a relative tolerance, as the costs may come from sums.
    pub fn matches_table_2(&self) -> bool {
        let tolerance = 1e-9 * (self.forward + self.backward + self.overlapped).max(f64::MIN_POSITIVE);
        let at_most = |a: f64, b: f64| a <= b + tolerance;
        self.latency == 0.0
            && (self.forward - (self.backward - self.weight)).abs() <= tolerance
            && at_most(self.weight, self.forward)
            && at_most(self.backward, self.overlapped)
            && at_most(self.overlapped, self.forward + self.backward)
    }

    /// The time an instruction keeps its rank busy (transfers: none).
    pub fn of(&self, instruction: &Instruction) -> f64 {
        match instruction {
            Instruction::Forward { .. } => self.forward,
            Instruction::BackwardInput { .. } => self.backward - self.weight,
            Instruction::BackwardWeight { .. } => self.weight,
            Instruction::Backward { .. } => self.backward,
            Instruction::OverlappedForwardBackward { .. } => self.overlapped,
            _ => 0.0,
        }
    }
}

/// What the validator proved about a schedule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Most chunks whose activations a rank holds at once (from a forward until its full
    /// backward or its deferred W), in units of one micro-batch through one stage.
    pub peak_activations: Vec<u32>,
    /// The stages each rank hosts, ascending; its length is the rank's parameter copies in
    /// units of one stage's parameters.
    pub stages: Vec<Vec<u32>>,
    /// Point-to-point transfers matched.
    pub transfers: usize,
}

impl Report {
    /// Parameters per rank, in stages' worth (DualPipe: 2, 1F1B: 1).
    pub fn parameter_copies(&self) -> Vec<u32> {
        self.stages.iter().map(|s| s.len() as u32).collect()
    }
}

/// One executed instruction on the simulated clock.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Span {
    /// The rank that ran it.
    pub rank: u32,
    /// Its position in the rank's stream.
    pub index: usize,
    /// The instruction.
    pub instruction: Instruction,
    /// When it started (a receive: when the rank reached it).
    pub start: f64,
    /// When it finished (a receive: when the data arrived).
    pub end: f64,
}

/// A simulated step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// The costs it was simulated under ([`simulate`]); `None` from [`simulate_with`].
    pub costs: Option<Costs>,
    /// Every instruction of every rank, rank by rank in stream order.
    pub spans: Vec<Span>,
    /// When the last rank finishes.
    pub makespan: f64,
    /// Per rank: time spent computing.
    pub busy: Vec<f64>,
    /// Per rank: makespan − busy.
    pub idle: Vec<f64>,
    /// The pipeline bubble: the largest idle time over ranks.
    pub bubble: f64,
    /// What the validator reports (peak activations per rank, stages per rank).
    pub report: Report,
}

/// Proves `schedule` valid under the execution model; see [`Report`] for what it measures.
pub fn validate(schedule: &Schedule) -> Result<Report, ScheduleError> {
    Ok(execute(schedule, &|i| Costs::default().of(i), 0.0)?.report)
}

/// Validates `schedule` and times it under `costs`.
pub fn simulate(schedule: &Schedule, costs: &Costs) -> Result<Timeline, ScheduleError> {
    costs.check()?;
    let mut timeline = execute(schedule, &|i| costs.of(i), costs.latency)?;
    timeline.costs = Some(*costs);
    Ok(timeline)
}

/// Validates `schedule` and times it with a duration per instruction (e.g. per stage, when
/// stages differ in cost) and a point-to-point `latency`. Transfers take no rank time
/// whatever `duration` says of them.
pub fn simulate_with(
    schedule: &Schedule,
    duration: impl Fn(&Instruction) -> f64,
    latency: f64,
) -> Result<Timeline, ScheduleError> {
    if !latency.is_finite() || latency < 0.0 {
        return Err(ScheduleError::Costs(format!("latency = {latency} must be finite and ≥ 0")));
    }
    execute(schedule, &duration, latency)
}

/// The two kinds of point-to-point message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Payload {
    Activation,
    Grad,
}

impl Payload {
    fn name(self) -> &'static str {
        match self {
            Payload::Activation => "activation",
            Payload::Grad => "input gradient",
        }
    }
}

/// A message in flight: to whom, when it arrives, whether it was received.
struct Message {
    to: u32,
    arrival: f64,
    received: bool,
}

/// Per-chunk progress, all on the rank the chunk is placed on.
#[derive(Default, Clone, Copy)]
struct ChunkState {
    forward: bool,
    backward_input: bool,
    weight: bool,
}

struct Execution<'a> {
    schedule: &'a Schedule,
    placement: HashMap<Chunk, u32>,
    chunks: HashMap<Chunk, ChunkState>,
    messages: HashMap<(Payload, Chunk), Message>,
    /// What each rank has received: (payload, producing chunk).
    received: Vec<HashSet<(Payload, Chunk)>>,
    live: Vec<u32>,
    peak: Vec<u32>,
}

fn execute(
    schedule: &Schedule,
    duration: &dyn Fn(&Instruction) -> f64,
    latency: f64,
) -> Result<Timeline, ScheduleError> {
    let placement = place(schedule)?;
    let ranks = schedule.ranks.len();
    let mut run = Execution {
        schedule,
        placement,
        chunks: HashMap::new(),
        messages: HashMap::new(),
        received: vec![HashSet::new(); ranks],
        live: vec![0; ranks],
        peak: vec![0; ranks],
    };
    let mut next = vec![0usize; ranks];
    let mut clock = vec![0.0f64; ranks];
    let mut busy = vec![0.0f64; ranks];
    let mut spans: Vec<Vec<Span>> = vec![Vec::new(); ranks];
    loop {
        let mut progressed = false;
        for rank in 0..ranks {
            while let Some(instruction) = schedule.ranks[rank].get(next[rank]) {
                let index = next[rank];
                let at = |reason: String| ScheduleError::Invalid {
                    rank: rank as u32,
                    index,
                    instruction: instruction.to_string(),
                    reason,
                };
                let start = clock[rank];
                let cost = if instruction.is_compute() { duration(instruction) } else { 0.0 };
                if !cost.is_finite() || cost < 0.0 {
                    return Err(ScheduleError::Costs(format!(
                        "rank {rank}, instruction {index} ({instruction}) lasts {cost}: durations must be finite and ≥ 0"
                    )));
                }
                let end = match run.step(rank as u32, instruction, start, cost, latency).map_err(at)? {
                    Some(end) => end,
                    None => break, // a receive whose send has not been issued yet
                };
                if instruction.is_compute() {
                    busy[rank] += end - start;
                }
                clock[rank] = end;
                spans[rank].push(Span { rank: rank as u32, index, instruction: *instruction, start, end });
                next[rank] += 1;
                progressed = true;
            }
        }
        if next.iter().zip(&schedule.ranks).all(|(n, stream)| *n == stream.len()) {
            break;
        }
        if !progressed {
            let blocked = (0..ranks)
                .filter(|&r| next[r] < schedule.ranks[r].len())
                .map(|r| format!("rank {r} at instruction {} ({})", next[r], schedule.ranks[r][next[r]]))
                .collect();
            return Err(ScheduleError::Deadlock { blocked });
        }
    }
    run.check_complete()?;

    let makespan = clock.iter().copied().fold(0.0, f64::max);
    if !makespan.is_finite() {
        return Err(ScheduleError::Costs(format!("the simulated step lasts {makespan}: the costs overflow")));
    }
    let idle: Vec<f64> = busy.iter().map(|b| makespan - b).collect();
    let bubble = idle.iter().copied().fold(0.0, f64::max);
    let mut stages = vec![Vec::new(); ranks];
    for (chunk, rank) in &run.placement {
        stages[*rank as usize].push(chunk.stage);
    }
    for s in &mut stages {
        s.sort_unstable();
        s.dedup();
    }
    let report = Report { peak_activations: run.peak, stages, transfers: run.messages.len() };
    Ok(Timeline {
        costs: None,
        spans: spans.into_iter().flatten().collect(),
        makespan,
        busy,
        idle,
        bubble,
        report,
    })
}

/// Where each chunk runs: the rank whose stream holds its forward (alone or overlapped).
fn place(schedule: &Schedule) -> Result<HashMap<Chunk, u32>, ScheduleError> {
    if schedule.ranks.is_empty() {
        return Err(ScheduleError::Spec("a schedule needs at least one rank".into()));
    }
    let chunks = u64::from(schedule.num_stages) * u64::from(schedule.num_micro_batches);
    if schedule.num_stages > MAX_STAGES || chunks > MAX_CHUNKS {
        return Err(ScheduleError::Spec(format!(
            "{} stages × {} micro-batches: at most {MAX_STAGES} stages and {MAX_CHUNKS} chunks are supported",
            schedule.num_stages, schedule.num_micro_batches
        )));
    }
    let mut placement = HashMap::new();
    for (rank, stream) in schedule.ranks.iter().enumerate() {
        for (index, instruction) in stream.iter().enumerate() {
            let forward = match instruction {
                Instruction::Forward { chunk } => chunk,
                Instruction::OverlappedForwardBackward { forward, .. } => forward,
                _ => continue,
            };
            let invalid = |reason: String| ScheduleError::Invalid {
                rank: rank as u32,
                index,
                instruction: instruction.to_string(),
                reason,
            };
            if forward.micro_batch >= schedule.num_micro_batches || forward.stage >= schedule.num_stages {
                return Err(invalid(format!(
                    "the schedule has {} micro-batches and {} stages",
                    schedule.num_micro_batches, schedule.num_stages
                )));
            }
            if let Some(other) = placement.insert(*forward, rank as u32) {
                return Err(invalid(format!("{forward} already has a forward on rank {other}")));
            }
        }
    }
    Ok(placement)
}

impl Execution<'_> {
    /// Executes one instruction on `rank` at time `now`: `Ok(Some(end))` when it ran,
    /// `Ok(None)` when it is a receive that must wait, `Err(reason)` when it is invalid.
    fn step(
        &mut self,
        rank: u32,
        instruction: &Instruction,
        now: f64,
        cost: f64,
        latency: f64,
    ) -> Result<Option<f64>, String> {
        match *instruction {
            Instruction::Forward { chunk } => {
                self.check_forward(rank, chunk)?;
                self.apply_forward(rank, chunk);
            }
            Instruction::BackwardInput { chunk } => {
                self.check_backward(rank, chunk)?;
                self.state(chunk).backward_input = true;
            }
            Instruction::Backward { chunk } => {
                self.check_backward(rank, chunk)?;
                self.apply_full_backward(rank, chunk);
            }
            Instruction::BackwardWeight { chunk } => {
                self.check_here(rank, chunk)?;
                let state = self.state(chunk);
                if !state.backward_input {
                    return Err(format!("W of {chunk} before its B"));
                }
                if state.weight {
                    return Err(format!("{chunk} already has its weight gradient"));
                }
                state.weight = true;
                self.free(rank);
            }
            Instruction::OverlappedForwardBackward { forward, backward } => {
                // Both halves run at once, so each must be ready before either runs.
                self.check_forward(rank, forward)?;
                self.check_backward(rank, backward)?;
                self.apply_forward(rank, forward);
                self.apply_full_backward(rank, backward);
            }
            Instruction::SendActivation { chunk, peer } => {
                self.check_here(rank, chunk)?;
                if !self.state(chunk).forward {
                    return Err(format!("sends the activation of {chunk} before its forward"));
                }
                let next = self.neighbour(chunk, 1).ok_or("the last stage's output is the loss, not sent")?;
                self.check_send(rank, peer, next)?;
                self.post(Payload::Activation, chunk, peer, now + latency)?;
            }
            Instruction::SendGrad { chunk, peer } => {
                self.check_here(rank, chunk)?;
                if !self.state(chunk).backward_input {
                    return Err(format!("sends the input gradient of {chunk} before its backward"));
                }
                let previous = self.neighbour(chunk, -1).ok_or("stage 0 has no input gradient to send")?;
                self.check_send(rank, peer, previous)?;
                self.post(Payload::Grad, chunk, peer, now + latency)?;
            }
            Instruction::RecvActivation { chunk, peer } => {
                let next = self.neighbour(chunk, 1).ok_or("the last stage's output is never sent")?;
                return self.receive(rank, Payload::Activation, chunk, peer, next, now);
            }
            Instruction::RecvGrad { chunk, peer } => {
                let previous = self.neighbour(chunk, -1).ok_or("stage 0 sends no input gradient")?;
                return self.receive(rank, Payload::Grad, chunk, peer, previous, now);
            }
        }
        Ok(Some(now + cost))
    }

    fn state(&mut self, chunk: Chunk) -> &mut ChunkState {
        self.chunks.entry(chunk).or_default()
    }

    fn rank_of(&self, chunk: Chunk) -> Result<u32, String> {
        self.placement.get(&chunk).copied().ok_or_else(|| format!("no rank runs the forward of {chunk}"))
    }

    /// The chunk `delta` stages away in the same micro-batch, if it exists.
    fn neighbour(&self, chunk: Chunk, delta: i64) -> Option<Chunk> {
        let stage = chunk.stage as i64 + delta;
        (0..self.schedule.num_stages as i64)
            .contains(&stage)
            .then(|| Chunk::new(chunk.micro_batch, stage as u32))
    }

    fn check_here(&self, rank: u32, chunk: Chunk) -> Result<(), String> {
        let home = self.rank_of(chunk)?;
        if home != rank {
            return Err(format!("{chunk} runs its forward on rank {home}, so its work belongs there"));
        }
        Ok(())
    }

    fn check_forward(&mut self, rank: u32, chunk: Chunk) -> Result<(), String> {
        if self.state(chunk).forward {
            return Err(format!("{chunk} already ran its forward"));
        }
        if let Some(previous) = self.neighbour(chunk, -1) {
            self.check_input(rank, Payload::Activation, previous, chunk)?;
        }
        Ok(())
    }

    fn check_backward(&mut self, rank: u32, chunk: Chunk) -> Result<(), String> {
        self.check_here(rank, chunk)?;
        let state = *self.state(chunk);
        if !state.forward {
            return Err(format!("backward of {chunk} before its forward"));
        }
        if state.backward_input {
            return Err(format!("{chunk} already ran its backward"));
        }
        if let Some(next) = self.neighbour(chunk, 1) {
            self.check_input(rank, Payload::Grad, next, chunk)?;
        }
        Ok(())
    }

    /// Whether `consumer` on `rank` has the tensor `producer` makes for it: computed on
    /// this rank already, or received.
    fn check_input(
        &mut self,
        rank: u32,
        payload: Payload,
        producer: Chunk,
        consumer: Chunk,
    ) -> Result<(), String> {
        let what = payload.name();
        if self.rank_of(producer)? == rank {
            let state = self.state(producer);
            let done = match payload {
                Payload::Activation => state.forward,
                Payload::Grad => state.backward_input,
            };
            if !done {
                return Err(format!(
                    "{consumer} needs the {what} of {producer}, which this rank has not computed yet"
                ));
            }
        } else if !self.received[rank as usize].contains(&(payload, producer)) {
            return Err(format!(
                "{consumer} needs the {what} of {producer} from rank {}, which this rank has not received",
                self.rank_of(producer)?
            ));
        }
        Ok(())
    }

    fn apply_forward(&mut self, rank: u32, chunk: Chunk) {
        self.state(chunk).forward = true;
        let r = rank as usize;
        self.live[r] += 1;
        self.peak[r] = self.peak[r].max(self.live[r]);
    }

    fn apply_full_backward(&mut self, rank: u32, chunk: Chunk) {
        let state = self.state(chunk);
        state.backward_input = true;
        state.weight = true;
        self.free(rank);
    }

    fn free(&mut self, rank: u32) {
        self.live[rank as usize] -= 1;
    }

    fn check_send(&self, rank: u32, peer: u32, consumer: Chunk) -> Result<(), String> {
        let home = self.rank_of(consumer)?;
        if peer == rank {
            return Err(format!("sends to itself ({consumer} runs on this rank)"));
        }
        if peer != home {
            return Err(format!("{consumer} runs on rank {home}, not on rank {peer}"));
        }
        Ok(())
    }

    fn post(&mut self, payload: Payload, chunk: Chunk, to: u32, arrival: f64) -> Result<(), String> {
        let message = Message { to, arrival, received: false };
        if self.messages.insert((payload, chunk), message).is_some() {
            return Err(format!("{chunk}'s tensor was already sent"));
        }
        Ok(())
    }

    fn receive(
        &mut self,
        rank: u32,
        payload: Payload,
        producer: Chunk,
        peer: u32,
        consumer: Chunk,
        now: f64,
    ) -> Result<Option<f64>, String> {
        let home = self.rank_of(producer)?;
        if peer != home {
            return Err(format!("{producer} runs on rank {home}, not on rank {peer}"));
        }
        let destination = self.rank_of(consumer)?;
        if destination != rank {
            return Err(format!("{consumer}, which consumes it, runs on rank {destination}"));
        }
        if peer == rank {
            return Err("receives from itself".into());
        }
        let Some(message) = self.messages.get_mut(&(payload, producer)) else {
            return Ok(None);
        };
        if message.received {
            return Err(format!("{producer}'s tensor was already received"));
        }
        debug_assert_eq!(message.to, rank);
        message.received = true;
        self.received[rank as usize].insert((payload, producer));
        Ok(Some(now.max(message.arrival)))
    }

    /// After every stream ran to its end: all work done, every message received.
    fn check_complete(&self) -> Result<(), ScheduleError> {
        // Only the first few problems are spelled out; the rest are counted.
        const SHOWN: usize = 8;
        let mut missing = Vec::new();
        let mut total = 0usize;
        let mut note = |problem: &dyn Fn() -> String| {
            total += 1;
            if missing.len() < SHOWN {
                missing.push(problem());
            }
        };
        for micro_batch in 0..self.schedule.num_micro_batches {
            for stage in 0..self.schedule.num_stages {
                let chunk = Chunk::new(micro_batch, stage);
                let state = self.chunks.get(&chunk).copied().unwrap_or_default();
                if !state.forward {
                    note(&|| format!("no forward of {chunk}"));
                } else if !state.backward_input {
                    note(&|| format!("no backward of {chunk}"));
                } else if !state.weight {
                    note(&|| format!("the deferred W of {chunk} never runs"));
                }
            }
        }
        let mut unreceived: Vec<_> = self.messages.iter().filter(|(_, m)| !m.received).collect();
        unreceived.sort_by_key(|((_, chunk), m)| (*chunk, m.to));
        for ((payload, chunk), message) in unreceived {
            note(&|| {
                format!("the {} of {chunk} sent to rank {} is never received", payload.name(), message.to)
            });
        }
        if total == 0 {
            return Ok(());
        }
        let more = if total > SHOWN { format!(" (and {} more)", total - SHOWN) } else { String::new() };
        Err(ScheduleError::Incomplete(format!("{}{more}", missing.join("; "))))
    }
}
