//! The CUDA backend, behind the `cuda` feature: the place issue 17's kernels go.
//!
//! This build has no CUDA kernels, so a [`CudaBackend`] cannot be constructed:
//! [`CudaBackend::new`] answers [`BackendError::NoCudaKernels`]. The type holds an
//! uninhabited value, so each op is `match self.never {}`: the compiler proves that no
//! op can run, and the trait is still checked to be implemented in full. The feature
//! pulls in no dependency (no CUDA toolkit is needed to build it).
//!
//! [`CudaBuffer`] is the device allocation a [`super::Buffer::Cuda`] holds: uninhabited in
//! the same way, so no code path can meet a CUDA buffer and the host views of
//! [`super::Buffer`] are total.

use super::{Backend, BackendError, Buffer, Device};
use crate::KernelError;
use crate::attention::AttentionShape;
use crate::gemm::{Accumulation, GemmFloat, GemmOutput, MatMut, MatRef};
use crate::optim::AdamWConfig;
use crate::quant::{Fp8Matrix, Granularity, QuantConfig, QuantInput};
use crate::rope::{RopeLayout, RopeTable};
use half::bf16;
use std::marker::PhantomData;

/// No value: a [`CudaBackend`] holding one cannot exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Never {}

/// A CUDA device's backend. Not constructible in this build (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaBackend {
    never: Never,
}

/// A CUDA device allocation of `T`s. Not constructible in this build (see the module
/// docs); issue 17 gives it a device pointer and the stream that owns it.
pub struct CudaBuffer<T> {
    never: Never,
    _elements: PhantomData<T>,
}

impl<T> CudaBuffer<T> {
    /// Proof that this value does not exist: every use of a CUDA buffer in this build is
    /// unreachable, and this says so to the compiler.
    pub(super) fn absurd(&self) -> ! {
        match self.never {}
    }
}

// By hand rather than derived: a derive would require `T: Clone` and so on, and there is
// nothing of `T` to clone, print or compare.
impl<T> Clone for CudaBuffer<T> {
    fn clone(&self) -> Self {
        self.absurd()
    }
}

impl<T> std::fmt::Debug for CudaBuffer<T> {
    fn fmt(&self, _f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.absurd()
    }
}

impl<T> PartialEq for CudaBuffer<T> {
    fn eq(&self, _other: &Self) -> bool {
        self.absurd()
    }
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`: in this build always [`BackendError::NoCudaKernels`].
    pub fn new(ordinal: usize) -> Result<Self, BackendError> {
        Err(BackendError::NoCudaKernels { ordinal })
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        match self.never {}
    }

    fn upload<T: GemmFloat>(&self, _host: &[T]) -> Result<Buffer<T>, BackendError> {
        match self.never {}
    }

    fn download<T: GemmFloat>(&self, _buffer: &Buffer<T>) -> Result<Vec<T>, BackendError> {
        match self.never {}
    }

    fn zeros<T: GemmFloat>(&self, _len: usize) -> Result<Buffer<T>, BackendError> {
        match self.never {}
    }

    fn matmul<T: GemmFloat>(
        &self,
        _c: MatMut<'_, T>,
        _beta: T,
        _a: MatRef<'_, T>,
        _b: MatRef<'_, T>,
        _alpha: T,
        _threads: usize,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn gemm_bf16(
        &self,
        _c: MatMut<'_, f32>,
        _beta: f32,
        _a: MatRef<'_, bf16>,
        _b: MatRef<'_, bf16>,
        _alpha: f32,
        _threads: usize,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn gemm_fp8<O: GemmOutput>(
        &self,
        _a: &Fp8Matrix,
        _b: &Fp8Matrix,
        _accumulation: Accumulation,
        _out: &mut [O],
        _threads: usize,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn grouped_gemm_fp8<O: GemmOutput>(
        &self,
        _a: &Fp8Matrix,
        _b: &[Fp8Matrix],
        _m_indices: &[i32],
        _accumulation: Accumulation,
        _out: &mut [O],
        _threads: usize,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn quantize<I: QuantInput>(
        &self,
        _x: &[I],
        _rows: usize,
        _cols: usize,
        _granularity: Granularity,
        _cfg: &QuantConfig,
    ) -> Result<Fp8Matrix, KernelError> {
        match self.never {}
    }

    fn dequantize_into(&self, _m: &Fp8Matrix, _out: &mut [f32]) -> Result<(), KernelError> {
        match self.never {}
    }

    fn rms_norm_forward<T: GemmFloat>(
        &self,
        _x: &[T],
        _weight: &[T],
        _eps: T,
        _rows: usize,
        _dim: usize,
        _y: &mut [T],
        _rstd_out: &mut [T],
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn rms_norm_backward_input<T: GemmFloat>(
        &self,
        _dy: &[T],
        _x: &[T],
        _weight: &[T],
        _rstd: &[T],
        _rows: usize,
        _dim: usize,
        _dx: &mut [T],
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn rms_norm_backward_weight<T: GemmFloat>(
        &self,
        _dy: &[T],
        _x: &[T],
        _rstd: &[T],
        _rows: usize,
        _dim: usize,
        _dweight: &mut [T],
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn swiglu_forward<T: GemmFloat>(
        &self,
        _gate: &[T],
        _up: &[T],
        _rows: usize,
        _inter: usize,
        _h: &mut [T],
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn swiglu_backward<T: GemmFloat>(
        &self,
        _dh: &[T],
        _gate: &[T],
        _up: &[T],
        _rows: usize,
        _inter: usize,
        _dgate: &mut [T],
        _dup: &mut [T],
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn sigmoid_in_place<T: GemmFloat>(&self, _x: &mut [T]) {
        match self.never {}
    }

    fn rope_forward<T: GemmFloat>(
        &self,
        _x: &mut [T],
        _layout: RopeLayout,
        _positions: &[usize],
        _table: &RopeTable<T>,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn rope_backward<T: GemmFloat>(
        &self,
        _dy: &mut [T],
        _layout: RopeLayout,
        _positions: &[usize],
        _table: &RopeTable<T>,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn attention_forward<T: GemmFloat>(
        &self,
        _o: &mut [T],
        _lse: &mut [T],
        _q: &[T],
        _k: &[T],
        _v: &[T],
        _shape: AttentionShape,
        _softmax_scale: T,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn attention_backward<T: GemmFloat>(
        &self,
        _dq: &mut [T],
        _dk: &mut [T],
        _dv: &mut [T],
        _d_o: &[T],
        _q: &[T],
        _k: &[T],
        _v: &[T],
        _o: &[T],
        _lse: &[T],
        _shape: AttentionShape,
        _softmax_scale: T,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn cross_entropy_forward<T: GemmFloat>(
        &self,
        _logits: &[T],
        _targets: &[u32],
        _rows: usize,
        _vocab: usize,
        _losses: &mut [T],
    ) -> Result<T, KernelError> {
        match self.never {}
    }

    fn cross_entropy_forward_backward_in_place<T: GemmFloat>(
        &self,
        _logits: &mut [T],
        _targets: &[u32],
        _rows: usize,
        _vocab: usize,
        _scale: T,
        _losses: &mut [T],
    ) -> Result<T, KernelError> {
        match self.never {}
    }

    fn log_softmax_at<T: GemmFloat>(&self, _logits_row: &[T], _target: u32) -> Result<T, KernelError> {
        match self.never {}
    }

    fn adamw_step(
        &self,
        _params: &mut [f32],
        _grads: &[f32],
        _m: &mut [bf16],
        _v: &mut [bf16],
        _step: u64,
        _lr: f32,
        _cfg: &AdamWConfig,
        _apply_weight_decay: bool,
    ) -> Result<(), KernelError> {
        match self.never {}
    }

    fn global_grad_norm(&self, _grads: &[&[f32]]) -> f64 {
        match self.never {}
    }

    fn clip_scale(&self, _norm: f64, _max_norm: f64) -> f32 {
        match self.never {}
    }
}
