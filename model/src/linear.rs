//! A bias-free linear layer in the HF layout: weight `[out, in]`, `y = x·Wᵀ`.
//!
//! Forward, and backward split as DualPipe needs it: [`Linear::backward_input`] (B,
//! `dx = dy·W`) runs on the critical path, [`Linear::backward_weight`] (W,
//! `dW += dyᵀ·x`) may run later. In [`Precision::Fp32`] all three are one dense GEMM each
//! over the caller's buffers, with no transpose copies; in [`Precision::Bf16`] and
//! [`Precision::Fp8`] they run as [`crate::precision`] describes (f32 layers only).
//!
//! The input `x` stays with the caller, who passes it to forward and again to W. Layers
//! inside the model keep it as a [`CachedActivation`] ([`Linear::cache_input`]; FP8 under
//! fp8): [`Linear::forward_from`] reads an FP8 one as Fprop's operand as it is, and
//! [`Linear::backward_weight_from`] takes its [`CachedActivation::wgrad_input`].

use crate::param::{Init, Param};
use crate::precision::{self, CachedActivation, Precision, WgradInput, check_precision};
use crate::{ModelError, Real, check_len};
use flotilla_kernels::backend::{Backend, DeviceBackend};
use flotilla_kernels::gemm::{MatMut, MatRef};
use flotilla_kernels::quant::{Fp8Matrix, Granularity, ScaleRounding};
use std::borrow::Cow;

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
    /// The backend its GEMMs and quantizations run on (default the CPU's); set for the
    /// whole model by [`crate::model::Model::set_backend`].
    pub backend: DeviceBackend,
}

impl<T: Real> Linear<T> {
    /// A layer whose weight is `{prefix}.weight`, drawn from Normal(0, std) by `(seed, name)`.
    pub fn new(prefix: &str, in_features: usize, out_features: usize, std: f64, seed: u64) -> Self {
        let weight =
            Param::new(format!("{prefix}.weight"), &[out_features, in_features], Init::Normal { std }, seed);
        Linear {
            weight,
            in_features,
            out_features,
            precision: Precision::Fp32,
            backend: DeviceBackend::default(),
        }
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
        Ok(MatRef::row_major(self.weight.value.host(), self.out_features, self.in_features, "weight")?)
    }

    /// `y = x·Wᵀ` for `x: [rows, in]`, `y: [rows, out]` (overwritten).
    pub fn forward(&self, x: &[T], rows: usize, y: &mut [T], threads: usize) -> Result<(), ModelError> {
        check_len(&self.weight.name, "input", rows * self.in_features, x.len())?;
        check_len(&self.weight.name, "output", rows * self.out_features, y.len())?;
        if self.precision != Precision::Fp32 {
            let (x, w) = (self.f32_of(x)?, self.f32_of(self.weight.value.host())?);
            let y = self.f32_of_mut(y)?;
            let (out_f, in_f) = (self.out_features, self.in_features);
            return precision::forward(&self.backend, self.precision, w, out_f, in_f, x, rows, y, threads);
        }
        self.backend.matmul(
            MatMut::row_major(y, rows, self.out_features, "y")?,
            T::zero(),
            MatRef::row_major(x, rows, self.in_features, "x")?,
            self.weight_view()?.t(),
            T::one(),
            threads,
        )?;
        Ok(())
    }

    /// `x: [rows, in]` as this layer keeps its input for W under its precision: quantized
    /// in 1×128 tiles with exact scales under fp8, as it is otherwise (see
    /// [`CachedActivation::new`]). Layers that read the same input share one.
    pub fn cache_input<'a>(
        &self,
        x: impl Into<Cow<'a, [T]>>,
        rows: usize,
    ) -> Result<CachedActivation<T>, ModelError> {
        self.cache_input_with(x, rows, ScaleRounding::Exact)
    }

    /// [`Linear::cache_input`] with the FP8 scales rounded as `rounding`.
    pub fn cache_input_with<'a>(
        &self,
        x: impl Into<Cow<'a, [T]>>,
        rows: usize,
        rounding: ScaleRounding,
    ) -> Result<CachedActivation<T>, ModelError> {
        let x = x.into();
        check_len(&self.weight.name, "input", rows * self.in_features, x.len())?;
        let what = format!("{} input", self.weight.name);
        CachedActivation::new(&self.backend, self.precision, x, rows, self.in_features, rounding, &what)
    }

    /// [`Linear::forward`] on a kept input: an FP8 one is Fprop's LHS as it is, so an
    /// input shared by several layers is quantized once.
    pub fn forward_from(
        &self,
        x: &CachedActivation<T>,
        rows: usize,
        y: &mut [T],
        threads: usize,
    ) -> Result<(), ModelError> {
        let qx = match x {
            CachedActivation::Full(x) => return self.forward(x, rows, y, threads),
            CachedActivation::Fp8 { matrix, .. } => matrix,
        };
        self.check_fp8_operand(qx, (rows, self.in_features), "input")?;
        check_len(&self.weight.name, "output", rows * self.out_features, y.len())?;
        let w = self.f32_of(self.weight.value.host())?;
        let y = self.f32_of_mut(y)?;
        precision::forward_fp8(&self.backend, w, self.out_features, self.in_features, qx, y, threads)
    }

    /// An FP8 operand must be `[rows, cols]` in 1×128 tiles, for an fp8 layer.
    fn check_fp8_operand(&self, q: &Fp8Matrix, shape: (usize, usize), what: &str) -> Result<(), ModelError> {
        let detail = if self.precision != Precision::Fp8 {
            format!("an FP8 {what} needs precision fp8, the layer's is {}", self.precision)
        } else if (q.rows, q.cols) != shape || q.granularity != Granularity::Tile1x128 {
            format!(
                "FP8 {what} is {}×{} in {:?}, expected {}×{} in 1×128 tiles",
                q.rows, q.cols, q.granularity, shape.0, shape.1
            )
        } else {
            return Ok(());
        };
        Err(ModelError::Tensor { tensor: self.weight.name.clone(), detail })
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
            let (dy, w) = (self.f32_of(dy)?, self.f32_of(self.weight.value.host())?);
            let dx = self.f32_of_mut(dx)?;
            let (out_f, in_f) = (self.out_features, self.in_features);
            return precision::backward_input(
                &self.backend,
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
        self.backend.matmul(
            MatMut::row_major(dx, rows, self.in_features, "dx")?,
            if accumulate { T::one() } else { T::zero() },
            MatRef::row_major(dy, rows, self.out_features, "dy")?,
            self.weight_view()?,
            T::one(),
            threads,
        )?;
        Ok(())
    }

    /// W from a kept input's [`CachedActivation::wgrad_input`]: [`Linear::backward_weight`]
    /// on a full one; under fp8 the re-tiled cache `xᵀ [in, rows]` is Wgrad's operand as
    /// it is.
    pub fn backward_weight_from(
        &mut self,
        dy: &[T],
        x: &WgradInput<'_, T>,
        rows: usize,
        threads: usize,
    ) -> Result<(), ModelError> {
        let q_xt = match x {
            WgradInput::Full(x) => return self.backward_weight(dy, x, rows, threads),
            WgradInput::Fp8(q_xt) => q_xt,
        };
        self.check_fp8_operand(q_xt, (self.in_features, rows), "transposed input")?;
        check_len(&self.weight.name, "output gradient", rows * self.out_features, dy.len())?;
        let dy = self.f32_of(dy)?;
        let (out_f, in_f) = (self.out_features, self.in_features);
        let grad = T::as_f32_slice_mut(self.weight.grad.host_mut()).ok_or_else(|| {
            check_precision::<T>(Precision::Fp8, &self.weight.name).expect_err("only f64 fails")
        })?;
        precision::backward_weight_fp8(&self.backend, grad, out_f, in_f, dy, q_xt, threads)
    }

    /// W: `grad += dyᵀ·x`; gradients accumulate over micro-batches until the optimizer
    /// step clears them. Under fp8 `x` is quantized in 128×1 tiles directly (see
    /// [`precision::backward_weight`]).
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
            let grad = T::as_f32_slice_mut(self.weight.grad.host_mut())
                .ok_or_else(|| check_precision::<T>(p, &self.weight.name).expect_err("only f64 fails"))?;
            return precision::backward_weight(&self.backend, p, grad, out_f, in_f, dy, x, rows, threads);
        }
        self.backend.matmul(
            MatMut::row_major(self.weight.grad.host_mut(), self.out_features, self.in_features, "dW")?,
            T::one(),
            MatRef::row_major(dy, rows, self.out_features, "dy")?.t(),
            MatRef::row_major(x, rows, self.in_features, "x")?,
            T::one(),
            threads,
        )?;
        Ok(())
    }
}
