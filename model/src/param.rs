//! Named parameters and their deterministic initialization.
//!
//! Every parameter carries its Hugging Face DeepSeek-V3 name (e.g.
//! `model.layers.3.mlp.experts.7.gate_proj.weight`), its shape, its values and its gradient.
//! Initialization draws each parameter from its own ChaCha8 stream seeded by
//! `(seed, name)`, so a parameter's initial values do not depend on which other parameters
//! exist, in which order they are built, or which worker builds them: any pipeline or
//! expert layout starts from the same model.
//!
//! Values and gradients are [`Buffer`]s on the device of the backend the model runs on. A
//! parameter starts on the host ([`Param::new`]) and moves with [`Param::place_on`], which
//! `Model::set_backend` and `RankModel::set_backend` call for every parameter they hold.
//! Code reads or writes the elements on the host only through the buffers' explicit host
//! views (`value.host()`, `grad.host_mut()`, …), so every such site is greppable (see
//! `flotilla_kernels::backend::Buffer`).

use crate::ModelError;
use flotilla_kernels::backend::{Backend, BackendError, Buffer, DeviceBackend};
use flotilla_kernels::gemm::GemmFloat;
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
    /// Values, on the device the parameter was placed on.
    pub value: Buffer<T>,
    /// Accumulated gradient, same length and device as `value`.
    pub grad: Buffer<T>,
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
        Param {
            name,
            shape: shape.to_vec(),
            grad: Buffer::from_host(vec![T::zero(); len]),
            value: Buffer::from_host(value),
        }
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
        self.grad.host_mut().fill(T::zero());
    }

    /// Replaces the values with `values` (a checkpoint's, an optimizer's), on the device
    /// they are on; an error naming the parameter, changing nothing, when the length is
    /// not the parameter's.
    pub fn set_value(&mut self, values: &[T]) -> Result<(), ModelError> {
        crate::check_len(&self.name, "the new value", self.len(), values.len())?;
        self.value.host_mut().copy_from_slice(values);
        Ok(())
    }
}

impl<T: GemmFloat> Param<T> {
    /// Value and gradient as buffers on `backend`'s device, without changing `self`: the
    /// first half of [`Param::place_on`], so that a whole model can be copied before any
    /// of it moves.
    pub fn placed_on(&self, backend: &DeviceBackend) -> Result<(Buffer<T>, Buffer<T>), BackendError> {
        Ok((backend.upload(self.value.host())?, backend.upload(self.grad.host())?))
    }

    /// Moves value and gradient to `backend`'s device (nothing to do when they are there
    /// already); on an error the parameter is unchanged.
    pub fn place_on(&mut self, backend: &DeviceBackend) -> Result<(), BackendError> {
        if self.value.device() == backend.device() && self.grad.device() == backend.device() {
            return Ok(());
        }
        (self.value, self.grad) = self.placed_on(backend)?;
        Ok(())
    }
}

/// Places every parameter of `params` on `backend`'s device, all or nothing: each is
/// copied first, and only when every copy succeeded do they all move. The error names the
/// parameter the backend could not hold.
pub(crate) fn place_all<T: GemmFloat>(
    params: Vec<&mut Param<T>>,
    backend: &DeviceBackend,
) -> Result<(), ModelError> {
    let device = backend.device();
    let mut moving = Vec::new();
    for p in params {
        if p.value.device() != device || p.grad.device() != device {
            let placed = p
                .placed_on(backend)
                .map_err(|source| ModelError::Backend { tensor: p.name.clone(), source })?;
            moving.push((p, placed));
        }
    }
    for (p, (value, grad)) in moving {
        (p.value, p.grad) = (value, grad);
    }
    Ok(())
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
        assert_eq!(a.len(), 12);
        assert_eq!(a.grad.host(), &[0.0; 12]);
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn set_value_checks_the_length_and_placing_keeps_the_elements() {
        let mut p = Param::<f32>::new("model.norm.weight", &[3], Init::Constant(1.0), 0);
        p.set_value(&[1.0, 2.0, 3.0]).unwrap();
        let err = p.set_value(&[1.0]).unwrap_err();
        assert_eq!(err.to_string(), "`model.norm.weight`: the new value has 1 elements, expected 3");
        assert_eq!(p.value.host(), &[1.0, 2.0, 3.0]);
        p.grad.host_mut()[2] = 5.0;
        let before = p.clone();
        let backend = flotilla_kernels::backend::open(flotilla_kernels::backend::Device::Cpu).unwrap();
        p.place_on(&backend).unwrap();
        assert_eq!(p, before);
        let (value, grad) = p.placed_on(&backend).unwrap();
        assert_eq!((value.host(), grad.host()), (&[1.0, 2.0, 3.0][..], &[0.0, 0.0, 5.0][..]));
        p.zero_grad();
        assert_eq!(p.grad.host(), &[0.0; 3]);
    }
}
