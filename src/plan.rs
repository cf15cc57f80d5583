//! `flotilla plan`: lays a model out over a cluster (pipeline stages, expert shards, data
//! parallelism) and prints its memory per GPU, all-to-all volumes and step estimate, or
//! proposes the fastest layout that fits. The work and its assumptions are in
//! `flotilla_coordinator::plan`; this parses flags and prints.

use crate::model_info;
use anyhow::Result;
use clap::{ArgGroup, Args};
use flotilla_coordinator::plan::{
    self, ClusterSpec, MemoryBreakdown, Plan, PlanError, Proposal, TrainingShape, Volume, format_bytes,
};
use flotilla_coordinator::schedule::ScheduleKind;
use std::fmt::Write;
use std::path::PathBuf;

#[derive(Args)]
#[command(group = ArgGroup::new("source").required(true))]
pub struct PlanArgs {
    /// A built-in model configuration: deepseek-v3-671b, tiny or small.
    #[arg(long, group = "source")]
    preset: Option<String>,
    /// A model configuration file: an HF `config.json` (.json) or flotilla TOML (.toml).
    #[arg(long, group = "source")]
    config: Option<PathBuf>,
    /// Nodes in the cluster.
    #[arg(long)]
    nodes: u32,
    /// GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: u32,
    /// Memory of one GPU: bytes, or with a unit: 80GiB, 80GB, 81920MiB (KB/MB/GB/TB are
    /// powers of 1000, KiB/MiB/GiB/TiB of 1024).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    gpu_memory: u64,
    /// Pipeline-parallel degree, counted in pipeline ranks (GPUs per pipeline), not stages:
    /// the model is cut into pp stages, or 2·pp under dualpipev, whose ranks host two each
    /// (unlike `flotilla schedule --pp`, which counts stages). With --ep, plans exactly
    /// that layout, otherwise the fastest that fits is proposed.
    #[arg(long, value_name = "RANKS")]
    pp: Option<u32>,
    /// Expert-parallel degree (GPUs sharing one copy of a layer's routed experts).
    #[arg(long)]
    ep: Option<u32>,
    /// Micro-batches per pipeline per step [default: from --global-batch].
    #[arg(long)]
    micro_batches: Option<u32>,
    /// Sequences per step over the cluster, when --micro-batches is not given.
    #[arg(long, default_value_t = plan::DEEPSEEK_V3_GLOBAL_BATCH)]
    global_batch: u32,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = TrainingShape::default().micro_batch_size)]
    micro_batch_size: u32,
    /// Tokens per sequence [default: 4096, or the model's max_position_embeddings if
    /// smaller].
    #[arg(long)]
    seq_len: Option<u32>,
    /// Pipeline schedule: dualpipe, dualpipev, 1f1b or zb1p.
    #[arg(long, default_value = "dualpipe", value_parser = parse_schedule)]
    schedule: ScheduleKind,
    /// NVLink bandwidth per GPU within a node, bytes/s (units as --gpu-memory, "/s" optional).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    intra_node_bandwidth: Option<f64>,
    /// InfiniBand bandwidth per GPU between nodes, bytes/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    inter_node_bandwidth: Option<f64>,
    /// FLOP/s one GPU sustains [default: half the H800's dense FP8 peak].
    #[arg(long)]
    gpu_flops: Option<f64>,
    /// In auto mode, how many of the best fitting layouts to list.
    #[arg(long, default_value_t = 5)]
    alternatives: usize,
    /// Print the plan (auto mode: the proposal) as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: PlanArgs) -> Result<()> {
    let (name, config) = model_info::resolve(args.preset.as_deref(), args.config.as_ref())?;
    let mut cluster = ClusterSpec::new(args.nodes, args.gpus_per_node, args.gpu_memory);
    if let Some(b) = args.intra_node_bandwidth {
        cluster.intra_node_bandwidth = b;
    }
    if let Some(b) = args.inter_node_bandwidth {
        cluster.inter_node_bandwidth = b;
    }
    if let Some(f) = args.gpu_flops {
        cluster.gpu_flops = f;
    }
    let shape = TrainingShape {
        global_batch: args.global_batch,
        micro_batches: args.micro_batches,
        micro_batch_size: args.micro_batch_size,
        seq_len: args.seq_len.unwrap_or_else(|| TrainingShape::default_seq_len(&config)),
        schedule: args.schedule,
    };
    match (args.pp, args.ep) {
        (Some(pp), Some(ep)) => {
            let plan = plan::plan(&config, &cluster, &shape, pp, ep)
                .map_err(|e| anyhow::anyhow!("pp = {pp}, ep = {ep}: {e}"))?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&plan)?);
            } else {
                print!("{}", format_plan(&name, &plan));
            }
        }
        (pp, ep) => {
            let proposal = plan::propose(&config, &cluster, &shape, pp, ep).map_err(|e| match e {
                PlanError::NoPipelineDegree { .. } => anyhow::anyhow!("{e} (try --schedule 1f1b)"),
                e => e.into(),
            })?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&proposal)?);
            } else {
                print!("{}", format_proposal(&name, &proposal, args.alternatives));
            }
        }
    }
    Ok(())
}

/// Parses a byte count: a number with an optional unit (B, KB…TB in powers of 1000,
/// KiB…TiB in powers of 1024), case-insensitive.
pub(crate) fn parse_bytes(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len();
    let (number, unit) = trimmed.split_at(split);
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => (1u64 << 10) as f64,
        "mib" => (1u64 << 20) as f64,
        "gib" => (1u64 << 30) as f64,
        "tib" => (1u64 << 40) as f64,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}: use B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
            ));
        }
    };
    let value: f64 =
        number.trim().parse().map_err(|_| format!("{:?} in {text:?} is not a number", number.trim()))?;
    let bytes = (value * scale).round();
    // 2^64 is the first value a u64 cannot hold, and is exact in f64.
    if !(1.0..18_446_744_073_709_551_616.0).contains(&bytes) {
        return Err(format!("{text:?} must be at least 1 byte and fit in 64 bits"));
    }
    Ok(bytes as u64)
}

/// Parses a bandwidth in bytes/s: as [`parse_bytes`], with an optional "/s".
fn parse_rate(text: &str) -> Result<f64, String> {
    let trimmed = text.trim();
    parse_bytes(trimmed.strip_suffix("/s").unwrap_or(trimmed)).map(|b| b as f64)
}

fn parse_schedule(text: &str) -> Result<ScheduleKind, String> {
    text.parse::<ScheduleKind>().map_err(|e| e.to_string())
}

fn size(bytes: u64) -> String {
    format_bytes(bytes as f64)
}

/// A count with a decimal suffix: 2.91B, 176.16M, 12.3K.
fn human(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2}B", n / 1e9),
        n if n >= 1e6 => format!("{:.2}M", n / 1e6),
        n if n >= 1e3 => format!("{:.1}K", n / 1e3),
        n => format!("{n:.0}"),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Seconds in s, ms or µs.
fn duration(seconds: f64) -> String {
    match seconds {
        t if t >= 1.0 => format!("{t:.3} s"),
        t if t >= 1e-3 => format!("{:.2} ms", t * 1e3),
        t => format!("{:.2} µs", t * 1e6),
    }
}

/// "0–3" or "60" (every stage has at least one layer).
fn layer_span(first: u32, count: u32) -> String {
    match count {
        0 | 1 => first.to_string(),
        n => format!("{first}–{}", first + n - 1),
    }
}

fn list(values: &[u32]) -> String {
    values.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
}

/// Ascending values with runs collapsed: "0, 2–5, 9".
fn runs(values: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < values.len() {
        let mut j = i;
        while j + 1 < values.len() && values[j + 1] == values[j] + 1 {
            j += 1;
        }
        parts.push(if j > i { format!("{}–{}", values[i], values[j]) } else { values[i].to_string() });
        i = j + 1;
    }
    parts.join(", ")
}

fn format_plan(name: &str, plan: &Plan) -> String {
    let mut out = String::new();
    write_layout(&mut out, name, plan);
    write_stages(&mut out, plan);
    write_experts(&mut out, plan);
    write_memory(&mut out, plan);
    write_all_to_all(&mut out, plan);
    write_step(&mut out, plan);
    out
}

/// The cluster, the layout and the batch.
fn write_layout(out: &mut String, name: &str, plan: &Plan) {
    let (c, l) = (&plan.cluster, &plan.layout);
    let _ = writeln!(
        out,
        "{name} on {} × {} ({} GPUs, {} each), {} schedule\n",
        plural(c.nodes as u64, "node", "nodes"),
        plural(c.gpus_per_node as u64, "GPU", "GPUs"),
        l.gpus,
        size(c.gpu_memory_bytes),
        l.schedule
    );
    let _ = writeln!(
        out,
        "layout: PP {} ({}) × DP {}; EP {} inside each pipeline rank's {} GPUs, so each expert has {} per rank (expert DP {})",
        plural(l.pp as u64, "rank", "ranks"),
        plural(l.stages as u64, "stage", "stages"),
        l.dp,
        l.ep,
        l.dp,
        plural(l.expert_dp, "copy", "copies"),
        l.expert_dp
    );
    let _ = writeln!(
        out,
        "batch: {} × {} × {} tokens per pipeline; {} ({} tokens) per step\n",
        plural(l.micro_batches as u64, "micro-batch", "micro-batches"),
        plural(l.micro_batch_size as u64, "sequence", "sequences"),
        l.seq_len,
        plural(l.global_batch, "sequence", "sequences"),
        human(l.tokens_per_step as f64)
    );
}

/// The stage table, and which ranks host more than their own stage.
fn write_stages(out: &mut String, plan: &Plan) {
    let _ = writeln!(out, "stages:");
    let _ = writeln!(
        out,
        "{:>5}  {:>7}  {:>5}  {:>3}  {:<17}  {:<10}  {:>10}  {:>10}  {:>12}  {:>14}",
        "stage",
        "layers",
        "dense",
        "MoE",
        "also",
        "ranks",
        "FLOP/token",
        "replicated",
        "experts/GPU",
        "act./micro-b."
    );
    for s in &plan.stages {
        let mut also = Vec::new();
        if s.embedding {
            also.push("embedding".to_string());
        }
        if s.head {
            also.push("head".to_string());
        }
        if s.mtp_modules > 0 {
            also.push(format!("MTP×{}", s.mtp_modules));
        }
        let _ = writeln!(
            out,
            "{:>5}  {:>7}  {:>5}  {:>3}  {:<17}  {:<10}  {:>10}  {:>10}  {:>12}  {:>14}",
            s.stage,
            layer_span(s.first_layer, s.layers),
            s.dense_layers,
            s.moe_layers,
            also.join(", "),
            list(&s.ranks),
            human(s.forward_flops_per_token),
            human(s.replicated_parameters as f64),
            human(s.expert_parameters_per_gpu as f64),
            size(s.activation_bytes)
        );
    }
    if plan.ranks.iter().any(|r| r.stages.len() > 1) {
        let first = &plan.ranks[0];
        let _ = writeln!(
            out,
            "rank 0 hosts stages {}: the embedding, the head and the MTP modules share its GPUs",
            runs(&first.stages)
        );
    }
    if let Some(r) = plan.ranks.iter().find(|r| r.embedding_copy) {
        let _ = writeln!(
            out,
            "rank {} holds a copy of the embedding for the last stage; it shares stage 0's ZeRO-1 group",
            r.rank
        );
    }
}

/// The routed experts' placement: EP groups over nodes, the groups a token reaches.
fn write_experts(out: &mut String, plan: &Plan) {
    let e = &plan.experts;
    if e.routed_experts > 0 {
        let _ = writeln!(
            out,
            "\nexperts: {} routed per MoE layer, {} per GPU; an EP group spans {} × {}; {} routing groups, {} per node",
            e.routed_experts,
            e.experts_per_gpu,
            plural(e.ep_nodes as u64, "node", "nodes"),
            plural(e.ep_gpus_per_node as u64, "GPU", "GPUs"),
            e.routing_groups,
            e.groups_per_node
        );
        let _ = writeln!(
            out,
            "a token uses {} groups, so reaches at most {}; under uniform routing {:.2} nodes and {:.2} GPUs; {} of each expert in the cluster",
            e.topk_group,
            plural(e.max_nodes_per_token as u64, "node", "nodes"),
            e.expected_nodes_per_token,
            e.expected_gpus_per_token,
            plural(e.expert_replicas, "copy", "copies")
        );
        for n in &e.nodes {
            let groups = if n.first_group == n.last_group {
                format!("group {}", n.first_group)
            } else {
                format!("groups {}–{}", n.first_group, n.last_group)
            };
            let _ = writeln!(
                out,
                "  node {} of the group: experts {}–{} ({groups})",
                n.node, n.first_expert, n.last_expert
            );
        }
    }
}

/// Memory per GPU on the fullest pipeline rank, then every rank's total.
fn write_memory(out: &mut String, plan: &Plan) {
    let fullest = &plan.ranks[plan.fullest_rank as usize];
    let _ = writeln!(
        out,
        "\nmemory per GPU on pipeline rank {}, the fullest (stages {}; at peak {} in flight):",
        plan.fullest_rank,
        runs(&fullest.stages),
        plural(fullest.peak_in_flight as u64, "micro-batch chunk", "micro-batch chunks")
    );
    *out += &format_memory(&plan.memory);
    *out += &format_rank_totals(plan);
}

/// The all-to-all's bytes per token and per GPU, over NVLink and InfiniBand.
fn write_all_to_all(out: &mut String, plan: &Plan) {
    let a = &plan.all_to_all;
    let _ = writeln!(
        out,
        "\nall-to-all per GPU and micro-batch ({} tokens), forward (backward moves the same):",
        a.tokens_per_micro_batch
    );
    let _ = writeln!(
        out,
        "per token: dispatch {} B (FP8 + scales + routing), combine {} B (BF16); expected {:.2} IB and {:.2} NVLink copies",
        a.dispatch_bytes_per_token,
        a.combine_bytes_per_token,
        a.inter_node_copies_per_token,
        a.intra_node_copies_per_token
    );
    let _ = writeln!(out, "{:<46} {:>14} {:>14}", "", "NVLink (intra)", "IB (inter)");
    let volume_rows = |out: &mut String, label: &str, v: &Volume| {
        let _ = writeln!(
            out,
            "{:<46} {:>14} {:>14}",
            format!("dispatch {label}"),
            format_bytes(v.dispatch_intra_node),
            format_bytes(v.dispatch_inter_node)
        );
        let _ = writeln!(
            out,
            "{:<46} {:>14} {:>14}",
            format!("combine {label}"),
            format_bytes(v.combine_intra_node),
            format_bytes(v.combine_inter_node)
        );
    };
    volume_rows(out, "per MoE layer", &a.per_moe_layer);
    volume_rows(
        out,
        &format!(
            "per chunk of stage {} ({})",
            plan.step.slowest_stage,
            plural(a.moe_blocks_per_chunk as u64, "MoE block", "MoE blocks")
        ),
        &a.per_chunk,
    );
    let _ = writeln!(out, "time per MoE layer: {}", duration(a.seconds_per_moe_layer));
}

/// The step estimate: the slowest stage's chunk, the pipeline, the ZeRO-1 sync.
fn write_step(out: &mut String, plan: &Plan) {
    let c = &plan.cluster;
    let t = &plan.step;
    let _ = writeln!(
        out,
        "\nstep estimate ({:.1} TFLOP/s per GPU; NVLink {:.0} GB/s, IB {:.0} GB/s):",
        c.gpu_flops / 1e12,
        c.intra_node_bandwidth / 1e9,
        c.inter_node_bandwidth / 1e9
    );
    let ratio = match t.compute_to_communication {
        Some(r) => format!("compute : communication = {r:.2} : 1"),
        None => "no all-to-all".into(),
    };
    let _ = writeln!(
        out,
        "a chunk of stage {} (the slowest): compute {}, all-to-all {} ({ratio})",
        t.slowest_stage,
        duration(t.chunk_compute_seconds),
        duration(t.chunk_all_to_all_seconds),
    );
    let _ = writeln!(
        out,
        "its costs: F {}, B {}, W {}, F&B {}; point-to-point {} (every stage is simulated at its own)",
        duration(t.costs.forward),
        duration(t.costs.backward),
        duration(t.costs.weight),
        duration(t.costs.overlapped),
        duration(t.costs.latency)
    );
    let _ = writeln!(
        out,
        "pipeline {} = on rank {}, the busiest: compute {} + exposed all-to-all {} + bubble {} (Table 2 formula at stage {}'s costs: {})",
        duration(t.pipeline_seconds),
        t.bottleneck_rank,
        duration(t.compute_seconds),
        duration(t.exposed_all_to_all_seconds),
        duration(t.bubble_seconds),
        t.slowest_stage,
        duration(t.formula_bubble_seconds)
    );
    if t.largest_idle_seconds > t.bubble_seconds {
        let _ = writeln!(
            out,
            "the least busy rank idles {} (bubble and load imbalance)",
            duration(t.largest_idle_seconds)
        );
    }
    let _ = writeln!(
        out,
        "+ ZeRO-1 data-parallel sync {} = step {}, {} tokens/s",
        duration(t.data_parallel_sync_seconds),
        duration(t.step_seconds),
        human(t.tokens_per_second)
    );
}

fn format_memory(m: &MemoryBreakdown) -> String {
    let mut out = String::new();
    let labels =
        ["parameters (BF16)", "FP8 weight cache", "gradients (FP32)", "optimizer (ZeRO-1)", "activations"];
    let percent = |bytes: u64| 100.0 * bytes as f64 / m.capacity as f64;
    let _ = writeln!(out, "{:<20} {:>12} {:>9}", "component", "size", "of GPU");
    for ((_, bytes), label) in m.components().into_iter().zip(labels) {
        let _ = writeln!(out, "{label:<20} {:>12} {:>8.1}%", size(bytes), percent(bytes));
    }
    let _ = writeln!(
        out,
        "{:<20} {:>12} {:>8.1}%  ({} free)",
        "total",
        size(m.total),
        percent(m.total),
        size(m.capacity.saturating_sub(m.total))
    );
    out
}

/// Ranks grouped by their memory total.
fn format_rank_totals(plan: &Plan) -> String {
    let mut groups: Vec<(u64, Vec<u32>)> = Vec::new();
    for r in &plan.ranks {
        match groups.iter_mut().find(|g| g.0 == r.memory.total) {
            Some(g) => g.1.push(r.rank),
            None => groups.push((r.memory.total, vec![r.rank])),
        }
    }
    let parts: Vec<String> =
        groups.iter().map(|(total, ranks)| format!("{}: {}", runs(ranks), size(*total))).collect();
    format!("per pipeline rank: {}\n", parts.join("; "))
}

fn format_proposal(name: &str, proposal: &Proposal, alternatives: usize) -> String {
    let chosen = &proposal.chosen.layout;
    let mut out = format!(
        "proposed: PP {} ({}), EP {} — the fastest of {} layouts that fit ({} refused)\n\n",
        plural(chosen.pp as u64, "rank", "ranks"),
        plural(chosen.stages as u64, "stage", "stages"),
        chosen.ep,
        proposal.candidates.len(),
        proposal.rejected.len()
    );
    out += &format_plan(name, &proposal.chosen);
    let _ = writeln!(out, "\nfastest layouts that fit:");
    let _ = writeln!(
        out,
        "{:>8} {:>6} {:>4} {:>6} {:>13} {:>10} {:>10} {:>10} {:>13}",
        "pp ranks", "stages", "ep", "dp", "micro-batches", "memory", "bubble", "step", "tokens/s"
    );
    for c in proposal.candidates.iter().take(alternatives) {
        let _ = writeln!(
            out,
            "{:>8} {:>6} {:>4} {:>6} {:>13} {:>10} {:>10} {:>10} {:>13}",
            c.pp,
            c.stages,
            c.ep,
            c.dp,
            c.micro_batches,
            size(c.memory_bytes),
            duration(c.bubble_seconds),
            duration(c.step_seconds),
            human(c.tokens_per_second)
        );
    }
    if !proposal.rejected.is_empty() {
        let _ =
            writeln!(out, "{} layouts refused (--json lists each with its reason)", proposal.rejected.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("80GiB"), Ok(80 << 30));
        assert_eq!(parse_bytes("80GB"), Ok(80_000_000_000));
        assert_eq!(parse_bytes("81920MiB"), Ok(80 << 30));
        assert_eq!(parse_bytes(" 1.5 kib "), Ok(1536));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_rate("50GB/s"), Ok(50e9));
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8]), "0–2, 5, 7–8");
        for bad in ["80XB", "GiB", "-1GiB", "0", "", "1e30TiB"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
