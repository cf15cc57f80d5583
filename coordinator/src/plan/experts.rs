//! Where the routed experts live ([`ExpertPlacement`]) and what node-limited routing makes
//! of it: the expected nodes and GPUs a token reaches under uniform routing.
//!
//! An EP group must fill whole nodes or fit inside one, and each routing group of
//! `n_routed_experts / n_group` consecutive experts must live in one node. Then choosing
//! `topk_group` groups is choosing at most `topk_group` nodes: group-limited routing is the
//! report's node-limited routing (DESIGN §1.1: 8 groups, 4 kept, one group per node at
//! EP 64).
//!
//! Invariant: GPU i of an EP group hosts experts `i·e .. (i+1)·e`; the expected counts are
//! exact under uniform routing (computed, not sampled), so plans are deterministic.

use super::layout::Geometry;
use super::shape::ModelShape;
use serde::Serialize;

/// The experts of one layer on one node of an EP group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct NodeExperts {
    /// Node within the EP group.
    pub node: u32,
    /// First routed expert it hosts.
    pub first_expert: u32,
    /// Last routed expert it hosts.
    pub last_expert: u32,
    /// First routing group it hosts.
    pub first_group: u32,
    /// Last routing group it hosts.
    pub last_group: u32,
}

/// Where the routed experts live and what node-limited routing makes of it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExpertPlacement {
    /// Routed experts per MoE layer.
    pub routed_experts: u32,
    /// Routed experts of each MoE layer on one GPU; GPU i of an EP group hosts experts
    /// `i·e .. (i+1)·e`.
    pub experts_per_gpu: u32,
    /// Nodes one EP group spans (1 when it fits inside a node).
    pub ep_nodes: u32,
    /// GPUs of one EP group on each of its nodes.
    pub ep_gpus_per_node: u32,
    /// Routing groups (n_group).
    pub routing_groups: u32,
    /// Routing groups whose experts one node hosts.
    pub groups_per_node: u32,
    /// Groups a token may route into (topk_group).
    pub topk_group: u32,
    /// Copies of each expert in the cluster: hosting ranks × expert_dp.
    pub expert_replicas: u64,
    /// Most nodes a token's experts can be on.
    pub max_nodes_per_token: u32,
    /// Expected nodes a token's experts are on, under uniform routing.
    pub expected_nodes_per_token: f64,
    /// Expected GPUs a token's experts are on, under uniform routing.
    pub expected_gpus_per_token: f64,
    /// The nodes of one EP group and the experts of a layer on each.
    pub nodes: Vec<NodeExperts>,
}

/// `ln C(n, k)`, 0 ≤ k ≤ n.
fn ln_choose(n: u64, k: u64) -> f64 {
    let k = k.min(n - k);
    (0..k).map(|i| ((n - i) as f64 / (i + 1) as f64).ln()).sum()
}

/// Routing of one token under the uniform model: `chosen` of `groups` routing groups of
/// `group_size` experts, then `picks` experts among the chosen groups' experts.
struct Routing {
    groups: u64,
    group_size: u64,
    chosen: u64,
    picks: u64,
}

impl Routing {
    /// The probability that at least one of a token's experts is among experts
    /// `first..first + count`.
    fn hit(&self, first: u64, count: u64) -> f64 {
        let Routing { groups, group_size, chosen, picks } = *self;
        let (mut whole, mut partial) = (0u64, Vec::new());
        for g in first / group_size..=(first + count - 1) / group_size {
            let overlap = (first + count).min((g + 1) * group_size) - first.max(g * group_size);
            if overlap == group_size {
                whole += 1;
            } else {
                partial.push(overlap);
            }
        }
        let touched = whole + partial.len() as u64;
        let pool = chosen * group_size;
        let ln_all = ln_choose(groups, chosen);
        let mut probability = 0.0;
        for j in 0..=whole {
            for subset in 0..1u32 << partial.len() {
                let mine: u64 = j + subset.count_ones() as u64;
                if mine > chosen || chosen - mine > groups - touched {
                    continue;
                }
                // These exact groups of ours are chosen, the rest from the other groups.
                let ways = (ln_choose(whole, j) + ln_choose(groups - touched, chosen - mine) - ln_all).exp();
                let eligible = j * group_size
                    + partial
                        .iter()
                        .enumerate()
                        .filter(|(b, _)| subset & (1 << b) != 0)
                        .map(|(_, o)| o)
                        .sum::<u64>();
                // P(none of the picks among our eligible experts) = C(pool − eligible, picks) / C(pool, picks).
                let miss = if pool - eligible < picks {
                    0.0
                } else {
                    (0..picks).map(|i| (pool - eligible - i) as f64 / (pool - i) as f64).product()
                };
                probability += ways * (1.0 - miss);
            }
        }
        probability
    }
}

pub(super) fn experts(model: &ModelShape, g: &Geometry, expert_replicas: u64) -> ExpertPlacement {
    let (ep, experts_per_gpu, ep_nodes, ep_gpus_per_node) =
        (g.layout.ep as u64, g.experts_per_gpu, g.ep_nodes, g.ep_gpus_per_node);
    let experts = model.routed_experts as u64;
    let per_node = experts_per_gpu * ep_gpus_per_node;
    let groups = model.n_group.max(1) as u64;
    let group_size = (experts / groups).max(1);
    let (expected_nodes, expected_gpus) = if experts == 0 {
        (0.0, 0.0)
    } else {
        let routing = Routing {
            groups,
            group_size,
            chosen: model.topk_group as u64,
            picks: model.experts_per_token as u64,
        };
        (
            (0..ep_nodes).map(|n| routing.hit(n * per_node, per_node)).sum(),
            (0..ep).map(|g| routing.hit(g * experts_per_gpu, experts_per_gpu)).sum(),
        )
    };
    let nodes = (0..ep_nodes)
        .filter(|_| experts > 0)
        .map(|n| {
            let (first, last) = (n * per_node, (n + 1) * per_node - 1);
            NodeExperts {
                node: n as u32,
                first_expert: first as u32,
                last_expert: last as u32,
                first_group: (first / group_size) as u32,
                last_group: (last / group_size) as u32,
            }
        })
        .collect();
    ExpertPlacement {
        routed_experts: experts as u32,
        experts_per_gpu: experts_per_gpu as u32,
        ep_nodes: ep_nodes as u32,
        ep_gpus_per_node: ep_gpus_per_node as u32,
        routing_groups: model.n_group as u32,
        groups_per_node: (per_node / group_size).max(1) as u32,
        topk_group: model.topk_group as u32,
        expert_replicas,
        max_nodes_per_token: (model.topk_group as u64).min(ep_nodes) as u32,
        expected_nodes_per_token: expected_nodes,
        expected_gpus_per_token: expected_gpus,
        nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_routing_probabilities_add_up() {
        // One group per node, 4 of 8 groups chosen, 8 of their 128 experts.
        let routing = Routing { groups: 8, group_size: 32, chosen: 4, picks: 8 };
        let nodes: f64 = (0..8).map(|n| routing.hit(n * 32, 32)).sum();
        assert!(nodes > 3.0 && nodes < 4.0, "{nodes}");
        // A unit holding every expert is always hit; expected experts sum to K.
        assert!((routing.hit(0, 256) - 1.0).abs() < 1e-12);
        let one: f64 = (0..256).map(|e| routing.hit(e, 1)).sum();
        assert!((one - 8.0).abs() < 1e-9, "{one}");
        // Units straddling group boundaries.
        let straddling: f64 = (0..256 / 3).map(|u| routing.hit(u * 3, 3)).sum::<f64>() + routing.hit(255, 1);
        assert!(straddling <= 8.0 && straddling > 1.0, "{straddling}");
    }
}
