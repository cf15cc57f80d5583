//! Fine-grained quantization: scale layouts against a naive per-tile computation, round
//! trips within the E4M3 error bound, ragged edges, UE8M0 scales, the 128×1 → 1×128
//! re-tiling, BF16 input, and every bad-input path.

use flotilla_kernels::KernelError;
use flotilla_kernels::fp8::E4M3;
use flotilla_kernels::quant::{
    Fp8Matrix, Granularity, QuantConfig, ScaleRounding, TILE, quantize, quantize_into,
};
use half::bf16;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const SHAPES: [(usize, usize); 7] =
    [(1, 1), (1, 128), (3, 129), (128, 128), (130, 300), (257, 64), (200, 513)];
const GRANULARITIES: [Granularity; 3] =
    [Granularity::Tile1x128, Granularity::Block128x128, Granularity::Tile128x1];

/// Values spread over many binades, with a few zeros, so that tiles have very different amax.
fn random_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows * cols)
        .map(|_| {
            if rng.random_ratio(1, 50) {
                return 0.0;
            }
            let magnitude = 2f32.powi(rng.random_range(-20..12)) * rng.random_range(1.0..2.0);
            if rng.random() { magnitude } else { -magnitude }
        })
        .collect()
}

/// The tile (as a list of flat indices) each element belongs to, computed from the
/// definition of the granularity rather than from the library's index arithmetic.
fn tile_members(g: Granularity, rows: usize, cols: usize) -> Vec<Vec<usize>> {
    let mut tiles = Vec::new();
    match g {
        Granularity::Tile1x128 => {
            for r in 0..rows {
                for c0 in (0..cols).step_by(TILE) {
                    tiles.push((c0..(c0 + TILE).min(cols)).map(|c| r * cols + c).collect());
                }
            }
        }
        Granularity::Block128x128 => {
            for r0 in (0..rows).step_by(TILE) {
                for c0 in (0..cols).step_by(TILE) {
                    let mut t = Vec::new();
                    for r in r0..(r0 + TILE).min(rows) {
                        t.extend((c0..(c0 + TILE).min(cols)).map(|c| r * cols + c));
                    }
                    tiles.push(t);
                }
            }
        }
        Granularity::Tile128x1 => {
            for r0 in (0..rows).step_by(TILE) {
                for c in 0..cols {
                    tiles.push((r0..(r0 + TILE).min(rows)).map(|r| r * cols + c).collect());
                }
            }
        }
    }
    tiles
}

#[test]
fn scales_and_codes_match_a_naive_per_tile_quantizer() {
    for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
        let x = random_matrix(rows, cols, i as u64);
        for g in GRANULARITIES {
            for rounding in [ScaleRounding::Exact, ScaleRounding::PowerOfTwo] {
                let cfg = QuantConfig { eps: 1e-4, rounding };
                let q = quantize(&x, rows, cols, g, &cfg).unwrap();
                let tiles = tile_members(g, rows, cols);
                let (sr, sc) = g.scale_shape(rows, cols);
                assert_eq!(sr * sc, tiles.len(), "{g:?} {rows}x{cols}: one scale per tile");
                assert_eq!(q.scales.len(), tiles.len());
                for (t, members) in tiles.iter().enumerate() {
                    let amax = members.iter().map(|&j| x[j].abs()).fold(0f32, f32::max);
                    let mut scale = amax.max(cfg.eps) / 448.0;
                    if rounding == ScaleRounding::PowerOfTwo {
                        scale = 2f32.powi((scale as f64).log2().ceil() as i32);
                    }
                    // Tiles are enumerated in row-major scale order, so `t` is the scale's index.
                    assert_eq!(q.scales[t], scale, "{g:?} {rows}x{cols} tile {t}");
                    for &j in members {
                        let (r, c) = (j / cols, j % cols);
                        assert_eq!(q.scale_at(r, c), scale);
                        let expected = E4M3::from_f32_saturating(x[j] * (1.0 / scale)).to_bits();
                        assert_eq!(q.codes[j], expected, "{g:?} element ({r}, {c})");
                    }
                }
            }
        }
    }
}

#[test]
fn round_trip_is_within_half_an_e4m3_step() {
    for (i, &(rows, cols)) in SHAPES.iter().enumerate() {
        let x = random_matrix(rows, cols, 100 + i as u64);
        for g in GRANULARITIES {
            let q = quantize(&x, rows, cols, g, &QuantConfig::default()).unwrap();
            let back = q.dequantize();
            for (j, (&orig, &got)) in x.iter().zip(&back).enumerate() {
                let scale = q.scale_at(j / cols, j % cols);
                // E4M3 keeps 3 mantissa bits (half step 2⁻⁴ relative) above 2⁻⁶ and a fixed
                // step of 2⁻⁹ below; in units of the scale. A little slack for the f32
                // products x·(1/s) and code·s.
                let bound = (orig.abs() * 2f32.powi(-4)).max(2f32.powi(-10) * scale) * (1.0 + 1e-5);
                assert!(
                    (got - orig).abs() <= bound,
                    "{g:?} {rows}x{cols} element {j}: {orig} came back as {got} (bound {bound})"
                );
            }
        }
    }
}

#[test]
fn tile_amax_lands_on_max_finite() {
    let x = random_matrix(3, 300, 7);
    let q = quantize(&x, 3, 300, Granularity::Tile1x128, &QuantConfig::default()).unwrap();
    for (tile, codes) in
        x.chunks(300).flat_map(|r| r.chunks(TILE)).zip(q.codes.chunks(300).flat_map(|r| r.chunks(TILE)))
    {
        let max_code = codes.iter().map(|&c| E4M3::from_bits(c).to_f32().abs()).fold(0f32, f32::max);
        let amax = tile.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax > 1e-4 {
            assert_eq!(max_code, 448.0, "the largest element of each tile uses the full range");
        }
    }
}

#[test]
fn power_of_two_scales_are_exact_powers() {
    let x = random_matrix(130, 300, 9);
    let cfg = QuantConfig { eps: 1e-4, rounding: ScaleRounding::PowerOfTwo };
    let q = quantize(&x, 130, 300, Granularity::Block128x128, &cfg).unwrap();
    for &s in &q.scales {
        assert_eq!(s.to_bits() & 0x007F_FFFF, 0, "{s} is not a power of two");
    }
}

#[test]
fn retiling_128x1_is_the_transpose_of_1x128() {
    let (tokens, channels) = (300, 257);
    let x = random_matrix(tokens, channels, 11);
    let mut xt = vec![0f32; x.len()];
    for t in 0..tokens {
        for c in 0..channels {
            xt[c * tokens + t] = x[t * channels + c];
        }
    }
    let cfg = QuantConfig::default();
    let column_tiles = quantize(&x, tokens, channels, Granularity::Tile128x1, &cfg).unwrap();
    let row_tiles_of_transpose = quantize(&xt, channels, tokens, Granularity::Tile1x128, &cfg).unwrap();
    assert_eq!(column_tiles.transposed(), row_tiles_of_transpose);
    assert_eq!(row_tiles_of_transpose.transposed(), column_tiles);
    let blocks = quantize(&x, tokens, channels, Granularity::Block128x128, &cfg).unwrap();
    assert_eq!(
        blocks.transposed(),
        quantize(&xt, channels, tokens, Granularity::Block128x128, &cfg).unwrap()
    );
}

#[test]
fn bf16_input_equals_its_f32_widening() {
    let x = random_matrix(130, 300, 13);
    let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let widened: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
    for g in GRANULARITIES {
        let cfg = QuantConfig::default();
        assert_eq!(
            quantize(&x16, 130, 300, g, &cfg).unwrap(),
            quantize(&widened, 130, 300, g, &cfg).unwrap()
        );
    }
}

#[test]
fn zero_tiles_get_the_eps_scale_and_zero_codes() {
    let q = quantize(&vec![0f32; 2 * 200], 2, 200, Granularity::Tile1x128, &QuantConfig::default()).unwrap();
    assert!(q.codes.iter().all(|&c| c == 0));
    assert!(q.scales.iter().all(|&s| s == 1e-4 / 448.0));
}

#[test]
fn quantize_into_reuses_buffers_and_matches_quantize() {
    let x = random_matrix(130, 300, 15);
    let cfg = QuantConfig::default();
    let fresh = quantize(&x, 130, 300, Granularity::Tile1x128, &cfg).unwrap();
    let mut reused =
        Fp8Matrix::from_parts(130, 300, vec![0xAA; 130 * 300], vec![-1.0; 130 * 3], Granularity::Tile1x128)
            .unwrap();
    quantize_into(&x, 130, 300, &cfg, &mut reused).unwrap();
    assert_eq!(reused, fresh);
}

#[test]
fn non_finite_input_is_an_error_naming_the_element() {
    for g in GRANULARITIES {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut x = random_matrix(130, 300, 17);
            let index = 129 * 300 + 257;
            x[index] = bad;
            match quantize(&x, 130, 300, g, &QuantConfig::default()) {
                Err(KernelError::NonFinite { tensor, index: at, value }) => {
                    assert_eq!(tensor, "quantize input");
                    assert_eq!(at, index, "{g:?} {bad}");
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("{g:?} with {bad}: expected NonFinite, got {other:?}"),
            }
        }
    }
}

#[test]
fn the_first_non_finite_element_in_row_major_order_is_named() {
    // Bad elements in several tiles, bands and parallel tasks: the error must not depend on
    // which task finished first.
    let (rows, cols) = (700, 300);
    for g in GRANULARITIES {
        for _ in 0..4 {
            let mut x = random_matrix(rows, cols, 19);
            for &j in &[650 * cols + 3, 300 * cols + 299, 129 * cols + 200, 699 * cols] {
                x[j] = f32::NAN;
            }
            match quantize(&x, rows, cols, g, &QuantConfig::default()) {
                Err(KernelError::NonFinite { index, .. }) => assert_eq!(index, 129 * cols + 200, "{g:?}"),
                other => panic!("{g:?}: expected NonFinite, got {other:?}"),
            }
        }
    }
}

#[test]
fn bad_shapes_and_parameters_are_errors() {
    let x = vec![1f32; 10];
    let cfg = QuantConfig::default();
    assert!(matches!(
        quantize(&x, 3, 4, Granularity::Tile1x128, &cfg),
        Err(KernelError::LengthMismatch { tensor: "quantize input", expected: 12, actual: 10 })
    ));
    assert!(matches!(
        quantize(&x, usize::MAX, 2, Granularity::Tile1x128, &cfg),
        Err(KernelError::InvalidShape { .. })
    ));
    for eps in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        assert!(matches!(
            quantize(&x, 2, 5, Granularity::Tile1x128, &QuantConfig { eps, ..cfg }),
            Err(KernelError::InvalidParameter { name: "eps", .. })
        ));
    }
    assert!(matches!(
        Fp8Matrix::from_parts(2, 5, vec![0; 10], vec![1.0; 3], Granularity::Tile1x128),
        Err(KernelError::LengthMismatch { tensor: "scales", expected: 2, actual: 3 })
    ));
    let mut wrong = quantize(&x, 2, 5, Granularity::Tile1x128, &cfg).unwrap();
    assert!(matches!(quantize_into(&x, 5, 2, &cfg, &mut wrong), Err(KernelError::ShapeMismatch { .. })));
    let mut out = vec![0f32; 9];
    assert!(wrong.dequantize_into(&mut out).is_err());
    // Empty matrices are valid and produce empty outputs.
    let empty = quantize::<f32>(&[], 0, 7, Granularity::Block128x128, &cfg).unwrap();
    assert!(empty.codes.is_empty() && empty.scales.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_finite_matrix_round_trips_within_bound(
        rows in 1usize..160,
        cols in 1usize..300,
        seed in any::<u64>(),
        g in prop::sample::select(GRANULARITIES.to_vec()),
    ) {
        let x = random_matrix(rows, cols, seed);
        let q = quantize(&x, rows, cols, g, &QuantConfig::default()).unwrap();
        let back = q.dequantize();
        for (j, (&orig, &got)) in x.iter().zip(&back).enumerate() {
            let scale = q.scale_at(j / cols, j % cols);
            let bound = (orig.abs() * 2f32.powi(-4)).max(2f32.powi(-10) * scale) * (1.0 + 1e-5);
            prop_assert!((got - orig).abs() <= bound);
        }
    }
}
