//! Expert parallelism of the MoE layer: `n` threads, each one EP rank holding a shard of
//! the routed experts and its own tokens, exchange through an in-memory [`ExpertExchange`];
//! each rank's results must equal the single-process layer (every expert, a
//! [`LocalExchange`]) run on that rank's tokens.
//!
//! - fp32, EP 2 and 4: the output, balance loss, expert loads, `dx` and the gate's and
//!   shared experts' gradients are bit-identical whenever every expert gets more than 4
//!   rows from each rank that routes to it; with blocks of 1–4 rows the `gemm` crate runs
//!   another kernel (see `blocks_share_kernels`) and they agree to 1e-7 (asserted 1e-6).
//!   Each routed expert's gradient on its owner is one Wgrad GEMM over every rank's rows
//!   where the reference adds one GEMM per rank: equal to summation order (≈ 3e-7, asserted
//!   1e-6, relative by norm).
//! - Skewed routing (every token on experts 0–3): bit-identical too, with ranks that own
//!   or receive nothing (empty messages).
//! - bf16: only BackwardCombine's BF16 rounding changes anything (`dx`, ≈ 1.4e-3).
//! - fp8: the dispatch carries the FP8 codes and scales (1 + 4/128 bytes per element);
//!   Combine and both backward exchanges carry BF16 (2 bytes), which single-process fp8
//!   does not round: results move by a fraction of FP8's own error, and no further from
//!   the fp32 layer.
//! - Malformed messages (truncated, wrong counts, unknown format, NaN codes, bad scales, a
//!   wrong number of messages) are errors naming the layer, the phase and the source rank.
//! - An EP degree that does not divide `n_routed_experts` is refused, naming the field.

mod common;

use common::random;
use flotilla_model::moe::MoeLayer;
use flotilla_model::param::Param;
use flotilla_model::{
    Block, ExchangeKey, ExchangePhase, ExpertExchange, ExpertShard, LocalExchange, ModelConfig, ModelError,
    Precision, Preset,
};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

const LAYER: usize = 3;
const PREFIX: &str = "model.layers.3.mlp";
const SEED: u64 = 21;
const SEQ: usize = 16;
/// Sequences per rank: few (8 routed rows per expert and rank on average, so some blocks
/// are tiny), or many (64 on average).
const FEW: usize = 2;
const MANY: usize = 16;
const ALPHA: f64 = 0.01;

/// The tiny preset: hidden 128, moe_inter 64, 16 routed experts in 4 groups (2 kept),
/// top-4, 1 shared expert.
fn config() -> ModelConfig {
    Preset::Tiny.config()
}

fn layer(shard: ExpertShard, precision: Precision, bias: &[f32]) -> MoeLayer<f32> {
    let mut layer = MoeLayer::<f32>::new_sharded(&config(), PREFIX, SEED, shard).unwrap();
    layer.set_precision(precision);
    layer.e_score_correction_bias.set_value(bias).unwrap();
    layer
}

/// Small random selection biases (so they matter to routing; the gate's scores spread by
/// a few hundredths at initialization).
fn random_bias() -> Vec<f32> {
    bias(0.05)
}

/// Random selection biases of at most `scale`.
fn bias(scale: f32) -> Vec<f32> {
    random(config().n_routed_experts, 7).iter().map(|v| scale * *v as f32).collect()
}

/// Every token picks experts 0–3: group 0's four experts get +10.
fn skewed_bias() -> Vec<f32> {
    (0..config().n_routed_experts).map(|e| if e < 4 { 10.0 } else { 0.0 }).collect()
}

/// Each rank's input and output gradient, `[batch·SEQ, hidden]`, from `seed`.
fn inputs(ranks: usize, batch: usize, seed: u64) -> Vec<(Vec<f32>, Vec<f32>)> {
    let n = batch * SEQ * config().hidden_size;
    let f32s = |s: u64| random(n, s).iter().map(|&v| v as f32).collect::<Vec<_>>();
    (0..ranks as u64).map(|r| (f32s(seed + 2 * r), f32s(seed + 2 * r + 1))).collect()
}

/// What one rank computed: forward, B and W.
struct RankRun {
    y: Vec<f32>,
    balance_loss: f32,
    expert_load: Vec<u64>,
    received_rows: Vec<usize>,
    dx: Vec<f32>,
    layer: MoeLayer<f32>,
}

fn run_rank(
    mut layer: MoeLayer<f32>,
    x: &[f32],
    dy: &[f32],
    exchange: &mut dyn ExpertExchange,
) -> Result<RankRun, ModelError> {
    let tokens = x.len() / layer.hidden;
    let kept = layer.cache_input(x, tokens)?;
    let mut y = vec![0.0; x.len()];
    let cache = layer.forward(x, &kept, tokens / SEQ, SEQ, ALPHA, &mut y, 1, exchange)?;
    let mut dx = vec![0.0; x.len()];
    let grads = layer.backward_input(&cache, dy, 1.0, &mut dx, false, 1, exchange)?;
    layer.backward_weight(&cache, &grads, x, &kept, 1)?;
    Ok(RankRun {
        y,
        balance_loss: cache.balance_loss,
        expert_load: cache.expert_load.clone(),
        received_rows: cache.received_rows.clone(),
        dx,
        layer,
    })
}

/// One message as the hub saw it.
#[derive(Clone, Debug)]
struct Sent {
    key: ExchangeKey,
    src: usize,
    dst: usize,
    bytes: Vec<u8>,
}

/// One exchange's messages, `[dst][src]`, each taken by its receiver.
type Mailbox = Vec<Vec<Option<Vec<u8>>>>;

/// An in-memory all-to-all for `size` threads: a mailbox per key, `[dst][src]`, and a
/// log of every message.
struct Hub {
    size: usize,
    state: Mutex<(HashMap<ExchangeKey, Mailbox>, Vec<Sent>)>,
    ready: Condvar,
}

impl Hub {
    fn new(size: usize) -> Self {
        Hub { size, state: Mutex::new((HashMap::new(), Vec::new())), ready: Condvar::new() }
    }

    fn log(&self) -> Vec<Sent> {
        self.state.lock().unwrap().1.clone()
    }
}

/// Rank `rank`'s side of a [`Hub`].
struct Member<'a> {
    hub: &'a Hub,
    rank: usize,
}

impl ExpertExchange for Member<'_> {
    fn group_size(&self) -> usize {
        self.hub.size
    }

    fn group_rank(&self) -> usize {
        self.rank
    }

    fn exchange(&mut self, key: ExchangeKey, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ModelError> {
        let n = self.hub.size;
        assert_eq!(outgoing.len(), n, "one message per group rank");
        let mut state = self.hub.state.lock().unwrap();
        for (dst, bytes) in outgoing.into_iter().enumerate() {
            state.1.push(Sent { key, src: self.rank, dst, bytes: bytes.clone() });
            state.0.entry(key).or_insert_with(|| vec![vec![None; n]; n])[dst][self.rank] = Some(bytes);
        }
        self.hub.ready.notify_all();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let slot =
                state.0.get_mut(&key).expect("the key's mailbox lives until every rank took its messages");
            if slot[self.rank].iter().all(Option::is_some) {
                let got = slot[self.rank].iter_mut().map(|m| m.take().expect("present")).collect();
                if slot.iter().flatten().all(Option::is_none) {
                    state.0.remove(&key);
                }
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ModelError::Tensor {
                    tensor: "hub".into(),
                    detail: format!("{key:?} timed out"),
                });
            }
            state = self.hub.ready.wait_timeout(state, left).unwrap().0;
        }
    }
}

/// Every rank of an EP group of `inputs.len()` on its own thread.
fn run_ep(precision: Precision, bias: &[f32], inputs: &[(Vec<f32>, Vec<f32>)], hub: &Hub) -> Vec<RankRun> {
    let size = inputs.len();
    std::thread::scope(|s| {
        let handles: Vec<_> = inputs
            .iter()
            .enumerate()
            .map(|(rank, (x, dy))| {
                s.spawn(move || {
                    let layer = layer(ExpertShard { rank, size }, precision, bias);
                    run_rank(layer, x, dy, &mut Member { hub, rank }).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The single-process layer on each rank's tokens.
fn run_single(precision: Precision, bias: &[f32], inputs: &[(Vec<f32>, Vec<f32>)]) -> Vec<RankRun> {
    let full = |_| layer(ExpertShard::FULL, precision, bias);
    inputs
        .iter()
        .enumerate()
        .map(|(r, (x, dy))| run_rank(full(r), x, dy, &mut LocalExchange).unwrap())
        .collect()
}

fn param<'a>(layer: &'a MoeLayer<f32>, name: &str) -> &'a Param<f32> {
    layer
        .params()
        .into_iter()
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("{name} in {}", layer.prefix))
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `‖a − b‖ / ‖b‖` in f64 (0 when both are zero).
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    if d == 0.0 { 0.0 } else { (d / n).sqrt() }
}

/// Tolerances of an EP run against the single-process one (relative, by norm); `None`
/// means bit-identical.
struct Tolerances {
    y: Option<f64>,
    dx: Option<f64>,
    gate: Option<f64>,
    experts: f64,
}

fn check(what: &str, a: &[f32], b: &[f32], tol: Option<f64>) -> f64 {
    let r = rel(a, b);
    match tol {
        None => assert!(bits(a) == bits(b), "{what}: not bit-identical (rel {r:e})"),
        Some(t) => assert!(r <= t, "{what}: rel {r:e} > {t:e}"),
    }
    r
}

/// Compares an EP run with the single-process reference, rank by rank; returns the worst
/// relative error of the routed experts' gradients.
fn compare(ep: &[RankRun], single: &[RankRun], tol: &Tolerances) -> f64 {
    let n = ep.len();
    let cfg = config();
    let per = cfg.n_routed_experts / n;
    for (r, (e, s)) in ep.iter().zip(single).enumerate() {
        check(&format!("rank {r} y"), &e.y, &s.y, tol.y);
        assert_eq!(e.balance_loss.to_bits(), s.balance_loss.to_bits(), "rank {r} balance loss");
        assert_eq!(e.expert_load, s.expert_load, "rank {r} expert loads");
        check(&format!("rank {r} dx"), &e.dx, &s.dx, tol.dx);
        let gate = format!("{PREFIX}.gate.weight");
        check(
            &format!("rank {r} gate"),
            param(&e.layer, &gate).grad.host(),
            param(&s.layer, &gate).grad.host(),
            tol.gate,
        );
        for w in ["gate_proj", "up_proj", "down_proj"] {
            let name = format!("{PREFIX}.shared_experts.{w}.weight");
            // Home-local: the same dy and input in every precision.
            check(
                &format!("rank {r} {name}"),
                param(&e.layer, &name).grad.host(),
                param(&s.layer, &name).grad.host(),
                None,
            );
        }
        assert_eq!(e.layer.expert_range(), r * per..(r + 1) * per);
        assert_eq!(e.layer.experts.len(), per);
        // Rows received from each source = what that source routed to each local expert.
        for j in 0..per {
            for (src, run) in single.iter().enumerate() {
                assert_eq!(
                    e.received_rows[j * n + src] as u64,
                    run.expert_load[r * per + j],
                    "rank {r} from {src}"
                );
            }
        }
    }
    // Each routed expert's gradient, on its owner, against the sum of the references.
    let mut worst = 0f64;
    for expert in 0..cfg.n_routed_experts {
        let owner = &ep[expert / per].layer;
        for w in ["gate_proj", "up_proj", "down_proj"] {
            let name = format!("{PREFIX}.experts.{expert}.{w}.weight");
            let mut sum = vec![0f32; param(owner, &name).grad.len()];
            for run in single {
                sum.iter_mut().zip(param(&run.layer, &name).grad.host()).for_each(|(a, &b)| *a += b);
            }
            worst = worst.max(check(&name, param(owner, &name).grad.host(), &sum, Some(tol.experts)));
            for (r, run) in ep.iter().enumerate() {
                assert_eq!(
                    run.layer.params().iter().any(|p| p.name == name),
                    r == expert / per,
                    "{name} on rank {r}"
                );
            }
        }
    }
    worst
}

/// Whether the `gemm` crate computes each routed expert's rows on a rank with the same
/// kernel as inside the owner's block of every rank's rows: its f32 GEMM picks a kernel
/// by shape, and a product with `m·n ≤ 256` (`m` rows; `n` = 64 for `gate_proj`/`up_proj`,
/// 128 for `down_proj`) runs "horizontal" dot-product kernels that sum along K in SIMD
/// lanes (`m = 1` a GEMV), other shapes an FMA chain per output. So a block of 1–4 rows
/// gives other last bits than the same rows among more; with every nonzero per-rank
/// block above 4 rows both sides use the chain, and EP is bit-identical.
fn blocks_share_kernels(single: &[RankRun]) -> bool {
    single.iter().flat_map(|r| &r.expert_load).all(|&l| l == 0 || l > 4)
}

const BITS: Tolerances = Tolerances { y: None, dx: None, gate: None, experts: 1e-6 };
/// See [`blocks_share_kernels`].
const ROUNDING: Tolerances = Tolerances { y: Some(1e-6), dx: Some(1e-6), gate: Some(1e-6), experts: 1e-6 };

/// Four exchanges per layer call (two in forward, two in B), each from every rank to every
/// rank, all keyed by the layer.
fn check_log(log: &[Sent], size: usize) {
    assert_eq!(log.len(), 4 * size * size);
    assert!(log.iter().all(|m| m.key.layer == LAYER));
    for phase in [
        ExchangePhase::Dispatch,
        ExchangePhase::Combine,
        ExchangePhase::BackwardDispatch,
        ExchangePhase::BackwardCombine,
    ] {
        assert_eq!(log.iter().filter(|m| m.key.phase == phase).count(), size * size, "{phase:?}");
    }
}

/// fp32, EP 2 and 4, many tokens per rank: every expert's block holds more than 4 rows
/// on every rank that routes to it, and EP equals single-process bit for bit (the routed
/// experts' gradients: to summation order).
#[test]
fn fp32_ep_is_bit_identical_to_single_process() {
    for size in [2, 4] {
        let inputs = inputs(size, MANY, 100);
        let hub = Hub::new(size);
        let ep = run_ep(Precision::Fp32, &bias(0.01), &inputs, &hub);
        let single = run_single(Precision::Fp32, &bias(0.01), &inputs);
        let loads: Vec<_> = single.iter().map(|r| r.expert_load.clone()).collect();
        assert!(blocks_share_kernels(&single), "the data gives every block more than 4 rows: {loads:?}");
        let worst = compare(&ep, &single, &BITS);
        eprintln!("fp32 EP {size}: routed experts' gradients rel {worst:e}");
        check_log(&hub.log(), size);
    }
}

/// fp32, EP 2 and 4, few tokens per rank: some experts get 1–4 rows from a rank, whose
/// GEMM kernel then differs from the owner's (see [`blocks_share_kernels`]): equal to f32
/// rounding.
#[test]
fn fp32_ep_with_tiny_blocks_equals_single_process_to_rounding() {
    for size in [2, 4] {
        let inputs = inputs(size, FEW, 150);
        let hub = Hub::new(size);
        let ep = run_ep(Precision::Fp32, &random_bias(), &inputs, &hub);
        let single = run_single(Precision::Fp32, &random_bias(), &inputs);
        assert!(!blocks_share_kernels(&single), "the data gives some block 1–4 rows");
        compare(&ep, &single, &ROUNDING);
        let y = ep.iter().zip(&single).map(|(e, s)| rel(&e.y, &s.y)).fold(0.0, f64::max);
        let dx = ep.iter().zip(&single).map(|(e, s)| rel(&e.dx, &s.dx)).fold(0.0, f64::max);
        eprintln!("fp32 EP {size} with tiny blocks: y rel {y:e}, dx rel {dx:e}");
        check_log(&hub.log(), size);
    }
}

#[test]
fn skewed_routing_puts_every_row_on_one_rank() {
    for size in [2, 4] {
        let inputs = inputs(size, FEW, 200);
        let hub = Hub::new(size);
        let ep = run_ep(Precision::Fp32, &skewed_bias(), &inputs, &hub);
        let single = run_single(Precision::Fp32, &skewed_bias(), &inputs);
        assert!(blocks_share_kernels(&single));
        compare(&ep, &single, &BITS);
        for (r, run) in ep.iter().enumerate() {
            let load: u64 = run.expert_load[4..].iter().sum();
            assert_eq!(load, 0, "rank {r}: only experts 0–3 are chosen");
            let received: usize = run.received_rows.iter().sum();
            assert_eq!(received, if r == 0 { size * FEW * SEQ * 4 } else { 0 }, "rank {r}");
        }
        // Ranks other than 0 own nothing that was chosen: every message to them is empty,
        // and so is every message they return.
        for m in hub.log() {
            let to_owner = matches!(m.key.phase, ExchangePhase::Dispatch | ExchangePhase::BackwardDispatch);
            let owner = if to_owner { m.dst } else { m.src };
            assert_eq!(m.bytes.is_empty(), owner != 0, "{m:?}");
        }
    }
}

/// Bytes per element of the non-empty messages of `phase`, headers and scales included.
fn bytes_per_element(log: &[Sent], phase: ExchangePhase, experts_per_rank: usize, hidden: usize) -> f64 {
    let (mut bytes, mut rows) = (0usize, 0usize);
    for m in log.iter().filter(|m| m.key.phase == phase && !m.bytes.is_empty()) {
        let header = 1 + 4 * experts_per_rank;
        let counts = &m.bytes[1..header];
        rows +=
            counts.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize).sum::<usize>();
        bytes += m.bytes.len() - header;
    }
    bytes as f64 / (rows * hidden) as f64
}

/// `max over ranks of rel(f(a), f(b))`.
fn worst(a: &[RankRun], b: &[RankRun], f: impl Fn(&RankRun) -> Vec<f32>) -> f64 {
    a.iter().zip(b).map(|(a, b)| rel(&f(a), &f(b))).fold(0.0, f64::max)
}

fn gate_grad(r: &RankRun) -> Vec<f32> {
    param(&r.layer, &format!("{PREFIX}.gate.weight")).grad.to_host_vec()
}

/// Every routed expert's three weight gradients, concatenated, from the owners (`ep`) or
/// summed over the single-process runs.
fn expert_grads(runs: &[RankRun], ep: bool) -> Vec<f32> {
    let n = config().n_routed_experts;
    let mut out = Vec::new();
    for e in 0..n {
        for w in ["gate_proj", "up_proj", "down_proj"] {
            let name = format!("{PREFIX}.experts.{e}.{w}.weight");
            if ep {
                out.extend_from_slice(param(&runs[e / (n / runs.len())].layer, &name).grad.host());
            } else {
                let mut sum = vec![0f32; param(&runs[0].layer, &name).grad.len()];
                for r in runs {
                    sum.iter_mut().zip(param(&r.layer, &name).grad.host()).for_each(|(a, &b)| *a += b);
                }
                out.extend(sum);
            }
        }
    }
    out
}

/// bf16, EP 2: the dispatch (BF16, lossless: the BF16 GEMMs round their inputs to BF16
/// anyway), the combine (the expert outputs are BF16 already) and the backward dispatch
/// (the Dgrad and Wgrad GEMMs round `dy` to BF16 anyway) change nothing, so the output
/// and the gate's gradient are bit-identical; BackwardCombine rounds the experts' input
/// gradients (each the f32 sum of two BF16 Dgrads) to BF16, which moves `dx` by ~2⁻⁹ of
/// the routed part.
#[test]
fn bf16_ep_rounds_only_the_backward_combine() {
    let size = 2;
    let inputs = inputs(size, MANY, 300);
    let hub = Hub::new(size);
    let ep = run_ep(Precision::Bf16, &random_bias(), &inputs, &hub);
    let single = run_single(Precision::Bf16, &random_bias(), &inputs);
    assert!(blocks_share_kernels(&single));
    let tol = Tolerances { y: None, dx: Some(3e-3), gate: None, experts: 1e-6 };
    compare(&ep, &single, &tol);
    eprintln!("bf16 EP {size}: dx rel {:e}", worst(&ep, &single, |r| r.dx.clone()));
    let (log, per, h) = (hub.log(), config().n_routed_experts / size, config().hidden_size);
    for phase in [ExchangePhase::Dispatch, ExchangePhase::Combine, ExchangePhase::BackwardDispatch] {
        assert_eq!(bytes_per_element(&log, phase, per, h), 2.0, "{phase:?}");
    }
}

/// fp8, EP 2: the dispatch carries the E4M3 codes and 1×128 scales the experts' Fprop
/// reads, so the experts' inputs are bit-identical; Combine, BackwardDispatch and
/// BackwardCombine carry BF16 (as DeepSeek's), which rounds the expert outputs, the
/// experts' output gradients (before their FP8 quantization, whose rounding is thereby
/// drawn anew) and their input gradients. Single-process fp8 does not round them. The
/// difference is of the order of FP8's own error, and EP adds almost nothing to the
/// distance from the fp32 layer.
#[test]
fn fp8_ep_dispatches_fp8_codes_and_combines_in_bf16() {
    let size = 2;
    let inputs = inputs(size, MANY, 400);
    let hub = Hub::new(size);
    let ep = run_ep(Precision::Fp8, &random_bias(), &inputs, &hub);
    let single = run_single(Precision::Fp8, &random_bias(), &inputs);
    let fp32 = run_single(Precision::Fp32, &random_bias(), &inputs);
    let tol = Tolerances { y: Some(4e-3), dx: Some(5e-2), gate: Some(1e-2), experts: 6e-2 };
    compare(&ep, &single, &tol);
    type Distance<'a> = &'a dyn Fn(&[RankRun], &[RankRun]) -> f64;
    let rows: [(&str, Distance); 4] = [
        ("y", &|a, b| worst(a, b, |r| r.y.clone())),
        ("dx", &|a, b| worst(a, b, |r| r.dx.clone())),
        ("gate", &|a, b| worst(a, b, gate_grad)),
        ("experts", &|a, b| {
            let (ea, eb) = (expert_grads(a, a[0].layer.experts.len() < 16), expert_grads(b, false));
            rel(&ea, &eb)
        }),
    ];
    for (what, f) in rows {
        let (ep_single, ep_fp32, single_fp32) = (f(&ep, &single), f(&ep, &fp32), f(&single, &fp32));
        eprintln!(
            "fp8 EP {size} {what}: vs fp8 {ep_single:.2e}, vs fp32 {ep_fp32:.2e} (fp8 vs fp32 {single_fp32:.2e})"
        );
        assert!(
            ep_fp32 <= 1.1 * single_fp32 + 1e-4,
            "{what}: EP fp8 {ep_fp32:e} from fp32, fp8 {single_fp32:e}"
        );
    }
    let (log, per, h) = (hub.log(), config().n_routed_experts / size, config().hidden_size);
    let dispatch = bytes_per_element(&log, ExchangePhase::Dispatch, per, h);
    assert_eq!(dispatch, 1.0 + 4.0 / 128.0, "one code per element and one f32 scale per 128");
    let tag =
        log.iter().find(|m| m.key.phase == ExchangePhase::Dispatch && !m.bytes.is_empty()).unwrap().bytes[0];
    assert_eq!(tag, 3, "FP8 with exact scales");
    for phase in [ExchangePhase::Combine, ExchangePhase::BackwardDispatch, ExchangePhase::BackwardCombine] {
        assert_eq!(bytes_per_element(&log, phase, per, h), 2.0, "{phase:?}");
    }
}

/// A group of one (every expert, [`LocalExchange`]) keeps f32 on every exchange, so fp8
/// and bf16 single-process results do not depend on the exchange at all (the existing
/// precision tests pin them); here: a hub of one gives the same bits as `LocalExchange`.
#[test]
fn a_hub_of_one_equals_the_local_exchange() {
    for precision in [Precision::Fp32, Precision::Bf16, Precision::Fp8] {
        let inputs = inputs(1, FEW, 500);
        let hub = Hub::new(1);
        let ep = run_ep(precision, &random_bias(), &inputs, &hub);
        let single = run_single(precision, &random_bias(), &inputs);
        let tol = Tolerances { y: None, dx: None, gate: None, experts: 0.0 };
        compare(&ep, &single, &tol);
        let log = hub.log();
        let combine = log.iter().find(|m| m.key.phase == ExchangePhase::Combine).unwrap();
        assert_eq!(combine.bytes[0], 0, "{precision}: f32 in a group of one");
    }
}

/// Replays rank 0 of a recorded EP 2 run on its own, with the messages from rank 1 taken
/// from the record, `tamper` applied to the one of `phase`.
struct Replay {
    log: Vec<Sent>,
    phase: ExchangePhase,
    tamper: Tamper,
}

/// Changes the messages rank 0 receives.
type Tamper = fn(&mut Vec<Vec<u8>>);

impl ExpertExchange for Replay {
    fn group_size(&self) -> usize {
        2
    }

    fn group_rank(&self) -> usize {
        0
    }

    fn exchange(&mut self, key: ExchangeKey, outgoing: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ModelError> {
        let from_1 =
            self.log.iter().find(|m| m.key == key && m.src == 1 && m.dst == 0).unwrap().bytes.clone();
        let mut incoming = vec![outgoing.into_iter().next().unwrap(), from_1];
        if key.phase == self.phase {
            (self.tamper)(&mut incoming);
        }
        Ok(incoming)
    }
}

fn counts_of(bytes: &[u8], experts: usize) -> Vec<u32> {
    bytes[1..1 + 4 * experts].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
}

fn set_counts(bytes: &mut [u8], counts: &[u32]) {
    for (i, c) in counts.iter().enumerate() {
        bytes[1 + 4 * i..5 + 4 * i].copy_from_slice(&c.to_le_bytes());
    }
}

/// Moves one row from the first expert with rows to the next one: the body's length
/// still matches, the counts do not.
fn shift_a_row(bytes: &mut [u8]) {
    let mut counts = counts_of(bytes, 8);
    let i = counts.iter().position(|&c| c > 0).expect("a row");
    counts[i] -= 1;
    counts[(i + 1) % 8] += 1;
    set_counts(bytes, &counts);
}

#[test]
fn malformed_messages_are_errors_naming_the_source() {
    let inputs = inputs(2, FEW, 600);
    let hub = Hub::new(2);
    run_ep(Precision::Fp32, &random_bias(), &inputs, &hub);
    let log = hub.log();
    // Rank 1 sends rank 0 rows in every phase (random routing over 16 experts).
    assert!(log.iter().filter(|m| m.src == 1 && m.dst == 0).all(|m| !m.bytes.is_empty()));
    let cases: [(ExchangePhase, Tamper, &[&str]); 9] = [
        (ExchangePhase::Dispatch, |m| _ = m[1].pop(), &["Dispatch", "rank 1", "body bytes"]),
        (ExchangePhase::Dispatch, |m| m[1].truncate(7), &["Dispatch", "rank 1", "header"]),
        (ExchangePhase::Dispatch, |m| m[1][0] = 9, &["Dispatch", "rank 1", "format tag 9"]),
        (ExchangePhase::Dispatch, |m| m[1][0] = 2, &["Dispatch", "rank 1", "BF16"]),
        (
            ExchangePhase::Dispatch,
            |m| {
                let mut c = counts_of(&m[1], 8);
                c[0] += 1;
                set_counts(&mut m[1], &c);
            },
            &["Dispatch", "rank 1", "body bytes"],
        ),
        (ExchangePhase::Combine, |m| shift_a_row(&mut m[1]), &["Combine", "rank 1", "rows per expert"]),
        (ExchangePhase::Combine, |m| m[1].clear(), &["Combine", "rank 1", "rows per expert"]),
        (
            ExchangePhase::BackwardDispatch,
            |m| shift_a_row(&mut m[1]),
            &["BackwardDispatch", "rank 1", "rows per expert"],
        ),
        (ExchangePhase::BackwardCombine, |m| drop(m.pop()), &["BackwardCombine", "1 messages", "group of 2"]),
    ];
    for (phase, tamper, words) in cases {
        let mut replay = Replay { log: log.clone(), phase, tamper };
        let layer = layer(ExpertShard { rank: 0, size: 2 }, Precision::Fp32, &random_bias());
        let err =
            run_rank(layer, &inputs[0].0, &inputs[0].1, &mut replay).err().expect("an error").to_string();
        for w in words.iter().chain(&[PREFIX]) {
            assert!(err.contains(w), "{phase:?}: `{err}` should name `{w}`");
        }
    }
    // Untampered, the replay reproduces rank 0's run.
    let mut replay = Replay { log, phase: ExchangePhase::Dispatch, tamper: |_| {} };
    let layer = layer(ExpertShard { rank: 0, size: 2 }, Precision::Fp32, &random_bias());
    run_rank(layer, &inputs[0].0, &inputs[0].1, &mut replay).unwrap();
}

/// FP8 messages: a NaN code or a non-positive scale is refused.
#[test]
fn malformed_fp8_messages_are_refused() {
    let inputs = inputs(2, FEW, 700);
    let hub = Hub::new(2);
    run_ep(Precision::Fp8, &random_bias(), &inputs, &hub);
    let log = hub.log();
    let cases: [(Tamper, &str); 2] = [
        (|m| m[1][1 + 4 * 8] = 0x7F, "NaN"),
        (
            |m| {
                let n = m[1].len();
                m[1][n - 4..].copy_from_slice(&(-1f32).to_le_bytes());
            },
            "scale",
        ),
    ];
    for (tamper, word) in cases {
        let mut replay = Replay { log: log.clone(), phase: ExchangePhase::Dispatch, tamper };
        let layer = layer(ExpertShard { rank: 0, size: 2 }, Precision::Fp8, &random_bias());
        let err =
            run_rank(layer, &inputs[0].0, &inputs[0].1, &mut replay).err().expect("an error").to_string();
        assert!(err.contains(word) && err.contains("rank 1"), "{err}");
    }
}

#[test]
fn shards_hold_the_full_layers_experts() {
    let full = layer(ExpertShard::FULL, Precision::Fp32, &random_bias());
    assert_eq!(full.expert_range(), 0..16);
    assert_eq!(full.layer(), LAYER);
    for size in [1, 2, 4, 8, 16] {
        for rank in 0..size {
            let shard = layer(ExpertShard { rank, size }, Precision::Fp32, &random_bias());
            let per = 16 / size;
            assert_eq!(shard.expert_range(), rank * per..(rank + 1) * per);
            assert_eq!(shard.experts, full.experts[rank * per..(rank + 1) * per]);
            assert_eq!((&shard.gate, &shard.shared_experts), (&full.gate, &full.shared_experts));
            // gate, bias, 3 shared, 3 per local expert.
            assert_eq!(shard.params().len(), 2 + 3 + 3 * per);
        }
    }
}

#[test]
fn ep_degree_must_divide_the_routed_experts() {
    let cfg = config();
    for size in [3, 5, 32] {
        let err =
            MoeLayer::<f32>::new_sharded(&cfg, PREFIX, SEED, ExpertShard { rank: 0, size }).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("n_routed_experts") && text.contains(&format!("EP degree {size}")), "{text}");
        let rope = flotilla_model::mla::Mla::<f32>::rope_table(&cfg).unwrap();
        let block = Block::new_sharded(&cfg, LAYER, true, SEED, false, rope, ExpertShard { rank: 0, size });
        assert!(block.unwrap_err().to_string().contains("n_routed_experts"));
    }
    let err = MoeLayer::<f32>::new_sharded(&cfg, PREFIX, SEED, ExpertShard { rank: 2, size: 2 }).unwrap_err();
    assert!(err.to_string().contains("EP rank 2"), "{err}");
    assert!(MoeLayer::<f32>::new_sharded(&cfg, PREFIX, SEED, ExpertShard { rank: 0, size: 0 }).is_err());
    // The exchange must be the layer's group.
    let l = layer(ExpertShard { rank: 1, size: 2 }, Precision::Fp32, &random_bias());
    let (x, dy) = &inputs(1, FEW, 800)[0];
    let err = run_rank(l, x, dy, &mut LocalExchange).err().expect("an error").to_string();
    assert!(err.contains("rank 0 of 1") && err.contains("shard 1 of 2"), "{err}");
}
