//! The two FP8 formats of the OCP 8-bit floating point spec, as used by DeepSeek-V3 and
//! ml_dtypes, with an encoder and decoder owned here (the `float8` crate's constants are
//! wrong: it reports E4M3's max as 416 and E5M2's as 49152).
//!
//! | format | layout | bias | max finite | min normal | min subnormal | specials |
//! | --- | --- | --- | --- | --- | --- | --- |
//! | [`E4M3`] ("e4m3fn") | S.EEEE.MMM | 7 | 448 | 2⁻⁶ | 2⁻⁹ | NaN = S.1111.111, no infinities |
//! | [`E5M2`] | S.EEEEE.MM | 15 | 57344 | 2⁻¹⁴ | 2⁻¹⁶ | ±inf = S.11111.00, NaN = S.11111.{01,10,11} |
//!
//! Encoding rounds to nearest, ties to even, in one of two modes:
//! - *IEEE-like* (`from_f32`), bit-exact with `ml_dtypes`' cast: a value whose rounded
//!   magnitude exceeds the max finite becomes NaN (E4M3, which has no infinity) or ±inf
//!   (E5M2); ±inf maps to NaN (E4M3) or ±inf (E5M2).
//! - *saturating* (`from_f32_saturating`), what training uses: finite overflow and ±inf
//!   clamp to ±max finite. NaN stays NaN in both modes.
//!
//! NaN inputs encode to the quiet-NaN code with the input's sign, as ml_dtypes does.
//!
//! The bulk converters ([`encode_e4m3`], [`decode_e4m3`], …) run branch-free lane code
//! (integer rounding for the normal range, an FP add against a magic constant for the
//! subnormal range, selects for the special cases) compiled for AVX-512 and AVX2 with
//! run-time dispatch, so they vectorize.

use crate::KernelError;

/// Which encoder to use when a value does not fit the format's finite range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Overflow {
    /// Overflow becomes NaN (E4M3) or ±inf (E5M2), as ml_dtypes' cast.
    Ieee,
    /// Overflow (and ±inf) clamps to ±max finite, as FP8 training casts.
    Saturate,
}

/// The constants that describe one FP8 format; every routine below is written once over it.
struct Format {
    /// Explicit mantissa bits.
    mantissa_bits: u32,
    /// Exponent bias.
    bias: i32,
    /// Largest finite magnitude's code (sign bit clear).
    max_finite_code: u8,
    /// Code (sign bit clear) produced by overflow in IEEE mode: NaN for E4M3, inf for E5M2.
    ieee_overflow_code: u8,
    /// Code (sign bit clear) for a NaN input.
    nan_code: u8,
    /// Whether the format has infinities (E5M2) or not (E4M3).
    has_inf: bool,
}

const E4M3_FORMAT: Format = Format {
    mantissa_bits: 3,
    bias: 7,
    max_finite_code: 0x7E,
    ieee_overflow_code: 0x7F,
    nan_code: 0x7F,
    has_inf: false,
};

const E5M2_FORMAT: Format = Format {
    mantissa_bits: 2,
    bias: 15,
    max_finite_code: 0x7B,
    ieee_overflow_code: 0x7C,
    nan_code: 0x7E,
    has_inf: true,
};

impl Format {
    /// f32 bits of the smallest normal value, 2^(1-bias).
    const fn min_normal_bits(&self) -> u32 {
        ((1 - self.bias + 127) as u32) << 23
    }

    /// The f32 whose unit in the last place equals the format's smallest subnormal:
    /// adding it to a value below the normal range rounds that value (in hardware, to
    /// nearest even) to a whole number of subnormal steps, which then sit in the low bits.
    const fn subnormal_magic(&self) -> f32 {
        // ulp(2^e) = 2^(e-23) = 2^(1 - bias - mantissa_bits)  =>  e = 24 - bias - mantissa_bits
        f32::from_bits(((24 - self.bias - self.mantissa_bits as i32 + 127) as u32) << 23)
    }

    /// Encodes one f32. Written as straight-line selects so the bulk loops vectorize.
    #[inline(always)]
    fn encode(&self, x: f32, overflow: Overflow) -> u8 {
        let bits = x.to_bits();
        let sign = ((bits >> 24) & 0x80) as u8;
        let abs = bits & 0x7FFF_FFFF;
        let shift = 23 - self.mantissa_bits;

        // Normal range: round the f32 mantissa to `mantissa_bits` (ties to even) with
        // integer arithmetic, then rebias the exponent. A carry out of the mantissa
        // correctly bumps the exponent.
        let round_bias = ((1u32 << (shift - 1)) - 1) + ((abs >> shift) & 1);
        let rebias = ((127 - self.bias) as u32) << self.mantissa_bits;
        let normal = ((abs + round_bias) >> shift).wrapping_sub(rebias);

        // Subnormal range: the FP add rounds to a multiple of the smallest subnormal; the
        // difference of bit patterns is that multiple, i.e. the code. A result equal to
        // 1 << mantissa_bits is exactly the smallest normal's code, as it should be.
        let magic = self.subnormal_magic();
        let subnormal = (f32::from_bits(abs) + magic).to_bits().wrapping_sub(magic.to_bits());

        let magnitude = if abs < self.min_normal_bits() { subnormal } else { normal };
        let overflowed = magnitude > self.max_finite_code as u32;
        let is_nan = abs > 0x7F80_0000;
        let overflow_code = match overflow {
            Overflow::Saturate => self.max_finite_code,
            Overflow::Ieee => self.ieee_overflow_code,
        };
        // ±inf needs no case of its own: its `normal` is far above max, so it takes the
        // overflow code (NaN for E4M3, which has no infinity; inf for E5M2; max when saturating).
        let code = if is_nan {
            self.nan_code
        } else if overflowed {
            overflow_code
        } else {
            magnitude as u8
        };
        sign | code
    }

    /// Decodes one code to f32 at compile time (used to build the decode tables).
    const fn decode_const(&self, code: u8) -> f32 {
        let sign = ((code as u32) & 0x80) << 24;
        let exp_bits = 7 - self.mantissa_bits;
        let exp = ((code as u32) >> self.mantissa_bits) & ((1 << exp_bits) - 1);
        let mant = (code as u32) & ((1 << self.mantissa_bits) - 1);
        let exp_all_ones = exp == (1 << exp_bits) - 1;
        if self.has_inf && exp_all_ones {
            return f32::from_bits(sign | if mant == 0 { 0x7F80_0000 } else { 0x7FC0_0000 });
        }
        if !self.has_inf && exp_all_ones && mant == (1 << self.mantissa_bits) - 1 {
            return f32::from_bits(sign | 0x7FC0_0000);
        }
        if exp == 0 {
            if mant == 0 {
                return f32::from_bits(sign);
            }
            // Subnormal: mant · 2^(1 - bias - mantissa_bits); normalize into an f32.
            let mut m = mant;
            let mut e = 1 - self.bias;
            while m & (1 << self.mantissa_bits) == 0 {
                m <<= 1;
                e -= 1;
            }
            let frac = (m & ((1 << self.mantissa_bits) - 1)) << (23 - self.mantissa_bits);
            return f32::from_bits(sign | (((e + 127) as u32) << 23) | frac);
        }
        let e = exp as i32 - self.bias + 127;
        f32::from_bits(sign | ((e as u32) << 23) | (mant << (23 - self.mantissa_bits)))
    }

    const fn decode_table(&self) -> [f32; 256] {
        let mut table = [0f32; 256];
        let mut i = 0;
        while i < 256 {
            table[i] = self.decode_const(i as u8);
            i += 1;
        }
        table
    }
}

/// Every E4M3 code decoded to f32, indexed by code.
pub static E4M3_TO_F32: [f32; 256] = E4M3_FORMAT.decode_table();
/// Every E5M2 code decoded to f32, indexed by code.
pub static E5M2_TO_F32: [f32; 256] = E5M2_FORMAT.decode_table();

macro_rules! fp8_type {
    ($name:ident, $format:ident, $table:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        #[repr(transparent)]
        pub struct $name(u8);

        impl $name {
            /// Largest finite value.
            pub const MAX: f32 = $format.decode_const($format.max_finite_code);
            /// Smallest positive normal value.
            pub const MIN_POSITIVE: f32 = f32::from_bits($format.min_normal_bits());
            /// Smallest positive subnormal value.
            pub const MIN_POSITIVE_SUBNORMAL: f32 = $format.decode_const(1);
            /// The canonical quiet NaN code, positive sign.
            pub const NAN: Self = Self($format.nan_code);

            /// Rounds to nearest even; overflow to NaN/inf as ml_dtypes' cast.
            #[inline]
            pub fn from_f32(x: f32) -> Self {
                Self($format.encode(x, Overflow::Ieee))
            }

            /// Rounds to nearest even; overflow and ±inf clamp to ±[`Self::MAX`].
            #[inline]
            pub fn from_f32_saturating(x: f32) -> Self {
                Self($format.encode(x, Overflow::Saturate))
            }

            /// Rounds to nearest even with the chosen overflow behaviour.
            #[inline]
            pub fn from_f32_with(x: f32, overflow: Overflow) -> Self {
                Self($format.encode(x, overflow))
            }

            /// The exact value of this code.
            #[inline]
            pub fn to_f32(self) -> f32 {
                $table[self.0 as usize]
            }

            /// The raw code.
            #[inline]
            pub const fn to_bits(self) -> u8 {
                self.0
            }

            /// Wraps a raw code (every byte is a valid code).
            #[inline]
            pub const fn from_bits(bits: u8) -> Self {
                Self(bits)
            }

            /// Whether this code is a NaN.
            #[inline]
            pub fn is_nan(self) -> bool {
                self.to_f32().is_nan()
            }
        }
    };
}

fp8_type!(
    E4M3,
    E4M3_FORMAT,
    E4M3_TO_F32,
    "FP8 E4M3 (\"e4m3fn\": no infinities, max 448), the format of every FP8 tensor in DeepSeek-V3 training."
);
fp8_type!(E5M2, E5M2_FORMAT, E5M2_TO_F32, "FP8 E5M2 (IEEE-like, with infinities, max 57344).");

fn check_lengths(what: &'static str, src: usize, dst: usize) -> Result<(), KernelError> {
    if src != dst {
        return Err(KernelError::LengthMismatch { tensor: what, expected: src, actual: dst });
    }
    Ok(())
}

#[multiversion::multiversion(targets("x86_64+avx512f+avx512bw+avx512vl", "x86_64+avx2+fma"))]
fn encode_lanes(format_is_e4m3: bool, src: &[f32], dst: &mut [u8], overflow: Overflow) {
    // One loop per format so that each is compiled with its constants folded in.
    if format_is_e4m3 {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = E4M3_FORMAT.encode(s, overflow);
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = E5M2_FORMAT.encode(s, overflow);
        }
    }
}

/// Encodes `src` into E4M3 codes in `dst` (same length).
pub fn encode_e4m3(src: &[f32], dst: &mut [u8], overflow: Overflow) -> Result<(), KernelError> {
    check_lengths("e4m3 destination", src.len(), dst.len())?;
    encode_lanes(true, src, dst, overflow);
    Ok(())
}

/// Encodes `src` into E5M2 codes in `dst` (same length).
pub fn encode_e5m2(src: &[f32], dst: &mut [u8], overflow: Overflow) -> Result<(), KernelError> {
    check_lengths("e5m2 destination", src.len(), dst.len())?;
    encode_lanes(false, src, dst, overflow);
    Ok(())
}

fn decode_with(table: &[f32; 256], src: &[u8], dst: &mut [f32]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = table[s as usize];
    }
}

/// Decodes E4M3 codes in `src` into `dst` (same length).
pub fn decode_e4m3(src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check_lengths("f32 destination", src.len(), dst.len())?;
    decode_with(&E4M3_TO_F32, src, dst);
    Ok(())
}

/// Decodes E5M2 codes in `src` into `dst` (same length).
pub fn decode_e5m2(src: &[u8], dst: &mut [f32]) -> Result<(), KernelError> {
    check_lengths("f32 destination", src.len(), dst.len())?;
    decode_with(&E5M2_TO_F32, src, dst);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_spec() {
        assert_eq!(E4M3::MAX, 448.0);
        assert_eq!(E5M2::MAX, 57344.0);
        assert_eq!(E4M3::MIN_POSITIVE, 2f32.powi(-6));
        assert_eq!(E5M2::MIN_POSITIVE, 2f32.powi(-14));
        assert_eq!(E4M3::MIN_POSITIVE_SUBNORMAL, 2f32.powi(-9));
        assert_eq!(E5M2::MIN_POSITIVE_SUBNORMAL, 2f32.powi(-16));
        assert!(E4M3::NAN.is_nan() && E5M2::NAN.is_nan());
        assert!(E5M2::from_bits(0x7C).to_f32().is_infinite());
        assert!(!E4M3::from_bits(0x7E).is_nan());
    }

    #[test]
    fn every_code_round_trips() {
        for code in 0..=255u8 {
            for (decoded, reencoded) in [
                (E4M3::from_bits(code).to_f32(), E4M3::from_f32(E4M3::from_bits(code).to_f32()).to_bits()),
                (E5M2::from_bits(code).to_f32(), E5M2::from_f32(E5M2::from_bits(code).to_f32()).to_bits()),
            ] {
                if decoded.is_nan() {
                    continue;
                }
                assert_eq!(reencoded, code, "code {code:#04x} decoded to {decoded}");
            }
        }
    }

    #[test]
    fn overflow_modes() {
        assert!(E4M3::from_f32(464.1).is_nan());
        assert_eq!(E4M3::from_f32(464.0).to_f32(), 448.0, "tie rounds to even (448)");
        assert_eq!(E4M3::from_f32_saturating(1e9).to_f32(), 448.0);
        assert_eq!(E4M3::from_f32_saturating(f32::NEG_INFINITY).to_f32(), -448.0);
        assert!(E4M3::from_f32(f32::INFINITY).is_nan());
        assert_eq!(E5M2::from_f32(1e9).to_f32(), f32::INFINITY);
        assert_eq!(E5M2::from_f32_saturating(-1e9).to_f32(), -57344.0);
        assert!(E5M2::from_f32_saturating(f32::NAN).is_nan());
    }
}
