//! The trainer's data-parallel halves: ranks that each run `forward_backward_shard` on
//! their share of the batch, average their gradients and merge their statistics, then
//! `apply_update`, take the same steps as one trainer on the whole batch (to rounding),
//! and the same steps as each other (bit for bit).

use flotilla_model::train::{StepRecord, TrainConfig, Trainer};
use std::path::Path;
use std::time::Instant;

fn trainer() -> Trainer {
    let text = r#"
seed = 5
steps = 4
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
"#;
    let (config, model) = TrainConfig::from_toml(text, Path::new(".")).unwrap();
    Trainer::new(config, &model).unwrap()
}

/// One data-parallel step over `ranks`, exchanging in memory what the workers exchange
/// over the data plane: gradients summed in rank order and divided by the rank count.
fn data_parallel_step(ranks: &mut [Trainer]) -> Vec<StepRecord> {
    let start = Instant::now();
    let size = ranks.len();
    let mut stats = Vec::new();
    for (rank, trainer) in ranks.iter_mut().enumerate() {
        stats.push(trainer.forward_backward_shard(rank, size).unwrap());
    }
    let mut merged = stats[0].clone();
    for s in &stats[1..] {
        merged.merge(s).unwrap();
    }
    let grads: Vec<Vec<Vec<f32>>> = ranks
        .iter_mut()
        .map(|t| t.model.trainable_params_mut().iter().map(|p| p.grad.to_host_vec()).collect())
        .collect();
    let mut mean = grads[0].clone();
    for other in &grads[1..] {
        for (m, g) in mean.iter_mut().zip(other) {
            m.iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
    }
    for m in &mut mean {
        m.iter_mut().for_each(|a| *a /= size as f32);
    }
    ranks
        .iter_mut()
        .map(|t| {
            for (p, g) in t.model.trainable_params_mut().into_iter().zip(&mean) {
                p.grad.host_mut().copy_from_slice(g);
            }
            t.apply_update(&merged, start).unwrap()
        })
        .collect()
}

#[test]
fn two_ranks_take_the_single_process_steps() {
    let mut single = trainer();
    let mut ranks = [trainer(), trainer()];
    for _ in 0..4 {
        let whole = single.train_step().unwrap();
        let records = data_parallel_step(&mut ranks);
        assert_eq!(records[0].loss.to_bits(), records[1].loss.to_bits(), "ranks agree bit for bit");
        assert_eq!(records[0].grad_norm.to_bits(), records[1].grad_norm.to_bits());
        let dp = &records[0];
        assert_eq!(
            dp.expert_loads, whole.expert_loads,
            "step {}: the same tokens go to the same experts",
            dp.step
        );
        let rel = |a: f64, b: f64| (a - b).abs() / b.abs();
        assert!(rel(dp.loss, whole.loss) < 1e-5, "step {}: {} vs {}", dp.step, dp.loss, whole.loss);
        assert!(
            rel(dp.grad_norm, whole.grad_norm) < 1e-4,
            "step {}: {} vs {}",
            dp.step,
            dp.grad_norm,
            whole.grad_norm
        );
    }
    let a = ranks[0].model.params()[0].value.host();
    let b = ranks[1].model.params()[0].value.host();
    assert_eq!(a, b, "both ranks hold the same weights");
}

#[test]
fn uneven_shares_are_refused() {
    let mut t = trainer();
    let err = t.forward_backward_shard(0, 3).unwrap_err().to_string();
    assert!(err.contains("batch_size 4 cannot be split evenly over 3"), "{err}");
    assert!(t.forward_backward_shard(2, 2).is_err());
}
