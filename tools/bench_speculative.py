#!/usr/bin/env python3
"""MTP speculative decoding against plain greedy decoding with `flotilla generate`: the
acceptance rate of the MTP drafts and the decode speed-up, as BENCHMARKS.md reports them.
Standard library only.

    python3 tools/bench_speculative.py --model runs/tiny-shakespeare \\
        --text ../shared/data/tinyshakespeare.txt   # [--prompts 20] [--runs 3] ...

Prompts: `--prompts` snippets of `--prompt-bytes` bytes of the text, each starting at the
beginning of a line, at evenly spaced offsets (written to a JSONL file as
`{"prompt": ...}`). Each run generates `--max-new-tokens` greedily from every prompt, in
batches of `--batch-size`, once plainly and once with `--speculative mtp`, back to back;
the runs alternate which goes first. Reported: the median over runs of each mode's
decode tokens/s, their ratio, the acceptance rate (the same in every run: greedy decoding
is deterministic), and whether every run of both modes produced the same tokens (the
script fails if not: speculation must be lossless).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def snippets(text: bytes, count: int, length: int) -> list[str]:
    out = []
    for i in range(count):
        at = (len(text) * (2 * i + 1)) // (2 * count)
        at = text.index(b"\n", at) + 1  # the start of the next line
        chunk = text[at : at + length]
        out.append(chunk.decode("utf-8", errors="ignore"))
    return out


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return "unknown"


def generate(args, prompts: Path, speculative: bool) -> list[dict]:
    cmd = [
        str(args.bin), "generate", "--model", str(args.model), "--prompts", str(prompts),
        "--max-new-tokens", str(args.max_new_tokens), "--threads", str(args.threads), "--json",
    ]
    if args.batch_size:
        cmd += ["--batch-size", str(args.batch_size)]
    if speculative:
        cmd += ["--speculative", "mtp"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return [json.loads(line) for line in out.stdout.splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", type=Path, default=ROOT / "target" / "release" / "flotilla")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--text", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--prompt-bytes", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1, help="0: all prompts in one batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        texts = snippets(args.text.read_bytes(), args.prompts, args.prompt_bytes)
        prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
        speeds = {False: [], True: []}
        outputs = set()
        stats = {}
        for run in range(args.runs):
            for speculative in ([False, True] if run % 2 == 0 else [True, False]):
                lines = generate(args, prompts, speculative)
                outputs.add(json.dumps([line["tokens"] for line in lines]))
                stats[speculative] = lines[0]["stats"]
                speeds[speculative].append(stats[speculative]["decode_tokens_per_s"])
                print(
                    f"run {run + 1} {'mtp  ' if speculative else 'plain'}: "
                    f"decode {stats[speculative]['decode_tokens_per_s']:.1f} tokens/s "
                    f"in {stats[speculative]['decode_steps']} steps",
                    file=sys.stderr,
                )
    if len(outputs) != 1:
        sys.exit("speculative and plain greedy decoding produced different tokens")
    plain, mtp = statistics.median(speeds[False]), statistics.median(speeds[True])
    spec = stats[True]
    report = {
        "cpu": cpu_model(),
        "threads": args.threads,
        "prompts": args.prompts,
        "prompt_bytes": args.prompt_bytes,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": spec["batch_size"],
        "runs": args.runs,
        "acceptance_rate": spec["acceptance_rate"],
        "drafts": spec["drafts"],
        "accepted": spec["accepted"],
        "decode_steps_plain": stats[False]["decode_steps"],
        "decode_steps_mtp": spec["decode_steps"],
        "decode_tokens_per_s_plain": speeds[False],
        "decode_tokens_per_s_mtp": speeds[True],
        "median_plain": plain,
        "median_mtp": mtp,
        "speedup": mtp / plain,
        "identical_outputs": True,
        "kv_cache_bytes_per_token": spec["kv_cache_bytes_per_token"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
