//! Error measures that numerics in flotilla are judged by, all computed in f64.

use crate::KernelError;

fn check_same_len(x: usize, y: usize) -> Result<(), KernelError> {
    if x != y {
        return Err(KernelError::LengthMismatch { tensor: "metric reference", expected: x, actual: y });
    }
    Ok(())
}

/// DeepGEMM's and DeepEP's similarity measure, `1 − 2Σxy / Σ(x² + y²)`: 0 for identical
/// inputs, about `mean((x−y)²) / (2·mean(x²))` for small errors, and 0 for two all-zero inputs.
pub fn calc_diff<A, B>(x: &[A], y: &[B]) -> Result<f64, KernelError>
where
    A: Copy + Into<f64>,
    B: Copy + Into<f64>,
{
    check_same_len(x.len(), y.len())?;
    let (mut xy, mut sq) = (0f64, 0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b): (f64, f64) = (a.into(), b.into());
        xy += a * b;
        sq += a * a + b * b;
    }
    if sq == 0.0 {
        return Ok(0.0);
    }
    Ok(1.0 - 2.0 * xy / sq)
}

/// Element-wise relative error of `x` against `reference`, summarized.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RelativeError {
    /// Largest `|x − ref| / |ref|`.
    pub max: f64,
    /// Mean of `|x − ref| / |ref|`.
    pub mean: f64,
    /// Elements whose reference is exactly zero, left out of both figures.
    pub skipped_zero_reference: usize,
}

/// Relative error of `x` against an f64 `reference` of the same length.
pub fn relative_error<A: Copy + Into<f64>>(x: &[A], reference: &[f64]) -> Result<RelativeError, KernelError> {
    check_same_len(x.len(), reference.len())?;
    let (mut max, mut sum, mut counted, mut skipped) = (0f64, 0f64, 0usize, 0usize);
    for (&a, &r) in x.iter().zip(reference) {
        if r == 0.0 {
            skipped += 1;
            continue;
        }
        let e = (a.into() - r).abs() / r.abs();
        max = max.max(e);
        sum += e;
        counted += 1;
    }
    let mean = if counted == 0 { 0.0 } else { sum / counted as f64 };
    Ok(RelativeError { max, mean, skipped_zero_reference: skipped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calc_diff_is_zero_for_equal_and_one_for_opposite() {
        let x = [1.0f32, -2.0, 3.5];
        assert_eq!(calc_diff(&x, &x).unwrap(), 0.0);
        let y: Vec<f64> = x.iter().map(|&v| -(v as f64)).collect();
        assert!((calc_diff(&x, &y).unwrap() - 2.0).abs() < 1e-12);
        assert!(calc_diff(&x, &[1.0f32]).is_err());
    }

    #[test]
    fn relative_error_skips_zero_reference() {
        let e = relative_error(&[1.1f32, 5.0], &[1.0, 0.0]).unwrap();
        assert_eq!(e.skipped_zero_reference, 1);
        assert!((e.max - 0.1).abs() < 1e-6);
    }
}
