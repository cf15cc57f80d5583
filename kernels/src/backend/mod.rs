//! The device seam: the one interface through which the model reaches its numerics, so
//! that a CUDA implementation can replace the CPU one without the model changing.
//!
//! - [`Backend`]: every op the model calls, with the signatures of the reference free
//!   functions of this crate (dense GEMM in f32, and f64 for the finite-difference
//!   references; BF16 GEMM; block-scaled FP8 GEMM and its grouped MoE form; FP8
//!   quantization in 1×128, 128×1 and 128×128 granularity and dequantization; RMSNorm
//!   forward, B and W; SwiGLU forward and backward; the gate's sigmoid; RoPE forward and
//!   backward; the attention core forward and backward; cross-entropy in the forms the
//!   model uses; AdamW, the global gradient norm and the clipping scale).
//! - [`CpuBackend`]: the reference. Each method calls the free function of the same name
//!   in this crate ([`crate::gemm`], [`crate::quant`], [`crate::norm`], …), which stay
//!   where they are: the CPU backend is a thin dispatch and holds no math of its own, so
//!   its results are those functions' results bit for bit.
//! - [`DeviceBackend`]: the backend a [`Device`] opened ([`open`]): an enum over the
//!   implementations built in, itself a [`Backend`] that forwards each call.
//! - [`Buffer`]: a tensor's storage on its device: `Host(Vec<T>)`, and with the `cuda`
//!   feature a `Cuda` variant that cannot exist yet. A backend makes them
//!   ([`Backend::upload`], [`Backend::zeros`]) and reads them back
//!   ([`Backend::download`]); the model's parameters and gradients are buffers.
//! - `CudaBackend` (with the `cuda` feature): the place the CUDA kernels go (issue 17).
//!   Today it cannot be constructed: [`open`] answers [`BackendError::NoCudaKernels`]
//!   with the feature and [`BackendError::BuiltWithoutCuda`] without it. The feature
//!   pulls in no dependency, so it builds on any machine.
//!
//! ## Why a trait with generic methods, dispatched by an enum
//! The ops that exist for both element types (f32 for training, f64 for the gradient
//! checks) are generic over [`GemmFloat`], as the free functions are, and the FP8 GEMMs
//! are generic over their output type. Generic methods make a trait unusable as `dyn`, so
//! the runtime choice of device is an enum, [`DeviceBackend`], whose variants each
//! implement [`Backend`]: the call is one `match` on a `Copy` value, with no allocation,
//! no vtable and nothing boxed, and each implementation is checked by the compiler to
//! cover every op.
//!
//! ## Invariants
//! - Nothing above the seam knows which backend runs: the model holds a
//!   [`DeviceBackend`] and calls its methods; it never names [`CpuBackend`] or a free
//!   op function of this crate.
//! - The CPU backend is the reference: for any inputs each of its methods returns what the
//!   free function of the same name returns, bit for bit (the unit tests check it on
//!   several ops), and every other backend is judged against it.
//! - The ops take host slices today, with the lengths and shapes the free functions
//!   check; every shape error is the free function's [`KernelError`] naming the tensor.
//! - Outside the backends, a [`Buffer`]'s elements are read or written on the host only
//!   through [`Buffer::host`], [`Buffer::host_mut`] and [`Buffer::to_host_vec`] (see
//!   [`Buffer`]'s docs for why those views are total today), so every host access to a
//!   parameter is greppable, and the CUDA backend replaces exactly those sites with ops
//!   on buffers.
//!
//! ## Why activations stay host vectors
//! Parameters and gradients are [`Buffer`]s; the activations a layer saves between its
//! forward, B and W stay `Vec<T>`. The element-wise work between the kernels (residual
//! adds, the MoE permutation and its routing, the combine's weighted sums) is host code
//! in the model, not backend ops, so a device-resident activation would be copied back
//! for it at once. They move to buffers together with the ops that touch them.

mod buffer;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use buffer::Buffer;
pub use cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use cuda::{CudaBackend, CudaBuffer};

use crate::KernelError;
use crate::attention::AttentionShape;
use crate::gemm::{Accumulation, GemmFloat, GemmOutput, MatMut, MatRef};
use crate::optim::AdamWConfig;
use crate::quant::{Fp8Matrix, Granularity, QuantConfig, QuantInput};
use crate::rope::{RopeLayout, RopeTable};
use half::bf16;

/// A device the numerics can run on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host's cores: the reference backend.
    #[default]
    Cpu,
    /// The CUDA device numbered `ordinal`.
    Cuda {
        /// The device's index, as `CUDA_VISIBLE_DEVICES` numbers them.
        ordinal: usize,
    },
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda { ordinal } => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// Why a backend could not be opened.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    /// A CUDA device was asked for from a build without the `cuda` feature.
    #[error("cuda:{ordinal}: flotilla was built without CUDA (build with --features cuda)")]
    BuiltWithoutCuda {
        /// The device asked for.
        ordinal: usize,
    },
    /// The `cuda` feature is on, but this build has no CUDA kernels yet.
    #[error("cuda:{ordinal}: this build of flotilla has no CUDA kernels yet (issue 17 adds them)")]
    NoCudaKernels {
        /// The device asked for.
        ordinal: usize,
    },
}

/// Opens the backend that runs on `device`. [`Device::Cpu`] always opens.
pub fn open(device: Device) -> Result<DeviceBackend, BackendError> {
    match device {
        Device::Cpu => Ok(DeviceBackend::Cpu(CpuBackend)),
        #[cfg(feature = "cuda")]
        Device::Cuda { ordinal } => Ok(DeviceBackend::Cuda(CudaBackend::new(ordinal)?)),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda { ordinal } => Err(BackendError::BuiltWithoutCuda { ordinal }),
    }
}

/// Every op the model calls (see the module docs). Each method has the contract of the
/// free function of the same name in this crate, which is what [`CpuBackend`] runs.
pub trait Backend: Send + Sync + std::fmt::Debug {
    /// The device it runs on.
    fn device(&self) -> Device;

    /// A buffer on this backend's device holding a copy of `host`. The CPU's never fails;
    /// a device backend reports a failed allocation or copy as a [`BackendError`].
    fn upload<T: GemmFloat>(&self, host: &[T]) -> Result<Buffer<T>, BackendError>;

    /// `buffer`'s elements copied to the host.
    fn download<T: GemmFloat>(&self, buffer: &Buffer<T>) -> Result<Vec<T>, BackendError>;

    /// A buffer of `len` zeros on this backend's device.
    fn zeros<T: GemmFloat>(&self, len: usize) -> Result<Buffer<T>, BackendError>;

    /// `C = alpha·A·B + beta·C` in `T` ([`crate::gemm::matmul`]).
    fn matmul<T: GemmFloat>(
        &self,
        c: MatMut<'_, T>,
        beta: T,
        a: MatRef<'_, T>,
        b: MatRef<'_, T>,
        alpha: T,
        threads: usize,
    ) -> Result<(), KernelError>;

    /// `C = alpha·A·B + beta·C` on BF16 operands, f32 accumulation and output
    /// ([`crate::gemm::gemm_bf16`]).
    fn gemm_bf16(
        &self,
        c: MatMut<'_, f32>,
        beta: f32,
        a: MatRef<'_, bf16>,
        b: MatRef<'_, bf16>,
        alpha: f32,
        threads: usize,
    ) -> Result<(), KernelError>;

    /// The block-scaled FP8 GEMM `out = A·Bᵀ` ([`crate::gemm::gemm_fp8`]).
    fn gemm_fp8<O: GemmOutput>(
        &self,
        a: &Fp8Matrix,
        b: &Fp8Matrix,
        accumulation: Accumulation,
        out: &mut [O],
        threads: usize,
    ) -> Result<(), KernelError>;

    /// The grouped MoE form of [`Backend::gemm_fp8`] over the contiguous layout
    /// ([`crate::gemm::grouped_gemm_fp8`]).
    fn grouped_gemm_fp8<O: GemmOutput>(
        &self,
        a: &Fp8Matrix,
        b: &[Fp8Matrix],
        m_indices: &[i32],
        accumulation: Accumulation,
        out: &mut [O],
        threads: usize,
    ) -> Result<(), KernelError>;

    /// FP8 quantization of `x [rows, cols]` in `granularity` ([`crate::quant::quantize`]):
    /// 1×128 tiles (activations as a GEMM LHS), 128×1 tiles (Wgrad's operands), 128×128
    /// blocks (weights).
    fn quantize<I: QuantInput>(
        &self,
        x: &[I],
        rows: usize,
        cols: usize,
        granularity: Granularity,
        cfg: &QuantConfig,
    ) -> Result<Fp8Matrix, KernelError>;

    /// `m`'s values, into `out` ([`Fp8Matrix::dequantize_into`]).
    fn dequantize_into(&self, m: &Fp8Matrix, out: &mut [f32]) -> Result<(), KernelError>;

    /// RMSNorm forward, saving the per-row rstd ([`crate::norm::rms_norm_forward`]).
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_forward<T: GemmFloat>(
        &self,
        x: &[T],
        weight: &[T],
        eps: T,
        rows: usize,
        dim: usize,
        y: &mut [T],
        rstd_out: &mut [T],
    ) -> Result<(), KernelError>;

    /// RMSNorm's input gradient (B) ([`crate::norm::rms_norm_backward_input`]).
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_backward_input<T: GemmFloat>(
        &self,
        dy: &[T],
        x: &[T],
        weight: &[T],
        rstd: &[T],
        rows: usize,
        dim: usize,
        dx: &mut [T],
    ) -> Result<(), KernelError>;

    /// RMSNorm's weight gradient (W), accumulated ([`crate::norm::rms_norm_backward_weight`]).
    fn rms_norm_backward_weight<T: GemmFloat>(
        &self,
        dy: &[T],
        x: &[T],
        rstd: &[T],
        rows: usize,
        dim: usize,
        dweight: &mut [T],
    ) -> Result<(), KernelError>;

    /// `h = silu(gate) · up` ([`crate::activation::swiglu_forward`]).
    fn swiglu_forward<T: GemmFloat>(
        &self,
        gate: &[T],
        up: &[T],
        rows: usize,
        inter: usize,
        h: &mut [T],
    ) -> Result<(), KernelError>;

    /// SwiGLU's backward ([`crate::activation::swiglu_backward`]).
    #[allow(clippy::too_many_arguments)]
    fn swiglu_backward<T: GemmFloat>(
        &self,
        dh: &[T],
        gate: &[T],
        up: &[T],
        rows: usize,
        inter: usize,
        dgate: &mut [T],
        dup: &mut [T],
    ) -> Result<(), KernelError>;

    /// `x ← sigmoid(x)` element-wise ([`crate::activation::sigmoid`]): the MoE gate's scores.
    fn sigmoid_in_place<T: GemmFloat>(&self, x: &mut [T]);

    /// RoPE forward in place ([`crate::rope::rope_forward`]).
    fn rope_forward<T: GemmFloat>(
        &self,
        x: &mut [T],
        layout: RopeLayout,
        positions: &[usize],
        table: &RopeTable<T>,
    ) -> Result<(), KernelError>;

    /// RoPE backward in place ([`crate::rope::rope_backward`]).
    fn rope_backward<T: GemmFloat>(
        &self,
        dy: &mut [T],
        layout: RopeLayout,
        positions: &[usize],
        table: &RopeTable<T>,
    ) -> Result<(), KernelError>;

    /// The causal attention core's forward, saving the log-sum-exp
    /// ([`crate::attention::attention_forward`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward<T: GemmFloat>(
        &self,
        o: &mut [T],
        lse: &mut [T],
        q: &[T],
        k: &[T],
        v: &[T],
        shape: AttentionShape,
        softmax_scale: T,
    ) -> Result<(), KernelError>;

    /// The attention core's backward ([`crate::attention::attention_backward`]).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward<T: GemmFloat>(
        &self,
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
    ) -> Result<(), KernelError>;

    /// Per-row cross-entropy and their mean ([`crate::loss::cross_entropy_forward`]).
    fn cross_entropy_forward<T: GemmFloat>(
        &self,
        logits: &[T],
        targets: &[u32],
        rows: usize,
        vocab: usize,
        losses: &mut [T],
    ) -> Result<T, KernelError>;

    /// Fused forward and in-place backward over the logits
    /// ([`crate::loss::cross_entropy_forward_backward_in_place`]).
    fn cross_entropy_forward_backward_in_place<T: GemmFloat>(
        &self,
        logits: &mut [T],
        targets: &[u32],
        rows: usize,
        vocab: usize,
        scale: T,
        losses: &mut [T],
    ) -> Result<T, KernelError>;

    /// `log softmax(logits_row)[target]` ([`crate::loss::log_softmax_at`]).
    fn log_softmax_at<T: GemmFloat>(&self, logits_row: &[T], target: u32) -> Result<T, KernelError>;

    /// One AdamW step on FP32 master weights with BF16 moments ([`crate::optim::adamw_step`]).
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [bf16],
        v: &mut [bf16],
        step: u64,
        lr: f32,
        cfg: &AdamWConfig,
        apply_weight_decay: bool,
    ) -> Result<(), KernelError>;

    /// The L2 norm of all gradients together ([`crate::optim::global_grad_norm`]).
    fn global_grad_norm(&self, grads: &[&[f32]]) -> f64;

    /// The factor gradients are multiplied by to clip their norm `norm` to `max_norm`
    /// ([`crate::optim::clip_scale`]).
    fn clip_scale(&self, norm: f64, max_norm: f64) -> f32;
}

/// The backend [`open`] returns: one of the implementations built in. `Copy`, so every
/// layer can hold one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceBackend {
    /// The reference.
    Cpu(CpuBackend),
    /// CUDA (no kernels yet: not constructible).
    #[cfg(feature = "cuda")]
    Cuda(CudaBackend),
}

impl Default for DeviceBackend {
    /// The CPU backend.
    fn default() -> Self {
        DeviceBackend::Cpu(CpuBackend)
    }
}

/// Forwards a call to the backend inside a [`DeviceBackend`].
macro_rules! dispatch {
    ($self:ident, $b:ident => $call:expr) => {
        match $self {
            DeviceBackend::Cpu($b) => $call,
            #[cfg(feature = "cuda")]
            DeviceBackend::Cuda($b) => $call,
        }
    };
}

impl Backend for DeviceBackend {
    fn device(&self) -> Device {
        dispatch!(self, b => b.device())
    }

    fn upload<T: GemmFloat>(&self, host: &[T]) -> Result<Buffer<T>, BackendError> {
        dispatch!(self, be => be.upload(host))
    }

    fn download<T: GemmFloat>(&self, buffer: &Buffer<T>) -> Result<Vec<T>, BackendError> {
        dispatch!(self, be => be.download(buffer))
    }

    fn zeros<T: GemmFloat>(&self, len: usize) -> Result<Buffer<T>, BackendError> {
        dispatch!(self, be => be.zeros(len))
    }

    fn matmul<T: GemmFloat>(
        &self,
        c: MatMut<'_, T>,
        beta: T,
        a: MatRef<'_, T>,
        b: MatRef<'_, T>,
        alpha: T,
        threads: usize,
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.matmul(c, beta, a, b, alpha, threads))
    }

    fn gemm_bf16(
        &self,
        c: MatMut<'_, f32>,
        beta: f32,
        a: MatRef<'_, bf16>,
        b: MatRef<'_, bf16>,
        alpha: f32,
        threads: usize,
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.gemm_bf16(c, beta, a, b, alpha, threads))
    }

    fn gemm_fp8<O: GemmOutput>(
        &self,
        a: &Fp8Matrix,
        b: &Fp8Matrix,
        accumulation: Accumulation,
        out: &mut [O],
        threads: usize,
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.gemm_fp8(a, b, accumulation, out, threads))
    }

    fn grouped_gemm_fp8<O: GemmOutput>(
        &self,
        a: &Fp8Matrix,
        b: &[Fp8Matrix],
        m_indices: &[i32],
        accumulation: Accumulation,
        out: &mut [O],
        threads: usize,
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.grouped_gemm_fp8(a, b, m_indices, accumulation, out, threads))
    }

    fn quantize<I: QuantInput>(
        &self,
        x: &[I],
        rows: usize,
        cols: usize,
        granularity: Granularity,
        cfg: &QuantConfig,
    ) -> Result<Fp8Matrix, KernelError> {
        dispatch!(self, be => be.quantize(x, rows, cols, granularity, cfg))
    }

    fn dequantize_into(&self, m: &Fp8Matrix, out: &mut [f32]) -> Result<(), KernelError> {
        dispatch!(self, be => be.dequantize_into(m, out))
    }

    fn rms_norm_forward<T: GemmFloat>(
        &self,
        x: &[T],
        weight: &[T],
        eps: T,
        rows: usize,
        dim: usize,
        y: &mut [T],
        rstd_out: &mut [T],
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.rms_norm_forward(x, weight, eps, rows, dim, y, rstd_out))
    }

    fn rms_norm_backward_input<T: GemmFloat>(
        &self,
        dy: &[T],
        x: &[T],
        weight: &[T],
        rstd: &[T],
        rows: usize,
        dim: usize,
        dx: &mut [T],
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.rms_norm_backward_input(dy, x, weight, rstd, rows, dim, dx))
    }

    fn rms_norm_backward_weight<T: GemmFloat>(
        &self,
        dy: &[T],
        x: &[T],
        rstd: &[T],
        rows: usize,
        dim: usize,
        dweight: &mut [T],
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.rms_norm_backward_weight(dy, x, rstd, rows, dim, dweight))
    }

    fn swiglu_forward<T: GemmFloat>(
        &self,
        gate: &[T],
        up: &[T],
        rows: usize,
        inter: usize,
        h: &mut [T],
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.swiglu_forward(gate, up, rows, inter, h))
    }

    fn swiglu_backward<T: GemmFloat>(
        &self,
        dh: &[T],
        gate: &[T],
        up: &[T],
        rows: usize,
        inter: usize,
        dgate: &mut [T],
        dup: &mut [T],
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.swiglu_backward(dh, gate, up, rows, inter, dgate, dup))
    }

    fn sigmoid_in_place<T: GemmFloat>(&self, x: &mut [T]) {
        dispatch!(self, be => be.sigmoid_in_place(x))
    }

    fn rope_forward<T: GemmFloat>(
        &self,
        x: &mut [T],
        layout: RopeLayout,
        positions: &[usize],
        table: &RopeTable<T>,
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.rope_forward(x, layout, positions, table))
    }

    fn rope_backward<T: GemmFloat>(
        &self,
        dy: &mut [T],
        layout: RopeLayout,
        positions: &[usize],
        table: &RopeTable<T>,
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.rope_backward(dy, layout, positions, table))
    }

    fn attention_forward<T: GemmFloat>(
        &self,
        o: &mut [T],
        lse: &mut [T],
        q: &[T],
        k: &[T],
        v: &[T],
        shape: AttentionShape,
        softmax_scale: T,
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.attention_forward(o, lse, q, k, v, shape, softmax_scale))
    }

    fn attention_backward<T: GemmFloat>(
        &self,
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
        dispatch!(self, be => be.attention_backward(dq, dk, dv, d_o, q, k, v, o, lse, shape, softmax_scale))
    }

    fn cross_entropy_forward<T: GemmFloat>(
        &self,
        logits: &[T],
        targets: &[u32],
        rows: usize,
        vocab: usize,
        losses: &mut [T],
    ) -> Result<T, KernelError> {
        dispatch!(self, be => be.cross_entropy_forward(logits, targets, rows, vocab, losses))
    }

    fn cross_entropy_forward_backward_in_place<T: GemmFloat>(
        &self,
        logits: &mut [T],
        targets: &[u32],
        rows: usize,
        vocab: usize,
        scale: T,
        losses: &mut [T],
    ) -> Result<T, KernelError> {
        dispatch!(self, be => be.cross_entropy_forward_backward_in_place(logits, targets, rows, vocab, scale, losses))
    }

    fn log_softmax_at<T: GemmFloat>(&self, logits_row: &[T], target: u32) -> Result<T, KernelError> {
        dispatch!(self, be => be.log_softmax_at(logits_row, target))
    }

    fn adamw_step(
        &self,
        params: &mut [f32],
        grads: &[f32],
        m: &mut [bf16],
        v: &mut [bf16],
        step: u64,
        lr: f32,
        cfg: &AdamWConfig,
        apply_weight_decay: bool,
    ) -> Result<(), KernelError> {
        dispatch!(self, be => be.adamw_step(params, grads, m, v, step, lr, cfg, apply_weight_decay))
    }

    fn global_grad_norm(&self, grads: &[&[f32]]) -> f64 {
        dispatch!(self, be => be.global_grad_norm(grads))
    }

    fn clip_scale(&self, norm: f64, max_norm: f64) -> f32 {
        dispatch!(self, be => be.clip_scale(norm, max_norm))
    }
}

#[cfg(test)]
mod tests;
