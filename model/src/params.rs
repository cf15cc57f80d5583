//! Parameter accounting: how many parameters a [`ModelConfig`] has, by component, in total
//! and activated per token, with and without the MTP modules.
//!
//! Counting follows the tensors of the HF DeepSeek-V3 checkpoint (every RMSNorm weight and
//! each MoE gate's `e_score_correction_bias` included). Two "activated" figures exist in
//! the literature and both are given:
//! - [`ParameterCounts::activated`]: what one token's forward pass reads — the embedding
//!   contributes the token's row only, routed experts only `num_experts_per_tok` of
//!   `n_routed_experts` per MoE layer. For DeepSeek-V3: 36.6B.
//! - [`ParameterCounts::activated_full_embedding`]: the total minus the experts a token does
//!   not use (the embedding counted whole, as totals count it). For DeepSeek-V3: 37.6B.
//!
//! The report's "37B" sits between the two and equals neither to 0.5%.
//!
//! MTP modules share the embedding and the output head with the main model
//! ([`ParameterCounts::mtp`] counts only their own weights: 11.6B for DeepSeek-V3), but HF
//! checkpoints store both again under each module's layer
//! ([`ParameterCounts::mtp_stored_copies`]), which is how the released checkpoint reaches
//! 685B.

use crate::config::ModelConfig;
use serde::Serialize;

/// Parameters per component.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Breakdown {
    /// Token embedding.
    pub embedding: u64,
    /// MLA projections: q (down, up, or plain), kv down with the rope key, kv up, o.
    pub attention: u64,
    /// Dense SwiGLU FFNs.
    pub dense_ffn: u64,
    /// Shared experts.
    pub shared_experts: u64,
    /// Routed experts.
    pub routed_experts: u64,
    /// MoE gates: the affinity matrix and the selection bias.
    pub gates: u64,
    /// Every RMSNorm weight.
    pub norms: u64,
    /// Output head.
    pub head: u64,
    /// MTP projections `M_k` (2d → d).
    pub mtp_projection: u64,
}

impl Breakdown {
    /// The sum over components.
    pub fn total(&self) -> u64 {
        self.embedding
            + self.attention
            + self.dense_ffn
            + self.shared_experts
            + self.routed_experts
            + self.gates
            + self.norms
            + self.head
            + self.mtp_projection
    }

    /// `(name, count)` per component, in a fixed order, for printing.
    pub fn components(&self) -> [(&'static str, u64); 9] {
        [
            ("embedding", self.embedding),
            ("attention (MLA)", self.attention),
            ("dense FFN", self.dense_ffn),
            ("shared experts", self.shared_experts),
            ("routed experts", self.routed_experts),
            ("gates", self.gates),
            ("norms", self.norms),
            ("head", self.head),
            ("MTP projections", self.mtp_projection),
        ]
    }

    fn add(&mut self, other: &Breakdown) {
        self.embedding += other.embedding;
        self.attention += other.attention;
        self.dense_ffn += other.dense_ffn;
        self.shared_experts += other.shared_experts;
        self.routed_experts += other.routed_experts;
        self.gates += other.gates;
        self.norms += other.norms;
        self.head += other.head;
        self.mtp_projection += other.mtp_projection;
    }
}

/// A model's parameter counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ParameterCounts {
    /// Every parameter of the main model.
    pub main: Breakdown,
    /// Parameters one token's forward pass through the main model reads.
    pub activated: Breakdown,
    /// The main model minus the routed experts a token does not use.
    pub activated_full_embedding: Breakdown,
    /// The MTP modules' own parameters (embedding and head are shared, so not included).
    pub mtp: Breakdown,
    /// Parameters one token's pass through the MTP modules reads, beyond the main model's.
    pub mtp_activated: Breakdown,
    /// The embedding and head copies HF checkpoints store under each MTP layer.
    pub mtp_stored_copies: u64,
}

impl ParameterCounts {
    /// Counts the parameters of `config` (which should have passed validation).
    pub fn of(config: &ModelConfig) -> Self {
        let d = config.hidden_size as u64;
        let vocab = config.vocab_size as u64;

        let mut main = Breakdown::default();
        let mut activated = Breakdown::default();
        let mut full = Breakdown::default();
        for layer in 0..config.num_hidden_layers {
            let block = block(config, config.is_moe_layer(layer));
            main.add(&block.total);
            activated.add(&block.activated);
            full.add(&block.activated);
        }
        let final_norm = d;
        let head = if config.tie_word_embeddings { 0 } else { vocab * d };
        for b in [&mut main, &mut activated, &mut full] {
            b.norms += final_norm;
            b.head += head;
        }
        main.embedding = vocab * d;
        full.embedding = vocab * d;
        activated.embedding = d;
        // A tied head is the embedding matrix, which a token's logits read whole.
        if config.tie_word_embeddings {
            activated.head = vocab * d;
        }

        let mut mtp = Breakdown::default();
        let mut mtp_activated = Breakdown::default();
        for _ in 0..config.num_nextn_predict_layers {
            // DeepSeek-V3's MTP block is a full transformer block of the MoE kind.
            let block = block(config, config.n_routed_experts > 0);
            for (b, part) in [(&mut mtp, &block.total), (&mut mtp_activated, &block.activated)] {
                b.add(part);
                // enorm, hnorm and the shared head's norm; the projection M_k: [d, 2d].
                b.norms += 3 * d;
                b.mtp_projection += 2 * d * d;
            }
        }
        let mtp_stored_copies = config.num_nextn_predict_layers as u64 * 2 * vocab * d;

        ParameterCounts {
            main,
            activated,
            activated_full_embedding: full,
            mtp,
            mtp_activated,
            mtp_stored_copies,
        }
    }

    /// Total parameters of the model with its MTP modules, as training holds them
    /// (embedding and head once).
    pub fn total_with_mtp(&self) -> u64 {
        self.main.total() + self.mtp.total()
    }

    /// Total parameters as an HF checkpoint stores them (MTP layers repeat the embedding
    /// and head).
    pub fn total_as_stored(&self) -> u64 {
        self.total_with_mtp() + self.mtp_stored_copies
    }
}

/// One transformer block's parameters, in total and as one token reads them.
struct Block {
    total: Breakdown,
    activated: Breakdown,
}

fn block(config: &ModelConfig, moe: bool) -> Block {
    let d = config.hidden_size as u64;
    let heads = config.num_attention_heads as u64;
    let qk_head = config.qk_head_dim() as u64;
    let rope = config.qk_rope_head_dim as u64;
    let kv_rank = config.kv_lora_rank as u64;

    let (q_params, q_norm) = match config.q_lora_rank {
        Some(rank) => {
            let rank = rank as u64;
            (d * rank + rank * heads * qk_head, rank)
        }
        None => (d * heads * qk_head, 0),
    };
    let kv_down = d * (kv_rank + rope);
    let kv_up = kv_rank * heads * (config.qk_nope_head_dim as u64 + config.v_head_dim as u64);
    let o = heads * config.v_head_dim as u64 * d;

    let mut total = Breakdown {
        attention: q_params + kv_down + kv_up + o,
        // input and post-attention norms, plus the q and kv latent norms.
        norms: 2 * d + q_norm + kv_rank,
        ..Breakdown::default()
    };
    let mut activated = total;
    if moe {
        let expert = 3 * d * config.moe_intermediate_size as u64;
        let routed = config.n_routed_experts as u64;
        total.shared_experts = config.n_shared_experts as u64 * expert;
        total.routed_experts = routed * expert;
        total.gates = routed * d + routed;
        activated.shared_experts = total.shared_experts;
        activated.routed_experts = config.num_experts_per_tok as u64 * expert;
        // Every expert's affinity is computed to choose among them.
        activated.gates = total.gates;
    } else {
        total.dense_ffn = 3 * d * config.intermediate_size as u64;
        activated.dense_ffn = total.dense_ffn;
    }
    Block { total, activated }
}
