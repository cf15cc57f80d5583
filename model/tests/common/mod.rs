//! Shared helpers of the model's gradient checks: seeded data and central finite
//! differences in f64.

#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `len` values uniform in [-1, 1), from `seed`.
pub fn random(len: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect()
}

/// `Σ y·r`: a scalar loss whose gradient with respect to `y` is `r`.
pub fn project(y: &[f64], r: &[f64]) -> f64 {
    y.iter().zip(r).map(|(a, b)| a * b).sum()
}

/// Compares `analytic[i]` with the central difference `(L(x + h·eᵢ) − L(x − h·eᵢ)) / 2h`
/// for up to `max_checks` indices (all of them when there are fewer; otherwise a seeded
/// sample). `loss` receives the perturbed copy of `x`. With h = 1e-5 in f64 the truncation
/// error is O(h²·L''') ≈ 1e-10 and the rounding error ≈ ε·|L|/h ≈ 1e-11·|L|, so 1e-6
/// relative (plus 1e-8 absolute for near-zero gradients) only fails on a wrong gradient.
pub fn check_gradient(
    what: &str,
    x: &[f64],
    analytic: &[f64],
    max_checks: usize,
    mut loss: impl FnMut(&[f64]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{what}: gradient length");
    let h = 1e-5;
    let indices: Vec<usize> = if x.len() <= max_checks {
        (0..x.len()).collect()
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(x.len() as u64);
        (0..max_checks).map(|_| rng.random_range(0..x.len())).collect()
    };
    let mut probe = x.to_vec();
    for i in indices {
        probe[i] = x[i] + h;
        let up = loss(&probe);
        probe[i] = x[i] - h;
        let down = loss(&probe);
        probe[i] = x[i];
        let numeric = (up - down) / (2.0 * h);
        let tolerance = 1e-6 * numeric.abs().max(analytic[i].abs()) + 1e-8;
        assert!(
            (numeric - analytic[i]).abs() <= tolerance,
            "{what}[{i}]: analytic {} vs numeric {numeric}",
            analytic[i]
        );
    }
}
