"""flotilla's f32 GEMM against OpenBLAS, measured side by side, for BENCHMARKS.md.

Shared machines are noisy, so the two are interleaved: in each round, for each shape and
thread count, numpy's float32 matmul (the OpenBLAS shipped in numpy's wheel, its thread
count pinned by threadpoolctl) and `flotilla bench gemm` (a rayon pool of the same size)
each take the median of a few repetitions, back to back. The report gives, per shape and
thread count, the median over rounds of each side's GFLOP/s and of the per-round ratio.

Run from a venv, never in CI:
    cargo build --release
    python3 -m venv tools/.venv && tools/.venv/bin/pip install -r tools/requirements.txt
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE tools/.venv/bin/python tools/bench_openblas.py

(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, where a machine sets them, force an older kernel;
unset both for this measurement. The script prints the kernel OpenBLAS chose.)
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

# (m, n, k): C[m, n] = A[m, k] @ B[k, n]; the shapes the criterion suite measures too.
SHAPES = [(1024, 1024, 1024), (4096, 4096, 1024)]
THREADS = [1, 2]
PAUSE_S = 1.0


def openblas_gflops(a, b, out, reps):
    np.matmul(a, b, out=out)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t)
    m, k = a.shape
    n = b.shape[1]
    return 2 * m * n * k / statistics.median(times) / 1e9


def flotilla_gflops(binary, m, n, k, threads, reps):
    cmd = [binary, "bench", "gemm", "--kind", "f32", f"--m={m}", f"--n={n}", f"--k={k}"]
    cmd += [f"--threads={threads}", f"--reps={reps}", "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["gflops"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flotilla", default="target/release/flotilla", help="the flotilla binary")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per side per round")
    args = parser.parse_args()

    blas = [i for i in threadpool_info() if i.get("internal_api") == "openblas"]
    print(f"numpy {np.__version__}; OpenBLAS {json.dumps(blas)}", file=sys.stderr)
    rng = np.random.default_rng(0)
    inputs = {}
    for m, n, k in SHAPES:
        a = rng.uniform(-1, 1, (m, k)).astype(np.float32)
        b = rng.uniform(-1, 1, (k, n)).astype(np.float32)
        inputs[(m, n, k)] = (a, b, np.empty((m, n), np.float32))

    samples = {(s, t): {"openblas": [], "flotilla": [], "ratio": []} for s in SHAPES for t in THREADS}
    for r in range(args.rounds):
        for shape in SHAPES:
            for threads in THREADS:
                with threadpool_limits(limits=threads, user_api="blas"):
                    ob = openblas_gflops(*inputs[shape], args.reps)
                # OpenBLAS's idle workers spin for a while after a call; let them sleep
                # before the other side runs, so it does not share the cores with them.
                time.sleep(PAUSE_S)
                fl = flotilla_gflops(args.flotilla, *shape, threads, args.reps)
                time.sleep(PAUSE_S)
                entry = samples[(shape, threads)]
                entry["openblas"].append(ob)
                entry["flotilla"].append(fl)
                entry["ratio"].append(fl / ob)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    results = []
    print(f"{'shape':>16} {'threads':>7} {'OpenBLAS GFLOP/s':>17} {'flotilla GFLOP/s':>17} {'ratio':>6}")
    for (shape, threads), entry in samples.items():
        row = {
            "shape": "x".join(map(str, shape)),
            "threads": threads,
            "openblas_gflops": statistics.median(entry["openblas"]),
            "flotilla_gflops": statistics.median(entry["flotilla"]),
            "ratio": statistics.median(entry["ratio"]),
        }
        results.append(row)
        print(
            f"{row['shape']:>16} {threads:>7} {row['openblas_gflops']:>17.1f} "
            f"{row['flotilla_gflops']:>17.1f} {row['ratio']:>6.2f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
