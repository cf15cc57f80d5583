//! The seam's contract: the CPU backend (directly and through [`DeviceBackend`]) returns
//! what the free functions return, bit for bit, and CUDA answers its typed error.

use super::*;
use crate::gemm::{gemm_fp8, matmul};
use crate::loss::cross_entropy_forward_backward_in_place;
use crate::norm::rms_norm_forward;
use crate::optim::adamw_step;
use crate::quant::quantize;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

fn backends() -> [DeviceBackend; 2] {
    [DeviceBackend::Cpu(CpuBackend), open(Device::Cpu).expect("the CPU always opens")]
}

#[test]
fn cpu_opens_and_says_so() {
    let be = open(Device::Cpu).unwrap();
    assert_eq!(be, DeviceBackend::default());
    assert_eq!(be.device(), Device::Cpu);
    assert_eq!(Device::Cuda { ordinal: 3 }.to_string(), "cuda:3");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_typed_error() {
    let err = open(Device::Cuda { ordinal: 1 }).unwrap_err();
    assert_eq!(err, BackendError::BuiltWithoutCuda { ordinal: 1 });
    assert_eq!(err.to_string(), "cuda:1: flotilla was built without CUDA (build with --features cuda)");
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_with_the_feature_has_no_kernels_yet() {
    let err = open(Device::Cuda { ordinal: 1 }).unwrap_err();
    assert_eq!(err, BackendError::NoCudaKernels { ordinal: 1 });
    assert!(err.to_string().contains("no CUDA kernels yet"), "{err}");
    assert_eq!(CudaBackend::new(0).unwrap_err(), BackendError::NoCudaKernels { ordinal: 0 });
}

#[test]
fn dense_gemm_is_the_free_function_bit_for_bit() {
    let (m, k, n) = (7, 33, 5);
    let (a, b) = (random(m * k, 1), random(n * k, 2));
    let c0 = random(m * n, 3);
    let mut want = c0.clone();
    matmul(
        MatMut::row_major(&mut want, m, n, "c").unwrap(),
        0.5,
        MatRef::row_major(&a, m, k, "a").unwrap(),
        MatRef::row_major(&b, n, k, "b").unwrap().t(),
        1.5,
        2,
    )
    .unwrap();
    for be in backends() {
        let mut got = c0.clone();
        be.matmul(
            MatMut::row_major(&mut got, m, n, "c").unwrap(),
            0.5,
            MatRef::row_major(&a, m, k, "a").unwrap(),
            MatRef::row_major(&b, n, k, "b").unwrap().t(),
            1.5,
            2,
        )
        .unwrap();
        assert_eq!(bits(&got), bits(&want));
    }
    assert_ne!(bits(&want), bits(&c0), "the GEMM wrote its output");
}

#[test]
fn fp8_quantize_and_gemm_are_the_free_functions_bit_for_bit() {
    let (m, k, n) = (5, 256, 130);
    let (x, w) = (random(m * k, 4), random(n * k, 5));
    let cfg = QuantConfig::default();
    let qx = quantize(&x, m, k, Granularity::Tile1x128, &cfg).unwrap();
    let qw = quantize(&w, n, k, Granularity::Block128x128, &cfg).unwrap();
    let mut want = vec![0f32; m * n];
    gemm_fp8(&qx, &qw, Accumulation::F32, &mut want, 1).unwrap();
    for be in backends() {
        assert_eq!(be.quantize(&x, m, k, Granularity::Tile1x128, &cfg).unwrap(), qx);
        assert_eq!(be.quantize(&w, n, k, Granularity::Block128x128, &cfg).unwrap(), qw);
        let mut got = vec![0f32; m * n];
        be.gemm_fp8(&qx, &qw, Accumulation::F32, &mut got, 1).unwrap();
        assert_eq!(bits(&got), bits(&want));
        let mut deq = vec![0f32; m * k];
        be.dequantize_into(&qx, &mut deq).unwrap();
        assert_eq!(bits(&deq), bits(&qx.dequantize()));
    }
}

#[test]
fn norm_loss_and_adamw_are_the_free_functions_bit_for_bit() {
    let (rows, dim) = (4, 24);
    let (x, weight) = (random(rows * dim, 6), random(dim, 7));
    let (mut y, mut rstd) = (vec![0f32; rows * dim], vec![0f32; rows]);
    rms_norm_forward(&x, &weight, 1e-6, rows, dim, &mut y, &mut rstd).unwrap();
    let targets: Vec<u32> = (0..rows as u32).map(|r| (r * 7) % dim as u32).collect();
    let (mut dlogits, mut losses) = (y.clone(), vec![0f32; rows]);
    let loss = cross_entropy_forward_backward_in_place(&mut dlogits, &targets, rows, dim, 0.25, &mut losses)
        .unwrap();
    let cfg = AdamWConfig::default();
    let (mut p, g) = (random(dim, 8), random(dim, 9));
    let (mut m, mut v) = (vec![bf16::ZERO; dim], vec![bf16::ZERO; dim]);
    adamw_step(&mut p, &g, &mut m, &mut v, 1, 1e-3, &cfg, true).unwrap();
    for be in backends() {
        let (mut y2, mut rstd2) = (vec![0f32; rows * dim], vec![0f32; rows]);
        be.rms_norm_forward(&x, &weight, 1e-6, rows, dim, &mut y2, &mut rstd2).unwrap();
        assert_eq!((bits(&y2), bits(&rstd2)), (bits(&y), bits(&rstd)));
        let (mut dl2, mut losses2) = (y.clone(), vec![0f32; rows]);
        let loss2 = be
            .cross_entropy_forward_backward_in_place(&mut dl2, &targets, rows, dim, 0.25, &mut losses2)
            .unwrap();
        assert_eq!(loss2.to_bits(), loss.to_bits());
        assert_eq!((bits(&dl2), bits(&losses2)), (bits(&dlogits), bits(&losses)));
        let mut p2 = random(dim, 8);
        let (mut m2, mut v2) = (vec![bf16::ZERO; dim], vec![bf16::ZERO; dim]);
        be.adamw_step(&mut p2, &g, &mut m2, &mut v2, 1, 1e-3, &cfg, true).unwrap();
        assert_eq!((bits(&p2), m2.clone(), v2.clone()), (bits(&p), m.clone(), v.clone()));
        assert_eq!(be.global_grad_norm(&[&g]).to_bits(), crate::optim::global_grad_norm(&[&g]).to_bits());
    }
}

#[test]
fn errors_are_the_free_functions_errors() {
    let be = DeviceBackend::default();
    let (mut y, mut rstd) = (vec![0f32; 8], vec![0f32; 2]);
    let err = be.rms_norm_forward(&[0f32; 7], &[1f32; 4], 1e-6, 2, 4, &mut y, &mut rstd).unwrap_err();
    assert_eq!(err, KernelError::LengthMismatch { tensor: "x", expected: 8, actual: 7 });
}

#[test]
fn buffers_round_trip_through_the_backend() {
    let x = random(37, 11);
    for be in backends() {
        let buf = be.upload(&x).unwrap();
        assert_eq!(buf.device(), be.device());
        assert_eq!(buf.len(), x.len());
        assert_eq!(bits(buf.host()), bits(&x));
        assert_eq!(bits(&be.download(&buf).unwrap()), bits(&x));
        let zeros = be.zeros::<f64>(5).unwrap();
        assert_eq!(zeros.device(), be.device());
        assert_eq!(be.download(&zeros).unwrap(), vec![0.0f64; 5]);
        assert!(be.zeros::<f32>(0).unwrap().is_empty());
    }
}
