//! What the worker crate's integration tests share.

/// A small run of the tiny model (4 sequences of 32 tokens, one thread, synthetic data)
/// with `steps` steps, as a run's TOML.
pub fn small_run(steps: u64) -> String {
    format!(
        r#"
seed = 5
steps = {steps}
batch_size = 4
seq_len = 32
threads = 1

[model]
preset = "tiny"

[data]
kind = "synthetic"
tokens = 65536

[optimizer]
peak_lr = 3e-3
warmup_steps = 2
constant_steps = 10
decay_steps = 0
final_lr = 3e-3
"#
    )
}
