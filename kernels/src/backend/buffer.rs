//! [`Buffer`]: a tensor's storage on the device that holds it.
//!
//! A buffer is `Host(Vec<T>)` (the CPU backend's memory) or, with the `cuda` feature,
//! `Cuda(CudaBuffer<T>)`, a device allocation. In this build a [`CudaBuffer`] holds an
//! uninhabited value, so no CUDA buffer can exist, and every place that would have to
//! handle one is `match never {}`: the compiler proves the host views below are total.
//!
//! Buffers are made by a backend ([`super::Backend::upload`], [`super::Backend::zeros`])
//! or wrapped from a host vector ([`Buffer::from_host`]), and read back through the
//! backend ([`super::Backend::download`]) or, where the caller knows it works on the
//! host, through the host views.
//!
//! ## Invariant: every host access is explicit
//! Code outside the backends reads or writes a buffer's elements only through
//! [`Buffer::host`], [`Buffer::host_mut`] or [`Buffer::to_host_vec`]. Every such call is a
//! place where the host touches the numbers (a layer's weight handed to a kernel taking a
//! slice, the optimizer, checkpoints, gradient reductions), so `grep` for them is the list
//! of sites the CUDA backend (issue 17) turns into backend ops on buffers.
//!
//! ## Why `host()` returns `&[T]` and not a `Result`
//! Today the `Host` variant is the only inhabited one, so a host view always exists and a
//! fallible signature would make every call site (about 40 in the libraries, 150 with the
//! tests) handle an error that cannot happen, and
//! teach them to ignore it. When issue 17 makes `CudaBuffer` inhabited, the
//! `match never {}` arms here stop compiling; that is the moment to decide, with real
//! device buffers in hand, between a fallible view (every caller, all greppable, then
//! fails to compile and is rewritten to a backend op or an explicit
//! [`super::Backend::download`]) and keeping these views host-only by construction. A
//! fallible signature now would only hide that decision behind error paths no test can
//! reach.

use super::Device;
#[cfg(feature = "cuda")]
use super::cuda::CudaBuffer;

/// A tensor's elements on the device that holds them (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub enum Buffer<T> {
    /// In host memory: the CPU backend's storage.
    Host(Vec<T>),
    /// On a CUDA device (not constructible in this build).
    #[cfg(feature = "cuda")]
    Cuda(CudaBuffer<T>),
}

impl<T> Default for Buffer<T> {
    /// An empty host buffer.
    fn default() -> Self {
        Buffer::Host(Vec::new())
    }
}

impl<T> Buffer<T> {
    /// Wraps host elements as a host buffer, without copying.
    pub fn from_host(values: Vec<T>) -> Self {
        Buffer::Host(values)
    }

    /// The device the elements live on.
    pub fn device(&self) -> Device {
        match self {
            Buffer::Host(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Buffer::Cuda(b) => b.absurd(),
        }
    }

    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            Buffer::Host(v) => v.len(),
            #[cfg(feature = "cuda")]
            Buffer::Cuda(b) => b.absurd(),
        }
    }

    /// Whether the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, read on the host: an explicit host access (see the module docs).
    pub fn host(&self) -> &[T] {
        match self {
            Buffer::Host(v) => v,
            #[cfg(feature = "cuda")]
            Buffer::Cuda(b) => b.absurd(),
        }
    }

    /// The elements, written on the host: an explicit host access (see the module docs).
    pub fn host_mut(&mut self) -> &mut [T] {
        match self {
            Buffer::Host(v) => v,
            #[cfg(feature = "cuda")]
            Buffer::Cuda(b) => b.absurd(),
        }
    }

    /// A host copy of the elements: an explicit host access (see the module docs).
    pub fn to_host_vec(&self) -> Vec<T>
    where
        T: Clone,
    {
        self.host().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_buffer_is_its_vector() {
        let mut b = Buffer::from_host(vec![1.0f32, -2.0, 3.5]);
        assert_eq!(b.device(), Device::Cpu);
        assert_eq!(b.len(), 3);
        assert!(!b.is_empty());
        assert_eq!(b.host(), &[1.0, -2.0, 3.5]);
        b.host_mut()[1] = 4.0;
        assert_eq!(b.to_host_vec(), vec![1.0, 4.0, 3.5]);
        assert_eq!(b, Buffer::Host(vec![1.0, 4.0, 3.5]));
        let empty = Buffer::<f64>::default();
        assert!(empty.is_empty());
        assert_eq!(empty.device(), Device::Cpu);
    }
}
