//! The tag space of pipeline messages (user tags, below the collectives' half): bits
//! 60..63 the kind, 36..56 the micro-batch, 24..36 the stage, 12..24 the MoE layer, 2..12
//! the source's EP rank (forwarded MoE messages only), 0..2 the exchange phase.
//!
//! Kinds: 1 activation, 2 input gradient, 3 MoE message sent directly to its EP rank,
//! 4 the weights sent to rank 0 when a job saves ([`SAVE_TAG`], no other bits), 5 a MoE
//! node message (two-hop dispatch, first hop: a rank's rows for a whole node, to its
//! gateway there), 6 a MoE message forwarded by a gateway (second hop; bits 2..12 name the
//! EP rank whose message it is). See [`crate::expert_exchange`].
//!
//! Both the pipeline executor (activations, gradients, the save) and the MoE exchange
//! (dispatch and combine) tag their messages here, so the kinds can never collide; neither
//! module depends on the other for it.

use flotilla_model::moe::{ExchangeKey, ExchangePhase};

/// One micro-batch through one stage: the layout's chunk, the one the instructions name.
pub use flotilla_layout::Chunk;

/// Tag of the tensors sent to rank 0 when a pipeline job saves its weights.
pub(crate) const SAVE_TAG: u64 = 4 << 60;

const ACTIVATION: u64 = 1;
const GRADIENT: u64 = 2;
const EXPERT: u64 = 3;
const EXPERT_NODE: u64 = 5;
const EXPERT_FORWARD: u64 = 6;

/// EP ranks a forwarded message's tag can name (bits 2..12); larger groups dispatch
/// flat.
pub const MAX_FORWARD_SOURCES: usize = 1 << 10;

fn chunk_bits(kind: u64, c: Chunk) -> u64 {
    (kind << 60) | (u64::from(c.micro_batch & 0xF_FFFF) << 36) | (u64::from(c.stage & 0xFFF) << 24)
}

pub fn activation(c: Chunk) -> u64 {
    chunk_bits(ACTIVATION, c)
}

pub fn gradient(c: Chunk) -> u64 {
    chunk_bits(GRADIENT, c)
}

fn exchange_bits(kind: u64, c: Chunk, key: ExchangeKey) -> u64 {
    let phase = match key.phase {
        ExchangePhase::Dispatch => 0,
        ExchangePhase::Combine => 1,
        ExchangePhase::BackwardDispatch => 2,
        ExchangePhase::BackwardCombine => 3,
    };
    chunk_bits(kind, c) | ((key.layer as u64 & 0xFFF) << 12) | phase
}

pub fn expert(c: Chunk, key: ExchangeKey) -> u64 {
    exchange_bits(EXPERT, c, key)
}

/// A node message of a two-hop exchange (sender → gateway).
pub fn expert_node(c: Chunk, key: ExchangeKey) -> u64 {
    exchange_bits(EXPERT_NODE, c, key)
}

/// EP rank `source`'s message, forwarded by a gateway (`source` below
/// [`MAX_FORWARD_SOURCES`]).
pub fn expert_forward(c: Chunk, key: ExchangeKey, source: usize) -> u64 {
    exchange_bits(EXPERT_FORWARD, c, key) | ((source as u64 & 0x3FF) << 2)
}
