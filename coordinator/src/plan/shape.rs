//! The model as the planner sees it ([`ModelShape`]): per layer, the embedding, the head
//! and one MTP module, a [`Part`] with its parameters, forward FLOPs per token, cached
//! activation bytes per token and MoE blocks; and the byte sizes of BF16 and FP8 values.
//!
//! Invariant: the figures come from [`ParameterCounts`] only (totals divided by the layers
//! of each kind, which are identical); the planner never sees a tensor. The activation
//! bytes are the ones the module docs of `plan` list under "Memory per GPU".

use flotilla_model::{ModelConfig, ParameterCounts};

/// Bytes of `n` values in BF16.
pub(super) fn bf16_bytes(n: u64) -> u64 {
    2 * n
}

/// Bytes of `n` activation values in FP8 with one FP32 scale per 1×128 tile.
pub(super) fn fp8_bytes(n: u64) -> u64 {
    n + 4 * n.div_ceil(128)
}

/// Bytes of `n` weights in FP8 with one FP32 scale per 128×128 block.
pub(super) fn fp8_weight_bytes(n: u64) -> u64 {
    n + 4 * n.div_ceil(128 * 128)
}

/// A piece of the model as the planner sees it.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Part {
    /// Parameters every GPU of a hosting rank holds whole.
    pub(super) replicated: u64,
    /// Of those, the weights of FP8 GEMMs.
    pub(super) replicated_fp8: u64,
    /// Routed-expert parameters (all experts; a GPU holds 1/ep of them).
    pub(super) routed: u64,
    /// Forward FLOPs per token.
    pub(super) flops: f64,
    /// Activation bytes cached per token until backward.
    pub(super) activations: u64,
    /// MoE blocks (each one all-to-all dispatch and combine).
    pub(super) moe_blocks: u32,
}

impl std::ops::AddAssign for Part {
    fn add_assign(&mut self, other: Part) {
        self.replicated += other.replicated;
        self.replicated_fp8 += other.replicated_fp8;
        self.routed += other.routed;
        self.flops += other.flops;
        self.activations += other.activations;
        self.moe_blocks += other.moe_blocks;
    }
}

/// The model reduced to the parts a layout places.
pub(super) struct ModelShape {
    pub(super) layers: Vec<Part>,
    pub(super) moe: Vec<bool>,
    pub(super) embedding: Part,
    /// Final norm and output head.
    pub(super) head: Part,
    /// One MTP module, with its pass through the shared head.
    pub(super) mtp: Part,
    pub(super) mtp_modules: u32,
    /// Whether the head's weight is the embedding matrix.
    pub(super) tied_embedding: bool,
    pub(super) hidden: u64,
    pub(super) routed_experts: usize,
    pub(super) experts_per_token: usize,
    pub(super) n_group: usize,
    pub(super) topk_group: usize,
}

impl ModelShape {
    /// Per-layer figures are the model's totals ([`ParameterCounts`]) divided by the
    /// layers of each kind, which are identical.
    pub(super) fn new(config: &ModelConfig, seq_len: u32) -> Self {
        let counts = ParameterCounts::of(config);
        let (main, mtp) = (counts.main, counts.mtp);
        let d = config.hidden_size as u64;
        let layers = config.num_hidden_layers;
        let moe: Vec<bool> = (0..layers).map(|l| config.is_moe_layer(l)).collect();
        let moe_layers = moe.iter().filter(|m| **m).count() as u64;
        let dense_layers = layers as u64 - moe_layers;
        let per = |total: u64, count: u64| total.checked_div(count).unwrap_or(0);

        let attention = per(main.attention, layers as u64);
        // Every norm but the final one belongs to a layer.
        let norms = per(main.norms - d, layers as u64);
        let dense_ffn = per(main.dense_ffn, dense_layers);
        let shared = per(main.shared_experts, moe_layers);
        let gates = per(main.gates, moe_layers);
        let routed = per(main.routed_experts, moe_layers);
        let k = config.num_experts_per_tok as u64;
        let expert = per(routed, config.n_routed_experts as u64);

        let heads = config.num_attention_heads as u64;
        let causal_keys = (seq_len as f64 + 1.0) / 2.0;
        let attention_core =
            2.0 * heads as f64 * (config.qk_head_dim() + config.v_head_dim) as f64 * causal_keys;
        let attention_activations = bf16_bytes(d)
            + config.q_lora_rank.map_or(0, |r| bf16_bytes(r as u64))
            + bf16_bytes((config.kv_lora_rank + config.qk_rope_head_dim) as u64)
            + fp8_bytes(heads * config.v_head_dim as u64)
            + 4 * heads;
        let dense = Part {
            replicated: attention + norms + dense_ffn,
            replicated_fp8: attention + dense_ffn,
            routed: 0,
            flops: 2.0 * (attention + dense_ffn) as f64 + attention_core,
            activations: attention_activations
                + bf16_bytes(d)
                + fp8_bytes(2 * config.intermediate_size as u64),
            moe_blocks: 0,
        };
        let shared_count = config.n_shared_experts as u64;
        let moe_layer = Part {
            replicated: attention + norms + shared + gates,
            replicated_fp8: attention + shared,
            routed,
            flops: 2.0 * (attention + shared + gates + k * expert) as f64 + attention_core,
            activations: attention_activations
                + bf16_bytes(d)
                + k * 12
                + k * fp8_bytes(d)
                + (k + shared_count) * fp8_bytes(2 * config.moe_intermediate_size as u64),
            moe_blocks: 1,
        };
        let vocab = config.vocab_size as u64;
        let head = Part {
            replicated: main.head + d,
            replicated_fp8: 0,
            routed: 0,
            flops: 2.0 * (vocab * d) as f64,
            activations: bf16_bytes(d),
            moe_blocks: 0,
        };
        let embedding = Part { replicated: main.embedding, activations: 4, ..Part::default() };

        let modules = config.num_nextn_predict_layers as u64;
        let mtp_block = if config.n_routed_experts > 0 { moe_layer } else { dense };
        let mtp_routed = per(mtp.routed_experts, modules);
        let projection = per(mtp.mtp_projection, modules);
        let mtp_part = Part {
            replicated: per(mtp.total(), modules) - mtp_routed,
            replicated_fp8: per(
                mtp.attention + mtp.dense_ffn + mtp.shared_experts + mtp.mtp_projection,
                modules,
            ),
            routed: mtp_routed,
            flops: mtp_block.flops + 2.0 * projection as f64 + head.flops,
            activations: mtp_block.activations + 2 * bf16_bytes(d) + fp8_bytes(2 * d) + bf16_bytes(d) + 4,
            moe_blocks: mtp_block.moe_blocks,
        };

        ModelShape {
            layers: moe.iter().map(|&m| if m { moe_layer } else { dense }).collect(),
            moe,
            embedding,
            head,
            mtp: mtp_part,
            mtp_modules: modules as u32,
            tied_embedding: config.tie_word_embeddings,
            hidden: d,
            routed_experts: config.n_routed_experts,
            experts_per_token: config.num_experts_per_tok,
            n_group: config.n_group,
            topk_group: config.topk_group,
        }
    }

    /// Whether the last stage reads the embedding matrix: for the MTP modules' lookup of the
    /// next tokens, or as a tied head.
    pub(super) fn last_stage_uses_embedding(&self) -> bool {
        self.mtp_modules > 0 || self.tied_embedding
    }
}
