/*
 * uniform.cuh — private to the uniform format's kernels (uniform.cu, uniform_token.cu,
 * uniform_channel.cu): the per-value code (kv_ucode), the fp16 params (kv_uparams), the exact 2-bit
 * thresholds and the packed compares that use them, and the two quantize launchers (one per axis).
 */
#ifndef KIVI_CUDA_UNIFORM_CUH
#define KIVI_CUDA_UNIFORM_CUH

#include <cuda_bf16.h>

#include <type_traits>

#include "common.cuh"

#define KV_STRIP_ROWS 512 /* rows of a token-axis strip: whole groups for every G */

/* The exact formula, out of line: taken only near a rounding tie, so it stays out of the hot loop. */
static __device__ __noinline__ uint32_t kv_ucode_exact(float x, float z, float s, int32_t bits) {
  return kivi_uniform_code(x, z, s, bits);
}

/*
 * kivi_uniform_code(x, z, s) without a division per value: t = (x - z) * rinv (rinv = 1 / s, both
 * correctly rounded) is within |Q| * 2^-23 of Q = (x - z) / s, and RN(Q) within |Q| * 2^-24. Where
 * it matters (half-integers in (0, top), |Q| < 16) that puts t and RN(Q) less than 3e-6 apart.
 * t is clamped to [0, top] first (fmaxf turns a NaN t into 0, which is the reference's code for a
 * NaN quotient; t < 0 or t > top means Q rounds to <= 0 or >= top, both clamped the same), then
 * rounded to nearest-even by the 1.5 * 2^23 trick (exact for 0 <= tc <= 15: m's low bits are the
 * integer), without the slower F2I / FRND instructions. When tc is more than 5e-6 from a
 * half-integer, t and RN(Q) round to the same integer; near a half-integer the exact formula
 * decides. __fadd_rn / __fmul_rn keep nvcc from contracting into FMAs. No test of s: where s is not
 * a positive finite number, rinv is 0 (kv_rinv), t is 0 or NaN, and the code is 0, as the reference's.
 */
#define KV_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define KV_MAGIC_BITS 0x4B400000u
template <int BITS>
__device__ __forceinline__ uint32_t kv_ucode(float x, float z, float s, float rinv) {
  constexpr float top = (float)((1 << BITS) - 1);
  const float t = __fmul_rn(__fsub_rn(x, z), rinv);
  const float tc = fminf(fmaxf(t, 0.0f), top);
  const float m = __fadd_rn(tc, KV_MAGIC);
  const float d = __fsub_rn(tc, __fsub_rn(m, KV_MAGIC));
  if (!(fabsf(d) < 0.499995f)) return kv_ucode_exact(x, z, s, BITS) & ((1u << BITS) - 1u);
  return __float_as_uint(m) - KV_MAGIC_BITS;
}

/** 1 / s for kv_ucode: 0 where s is not > 0 (and 1 / inf = 0), which makes every code 0. */
__device__ __forceinline__ float kv_rinv(float s) { return s > 0.0f ? 1.0f / s : 0.0f; }

/** kivi_uniform_params with the hardware's f16 conversions (RNE: the same bits as kivi_f32_to_f16) in
    the common case, and the floats that the codes are computed from. The clamp, the cover test and the
    rare widening are kivi_format.h's own functions, so the params stay bit-identical to the CPU build. */
struct kv_up {
  uint16_t sh, zh;
  float s, z, rinv;
};
template <int BITS>
__device__ __forceinline__ kv_up kv_uparams(float mn, float mx) {
  kv_up p;
  mn = kivi_f16_clamp(mn);
  mx = kivi_f16_clamp(mx);
  const __half hs = __float2half_rn(__fdiv_rn(__fsub_rn(mx, mn), (float)((1 << BITS) - 1))), hz = __float2half_rn(mn);
  p.sh = __half_as_ushort(hs);
  p.zh = __half_as_ushort(hz);
  p.s = __half2float(hs);
  p.z = __half2float(hz);
  if (!kivi_uniform_covers(mn, mx, BITS, p.s, p.z)) {
    kivi_uniform_widen(mn, mx, BITS, &p.sh, &p.zh);
    p.s = __half2float(__ushort_as_half(p.sh));
    p.z = __half2float(__ushort_as_half(p.zh));
  }
  p.rinv = kv_rinv(p.s);
  return p;
}

/*
 * 2 bits from 16-bit inputs by comparison. The reference code q(x) = clamp(rint(fl(fl(x - z) / s)))
 * is monotone in x, so for each level k = 1..3 there is a least 16-bit value T_k with q(x) >= k, and
 * q(x) = #{k : x >= T_k} for every input x, NaN included (it compares false: code 0, as the
 * reference). A group's three thresholds are found once, exactly (below); each pair of values then
 * costs two packed compares and one select: hi = [x >= T2], lo = [x >= (hi ? T3 : T1)], both as
 * 0xffff-per-half masks (HSET2), which drop straight into the packed words with one LOP3 per bit.
 */

/** Position of a 16-bit pattern on the number line (both zeros at 0; NaN patterns never asked). */
__device__ __forceinline__ int kv_h_ord(uint32_t h) { return (h & 0x8000u) ? -(int)(h & 0x7fffu) : (int)h; }
__device__ __forceinline__ uint32_t kv_h_from_ord(int o) { return o >= 0 ? (uint32_t)o : 0x8000u | (uint32_t)(-o); }

/*
 * q(y) >= k decided exactly, without dividing. The reference rounds Q = d / s (d = fl(y - z)) to fp32,
 * then to an integer, both half-even. With b = k - 1/2 and h half an ulp of b (b's last mantissa bit
 * is 0, so fp32 ties at b +- h go to b):
 *   q >= k  <=>  fl(Q) >= b (k even: rint(b) = k)  <=>  Q >= b - h  <=>  d - b s >= -h s
 *   q >= k  <=>  fl(Q) >  b (k odd: rint(b) = k - 1) <=>  Q >  b + h  <=>  d - b s >  h s      (s > 0).
 * r = fma(-b, s, d) is d - b s rounded once, and e = +-h s is exact (s >= 2^-100), so r > e or r < e
 * gives the side; r == e (rounded onto it) is left undecided. Returns 1, 0, or -1 (undecided, or s
 * not a finite number >= 2^-100). For the 2-bit levels k = 1, 2, 3 only (h is spelled out for them).
 */
template <int DT>
__device__ __forceinline__ int kv_code_ge_exact(uint32_t y, float z, float s, int k) {
  if (!(s >= 0x1p-100f && s < INFINITY)) return -1;
  const float b = (float)k - 0.5f;
  const float e = (k == 1 ? 0x1p-25f : k == 2 ? -0x1p-24f : 0x1p-23f) * s; /* the sign: odd k strict */
  const float r = __fmaf_rn(-b, s, __fsub_rn(kv_h2f<DT>(y), z));
  return r > e ? 1 : r < e ? 0 : -1;
}

/** q(y) >= k, exactly: kv_code_ge_exact, and the reference formula where that is undecided. */
template <int DT>
__device__ __forceinline__ bool kv_code_ge(uint32_t y, float z, float s, int k) {
  const int g = kv_code_ge_exact<DT>(y, z, s, k);
  if (g >= 0) return g != 0;
  return kv_ucode_exact(kv_h2f<DT>(y), z, s, 2) >= (uint32_t)k;
}

/** T_k (16-bit pattern; a NaN pattern when no value reaches level k). Start at the 16-bit value
    nearest the real boundary z + (k - 1/2) s, which is almost always T_k or its neighbour (two
    checks); where fp32 rounding moves the boundary further (it can, by thousands of bf16 steps, when
    the boundary is 0 and |z| is large), gallop along the number line, then bisect. */
template <int DT>
__device__ __noinline__ uint32_t kv_threshold(float z, float s, int k) {
  constexpr int inf = DT == KIVI_F16 ? 0x7c00 : 0x7f80;
  constexpr uint32_t nan = DT == KIVI_F16 ? 0x7e00u : 0x7fc0u;
  if (!(s > 0.0f)) return nan; /* constant or NaN group: code 0 everywhere */
  uint32_t y = kv_f2h<DT>(__fmaf_rn((float)k - 0.5f, s, z));
  if ((y & 0x7fffu) > (uint32_t)inf) y = inf; /* z = -inf with s = inf: start from the top */
  int lo, hi;                                 /* positions with q < k at lo and q >= k at hi */
  if (kv_code_ge<DT>(y, z, s, k)) {
    hi = kv_h_ord(y);
    for (int d = 1;; d *= 2) {
      if (hi == -inf) return kv_h_from_ord(hi);
      lo = hi - d > -inf ? hi - d : -inf;
      if (!kv_code_ge<DT>(kv_h_from_ord(lo), z, s, k)) break;
      hi = lo;
    }
  } else {
    lo = kv_h_ord(y);
    for (int d = 1;; d *= 2) {
      if (lo == inf) return nan; /* not even +inf reaches k (s = inf) */
      hi = lo + d < inf ? lo + d : inf;
      if (kv_code_ge<DT>(kv_h_from_ord(hi), z, s, k)) break;
      lo = hi;
    }
  }
  while (hi - lo > 1) {
    const int m = lo + (hi - lo) / 2;
    if (kv_code_ge<DT>(kv_h_from_ord(m), z, s, k))
      hi = m;
    else
      lo = m;
  }
  return kv_h_from_ord(hi);
}

/** kv_threshold's common case inline. y, the 16-bit value nearest the boundary z + (k - 1/2) s, is
    T_k when q(y) >= k > q(y - 1 step), and the value above y is T_k when q(y) < k <= q(y + 1 step)
    (y rounded down: as often as not), each decided exactly by kv_code_ge_exact. Anything else (an
    undecided compare, s not a positive finite number, infinities, a boundary that fp32 rounding moved
    by more than a step) goes to the general search. */
template <int DT>
__device__ __forceinline__ uint32_t kv_threshold_near(float z, float s, int k) {
  constexpr uint32_t inf = DT == KIVI_F16 ? 0x7c00u : 0x7f80u;
  const uint32_t y = kv_f2h<DT>(__fmaf_rn((float)k - 0.5f, s, z));
  if ((y & 0x7fffu) < inf) {
    const bool zero = (y & 0x7fffu) == 0, neg = (y & 0x8000u) != 0;
    const uint32_t below = zero ? 0x8001u : neg ? y + 1 : y - 1, above = zero ? 0x0001u : neg ? y - 1 : y + 1;
    const int gy = kv_code_ge_exact<DT>(y, z, s, k);
    if (gy == 1 && kv_code_ge_exact<DT>(below, z, s, k) == 0) return y;
    if (gy == 0 && kv_code_ge_exact<DT>(above, z, s, k) == 1) return above;
  }
  return kv_threshold<DT>(z, s, k);
}

/** Both halves of a and b compared: 0xffff in each half where a >= b (false for NaN). */
template <int DT>
__device__ __forceinline__ uint32_t kv_ge2(uint32_t a, uint32_t b) {
  if constexpr (DT == KIVI_F16)
    return __hge2_mask(*reinterpret_cast<const __half2 *>(&a), *reinterpret_cast<const __half2 *>(&b));
  else
    return __hge2_mask(*reinterpret_cast<const __nv_bfloat162 *>(&a), *reinterpret_cast<const __nv_bfloat162 *>(&b));
}
/** Both halves' min (MAX false) or max of a and b; a NaN half gives the other value, as fminf. */
template <int DT, bool MAX>
__device__ __forceinline__ uint32_t kv_mm2(uint32_t a, uint32_t b) {
  using T = typename std::conditional<DT == KIVI_F16, __half2, __nv_bfloat162>::type;
  const T x = *reinterpret_cast<const T *>(&a), y = *reinterpret_cast<const T *>(&b);
  const T m = MAX ? __hmax2(x, y) : __hmin2(x, y);
  return *reinterpret_cast<const uint32_t *>(&m);
}
template <int DT>
__device__ __forceinline__ uint32_t kv_min2(uint32_t a, uint32_t b) {
  return kv_mm2<DT, false>(a, b);
}
template <int DT>
__device__ __forceinline__ uint32_t kv_max2(uint32_t a, uint32_t b) {
  return kv_mm2<DT, true>(a, b);
}

/** A 2-bit group's params (as kivi_uniform_params) and its thresholds, for one column of values. */
struct kv_u2 {
  uint16_t sh, zh;
  uint32_t t1, t2, t3;
};
template <int DT>
__device__ __forceinline__ kv_u2 kv_u2_group(float mn, float mx) {
  kv_u2 g;
  const kv_up p = kv_uparams<2>(mn, mx);
  g.sh = p.sh;
  g.zh = p.zh;
  g.t1 = kv_threshold_near<DT>(p.z, p.s, 1);
  g.t2 = kv_threshold_near<DT>(p.z, p.s, 2);
  g.t3 = kv_threshold_near<DT>(p.z, p.s, 3);
  return g;
}

/** The 2-bit codes of a pair x (two values) against paired thresholds, each in 2-bit slot `slot`
    (0-7) of its own half: hi = [x >= T2] is bit 1, [x >= (hi ? T3 : T1)] bit 0, both as
    0xffff-per-half masks that one LOP3 each puts in place. */
template <int DT>
__device__ __forceinline__ uint32_t kv_u2_pair(uint32_t x, uint32_t t1, uint32_t t2, uint32_t t3, int slot) {
  const uint32_t hi = kv_ge2<DT>(x, t2), lo = kv_ge2<DT>(x, (hi & t3) | (~hi & t1));
  return (lo & (0x00010001u << (2 * slot))) | (hi & (0x00020002u << (2 * slot)));
}

/** Puts the 2-bit codes of the low half's 8 slots and the high half's 8 slots alternately
    (low slot i -> slot 2i, high slot i -> slot 2i + 1): an outer perfect shuffle of 2-bit units. */
__device__ __forceinline__ uint32_t kv_shuffle2(uint32_t x) {
  x = __byte_perm(x, 0, 0x3120);
  uint32_t t = (x ^ (x >> 4)) & 0x00f000f0u;
  x ^= t ^ (t << 4);
  t = (x ^ (x >> 2)) & 0x0c0c0c0cu;
  x ^= t ^ (t << 2);
  return x;
}

/** Word w of the codes of element e (of the pair in each word, or the only one) of a group held as G
    words, one value of the column per word. */
template <int DT, int BITS, int G>
__device__ __forceinline__ uint32_t kv_ucode_word(const uint32_t (&raw)[G], int w, int e, const kv_up &p) {
  constexpr int CPW = 32 / BITS;
  uint32_t word = 0;
#pragma unroll
  for (int j = 0; j < CPW; j++)
    word |= kv_ucode<BITS>(kv_word_elem<DT>(raw[w * CPW + j], e), p.z, p.s, p.rinv) << (BITS * j);
  return word;
}

/** Min and max (fminf / fmaxf: NaN ignored) of element e of the G words of a group. */
template <int DT, int G>
__device__ __forceinline__ void kv_group_minmax(const uint32_t (&raw)[G], int e, float *mn, float *mx) {
  float lo = kv_word_elem<DT>(raw[0], e), hi = lo;
#pragma unroll
  for (int i = 1; i < G; i++) {
    const float v = kv_word_elem<DT>(raw[i], e);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
  *mn = lo;
  *mx = hi;
}

/* ---------------------------------------------------------------- launchers -------------- */

/** The token-axis quantize (keys: a group is G rows of one column), uniform_token.cu. */
void kv_uniform_quantize_token(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, const kv_shape &sh, uint32_t *codes,
                               uint16_t *scale, uint16_t *zero);
/** The channel-axis quantize (values: a group is G consecutive columns), uniform_channel.cu. */
void kv_uniform_quantize_channel(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, const kv_shape &sh, uint32_t *codes,
                                 uint16_t *scale, uint16_t *zero);

#endif /* KIVI_CUDA_UNIFORM_CUH */
