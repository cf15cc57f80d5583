//! `flotilla_kernels::fp8` against ml_dtypes' `float8_e4m3fn` and `float8_e5m2`, bit for bit.
//!
//! The fixtures in `tests/fixtures/` come from `tools/fp8_reference.py` (its docstring says
//! how to regenerate them and describes their layout; `fp8_reference.json` records the
//! numpy/ml_dtypes versions). No Python is needed here: the encode inputs are recomputed
//! by [`encode_inputs`], which mirrors the script's rule, and only ml_dtypes' codes are read.

use std::io::Read;
use std::path::PathBuf;

use flotilla_kernels::KernelError;
use flotilla_kernels::fp8::{self, E4M3, E5M2, Overflow};
use proptest::prelude::*;

type BulkEncode = fn(&[f32], &mut [u8], Overflow) -> Result<(), KernelError>;
type BulkDecode = fn(&[u8], &mut [f32]) -> Result<(), KernelError>;

/// One FP8 format seen through the crate's public API.
#[derive(Clone, Copy)]
struct Fmt {
    /// The fixture file stem (ml_dtypes' name).
    name: &'static str,
    scalar: fn(f32, Overflow) -> u8,
    bulk: BulkEncode,
    to_f32: fn(u8) -> f32,
    bulk_decode: BulkDecode,
    max: f32,
    /// Largest finite code with the sign bit clear; codes 0..=max_code increase in value.
    max_code: u8,
}

const E4M3FN: Fmt = Fmt {
    name: "e4m3fn",
    scalar: |x, o| match o {
        Overflow::Ieee => E4M3::from_f32(x).to_bits(),
        Overflow::Saturate => E4M3::from_f32_saturating(x).to_bits(),
    },
    bulk: fp8::encode_e4m3,
    to_f32: |c| E4M3::from_bits(c).to_f32(),
    bulk_decode: fp8::decode_e4m3,
    max: E4M3::MAX,
    max_code: 0x7E,
};

const E5M2_FMT: Fmt = Fmt {
    name: "e5m2",
    scalar: |x, o| match o {
        Overflow::Ieee => E5M2::from_f32(x).to_bits(),
        Overflow::Saturate => E5M2::from_f32_saturating(x).to_bits(),
    },
    bulk: fp8::encode_e5m2,
    to_f32: |c| E5M2::from_bits(c).to_f32(),
    bulk_decode: fp8::decode_e5m2,
    max: E5M2::MAX,
    max_code: 0x7B,
};

const FORMATS: [Fmt; 2] = [E4M3FN, E5M2_FMT];
const MODES: [Overflow; 2] = [Overflow::Ieee, Overflow::Saturate];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn read_text(name: &str) -> String {
    let path = fixture(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Parses lines of whitespace-separated hex fields.
fn hex_rows(name: &str, fields: usize) -> Vec<Vec<u32>> {
    read_text(name)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let row: Vec<u32> = l
                .split_whitespace()
                .map(|f| u32::from_str_radix(f, 16).unwrap_or_else(|e| panic!("{name}: {l:?}: {e}")))
                .collect();
            assert_eq!(row.len(), fields, "{name}: {l:?}");
            row
        })
        .collect()
}

// ---- The encode inputs: mirror of `encode_inputs` / `lo_hash` in tools/fp8_reference.py. ----

const FIXED_LOWS: [u32; 6] = [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF];
const LOWS_PER_HI: usize = FIXED_LOWS.len() + 2;
const N_INPUTS: usize = 0x10000 * LOWS_PER_HI;

fn lo_hash(hi: u32, k: u32) -> u32 {
    let mut x = hi.wrapping_mul(0x9E37_79B1).wrapping_add((k + 1).wrapping_mul(0x85EB_CA77));
    x ^= x >> 15;
    x = x.wrapping_mul(0x2C1B_3C6D);
    x ^= x >> 12;
    x & 0xFFFF
}

/// f32 bit patterns, in fixture order.
fn encode_inputs() -> Vec<u32> {
    let mut out = Vec::with_capacity(N_INPUTS);
    for hi in 0..=0xFFFFu32 {
        for lo in FIXED_LOWS.into_iter().chain([lo_hash(hi, 0), lo_hash(hi, 1)]) {
            out.push((hi << 16) | lo);
        }
    }
    out
}

/// The expected codes for [`encode_inputs`]: (IEEE mode, saturating mode).
fn encode_expected(fmt: Fmt) -> (Vec<u8>, Vec<u8>) {
    let name = format!("fp8_{}_encode.u8.gz", fmt.name);
    let file = std::fs::File::open(fixture(&name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(file).read_to_end(&mut bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(bytes.len(), 2 * N_INPUTS, "{name}: wrong length; regenerate the fixtures?");
    let sat = bytes.split_off(N_INPUTS);
    (bytes, sat)
}

/// Collects mismatches between expected and actual codes and fails listing the first few.
fn check_codes(what: &str, inputs: &[u32], expected: &[u8], actual: &[u8]) {
    assert_eq!(inputs.len(), expected.len());
    assert_eq!(inputs.len(), actual.len());
    let bad: Vec<usize> = (0..inputs.len()).filter(|&i| expected[i] != actual[i]).collect();
    let report: Vec<String> = bad
        .iter()
        .take(12)
        .map(|&i| {
            format!(
                "  x = {:#010x} ({:e}): expected {:#04x}, got {:#04x}",
                inputs[i],
                f32::from_bits(inputs[i]),
                expected[i],
                actual[i]
            )
        })
        .collect();
    assert_eq!(
        bad.len(),
        0,
        "{what}: {} of {} codes differ from ml_dtypes; first ones:\n{}",
        bad.len(),
        inputs.len(),
        report.join("\n")
    );
}

fn mode_name(mode: Overflow) -> &'static str {
    match mode {
        Overflow::Ieee => "ieee",
        Overflow::Saturate => "saturate",
    }
}

/// Encodes with the scalar API, the bulk API on the whole slice, and the bulk API on
/// ragged chunks (so that every vector-loop tail length and misaligned start is used).
fn encode_all_ways(fmt: Fmt, inputs: &[u32], mode: Overflow) -> [(&'static str, Vec<u8>); 3] {
    let xs: Vec<f32> = inputs.iter().map(|&b| f32::from_bits(b)).collect();
    let scalar: Vec<u8> = xs.iter().map(|&x| (fmt.scalar)(x, mode)).collect();
    let mut bulk = vec![0xAAu8; xs.len()];
    (fmt.bulk)(&xs, &mut bulk, mode).unwrap();
    let mut chunked = vec![0xAAu8; xs.len()];
    let (mut start, mut len) = (0, 1);
    while start < xs.len() {
        let end = (start + len).min(xs.len());
        (fmt.bulk)(&xs[start..end], &mut chunked[start..end], mode).unwrap();
        start = end;
        len = len % 67 + 1;
    }
    [("scalar", scalar), ("bulk", bulk), ("bulk chunked", chunked)]
}

#[test]
fn decode_matches_ml_dtypes() {
    for fmt in FORMATS {
        let name = format!("fp8_{}_decode.txt", fmt.name);
        let rows = hex_rows(&name, 2);
        assert_eq!(rows.len(), 256, "{name}");
        let codes: Vec<u8> = (0..=255).collect();
        let mut bulk = vec![0f32; 256];
        (fmt.bulk_decode)(&codes, &mut bulk).unwrap();
        let mut bad = Vec::new();
        for (row, &b) in rows.iter().zip(&bulk) {
            let (code, want) = (row[0] as u8, f32::from_bits(row[1]));
            for (how, got) in [("to_f32", (fmt.to_f32)(code)), ("bulk", b)] {
                let ok = if want.is_nan() {
                    got.is_nan() && got.is_sign_negative() == want.is_sign_negative()
                } else {
                    got.to_bits() == want.to_bits()
                };
                if !ok {
                    bad.push(format!(
                        "  {how} {code:#04x}: expected {:#010x} ({want:e}), got {:#010x} ({got:e})",
                        want.to_bits(),
                        got.to_bits()
                    ));
                }
            }
        }
        assert!(bad.is_empty(), "{} decode differs from ml_dtypes:\n{}", fmt.name, bad.join("\n"));
    }
}

#[test]
fn encode_matches_ml_dtypes_on_all_upper_halves() {
    let inputs = encode_inputs();
    for fmt in FORMATS {
        let (ieee, sat) = encode_expected(fmt);
        for (mode, expected) in [(Overflow::Ieee, &ieee), (Overflow::Saturate, &sat)] {
            for (how, actual) in encode_all_ways(fmt, &inputs, mode) {
                let what = format!("{} {} {how}", fmt.name, mode_name(mode));
                check_codes(&what, &inputs, expected, &actual);
            }
        }
    }
}

#[test]
fn encode_matches_ml_dtypes_on_rounding_boundaries() {
    for fmt in FORMATS {
        let name = format!("fp8_{}_boundaries.txt", fmt.name);
        let rows = hex_rows(&name, 3);
        // Every adjacent pair (and MAX/overflow) gives midpoint and two neighbours; every
        // finite value itself; both signs. ±0 are distinct inputs, so nothing collapses.
        let finite = fmt.max_code as usize + 1;
        assert_eq!(rows.len(), 2 * (3 * finite + finite), "{name}");
        let inputs: Vec<u32> = rows.iter().map(|r| r[0]).collect();
        for (mode, col) in [(Overflow::Ieee, 1), (Overflow::Saturate, 2)] {
            let expected: Vec<u8> = rows.iter().map(|r| r[col] as u8).collect();
            for (how, actual) in encode_all_ways(fmt, &inputs, mode) {
                let what = format!("{} boundaries {} {how}", fmt.name, mode_name(mode));
                check_codes(&what, &inputs, &expected, &actual);
            }
        }
    }
}

/// The code ml_dtypes-style round-to-nearest-even must give for a finite `x` with
/// `|x| <= MAX`, by brute force over the format's values: the positive codes 0..=max_code
/// are increasing in value, so bracket |x| and compare it with the exact midpoint (exact in
/// f64: the values have at most 4 significant bits and lie within 2^-16..2^16).
fn nearest_code(fmt: Fmt, x: f32) -> u8 {
    assert!(x.is_finite() && x.abs() <= fmt.max);
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = f64::from(x.abs());
    let value = |c: u8| f64::from((fmt.to_f32)(c));
    let hi = (0..=fmt.max_code).find(|&c| value(c) >= a).unwrap();
    if value(hi) == a || hi == 0 {
        return sign | hi;
    }
    let lo = hi - 1;
    let mid = (value(lo) + value(hi)) / 2.0;
    let c = if a < mid {
        lo
    } else if a > mid {
        hi
    } else if lo & 1 == 0 {
        lo
    } else {
        hi
    };
    sign | c
}

fn in_range(fmt: Fmt) -> impl Strategy<Value = f32> {
    let max_bits = fmt.max.to_bits();
    prop_oneof![
        // Uniform over bit patterns of [0, MAX] (f32 bits order like values), either sign:
        // every binade, subnormals of f32 and of the format.
        (0..=max_bits, any::<bool>()).prop_map(|(b, neg)| f32::from_bits(b | ((neg as u32) << 31))),
        // Uniform over values.
        -fmt.max..=fmt.max,
        // Near the format's values and midpoints: a code's value or midpoint, a few ulps off.
        (0..fmt.max_code, any::<bool>(), any::<bool>(), -3i32..=3).prop_map(move |(c, mid, neg, ulps)| {
            let lo = (fmt.to_f32)(c);
            let hi = (fmt.to_f32)(c + 1);
            let base = if mid { (lo + hi) / 2.0 } else { lo };
            let bits = (base.to_bits() as i64 + ulps as i64).clamp(0, fmt.max.to_bits() as i64) as u32;
            f32::from_bits(bits | ((neg as u32) << 31))
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn bulk_and_scalar_agree(bits in prop::collection::vec(any::<u32>(), 0..300)) {
        let xs: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        for fmt in FORMATS {
            for mode in MODES {
                let mut bulk = vec![0u8; xs.len()];
                (fmt.bulk)(&xs, &mut bulk, mode).unwrap();
                for (i, &x) in xs.iter().enumerate() {
                    prop_assert_eq!(
                        bulk[i], (fmt.scalar)(x, mode),
                        "{} {}: x = {:#010x} at index {}", fmt.name, mode_name(mode), x.to_bits(), i
                    );
                }
            }
        }
    }

    #[test]
    fn e4m3_rounds_to_nearest_even(x in in_range(E4M3FN)) {
        for mode in MODES {
            prop_assert_eq!((E4M3FN.scalar)(x, mode), nearest_code(E4M3FN, x), "x = {:#010x} ({:e})", x.to_bits(), x);
        }
    }

    #[test]
    fn e5m2_rounds_to_nearest_even(x in in_range(E5M2_FMT)) {
        for mode in MODES {
            prop_assert_eq!((E5M2_FMT.scalar)(x, mode), nearest_code(E5M2_FMT, x), "x = {:#010x} ({:e})", x.to_bits(), x);
        }
    }
}

#[test]
fn fixture_metadata_is_present() {
    let meta = read_text("fp8_reference.json");
    for needle in ["\"ml_dtypes\"", "\"numpy\"", "0x9E3779B1", "0x85EBCA77", "0x2C1B3C6D"] {
        assert!(meta.contains(needle), "fp8_reference.json lacks {needle}");
    }
    assert!(meta.contains(&format!("\"count\": {N_INPUTS}")), "fp8_reference.json: input count");
}
