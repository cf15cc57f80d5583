"""OpenBLAS f32 GEMM reference for BENCHMARKS.md.

Times numpy's float32 matmul (OpenBLAS, as shipped in numpy's wheel) at the shapes
`cargo bench -p flotilla-kernels --bench kernels` measures, with the BLAS thread count
pinned by threadpoolctl, and prints the median GFLOP/s per shape and thread count.

Run from a venv, never in CI:
    python3 -m venv tools/.venv && tools/.venv/bin/pip install -r tools/requirements.txt
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE tools/.venv/bin/python tools/bench_openblas.py

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, where a machine sets them, force an older kernel;
unset both for this measurement. The script prints the kernel OpenBLAS chose.)
"""

import json
import statistics
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

# (m, n, k): C[m, n] = A[m, k] @ B[k, n]; the same shapes as the criterion benchmark.
SHAPES = [(1024, 1024, 1024), (4096, 4096, 1024)]
THREADS = [1, 2]
SAMPLES = 10


def median_seconds(a, b, out):
    np.matmul(a, b, out=out)  # warm-up
    times = []
    for _ in range(SAMPLES):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    rng = np.random.default_rng(0)
    blas = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    print("numpy", np.__version__, "openblas", json.dumps(blas), file=sys.stderr)
    results = []
    for m, n, k in SHAPES:
        a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        b = rng.uniform(-1, 1, (k, n)).astype(np.float32)
        out = np.empty((m, n), np.float32)
        for threads in THREADS:
            with threadpool_limits(limits=threads, user_api="blas"):
                s = median_seconds(a, b, out)
            gflops = 2 * m * n * k / s / 1e9
            results.append({"shape": f"{m}x{n}x{k}", "threads": threads, "median_s": s, "gflops": gflops})
            print(f"openblas f32 {m}x{n}x{k} t{threads}: {gflops:7.1f} GFLOP/s (median of {SAMPLES}: {s * 1e3:.2f} ms)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
