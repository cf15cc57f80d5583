//! The grouped FP8 GEMM of an MoE layer, over DeepGEMM's "contiguous" layout: the tokens
//! routed to every local expert are concatenated into one LHS `[M_total, k]`, and
//! `m_indices[r]` says which expert's weights row `r` uses (`-1`: a padding row that
//! belongs to no expert).
//!
//! Each maximal run of consecutive rows with the same expert is one GEMM against that
//! expert's `[n, k]` weights; padding rows are not computed and their output rows are
//! zero. On the CPU a run may start and end anywhere. DeepGEMM additionally requires each
//! expert's segment to start on a multiple of its block M (padding rows make it so); that
//! is the dispatcher's job on a GPU and is not checked here.
//!
//! A run is split into bands exactly as [`gemm_fp8`](super::gemm_fp8) would split the
//! same rows, so the grouped result equals per-expert calls on the runs bit for bit.

use super::check_threads;
use super::fp8::{Accumulation, GemmOutput, Lhs, Operand, check_k, check_operand, compute};
use crate::KernelError;
use crate::quant::Fp8Matrix;

/// `out[r] = a[r]·b[m_indices[r]]ᵀ` for every row `r` of `a` (`[M_total, k]`, 1×128
/// tiles), with `b` one `[n, k]` 128×128-block (or, as [`gemm_fp8`](super::gemm_fp8)
/// allows, 1×128-tiled) matrix per expert, all of one shape;
/// rows whose index is `-1` are skipped and their output rows set to zero. `out` is
/// row-major `[M_total, n]`, f32 or BF16.
///
/// Experts are processed one after another, each with all its bands and column tiles in
/// parallel; a task decodes only its own tile of the expert's weights, so no decoded copy
/// of a whole weight matrix is ever held.
///
/// Errors: those of [`gemm_fp8`](super::gemm_fp8) (with the expert's index for a bad
/// `b[e]`), no experts, experts of differing shapes, `m_indices` of the wrong length, an
/// index that is neither `-1` nor a valid expert (naming the row and the expert count).
pub fn grouped_gemm_fp8<O: GemmOutput>(
    a: &Fp8Matrix,
    b: &[Fp8Matrix],
    m_indices: &[i32],
    accumulation: Accumulation,
    out: &mut [O],
    threads: usize,
) -> Result<(), KernelError> {
    check_threads(threads)?;
    accumulation.validate()?;
    check_operand(a, Operand::Lhs)?;
    let first = b.first().ok_or_else(|| KernelError::InvalidShape {
        tensor: "rhs",
        detail: "no experts: the grouped GEMM needs at least one [n, k] weight matrix".into(),
    })?;
    for (e, expert) in b.iter().enumerate() {
        if (expert.rows, expert.cols) != (first.rows, first.cols) {
            return Err(KernelError::ShapeMismatch {
                detail: format!(
                    "experts must share one shape: rhs[{e}] is {}×{}, rhs[0] is {}×{}",
                    expert.rows, expert.cols, first.rows, first.cols
                ),
            });
        }
        check_operand(expert, Operand::Rhs(Some(e)))?;
    }
    check_k(a, first, Some(0))?;
    if m_indices.len() != a.rows {
        return Err(KernelError::LengthMismatch {
            tensor: "m_indices",
            expected: a.rows,
            actual: m_indices.len(),
        });
    }
    if let Some((row, &index)) =
        m_indices.iter().enumerate().find(|&(_, &e)| e < -1 || (e >= 0 && e as usize >= b.len()))
    {
        return Err(KernelError::InvalidParameter {
            name: "m_indices",
            detail: format!(
                "row {row} names expert {index}, but there are {} experts (valid: 0..{}, or -1 for padding)",
                b.len(),
                b.len()
            ),
        });
    }
    let n = first.rows;
    crate::check_matrix_len("out", a.rows, n, out.len())?;

    // Cut `out` into the runs' row ranges, zero the padding runs, and file the others
    // under their expert.
    let lhs = Lhs::of(a);
    let mut runs_of: Vec<Vec<(Lhs<'_>, &mut [O])>> = (0..b.len()).map(|_| Vec::new()).collect();
    let mut rest = out;
    let mut start = 0;
    while start < m_indices.len() {
        let expert = m_indices[start];
        let end =
            m_indices[start..].iter().position(|&e| e != expert).map_or(m_indices.len(), |len| start + len);
        let (run_out, tail) = rest.split_at_mut((end - start) * n);
        rest = tail;
        match usize::try_from(expert) {
            Ok(e) => runs_of[e].push((lhs.rows(start, end), run_out)),
            Err(_) => {
                let zeros = vec![0f32; run_out.len()];
                O::store(&zeros, run_out);
            }
        }
        start = end;
    }
    for (e, runs) in runs_of.into_iter().enumerate() {
        if runs.is_empty() {
            continue;
        }
        compute(runs, &b[e], accumulation, threads)?;
    }
    Ok(())
}
