#!/usr/bin/env python3
"""Write the checkpoint fixtures that `model/tests/hf_checkpoints.rs` reads: a small
DeepSeek-V3 checkpoint as transformers' `save_pretrained` shards it, without the MTP
module (transformers drops `model.layers.{N}.*` on load and save), and the same weights in
DeepSeek's released FP8 form, each with transformers' logits for a fixed input. Not run by
CI; the fixtures it writes are committed (0.6 MB in all).

Run from the repository root (CPU only; a few seconds):

    python3 -m venv tools/.venv-hf                    # git-ignored (/tools/.venv*)
    tools/.venv-hf/bin/pip install -r tools/requirements-hf.txt
    tools/.venv-hf/bin/python tools/hf_checkpoint_fixtures.py   # [--out DIR]

Writes under `model/tests/fixtures/hf_checkpoints/`:

- `sharded_bf16/`: `DeepseekV3ForCausalLM(config)` (transformers' own random init,
  seeded), cast to bfloat16 and saved by `save_pretrained(max_shard_size=MAX_SHARD)`:
  several `model-0000i-of-0000N.safetensors` shards, `model.safetensors.index.json`,
  `config.json` with `num_nextn_predict_layers = 1` but no MTP tensors.
- `sharded_fp8/`: the same bf16 weights as saved (one tensor per routed expert), every 2-D linear weight except the embedding,
  the head and the MoE gates quantized to `float8_e4m3fn` with one float32
  `weight_scale_inv` per 128×128 block (`scale = amax / 448`, the partial edge blocks of
  the 144- and 160-wide dimensions included), the rest bf16, written by
  `huggingface_hub.save_torch_state_dict` (the shard writer `save_pretrained` uses) with
  DeepSeek's `quantization_config` in `config.json`.
- `reference.safetensors`: `input_ids` (int64 `[1, SEQ]`), and float32 `logits_bf16`,
  `logits_fp8` `[1, SEQ, vocab]`: transformers' float32 forward with the bf16 weights,
  and with the FP8 weights dequantized (`code · scale_inv` per block) and loaded by
  `from_pretrained`.

Self-checks: the bf16 checkpoint reloads with `from_pretrained` to the same logits; the
FP8 one has full and partial blocks; every routing decision has a margin of at least
`MIN_MARGIN` (else the next seed is tried), so float32 rounding cannot flip an expert.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
from pathlib import Path

import safetensors.torch
import torch
import transformers
from huggingface_hub import save_torch_state_dict
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "model" / "tests" / "fixtures" / "hf_checkpoints"

SEQ = 10
MAX_SHARD = "60KB"
MIN_MARGIN = 1e-3
BLOCK = 128

CONFIG = dict(
    vocab_size=64,
    hidden_size=144,  # > 128 and not a multiple of it: full and partial FP8 blocks
    intermediate_size=160,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    first_k_dense_replace=1,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    n_shared_experts=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,  # the config says 1; transformers saves no MTP weights
    attention_bias=False,
    attention_dropout=0.0,
    hidden_act="silu",
    rope_interleave=True,
    initializer_range=0.1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def eager_config() -> DeepseekV3Config:
    return DeepseekV3Config(**CONFIG, attn_implementation="eager", experts_implementation="eager")


def is_fp8_weight(name: str, shape) -> bool:
    """flotilla's `is_fp8_weight`: DeepSeek's released choice."""
    return (
        len(shape) == 2
        and name.endswith(".weight")
        and name not in ("model.embed_tokens.weight", "lm_head.weight")
        and not name.endswith(".mlp.gate.weight")
    )


def quantize_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    sr, sc = -(-rows // BLOCK), -(-cols // BLOCK)
    scales = torch.empty(sr, sc, dtype=torch.float32)
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    w = w.float()
    for i in range(sr):
        for j in range(sc):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            amax = block.abs().max().item()
            scale = amax / 448.0 if amax > 0 else 1.0
            scales[i, j] = scale
            codes[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (block / scale).to(torch.float8_e4m3fn)
    return codes, scales


def dequantize_block(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    full = scales.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: codes.shape[0], : codes.shape[1]]
    return codes.float() * full


def routing_margin(model, ids) -> float:
    """The smallest gap between the last chosen and first dropped group and expert score."""
    margins = []

    def hook(module, inputs, _output):
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
        scores = torch.sigmoid(x @ module.weight.float().t()) + module.e_score_correction_bias.float()
        per_group = scores.view(x.shape[0], CONFIG["n_group"], -1)
        group_scores = per_group.topk(2, dim=-1).values.sum(-1)
        g = group_scores.sort(dim=-1, descending=True).values
        margins.append((g[:, CONFIG["topk_group"] - 1] - g[:, CONFIG["topk_group"]]).min().item())
        keep = group_scores.topk(CONFIG["topk_group"], dim=-1).indices
        mask = torch.full_like(group_scores, float("-inf")).scatter(1, keep, 0.0)
        masked = (per_group + mask.unsqueeze(-1)).view(x.shape[0], -1).sort(dim=-1, descending=True).values
        k = CONFIG["num_experts_per_tok"]
        margins.append((masked[:, k - 1] - masked[:, k]).min().item())

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n.endswith("mlp.gate")]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return min(margins)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    out: Path = args.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    for seed in range(100, 300):
        torch.manual_seed(seed)
        model = DeepseekV3ForCausalLM(eager_config()).eval()
        assert model.config._attn_implementation == "eager"
        # bf16 weights, computed in float32 (the rotary tables stay float32).
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.copy_(tensor.to(torch.bfloat16).to(torch.float32))
        ids = torch.randint(0, CONFIG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(seed))
        if routing_margin(model, ids) >= MIN_MARGIN:
            break
    else:
        raise SystemExit("no seed gives routing margins ≥ MIN_MARGIN")
    print(f"seed {seed}, routing margin {routing_margin(model, ids):.2e}")
    assert not any(k.startswith(f"model.layers.{CONFIG['num_hidden_layers']}.") for k in model.state_dict())

    with torch.no_grad():
        logits_bf16 = model(input_ids=ids).logits.float()

    bf16_dir = out / "sharded_bf16"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(bf16_dir, max_shard_size=MAX_SHARD)
    (bf16_dir / "generation_config.json").unlink(missing_ok=True)
    shards = sorted(p.name for p in bf16_dir.glob("*.safetensors"))
    assert len(shards) >= 3 and (bf16_dir / "model.safetensors.index.json").exists(), shards
    reloaded = DeepseekV3ForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    with torch.no_grad():
        again = reloaded.eval()(input_ids=ids).logits.float()
    assert torch.equal(again, logits_bf16)

    # FP8: the bf16 weights quantized per 128×128 block.
    # The tensors as saved (one per routed expert), not the module's fused state dict.
    state = {}
    for shard in shards:
        state.update(safetensors.torch.load_file(bf16_dir / shard))
    fp8_state, dequantized, partial = {}, {}, False
    for name, tensor in state.items():
        if is_fp8_weight(name, tensor.shape):
            codes, scales = quantize_block(tensor)
            fp8_state[name], fp8_state[f"{name}_scale_inv"] = codes, scales
            dequantized[name] = dequantize_block(codes, scales)
            partial |= tensor.shape[0] % BLOCK != 0 and tensor.shape[0] > BLOCK
        else:
            fp8_state[name] = tensor
            dequantized[name] = tensor.float()
    assert partial, "some FP8 weight must have full and partial blocks"
    fp8_dir = out / "sharded_fp8"
    fp8_dir.mkdir()
    save_torch_state_dict(fp8_state, fp8_dir, max_shard_size=MAX_SHARD, metadata={"format": "pt"})
    config_json = json.loads((bf16_dir / "config.json").read_text())
    config_json["quantization_config"] = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [BLOCK, BLOCK],
    }
    (fp8_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    # transformers' forward on the dequantized weights, loaded as a checkpoint.
    with tempfile.TemporaryDirectory() as tmp:
        save_torch_state_dict(dequantized, tmp, metadata={"format": "pt"})
        shutil.copy(bf16_dir / "config.json", Path(tmp) / "config.json")
        fp8_model = DeepseekV3ForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
        ).eval()
    with torch.no_grad():
        logits_fp8 = fp8_model(input_ids=ids).logits.float()

    safetensors.torch.save_file(
        {"input_ids": ids.to(torch.int64), "logits_bf16": logits_bf16.contiguous(), "logits_fp8": logits_fp8.contiguous()},
        out / "reference.safetensors",
        metadata={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "seed": str(seed),
        },
    )
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB): {len(shards)} bf16 shards, "
          f"{len(list(fp8_dir.glob('*.safetensors')))} FP8 shards")


if __name__ == "__main__":
    main()
