"""Training throughput of flotilla against PyTorch eager on the same model, for BENCHMARKS.md.

The model is the `tiny` preset without MTP (transformers' DeepseekV3ForCausalLM trains the
main model only): the same config, batch, sequence length, optimizer (AdamW) and thread
count on both sides. Rounds interleave the two so both see the same machine noise:

- flotilla: `flotilla train` on a generated config (`--steps` steps); its per-step
  `tokens_per_s` from metrics.jsonl, first `--warmup` steps dropped, median taken; peak RSS
  of the process from the kernel (wait4's ru_maxrss for that child).
- PyTorch: forward, loss, backward and AdamW step in eager mode with
  torch.set_num_threads(threads); fp32, and bf16 weights/activations
  (model.to(torch.bfloat16)) for the bf16 row; median tokens/s after warm-up; peak RSS
  of a fresh child process per run.

Run from the venv that tools/hf_reference.py uses, never in CI:
    cargo build --release
    tools/.venv-hf/bin/python tools/bench_pytorch_train.py [--threads 2] [--rounds 3]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

BATCH, SEQ, VOCAB = 8, 64, 256

# The `tiny` preset of flotilla (model/src/config.rs), without MTP.
TINY = dict(
    vocab_size=256, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
    q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
    routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=512, num_nextn_predict_layers=0, tie_word_embeddings=False,
)

FLOTILLA_TOML = """
seed = 0
steps = {steps}
batch_size = {batch}
seq_len = {seq}
threads = {threads}
precision = "{precision}"

[model]
preset = "tiny"
num_nextn_predict_layers = 0

[data]
kind = "synthetic"
tokens = 262144

[optimizer]
peak_lr = 1e-3
warmup_steps = 1
constant_steps = {steps}
decay_steps = 0
final_lr = 1e-3
beta1 = 0.9
beta2 = 0.95
eps = 1e-8
weight_decay = 0.1

[loss]
mtp_lambda = 0.0
balance_alpha = 0.0
"""


def run_flotilla(binary, steps, warmup, threads, precision):
    with tempfile.TemporaryDirectory() as tmp:
        config = os.path.join(tmp, "bench.toml")
        with open(config, "w") as f:
            f.write(FLOTILLA_TOML.format(steps=steps, batch=BATCH, seq=SEQ, threads=threads, precision=precision))
        child = subprocess.Popen(
            [binary, "train", config, "--out", os.path.join(tmp, "out")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would mix in the others).
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            sys.exit(f"flotilla train failed with exit code {child.returncode}")
        with open(os.path.join(tmp, "out", "metrics.jsonl")) as f:
            rates = [json.loads(line)["tokens_per_s"] for line in f]
    return statistics.median(rates[warmup:]), usage.ru_maxrss


def torch_child(steps, warmup, threads, dtype):
    """Runs in a fresh process: prints tokens/s and peak RSS as JSON."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY))
    if dtype == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=gen)
        start = time.perf_counter()
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(BATCH * SEQ / (time.perf_counter() - start))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"tokens_per_s": statistics.median(rates[warmup:]), "peak_kib": peak}))


def run_torch(steps, warmup, threads, dtype):
    out = subprocess.run(
        [sys.executable, __file__, "--torch-child", dtype, f"--steps={steps}", f"--warmup={warmup}", f"--threads={threads}"],
        check=True, capture_output=True, text=True,
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["tokens_per_s"], r["peak_kib"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--flotilla", default="target/release/flotilla")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--torch-child", choices=["fp32", "bf16"])
    args = p.parse_args()
    if args.torch_child:
        torch_child(args.steps, args.warmup, args.threads, args.torch_child)
        return

    results = {k: {"flotilla": [], "torch": [], "ratio": [], "flotilla_kib": [], "torch_kib": []} for k in ("fp32", "bf16")}
    for r in range(args.rounds):
        for precision in ("fp32", "bf16"):
            fl, fl_kib = run_flotilla(args.flotilla, args.steps, args.warmup, args.threads, precision)
            th, th_kib = run_torch(args.steps, args.warmup, args.threads, precision)
            e = results[precision]
            e["flotilla"].append(fl)
            e["torch"].append(th)
            e["ratio"].append(fl / th)
            e["flotilla_kib"].append(fl_kib)
            e["torch_kib"].append(th_kib)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    print(f"tiny (no MTP), batch {BATCH} × seq {SEQ}, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'precision':>9} {'flotilla tok/s':>15} {'PyTorch tok/s':>14} {'ratio':>6} {'flotilla MiB':>13} {'PyTorch MiB':>12}")
    for precision, e in results.items():
        fl_mib = max(e["flotilla_kib"]) / 1024
        print(
            f"{precision:>9} {statistics.median(e['flotilla']):>15.0f} {statistics.median(e['torch']):>14.0f} "
            f"{statistics.median(e['ratio']):>6.2f} {fl_mib:>13.0f} {max(e['torch_kib']) / 1024:>12.0f}"
        )


if __name__ == "__main__":
    main()
