#!/usr/bin/env python3
"""Write the `config.json` fixtures that `model/tests/hf_configs.rs` reads: DeepSeek-V3 and
DeepSeek-V2 configurations as transformers 4.x and 5.x save them, and DeepSeek's released
`config.json`. Not run by CI; the files it writes are committed under
`model/tests/fixtures/hf_configs/`.

Two venvs, since one Python cannot hold both transformers majors (configs need no torch):

    python3 -m venv tools/.venv-hf  && tools/.venv-hf/bin/pip install -r tools/requirements-hf.txt
    python3 -m venv tools/.venv-hf4 && tools/.venv-hf4/bin/pip install "transformers>=4.50,<5"
    tools/.venv-hf4/bin/python tools/hf_config_fixtures.py   # writes the *.t4.json files
    tools/.venv-hf/bin/python  tools/hf_config_fixtures.py   # writes the *.t5.json files

Each run writes, for the running transformers major M:

- `released.tM.json`: DeepSeek's released config (below, as published with the weights:
  `rope_scaling` with `"type": "yarn"`, `quantization_config` fp8 with 128x128 blocks)
  loaded by `DeepseekV3Config(**released)` and saved again. transformers 4 adds
  `rope_type` beside `type`; transformers 5 moves RoPE into `rope_parameters` holding both.
- `tiny_v3.tM.json`: a small DeepSeek-V3 made with `DeepseekV3Config(...)` (no YaRN).
- `v2_lite.tM.json`: DeepSeek-V2-Lite's shape with `DeepseekV2Config` (no query
  compression: `q_lora_rank: null`; softmax gate, `topk_method: "greedy"`), which flotilla
  must refuse naming the gate it lacks.
- `v2_sigmoid.tM.json`: a `deepseek_v2` config with DeepSeek-V3's gate (`scoring_func:
  "sigmoid"`, `topk_method: "noaux_tc"`) and `q_lora_rank: null`: the same architecture,
  which flotilla reads.

and, under both majors, `flotilla_written.check.tM.json`: the result of loading
`flotilla_written.json` (the exact `config.json` flotilla writes for the `tiny` preset, a
fixture the Rust test keeps equal to flotilla's output) with this transformers, so that
what flotilla writes is known to load in transformers 4 and 5.

`released.json` (the published file itself) is written by either run.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import transformers
from transformers import DeepseekV2Config, DeepseekV3Config

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "model" / "tests" / "fixtures" / "hf_configs"

# deepseek-ai/DeepSeek-V3's config.json as released with the weights.
RELEASED = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV3Config",
        "AutoModel": "modeling_deepseek.DeepseekV3Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 3,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 61,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "pretraining_tp": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}

TINY_V3 = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=160,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=32,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=128,
)

V2_LITE = dict(
    vocab_size=102400,
    hidden_size=2048,
    intermediate_size=10944,
    moe_intermediate_size=1408,
    num_hidden_layers=27,
    num_attention_heads=16,
    num_key_value_heads=16,
    n_shared_experts=2,
    n_routed_experts=64,
    num_experts_per_tok=6,
    first_k_dense_replace=1,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=128,
    v_head_dim=128,
    routed_scaling_factor=1.0,
    topk_method="greedy",
    norm_topk_prob=False,
    max_position_embeddings=163840,
)

V2_SIGMOID = dict(
    TINY_V3,
    q_lora_rank=None,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    moe_layer_freq=1,
)


def save(config, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        text = (Path(tmp) / "config.json").read_text()
    (OUT / name).write_text(text)
    print(f"wrote {OUT / name}")


def main() -> int:
    major = int(transformers.__version__.split(".")[0])
    if major not in (4, 5):
        print(f"transformers {transformers.__version__}: expected 4.x or 5.x", file=sys.stderr)
        return 1
    tag = f"t{major}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "released.json").write_text(json.dumps(RELEASED, indent=2) + "\n")

    released = dict(RELEASED)
    released.pop("model_type")
    save(DeepseekV3Config(**released), f"released.{tag}.json")
    save(DeepseekV3Config(**TINY_V3), f"tiny_v3.{tag}.json")
    save(DeepseekV2Config(**V2_LITE), f"v2_lite.{tag}.json")
    save(DeepseekV2Config(**V2_SIGMOID), f"v2_sigmoid.{tag}.json")

    # What flotilla writes must load here.
    written = OUT / "flotilla_written.json"
    if written.exists():
        loaded = DeepseekV3Config.from_dict(json.loads(written.read_text()))
        rope = getattr(loaded, "rope_parameters", None) or getattr(loaded, "rope_scaling", None)
        check = {
            "transformers": transformers.__version__,
            "loaded": type(loaded).__name__,
            "hidden_size": loaded.hidden_size,
            "num_hidden_layers": loaded.num_hidden_layers,
            "n_routed_experts": loaded.n_routed_experts,
            "q_lora_rank": loaded.q_lora_rank,
            "num_nextn_predict_layers": getattr(loaded, "num_nextn_predict_layers", None),
            "rope_theta": (rope or {}).get("rope_theta", getattr(loaded, "rope_theta", None)),
        }
        (OUT / f"flotilla_written.check.{tag}.json").write_text(json.dumps(check, indent=2) + "\n")
        print(f"loaded {written.name}: {check}")
    else:
        print(f"{written} is missing: run `cargo test -p flotilla-model --test hf_configs` first",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
