#!/usr/bin/env python3
"""Pipeline benchmark: `flotilla run` of the tiny model on 4 worker processes under several
layouts and schedules, interleaved over rounds, medians per configuration.

For each configuration it reads the run's `pipeline.jsonl` (one line per step: the step's
wall time as the slowest rank saw it, the measured bubble, the simulator's bubble for the
step's measured F/B/W costs, the all-to-all bytes and the longest time one rank's compute
spent inside MoE exchanges), drops the warm-up steps and prints medians as a Markdown table,
then the derived ratios BENCHMARKS.md quotes.

Usage: python3 tools/bench_pipeline.py [--steps 40] [--rounds 3] [--binary target/release/flotilla]
(stdlib only; build the release binary first). Not run in CI.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

BASE = os.path.join(os.path.dirname(__file__), "..", "examples", "tiny-pp-ep.toml")

# name -> overrides of the [parallel] table. The first five run 4 workers (2 cores: two
# processes per core); the last two run 2 workers, one per core.
CONFIGS = {
    "dualpipe pp2 ep2": {"pp": 2, "ep": 2, "schedule": "dualpipe", "micro_batches": 4},
    "dualpipe pp2 ep2, no overlap": {"pp": 2, "ep": 2, "schedule": "dualpipe", "micro_batches": 4, "overlap": False},
    "1f1b pp2 ep2": {"pp": 2, "ep": 2, "schedule": "1f1b", "micro_batches": 4},
    "dualpipe pp4 ep1": {"pp": 4, "ep": 1, "schedule": "dualpipe", "micro_batches": 8},
    "1f1b pp4 ep1": {"pp": 4, "ep": 1, "schedule": "1f1b", "micro_batches": 8},
    "2 workers: dualpipe pp2 ep1": {"pp": 2, "ep": 1, "schedule": "dualpipe", "micro_batches": 4},
    "2 workers: 1f1b pp2 ep1": {"pp": 2, "ep": 1, "schedule": "1f1b", "micro_batches": 4},
}


def config_text(base: str, overrides: dict) -> str:
    head, _, _ = base.rpartition("\n[parallel]")
    lines = ["[parallel]"]
    for key, value in overrides.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        else:
            lines.append(f"{key} = {value}")
    lines.append("dp = 1")
    # Relative data paths in the base stay valid: the config is written next to it.
    return head + "\n" + "\n".join(lines) + "\n"


def run(binary: str, text: str, steps: int, workdir: str) -> list:
    config = os.path.join(os.path.dirname(os.path.abspath(BASE)), f".bench-{os.getpid()}.toml")
    with open(config, "w") as f:
        f.write(text)
    out = os.path.join(workdir, "out")
    try:
        done = subprocess.run(
            [binary, "run", config, "--steps", str(steps), "--out", out],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    finally:
        os.remove(config)
    if done.returncode != 0:
        raise SystemExit(f"flotilla run failed:\n{done.stderr}")
    with open(os.path.join(out, "pipeline.jsonl")) as f:
        return [json.loads(line) for line in f]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--binary", default="target/release/flotilla")
    args = parser.parse_args()
    base = open(BASE).read()
    rows = {name: [] for name in CONFIGS}
    for r in range(args.rounds):
        for name, overrides in CONFIGS.items():
            with tempfile.TemporaryDirectory() as tmp:
                steps = run(args.binary, config_text(base, overrides), args.steps, tmp)
            rows[name].extend(steps[args.warmup:])
            print(f"round {r + 1}: {name}", file=sys.stderr)

    def med(name, key):
        return statistics.median(s[key] for s in rows[name])

    print(f"| configuration | step (ms) | bubble measured | bubble simulated | exchange wait (ms) | all-to-all MB/step |")
    print("|---|---|---|---|---|---|")
    for name in CONFIGS:
        print(
            f"| {name} | {1e3 * med(name, 'step_seconds'):.1f} | {100 * med(name, 'bubble_fraction'):.1f}% "
            f"| {100 * med(name, 'predicted_bubble_fraction'):.1f}% | {1e3 * med(name, 'exchange_seconds'):.1f} "
            f"| {med(name, 'exchange_bytes') / 1e6:.2f} |"
        )
    dp, fb = med("dualpipe pp2 ep2", "step_seconds"), med("1f1b pp2 ep2", "step_seconds")
    dp4, fb4 = med("dualpipe pp4 ep1", "step_seconds"), med("1f1b pp4 ep1", "step_seconds")
    serial = med("dualpipe pp2 ep2, no overlap", "step_seconds")
    wait_serial = med("dualpipe pp2 ep2, no overlap", "exchange_seconds")
    print()
    dp2, fb2 = med("2 workers: dualpipe pp2 ep1", "step_seconds"), med("2 workers: 1f1b pp2 ep1", "step_seconds")
    print(f"DualPipe / 1F1B step time: pp2 ep2 {dp / fb:.3f}, pp4 ep1 {dp4 / fb4:.3f}, 2 workers pp2 ep1 {dp2 / fb2:.3f}")
    print(
        f"overlap: step {1e3 * serial:.1f} ms serial vs {1e3 * dp:.1f} ms overlapped; "
        f"hidden fraction of the serial run's exchange wait = {(serial - dp) / wait_serial:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
