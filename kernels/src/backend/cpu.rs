//! The CPU backend: the reference. Every method calls the free function of the same name
//! in this crate and nothing else, so it is bit-identical to that function by
//! construction; the math lives in those functions, not here.

use super::{Backend, BackendError, Buffer, Device};
use crate::KernelError;
use crate::attention::{AttentionShape, attention_backward, attention_forward};
use crate::gemm::{Accumulation, GemmFloat, GemmOutput, MatMut, MatRef};
use crate::optim::AdamWConfig;
use crate::quant::{Fp8Matrix, Granularity, QuantConfig, QuantInput};
use crate::rope::{RopeLayout, RopeTable};
use crate::{activation, gemm, loss, norm, optim, quant, rope};
use half::bf16;

/// The host's cores, through the reference free functions of this crate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn upload<T: GemmFloat>(&self, host: &[T]) -> Result<Buffer<T>, BackendError> {
        Ok(Buffer::from_host(host.to_vec()))
    }

    fn download<T: GemmFloat>(&self, buffer: &Buffer<T>) -> Result<Vec<T>, BackendError> {
        // The CPU's memory is the host's: its buffers are read in place.
        Ok(buffer.to_host_vec())
    }

    fn zeros<T: GemmFloat>(&self, len: usize) -> Result<Buffer<T>, BackendError> {
        Ok(Buffer::from_host(vec![T::zero(); len]))
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
        gemm::matmul(c, beta, a, b, alpha, threads)
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
        gemm::gemm_bf16(c, beta, a, b, alpha, threads)
    }

    fn gemm_fp8<O: GemmOutput>(
        &self,
        a: &Fp8Matrix,
        b: &Fp8Matrix,
        accumulation: Accumulation,
        out: &mut [O],
        threads: usize,
    ) -> Result<(), KernelError> {
        gemm::gemm_fp8(a, b, accumulation, out, threads)
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
        gemm::grouped_gemm_fp8(a, b, m_indices, accumulation, out, threads)
    }

    fn quantize<I: QuantInput>(
        &self,
        x: &[I],
        rows: usize,
        cols: usize,
        granularity: Granularity,
        cfg: &QuantConfig,
    ) -> Result<Fp8Matrix, KernelError> {
        quant::quantize(x, rows, cols, granularity, cfg)
    }

    fn dequantize_into(&self, m: &Fp8Matrix, out: &mut [f32]) -> Result<(), KernelError> {
        m.dequantize_into(out)
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
        norm::rms_norm_forward(x, weight, eps, rows, dim, y, rstd_out)
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
        norm::rms_norm_backward_input(dy, x, weight, rstd, rows, dim, dx)
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
        norm::rms_norm_backward_weight(dy, x, rstd, rows, dim, dweight)
    }

    fn swiglu_forward<T: GemmFloat>(
        &self,
        gate: &[T],
        up: &[T],
        rows: usize,
        inter: usize,
        h: &mut [T],
    ) -> Result<(), KernelError> {
        activation::swiglu_forward(gate, up, rows, inter, h)
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
        activation::swiglu_backward(dh, gate, up, rows, inter, dgate, dup)
    }

    fn sigmoid_in_place<T: GemmFloat>(&self, x: &mut [T]) {
        x.iter_mut().for_each(|v| *v = activation::sigmoid(*v));
    }

    fn rope_forward<T: GemmFloat>(
        &self,
        x: &mut [T],
        layout: RopeLayout,
        positions: &[usize],
        table: &RopeTable<T>,
    ) -> Result<(), KernelError> {
        rope::rope_forward(x, layout, positions, table)
    }

    fn rope_backward<T: GemmFloat>(
        &self,
        dy: &mut [T],
        layout: RopeLayout,
        positions: &[usize],
        table: &RopeTable<T>,
    ) -> Result<(), KernelError> {
        rope::rope_backward(dy, layout, positions, table)
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
        attention_forward(o, lse, q, k, v, shape, softmax_scale)
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
        attention_backward(dq, dk, dv, d_o, q, k, v, o, lse, shape, softmax_scale)
    }

    fn cross_entropy_forward<T: GemmFloat>(
        &self,
        logits: &[T],
        targets: &[u32],
        rows: usize,
        vocab: usize,
        losses: &mut [T],
    ) -> Result<T, KernelError> {
        loss::cross_entropy_forward(logits, targets, rows, vocab, losses)
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
        loss::cross_entropy_forward_backward_in_place(logits, targets, rows, vocab, scale, losses)
    }

    fn log_softmax_at<T: GemmFloat>(&self, logits_row: &[T], target: u32) -> Result<T, KernelError> {
        loss::log_softmax_at(logits_row, target)
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
        optim::adamw_step(params, grads, m, v, step, lr, cfg, apply_weight_decay)
    }

    fn global_grad_norm(&self, grads: &[&[f32]]) -> f64 {
        optim::global_grad_norm(grads)
    }

    fn clip_scale(&self, norm: f64, max_norm: f64) -> f32 {
        optim::clip_scale(norm, max_norm)
    }
}
