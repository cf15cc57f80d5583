"""Summarizes the last `cargo bench -p flotilla-kernels --bench kernels` run for BENCHMARKS.md.

Reads criterion's `target/criterion/**/new/{benchmark,estimates}.json`, takes each case's
median time, and prints throughput and the ratios the issue asks for, each against its
reference measured in the same run:
  - FP8 quantization (1×128) GB/s over memcpy of the same bytes, per thread count;
  - block-scaled FP8 GEMM and BF16 GEMM GFLOP/s over the f32 GEMM at the same shape.
No third-party packages; run with any python3 after the benchmark:
    python3 tools/criterion_summary.py [target/criterion]
"""

import json
import pathlib
import sys


def load(root):
    cases = {}
    for bench in pathlib.Path(root).glob("**/new/benchmark.json"):
        meta = json.loads(bench.read_text())
        est = json.loads((bench.parent / "estimates.json").read_text())
        median_s = est["median"]["point_estimate"] / 1e9
        (unit, amount), = meta["throughput"].items()
        cases[meta["full_id"]] = {"median_s": median_s, "per_s": amount / median_s, "unit": unit}
    return cases


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"
    cases = load(root)
    if not cases:
        sys.exit(f"no criterion results under {root}: run the benchmark first")
    print(f"{'case':<48} {'median':>12} {'throughput':>16}")
    for name, c in sorted(cases.items()):
        rate = c["per_s"] / 1e9
        unit = "GFLOP/s" if c["unit"] == "Elements" else "GB/s"
        print(f"{name:<48} {c['median_s'] * 1e3:>9.2f} ms {rate:>9.2f} {unit}")

    print("\nratios (median against median, same run):")
    for threads in (1, 2):
        for quant in [k for k in cases if k.startswith(f"quantize/fp8-1x128/t{threads}/")]:
            shape = quant.rsplit("/", 1)[1]
            ref = cases.get(f"quantize/memcpy/t{threads}/{shape}")
            if ref:
                print(f"  FP8 1x128 quantization / memcpy, {shape}, t{threads}: {cases[quant]['per_s'] / ref['per_s']:.2f}")
        for kind in ("fp8-blockscaled", "bf16"):
            for case in [k for k in cases if k.startswith(f"gemm/{kind}/t{threads}/")]:
                shape = case.rsplit("/", 1)[1]
                ref = cases.get(f"gemm/f32/t{threads}/{shape}")
                if ref:
                    print(f"  {kind} GEMM / f32 GEMM, {shape}, t{threads}: {cases[case]['per_s'] / ref['per_s']:.2f}")


if __name__ == "__main__":
    main()
