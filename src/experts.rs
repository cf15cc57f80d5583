//! `flotilla experts plan`: redundant-expert placement for deployment from recorded expert
//! loads. The algorithm is `flotilla_coordinator::eplb`; this reads the loads, parses
//! flags and prints. `flotilla checkpoint export --eplb-replicas` writes the same placement
//! beside an exported model through [`placement_json`] and [`read_loads`].

use anyhow::{Context, Result, bail, ensure};
use clap::{Args, Subcommand};
use flotilla_coordinator::eplb::{self, Cluster, Placement};
use flotilla_model::train::StepRecord;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ExpertsCommand {
    /// Place redundant copies of heavily loaded experts on GPUs for serving, as DeepSeek's
    /// EPLB does: hierarchical (groups packed onto nodes, copies within nodes) when the node
    /// count divides the group count, global otherwise.
    Plan(PlanArgs),
}

#[derive(Args)]
pub struct PlanArgs {
    /// The loads: a JSON array of per-layer arrays of per-expert loads, or a run's
    /// metrics.jsonl (each MoE layer's tokens per expert summed over its steps).
    #[arg(long)]
    loads: PathBuf,
    /// With a metrics.jsonl: sum only its last N steps.
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// Print `phy2log`, `log2phy` and `logcnt` (EPLB's names) and the loads per GPU as JSON.
    #[arg(long)]
    json: bool,
}

/// The serving cluster an expert placement is for.
#[derive(Args)]
pub struct ClusterArgs {
    /// Physical experts per layer: the logical experts plus redundant copies, a multiple of
    /// the GPU count (EPLB's `num_replicas`).
    #[arg(long)]
    replicas: usize,
    /// Nodes.
    #[arg(long)]
    nodes: usize,
    /// GPUs per node.
    #[arg(long, default_value_t = 8)]
    gpus_per_node: usize,
    /// Expert groups of group-limited routing (the model's `n_group`); 1 places globally.
    #[arg(long, default_value_t = 1)]
    groups: usize,
}

impl ClusterArgs {
    fn cluster(&self) -> Cluster {
        Cluster {
            replicas: self.replicas,
            groups: self.groups,
            nodes: self.nodes,
            gpus_per_node: self.gpus_per_node,
        }
    }
}

pub fn run(command: ExpertsCommand) -> Result<()> {
    match command {
        ExpertsCommand::Plan(args) => plan(args),
    }
}

/// Loads read from a file: per layer, its name (HF layer index for a run's metrics) and
/// per-expert loads.
pub struct Recorded {
    layers: Vec<String>,
    loads: Vec<Vec<f64>>,
    /// Steps summed, for a metrics.jsonl.
    steps: Option<usize>,
}

/// Which step records of a metrics.jsonl are summed.
#[derive(Clone, Copy, Default)]
pub struct StepWindow {
    /// Only steps up to this one (an exported checkpoint's step: later loads are of a later
    /// model).
    pub until: Option<u64>,
    /// Of those, only the last N.
    pub last: Option<usize>,
}

fn plan(args: PlanArgs) -> Result<()> {
    let recorded = read_loads(&args.loads, StepWindow { until: None, last: args.last })?;
    let cluster = args.cluster.cluster();
    let placement =
        eplb::rebalance(&recorded.loads, cluster).with_context(|| format!("{}", args.loads.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&placement_json(&recorded, cluster, &placement))?);
    } else {
        print!("{}", format_placement(&recorded, cluster, &placement));
    }
    Ok(())
}

/// A placement as `experts plan --json` prints it and `checkpoint export` writes it:
/// EPLB's `phy2log`, `log2phy` and `logcnt`, with the layers they are for (HF layer
/// indices for a run's loads), the steps summed, the cluster and the balance per layer.
pub fn placement_json(recorded: &Recorded, cluster: Cluster, placement: &Placement) -> serde_json::Value {
    serde_json::json!({
        "policy": placement.policy,
        "layers": recorded.layers,
        "steps": recorded.steps,
        "cluster": cluster,
        "phy2log": placement.phy2log,
        "log2phy": placement.log2phy,
        "logcnt": placement.logcnt,
        "balance": placement.balance,
    })
}

/// The placement for `loads` on `cluster`, with the file named in its error.
pub fn place(recorded: &Recorded, cluster: Cluster, loads: &Path) -> Result<Placement> {
    eplb::rebalance(&recorded.loads, cluster).with_context(|| format!("{}", loads.display()))
}

/// Reads per-layer expert loads from a JSON array or a run's metrics.jsonl (`window` picks
/// its steps; it must be empty for a JSON array).
pub fn read_loads(path: &Path, window: StepWindow) -> Result<Recorded> {
    let StepWindow { until, last } = window;
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        ensure!(
            last.is_none() && until.is_none(),
            "picking steps applies to a run's metrics.jsonl, and {} is a JSON array",
            path.display()
        );
        let loads: Vec<Vec<f64>> = serde_json::from_str(&text).with_context(|| {
            format!("{}: expected a JSON array of per-layer arrays of loads", path.display())
        })?;
        let layers = (0..loads.len()).map(|l| l.to_string()).collect();
        return Ok(Recorded { layers, loads, steps: None });
    }
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let record: StepRecord = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a metrics.jsonl step record", path.display(), n + 1))?;
        if until.is_none_or(|until| record.step <= until) {
            records.push(record);
        }
    }
    let skip = match last {
        Some(0) => bail!("--last must be at least 1"),
        Some(n) => records.len().saturating_sub(n),
        None => 0,
    };
    let records = &records[skip..];
    // Per HF layer index, in layer order.
    let mut sums: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for record in records {
        for layer in &record.expert_loads {
            let sum = sums.entry(layer.layer).or_insert_with(|| vec![0.0; layer.tokens.len()]);
            ensure!(
                sum.len() == layer.tokens.len(),
                "{}: step {} has {} expert loads for layer {}, earlier steps {}",
                path.display(),
                record.step,
                layer.tokens.len(),
                layer.layer,
                sum.len()
            );
            for (s, &t) in sum.iter_mut().zip(&layer.tokens) {
                *s += t as f64;
            }
        }
    }
    let upto = until.map_or_else(String::new, |step| format!(" up to step {step}"));
    ensure!(
        !sums.is_empty(),
        "{}: no step records with expert loads{upto} (a model with no MoE layer?)",
        path.display()
    );
    Ok(Recorded {
        layers: sums.keys().map(|l| l.to_string()).collect(),
        loads: sums.into_values().collect(),
        steps: Some(records.len()),
    })
}

fn format_placement(recorded: &Recorded, cluster: Cluster, placement: &Placement) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let experts = recorded.loads[0].len();
    let from = match recorded.steps {
        Some(steps) => format!(" (loads summed over {steps} steps)"),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "{} layers × {experts} experts → {} physical experts on {} nodes × {} GPUs ({} per GPU), {} groups: {:?} policy{from}",
        recorded.loads.len(),
        cluster.replicas,
        cluster.nodes,
        cluster.gpus_per_node,
        cluster.replicas / cluster.gpus(),
        cluster.groups,
        placement.policy,
    );
    let per_gpu = cluster.replicas / cluster.gpus();
    for (i, layer) in recorded.layers.iter().enumerate() {
        let balance = &placement.balance[i];
        let before = balance.before_ratio.map_or_else(|| "n/a".to_string(), |r| format!("{r:.3}"));
        let _ = writeln!(
            out,
            "\nlayer {layer}: max/mean load per GPU {before} before → {:.3} after",
            balance.after_ratio
        );
        let copies: Vec<String> = placement.logcnt[i]
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 1)
            .map(|(e, c)| format!("{e}×{c}"))
            .collect();
        let _ =
            writeln!(out, "  copies: {}", if copies.is_empty() { "none".into() } else { copies.join(", ") });
        for (gpu, experts) in placement.phy2log[i].chunks(per_gpu).enumerate() {
            let list: Vec<String> = experts.iter().map(usize::to_string).collect();
            let _ = writeln!(
                out,
                "  node {} gpu {}: experts {} (load {:.0})",
                gpu / cluster.gpus_per_node,
                gpu % cluster.gpus_per_node,
                list.join(", "),
                balance.after[gpu]
            );
        }
    }
    out
}
