//! Dense GEMMs over strided views, `C = alpha·A·B + beta·C`: f32 on the `gemm` crate's
//! kernels (AVX-512 or AVX2/FMA, picked at run time), and BF16 inputs widened to f32.
//!
//! Strides pass straight through to the `gemm` crate, so the backward GEMMs of a linear
//! layer `Y = X·W` read their operands where they lie: `dX = dY·Wᵀ` is
//! `gemm_f32(dx, 0.0, dy, w.t(), 1.0, t)` and `dW = Xᵀ·dY` is
//! `gemm_f32(dw, 0.0, x.t(), dy, 1.0, t)`, with no transpose copy.
//!
//! BLAS conventions for the scalars: `beta == 0` means `C` is not read (NaN or garbage in
//! it does not propagate), and `alpha == 0` or `K == 0` means `A` and `B` are not read and
//! the call reduces to `C = beta·C`.

use super::view::{MatMut, MatRef, offset};
use super::{GemmFloat, check_threads, run_tasks};
use crate::KernelError;
use half::bf16;

/// `C = alpha·A·B + beta·C` in f32, for `A: m×k`, `B: k×n`, `C: m×n`, each with its own
/// strides: [`matmul`] for f32, the name the rest of the crate uses.
pub fn gemm_f32(
    c: MatMut<'_, f32>,
    beta: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    alpha: f32,
    threads: usize,
) -> Result<(), KernelError> {
    matmul(c, beta, a, b, alpha, threads)
}

/// `C = alpha·A·B + beta·C` for `A: m×k`, `B: k×n`, `C: m×n`, each with its own strides,
/// in f32 (training) or f64 (the references gradient checks compare against).
///
/// - `beta == 0`: `C` is written without being read, so NaN in it does not propagate.
/// - `alpha == 0` or `k == 0`: `A` and `B` are not read; `C = beta·C` (zeros when
///   `beta == 0`).
/// - `threads`: at most this many rayon workers of the current pool compute the product
///   (1 runs on the calling thread); 0 is an error. The result does not depend on it.
///
/// Errors: [`KernelError::ShapeMismatch`] when the dimensions disagree,
/// [`KernelError::InvalidParameter`] for `threads == 0`.
pub fn matmul<T: GemmFloat>(
    c: MatMut<'_, T>,
    beta: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
    threads: usize,
) -> Result<(), KernelError> {
    check_threads(threads)?;
    gemm_with(c, beta, a, b, alpha, parallelism(threads))
}

/// `C = alpha·A·B + beta·C` with BF16 `A` and `B` and an f32 `C`, accumulated in f32.
///
/// The `gemm` crate has no BF16 kernel, so `A` and `B` are first widened into contiguous
/// f32 copies (in the order of their smaller stride, so a transposed view is read
/// sequentially), then multiplied by [`gemm_f32`]. Widening is exact, so the result is
/// that of `gemm_f32` on the widened inputs; it costs `O(mk + kn)` against the
/// product's `O(mnk)`. Same conventions and errors as [`gemm_f32`].
pub fn gemm_bf16(
    c: MatMut<'_, f32>,
    beta: f32,
    a: MatRef<'_, bf16>,
    b: MatRef<'_, bf16>,
    alpha: f32,
    threads: usize,
) -> Result<(), KernelError> {
    check_threads(threads)?;
    check_shapes(&c, &a, &b)?;
    if alpha == 0.0 || a.cols() == 0 {
        // Nothing of A or B is read, so skip the copies.
        let (a, b) =
            (MatRef::new(&[], a.rows(), 0, 0, 0, a.name())?, MatRef::new(&[], 0, b.cols(), 0, 0, b.name())?);
        return gemm_with(c, beta, a, b, 0.0, parallelism(threads));
    }
    let a_buf = widen(a, threads)?;
    let b_buf = widen(b, threads)?;
    let a32 = widened_view(a, &a_buf)?;
    let b32 = widened_view(b, &b_buf)?;
    gemm_with(c, beta, a32, b32, alpha, parallelism(threads))
}

fn parallelism(threads: usize) -> gemm::Parallelism {
    if threads <= 1 { gemm::Parallelism::None } else { gemm::Parallelism::Rayon(threads) }
}

fn check_shapes<C, A, B>(c: &MatMut<'_, C>, a: &MatRef<'_, A>, b: &MatRef<'_, B>) -> Result<(), KernelError> {
    if a.rows() != c.rows() || b.cols() != c.cols() || a.cols() != b.rows() {
        return Err(KernelError::ShapeMismatch {
            detail: format!(
                "C = A·B with `{}` {}×{}, `{}` {}×{}, `{}` {}×{} (need A m×k, B k×n, C m×n)",
                c.name(),
                c.rows(),
                c.cols(),
                a.name(),
                a.rows(),
                a.cols(),
                b.name(),
                b.rows(),
                b.cols()
            ),
        });
    }
    Ok(())
}

/// Strides as handed to the `gemm` crate. Along a dimension of extent ≤ 1 a stride
/// addresses nothing and the views accept any value, but the crate negates and takes
/// the absolute value of strides (which overflows for `isize::MIN`): pass 0 there.
fn kernel_strides(rows: usize, cols: usize, row_stride: isize, col_stride: isize) -> (isize, isize) {
    (if rows <= 1 { 0 } else { row_stride }, if cols <= 1 { 0 } else { col_stride })
}

/// The one call into the `gemm` crate; every dense product in this crate goes through it.
pub(crate) fn gemm_with<T: GemmFloat>(
    mut c: MatMut<'_, T>,
    beta: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    alpha: T,
    parallelism: gemm::Parallelism,
) -> Result<(), KernelError> {
    check_shapes(&c, &a, &b)?;
    let (m, n, k) = (c.rows(), c.cols(), a.cols());
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 || alpha == T::zero() {
        if beta == T::zero() {
            c.for_each_mut(|x| *x = T::zero());
        } else if beta != T::one() {
            c.for_each_mut(|x| *x = *x * beta);
        }
        return Ok(());
    }
    let (c_rs, c_cs) = kernel_strides(m, n, c.row_stride(), c.col_stride());
    let (a_rs, a_cs) = kernel_strides(m, k, a.row_stride(), a.col_stride());
    let (b_rs, b_cs) = kernel_strides(k, n, b.row_stride(), b.col_stride());
    // SAFETY: the crate addresses exactly `dst + i·c_rs + j·c_cs` for i < m, j < n (and
    // likewise for lhs over m×k and rhs over k×n). The view constructors proved those
    // offsets lie inside each buffer (zeroed strides only replace ones multiplied by 0),
    // the shapes were checked above, `c` is borrowed mutably so nothing else reads or
    // writes it, and `MatMut` guarantees no two of its elements alias, so concurrent
    // writes by the crate's threads touch distinct elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs,
            c_rs,
            // The crate computes dst = alpha·dst + beta·lhs·rhs: its alpha is our beta.
            beta != T::zero(),
            a.data().as_ptr(),
            a_cs,
            a_rs,
            b.data().as_ptr(),
            b_cs,
            b_rs,
            beta,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// Elements below which widening stays on the calling thread.
const PARALLEL_WIDEN_MIN: usize = 1 << 16;

/// Copies a BF16 view into a contiguous f32 buffer: row-major when its column stride is
/// the smaller one, column-major otherwise (so the source is read along its short stride).
fn widen(x: MatRef<'_, bf16>, threads: usize) -> Result<Vec<f32>, KernelError> {
    let (rows, cols) = (x.rows(), x.cols());
    let row_major = x.col_stride().unsigned_abs() <= x.row_stride().unsigned_abs();
    // Lines are what the output stores contiguously: rows or columns.
    let (len, line_stride, elem_stride) = if row_major {
        (cols, x.row_stride(), x.col_stride())
    } else {
        (rows, x.col_stride(), x.row_stride())
    };
    let mut out = vec![0f32; rows * cols];
    if out.is_empty() {
        return Ok(out);
    }
    let data = x.data();
    let lines_per_task = (PARALLEL_WIDEN_MIN / len).max(1);
    let tasks = out.chunks_mut(lines_per_task * len).enumerate();
    let workers = if rows * cols < PARALLEL_WIDEN_MIN { 1 } else { threads };
    let widened = run_tasks(workers, tasks, |(t, chunk)| {
        for (l, dst) in chunk.chunks_mut(len).enumerate() {
            let line = t * lines_per_task + l;
            if elem_stride == 1 {
                let start = offset(line, 0, line_stride, 1);
                widen_contiguous(&data[start..start + len], dst);
            } else {
                for (e, d) in dst.iter_mut().enumerate() {
                    *d = bf16_to_f32(data[offset(line, e, line_stride, elem_stride)]);
                }
            }
        }
        Ok(())
    });
    // The tasks above cannot fail; `run_tasks` only propagates errors of its callback.
    widened.map(|()| out)
}

/// BF16 is the upper half of an f32, so widening is a shift (exact; NaN stays NaN).
#[inline(always)]
fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn widen_contiguous(src: &[bf16], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = bf16_to_f32(s);
    }
}

/// The view of a buffer filled by [`widen`] from `x`.
fn widened_view<'a>(x: MatRef<'_, bf16>, buf: &'a [f32]) -> Result<MatRef<'a, f32>, KernelError> {
    let (rows, cols) = (x.rows(), x.cols());
    if x.col_stride().unsigned_abs() <= x.row_stride().unsigned_abs() {
        MatRef::row_major(buf, rows, cols, x.name())
    } else {
        Ok(MatRef::row_major(buf, cols, rows, x.name())?.t())
    }
}
