//! Token embedding: `model.embed_tokens.weight` `[vocab, hidden]`. Forward gathers rows;
//! its only gradient is W (a scatter-add into the rows the tokens used), in token order,
//! so it is deterministic.

use crate::param::{Init, Param};
use crate::{ModelError, Real, check_len};

/// Row lookup into `[vocab, hidden]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding<T> {
    /// The table.
    pub weight: Param<T>,
    /// Rows.
    pub vocab: usize,
    /// Row width.
    pub hidden: usize,
}

impl<T: Real> Embedding<T> {
    /// A table named `{prefix}.weight` drawn from Normal(0, std) by `(seed, name)`.
    pub fn new(prefix: &str, vocab: usize, hidden: usize, std: f64, seed: u64) -> Self {
        let weight = Param::new(format!("{prefix}.weight"), &[vocab, hidden], Init::Normal { std }, seed);
        Embedding { weight, vocab, hidden }
    }

    /// Checks that every token is inside the vocabulary, naming the first that is not.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<(), ModelError> {
        if let Some((position, &token)) = tokens.iter().enumerate().find(|(_, t)| **t as usize >= self.vocab)
        {
            return Err(ModelError::Tensor {
                tensor: "tokens".into(),
                detail: format!(
                    "token {token} at position {position} is outside the vocabulary of {}",
                    self.vocab
                ),
            });
        }
        Ok(())
    }

    /// `y[t] = weight[tokens[t]]`, `y: [tokens, hidden]`.
    pub fn forward(&self, tokens: &[u32], y: &mut [T]) -> Result<(), ModelError> {
        self.check_tokens(tokens)?;
        check_len(&self.weight.name, "output", tokens.len() * self.hidden, y.len())?;
        for (row, &token) in y.chunks_mut(self.hidden).zip(tokens) {
            let t = token as usize;
            row.copy_from_slice(&self.weight.value.host()[t * self.hidden..(t + 1) * self.hidden]);
        }
        Ok(())
    }

    /// W: `grad[tokens[t]] += dy[t]`, in token order.
    pub fn backward_weight(&mut self, tokens: &[u32], dy: &[T]) -> Result<(), ModelError> {
        self.check_tokens(tokens)?;
        check_len(&self.weight.name, "output gradient", tokens.len() * self.hidden, dy.len())?;
        for (row, &token) in dy.chunks(self.hidden).zip(tokens) {
            let t = token as usize;
            for (g, &d) in
                self.weight.grad.host_mut()[t * self.hidden..(t + 1) * self.hidden].iter_mut().zip(row)
            {
                *g = *g + d;
            }
        }
        Ok(())
    }
}
