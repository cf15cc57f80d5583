//! The attention core of Multi-head Latent Attention (MLA), after the projections: causal
//! softmax attention per head with separate query/key and value head dims, forward and
//! backward, on plain row-major buffers.
//!
//! ## Shapes ([`AttentionShape`])
//! `q`, `k`: `[batch, seq, heads, qk_dim]`; `v`, `o`: `[batch, seq, heads, v_dim]`;
//! `lse`: `[batch, heads, seq]`. DeepSeek-V3: `qk_dim` 192 (128 nope + 64 rope), `v_dim` 128,
//! 128 heads. For query `i` of a sequence,
//!
//! ```text
//! s_ij = softmax_scale · q_i·k_j   (j ≤ i),   P_ij = exp(s_ij − lse_i),   o_i = Σ_j P_ij v_j
//! lse_i = log Σ_{j ≤ i} exp(s_ij)
//! ```
//!
//! `softmax_scale` is the caller's: `qk_dim^−½` in DeepSeek, times
//! [`crate::rope::RopeTable::softmax_scale_multiplier`] under YaRN. MLA shares one rope key
//! between all heads; this core takes per-head keys, so the caller writes `k` as
//! `[k_nope_h | k_rope]` for every head (as DeepSeek's "naive" path does) and reduces the
//! rope part of `dk` over heads for the shared key's gradient.
//!
//! ## What forward saves: the log-sum-exp, not the probabilities
//! Backward needs `P`; storing it costs `batch·heads·seq²` elements (for 128 heads at seq
//! 4096, 2 G elements per sequence and layer, far more than q, k, v together), so the
//! forward saves only `lse` (`batch·heads·seq`, as FlashAttention does) and backward
//! recomputes `P_ij = exp(s_ij − lse_i)` from `q` and `k`, one extra `QKᵀ` GEMM.
//!
//! ## Backward
//! With `D_i = Σ_d do_id·o_id` (= `Σ_j P_ij dP_ij`) and `dP = do·Vᵀ`:
//! `dV = Pᵀ·do`, `dS_ij = P_ij (dP_ij − D_i)`, `dQ = scale·dS·K`, `dK = scale·dSᵀ·Q`.
//!
//! ## Computation and determinism
//! Work is split over independent `(batch, head)` pairs, each computed by one rayon task
//! with single-threaded GEMMs into buffers of its own, then copied into place; so no
//! result depends on the number of threads. Inside a task, query rows go in blocks of
//! [`BLOCK`]: a block of rows `r0..r1` only meets keys `0..r1`, so the GEMMs skip most of
//! the masked upper triangle, and `dK`, `dV` accumulate over blocks in block order. The
//! softmax subtracts each row's max before exponentiating, so it never overflows. All
//! arithmetic is in `T` (f32 for training, f64 for finite-difference tests).
//!
//! ## Invariants
//! No function panics or reads outside a buffer on bad input: every length and the scale
//! are checked before any data is touched, and each failure is a [`KernelError`] naming
//! the buffer or parameter at fault. Outputs are overwritten, never accumulated into.

use crate::KernelError;
use crate::gemm::{MatMut, MatRef};
use num_traits::Float;
use rayon::prelude::*;

/// Query rows per block inside a `(batch, head)` task.
pub const BLOCK: usize = 64;

/// The element types the attention core runs in: the dense GEMM's (f32 and f64).
pub use crate::gemm::GemmFloat as AttentionFloat;

/// The dimensions of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Query/key head dim (nope + rope).
    pub qk_dim: usize,
    /// Value head dim.
    pub v_dim: usize,
}

impl AttentionShape {
    /// Checks that `tensor` holds `batch·seq·heads` rows of `last` elements; a size that
    /// overflows `usize` is an invalid shape.
    fn check(&self, tensor: &'static str, last: usize, len: usize) -> Result<(), KernelError> {
        let rows =
            self.batch.checked_mul(self.seq).and_then(|r| r.checked_mul(self.heads)).ok_or_else(|| {
                KernelError::InvalidShape {
                    tensor,
                    detail: format!("{} × {} × {} overflows usize", self.batch, self.seq, self.heads),
                }
            })?;
        crate::check_matrix_len(tensor, rows, last, len)
    }

    /// Checks the buffers both directions read: `q`, `k`, `v`, `o` and `lse`.
    fn check_operands(&self, q: usize, k: usize, v: usize, o: usize, lse: usize) -> Result<(), KernelError> {
        self.check("q", self.qk_dim, q)?;
        self.check("k", self.qk_dim, k)?;
        self.check("v", self.v_dim, v)?;
        self.check("o", self.v_dim, o)?;
        self.check("lse", 1, lse)
    }
}

fn check_scale<T: Float>(softmax_scale: T) -> Result<(), KernelError> {
    if !softmax_scale.is_finite() {
        return Err(KernelError::InvalidParameter { name: "softmax_scale", detail: "must be finite".into() });
    }
    Ok(())
}

/// Causal attention forward: writes `o` `[batch, seq, heads, v_dim]` and the per-row
/// log-sum-exp `lse` `[batch, heads, seq]` that [`attention_backward`] needs.
///
/// Errors: [`KernelError::LengthMismatch`] naming the buffer whose length disagrees with
/// `shape`, [`KernelError::InvalidShape`] when the shape's sizes overflow,
/// [`KernelError::InvalidParameter`] for a non-finite `softmax_scale`.
pub fn attention_forward<T: AttentionFloat>(
    o: &mut [T],
    lse: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    shape: AttentionShape,
    softmax_scale: T,
) -> Result<(), KernelError> {
    let AttentionShape { batch, seq, heads, v_dim, .. } = shape;
    shape.check_operands(q.len(), k.len(), v.len(), o.len(), lse.len())?;
    check_scale(softmax_scale)?;
    if batch == 0 || seq == 0 || heads == 0 {
        return Ok(());
    }

    let results: Vec<Result<HeadOutput<T>, KernelError>> = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let heads_view = HeadViews { shape, b, h };
            forward_head(heads_view, q, k, v, softmax_scale)
        })
        .collect();

    // Copy each head's rows into place, one sequence per task (disjoint chunks of `o`).
    let mut per_head = Vec::with_capacity(results.len());
    for r in results {
        per_head.push(r?);
    }
    let seq_elems = seq * heads * v_dim;
    o.par_chunks_exact_mut(seq_elems.max(1)).enumerate().for_each(|(b, o_b)| {
        for h in 0..heads {
            scatter_rows(o_b, &per_head[b * heads + h].o, h, heads, v_dim);
        }
    });
    for (bh, head) in per_head.iter().enumerate() {
        lse[bh * seq..(bh + 1) * seq].copy_from_slice(&head.lse);
    }
    Ok(())
}

/// Causal attention backward: from `d_o` (`[batch, seq, heads, v_dim]`) and the forward's
/// inputs `q`, `k`, `v`, output `o` and `lse`, writes `dq`, `dk` (`[batch, seq, heads,
/// qk_dim]`) and `dv` (`[batch, seq, heads, v_dim]`), overwriting them.
///
/// Errors as [`attention_forward`], naming the buffer at fault.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: AttentionFloat>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    d_o: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    shape: AttentionShape,
    softmax_scale: T,
) -> Result<(), KernelError> {
    let AttentionShape { batch, seq, heads, qk_dim, v_dim } = shape;
    shape.check_operands(q.len(), k.len(), v.len(), o.len(), lse.len())?;
    shape.check("d_o", v_dim, d_o.len())?;
    shape.check("dq", qk_dim, dq.len())?;
    shape.check("dk", qk_dim, dk.len())?;
    shape.check("dv", v_dim, dv.len())?;
    check_scale(softmax_scale)?;
    if batch == 0 || seq == 0 || heads == 0 {
        return Ok(());
    }

    let results: Vec<Result<HeadGrads<T>, KernelError>> = (0..batch * heads)
        .into_par_iter()
        .map(|bh| {
            let (b, h) = (bh / heads, bh % heads);
            let lse_bh = &lse[bh * seq..(bh + 1) * seq];
            backward_head(HeadViews { shape, b, h }, d_o, q, k, v, o, lse_bh, softmax_scale)
        })
        .collect();
    let mut per_head = Vec::with_capacity(results.len());
    for r in results {
        per_head.push(r?);
    }

    let qk_elems = (seq * heads * qk_dim).max(1);
    let v_elems = (seq * heads * v_dim).max(1);
    dq.par_chunks_exact_mut(qk_elems)
        .zip(dk.par_chunks_exact_mut(qk_elems))
        .zip(dv.par_chunks_exact_mut(v_elems))
        .enumerate()
        .for_each(|(b, ((dq_b, dk_b), dv_b))| {
            for h in 0..heads {
                let g = &per_head[b * heads + h];
                scatter_rows(dq_b, &g.dq, h, heads, qk_dim);
                scatter_rows(dk_b, &g.dk, h, heads, qk_dim);
                scatter_rows(dv_b, &g.dv, h, heads, v_dim);
            }
        });
    Ok(())
}

/// Copies a head's contiguous `[seq, dim]` rows into head `h` of a `[seq, heads, dim]`
/// sequence.
fn scatter_rows<T: Copy>(dst: &mut [T], src: &[T], h: usize, heads: usize, dim: usize) {
    if dim == 0 {
        return;
    }
    for (row, s) in dst.chunks_exact_mut(heads * dim).zip(src.chunks_exact(dim)) {
        row[h * dim..(h + 1) * dim].copy_from_slice(s);
    }
}

/// Addresses the rows of one `(batch, head)` pair in the `[batch, seq, heads, dim]` inputs.
#[derive(Clone, Copy)]
struct HeadViews {
    shape: AttentionShape,
    b: usize,
    h: usize,
}

impl HeadViews {
    /// Rows `0..rows` of this head in a `[batch, seq, heads, dim]` buffer, as a strided
    /// `rows × dim` view (bounds checked by the view constructor).
    fn rows<'a, T>(
        &self,
        data: &'a [T],
        start: usize,
        rows: usize,
        dim: usize,
        name: &'static str,
    ) -> Result<MatRef<'a, T>, KernelError> {
        let AttentionShape { seq, heads, .. } = self.shape;
        let first = ((self.b * seq + start) * heads + self.h) * dim;
        let data = data.get(first..).unwrap_or(&[]);
        MatRef::new(data, rows, dim, (heads * dim) as isize, 1, name)
    }

    /// Element `d` of row `i` of this head.
    fn at<T: Copy>(&self, data: &[T], i: usize, dim: usize, d: usize) -> T {
        let AttentionShape { seq, heads, .. } = self.shape;
        data[((self.b * seq + i) * heads + self.h) * dim + d]
    }
}

/// `C = alpha·A·B` (`accumulate == false`, `C` not read) or `C = C + alpha·A·B`, on one
/// thread. `c` is a contiguous row-major `m × n` buffer.
fn matmul<T: AttentionFloat>(
    c: &mut [T],
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
    accumulate: bool,
) -> Result<(), KernelError> {
    let (m, n) = (a.rows(), b.cols());
    let c = MatMut::row_major(c, m, n, "attention scratch")?;
    let beta = if accumulate { T::one() } else { T::zero() };
    // One thread: the caller already runs one task per (batch, head).
    crate::gemm::matmul(c, beta, a, b, alpha, 1)
}

/// The forward results of one `(batch, head)`.
struct HeadOutput<T> {
    /// Output rows, `[seq, v_dim]` contiguous.
    o: Vec<T>,
    /// Log-sum-exp per query row, `[seq]`.
    lse: Vec<T>,
}

/// Forward of one `(batch, head)`.
fn forward_head<T: AttentionFloat>(
    views: HeadViews,
    q: &[T],
    k: &[T],
    v: &[T],
    scale: T,
) -> Result<HeadOutput<T>, KernelError> {
    let AttentionShape { seq, qk_dim, v_dim, .. } = views.shape;
    let mut o = vec![T::zero(); seq * v_dim];
    let mut lse = vec![T::zero(); seq];
    let mut s = vec![T::zero(); BLOCK.min(seq) * seq];
    for r0 in (0..seq).step_by(BLOCK) {
        let r1 = (r0 + BLOCK).min(seq);
        let rb = r1 - r0;
        let s = &mut s[..rb * r1];
        // S = scale·Q[r0..r1]·K[0..r1]ᵀ: keys past r1 are masked for every row of the block.
        let q_blk = views.rows(q, r0, rb, qk_dim, "q")?;
        let k_pre = views.rows(k, 0, r1, qk_dim, "k")?;
        matmul(s, q_blk, k_pre.t(), scale, false)?;
        for (li, row) in s.chunks_exact_mut(r1).enumerate() {
            let i = r0 + li;
            let (live, masked) = row.split_at_mut(i + 1);
            let max = live.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
            let mut sum = T::zero();
            for x in live.iter_mut() {
                *x = (*x - max).exp();
                sum = sum + *x;
            }
            // sum ≥ 1 (the max's own term), so the division and log are safe.
            for x in live.iter_mut() {
                *x = *x / sum;
            }
            masked.iter_mut().for_each(|x| *x = T::zero());
            lse[i] = max + sum.ln();
        }
        // O[r0..r1] = P·V[0..r1].
        let p = MatRef::row_major(&*s, rb, r1, "p")?;
        let v_pre = views.rows(v, 0, r1, v_dim, "v")?;
        matmul(&mut o[r0 * v_dim..r1 * v_dim], p, v_pre, T::one(), false)?;
    }
    Ok(HeadOutput { o, lse })
}

/// The gradients of one `(batch, head)`, each `[seq, dim]` contiguous.
struct HeadGrads<T> {
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

#[allow(clippy::too_many_arguments)]
fn backward_head<T: AttentionFloat>(
    views: HeadViews,
    d_o: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    scale: T,
) -> Result<HeadGrads<T>, KernelError> {
    let AttentionShape { seq, qk_dim, v_dim, .. } = views.shape;
    // D_i = do_i·o_i, in a fixed order.
    let delta: Vec<T> = (0..seq)
        .map(|i| {
            (0..v_dim).fold(T::zero(), |acc, d| acc + views.at(d_o, i, v_dim, d) * views.at(o, i, v_dim, d))
        })
        .collect();
    let mut dq = vec![T::zero(); seq * qk_dim];
    let mut dk = vec![T::zero(); seq * qk_dim];
    let mut dv = vec![T::zero(); seq * v_dim];
    let cap = BLOCK.min(seq) * seq;
    let (mut p, mut dp) = (vec![T::zero(); cap], vec![T::zero(); cap]);
    for r0 in (0..seq).step_by(BLOCK) {
        let r1 = (r0 + BLOCK).min(seq);
        let rb = r1 - r0;
        let (p, dp) = (&mut p[..rb * r1], &mut dp[..rb * r1]);
        let q_blk = views.rows(q, r0, rb, qk_dim, "q")?;
        let k_pre = views.rows(k, 0, r1, qk_dim, "k")?;
        let v_pre = views.rows(v, 0, r1, v_dim, "v")?;
        let do_blk = views.rows(d_o, r0, rb, v_dim, "d_o")?;

        // Recompute P = exp(scale·Q·Kᵀ − lse) with the causal mask.
        matmul(p, q_blk, k_pre.t(), scale, false)?;
        for (li, row) in p.chunks_exact_mut(r1).enumerate() {
            let i = r0 + li;
            let (live, masked) = row.split_at_mut(i + 1);
            live.iter_mut().for_each(|x| *x = (*x - lse[i]).exp());
            masked.iter_mut().for_each(|x| *x = T::zero());
        }
        // dV[0..r1] += Pᵀ·do.
        let p_ref = MatRef::row_major(&*p, rb, r1, "p")?;
        matmul(&mut dv[..r1 * v_dim], p_ref.t(), do_blk, T::one(), true)?;
        // dP = do·Vᵀ, then dS = P ∘ (dP − D) in place (0 where masked, since P is).
        matmul(dp, do_blk, v_pre.t(), T::one(), false)?;
        for (li, (ds_row, p_row)) in dp.chunks_exact_mut(r1).zip(p.chunks_exact(r1)).enumerate() {
            let d_i = delta[r0 + li];
            for (ds, &pij) in ds_row.iter_mut().zip(p_row) {
                *ds = pij * (*ds - d_i);
            }
        }
        let ds = MatRef::row_major(&*dp, rb, r1, "ds")?;
        // dQ[r0..r1] = scale·dS·K[0..r1];  dK[0..r1] += scale·dSᵀ·Q[r0..r1].
        matmul(&mut dq[r0 * qk_dim..r1 * qk_dim], ds, k_pre, scale, false)?;
        matmul(&mut dk[..r1 * qk_dim], ds.t(), q_blk, scale, true)?;
    }
    Ok(HeadGrads { dq, dk, dv })
}
