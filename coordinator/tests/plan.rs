//! The cluster planner end to end: the report's layout (2048 GPUs, PP 16 DualPipe, EP 64,
//! ZeRO-1 DP) fits in 80 GiB with the structure the report describes and memory figures
//! computed here by hand; every copy of a parameter is one ZeRO-1 group; every stage is
//! simulated at its own costs; layouts that cannot divide, cannot fit or overflow are
//! refused naming the cause; auto mode's pick fits and follows the cluster's bandwidths.

use flotilla_coordinator::plan::{ClusterSpec, Plan, PlanError, TrainingShape, format_bytes, plan, propose};
use flotilla_coordinator::schedule::ScheduleKind;
use flotilla_model::{ModelConfig, ParameterCounts, Preset};

const GIB: u64 = 1 << 30;

/// ZeRO-1's optimizer bytes on one GPU for `parameters` held by `copies` GPUs: FP32 master
/// weights and two BF16 moments, 8 bytes per parameter, sharded over all copies.
fn optimizer_shard(parameters: u64, copies: u64) -> u64 {
    (8 * parameters).div_ceil(copies)
}

/// Ring reduce-scatter of FP32 gradients and all-gather of BF16 weights over `copies` GPUs.
fn ring_seconds(parameters: u64, copies: u64, bandwidth: f64) -> f64 {
    6.0 * parameters as f64 * (copies - 1) as f64 / copies as f64 / bandwidth
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

fn deepseek() -> ModelConfig {
    Preset::DeepseekV3_671b.config()
}

/// The report's cluster: 256 nodes of 8 GPUs.
fn paper_cluster(memory_gib: u64) -> ClusterSpec {
    ClusterSpec::new(256, 8, memory_gib * GIB)
}

fn paper_plan() -> Plan {
    plan(&deepseek(), &paper_cluster(80), &TrainingShape::default(), 16, 64)
        .expect("the report's layout plans")
}

#[test]
fn the_reports_layout_fits_in_80_gib_with_the_reports_structure() {
    let p = paper_plan();
    let l = &p.layout;
    assert_eq!((l.gpus, l.pp, l.stages, l.ep), (2048, 16, 16, 64));
    // No TP: each pipeline rank has 2048 / 16 GPUs; EP groups of 64 are carved out of them.
    assert_eq!(l.dp, 128);
    assert_eq!(l.expert_dp, 2);
    assert_eq!((l.micro_batches, l.global_batch, l.tokens_per_step), (120, 15_360, 15_360 * 4096));

    let e = &p.experts;
    assert_eq!(e.experts_per_gpu, 4);
    assert_eq!((e.ep_nodes, e.ep_gpus_per_node), (8, 8));
    assert_eq!(e.groups_per_node, 1, "one routing group per node: group-limited = node-limited routing");
    assert_eq!(e.max_nodes_per_token, 4);
    assert!(e.expected_nodes_per_token > 3.0 && e.expected_nodes_per_token <= 4.0, "{e:?}");
    assert!(e.expected_gpus_per_token > 4.0 && e.expected_gpus_per_token <= 8.0, "{e:?}");
    // Two hosting ranks × expert DP 2.
    assert_eq!(e.expert_replicas, 4);
    assert_eq!(e.nodes.len(), 8);
    for (n, node) in e.nodes.iter().enumerate() {
        assert_eq!((node.first_expert, node.last_expert), (32 * n as u32, 32 * n as u32 + 31));
        assert_eq!((node.first_group, node.last_group), (n as u32, n as u32));
    }

    // DualPipe: rank r hosts stages r and 15 − r, PP + 1 chunks in flight.
    for r in &p.ranks {
        let mut expected = vec![r.rank, 15 - r.rank];
        expected.sort_unstable();
        assert_eq!(r.stages, expected);
        assert_eq!(r.peak_in_flight, 17, "rank {}", r.rank);
        assert!(!r.embedding_copy);
    }
    let (first, last) = (&p.stages[0], &p.stages[15]);
    assert!(first.embedding && !first.head && first.mtp_modules == 0);
    assert!(last.head && last.mtp_modules == 1 && !last.embedding);
    assert_eq!(first.ranks, vec![0, 15], "embedding, head and MTP share the first and last ranks");
    assert_eq!(last.ranks, vec![0, 15]);

    // The stages cover the 61 layers in order, the first 3 dense.
    let mut next = 0;
    for s in &p.stages {
        assert!(s.layers > 0);
        assert_eq!(s.first_layer, next);
        assert_eq!(s.dense_layers + s.moe_layers, s.layers);
        next += s.layers;
    }
    assert_eq!(next, 61);
    assert_eq!(p.stages.iter().map(|s| s.dense_layers).sum::<u32>(), 3);

    // Every parameter is placed: replicated ones whole per stage, experts split over EP.
    let placed: u64 =
        p.stages.iter().map(|s| s.replicated_parameters + s.expert_parameters_per_gpu * l.ep as u64).sum();
    assert_eq!(placed, ParameterCounts::of(&deepseek()).total_with_mtp());

    // Memory: the parts sum to the total, all ranks fit.
    let m = &p.memory;
    assert_eq!(m.components().iter().map(|c| c.1).sum::<u64>(), m.total);
    assert_eq!(m.capacity, 80 * GIB);
    assert!(m.fits(), "{m:?}");
    assert!(p.ranks.iter().all(|r| r.memory.fits() && r.memory.total <= m.total));
    assert_eq!(p.ranks[p.fullest_rank as usize].memory, *m);
    // Parameters ×2: each GPU holds both of its stages.
    let rank = &p.ranks[p.fullest_rank as usize];
    let held: u64 = rank
        .stages
        .iter()
        .map(|&s| p.stages[s as usize].replicated_parameters + p.stages[s as usize].expert_parameters_per_gpu)
        .sum();
    assert_eq!(rank.memory.parameters, 2 * held);
    assert_eq!(rank.memory.gradients, 4 * held);

    // Optimizer states by hand: each stage lives on 2 ranks, so its non-expert parameters
    // have 2·dp = 256 copies and its experts 2·expert_dp = 4; the embedding (stage 0) is a
    // set of its own with the same 256 copies.
    let embedding = ParameterCounts::of(&deepseek()).main.embedding;
    for r in &p.ranks {
        let expected: u64 = r
            .stages
            .iter()
            .map(|&s| {
                let stage = &p.stages[s as usize];
                let own = stage.replicated_parameters - if s == 0 { embedding } else { 0 };
                optimizer_shard(own, 256) + optimizer_shard(stage.expert_parameters_per_gpu, 4)
            })
            .sum::<u64>()
            + if r.stages.contains(&0) { optimizer_shard(embedding, 256) } else { 0 };
        assert_eq!(r.memory.optimizer_states, expected, "rank {}", r.rank);
    }
    // Activations by hand: PP + 1 = 17 chunks at the peak. Ranks 1–14 host two stages of 4
    // MoE layers each, alike; rank 0 and 15 mix stage 0's and stage 15's chunks.
    for r in &p.ranks[1..15] {
        let (a, b) = (&p.stages[r.stages[0] as usize], &p.stages[r.stages[1] as usize]);
        assert_eq!(a.activation_bytes, b.activation_bytes);
        assert_eq!(r.memory.activations, 17 * a.activation_bytes, "rank {}", r.rank);
    }
    let (low, high) = (p.stages[0].activation_bytes, p.stages[15].activation_bytes);
    let (low, high) = (low.min(high), low.max(high));
    assert!((17 * low..=17 * high).contains(&p.ranks[0].memory.activations), "{:?}", p.ranks[0]);
    // The fullest rank is one of 1–14 (four MoE layers per stage), at 62.28 GiB.
    assert_eq!(p.fullest_rank, 1);
    assert_eq!(format_bytes(m.total as f64), "62.28 GiB");

    // The report's ≈ 1:1 computation-to-communication ratio at the default sustained FLOP/s.
    let ratio = p.step.compute_to_communication.expect("MoE layers communicate");
    assert!((0.5..2.0).contains(&ratio), "compute : communication = {ratio}");
    // Both directions of the all-to-all, within and across nodes, carry traffic.
    let v = &p.all_to_all.per_moe_layer;
    for bytes in [v.dispatch_intra_node, v.dispatch_inter_node, v.combine_intra_node, v.combine_inter_node] {
        assert!(bytes > 0.0, "{v:?}");
    }
    // FP8 dispatch carries about half the bytes of the BF16 combine.
    let ratio = v.dispatch_inter_node / v.combine_inter_node;
    assert!((0.5..0.55).contains(&ratio), "dispatch / combine = {ratio}");

    // Step = compute + exposed all-to-all + bubble + data-parallel sync, on the busiest rank.
    let t = &p.step;
    let parts = t.compute_seconds + t.exposed_all_to_all_seconds + t.bubble_seconds;
    assert!((parts - t.pipeline_seconds).abs() <= 1e-9 * t.pipeline_seconds, "{t:?}");
    assert!((t.pipeline_seconds + t.data_parallel_sync_seconds - t.step_seconds).abs() < 1e-12);
    assert!(t.bubble_seconds > 0.0 && t.bubble_seconds < 0.1 * t.pipeline_seconds, "{t:?}");
    assert!(t.exposed_all_to_all_seconds >= 0.0);
    assert!(p.ranks.iter().all(|r| r.busy_seconds <= p.ranks[t.bottleneck_rank as usize].busy_seconds));
    // Rank r runs stage r for half the micro-batches and stage 15 − r for the other half,
    // each chunk computing F + B = 3× its forward: 60 × 3 × (f_r + f_{15−r}).
    let rank = &p.ranks[t.bottleneck_rank as usize];
    let forward: f64 = rank.stages.iter().map(|&s| p.stages[s as usize].forward_compute_seconds).sum();
    assert!(close(t.compute_seconds, 60.0 * 3.0 * forward), "{} vs {}", t.compute_seconds, 180.0 * forward);
    // A chunk's forward computes its FLOPs at the sustained rate.
    for s in &p.stages {
        let by_hand = s.forward_flops_per_token * 4096.0 / p.cluster.gpu_flops;
        assert!(close(s.forward_compute_seconds, by_hand), "stage {}", s.stage);
    }
}

#[test]
fn every_stage_is_simulated_at_its_own_costs() {
    let config = deepseek();
    let roomy = paper_cluster(1024);
    // 1F1B and ZB1P: each rank runs one stage, every chunk's F and B (ZB1P: F, B − W and W),
    // so a rank is busy 120 × (3·f + 2·a) of its own stage.
    for schedule in [ScheduleKind::OneFOneB, ScheduleKind::Zb1p] {
        let shape = TrainingShape { schedule, ..TrainingShape::default() };
        let p = plan(&config, &roomy, &shape, 16, 64).unwrap();
        for r in &p.ranks {
            let s = &p.stages[r.stages[0] as usize];
            let by_hand = 120.0 * (3.0 * s.forward_compute_seconds + 2.0 * s.forward_all_to_all_seconds);
            assert!(
                close(r.busy_seconds, by_hand),
                "{schedule} rank {}: {} vs {by_hand}",
                r.rank,
                r.busy_seconds
            );
        }
        // Stages differ, so the ranks do too: stage 0 has one MoE block, stages 1–14 four.
        assert!(p.ranks[0].busy_seconds < p.ranks[1].busy_seconds);
    }

    // DualPipe at PP 32: the head and MTP stage (31) is far heavier than the others (2
    // layers), and ranks 0 and 31 host it; they are the bottleneck, and the others wait.
    let p = plan(&config, &roomy, &TrainingShape::default(), 32, 64).unwrap();
    assert_eq!(p.step.bottleneck_rank, 0);
    assert_eq!(p.step.slowest_stage, 31);
    assert_eq!(p.ranks[31].stages, vec![0, 31]);
    let heaviest_elsewhere = p.ranks[1..31].iter().map(|r| r.busy_seconds).fold(0.0, f64::max);
    assert!(p.ranks[0].busy_seconds > 1.3 * heaviest_elsewhere, "{:?}", p.ranks);
    assert!(p.step.largest_idle_seconds > p.step.bubble_seconds);
    // At PP 16 rank 0 (stages 0 and 15: the embedding, head and MTP) computes the most.
    let paper = paper_plan();
    assert_eq!(paper.step.bottleneck_rank, 0);
    assert!(paper.ranks[0].busy_seconds > paper.ranks[1].busy_seconds);
}

#[test]
fn every_copy_of_the_embedding_is_one_zero1_group() {
    let config = deepseek();
    let cluster = paper_cluster(1024);
    let shape = TrainingShape { schedule: ScheduleKind::OneFOneB, ..TrainingShape::default() };
    let p = plan(&config, &cluster, &shape, 16, 64).unwrap();
    let embedding = ParameterCounts::of(&config).main.embedding;
    let (first, last) = (&p.stages[0], &p.stages[15]);
    let (rank0, rank15) = (&p.ranks[0], &p.ranks[15]);
    assert!(rank15.embedding_copy && !rank0.embedding_copy);
    // dp = 128 copies of a stage's parameters, expert_dp = 2 of its experts, and 2·128 of
    // the embedding: rank 0's and rank 15's GPUs share one ZeRO-1 shard set.
    let by_hand_0 = optimizer_shard(first.replicated_parameters - embedding, 128)
        + optimizer_shard(first.expert_parameters_per_gpu, 2)
        + optimizer_shard(embedding, 256);
    let by_hand_15 = optimizer_shard(last.replicated_parameters, 128)
        + optimizer_shard(last.expert_parameters_per_gpu, 2)
        + optimizer_shard(embedding, 256);
    assert_eq!(rank0.memory.optimizer_states, by_hand_0);
    assert_eq!(rank15.memory.optimizer_states, by_hand_15);
    // The copy is held whole in BF16 with its FP32 gradient.
    let held_15 = last.replicated_parameters + last.expert_parameters_per_gpu + embedding;
    assert_eq!(rank15.memory.parameters, 2 * held_15);
    assert_eq!(rank15.memory.gradients, 4 * held_15);
    // The sync sums the embedding's gradient over both ranks' 256 GPUs. A rank's 128 GPUs
    // span 16 nodes and an expert's two copies (GPUs 0 and 64 of the rank) two, so every
    // ring crosses IB.
    let ib = cluster.inter_node_bandwidth;
    let sync_15 = ring_seconds(last.replicated_parameters, 128, ib)
        + ring_seconds(last.expert_parameters_per_gpu, 2, ib)
        + ring_seconds(embedding, 256, ib);
    assert!(
        close(rank15.data_parallel_sync_seconds, sync_15),
        "{} vs {sync_15}",
        rank15.data_parallel_sync_seconds
    );

    // A tied head reads the embedding too: without MTP, 1F1B's last rank still holds a copy.
    let mut tied = Preset::Tiny.config();
    tied.tie_word_embeddings = true;
    tied.num_nextn_predict_layers = 0;
    let small = ClusterSpec::new(1, 8, GIB);
    let shape = TrainingShape { schedule: ScheduleKind::OneFOneB, global_batch: 64, seq_len: 256, ..shape };
    let p = plan(&tied, &small, &shape, 2, 1).unwrap();
    let embedding = ParameterCounts::of(&tied).main.embedding;
    assert!(p.ranks[1].embedding_copy);
    let last = &p.stages[1];
    // 4 GPUs per rank, 8 copies of the embedding in all; no experts are split (EP 1), so
    // each of a rank's GPUs holds the stage's experts whole, 4 copies.
    let by_hand = optimizer_shard(last.replicated_parameters, 4)
        + optimizer_shard(last.expert_parameters_per_gpu, 4)
        + optimizer_shard(embedding, 8);
    assert_eq!(p.ranks[1].memory.optimizer_states, by_hand);
    // Under DualPipe the stage-0 and last-stage ranks coincide: no copy.
    let dual = TrainingShape { schedule: ScheduleKind::DualPipe, ..shape };
    assert!(plan(&tied, &small, &dual, 2, 1).unwrap().ranks.iter().all(|r| !r.embedding_copy));
}

#[test]
fn step_totals_past_64_bits_are_refused_naming_the_quantity() {
    let config = Preset::Tiny.config();
    let huge = ClusterSpec::new(1 << 31, 1 << 31, 1 << 40);
    // dp = 2^62 / 2 = 2^61 GPUs per rank × 8 micro-batches = 2^64 sequences.
    let shape = TrainingShape { seq_len: 256, micro_batches: Some(8), ..TrainingShape::default() };
    let error = plan(&config, &huge, &shape, 2, 1).unwrap_err();
    assert!(matches!(&error, PlanError::Shape(m) if m.contains("sequences per step")), "{error}");
    // 2^63 sequences fit, but not 2^63 × 256 tokens.
    let shape = TrainingShape { micro_batches: Some(4), ..shape };
    let error = plan(&config, &huge, &shape, 2, 1).unwrap_err();
    assert!(matches!(&error, PlanError::Shape(m) if m.contains("tokens per step")), "{error}");
    // One token per sequence fits: the totals are exact.
    let shape = TrainingShape { seq_len: 1, ..shape };
    let p = plan(&config, &huge, &shape, 2, 1).unwrap();
    assert_eq!((p.layout.global_batch, p.layout.tokens_per_step), (1 << 63, 1 << 63));
    assert!(p.step.tokens_per_second > 1e18, "{:?}", p.step);
}

#[test]
fn dualpipe_holds_two_stages_per_rank_and_1f1b_one() {
    let config = deepseek();
    let roomy = paper_cluster(1024);
    let shape = |schedule| TrainingShape { schedule, ..TrainingShape::default() };
    let dual = plan(&config, &roomy, &shape(ScheduleKind::DualPipe), 16, 64).unwrap();
    let one = plan(&config, &roomy, &shape(ScheduleKind::OneFOneB), 16, 64).unwrap();
    let params = |p: &Plan, rank: usize| p.ranks[rank].memory.parameters;
    // Rank 1 holds stages 1 and 14 under DualPipe, stage 1 alone under 1F1B.
    assert_eq!(one.ranks[1].stages, vec![1]);
    let stage =
        |p: &Plan, s: usize| 2 * (p.stages[s].replicated_parameters + p.stages[s].expert_parameters_per_gpu);
    assert_eq!(params(&one, 1), stage(&one, 1));
    assert_eq!(params(&dual, 1), stage(&dual, 1) + stage(&dual, 14));
    // 1F1B's last rank does not host stage 0, so it keeps an embedding for the MTP module.
    assert!(one.ranks[15].embedding_copy);
    assert!(!one.ranks[0].embedding_copy);
    // 1F1B keeps up to PP chunks in flight, DualPipe PP + 1.
    assert_eq!(one.ranks[0].peak_in_flight, 16);
    assert_eq!(dual.ranks[0].peak_in_flight, 17);

    // DualPipeV: pp ranks run 2·pp stages, two per rank, one copy of each.
    let v = plan(&config, &roomy, &shape(ScheduleKind::DualPipeV), 8, 64).unwrap();
    assert_eq!((v.layout.pp, v.layout.stages, v.layout.dp), (8, 16, 256));
    assert_eq!(v.ranks[0].stages, vec![0, 15]);
    assert!(v.stages.iter().all(|s| s.ranks.len() == 1));
}

#[test]
fn layouts_that_cannot_divide_are_refused_naming_the_cause() {
    let config = deepseek();
    let shape = TrainingShape::default();
    let cases: Vec<(ClusterSpec, TrainingShape, u32, u32, &str)> = vec![
        (paper_cluster(80), shape, 16, 48, "ep = 48 does not divide the 256 routed experts"),
        (paper_cluster(80), shape, 5, 64, "5 × 64 = 320 does not divide the 2048 GPUs"),
        (paper_cluster(80), shape, 16, 128, "a routing group has 32: groups would span nodes"),
        (paper_cluster(80), shape, 64, 32, "only 61 layers"),
        (paper_cluster(80), shape, 0, 64, "pp must be at least 1"),
        (
            ClusterSpec::new(32, 12, 80 * GIB),
            shape,
            16,
            8,
            "neither fills whole nodes of 12 GPUs nor fits inside one",
        ),
        (ClusterSpec::new(24, 8, 80 * GIB), shape, 3, 64, "DualPipe needs an even pp"),
        (
            paper_cluster(80),
            TrainingShape { micro_batches: Some(16), ..shape },
            16,
            64,
            "micro-batches ≥ 2·pp = 32",
        ),
        (
            paper_cluster(80),
            TrainingShape { global_batch: 1000, ..shape },
            16,
            64,
            "1000 sequences is not a multiple of dp × micro-batch size = 128 × 1",
        ),
        (
            paper_cluster(80),
            TrainingShape { seq_len: 200_000, ..shape },
            16,
            64,
            "exceeds the model's max_position_embeddings",
        ),
        (ClusterSpec::new(0, 8, 80 * GIB), shape, 16, 64, "at least one node"),
    ];
    for (cluster, shape, pp, ep, needle) in cases {
        let error = plan(&config, &cluster, &shape, pp, ep).expect_err(needle).to_string();
        assert!(error.contains(needle), "pp {pp}, ep {ep}: {error:?} lacks {needle:?}");
    }
    assert!(matches!(
        plan(&config, &paper_cluster(80), &shape, 16, 128),
        Err(PlanError::GroupSpansNodes { max_ep: 64, .. })
    ));
}

#[test]
fn a_layout_that_does_not_fit_says_by_how_much_and_what_is_largest() {
    let error = plan(&deepseek(), &paper_cluster(16), &TrainingShape::default(), 16, 64).unwrap_err();
    let PlanError::OutOfMemory { needed, capacity, component, component_bytes, .. } = error else {
        panic!("expected OutOfMemory, got {error}");
    };
    assert_eq!(capacity, 16 * GIB);
    assert_eq!(needed, paper_plan().memory.total);
    assert_eq!(component, "activations");
    assert_eq!(component_bytes, paper_plan().memory.activations);
    let message = error.to_string();
    for needle in ["does not fit", "16.00 GiB", "too much", "activations"] {
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
    }

    // Small memories print in small units, not as 0.00 GiB.
    let shape = TrainingShape { global_batch: 64, seq_len: 256, ..TrainingShape::default() };
    let error = plan(&Preset::Tiny.config(), &ClusterSpec::new(1, 8, 1024), &shape, 2, 1).unwrap_err();
    let message = error.to_string();
    assert!(message.contains("a GPU has 1.0 KiB") && message.contains(" MiB per GPU"), "{message}");
    assert!(!message.contains("0.00 GiB"), "{message}");
    assert_eq!(format_bytes(512.0), "512 B");
    assert_eq!(format_bytes(1536.0), "1.5 KiB");
}

#[test]
fn auto_mode_picks_a_fitting_layout_and_lists_the_reports_among_the_candidates() {
    let config = deepseek();
    let cluster = paper_cluster(80);
    let shape = TrainingShape::default();
    let proposal = propose(&config, &cluster, &shape, None, None).unwrap();
    let chosen = &proposal.chosen;
    assert!(chosen.memory.fits() && chosen.ranks.iter().all(|r| r.memory.fits()));
    // The report's layout is a candidate, with the figures plan() gives it, and no faster
    // than the pick.
    let paper = paper_plan();
    let listed = proposal.candidates.iter().find(|c| (c.pp, c.ep) == (16, 64)).expect("PP 16, EP 64 fits");
    assert_eq!(listed.step_seconds, paper.step.step_seconds);
    assert_eq!(listed.memory_bytes, paper.memory.total);
    assert!(listed.step_seconds >= chosen.step.step_seconds);
    // The pick heads the list, which runs fastest first, every entry fitting with the same
    // global batch.
    assert_eq!((proposal.candidates[0].pp, proposal.candidates[0].ep), (chosen.layout.pp, chosen.layout.ep));
    assert!(proposal.candidates.iter().all(|c| c.global_batch == 15_360 && c.memory_bytes <= 80 * GIB));
    assert!(proposal.candidates.windows(2).all(|w| w[0].tokens_per_second >= w[1].tokens_per_second));
    // DualPipe needs an even pp, so odd ones are not even tried; refusals give reasons.
    assert!(proposal.candidates.iter().all(|c| c.pp % 2 == 0));
    let refused =
        |pp, ep| proposal.rejected.iter().find(|r| (r.pp, r.ep) == (pp, ep)).map(|r| r.reason.as_str());
    assert!(refused(16, 128).is_some_and(|r| r.contains("span nodes")));
    assert!(refused(16, 1).is_some_and(|r| r.contains("does not fit")));

    // Fixing one degree searches the other.
    let fixed = propose(&config, &cluster, &shape, Some(16), None).unwrap();
    assert!(fixed.candidates.iter().all(|c| c.pp == 16));
    assert!(fixed.candidates.len() >= 2);
}

#[test]
fn auto_mode_keeps_expert_parallelism_inside_a_node_when_ib_is_slow() {
    // With room for any layout and IB at a tenth of the report's, an all-to-all across
    // nodes costs far more than within one: the pick keeps each EP group in one node, and
    // the report's EP 64 over 8 nodes is much slower.
    let config = deepseek();
    let mut cluster = paper_cluster(1024);
    cluster.inter_node_bandwidth = 5e9;
    let proposal = propose(&config, &cluster, &TrainingShape::default(), None, None).unwrap();
    let chosen = &proposal.chosen;
    assert_eq!(chosen.experts.ep_nodes, 1, "EP {}", chosen.layout.ep);
    assert_eq!(chosen.all_to_all.per_moe_layer.dispatch_inter_node, 0.0);
    let spread = plan(&config, &cluster, &TrainingShape::default(), 16, 64).unwrap();
    assert!(spread.step.step_seconds > 1.2 * chosen.step.step_seconds, "{:?}", spread.step);
}

#[test]
fn auto_mode_refuses_zero_degrees_and_impossible_pipelines_up_front() {
    let config = Preset::Tiny.config();
    let cluster = ClusterSpec::new(1, 8, GIB);
    let shape = TrainingShape { global_batch: 64, seq_len: 256, ..TrainingShape::default() };
    assert_eq!(
        propose(&config, &cluster, &shape, Some(0), None).unwrap_err(),
        PlanError::ZeroDegree { name: "pp" }
    );
    assert_eq!(
        propose(&config, &cluster, &shape, None, Some(0)).unwrap_err(),
        PlanError::ZeroDegree { name: "ep" }
    );
    // One GPU cannot make an even pp for DualPipe; the other schedules plan it.
    let one = ClusterSpec::new(1, 1, GIB);
    let error = propose(&config, &one, &shape, None, None).unwrap_err();
    assert!(matches!(error, PlanError::NoPipelineDegree { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("even pp ≥ 2") && message.contains("1f1b"), "{message}");
    let one_f_one_b = TrainingShape { schedule: ScheduleKind::OneFOneB, ..shape };
    assert_eq!(propose(&config, &one, &one_f_one_b, None, None).unwrap().chosen.layout.pp, 1);
    // DualPipeV runs its two stages on one rank.
    let v = TrainingShape { schedule: ScheduleKind::DualPipeV, ..shape };
    let p = propose(&config, &one, &v, None, None).unwrap().chosen;
    assert_eq!((p.layout.pp, p.layout.stages), (1, 2));
}

#[test]
fn shape_errors_name_their_own_value() {
    let config = Preset::Tiny.config();
    let cluster = ClusterSpec::new(1, 8, GIB);
    // The default sequence length (4096) exceeds tiny's 512 positions, but a zero
    // micro-batch size is reported first, as itself.
    let zero = TrainingShape { micro_batch_size: 0, ..TrainingShape::default() };
    let error = plan(&config, &cluster, &zero, 2, 1).unwrap_err().to_string();
    assert!(error.contains("micro-batch size must be at least 1"), "{error}");
    assert_eq!(TrainingShape::default_seq_len(&config), 512);
    assert_eq!(TrainingShape::default_seq_len(&deepseek()), 4096);
}

#[test]
fn auto_mode_with_too_little_memory_names_the_closest_miss() {
    let error = propose(&deepseek(), &paper_cluster(16), &TrainingShape::default(), None, None).unwrap_err();
    assert!(matches!(error, PlanError::NoLayoutFits { gpus: 2048, .. }), "{error}");
    let message = error.to_string();
    assert!(
        message.contains("no layout of the 2048 GPUs fits") && message.contains("does not fit"),
        "{message}"
    );
}

#[test]
fn a_small_model_plans_on_one_node() {
    let config = Preset::Tiny.config();
    let cluster = ClusterSpec::new(1, 8, GIB);
    let shape = TrainingShape { global_batch: 64, seq_len: 512, ..TrainingShape::default() };
    let proposal = propose(&config, &cluster, &shape, None, None).unwrap();
    let p = &proposal.chosen;
    assert!(p.memory.fits());
    // Within one node nothing crosses IB.
    assert_eq!(p.all_to_all.per_moe_layer.dispatch_inter_node, 0.0);
    assert_eq!(p.experts.ep_nodes, 1);
    let json = serde_json::to_value(p).unwrap();
    assert_eq!(json["layout"]["schedule"], "dualpipe");
    assert!(json["memory"]["total"].as_u64().unwrap() > 0);
}
