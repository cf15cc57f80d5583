//! The RMSNorm layer: a named weight over the backend's RMSNorm ([`Backend::rms_norm_forward`]).
//!
//! `y[r, j] = x[r, j] · rstd[r] · weight[j]`, `rstd[r] = 1 / sqrt(mean_j x[r, j]² + eps)`.
//! The weight is `{prefix}.weight` (HF: `model.layers.{i}.input_layernorm.weight`,
//! `….self_attn.kv_a_layernorm.weight`, …), initialized to 1.
//!
//! Forward saves only the per-row `rstd` ([`RmsNormCache`]); neither backward reads the
//! output, and the input `x` stays with the caller, who passes it to both backward passes
//! (as [`crate::linear::Linear::backward_weight`] takes its input). Backward is split as
//! DualPipe needs it: [`RmsNorm::backward_input`] (B) and [`RmsNorm::backward_weight`] (W,
//! accumulating into [`Param::grad`]). Rerunning [`RmsNorm::forward`] on the same input
//! reproduces the output and `rstd` bit for bit, which is what recomputation relies on.

use crate::param::{Init, Param};
use crate::{ModelError, Real, check_len};
use flotilla_kernels::backend::{Backend, DeviceBackend};

/// RMSNorm over rows of width `dim`, with a learned per-channel weight.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNorm<T> {
    /// The weight, `[dim]`, named `{prefix}.weight`.
    pub weight: Param<T>,
    /// Added to the mean square before the square root (DeepSeek-V3: 1e-6); finite, > 0.
    pub eps: f64,
    /// The backend it runs on (default the CPU's).
    pub backend: DeviceBackend,
}

/// What forward keeps for backward: one `rstd` per row.
#[derive(Clone, Debug, PartialEq)]
pub struct RmsNormCache<T> {
    /// Rows of the call.
    pub rows: usize,
    /// `1 / sqrt(mean x² + eps)` per row, `[rows]`.
    pub rstd: Vec<T>,
}

impl<T: Real> RmsNorm<T> {
    /// A norm of width `dim` whose weight `{prefix}.weight` starts at 1.
    pub fn new(prefix: &str, dim: usize, eps: f64) -> Self {
        // A constant initialization draws nothing, so the seed is irrelevant.
        let weight = Param::new(format!("{prefix}.weight"), &[dim], Init::Constant(1.0), 0);
        RmsNorm { weight, eps, backend: DeviceBackend::default() }
    }

    /// Row width.
    pub fn dim(&self) -> usize {
        self.weight.len()
    }

    fn eps(&self) -> Result<T, ModelError> {
        T::from(self.eps).ok_or_else(|| ModelError::Tensor {
            tensor: self.weight.name.clone(),
            detail: format!("eps {} does not convert to the element type", self.eps),
        })
    }

    /// `y = x · rstd · weight` for `x`, `y`: `[rows, dim]` (`y` overwritten).
    pub fn forward(&self, x: &[T], rows: usize, y: &mut [T]) -> Result<RmsNormCache<T>, ModelError> {
        let n = rows.checked_mul(self.dim()).ok_or_else(|| self.overflow(rows))?;
        check_len(&self.weight.name, "input", n, x.len())?;
        check_len(&self.weight.name, "output", n, y.len())?;
        let mut rstd = vec![T::zero(); rows];
        self.backend.rms_norm_forward(
            x,
            self.weight.value.host(),
            self.eps()?,
            rows,
            self.dim(),
            y,
            &mut rstd,
        )?;
        Ok(RmsNormCache { rows, rstd })
    }

    /// B: `dx` from `dy` (both `[rows, dim]`), overwriting `dx`, or adding to it with
    /// `accumulate`. `x` is the forward input.
    pub fn backward_input(
        &self,
        cache: &RmsNormCache<T>,
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        accumulate: bool,
    ) -> Result<(), ModelError> {
        let (rows, dim) = (cache.rows, self.dim());
        let n = self.check_backward(cache, x, dy)?;
        check_len(&self.weight.name, "input gradient", n, dx.len())?;
        if accumulate {
            let mut scratch = vec![T::zero(); n];
            self.backend.rms_norm_backward_input(
                dy,
                x,
                self.weight.value.host(),
                &cache.rstd,
                rows,
                dim,
                &mut scratch,
            )?;
            dx.iter_mut().zip(&scratch).for_each(|(d, &s)| *d = *d + s);
        } else {
            self.backend.rms_norm_backward_input(
                dy,
                x,
                self.weight.value.host(),
                &cache.rstd,
                rows,
                dim,
                dx,
            )?;
        }
        Ok(())
    }

    /// W: `weight.grad += Σ_rows dy · x · rstd`. `x` is the forward input.
    pub fn backward_weight(&mut self, cache: &RmsNormCache<T>, x: &[T], dy: &[T]) -> Result<(), ModelError> {
        self.check_backward(cache, x, dy)?;
        let dim = self.dim();
        self.backend.rms_norm_backward_weight(
            dy,
            x,
            &cache.rstd,
            cache.rows,
            dim,
            self.weight.grad.host_mut(),
        )?;
        Ok(())
    }

    /// Checks `x`, `dy` and the cache against each other; returns `rows · dim`.
    fn check_backward(&self, cache: &RmsNormCache<T>, x: &[T], dy: &[T]) -> Result<usize, ModelError> {
        let n = cache.rows.checked_mul(self.dim()).ok_or_else(|| self.overflow(cache.rows))?;
        check_len(&self.weight.name, "saved rstd", cache.rows, cache.rstd.len())?;
        check_len(&self.weight.name, "input", n, x.len())?;
        check_len(&self.weight.name, "output gradient", n, dy.len())?;
        Ok(n)
    }

    fn overflow(&self, rows: usize) -> ModelError {
        ModelError::Tensor {
            tensor: self.weight.name.clone(),
            detail: format!("{rows} rows × {} overflows usize", self.dim()),
        }
    }
}
