//! The schedule compiler end to end: every generator's streams pass the validator, the
//! simulator reproduces Table 2 of the DeepSeek-V3 report, DualPipe has the reference's
//! structure, and hand-made streams that break a rule are rejected with the rank, the
//! instruction and the reason.

use flotilla_coordinator::schedule::{
    Chunk, Costs, Instruction, PaperTable, Schedule, ScheduleError, ScheduleKind, ScheduleSpec, compile,
    simulate, simulate_with, validate,
};
use proptest::prelude::*;

fn spec(kind: ScheduleKind, pp: u32, micro_batches: u32) -> ScheduleSpec {
    ScheduleSpec { kind, pp, micro_batches }
}

/// Micro-batch counts every kind accepts for `pp` stages.
fn micro_batch_counts(pp: u32) -> [u32; 4] {
    [2 * pp, 2 * pp + 2, 3 * pp, 4 * pp + 6]
}

/// Costs under which the report's formulas are exact: F = B − W = W, any F&B ≤ F + B.
fn paper_costs(unit: f64, overlapped: f64) -> Costs {
    Costs { forward: unit, backward: 2.0 * unit, weight: unit, overlapped, latency: 0.0 }
}

#[test]
fn every_generator_is_valid_and_matches_table_2_for_every_even_pp() {
    for kind in ScheduleKind::ALL {
        for pp in (2..=16).step_by(2) {
            for micro_batches in micro_batch_counts(pp) {
                let schedule = compile(&spec(kind, pp, micro_batches)).unwrap();
                assert_eq!(schedule.num_ranks(), kind.ranks_for(pp));
                let report =
                    validate(&schedule).unwrap_or_else(|e| panic!("{kind} pp {pp} mb {micro_batches}: {e}"));
                for costs in [paper_costs(1.0, 3.0), paper_costs(1.0, 2.0), paper_costs(2.0, 5.0)] {
                    let timeline = simulate(&schedule, &costs).unwrap();
                    let paper = kind.paper_figures(pp, &costs);
                    assert_eq!(
                        timeline.bubble, paper.bubble,
                        "{kind} pp {pp} mb {micro_batches} costs {costs:?}: simulated bubble vs Table 2"
                    );
                    assert_eq!(timeline.report, report);
                }
                let paper = kind.paper_figures(pp, &Costs::default());
                let peak = *report.peak_activations.iter().max().unwrap();
                assert_eq!(peak, paper.activations, "{kind} pp {pp} mb {micro_batches}: peak activations");
                assert!(
                    report.parameter_copies().iter().all(|&c| c == paper.parameter_copies),
                    "{kind} pp {pp}: parameter copies {:?}",
                    report.parameter_copies()
                );
            }
        }
    }
}

#[test]
fn the_bubble_does_not_grow_with_the_number_of_micro_batches() {
    // Any costs, but no latency: with latency, 1F1B's steady state waits on every transfer.
    let costs = Costs { forward: 3.0, backward: 7.0, weight: 2.0, overlapped: 8.0, latency: 0.0 };
    for kind in ScheduleKind::ALL {
        let bubbles: Vec<f64> = [16, 20, 32, 64, 128]
            .into_iter()
            .map(|mb| simulate(&compile(&spec(kind, 8, mb)).unwrap(), &costs).unwrap().bubble)
            .collect();
        assert!(bubbles.windows(2).all(|w| w[0] == w[1]), "{kind}: {bubbles:?}");
    }
}

#[test]
fn dualpipe_has_the_smallest_bubble_at_the_papers_cost_model() {
    let costs = paper_costs(1.0, 2.5);
    let bubble = |kind| simulate(&compile(&spec(kind, 8, 20)).unwrap(), &costs).unwrap().bubble;
    let (one, zb, dual) =
        (bubble(ScheduleKind::OneFOneB), bubble(ScheduleKind::Zb1p), bubble(ScheduleKind::DualPipe));
    assert!(dual < zb && zb < one, "1F1B {one}, ZB1P {zb}, DualPipe {dual}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Table 2 holds everywhere in the region `Costs::matches_table_2` describes: F = B − W,
    /// W ≤ F, B ≤ F&B ≤ F + B (quarter units keep the sums exact in f64).
    #[test]
    fn table_2_holds_wherever_the_costs_match_it(
        half_pp in 1u32..=8,
        extra in 0u32..6,
        forward in 1u32..24,
        weight_share in 0u32..=8,
        overlap_share in 0u32..=8,
        kind_index in 0usize..4,
    ) {
        let pp = 2 * half_pp;
        let kind = ScheduleKind::ALL[kind_index];
        let forward = 0.25 * forward as f64;
        let weight = forward * weight_share as f64 / 8.0;
        let backward = forward + weight;
        let overlapped = backward + forward * overlap_share as f64 / 8.0;
        let costs = Costs { forward, backward, weight, overlapped, latency: 0.0 };
        prop_assert!(costs.matches_table_2());
        let schedule = compile(&spec(kind, pp, 2 * pp + 2 * extra)).unwrap();
        let timeline = simulate(&schedule, &costs).unwrap();
        prop_assert_eq!(timeline.bubble, kind.paper_figures(pp, &costs).bubble);
    }

    /// Under any costs: a rank is never busy longer than the step, each rank computes
    /// exactly its share of work, and latency never shortens the step.
    #[test]
    fn simulated_time_accounts_for_all_work(
        half_pp in 1u32..=6,
        extra in 0u32..5,
        kind_index in 0usize..4,
        forward in 1u32..8,
        weight in 0u32..5,
        input in 1u32..8,
        overlap in 0u32..8,
        latency in 0u32..3,
    ) {
        let pp = 2 * half_pp;
        let kind = ScheduleKind::ALL[kind_index];
        let micro_batches = 2 * pp + 2 * extra;
        let backward = (weight + input) as f64;
        let overlapped = forward as f64 + backward - overlap.min(forward) as f64;
        let costs = Costs { forward: forward as f64, backward, weight: weight as f64, overlapped, latency: latency as f64 };
        let schedule = compile(&spec(kind, pp, micro_batches)).unwrap();
        let timeline = simulate(&schedule, &costs).unwrap();
        let no_latency = simulate(&schedule, &Costs { latency: 0.0, ..costs }).unwrap();
        prop_assert!(timeline.makespan >= no_latency.makespan);
        for (rank, stream) in schedule.ranks.iter().enumerate() {
            let work: f64 = stream.iter().map(|i| costs.of(i)).sum();
            prop_assert_eq!(timeline.busy[rank], work);
            prop_assert!(timeline.busy[rank] <= timeline.makespan);
            prop_assert_eq!(timeline.idle[rank], timeline.makespan - work);
        }
        // Every instruction of a rank starts after the previous one ended.
        for pair in timeline.spans.windows(2) {
            if pair[0].rank == pair[1].rank {
                prop_assert!(pair[1].start >= pair[0].end);
            }
        }
    }
}

/// Outside that region the formula is only an estimate: an overlapped pair cheaper than a
/// full backward leaves the middle ranks waiting, which the formula does not count.
#[test]
fn outside_the_region_the_dualpipe_formula_is_an_estimate() {
    let costs = Costs { forward: 1.0, backward: 2.0, weight: 1.0, overlapped: 1.0, latency: 0.0 };
    assert!(!costs.matches_table_2());
    let schedule = compile(&spec(ScheduleKind::DualPipe, 8, 20)).unwrap();
    let simulated = simulate(&schedule, &costs).unwrap().bubble;
    let formula = ScheduleKind::DualPipe.paper_figures(8, &costs).bubble;
    assert_eq!((simulated, formula), (8.0, 0.0));
    assert!(!Costs { latency: 0.1, ..paper_costs(1.0, 3.0) }.matches_table_2());
    assert!(paper_costs(0.1, 0.3).matches_table_2(), "sums that are not exact in binary still match");
}

#[test]
fn per_instruction_durations_time_each_stage_on_its_own() {
    let schedule = compile(&spec(ScheduleKind::DualPipe, 4, 8)).unwrap();
    let costs = paper_costs(1.0, 2.5);
    let uniform = simulate_with(&schedule, |i| costs.of(i), 0.0).unwrap();
    let reference = simulate(&schedule, &costs).unwrap();
    assert_eq!((uniform.makespan, uniform.bubble), (reference.makespan, reference.bubble));
    assert_eq!(uniform.costs, None);

    // Twice the work on stage 0 (embedding) lengthens the step and idles the other stages.
    let stage_of = |i: &Instruction| match *i {
        Instruction::Forward { chunk }
        | Instruction::BackwardInput { chunk }
        | Instruction::BackwardWeight { chunk }
        | Instruction::Backward { chunk } => chunk.stage,
        Instruction::OverlappedForwardBackward { forward, .. } => forward.stage,
        _ => u32::MAX,
    };
    let heavy =
        simulate_with(&schedule, |i| costs.of(i) * if stage_of(i) == 0 { 2.0 } else { 1.0 }, 0.0).unwrap();
    assert!(heavy.makespan > reference.makespan && heavy.bubble > reference.bubble);

    let err = simulate_with(&schedule, |_| -1.0, 0.0).unwrap_err().to_string();
    assert!(err.contains("rank 0, instruction 0") && err.contains("must be finite and ≥ 0"), "{err}");
    let err = simulate(
        &schedule,
        &Costs { forward: 1e308, backward: 1e308, weight: 0.0, overlapped: 1e308, latency: 0.0 },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("overflow"), "{err}");
}

#[test]
fn sizes_beyond_the_limits_are_refused_before_any_work() {
    let err = compile(&spec(ScheduleKind::DualPipe, 1 << 31, 0)).unwrap_err().to_string();
    assert!(err.contains("at most 4096 stages"), "{err}");
    let err = compile(&spec(ScheduleKind::OneFOneB, 4096, 4096)).unwrap_err().to_string();
    assert!(err.contains("pp × micro-batches must be at most"), "{err}");
    let huge = Schedule {
        kind: ScheduleKind::OneFOneB,
        num_stages: u32::MAX,
        num_micro_batches: u32::MAX,
        ranks: vec![vec![]],
    };
    let err = validate(&huge).unwrap_err().to_string();
    assert!(err.contains("at most 4096 stages"), "{err}");
}

/// DeepSeek's reference feeds the second half of the micro-batches from the last rank as a
/// mirror image of the first half: rank r's stream is rank pp−1−r's with the directions
/// swapped.
#[test]
fn dualpipe_ranks_mirror_each_other() {
    for pp in [2u32, 4, 8, 16] {
        let micro_batches = 2 * pp + 4;
        let half = micro_batches / 2;
        let schedule = compile(&spec(ScheduleKind::DualPipe, pp, micro_batches)).unwrap();
        let mirror_chunk = |c: Chunk| {
            let mb = if c.micro_batch < half { c.micro_batch + half } else { c.micro_batch - half };
            Chunk::new(mb, c.stage)
        };
        let mirror = |i: &Instruction| match *i {
            Instruction::Forward { chunk } => Instruction::Forward { chunk: mirror_chunk(chunk) },
            Instruction::BackwardInput { chunk } => Instruction::BackwardInput { chunk: mirror_chunk(chunk) },
            Instruction::BackwardWeight { chunk } => {
                Instruction::BackwardWeight { chunk: mirror_chunk(chunk) }
            }
            Instruction::Backward { chunk } => Instruction::Backward { chunk: mirror_chunk(chunk) },
            Instruction::OverlappedForwardBackward { forward, backward } => {
                Instruction::OverlappedForwardBackward {
                    forward: mirror_chunk(forward),
                    backward: mirror_chunk(backward),
                }
            }
            Instruction::SendActivation { chunk, peer } => {
                Instruction::SendActivation { chunk: mirror_chunk(chunk), peer: pp - 1 - peer }
            }
            Instruction::RecvActivation { chunk, peer } => {
                Instruction::RecvActivation { chunk: mirror_chunk(chunk), peer: pp - 1 - peer }
            }
            Instruction::SendGrad { chunk, peer } => {
                Instruction::SendGrad { chunk: mirror_chunk(chunk), peer: pp - 1 - peer }
            }
            Instruction::RecvGrad { chunk, peer } => {
                Instruction::RecvGrad { chunk: mirror_chunk(chunk), peer: pp - 1 - peer }
            }
        };
        for rank in 0..pp as usize {
            let mirrored: Vec<Instruction> =
                schedule.ranks[pp as usize - 1 - rank].iter().map(mirror).collect();
            assert_eq!(schedule.ranks[rank], mirrored, "pp {pp}: rank {rank}");
        }
    }
}

fn compute_only(stream: &[Instruction]) -> Vec<Instruction> {
    stream.iter().copied().filter(Instruction::is_compute).collect()
}

/// The eight phases of the reference on the first and a middle rank of DualPipe, pp 8.
#[test]
fn dualpipe_follows_the_reference_phases() {
    let (pp, micro_batches) = (8u32, 20u32);
    let schedule = compile(&spec(ScheduleKind::DualPipe, pp, micro_batches)).unwrap();
    let half = micro_batches / 2;
    let f = |mb: u32, stage: u32| Instruction::Forward { chunk: Chunk::new(mb, stage) };

    // Rank 0 (h = 0): phase 1 runs 2(H−h−1) = 6 forwards of direction 0, phase 2 one
    // (F0, F1) pair: seven direction-0 forwards, then the first direction-1 micro-batch on
    // stage 7; phase 3 is (B1 with W deferred, W, F1) three times.
    let rank0 = compute_only(&schedule.ranks[0]);
    let expected_start: Vec<Instruction> = (0..7).map(|m| f(m, 0)).chain([f(half, 7)]).collect();
    assert_eq!(rank0[..8], expected_start[..]);
    let chunk = |mb, stage| Chunk::new(mb, stage);
    assert_eq!(
        rank0[8..11],
        [
            Instruction::BackwardInput { chunk: chunk(half, 7) },
            Instruction::BackwardWeight { chunk: chunk(half, 7) },
            f(half + 1, 7)
        ]
    );

    // A middle rank (3): no phase 1, four (F0, F1) pairs, then the main loop's first pair
    // not overlapped: F0 alone, then a full B1.
    let rank3 = compute_only(&schedule.ranks[3]);
    let pairs: Vec<Instruction> = (0..4).flat_map(|i| [f(i, 3), f(half + i, 4)]).collect();
    assert_eq!(rank3[..8], pairs[..]);
    assert_eq!(rank3[8..10], [f(4, 3), Instruction::Backward { chunk: chunk(half, 4) }]);
    assert!(matches!(rank3[10], Instruction::OverlappedForwardBackward { .. }));

    // Every rank ends with its deferred weight gradients (phase 8: h + 1 of them).
    for rank in 0..pp {
        let h = rank.min(pp - 1 - rank) as usize;
        let stream = compute_only(&schedule.ranks[rank as usize]);
        let tail = &stream[stream.len() - (h + 1)..];
        assert!(
            tail.iter().all(|i| matches!(i, Instruction::BackwardWeight { .. })),
            "rank {rank}: {tail:?}"
        );
    }
}

#[test]
fn dualpipe_v_folds_the_pipeline_on_half_the_ranks() {
    let schedule = compile(&spec(ScheduleKind::DualPipeV, 8, 16)).unwrap();
    let report = validate(&schedule).unwrap();
    assert_eq!(report.stages, vec![vec![0, 7], vec![1, 6], vec![2, 5], vec![3, 4]]);
    // The turn at the last rank hands stage 3's output to stage 4 without a transfer.
    let last = &schedule.ranks[3];
    assert!(!last.iter().any(|i| matches!(i, Instruction::SendActivation { chunk, .. } if chunk.stage == 3)));
    assert!(!last.iter().any(|i| matches!(i, Instruction::SendGrad { chunk, .. } if chunk.stage == 4)));
}

#[test]
fn schedules_round_trip_through_json() {
    let schedule = compile(&spec(ScheduleKind::DualPipe, 4, 8)).unwrap();
    let json = serde_json::to_string(&schedule).unwrap();
    assert!(json.contains(r#""op":"overlapped_forward_backward""#), "{}", &json[..200]);
    let back: Schedule = serde_json::from_str(&json).unwrap();
    assert_eq!(back, schedule);
}

#[test]
fn bad_specs_say_what_is_allowed() {
    let cases = [
        (spec(ScheduleKind::DualPipe, 3, 12), "even pp"),
        (spec(ScheduleKind::DualPipe, 8, 15), "even number of micro-batches ≥ 2·pp = 16"),
        (spec(ScheduleKind::DualPipe, 8, 14), "≥ 2·pp = 16"),
        (spec(ScheduleKind::DualPipeV, 8, 6), "micro-batches ≥ pp = 8"),
        (spec(ScheduleKind::DualPipeV, 5, 10), "even pp"),
        (spec(ScheduleKind::OneFOneB, 0, 4), "pp must be at least 1"),
        (spec(ScheduleKind::Zb1p, 4, 0), "micro-batches must be at least 1"),
    ];
    for (spec, expected) in cases {
        let err = compile(&spec).unwrap_err().to_string();
        assert!(err.contains(expected), "{spec:?}: {err}");
    }
    assert!(
        "dualpipe2"
            .parse::<ScheduleKind>()
            .unwrap_err()
            .to_string()
            .contains("1f1b, zb1p, dualpipe or dualpipev")
    );
    assert!(Costs::parse("1,2").unwrap_err().to_string().contains("four comma-separated costs"));
    assert!(Costs::parse("1,2,3,4").unwrap_err().to_string().contains("W = 3 exceeds B = 2"));
    assert!(Costs::parse("1,x,1,2").unwrap_err().to_string().contains("\"x\""));
}

// Hand-made streams. Two stages on two ranks, one micro-batch unless said otherwise.

fn c(micro_batch: u32, stage: u32) -> Chunk {
    Chunk::new(micro_batch, stage)
}

fn two_ranks(rank0: Vec<Instruction>, rank1: Vec<Instruction>) -> Schedule {
    Schedule { kind: ScheduleKind::OneFOneB, num_stages: 2, num_micro_batches: 1, ranks: vec![rank0, rank1] }
}

use Instruction::{
    Backward, BackwardInput, BackwardWeight, Forward, RecvActivation, RecvGrad, SendActivation, SendGrad,
};

fn good_rank0() -> Vec<Instruction> {
    vec![
        Forward { chunk: c(0, 0) },
        SendActivation { chunk: c(0, 0), peer: 1 },
        RecvGrad { chunk: c(0, 1), peer: 1 },
        Backward { chunk: c(0, 0) },
    ]
}

fn good_rank1() -> Vec<Instruction> {
    vec![
        RecvActivation { chunk: c(0, 0), peer: 0 },
        Forward { chunk: c(0, 1) },
        BackwardInput { chunk: c(0, 1) },
        SendGrad { chunk: c(0, 1), peer: 0 },
        BackwardWeight { chunk: c(0, 1) },
    ]
}

fn invalid(schedule: Schedule) -> (u32, usize, String) {
    match validate(&schedule) {
        Err(ScheduleError::Invalid { rank, index, reason, .. }) => (rank, index, reason),
        other => panic!("expected an invalid instruction, got {other:?}"),
    }
}

#[test]
fn a_hand_made_valid_stream_passes() {
    let report = validate(&two_ranks(good_rank0(), good_rank1())).unwrap();
    assert_eq!(report.peak_activations, vec![1, 1]);
    assert_eq!(report.transfers, 2);
}

#[test]
fn backward_before_forward_names_the_rank_and_instruction() {
    let mut rank1 = good_rank1();
    rank1.swap(1, 2);
    let (rank, index, reason) = invalid(two_ranks(good_rank0(), rank1));
    assert_eq!((rank, index), (1, 1));
    assert!(reason.contains("backward of (mb 0, stage 1) before its forward"), "{reason}");
}

#[test]
fn a_forward_without_its_input_is_rejected() {
    let mut rank1 = good_rank1();
    rank1.remove(0);
    let (rank, index, reason) = invalid(two_ranks(good_rank0(), rank1));
    assert_eq!((rank, index), (1, 0));
    assert!(reason.contains("needs the activation of (mb 0, stage 0) from rank 0"), "{reason}");
}

#[test]
fn a_send_to_the_wrong_peer_is_rejected() {
    let mut rank0 = good_rank0();
    rank0[1] = SendActivation { chunk: c(0, 0), peer: 0 };
    let (rank, index, reason) = invalid(two_ranks(rank0, good_rank1()));
    assert_eq!((rank, index), (0, 1));
    assert!(reason.contains("sends to itself"), "{reason}");
}

#[test]
fn sending_before_computing_is_rejected() {
    let mut rank1 = good_rank1();
    rank1.swap(2, 3);
    let (rank, index, reason) = invalid(two_ranks(good_rank0(), rank1));
    assert_eq!((rank, index), (1, 2));
    assert!(reason.contains("before its backward"), "{reason}");
}

#[test]
fn a_weight_gradient_before_its_backward_is_rejected() {
    let mut rank1 = good_rank1();
    rank1.swap(2, 4); // W, sendG, B
    let (rank, index, reason) = invalid(two_ranks(good_rank0(), rank1));
    assert_eq!((rank, index), (1, 2));
    assert!(reason.contains("W of (mb 0, stage 1) before its B"), "{reason}");
}

#[test]
fn a_second_weight_gradient_is_rejected() {
    let mut rank1 = good_rank1();
    rank1[2] = Backward { chunk: c(0, 1) };
    let (rank, index, reason) = invalid(two_ranks(good_rank0(), rank1));
    assert_eq!((rank, index), (1, 4));
    assert!(reason.contains("already has its weight gradient"), "{reason}");
}

#[test]
fn a_duplicated_forward_is_rejected() {
    let mut rank1 = good_rank1();
    rank1.insert(2, Forward { chunk: c(0, 0) });
    let (rank, index, reason) = invalid(two_ranks(good_rank0(), rank1));
    assert_eq!((rank, index), (1, 2));
    assert!(reason.contains("already has a forward on rank 0"), "{reason}");
}

#[test]
fn a_forward_outside_the_schedule_is_rejected() {
    let mut rank0 = good_rank0();
    rank0.push(Forward { chunk: c(3, 0) });
    let (rank, index, reason) = invalid(two_ranks(rank0, good_rank1()));
    assert_eq!((rank, index), (0, 4));
    assert!(reason.contains("1 micro-batches and 2 stages"), "{reason}");
}

#[test]
fn waiting_on_each_other_is_a_deadlock() {
    // Rank 0 waits for the gradient before sending the activation rank 1 waits for.
    let mut rank0 = good_rank0();
    rank0.swap(1, 2);
    let err = validate(&two_ranks(rank0, good_rank1())).unwrap_err();
    let ScheduleError::Deadlock { blocked } = &err else { panic!("{err}") };
    assert_eq!(blocked.len(), 2, "{err}");
    assert!(blocked[0].starts_with("rank 0 at instruction 1 (recvG"), "{err}");
    assert!(blocked[1].starts_with("rank 1 at instruction 0 (recvA"), "{err}");
}

#[test]
fn a_missing_weight_gradient_is_incomplete() {
    let mut rank1 = good_rank1();
    rank1.pop();
    let err = validate(&two_ranks(good_rank0(), rank1)).unwrap_err();
    assert!(matches!(err, ScheduleError::Incomplete(_)), "{err}");
    assert!(err.to_string().contains("the deferred W of (mb 0, stage 1) never runs"), "{err}");
}

#[test]
fn a_duplicate_send_is_rejected() {
    let mut rank1 = good_rank1();
    rank1.insert(4, SendGrad { chunk: c(0, 1), peer: 0 });
    let (rank, index, reason) = invalid(two_ranks(good_rank0(), rank1));
    assert_eq!((rank, index), (1, 4));
    assert!(reason.contains("already sent"), "{reason}");
}

#[test]
fn work_for_a_chunk_no_rank_runs_is_rejected() {
    let schedule = Schedule {
        kind: ScheduleKind::OneFOneB,
        num_stages: 2,
        num_micro_batches: 1,
        ranks: vec![
            vec![
                Forward { chunk: c(0, 0) },
                SendActivation { chunk: c(0, 0), peer: 1 },
                Backward { chunk: c(0, 0) },
            ],
            vec![],
        ],
    };
    let (rank, index, reason) = invalid(schedule);
    assert_eq!((rank, index), (0, 1));
    assert!(reason.contains("no rank runs the forward of (mb 0, stage 1)"), "{reason}");
}

/// Three stages on three ranks, one micro-batch, fused backward: the base for transfer
/// errors between non-neighbours.
fn three_ranks(rank0: Vec<Instruction>, rank1: Vec<Instruction>, rank2: Vec<Instruction>) -> Schedule {
    Schedule {
        kind: ScheduleKind::OneFOneB,
        num_stages: 3,
        num_micro_batches: 1,
        ranks: vec![rank0, rank1, rank2],
    }
}

fn chain() -> [Vec<Instruction>; 3] {
    [
        vec![
            Forward { chunk: c(0, 0) },
            SendActivation { chunk: c(0, 0), peer: 1 },
            RecvGrad { chunk: c(0, 1), peer: 1 },
            Backward { chunk: c(0, 0) },
        ],
        vec![
            RecvActivation { chunk: c(0, 0), peer: 0 },
            Forward { chunk: c(0, 1) },
            SendActivation { chunk: c(0, 1), peer: 2 },
            RecvGrad { chunk: c(0, 2), peer: 2 },
            Backward { chunk: c(0, 1) },
            SendGrad { chunk: c(0, 1), peer: 0 },
        ],
        vec![
            RecvActivation { chunk: c(0, 1), peer: 1 },
            Forward { chunk: c(0, 2) },
            Backward { chunk: c(0, 2) },
            SendGrad { chunk: c(0, 2), peer: 1 },
        ],
    ]
}

#[test]
fn transfers_to_or_from_the_wrong_rank_are_rejected() {
    let [r0, r1, r2] = chain();
    assert!(validate(&three_ranks(r0.clone(), r1.clone(), r2.clone())).is_ok());

    // Rank 0 sends stage 0's output to rank 2, which does not run stage 1.
    let mut bad0 = r0.clone();
    bad0[1] = SendActivation { chunk: c(0, 0), peer: 2 };
    let (rank, index, reason) = invalid(three_ranks(bad0, r1.clone(), r2.clone()));
    assert_eq!((rank, index), (0, 1));
    assert!(reason.contains("(mb 0, stage 1) runs on rank 1, not on rank 2"), "{reason}");

    // Rank 1 names the wrong sender.
    let mut bad1 = r1.clone();
    bad1[0] = RecvActivation { chunk: c(0, 0), peer: 2 };
    let (rank, index, reason) = invalid(three_ranks(r0.clone(), bad1, r2.clone()));
    assert_eq!((rank, index), (1, 0));
    assert!(reason.contains("(mb 0, stage 0) runs on rank 0, not on rank 2"), "{reason}");

    // Rank 2 tries to take stage 0's output, meant for stage 1 on rank 1.
    let mut bad2 = r2.clone();
    bad2.insert(0, RecvActivation { chunk: c(0, 0), peer: 0 });
    let (rank, index, reason) = invalid(three_ranks(r0.clone(), r1.clone(), bad2));
    assert_eq!((rank, index), (2, 0));
    assert!(reason.contains("(mb 0, stage 1), which consumes it, runs on rank 1"), "{reason}");

    // Receiving the same tensor twice.
    let mut twice = r1.clone();
    twice.insert(1, RecvActivation { chunk: c(0, 0), peer: 0 });
    let (rank, index, reason) = invalid(three_ranks(r0, twice, r2));
    assert_eq!((rank, index), (1, 1));
    assert!(reason.contains("already received"), "{reason}");
}

#[test]
fn overlapped_pairs_need_both_halves_ready_before_either_runs() {
    // Two micro-batches on one rank and one stage: F(0), then F(1) overlapped with BW(0).
    let one_rank = |stream: Vec<Instruction>| Schedule {
        kind: ScheduleKind::DualPipe,
        num_stages: 1,
        num_micro_batches: 2,
        ranks: vec![stream],
    };
    let pair = Instruction::OverlappedForwardBackward { forward: c(1, 0), backward: c(0, 0) };
    let report =
        validate(&one_rank(vec![Forward { chunk: c(0, 0) }, pair, Backward { chunk: c(1, 0) }])).unwrap();
    assert_eq!(report.peak_activations, vec![2]);

    // The backward half of a pair cannot consume its own forward half.
    let same = Instruction::OverlappedForwardBackward { forward: c(0, 0), backward: c(0, 0) };
    let (rank, index, reason) =
        invalid(one_rank(vec![same, Forward { chunk: c(1, 0) }, Backward { chunk: c(1, 0) }]));
    assert_eq!((rank, index), (0, 0));
    assert!(reason.contains("backward of (mb 0, stage 0) before its forward"), "{reason}");
}
