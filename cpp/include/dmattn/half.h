// float16 / bfloat16 <-> float conversions by bit manipulation, rounding to nearest even.
// `static` for the reason given in selection.h.
#pragma once

#include <stdint.h>
#include <string.h>

namespace dmattn {

static inline float bits_as_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint32_t float_as_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) return bits_as_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {
    // Zero or subnormal: mantissa * 2^-24, exact in float.
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  return bits_as_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

static inline uint16_t float_to_half(float f) {
  uint32_t u = float_as_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7e00u;
  if (u >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds to infinity
  if (u < 0x38800000u) {
    // Result is subnormal or zero: adding 0.5 puts the half's last bit at the float's last bit,
    // so the hardware addition rounds to nearest even for us.
    const float shifted = bits_as_float(u) + 0.5f;
    return sign | uint16_t(float_as_bits(shifted) - 0x3f000000u);
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += 0xc8000fffu + odd;  // rebias the exponent (127 -> 15) and round to nearest even
  return sign | uint16_t(u >> 13);
}

static inline float bf16_to_float(uint16_t h) { return bits_as_float(uint32_t(h) << 16); }

static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_as_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

}  // namespace dmattn
