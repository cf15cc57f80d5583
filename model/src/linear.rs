//! A bias-free linear layer in the HF layout: weight `[out, in]`, `y = x·Wᵀ`.
//!
//! Forward, and backward split as DualPipe needs it: [`Linear::backward_input`] (B,
//! `dx = dy·W`) runs on the critical path, [`Linear::backward_weight`] (W,
//! `dW += dyᵀ·x`) may run later. In [`Precision::Fp32`] all three are one dense GEMM each
//! over the caller's buffers, with no transpose copies; in [`Precision::Bf16`] and
//! [`Precision::Fp8`] they run as [`crate::precision`] describes (f32 layers only).

use crate::param::{Init, Param};
use crate::precision::{self, Precision};
use crate::{ModelError, Real, check_len};
use flotilla_kernels::gemm::{MatMut, MatRef, matmul};

/// `y = x·Wᵀ` with `W: [out_features, in_features]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Linear<T> {
    /// The weight, named `{prefix}.weight`.
    pub weight: Param<T>,
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
    /// The precision of the layer's three GEMMs (default [`Precision::Fp32`]); anything
    /// else needs `T = f32`.
    pub precision: Precision,
}

impl<T: Real> Linear<T> {
    /// A layer whose weight is `{prefix}.weight`, drawn from Normal(0, std) by `(seed, name)`.
    pub fn new(prefix: &str, in_features: usize, out_features: usize, std: f64, seed: u64) -> Self {
        let weight =
            Param::new(format!("{prefix}.weight"), &[out_features, in_features], Init::Normal { std }, seed);
        Linear { weight, in_features, out_features, precision: Precision::Fp32 }
    }

    /// Checks that the layer's precision can run on `T` (every precision on f32, only
    /// [`Precision::Fp32`] on f64).
    pub fn check_precision(&self) -> Result<(), ModelError> {
        check_precision::<T>(self.precision, &self.weight.name)
    }

    fn f32_of<'a>(&self, x: &'a [T]) -> Result<&'a [f32], ModelError> {
        T::as_f32_slice(x).ok_or_else(|| self.precision_error())
    }

    fn f32_of_mut<'a>(&self, x: &'a mut [T]) -> Result<&'a mut [f32], ModelError> {
        T::as_f32_slice_mut(x).ok_or_else(|| self.precision_error())
    }

    fn precision_error(&self) -> ModelError {
        check_precision::<T>(self.precision, &self.weight.name).expect_err("only f64 fails")
    }

    fn weight_view(&self) -> Result<MatRef<'_, T>, ModelError> {
        Ok(MatRef::row_major(&self.weight.value, self.out_features, self.in_features, "weight")?)
    }

    /// `y = x·Wᵀ` for `x: [rows, in]`, `y: [rows, out]` (overwritten).
    pub fn forward(&self, x: &[T], rows: usize, y: &mut [T], threads: usize) -> Result<(), ModelError> {
        check_len(&self.weight.name, "input", rows * self.in_features, x.len())?;
        check_len(&self.weight.name, "output", rows * self.out_features, y.len())?;
        if self.precision != Precision::Fp32 {
            let (x, w) = (self.f32_of(x)?, self.f32_of(&self.weight.value)?);
            let y = self.f32_of_mut(y)?;
            let (out_f, in_f) = (self.out_features, self.in_features);
            return precision::forward(self.precision, w, out_f, in_f, x, rows, y, threads);
        }
        matmul(
            MatMut::row_major(y, rows, self.out_features, "y")?,
            T::zero(),
            MatRef::row_major(x, rows, self.in_features, "x")?,
            self.weight_view()?.t(),
            T::one(),
            threads,
        )?;
        Ok(())
    }

    /// B: `dx = dy·W` (or `dx += dy·W` with `accumulate`), `dy: [rows, out]`, `dx: [rows, in]`.
    pub fn backward_input(
        &self,
        dy: &[T],
        rows: usize,
        dx: &mut [T],
        accumulate: bool,
        threads: usize,
    ) -> Result<(), ModelError> {
        check_len(&self.weight.name, "output gradient", rows * self.out_features, dy.len())?;
        check_len(&self.weight.name, "input gradient", rows * self.in_features, dx.len())?;
        if self.precision != Precision::Fp32 {
            let (dy, w) = (self.f32_of(dy)?, self.f32_of(&self.weight.value)?);
            let dx = self.f32_of_mut(dx)?;
            let (out_f, in_f) = (self.out_features, self.in_features);
            return precision::backward_input(
                self.precision,
                w,
                out_f,
                in_f,
                dy,
                rows,
                dx,
                accumulate,
                threads,
            );
        }
        matmul(
            MatMut::row_major(dx, rows, self.in_features, "dx")?,
            if accumulate { T::one() } else { T::zero() },
            MatRef::row_major(dy, rows, self.out_features, "dy")?,
            self.weight_view()?,
            T::one(),
            threads,
        )?;
        Ok(())
    }

    /// W: `grad += dyᵀ·x`; gradients accumulate over micro-batches until the optimizer
    /// step clears them.
    pub fn backward_weight(
        &mut self,
        dy: &[T],
        x: &[T],
        rows: usize,
        threads: usize,
    ) -> Result<(), ModelError> {
        check_len(&self.weight.name, "output gradient", rows * self.out_features, dy.len())?;
        check_len(&self.weight.name, "input", rows * self.in_features, x.len())?;
        if self.precision != Precision::Fp32 {
            let (dy, x) = (self.f32_of(dy)?, self.f32_of(x)?);
            let (p, out_f, in_f) = (self.precision, self.out_features, self.in_features);
            let grad = T::as_f32_slice_mut(&mut self.weight.grad)
                .ok_or_else(|| check_precision::<T>(p, &self.weight.name).expect_err("only f64 fails"))?;
            return precision::backward_weight(p, grad, out_f, in_f, dy, x, rows, threads);
        }
        matmul(
            MatMut::row_major(&mut self.weight.grad, self.out_features, self.in_features, "dW")?,
            T::one(),
            MatRef::row_major(dy, rows, self.out_features, "dy")?.t(),
            MatRef::row_major(x, rows, self.in_features, "x")?,
            T::one(),
            threads,
        )?;
        Ok(())
    }
}

/// Checks that `precision` can run on `T`: every precision on f32, only
/// [`Precision::Fp32`] on f64 (the BF16 and FP8 kernels are f32-only). `what` names the
/// layer or model in the error.
pub fn check_precision<T: Real>(precision: Precision, what: &str) -> Result<(), ModelError> {
    if precision == Precision::Fp32 || T::as_f32_slice(&[]).is_some() {
        return Ok(());
    }
    Err(ModelError::Tensor {
        tensor: what.to_string(),
        detail: format!(
            "precision {precision} runs on f32 only; a {}-byte float model (gradient checks) must use fp32",
            std::mem::size_of::<T>()
        ),
    })
}
