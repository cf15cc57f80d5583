#!/usr/bin/env python3
"""Generate the ml_dtypes reference fixtures for `kernels/src/fp8.rs`.

Run from the repository root:

    python3 -m venv tools/.venv
    tools/.venv/bin/pip install -r tools/requirements.txt
    tools/.venv/bin/python tools/fp8_reference.py

It (over)writes, in `kernels/tests/fixtures/`, for FMT in {e4m3fn, e5m2}:

- `fp8_FMT_decode.txt`: 256 lines `CODE F32BITS` (both hex): the f32 bit pattern ml_dtypes
  decodes each code to (`np.arange(256, dtype=np.uint8).view(FMT).astype(np.float32)`).
- `fp8_FMT_encode.u8.gz`: gzip of 2 * N bytes, N = 65536 * 8 = 524288: the expected codes
  of the N inputs below in IEEE-like mode (`x.astype(FMT)`, overflow -> NaN for e4m3fn,
  -> +-inf for e5m2), then the expected codes of the same inputs in saturating mode
  (`np.clip(x, -MAX, MAX).astype(FMT)` for non-NaN x, so +-inf -> +-MAX; NaN cast as is).
- `fp8_FMT_boundaries.txt`: lines `F32BITS IEEE_CODE SAT_CODE` (hex): for every pair of
  adjacent finite values of the format of either sign (subnormals included) and for the
  pair (MAX, the value one step above MAX the format would have with a wider exponent),
  the exact f32 midpoint and its two f32 neighbours (nextafter down and up), plus every
  finite value of the format itself.

plus `fp8_reference.json` with the numpy/ml_dtypes versions, the input rule, the counts
and the SHA-256 of each fixture file.

Encode inputs (the Rust test recomputes them, so only the codes are stored), in order:

    for hi in 0..=0xFFFF:
        for lo in [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF, lo_hash(hi, 0), lo_hash(hi, 1)]:
            bits = (hi << 16) | lo           # f32 bit pattern

    lo_hash(hi, k):                           # all arithmetic mod 2**32
        x = hi * 0x9E3779B1 + (k + 1) * 0x85EBCA77
        x ^= x >> 15
        x *= 0x2C1B3C6D
        x ^= x >> 12
        return x & 0xFFFF

Every upper half is covered, so every f32 exponent and sign, both the ties and the bits
just below and above them (the rounding bit of both formats is in the upper 16 bits),
f32 subnormals, fp8 subnormals, overflow, +-inf and NaN (quiet and signalling, both signs).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "kernels" / "tests" / "fixtures"

FIXED_LOWS = [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
LOWS_PER_HI = len(FIXED_LOWS) + 2

FORMATS = {
    # name: (dtype, mantissa bits, max finite code with sign clear)
    "e4m3fn": (ml_dtypes.float8_e4m3fn, 3, 0x7E),
    "e5m2": (ml_dtypes.float8_e5m2, 2, 0x7B),
}


def lo_hash(hi: np.ndarray, k: int) -> np.ndarray:
    """The pseudo-random low halves; `hi` is a uint32 array. Mirrored in the Rust test."""
    with np.errstate(over="ignore"):
        x = hi.astype(np.uint32) * np.uint32(0x9E3779B1) + np.uint32(((k + 1) * 0x85EBCA77) & 0xFFFFFFFF)
        x ^= x >> np.uint32(15)
        x = x * np.uint32(0x2C1B3C6D)
        x ^= x >> np.uint32(12)
    return x & np.uint32(0xFFFF)


def encode_inputs() -> np.ndarray:
    """All encode inputs as f32 bit patterns (uint32), in fixture order."""
    hi = np.arange(0x10000, dtype=np.uint32)
    lows = np.empty((hi.size, LOWS_PER_HI), dtype=np.uint32)
    for j, lo in enumerate(FIXED_LOWS):
        lows[:, j] = lo
    lows[:, len(FIXED_LOWS)] = lo_hash(hi, 0)
    lows[:, len(FIXED_LOWS) + 1] = lo_hash(hi, 1)
    return ((hi[:, None] << np.uint32(16)) | lows).reshape(-1)


def cast_ieee(x: np.ndarray, dtype) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(np.float32).astype(dtype).view(np.uint8)


def cast_saturate(x: np.ndarray, dtype, max_value: float) -> np.ndarray:
    x = x.astype(np.float32)
    m = np.float32(max_value)
    clipped = np.where(np.isnan(x), x, np.clip(x, -m, m)).astype(np.float32)
    return cast_ieee(clipped, dtype)


def boundary_inputs(dtype, mantissa_bits: int, max_code: int) -> np.ndarray:
    """Midpoints of adjacent finite values (and of MAX and the step above it), their f32
    neighbours, and the finite values themselves; both signs; as unique sorted f32 bits."""
    codes = np.arange(max_code + 1, dtype=np.uint8)
    values = codes.view(dtype).astype(np.float64)  # 0, subnormals, normals up to MAX
    assert np.all(np.diff(values) > 0)
    max_value = values[-1]
    # The value one step above MAX with the same exponent step: MAX + ulp(MAX).
    ulp_max = 2.0 ** (np.floor(np.log2(max_value)) - mantissa_bits)
    extended = np.append(values, max_value + ulp_max)
    mids = (extended[:-1] + extended[1:]) / 2
    mids32 = mids.astype(np.float32)
    assert np.all(mids32.astype(np.float64) == mids), "midpoints must be exact in f32"
    up = np.nextafter(mids32, np.float32(np.inf))
    down = np.nextafter(mids32, np.float32(-np.inf))
    pos = np.concatenate([mids32, up, down, values.astype(np.float32)])
    allv = np.concatenate([pos, -pos]).astype(np.float32)
    return np.unique(allv.view(np.uint32))


def write_text(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    inputs_bits = encode_inputs()
    inputs = inputs_bits.view(np.float32)
    meta = {
        "generator": "tools/fp8_reference.py",
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "encode_inputs": {
            "count": int(inputs_bits.size),
            "order": "for hi in 0..=0xFFFF, for lo in lows(hi): f32 bits (hi << 16) | lo",
            "lows(hi)": [f"{lo:#06x}" for lo in FIXED_LOWS] + ["lo_hash(hi, 0)", "lo_hash(hi, 1)"],
            "lo_hash(hi, k)": (
                "mod 2^32: x = hi*0x9E3779B1 + (k+1)*0x85EBCA77; x ^= x>>15; "
                "x *= 0x2C1B3C6D; x ^= x>>12; return x & 0xFFFF"
            ),
        },
        "ieee_mode": "np.asarray(x, np.float32).astype(FMT).view(np.uint8)",
        "saturate_mode": "x if isnan(x) else np.clip(x, -MAX, MAX), then as ieee_mode",
        "formats": {},
    }
    print(f"numpy {np.__version__}, ml_dtypes {ml_dtypes.__version__}")
    for name, (dtype, mantissa_bits, max_code) in FORMATS.items():
        max_value = float(np.array([max_code], np.uint8).view(dtype).astype(np.float32)[0])
        files = {}

        decoded = np.arange(256, dtype=np.uint8).view(dtype).astype(np.float32).view(np.uint32)
        decode_path = FIXTURES / f"fp8_{name}_decode.txt"
        write_text(decode_path, [f"{c:02x} {int(b):08x}" for c, b in enumerate(decoded)])
        files["decode"] = decode_path

        ieee = cast_ieee(inputs, dtype)
        sat = cast_saturate(inputs, dtype, max_value)
        encode_path = FIXTURES / f"fp8_{name}_encode.u8.gz"
        # mtime=0 and no file name in the header: the output is reproducible byte for byte.
        with open(encode_path, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
        ) as gz:
            gz.write(ieee.tobytes())
            gz.write(sat.tobytes())
        files["encode"] = encode_path

        bbits = boundary_inputs(dtype, mantissa_bits, max_code)
        bx = bbits.view(np.float32)
        b_ieee = cast_ieee(bx, dtype)
        b_sat = cast_saturate(bx, dtype, max_value)
        boundary_path = FIXTURES / f"fp8_{name}_boundaries.txt"
        write_text(
            boundary_path,
            [f"{int(b):08x} {int(i):02x} {int(s):02x}" for b, i, s in zip(bbits, b_ieee, b_sat)],
        )
        files["boundaries"] = boundary_path

        nan_in = np.isnan(inputs)
        ieee_nan = np.isnan(ieee.view(dtype).astype(np.float32))
        differ = int(np.count_nonzero(ieee != sat))
        meta["formats"][name] = {
            "max": max_value,
            "max_finite_code": f"{max_code:#04x}",
            "boundary_cases": int(bbits.size),
            "files": {
                k: {
                    "path": str(p.relative_to(ROOT)),
                    "bytes": p.stat().st_size,
                    "sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                }
                for k, p in files.items()
            },
        }
        print(
            f"{name}: max {max_value:g}; {inputs.size} encode inputs "
            f"({int(nan_in.sum())} NaN inputs, {int(ieee_nan.sum())} NaN codes in IEEE mode, "
            f"{differ} codes differ between modes); {bbits.size} boundary cases; "
            + ", ".join(f"{p.name} {p.stat().st_size} B" for p in files.values())
        )

    meta_path = FIXTURES / "fp8_reference.json"
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {meta_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
