#!/usr/bin/env python3
"""Write the greedy-generation fixture that `model/tests/hf_generate.rs` and the CLI test
`tests/generate_cli.rs` check `flotilla generate` against: transformers' own
`DeepseekV3ForCausalLM.generate` (greedy, `do_sample=False`) on the committed checkpoint
`model/tests/fixtures/hf_checkpoints/sharded_bf16` (written by
`tools/hf_checkpoint_fixtures.py`: 8 bf16 shards, no MTP tensors). Not run by CI; the
fixture it writes is committed (a few KB).

Run from the repository root (CPU only; a few seconds):

    python3 -m venv tools/.venv-hf                    # git-ignored (/tools/.venv*)
    tools/.venv-hf/bin/pip install -r tools/requirements-hf.txt
    tools/.venv-hf/bin/python tools/hf_generate_fixture.py   # [--out FILE] [--check]

`--check` builds and verifies everything but writes nothing.

Writes `model/tests/fixtures/hf_generate/greedy.json`:

- `checkpoint`: the checkpoint directory, relative to `model/tests/fixtures/`;
- `max_new_tokens`, `eos_token_id` (the config's: transformers' `generate` stops at it and
  keeps it, so flotilla is run with it as its stop token);
- `prompts`: each with `input_ids`, `generated` (the new ids, without the prompt),
  `margins` (per generated token, the gap between the highest and second-highest raw
  logit of that step, in float64) and `routing_margin` (the smallest gap, over every
  position of prompt + generation and every MoE layer, between the last kept and first
  dropped group score and k-th and (k+1)-th expert score);
- the versions and the seed.

The reference is computed in float64 (the bf16 weights upcast; eager attention and
experts), batch 1 per prompt (no padding). Self-checks: float32 `generate` gives the same
ids; every step's top-2 logit margin is at least `MIN_LOGIT_MARGIN` and every routing
margin at least `MIN_ROUTING_MARGIN` (else the next prompt seed is tried), so no rounding
of flotilla's float32 forward could flip a token or an expert; the generation does not
end before `max_new_tokens` unless at `eos_token_id`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import transformers
from transformers import DeepseekV3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "model" / "tests" / "fixtures"
CHECKPOINT = "hf_checkpoints/sharded_bf16"
DEFAULT_OUT = FIXTURES / "hf_generate" / "greedy.json"

PROMPT_LENGTHS = (4, 7, 11)
MAX_NEW_TOKENS = 16
MIN_LOGIT_MARGIN = 1e-3
MIN_ROUTING_MARGIN = 1e-3
MAX_SEED_TRIES = 200


def load(dtype: torch.dtype) -> DeepseekV3ForCausalLM:
    model = DeepseekV3ForCausalLM.from_pretrained(
        FIXTURES / CHECKPOINT, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    return model.eval()


def greedy(model, ids: list[int]) -> tuple[list[int], list[float]]:
    """transformers' greedy `generate`: the new ids and each step's top-2 raw-logit gap."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=MAX_NEW_TOKENS,
            eos_token_id=model.config.eos_token_id,
            pad_token_id=model.config.eos_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    generated = out.sequences[0, len(ids) :].tolist()
    margins = []
    for step, logits in enumerate(out.logits):
        top = logits[0].double().topk(2)
        assert top.indices[0].item() == generated[step], "generate's token is its top logit"
        margins.append((top.values[0] - top.values[1]).item())
    return generated, margins


def routing_margin(model, ids: list[int]) -> float:
    """The smallest group and expert selection gap over every position (a forward of the
    whole sequence routes each position as the cached generation did: attention is causal)."""
    cfg = model.config
    margins = []

    def hook(module, inputs, _output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        scores = torch.sigmoid(x @ module.weight.double().t()) + module.e_score_correction_bias.double()
        per_group = scores.view(x.shape[0], cfg.n_group, -1)
        group_scores = per_group.topk(2, dim=-1).values.sum(-1)
        g = group_scores.sort(dim=-1, descending=True).values
        margins.append((g[:, cfg.topk_group - 1] - g[:, cfg.topk_group]).min().item())
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices
        mask = torch.full_like(group_scores, float("-inf")).scatter(1, keep, 0.0)
        masked = (per_group + mask.unsqueeze(-1)).view(x.shape[0], -1).sort(dim=-1, descending=True).values
        k = cfg.num_experts_per_tok
        margins.append((masked[:, k - 1] - masked[:, k]).min().item())

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    for h in handles:
        h.remove()
    assert margins, "the checkpoint has MoE layers"
    return min(margins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="verify, write nothing")
    args = parser.parse_args()

    f64, f32 = load(torch.float64), load(torch.float32)
    eos = f64.config.eos_token_id
    vocab = f64.config.vocab_size
    assert max(PROMPT_LENGTHS) + MAX_NEW_TOKENS <= f64.config.max_position_embeddings

    prompts = []
    for length in PROMPT_LENGTHS:
        for seed in range(length * 1000, length * 1000 + MAX_SEED_TRIES):
            gen = torch.Generator().manual_seed(seed)
            # Ids 2.. (not bos 0 or eos 1), so a prompt reads as text would.
            ids = torch.randint(2, vocab, (length,), generator=gen).tolist()
            generated, margins = greedy(f64, ids)
            stopped = generated[-1] == eos
            assert len(generated) == MAX_NEW_TOKENS or stopped, (ids, generated)
            if min(margins) < MIN_LOGIT_MARGIN:
                continue
            r = routing_margin(f64, ids + generated)
            if r < MIN_ROUTING_MARGIN:
                continue
            again, _ = greedy(f32, ids)
            assert again == generated, f"float32 {again} != float64 {generated} for {ids}"
            break
        else:
            raise SystemExit(f"no seed gives margins ≥ the minimums for a prompt of {length} tokens")
        print(
            f"prompt {ids}: {len(generated)} new{' (eos)' if stopped else ''}, "
            f"min logit margin {min(margins):.2e}, routing margin {r:.2e}"
        )
        prompts.append(
            dict(seed=seed, input_ids=ids, generated=generated, margins=margins, routing_margin=r)
        )

    fixture = dict(
        checkpoint=CHECKPOINT,
        max_new_tokens=MAX_NEW_TOKENS,
        eos_token_id=eos,
        min_logit_margin=MIN_LOGIT_MARGIN,
        min_routing_margin=MIN_ROUTING_MARGIN,
        prompts=prompts,
        dtype="float64",
        transformers=transformers.__version__,
        torch=torch.__version__,
    )
    if args.check:
        print("check passed; nothing written")
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
