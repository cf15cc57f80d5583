//! Kernel benchmarks, each beside the reference it is judged against (BENCHMARKS.md):
//! - f32 GEMM at 1024³ and 4096×4096×1024 (OpenBLAS is measured by `tools/bench_openblas.py`);
//! - 1×128 FP8 quantization against a plain memcpy of the same bytes;
//! - block-scaled FP8 GEMM and BF16 GEMM against the f32 GEMM at the same shape.
//!
//! Every case runs inside a rayon pool of a fixed size, named in the benchmark id (`t1`,
//! `t2`), so that thread counts are explicit. `FLOTILLA_BENCH_QUICK=1` keeps only the
//! small shapes (for a fast look).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use flotilla_kernels::gemm::{Accumulation, MatMut, MatRef, gemm_bf16, gemm_f32, gemm_fp8};
use flotilla_kernels::quant::{Fp8Matrix, Granularity, QuantConfig, quantize, quantize_into};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::hint::black_box;
use std::time::Duration;

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect()
}

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("rayon pool")
}

fn quick() -> bool {
    std::env::var_os("FLOTILLA_BENCH_QUICK").is_some()
}

/// (m, n, k) of the GEMM shapes the issue names: C[m, n] = A[m, k]·B[k, n].
fn gemm_shapes() -> Vec<(usize, usize, usize)> {
    if quick() { vec![(1024, 1024, 1024)] } else { vec![(1024, 1024, 1024), (4096, 4096, 1024)] }
}

fn bench_gemm(c: &mut Criterion) {
    let mut group = c.benchmark_group("gemm");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    for (m, n, k) in gemm_shapes() {
        let flops = 2 * m * n * k;
        let a = random(m * k, 1);
        let b = random(k * n, 2);
        let mut out = vec![0f32; m * n];
        let shape = format!("{m}x{n}x{k}");
        group.throughput(Throughput::Elements(flops as u64));
        for threads in [1, 2] {
            let pool = pool(threads);
            group.bench_function(BenchmarkId::new(format!("f32/t{threads}"), &shape), |bench| {
                pool.install(|| {
                    bench.iter(|| {
                        gemm_f32(
                            MatMut::row_major(&mut out, m, n, "c").unwrap(),
                            0.0,
                            MatRef::row_major(&a, m, k, "a").unwrap(),
                            MatRef::row_major(&b, k, n, "b").unwrap(),
                            1.0,
                            threads,
                        )
                        .unwrap();
                        black_box(&out);
                    })
                })
            });
        }
        if (m, n, k) != (1024, 1024, 1024) {
            continue;
        }
        // The lower-precision GEMMs at 1024³ against the f32 GEMM above.
        let a16: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
        let b16: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        // FP8 is NT: B is given as [n, k].
        let bt = random(n * k, 3);
        let qa = quantize(&a, m, k, Granularity::Tile1x128, &QuantConfig::default()).unwrap();
        let qb = quantize(&bt, n, k, Granularity::Block128x128, &QuantConfig::default()).unwrap();
        for threads in [1, 2] {
            let pool = pool(threads);
            group.bench_function(BenchmarkId::new(format!("bf16/t{threads}"), &shape), |bench| {
                pool.install(|| {
                    bench.iter(|| {
                        gemm_bf16(
                            MatMut::row_major(&mut out, m, n, "c").unwrap(),
                            0.0,
                            MatRef::row_major(&a16, m, k, "a").unwrap(),
                            MatRef::row_major(&b16, k, n, "b").unwrap(),
                            1.0,
                            threads,
                        )
                        .unwrap();
                        black_box(&out);
                    })
                })
            });
            group.bench_function(BenchmarkId::new(format!("fp8-blockscaled/t{threads}"), &shape), |bench| {
                pool.install(|| {
                    bench.iter(|| {
                        gemm_fp8(&qa, &qb, Accumulation::F32, &mut out, threads).unwrap();
                        black_box(&out);
                    })
                })
            });
        }
    }
    group.finish();
}

fn bench_quantize(c: &mut Criterion) {
    let mut group = c.benchmark_group("quantize");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    // 4096 tokens × DeepSeek-V3's hidden size 7168: 117 MB of f32, far beyond the caches,
    // so both sides stream from memory. The quick run uses a cache-resident 1 MB matrix.
    let (rows, cols) = if quick() { (256, 1024) } else { (4096, 7168) };
    let x = random(rows * cols, 4);
    let bytes = (rows * cols * size_of::<f32>()) as u64;
    group.throughput(Throughput::Bytes(bytes));
    let shape = format!("{rows}x{cols}");
    let mut copy = vec![0f32; rows * cols];
    let (sr, sc) = Granularity::Tile1x128.scale_shape(rows, cols);
    let mut q =
        Fp8Matrix::from_parts(rows, cols, vec![0; rows * cols], vec![0.0; sr * sc], Granularity::Tile1x128)
            .unwrap();
    let cfg = QuantConfig::default();
    for threads in [1, 2] {
        let pool = pool(threads);
        // The reference: the same bytes copied by the same number of threads.
        group.bench_function(BenchmarkId::new(format!("memcpy/t{threads}"), &shape), |bench| {
            pool.install(|| {
                bench.iter(|| {
                    copy.par_chunks_mut(x.len().div_ceil(threads))
                        .zip(black_box(&x).par_chunks(x.len().div_ceil(threads)))
                        .for_each(|(d, s)| d.copy_from_slice(s));
                    black_box(&copy);
                })
            })
        });
        group.bench_function(BenchmarkId::new(format!("fp8-1x128/t{threads}"), &shape), |bench| {
            pool.install(|| {
                bench.iter(|| {
                    quantize_into(black_box(&x), rows, cols, &cfg, &mut q).unwrap();
                    black_box(&q);
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_gemm, bench_quantize);
criterion_main!(benches);
