//! The cluster planner end to end: the report's layout (2048 GPUs, PP 16 DualPipe, EP 64,
//! ZeRO-1 DP) fits in 80 GiB with the structure the report describes; layouts that cannot
//! divide or cannot fit are refused naming the cause; auto mode finds a layout no slower
//! than the report's.

use flotilla_coordinator::plan::{ClusterSpec, Plan, PlanError, TrainingShape, plan, propose};
use flotilla_coordinator::schedule::ScheduleKind;
use flotilla_model::{ModelConfig, ParameterCounts, Preset};

const GIB: u64 = 1 << 30;

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

    // Memory: every component positive, the parts sum to the total, all ranks fit.
    let m = &p.memory;
    for (name, bytes) in m.components() {
        assert!(bytes > 0, "{name} is zero");
    }
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

    // Step = compute + exposed all-to-all + bubble + data-parallel sync.
    let t = &p.step;
    let parts = t.compute_seconds + t.exposed_all_to_all_seconds + t.bubble_seconds;
    assert!((parts - t.pipeline_seconds).abs() <= 1e-9 * t.pipeline_seconds, "{t:?}");
    assert!((t.pipeline_seconds + t.data_parallel_sync_seconds - t.step_seconds).abs() < 1e-12);
    assert!(t.bubble_seconds > 0.0 && t.bubble_seconds < 0.1 * t.pipeline_seconds, "{t:?}");
    assert!(t.exposed_all_to_all_seconds >= 0.0);
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
}

#[test]
fn auto_mode_finds_a_fitting_layout_no_slower_than_the_reports() {
    let config = deepseek();
    let cluster = paper_cluster(80);
    let shape = TrainingShape::default();
    let proposal = propose(&config, &cluster, &shape, None, None).unwrap();
    let chosen = &proposal.chosen;
    assert!(chosen.memory.fits());
    let paper = paper_plan();
    assert!(chosen.step.step_seconds <= paper.step.step_seconds, "{:?} vs {:?}", chosen.step, paper.step);
    // Every candidate runs the same global batch, fits, and they come fastest first.
    assert_eq!((proposal.candidates[0].pp, proposal.candidates[0].ep), (chosen.layout.pp, chosen.layout.ep));
    assert!(proposal.candidates.iter().any(|c| (c.pp, c.ep) == (16, 64)));
    assert!(proposal.candidates.iter().all(|c| c.global_batch == 15_360 && c.memory_bytes <= 80 * GIB));
    assert!(proposal.candidates.windows(2).all(|w| w[0].step_seconds <= w[1].step_seconds));
    // DualPipe needs an even pp, so odd ones are not even tried; refusals give reasons.
    assert!(proposal.candidates.iter().all(|c| c.pp % 2 == 0));
    let refused =
        |pp, ep| proposal.rejected.iter().find(|r| (r.pp, r.ep) == (pp, ep)).map(|r| r.reason.as_str());
    assert!(refused(16, 128).is_some_and(|r| r.contains("span nodes")));
    assert!(refused(16, 1).is_some_and(|r| r.contains("does not fit")));

    // Fixing one degree searches the other.
    let fixed = propose(&config, &cluster, &shape, Some(16), None).unwrap();
    assert!(fixed.candidates.iter().all(|c| c.pp == 16));
    assert!(fixed.chosen.step.step_seconds <= paper.step.step_seconds);
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
