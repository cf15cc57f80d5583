//! The SwiGLU feed-forward network: DeepSeek-V3's dense FFN and each (shared or routed)
//! expert. `y = down(silu(gate(x)) ⊙ up(x))`.
//!
//! Forward keeps the two pre-activations (`gate(x)`, `up(x)`, the SwiGLU inputs) and not
//! their product: the SwiGLU output is recomputed in backward, as the report's FP8 recipe
//! does to save memory. With [`SwiGluFfn::fp8_swiglu_inputs`] (the MoE experts under fp8,
//! report §3.3.3) the pre-activations are kept in FP8, 1×128 tiles, and backward reads
//! them dequantized. The input `x` is the caller's, as a [`CachedActivation`]
//! ([`SwiGluFfn::cache_input`]) that `gate_proj` and `up_proj` share. Backward is split:
//! [`SwiGluFfn::backward_input`] (B) returns `dx` and the gradients that
//! [`SwiGluFfn::backward_weight`] (W) needs later.

use crate::linear::Linear;
use crate::precision::{CacheBytes, CachedActivation, Precision};
use crate::{ModelError, Real};
use flotilla_kernels::backend::{Backend, DeviceBackend};
use flotilla_kernels::quant::ScaleRounding;
use std::borrow::Cow;

/// `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Clone, Debug, PartialEq)]
pub struct SwiGluFfn<T> {
    /// `[inter, hidden]`.
    pub gate_proj: Linear<T>,
    /// `[inter, hidden]`.
    pub up_proj: Linear<T>,
    /// `[hidden, inter]`.
    pub down_proj: Linear<T>,
    /// Whether forward keeps the SwiGLU inputs in FP8 (needs `T = f32`); set for the MoE
    /// experts under fp8 by [`crate::moe::MoeLayer::set_precision`]. Default false.
    pub fp8_swiglu_inputs: bool,
    /// The backend SwiGLU runs on (default the CPU's); [`SwiGluFfn::set_backend`] sets it
    /// and the projections'.
    pub backend: DeviceBackend,
}

/// What forward keeps for backward.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnCache<T> {
    /// Rows (tokens) of the call.
    pub rows: usize,
    /// `gate(x)`, `[rows, inter]`.
    pub gate: CachedActivation<T>,
    /// `up(x)`, `[rows, inter]`.
    pub up: CachedActivation<T>,
}

impl<T: Real> FfnCache<T> {
    /// The bytes held.
    pub fn bytes(&self) -> CacheBytes {
        self.gate.bytes() + self.up.bytes()
    }
}

/// What B hands to W.
#[derive(Clone, Debug, PartialEq)]
pub struct FfnWeightGradInputs<T> {
    /// Gradient at the output, `[rows, hidden]` (for `down_proj`).
    pub dy: Vec<T>,
    /// Gradient at `gate(x)`, `[rows, inter]`.
    pub dgate: Vec<T>,
    /// Gradient at `up(x)`, `[rows, inter]`.
    pub dup: Vec<T>,
}

impl<T: Real> SwiGluFfn<T> {
    /// An FFN with parameters `{prefix}.{gate,up,down}_proj.weight`.
    pub fn new(prefix: &str, hidden: usize, inter: usize, std: f64, seed: u64) -> Self {
        SwiGluFfn {
            gate_proj: Linear::new(&format!("{prefix}.gate_proj"), hidden, inter, std, seed),
            up_proj: Linear::new(&format!("{prefix}.up_proj"), hidden, inter, std, seed),
            down_proj: Linear::new(&format!("{prefix}.down_proj"), inter, hidden, std, seed),
            fp8_swiglu_inputs: false,
            backend: DeviceBackend::default(),
        }
    }

    /// Runs SwiGLU and the three projections on `backend`.
    pub fn set_backend(&mut self, backend: DeviceBackend) {
        for linear in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
            linear.backend = backend;
        }
        self.backend = backend;
    }

    /// Sets the precision of the three projections ([`crate::precision`]).
    pub fn set_precision(&mut self, precision: Precision) {
        for linear in [&mut self.gate_proj, &mut self.up_proj, &mut self.down_proj] {
            linear.precision = precision;
        }
    }

    fn inter(&self) -> usize {
        self.gate_proj.out_features
    }

    /// `x: [rows, hidden]` as `gate_proj` and `up_proj` keep their shared input
    /// ([`Linear::cache_input`]).
    pub fn cache_input<'a>(
        &self,
        x: impl Into<Cow<'a, [T]>>,
        rows: usize,
    ) -> Result<CachedActivation<T>, ModelError> {
        self.gate_proj.cache_input(x, rows)
    }

    /// `layer`'s output `[rows, inter]` (a SwiGLU input) as the cache keeps it.
    fn keep_swiglu_input(
        &self,
        v: Vec<T>,
        rows: usize,
        layer: &Linear<T>,
    ) -> Result<CachedActivation<T>, ModelError> {
        let precision = if self.fp8_swiglu_inputs { Precision::Fp8 } else { Precision::Fp32 };
        let name = &layer.weight.name;
        let what = format!("{} output", name.strip_suffix(".weight").unwrap_or(name));
        CachedActivation::new(&self.backend, precision, v, rows, self.inter(), ScaleRounding::Exact, &what)
    }

    /// `y = down(silu(gate(x)) ⊙ up(x))` for `x` ([`SwiGluFfn::cache_input`]),
    /// `y: [rows, hidden]`.
    pub fn forward(
        &self,
        x: &CachedActivation<T>,
        rows: usize,
        y: &mut [T],
        threads: usize,
    ) -> Result<FfnCache<T>, ModelError> {
        let n = rows * self.inter();
        let (mut gate, mut up) = (vec![T::zero(); n], vec![T::zero(); n]);
        self.gate_proj.forward_from(x, rows, &mut gate, threads)?;
        self.up_proj.forward_from(x, rows, &mut up, threads)?;
        let mut h = vec![T::zero(); n];
        self.backend.swiglu_forward(&gate, &up, rows, self.inter(), &mut h)?;
        self.down_proj.forward(&h, rows, y, threads)?;
        Ok(FfnCache {
            rows,
            gate: self.keep_swiglu_input(gate, rows, &self.gate_proj)?,
            up: self.keep_swiglu_input(up, rows, &self.up_proj)?,
        })
    }

    /// B: `dx` (overwritten, or accumulated with `accumulate`) from `dy`.
    pub fn backward_input(
        &self,
        cache: &FfnCache<T>,
        dy: &[T],
        dx: &mut [T],
        accumulate: bool,
        threads: usize,
    ) -> Result<FfnWeightGradInputs<T>, ModelError> {
        let (rows, n) = (cache.rows, cache.rows * self.inter());
        let mut dh = vec![T::zero(); n];
        self.down_proj.backward_input(dy, rows, &mut dh, false, threads)?;
        let mut grads =
            FfnWeightGradInputs { dy: dy.to_vec(), dgate: vec![T::zero(); n], dup: vec![T::zero(); n] };
        let (gate, up) = (cache.gate.values(&self.backend)?, cache.up.values(&self.backend)?);
        self.backend.swiglu_backward(
            &dh,
            &gate,
            &up,
            rows,
            self.inter(),
            &mut grads.dgate,
            &mut grads.dup,
        )?;
        self.gate_proj.backward_input(&grads.dgate, rows, dx, accumulate, threads)?;
        self.up_proj.backward_input(&grads.dup, rows, dx, true, threads)?;
        Ok(grads)
    }

    /// W: accumulates the three weight gradients; `x` is the forward input. The SwiGLU
    /// output that `down_proj` needs is recomputed here from the cached pre-activations.
    pub fn backward_weight(
        &mut self,
        cache: &FfnCache<T>,
        grads: &FfnWeightGradInputs<T>,
        x: &CachedActivation<T>,
        threads: usize,
    ) -> Result<(), ModelError> {
        let rows = cache.rows;
        let mut h = vec![T::zero(); rows * self.inter()];
        let (gate, up) = (cache.gate.values(&self.backend)?, cache.up.values(&self.backend)?);
        self.backend.swiglu_forward(&gate, &up, rows, self.inter(), &mut h)?;
        self.down_proj.backward_weight(&grads.dy, &h, rows, threads)?;
        let x = x.wgrad_input(&self.backend)?;
        self.gate_proj.backward_weight_from(&grads.dgate, &x, rows, threads)?;
        self.up_proj.backward_weight_from(&grads.dup, &x, rows, threads)?;
        Ok(())
    }

    /// The three weights, for optimizers and checkpoints.
    pub fn params_mut(&mut self) -> [&mut crate::param::Param<T>; 3] {
        [&mut self.gate_proj.weight, &mut self.up_proj.weight, &mut self.down_proj.weight]
    }
}
