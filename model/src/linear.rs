//! A bias-free linear layer in the HF layout: weight `[out, in]`, `y = x·Wᵀ`.
//!
//! Forward, and backward split as DualPipe needs it: [`Linear::backward_input`] (B,
//! `dx = dy·W`) runs on the critical path, [`Linear::backward_weight`] (W,
//! `dW += dyᵀ·x`) may run later. All three are one dense GEMM each over the caller's
//! buffers, with no transpose copies.

use crate::param::{Init, Param};
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
}

impl<T: Real> Linear<T> {
    /// A layer whose weight is `{prefix}.weight`, drawn from Normal(0, std) by `(seed, name)`.
    pub fn new(prefix: &str, in_features: usize, out_features: usize, std: f64, seed: u64) -> Self {
        let weight =
            Param::new(format!("{prefix}.weight"), &[out_features, in_features], Init::Normal { std }, seed);
        Linear { weight, in_features, out_features }
    }

    fn weight_view(&self) -> Result<MatRef<'_, T>, ModelError> {
        Ok(MatRef::row_major(&self.weight.value, self.out_features, self.in_features, "weight")?)
    }

    /// `y = x·Wᵀ` for `x: [rows, in]`, `y: [rows, out]` (overwritten).
    pub fn forward(&self, x: &[T], rows: usize, y: &mut [T], threads: usize) -> Result<(), ModelError> {
        check_len(&self.weight.name, "input", rows * self.in_features, x.len())?;
        check_len(&self.weight.name, "output", rows * self.out_features, y.len())?;
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
