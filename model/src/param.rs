//! Named parameters and their deterministic initialization.
//!
//! Every parameter carries its Hugging Face DeepSeek-V3 name (e.g.
//! `model.layers.3.mlp.experts.7.gate_proj.weight`), its shape, its values and its gradient.
//! Initialization draws each parameter from its own ChaCha8 stream seeded by
//! `(seed, name)`, so a parameter's initial values do not depend on which other parameters
//! exist, in which order they are built, or which worker builds them: any pipeline or
//! expert layout starts from the same model.

use num_traits::Float;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// One named tensor of the model with its gradient.
#[derive(Clone, Debug, PartialEq)]
pub struct Param<T> {
    /// The HF checkpoint name.
    pub name: String,
    /// Row-major shape (HF layout: a linear layer's weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// Values.
    pub value: Vec<T>,
    /// Accumulated gradient, same length as `value`.
    pub grad: Vec<T>,
}

/// How a parameter starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Normal(0, std), as HF's `initializer_range`.
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// Every element equal to this (RMSNorm weights: 1; selection biases: 0).
    Constant(f64),
}

impl<T: Float> Param<T> {
    /// A parameter initialized from `(seed, name)`.
    pub fn new(name: impl Into<String>, shape: &[usize], init: Init, seed: u64) -> Self {
        let name = name.into();
        let len = shape.iter().product();
        let value = match init {
            Init::Constant(c) => vec![T::from(c).expect("f64 converts to the float type"); len],
            Init::Normal { std } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stable_hash(&name));
                let normal = Normal::new(0.0, std).expect("a finite, non-negative std");
                (0..len).map(|_| T::from(normal.sample(&mut rng)).expect("f64 converts")).collect()
            }
        };
        Param { name, shape: shape.to_vec(), grad: vec![T::zero(); len], value }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.value.len()
    }

    /// Whether the parameter has no elements.
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }

    /// Sets the gradient to zero.
    pub fn zero_grad(&mut self) {
        self.grad.fill(T::zero());
    }
}

/// FNV-1a, 64-bit: a hash that never changes between builds or platforms (unlike std's).
pub fn stable_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initialization_depends_only_on_seed_and_name() {
        let a =
            Param::<f32>::new("model.layers.0.mlp.up_proj.weight", &[4, 3], Init::Normal { std: 0.02 }, 7);
        let _other = Param::<f32>::new("model.embed_tokens.weight", &[10, 3], Init::Normal { std: 0.02 }, 7);
        let b =
            Param::<f32>::new("model.layers.0.mlp.up_proj.weight", &[4, 3], Init::Normal { std: 0.02 }, 7);
        assert_eq!(a, b);
        let c =
            Param::<f32>::new("model.layers.1.mlp.up_proj.weight", &[4, 3], Init::Normal { std: 0.02 }, 7);
        assert_ne!(a.value, c.value);
        let d =
            Param::<f32>::new("model.layers.0.mlp.up_proj.weight", &[4, 3], Init::Normal { std: 0.02 }, 8);
        assert_ne!(a.value, d.value);
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
