// Exhaustive check of the FP8 prune kernel's division (csrc/prune_compress_sm90.cu, prune_quant_fp8_kernel):
// for every positive finite bf16 absmax A with qs = A / 448 >= 2^-100 and every bf16 0 < v <= A, the e4m3 cast of
// q = fma(fma(-q0, qs, v), r, q0), q0 = v * r, r = 1 / qs (each IEEE, round to nearest) equals the e4m3 cast of
// the IEEE quotient v / qs (the reference, rtlynx.reference.fp8). Negative v: both sides are odd functions of v.
// Build: g++ -O2 -ffp-contract=off [-DPLAIN_PRODUCT: the negative control] (no contraction: every operation rounds once, as the kernel's intrinsics).
// Prints the number of pairs and of mismatches; exit status 1 if any mismatch.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

static float bf16(uint32_t b) {
  const uint32_t u = b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> e4m3 (finite, saturating, round to nearest even) for a >= 0, as a float
static float e4m3(float a) {
  if (a >= 448.f) return 448.f;
  int e;
  std::frexp(a, &e);
  int ue = e - 4;          // 3 mantissa bits
  if (ue < -9) ue = -9;    // subnormal grid 2^-9
  const float q = std::ldexp(std::nearbyint(std::ldexp(a, -ue)), ue);
  return q > 448.f ? 448.f : q;
}

int main() {
  long pairs = 0, bad = 0;
  for (uint32_t a = 1; a < 0x7F80; ++a) {
    const float A = bf16(a);
    const float qs = A / 448.0f;
    if (!(qs >= 0x1p-100f)) continue;  // the kernel divides for these rows
    const float r = 1.0f / qs;
    for (uint32_t b = 1; b <= a; ++b) {
      const float v = bf16(b);
      const float q0 = v * r;
#ifdef PLAIN_PRODUCT  // the check's negative control: v * r alone is not the IEEE quotient's cast
      const float q = q0;
#else
      const float q = std::fmaf(std::fmaf(-q0, qs, v), r, q0);
#endif
      ++pairs;
      const float want = v / qs;
      if (q != want && e4m3(q) != e4m3(want)) {  // equal quotients need no cast
        if (++bad <= 5) std::printf("mismatch: amax %a v %a: %a vs %a\n", A, v, q, want);
      }
    }
  }
  std::printf("pairs %ld mismatches %ld\n", pairs, bad);
  return bad != 0;
}
