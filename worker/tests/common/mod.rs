//! What the worker crate's integration tests share.

/// A run of the tiny model on synthetic data with one thread: `steps` steps of
/// `batch_size` sequences of `seq_len` tokens in `precision`, seeded with `seed`,
/// `warmup_steps` of warm-up then a constant learning rate.
pub fn tiny_run(
    seed: u64,
    steps: u64,
    batch_size: usize,
    seq_len: usize,
    precision: &str,
    warmup_steps: u64,
) -> String {
    format!(
        r#"
seed = {seed}
steps = {steps}
batch_size = {batch_size}
seq_len = {seq_len}
threads = 1
precision = "{precision}"

[model]
preset = "tiny"

[data]
kind = "synthetic"
tokens = 65536

[optimizer]
peak_lr = 3e-3
warmup_steps = {warmup_steps}
constant_steps = 10
decay_steps = 0
final_lr = 3e-3
"#
    )
}

/// A small run of the tiny model (4 sequences of 32 tokens, one thread, synthetic data)
/// with `steps` steps, as a run's TOML.
#[allow(dead_code)] // Not every test binary that includes this module uses every helper.
pub fn small_run(steps: u64) -> String {
    tiny_run(5, steps, 4, 32, "fp32", 2)
}
