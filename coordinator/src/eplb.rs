//! Redundant experts for deployment, the way DeepSeek's expert-parallel load balancer
//! (EPLB) places them: given each MoE layer's recorded expert loads, how many copies of each
//! expert to serve and on which GPU each copy goes, so that the GPUs' loads even out.
//!
//! A layer's `L` logical experts become `R ≥ L` physical ones (`R` a multiple of the GPU
//! count), `R / gpus` per GPU. Two policies, chosen as EPLB chooses them:
//! - **Hierarchical**, when the node count divides the expert-group count (group-limited
//!   routing then keeps a token's experts on few nodes): pack whole expert groups onto the
//!   nodes so that node loads balance, then within each node give the heaviest experts
//!   more copies (`R / nodes` per node), then pack the copies onto the node's GPUs.
//! - **Global** otherwise: the same steps with one group and one node, so copies are made
//!   and packed over all GPUs regardless of groups.
//!
//! The steps, each greedy:
//! - *Packing* `n` weighted items into `m` packs of exactly `n / m` items: items in order of
//!   decreasing weight, each into the lightest pack that still has room.
//! - *Replication*: each extra copy goes to the expert whose load per copy is largest.
//!
//! A copy's load is its expert's load divided by the expert's copy count.
//!
//! ## Invariants
//! - Deterministic, and equal to DeepSeek's `eplb.rebalance_experts` for the same inputs:
//!   loads are taken as `f32` and summed in `f32` as it does, ties between equal weights go
//!   to the lower index (a stable descending sort; the first of equal packs; the first of
//!   equal experts), and the outputs are its `phy2log`, `log2phy` (padded with −1) and
//!   `logcnt`. The unit tests check its README's example.
//! - Every logical expert has at least one copy; the copy counts of a layer sum to `R`;
//!   every GPU holds `R / gpus` copies; under the hierarchical policy every copy of an
//!   expert is on the node its group went to.
//! - Inputs are checked, never asserted: a bad count is an [`EplbError`] naming it.

use serde::Serialize;
use thiserror::Error;

/// What the cluster and the model's routing look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// Physical experts per layer (logical ones plus redundant copies).
    pub replicas: usize,
    /// Expert groups of group-limited routing (`n_group`; 1 for none).
    pub groups: usize,
    /// Nodes.
    pub nodes: usize,
    /// GPUs per node.
    pub gpus_per_node: usize,
}

impl Cluster {
    /// GPUs in all.
    pub fn gpus(&self) -> usize {
        self.nodes * self.gpus_per_node
    }
}

/// Which of EPLB's two policies placed the experts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Groups packed onto nodes, copies made and packed within each node.
    Hierarchical,
    /// Copies made and packed over all GPUs, regardless of groups.
    Global,
}

/// Why a placement cannot be computed.
#[derive(Debug, Error, PartialEq)]
pub enum EplbError {
    /// No layer, or a layer without experts.
    #[error("no expert loads: {0}")]
    NoLoads(String),
    /// Layers with different expert counts.
    #[error("layer {layer} has {got} expert loads, layer 0 has {expected}: every layer needs one per expert")]
    UnevenLayers {
        /// The layer at fault (0-based, in input order).
        layer: usize,
        /// Its count.
        got: usize,
        /// Layer 0's.
        expected: usize,
    },
    /// A negative or non-finite load.
    #[error("layer {layer}, expert {expert}: load {value} is not a finite, non-negative number")]
    BadLoad {
        /// The layer (0-based, in input order).
        layer: usize,
        /// The expert.
        expert: usize,
        /// The value.
        value: f64,
    },
    /// A count of zero or one that does not divide another.
    #[error("{0}")]
    Counts(String),
}

/// The placement of one set of layers' experts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Placement {
    /// The policy used.
    pub policy: Policy,
    /// For each layer and physical expert (GPU `g` holds `g·R/gpus ..`), its logical expert.
    pub phy2log: Vec<Vec<usize>>,
    /// For each layer and logical expert, its physical copies, padded with −1 to the
    /// largest copy count of any expert of any layer.
    pub log2phy: Vec<Vec<Vec<i64>>>,
    /// For each layer and logical expert, its number of copies.
    pub logcnt: Vec<Vec<usize>>,
    /// Each layer's GPU loads before (one copy of each expert, `L / gpus` consecutive
    /// experts per GPU, as expert parallelism trains them), when `L` divides over the GPUs,
    /// and after.
    pub balance: Vec<LayerBalance>,
}

/// A layer's load per GPU, and its max/mean ratio (1 is perfect balance).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerBalance {
    /// One copy of each expert, consecutive experts per GPU; none when the GPUs do not
    /// split the experts evenly.
    pub before: Option<Vec<f64>>,
    /// The placement's.
    pub after: Vec<f64>,
    /// max/mean of `before`.
    pub before_ratio: Option<f64>,
    /// max/mean of `after`.
    pub after_ratio: f64,
}

/// Places `R` physical experts per layer for `loads` (`[layers][logical experts]`, e.g.
/// tokens routed to each expert over some steps) on `cluster`.
pub fn rebalance(loads: &[Vec<f64>], cluster: Cluster) -> Result<Placement, EplbError> {
    let experts = check(loads, cluster)?;
    let policy =
        if cluster.groups.is_multiple_of(cluster.nodes) { Policy::Hierarchical } else { Policy::Global };
    let (groups, nodes) = match policy {
        Policy::Hierarchical => (cluster.groups, cluster.nodes),
        Policy::Global => (1, 1),
    };
    let gpus = cluster.gpus();
    let mut phy2log = Vec::with_capacity(loads.len());
    let mut ranks = Vec::with_capacity(loads.len());
    let mut logcnt = Vec::with_capacity(loads.len());
    for layer in loads {
        // Loads in f32, as the reference takes them (`weight.float()`).
        let weight: Vec<f32> = layer.iter().map(|&w| w as f32).collect();
        let (p2l, rank, count) = hierarchical(&weight, cluster.replicas, groups, nodes, gpus);
        phy2log.push(p2l);
        ranks.push(rank);
        logcnt.push(count);
    }
    let widest = logcnt.iter().flatten().copied().max().unwrap_or(1);
    let log2phy = phy2log
        .iter()
        .zip(&ranks)
        .map(|(p2l, rank)| {
            let mut map = vec![vec![-1i64; widest]; experts];
            for (phy, (&log, &r)) in p2l.iter().zip(rank).enumerate() {
                map[log][r] = phy as i64;
            }
            map
        })
        .collect();
    let balance =
        loads.iter().zip(&phy2log).zip(&logcnt).map(|((l, p), c)| layer_balance(l, p, c, gpus)).collect();
    Ok(Placement { policy, phy2log, log2phy, logcnt, balance })
}

/// Checks the inputs; returns the logical expert count. (Under the hierarchical policy the
/// nodes then split the experts too: they divide the groups, which divide the experts.)
fn check(loads: &[Vec<f64>], c: Cluster) -> Result<usize, EplbError> {
    let experts = loads.first().map_or(0, Vec::len);
    if loads.is_empty() || experts == 0 {
        return Err(EplbError::NoLoads(if loads.is_empty() {
            "no layer".into()
        } else {
            "layer 0 is empty".into()
        }));
    }
    for (layer, l) in loads.iter().enumerate() {
        if l.len() != experts {
            return Err(EplbError::UnevenLayers { layer, got: l.len(), expected: experts });
        }
        if let Some((expert, &value)) = l.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w >= 0.0)) {
            return Err(EplbError::BadLoad { layer, expert, value });
        }
    }
    let counts = |m: String| Err(EplbError::Counts(m));
    for (name, value) in [
        ("replicas", c.replicas),
        ("groups", c.groups),
        ("nodes", c.nodes),
        ("gpus per node", c.gpus_per_node),
    ] {
        if value == 0 {
            return counts(format!("{name} must be at least 1"));
        }
    }
    if c.replicas < experts {
        return counts(format!(
            "replicas = {} is fewer than the {experts} experts: every expert needs a copy",
            c.replicas
        ));
    }
    if !c.replicas.is_multiple_of(c.gpus()) {
        return counts(format!(
            "replicas = {} does not divide over the {} GPUs ({} nodes × {}): every GPU holds as many copies",
            c.replicas,
            c.gpus(),
            c.nodes,
            c.gpus_per_node
        ));
    }
    if !experts.is_multiple_of(c.groups) {
        return counts(format!("groups = {} does not divide the {experts} experts", c.groups));
    }
    Ok(experts)
}

/// One layer under the hierarchical policy (the global one is `groups = nodes = 1`):
/// returns, per physical expert, its logical expert and its copy's rank among that
/// expert's copies, and per logical expert its copy count.
fn hierarchical(
    weight: &[f32],
    replicas: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let experts = weight.len();
    let group_size = experts / groups;
    let groups_per_node = groups / nodes;
    let per_node = experts / nodes;
    let replicas_per_node = replicas / nodes;
    let copies_per_gpu = replicas / gpus;

    // 1. Groups onto nodes. An expert's "node-major" index (`mlog`): its node's experts
    //    are `node·per_node ..`, its group's at the group's rank on the node.
    let group_load: Vec<f32> = weight.chunks(group_size).map(|g| g.iter().sum()).collect();
    let (group_node, group_rank) = balanced_packing(&group_load, nodes);
    let log2mlog: Vec<usize> = (0..experts)
        .map(|e| {
            let g = e / group_size;
            (group_node[g] * groups_per_node + group_rank[g]) * group_size + e % group_size
        })
        .collect();
    let mlog2log = inverse(&log2mlog);

    let mut phy2log = Vec::with_capacity(replicas);
    let mut phy_rank = Vec::with_capacity(replicas);
    let mut mlog_count = Vec::with_capacity(experts);
    for node in 0..nodes {
        // 2. Copies within the node.
        let node_weight: Vec<f32> = (0..per_node).map(|j| weight[mlog2log[node * per_node + j]]).collect();
        let (phy2mlog, rank, count) = replicate(&node_weight, replicas_per_node);
        // 3. The node's copies onto its GPUs.
        let copy_load: Vec<f32> = phy2mlog.iter().map(|&m| node_weight[m] / count[m] as f32).collect();
        let (gpu, slot) = balanced_packing(&copy_load, gpus / nodes);
        let placed: Vec<usize> = gpu.iter().zip(&slot).map(|(g, s)| g * copies_per_gpu + s).collect();
        for phy in inverse(&placed) {
            phy2log.push(mlog2log[node * per_node + phy2mlog[phy]]);
            phy_rank.push(rank[phy]);
        }
        mlog_count.extend(count);
    }
    let logcnt = log2mlog.iter().map(|&m| mlog_count[m]).collect();
    (phy2log, phy_rank, logcnt)
}

/// Packs the items of `weight` into `packs` packs of `weight.len() / packs` items each:
/// heaviest first, each into the lightest pack with room (the first of equal ones).
/// Returns each item's pack and its place in the pack.
fn balanced_packing(weight: &[f32], packs: usize) -> (Vec<usize>, Vec<usize>) {
    let per_pack = weight.len() / packs;
    if per_pack == 1 {
        return ((0..weight.len()).collect(), vec![0; weight.len()]);
    }
    let mut order: Vec<usize> = (0..weight.len()).collect();
    // Stable: equal weights keep their index order.
    order.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]));
    let mut pack_of = vec![0; weight.len()];
    let mut rank_in_pack = vec![0; weight.len()];
    let mut load = vec![0f32; packs];
    let mut items = vec![0usize; packs];
    for item in order {
        let pack = (0..packs)
            .filter(|&p| items[p] < per_pack)
            .reduce(|best, p| if load[p] < load[best] { p } else { best })
            .expect("the packs have room for every item: len = packs × per_pack");
        pack_of[item] = pack;
        rank_in_pack[item] = items[pack];
        load[pack] += weight[item];
        items[pack] += 1;
    }
    (pack_of, rank_in_pack)
}

/// Makes `copies ≥ weight.len()` copies of the experts of `weight`: one each, then each
/// further one for the expert with the largest load per copy (the first of equal ones).
/// Returns each copy's expert and its rank among the expert's copies, and each expert's
/// copy count.
fn replicate(weight: &[f32], copies: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let experts = weight.len();
    let mut phy2log: Vec<usize> = (0..experts).collect();
    let mut rank = vec![0; experts];
    let mut count = vec![1usize; experts];
    for _ in experts..copies {
        let per_copy = |e: usize| weight[e] / count[e] as f32;
        let heaviest = (1..experts).fold(0, |best, e| if per_copy(e) > per_copy(best) { e } else { best });
        phy2log.push(heaviest);
        rank.push(count[heaviest]);
        count[heaviest] += 1;
    }
    (phy2log, rank, count)
}

/// The inverse of a permutation.
fn inverse(perm: &[usize]) -> Vec<usize> {
    let mut inv = vec![0; perm.len()];
    for (i, &p) in perm.iter().enumerate() {
        inv[p] = i;
    }
    inv
}

/// The GPU loads of one layer before and after.
fn layer_balance(load: &[f64], phy2log: &[usize], logcnt: &[usize], gpus: usize) -> LayerBalance {
    let per_gpu = phy2log.len() / gpus;
    let after: Vec<f64> = phy2log
        .chunks(per_gpu)
        .map(|copies| copies.iter().map(|&e| load[e] / logcnt[e] as f64).sum())
        .collect();
    let before: Option<Vec<f64>> = load
        .len()
        .is_multiple_of(gpus)
        .then(|| load.chunks(load.len() / gpus).map(|experts| experts.iter().sum()).collect());
    LayerBalance {
        before_ratio: before.as_deref().map(max_over_mean),
        after_ratio: max_over_mean(&after),
        before,
        after,
    }
}

/// max/mean, 1 for no load at all.
pub fn max_over_mean(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    if mean > 0.0 { loads.iter().copied().fold(0.0, f64::max) / mean } else { 1.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of DeepSeek's EPLB README: two layers of 12 experts in 4 groups, 16
    /// physical experts on 2 nodes of 4 GPUs, and the `phy2log` it prints.
    #[test]
    fn reproduces_the_example_of_deepseeks_eplb_readme() {
        let loads: Vec<Vec<f64>> = [
            [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
            [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
        ]
        .iter()
        .map(|l| l.iter().map(|&w| f64::from(w)).collect())
        .collect();
        let cluster = Cluster { replicas: 16, groups: 4, nodes: 2, gpus_per_node: 4 };
        let placement = rebalance(&loads, cluster).unwrap();
        assert_eq!(placement.policy, Policy::Hierarchical);
        assert_eq!(
            placement.phy2log,
            vec![
                vec![5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                vec![7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
            ]
        );
        check_consistent(&loads, cluster, &placement);
    }

    /// The maps agree with each other and with the invariants of the module docs.
    fn check_consistent(loads: &[Vec<f64>], cluster: Cluster, p: &Placement) {
        let gpus = cluster.gpus();
        for (layer, load) in loads.iter().enumerate() {
            let (p2l, cnt, l2p) = (&p.phy2log[layer], &p.logcnt[layer], &p.log2phy[layer]);
            assert_eq!(p2l.len(), cluster.replicas);
            assert_eq!(cnt.iter().sum::<usize>(), cluster.replicas);
            for (e, &c) in cnt.iter().enumerate() {
                assert!(c >= 1, "layer {layer}: expert {e} has no copy");
                assert_eq!(p2l.iter().filter(|&&x| x == e).count(), c);
                let copies: Vec<i64> = l2p[e].iter().copied().filter(|&x| x >= 0).collect();
                assert_eq!(copies.len(), c);
                assert!(copies.iter().all(|&phy| p2l[phy as usize] == e));
                assert!(l2p[e][c..].iter().all(|&x| x == -1), "padding after the copies");
            }
            if p.policy == Policy::Hierarchical {
                let per_node = cluster.replicas / cluster.nodes;
                let group_size = load.len() / cluster.groups;
                for group in 0..cluster.groups {
                    let nodes: std::collections::BTreeSet<usize> = (0..cluster.replicas)
                        .filter(|&phy| p2l[phy] / group_size == group)
                        .map(|phy| phy / per_node)
                        .collect();
                    assert_eq!(nodes.len(), 1, "layer {layer}: group {group}'s copies span nodes {nodes:?}");
                }
            }
            let b = &p.balance[layer];
            assert_eq!(b.after.len(), gpus);
            let total: f64 = load.iter().sum();
            assert!((b.after.iter().sum::<f64>() - total).abs() <= 1e-9 * total.max(1.0));
        }
    }

    fn skewed(layers: usize, experts: usize, seed: u64) -> Vec<Vec<f64>> {
        // A deterministic Zipf-like skew with a per-layer permutation.
        (0..layers)
            .map(|l| {
                (0..experts)
                    .map(|e| {
                        let r = (e as u64 * 2_654_435_761 + l as u64 * 97 + seed) % experts as u64;
                        (10_000.0 / (1.0 + r as f64)).round()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn redundant_copies_lower_the_heaviest_gpus_load() {
        // 64 experts in 8 groups on 2 nodes × 8 GPUs with 16 redundant copies:
        // hierarchical; 48 experts in 3 groups on 2 nodes (3 groups do not split): global.
        for (loads, cluster) in [
            (skewed(4, 64, 7), Cluster { replicas: 80, groups: 8, nodes: 2, gpus_per_node: 8 }),
            (skewed(4, 48, 3), Cluster { replicas: 64, groups: 3, nodes: 2, gpus_per_node: 8 }),
        ] {
            let p = rebalance(&loads, cluster).unwrap();
            let expected = if cluster.groups == 8 { Policy::Hierarchical } else { Policy::Global };
            assert_eq!(p.policy, expected);
            check_consistent(&loads, cluster, &p);
            for b in &p.balance {
                let before = b.before_ratio.expect("the experts split over the GPUs");
                assert!(b.after_ratio < before, "{} vs {before}", b.after_ratio);
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_index_and_equal_loads_stay_in_order() {
        let loads = vec![vec![1.0; 8]];
        let p = rebalance(&loads, Cluster { replicas: 8, groups: 1, nodes: 1, gpus_per_node: 4 }).unwrap();
        // Equal weights: stable order, round-robin over the equal packs.
        assert_eq!(p.phy2log[0], vec![0, 4, 1, 5, 2, 6, 3, 7]);
        assert_eq!(p.balance[0].after_ratio, 1.0);
        let p = rebalance(&loads, Cluster { replicas: 12, groups: 1, nodes: 1, gpus_per_node: 4 }).unwrap();
        // The extra copies go to experts 0..4, the first of the equal ones.
        assert_eq!(p.logcnt[0], vec![2, 2, 2, 2, 1, 1, 1, 1]);
    }

    #[test]
    fn bad_counts_and_loads_are_named() {
        let loads = skewed(2, 16, 1);
        let c = Cluster { replicas: 20, groups: 4, nodes: 2, gpus_per_node: 4 };
        let err = |loads: &[Vec<f64>], c| rebalance(loads, c).unwrap_err().to_string();
        assert!(
            err(&loads, Cluster { replicas: 12, gpus_per_node: 2, ..c })
                .contains("fewer than the 16 experts")
        );
        assert!(err(&loads, Cluster { replicas: 20, ..c }).contains("does not divide over the 8 GPUs"));
        assert!(err(&loads, Cluster { replicas: 24, groups: 3, ..c }).contains("groups = 3 does not divide"));
        assert!(err(&loads, Cluster { replicas: 24, nodes: 0, ..c }).contains("nodes must be at least 1"));
        assert!(err(&[], Cluster { replicas: 24, ..c }).contains("no layer"));
        let uneven = vec![loads[0].clone(), loads[1][..8].to_vec()];
        assert!(err(&uneven, Cluster { replicas: 24, ..c }).contains("layer 1 has 8 expert loads"));
        let mut negative = loads.clone();
        negative[1][3] = -1.0;
        assert!(err(&negative, Cluster { replicas: 24, ..c }).contains("layer 1, expert 3: load -1"));
        negative[1][3] = f64::NAN;
        assert!(err(&negative, Cluster { replicas: 24, ..c }).contains("layer 1, expert 3"));
    }
}
