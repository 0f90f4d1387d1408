/*
 * uniform.cu — KIVI's asymmetric min/max format on the device: kivi_uniform_quantize (one fused
 * pass: read x once, min/max in registers, fp16 params, codes packed, no intermediate buffer) and
 * kivi_uniform_dequantize.
 *
 * 2-bit codes of fp16/bf16 values come from packed comparisons against three exact per-group
 * thresholds (kv_threshold*, kv_u2_pair); 4-bit codes and fp32 inputs from a division-free
 * quotient with the reference formula near a rounding tie (kv_ucode). Both are bit-identical to the
 * CPU build.
 *
 * Token axis (keys, a group = G rows of one column, words run along rows): a lane owns a pair of
 * columns (one 32-bit load of two f16/bf16 values; one column for f32 or odd widths), so a warp reads
 * 128 contiguous bytes per row. A CTA of 8 warps takes a tile of columns x 8 (or 16) groups of rows,
 * stages codes and params in shared memory and writes each column's run contiguously
 * (k_uniform_quantize_token_staged; with 2 bits, G 32 and pairs, in two alternating buffers). G 128
 * uses the simpler per-thread strip kernel.
 * Channel axis (values, a group = G consecutive columns): for 16-bit values a lane owns a whole group
 * and a warp's 32 groups stream into a per-warp cp.async ring (k_uniform_quantize_channel_lane); f32
 * or unaligned input uses k_uniform_quantize_channel, where G / chunk lanes share a group and reduce
 * min/max with __shfl_xor_sync.
 */
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
template <int BITS> __device__ __forceinline__ kv_up kv_uparams(float mn, float mx) {
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
template <int DT> __device__ __forceinline__ int kv_code_ge_exact(uint32_t y, float z, float s, int k) {
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
    if (kv_code_ge<DT>(kv_h_from_ord(m), z, s, k)) hi = m;
    else lo = m;
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
template <int DT> __device__ __forceinline__ uint32_t kv_ge2(uint32_t a, uint32_t b) {
  if constexpr (DT == KIVI_F16)
    return __hge2_mask(*reinterpret_cast<const __half2 *>(&a), *reinterpret_cast<const __half2 *>(&b));
  else
    return __hge2_mask(*reinterpret_cast<const __nv_bfloat162 *>(&a), *reinterpret_cast<const __nv_bfloat162 *>(&b));
}
/** Both halves' min (MAX false) or max of a and b; a NaN half gives the other value, as fminf. */
template <int DT, bool MAX> __device__ __forceinline__ uint32_t kv_mm2(uint32_t a, uint32_t b) {
  using T = typename std::conditional<DT == KIVI_F16, __half2, __nv_bfloat162>::type;
  const T x = *reinterpret_cast<const T *>(&a), y = *reinterpret_cast<const T *>(&b);
  const T m = MAX ? __hmax2(x, y) : __hmin2(x, y);
  return *reinterpret_cast<const uint32_t *>(&m);
}
template <int DT> __device__ __forceinline__ uint32_t kv_min2(uint32_t a, uint32_t b) { return kv_mm2<DT, false>(a, b); }
template <int DT> __device__ __forceinline__ uint32_t kv_max2(uint32_t a, uint32_t b) { return kv_mm2<DT, true>(a, b); }

/** A 2-bit group's params (as kivi_uniform_params) and its thresholds, for one column of values. */
struct kv_u2 {
  uint16_t sh, zh;
  uint32_t t1, t2, t3;
};
template <int DT> __device__ __forceinline__ kv_u2 kv_u2_group(float mn, float mx) {
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
  for (int j = 0; j < CPW; j++) word |= kv_ucode<BITS>(kv_word_elem<DT>(raw[w * CPW + j], e), p.z, p.s, p.rinv) << (BITS * j);
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

/* ---------------------------------------------------------------- quantize, token axis --- */

/* Task t = (column block, strip of KV_STRIP_ROWS rows). raw words hold EPT values of one row. */
template <int DT, int EPT, int G, int BITS>
static __global__ void __launch_bounds__(128)
    k_uniform_quantize_token(const void *__restrict__ x, int64_t rows, int64_t cols, int64_t ncolblk, int64_t ntasks,
                             uint32_t *__restrict__ codes, uint16_t *__restrict__ scale,
                             uint16_t *__restrict__ zero) {
  constexpr int CPW = 32 / BITS, WPG = G / CPW, GPS = KV_STRIP_ROWS / G;
  constexpr int K = G >= 64 ? 1 : 2; /* groups loaded per step: >= 64 loads in flight */
  constexpr int ES = kv_dt<DT>::size;
  static_assert(EPT == 1 || (EPT == 2 && ES == 2), "pairs are 16-bit values");
  const int64_t gpc = rows / G, wpc = rows / CPW, ncolthreads = cols / EPT;
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x) {
    const int64_t ct = (t % ncolblk) * blockDim.x + threadIdx.x;
    const int64_t strip = t / ncolblk;
    if (ct >= ncolthreads) continue;
    const int64_t c0 = ct * EPT;
    const int64_t g_begin = strip * GPS;
    const int64_t g_end = g_begin + GPS < gpc ? g_begin + GPS : gpc;
    for (int64_t gr = g_begin; gr < g_end; gr += K) {
      uint32_t raw[K][G];
#pragma unroll
      for (int k = 0; k < K; k++) {
        if (k == 0 || gr + k < g_end) {
          const char *p = (const char *)x + ((gr + k) * G * cols + c0) * ES;
#pragma unroll
          for (int i = 0; i < G; i++) {
            const char *q = p + (int64_t)i * cols * ES;
            if constexpr (ES == 4 || EPT == 2) raw[k][i] = *(const uint32_t *)q;
            else raw[k][i] = *(const uint16_t *)q;
          }
        } else {
#pragma unroll
          for (int i = 0; i < G; i++) raw[k][i] = 0u;
        }
      }
#pragma unroll
      for (int k = 0; k < K; k++) {
        if (k > 0 && gr + k >= g_end) break;
#pragma unroll
        for (int e = 0; e < EPT; e++) {
          float mn, mx;
          kv_group_minmax<DT, G>(raw[k], e, &mn, &mx);
          const kv_up pr = kv_uparams<BITS>(mn, mx);
          const int64_t c = c0 + e;
          scale[c * gpc + gr + k] = pr.sh;
          zero[c * gpc + gr + k] = pr.zh;
          uint32_t *wout = codes + c * wpc + (gr + k) * WPG;
#pragma unroll
          for (int w = 0; w < WPG; w++) wout[w] = kv_ucode_word<DT, BITS>(raw[k], w, e, pr);
        }
      }
    }
  }
}

/*
 * Token axis, staged (the common case; KV_TOKEN_STAGED selects it): a CTA of 8 warps owns a tile of
 * 32 * EPT columns (a lane owns EPT adjacent columns: one 32-bit load per row, 128 bytes per warp
 * and row) and, per step, GPI = 8 * K consecutive groups of rows (warp w takes groups w*K..w*K+K-1).
 * Codes and params go to shared memory first; then the CTA writes each column's GPI * WPG words
 * (>= 32 words = 128 contiguous bytes) and GPI params as contiguous runs, so that global stores are
 * coalesced instead of one 4-byte word per column and lane.
 */
#ifndef KV_TOKEN_STAGED
#define KV_TOKEN_STAGED 1
#endif
#define KV_TS_THREADS 256

/** Groups a warp loads per step: 2 where one group is fewer than 64 loads in flight, except for
    2 bits from pairs (thresholds), whose lighter arithmetic pays more for occupancy; in the
    two-buffer kernel (db), 2 for 2 bits and 1 for 4 bits (measured, see below). */
__host__ __device__ constexpr int kv_ts_k(int G, int bits, int ept, bool db = false) {
  return db ? (bits == 2 ? 2 : 1) : G >= 64 || (bits == 2 && ept == 2) ? 1 : 2;
}
/** CTAs of KV_TS_THREADS per SM the kernel is built for (bf16 G 64 spills at 128 registers). */
__host__ __device__ constexpr int kv_ts_ctas(int dt, int G, int bits, int ept, bool db = false) {
  return db ? (bits == 2 ? 2 : 3) : bits == 2 && ept == 2 ? (G >= 64 ? 2 : 3) : (dt == KIVI_BF16 && G >= 64) ? 1 : 2;
}

/*
 * DB (pairs, G 32, 2 or 4 bits: the default there): two staging buffers, so that a task's readout and
 * the next task's coding need no barrier between them (one __syncthreads per task instead of two).
 * Measured on an H200, keys of the issue's size, each against the others in the same run: 2 bits,
 * two groups a warp and 2 CTAs a SM, 63 % of copy, against 55 % with one group and 3 CTAs and 52 %
 * with one group and one buffer; 4 bits, one group and 3 CTAs, 56 %, against 54 % with two groups
 * and 53 % with one buffer. No faster: streaming the rows through a per-warp cp.async ring
 * (51-53 %); loading the next task's rows into a second register set while coding this one (52 %);
 * plain or non-coherent loads instead of evict-first ones (52-53 %); the L2::256B prefetch hint (47 %).
 */
template <int DT, int EPT, int G, int BITS, bool DB = false>
static __global__ void __launch_bounds__(KV_TS_THREADS, kv_ts_ctas(DT, G, BITS, EPT, DB))
    k_uniform_quantize_token_staged(const void *__restrict__ x, int64_t rows, int64_t cols, int64_t ncolblk,
                                    int64_t ntasks, uint32_t *__restrict__ codes, uint16_t *__restrict__ scale,
                                    uint16_t *__restrict__ zero) {
  constexpr int CPW = 32 / BITS, WPG = G / CPW;
  constexpr int K = kv_ts_k(G, BITS, EPT, DB);
  constexpr int NW = KV_TS_THREADS / 32, GPI = NW * K; /* groups per column per step */
  constexpr int TC = 32 * EPT;                          /* columns per tile */
  constexpr int RW = GPI * WPG;                         /* words per column per step (>= 16) */
  constexpr int RWP = RW + 1;                           /* padded row of s_codes */
  constexpr int ES = kv_dt<DT>::size;
  static_assert(EPT == 1 || (EPT == 2 && ES == 2), "pairs are 16-bit values");
  static_assert(RW % 16 == 0, "a warp's readout covers whole 64-byte runs of a column");
  constexpr int NB = DB ? 2 : 1; /* DB: two staging buffers, one barrier per task */
  __shared__ uint32_t sb_codes[NB][TC * RWP];
  __shared__ uint16_t sb_scale[NB][TC * GPI], sb_zero[NB][TC * GPI];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t gpc = rows / G, wpc = rows / CPW;
  /* a task covers >= 2048 values, so task numbers fit 32 bits: a 32-bit division, not a 64-bit call */
  auto task_cols = [&](int64_t t) { return (int64_t)((uint32_t)t % (uint32_t)ncolblk) * TC; };
  auto task_groups = [&](int64_t t) { return (int64_t)((uint32_t)t / (uint32_t)ncolblk) * GPI; };
  /* the rows of task t into raw (zeros where out of range: past the columns or groups) */
  auto load = [&](int64_t t, uint32_t (&raw)[K][G]) {
    const int64_t c0 = task_cols(t) + lane * EPT;
    const bool col_ok = c0 < cols; /* cols % EPT == 0: the pair is all in or all out */
    const int64_t g0 = task_groups(t) + warp * K;
#pragma unroll
    for (int k = 0; k < K; k++) {
      if (col_ok && g0 + k < gpc) {
        const char *p = (const char *)x + ((g0 + k) * G * cols + c0) * ES;
#pragma unroll
        for (int i = 0; i < G; i++) {
          const char *q = p + (int64_t)i * cols * ES;
          if constexpr (ES == 4 || EPT == 2) raw[k][i] = __ldcs((const unsigned int *)q);
          else raw[k][i] = __ldcs((const unsigned short *)q);
        }
      } else {
#pragma unroll
        for (int i = 0; i < G; i++) raw[k][i] = 0u;
      }
    }
  };
  /* codes and params of task t from raw, staged in buffer `slot` and written out */
  auto work = [&](int64_t t, const uint32_t (&raw)[K][G], int slot) {
    const int64_t cbase = task_cols(t);
    const int64_t gbase = task_groups(t);
    uint32_t *s_codes = sb_codes[DB ? slot : 0];
    uint16_t *s_scale = sb_scale[DB ? slot : 0], *s_zero = sb_zero[DB ? slot : 0];
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int gl = warp * K + k; /* group of the step */
      if constexpr (BITS == 2 && EPT == 2) { /* by thresholds: the pair of columns in one 32-bit lane */
        uint32_t mn2 = raw[k][0], mx2 = mn2;
#pragma unroll
        for (int i = 1; i < G; i++) {
          mn2 = kv_min2<DT>(mn2, raw[k][i]);
          mx2 = kv_max2<DT>(mx2, raw[k][i]);
        }
        const kv_u2 a = kv_u2_group<DT>(kv_word_elem<DT>(mn2, 0), kv_word_elem<DT>(mx2, 0));
        const kv_u2 b = kv_u2_group<DT>(kv_word_elem<DT>(mn2, 1), kv_word_elem<DT>(mx2, 1));
        s_scale[2 * lane * GPI + gl] = a.sh;
        s_zero[2 * lane * GPI + gl] = a.zh;
        s_scale[(2 * lane + 1) * GPI + gl] = b.sh;
        s_zero[(2 * lane + 1) * GPI + gl] = b.zh;
        const uint32_t t1 = a.t1 | b.t1 << 16, t2 = a.t2 | b.t2 << 16, t3 = a.t3 | b.t3 << 16;
#pragma unroll
        for (int w = 0; w < WPG; w++) {
          /* rows 0-7 and 8-15 of the word, each with the left column's bits in the low half */
          uint32_t r0 = 0, r8 = 0;
#pragma unroll
          for (int j = 0; j < 16; j++) {
            const uint32_t bits = kv_u2_pair<DT>(raw[k][w * 16 + j], t1, t2, t3, j & 7);
            if (j < 8) r0 |= bits;
            else r8 |= bits;
          }
          s_codes[2 * lane * RWP + gl * WPG + w] = __byte_perm(r0, r8, 0x5410);
          s_codes[(2 * lane + 1) * RWP + gl * WPG + w] = __byte_perm(r0, r8, 0x7632);
        }
      } else {
        uint32_t mn2 = raw[k][0], mx2 = mn2; /* pairs: both columns' min and max at once */
        if constexpr (EPT == 2) {
#pragma unroll
          for (int i = 1; i < G; i++) {
            mn2 = kv_min2<DT>(mn2, raw[k][i]);
            mx2 = kv_max2<DT>(mx2, raw[k][i]);
          }
        }
#pragma unroll
        for (int e = 0; e < EPT; e++) {
          float mn = kv_word_elem<DT>(mn2, e), mx = kv_word_elem<DT>(mx2, e);
          if constexpr (EPT == 1) kv_group_minmax<DT, G>(raw[k], e, &mn, &mx);
          const kv_up pr = kv_uparams<BITS>(mn, mx);
          const int cl = lane * EPT + e; /* column of the tile */
          s_scale[cl * GPI + gl] = pr.sh;
          s_zero[cl * GPI + gl] = pr.zh;
#pragma unroll
          for (int w = 0; w < WPG; w++) s_codes[cl * RWP + gl * WPG + w] = kv_ucode_word<DT, BITS>(raw[k], w, e, pr);
        }
      }
    }
    __syncthreads();
    /* words: a warp writes 32 consecutive words (one column's 128 bytes, or two columns' 64) per pass */
    const int64_t ncl = cols - cbase < TC ? cols - cbase : TC;
    const int64_t ngl = gpc - gbase < GPI ? gpc - gbase : GPI;
    if (ncl == TC && ngl == GPI) { /* a whole tile: fixed places, one pointer step per pass */
      static_assert((TC * RW) % KV_TS_THREADS == 0 && (TC * GPI) % KV_TS_THREADS == 0, "whole passes");
      constexpr int CW = KV_TS_THREADS / RW, CP = KV_TS_THREADS / GPI; /* columns per pass */
      const int wi = threadIdx.x % RW, gi = threadIdx.x % GPI;
      uint32_t *dst = codes + (cbase + threadIdx.x / RW) * wpc + gbase * WPG + wi;
#pragma unroll
      for (int q = 0; q < TC * RW / KV_TS_THREADS; q++)
        dst[q * CW * wpc] = s_codes[(threadIdx.x / RW + q * CW) * RWP + wi];
      const int64_t po = (cbase + threadIdx.x / GPI) * gpc + gbase + gi;
#pragma unroll
      for (int q = 0; q < TC * GPI / KV_TS_THREADS; q++) {
        scale[po + q * CP * gpc] = s_scale[threadIdx.x + q * KV_TS_THREADS];
        zero[po + q * CP * gpc] = s_zero[threadIdx.x + q * KV_TS_THREADS];
      }
      if constexpr (!DB) __syncthreads(); /* DB: the next task fills the other buffer */
      return;
    }
    for (int idx = threadIdx.x; idx < TC * RW; idx += KV_TS_THREADS) {
      const int cl = idx / RW, wi = idx % RW;
      if (cl < ncl && wi < ngl * WPG) codes[(cbase + cl) * wpc + gbase * WPG + wi] = s_codes[cl * RWP + wi];
    }
    for (int idx = threadIdx.x; idx < TC * GPI; idx += KV_TS_THREADS) {
      const int cl = idx / GPI, gi = idx % GPI;
      if (cl < ncl && gi < ngl) {
        scale[(cbase + cl) * gpc + gbase + gi] = s_scale[idx];
        zero[(cbase + cl) * gpc + gbase + gi] = s_zero[idx];
      }
    }
    if constexpr (!DB) __syncthreads();
  };
  int slot = 0; /* DB: the staging buffer of this task */
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x, slot ^= 1) {
    uint32_t raw[K][G];
    load(t, raw);
    work(t, raw, slot);
  }
}

/* ---------------------------------------------------------------- quantize, channel axis - */

#define KV_U 4 /* chunks per lane per iteration: 4 x 16 bytes in flight */

/* Chunk i = elements [i * V, (i + 1) * V) of the flat matrix; group of chunk i = i / L. */
template <int DT, int G, int BITS>
static __global__ void __launch_bounds__(256)
    k_uniform_quantize_channel(const void *__restrict__ x, int64_t nchunks, bool aligned,
                               uint32_t *__restrict__ codes, uint16_t *__restrict__ scale,
                               uint16_t *__restrict__ zero) {
  constexpr int V = kv_vec<DT>::n, L = G / V, CB = V * BITS, LPW = 32 / CB;
  static_assert(L >= 1 && L <= 32 && (L & (L - 1)) == 0, "lanes per group");
  static_assert(CB <= 32 && 32 % CB == 0 && L % LPW == 0, "lanes per word");
  const int lane = threadIdx.x & 31;
  const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  /* base is warp-uniform and a multiple of 32, so a group (L aligned lanes) is all in or all out */
  for (int64_t base = warp * (32 * KV_U); base < nchunks; base += nwarps * (32 * KV_U)) {
    float v[KV_U][V];
#pragma unroll
    for (int u = 0; u < KV_U; u++) {
      const int64_t i = base + u * 32 + lane;
      if (i < nchunks) {
        kv_ld_chunk<DT>(x, i * V, aligned, v[u]);
      } else {
#pragma unroll
        for (int j = 0; j < V; j++) v[u][j] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < KV_U; u++) {
      const int64_t i = base + u * 32 + lane;
      const bool ok = i < nchunks;
      float mn = v[u][0], mx = v[u][0];
#pragma unroll
      for (int j = 1; j < V; j++) {
        mn = fminf(mn, v[u][j]);
        mx = fmaxf(mx, v[u][j]);
      }
#pragma unroll
      for (int off = L / 2; off >= 1; off >>= 1) {
        mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      }
      const kv_up pr = kv_uparams<BITS>(mn, mx);
      uint32_t piece = 0;
#pragma unroll
      for (int j = 0; j < V; j++) piece |= kv_ucode<BITS>(v[u][j], pr.z, pr.s, pr.rinv) << (BITS * j);
      if constexpr (LPW > 1) {
        piece <<= CB * (lane % LPW);
#pragma unroll
        for (int off = LPW / 2; off >= 1; off >>= 1) piece |= __shfl_xor_sync(0xffffffffu, piece, off);
      }
      if (ok && lane % LPW == 0) codes[i / LPW] = piece;
      if (ok && lane % L == 0) {
        scale[i / L] = pr.sh;
        zero[i / L] = pr.zh;
      }
    }
  }
}

/*
 * Channel axis, 16-bit values (the common case): a lane owns a whole group, so its params (and, at 2
 * bits, thresholds) are worked out once and not by every lane of the group. A warp takes blocks of 32
 * consecutive groups (32 * G * 2 contiguous bytes); the block streams into the warp's own ring of
 * NST shared-memory stages by cp.async (coalesced 16-byte copies, no registers held while in flight),
 * laid out with one pad chunk per group so that each lane then reads its group's chunks without bank
 * conflicts. Pairs of neighbouring values share a 32-bit lane of the compares; kv_shuffle2 puts the
 * even and odd values' codes back in order.
 */
#define KV_CL_WARPS 4

template <int G> struct kv_cl {
  static constexpr int CPG = G / 8;            /* 16-byte chunks per group */
  static constexpr int NST = G >= 128 ? 2 : 3; /* stages per warp */
  static constexpr int SLOT = 32 * (CPG + 1);  /* chunks per stage, pads included */
  static constexpr int SMEM = KV_CL_WARPS * NST * SLOT * 16;
};

template <int DT, int G, int BITS>
static __global__ void __launch_bounds__(KV_CL_WARPS * 32)
    k_uniform_quantize_channel_lane(const void *__restrict__ x, int64_t ngroups, uint32_t *__restrict__ codes,
                                  uint16_t *__restrict__ scale, uint16_t *__restrict__ zero) {
  using C = kv_cl<G>;
  constexpr int CPG = C::CPG, NST = C::NST, SLOT = C::SLOT, WPG = G * BITS / 32;
  extern __shared__ uint4 kv_cl_ring[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint4 *ring = kv_cl_ring + warp * NST * SLOT;
  const uint32_t sring = (uint32_t)__cvta_generic_to_shared(ring);
  const int64_t w0 = (int64_t)blockIdx.x * KV_CL_WARPS + warp, nw = (int64_t)gridDim.x * KV_CL_WARPS;
  const int64_t nblk = (ngroups + 31) / 32;
  /* the warp's blocks are blk = w0, w0 + nw, ...; one cp.async group per block (empty past the
     end) into stage st of the ring */
  auto issue = [&](int64_t blk, int st) {
    if (blk < nblk) {
      const int64_t g0 = blk * 32, n = (ngroups - g0 < 32 ? ngroups - g0 : 32) * CPG;
      const uint4 *src = (const uint4 *)x + g0 * CPG;
      const uint32_t sa = sring + (uint32_t)(st * SLOT * 16);
#pragma unroll
      for (int q = 0; q < CPG; q++) {
        const int ci = q * 32 + lane;
        if (ci < n) kv_cpa<16>(sa + (uint32_t)(ci + ci / CPG) * 16u, src + ci);
      }
    }
    kv_commit();
  };
#pragma unroll
  for (int b = 0; b < NST - 1; b++) issue(w0 + b * nw, b);
  int st = 0; /* stage of blk; the block NST - 1 ahead goes into the stage before it */
  for (int64_t blk = w0; blk < nblk; blk += nw, st = st + 1 == NST ? 0 : st + 1) {
    issue(blk + (NST - 1) * nw, st == 0 ? NST - 1 : st - 1);
    kv_wait(NST - 1);
    __syncwarp();
    uint32_t raw[G / 2];
    const uint4 *mine = ring + st * SLOT + lane * (CPG + 1);
#pragma unroll
    for (int q = 0; q < CPG; q++) {
      const uint4 u = mine[q];
      raw[4 * q] = u.x;
      raw[4 * q + 1] = u.y;
      raw[4 * q + 2] = u.z;
      raw[4 * q + 3] = u.w;
    }
    __syncwarp(); /* every lane has read the stage before the next issue refills it */
    const int64_t g = blk * 32 + lane;
    if (g >= ngroups) continue;
    uint32_t mn2 = raw[0], mx2 = raw[0];
#pragma unroll
    for (int j = 1; j < G / 2; j++) {
      mn2 = kv_min2<DT>(mn2, raw[j]);
      mx2 = kv_max2<DT>(mx2, raw[j]);
    }
    const float mn = fminf(kv_word_elem<DT>(mn2, 0), kv_word_elem<DT>(mn2, 1));
    const float mx = fmaxf(kv_word_elem<DT>(mx2, 0), kv_word_elem<DT>(mx2, 1));
    if constexpr (BITS == 2) {
      const kv_u2 q = kv_u2_group<DT>(mn, mx);
      const uint32_t t1 = q.t1 * 0x10001u, t2 = q.t2 * 0x10001u, t3 = q.t3 * 0x10001u;
#pragma unroll
      for (int w = 0; w < WPG; w++) {
        uint32_t acc = 0; /* even values' codes in the low half, odd values' in the high half */
#pragma unroll
        for (int p = 0; p < 8; p++) acc |= kv_u2_pair<DT>(raw[8 * w + p], t1, t2, t3, p);
        codes[g * WPG + w] = kv_shuffle2(acc);
      }
      scale[g] = q.sh;
      zero[g] = q.zh;
    } else {
      const kv_up q = kv_uparams<BITS>(mn, mx);
#pragma unroll
      for (int w = 0; w < WPG; w++) {
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 8; j++)
          word |= kv_ucode<BITS>(kv_word_elem<DT>(raw[4 * w + j / 2], j & 1), q.z, q.s, q.rinv) << (4 * j);
        codes[g * WPG + w] = word;
      }
      scale[g] = q.sh;
      zero[g] = q.zh;
    }
  }
}

/* ---------------------------------------------------------------- dequantize ------------- */

/* Token axis: task = (column block, strip of groups); a thread reads its column's words of the
   strip (contiguous) and writes one value per row (coalesced across the warp's columns). */
template <int ODT, int G, int BITS>
static __global__ void __launch_bounds__(128)
    k_uniform_dequantize_token(const uint32_t *__restrict__ codes, const uint16_t *__restrict__ scale,
                               const uint16_t *__restrict__ zero, int64_t rows, int64_t cols, int64_t ncolblk,
                               int64_t ntasks, void *__restrict__ out) {
  constexpr int CPW = 32 / BITS, WPG = G / CPW, GPS = G >= 128 ? 1 : 128 / G;
  const int64_t gpc = rows / G, wpc = rows / CPW;
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x) {
    const int64_t c = (t % ncolblk) * blockDim.x + threadIdx.x;
    const int64_t strip = t / ncolblk;
    if (c >= cols) continue;
    const int64_t g_begin = strip * GPS;
    const int64_t g_end = g_begin + GPS < gpc ? g_begin + GPS : gpc;
    for (int64_t gr = g_begin; gr < g_end; gr++) {
      const float s = kivi_f16_to_f32(scale[c * gpc + gr]), z = kivi_f16_to_f32(zero[c * gpc + gr]);
      const uint32_t *wp = codes + c * wpc + gr * WPG;
#pragma unroll
      for (int w = 0; w < WPG; w++) {
        const uint32_t word = wp[w];
#pragma unroll
        for (int j = 0; j < CPW; j++) {
          const int64_t r = gr * G + w * CPW + j;
          kv_st<ODT>(out, r * cols + c, kivi_uniform_value(kivi_word_get(word, j, BITS), z, s));
        }
      }
    }
  }
}

/** Stores n (a multiple of 16 bytes' worth) values at element e of out: 16-byte stores when aligned. */
template <int ODT, int N>
__device__ __forceinline__ void kv_st_run(void *__restrict__ out, int64_t e, bool aligned, const float (&o)[N]) {
  constexpr int ES = kv_dt<ODT>::size;
  static_assert((N * ES) % 16 == 0, "whole 16-byte vectors");
  if (aligned) {
    uint4 *dst = (uint4 *)((char *)out + e * ES);
#pragma unroll
    for (int q = 0; q < N * ES / 16; q++) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; k++) {
        if constexpr (ES == 4) w[k] = __float_as_uint(o[q * 4 + k]);
        else w[k] = (uint32_t)kv_f2h<ODT>(o[q * 8 + 2 * k]) | ((uint32_t)kv_f2h<ODT>(o[q * 8 + 2 * k + 1]) << 16);
      }
      dst[q] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; j++) kv_st<ODT>(out, e + j, o[j]);
  }
}

/* Channel axis: flat; thread per word (a word never straddles a group). */
template <int ODT, int G, int BITS>
static __global__ void __launch_bounds__(256)
    k_uniform_dequantize_channel(const uint32_t *__restrict__ codes, const uint16_t *__restrict__ scale,
                                 const uint16_t *__restrict__ zero, int64_t nwords, bool aligned,
                                 void *__restrict__ out) {
  constexpr int CPW = 32 / BITS;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t w = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; w < nwords; w += stride) {
    const uint32_t word = codes[w];
    const int64_t e0 = w * CPW, g = e0 / G;
    const float s = kivi_f16_to_f32(scale[g]), z = kivi_f16_to_f32(zero[g]);
    float o[CPW];
#pragma unroll
    for (int j = 0; j < CPW; j++) o[j] = kivi_uniform_value(kivi_word_get(word, j, BITS), z, s);
    kv_st_run<ODT, CPW>(out, e0, aligned, o);
  }
}

/* ---------------------------------------------------------------- launch ----------------- */


template <int DT>
static void launch_quantize(kivi_ctx_t ctx, const void *x, const kv_shape &sh, uint32_t *codes, uint16_t *scale,
                            uint16_t *zero) {
  if (sh.axis == KIVI_AXIS_TOKEN) {
    const bool pairs = DT != KIVI_F32 && sh.cols % 2 == 0 && ((uintptr_t)x & 3u) == 0;
    if (KV_TOKEN_STAGED && sh.group <= 64) { /* G 128 holds 128 raw words per thread: the loop below */
      const int ept = pairs ? 2 : 1;
      const bool db = pairs && sh.group == 32; /* two staging buffers (kv_ts_k: groups a warp) */
      const int64_t ncolblk = (sh.cols + 32 * ept - 1) / (32 * ept);
      const int64_t gpi = (KV_TS_THREADS / 32) * kv_ts_k(sh.group, sh.bits, ept, db);
      const int64_t ntasks = ncolblk * ((sh.row_groups + gpi - 1) / gpi);
      const unsigned grid = kv_grid(ctx, ntasks, kv_ts_ctas(DT, sh.group, sh.bits, ept, db));
      if (db) {
        if (sh.bits == 2)
          k_uniform_quantize_token_staged<(DT == KIVI_F32 ? KIVI_F16 : DT), 2, 32, 2, true>
              <<<grid, KV_TS_THREADS, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, codes, scale, zero);
        else
          k_uniform_quantize_token_staged<(DT == KIVI_F32 ? KIVI_F16 : DT), 2, 32, 4, true>
              <<<grid, KV_TS_THREADS, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, codes, scale, zero);
        return;
      }
#define KV_Q_TOKEN_S(G, B)                                                                                     \
  if (pairs)                                                                                                   \
    k_uniform_quantize_token_staged<(DT == KIVI_F32 ? KIVI_F16 : DT), 2, G, B>                                \
        <<<grid, KV_TS_THREADS, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, codes, scale, zero);  \
  else                                                                                                         \
    k_uniform_quantize_token_staged<DT, 1, G, B>                                                               \
        <<<grid, KV_TS_THREADS, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, codes, scale, zero);
      switch (sh.group * 8 + sh.bits) {
        case 32 * 8 + 2: KV_Q_TOKEN_S(32, 2); break;
        case 32 * 8 + 4: KV_Q_TOKEN_S(32, 4); break;
        case 64 * 8 + 2: KV_Q_TOKEN_S(64, 2); break;
        default: KV_Q_TOKEN_S(64, 4); break;
      }
#undef KV_Q_TOKEN_S
      return;
    }
    const int64_t ncolthreads = pairs ? sh.cols / 2 : sh.cols;
    const int64_t ncolblk = (ncolthreads + 127) / 128;
    const int64_t nstrip = (sh.row_groups * sh.group + KV_STRIP_ROWS - 1) / KV_STRIP_ROWS;
    const int64_t ntasks = ncolblk * nstrip;
    const unsigned grid = kv_grid(ctx, ntasks, 16);
#define KV_Q_TOKEN(G, B)                                                                                       \
  if (pairs)                                                                                                   \
    k_uniform_quantize_token<(DT == KIVI_F32 ? KIVI_F16 : DT), 2, G, B>                                       \
        <<<grid, 128, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, codes, scale, zero);            \
  else                                                                                                         \
    k_uniform_quantize_token<DT, 1, G, B><<<grid, 128, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, \
                                                                         codes, scale, zero);
    KV_DISPATCH_GB(sh.group, sh.bits, KV_Q_TOKEN)
#undef KV_Q_TOKEN
  } else {
    const int64_t nchunks = sh.rows * sh.cols / kv_vec<DT>::n;
    const bool aligned = ((uintptr_t)x & 15u) == 0;
    if constexpr (DT != KIVI_F32) {
      if (aligned) {
        const int64_t nblk = (sh.groups + 31) / 32;
#define KV_Q_CHANNEL_LANE(G, B)                                                                                 \
  {                                                                                                             \
    static bool big_smem = false; /* kv_cl<G>::SMEM may pass the 48 KiB default: allow it once */             \
    if (!big_smem)                                                                                              \
      big_smem = cudaFuncSetAttribute((const void *)k_uniform_quantize_channel_lane<DT, G, B>,                      \
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, kv_cl<G>::SMEM) == cudaSuccess; \
    const unsigned grid = kv_grid(ctx, (nblk + KV_CL_WARPS - 1) / KV_CL_WARPS, 228 * 1024 / (kv_cl<G>::SMEM + 1024)); \
    k_uniform_quantize_channel_lane<DT, G, B>                                                                     \
        <<<grid, KV_CL_WARPS * 32, kv_cl<G>::SMEM, ctx->stream>>>(x, sh.groups, codes, scale, zero);           \
  }
        KV_DISPATCH_GB(sh.group, sh.bits, KV_Q_CHANNEL_LANE)
#undef KV_Q_CHANNEL_LANE
        return;
      }
    }
    const unsigned grid = kv_grid(ctx, (nchunks + 256 * KV_U - 1) / (256 * KV_U), 8);
#define KV_Q_CHANNEL(G, B) \
  k_uniform_quantize_channel<DT, G, B><<<grid, 256, 0, ctx->stream>>>(x, nchunks, aligned, codes, scale, zero);
    KV_DISPATCH_GB(sh.group, sh.bits, KV_Q_CHANNEL)
#undef KV_Q_CHANNEL
  }
}

template <int ODT>
static void launch_dequantize(kivi_ctx_t ctx, const uint32_t *codes, const uint16_t *scale, const uint16_t *zero,
                              const kv_shape &sh, void *out) {
  if (sh.axis == KIVI_AXIS_TOKEN) {
    const int64_t ncolblk = (sh.cols + 127) / 128;
    const int64_t gps = sh.group >= 128 ? 1 : 128 / sh.group;
    const int64_t ntasks = ncolblk * ((sh.row_groups + gps - 1) / gps);
    const unsigned grid = kv_grid(ctx, ntasks, 16);
#define KV_D_TOKEN(G, B)                                                                                      \
  k_uniform_dequantize_token<ODT, G, B><<<grid, 128, 0, ctx->stream>>>(codes, scale, zero, sh.rows, sh.cols, \
                                                                      ncolblk, ntasks, out);
    KV_DISPATCH_GB(sh.group, sh.bits, KV_D_TOKEN)
#undef KV_D_TOKEN
  } else {
    const int64_t nwords = sh.rows * sh.cols / sh.cpw;
    const bool aligned = ((uintptr_t)out & 15u) == 0;
    const unsigned grid = kv_grid(ctx, (nwords + 255) / 256, 8);
#define KV_D_CHANNEL(G, B) \
  k_uniform_dequantize_channel<ODT, G, B><<<grid, 256, 0, ctx->stream>>>(codes, scale, zero, nwords, aligned, out);
    KV_DISPATCH_GB(sh.group, sh.bits, KV_D_CHANNEL)
#undef KV_D_CHANNEL
  }
}

extern "C" {

KIVI_API kivi_status kivi_uniform_quantize(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows,
                                           int64_t cols, kivi_axis axis, int32_t group, int32_t bits, int32_t flags,
                                           uint32_t *codes, uint16_t *scale, uint16_t *zero) {
  kv_spec spec = kv_spec_init("kivi_uniform_quantize", KV_NEED_MATRIX | KV_NEED_BITS | KV_NEED_FLAGS);
  spec.ptrs[0] = {"x", x};
  spec.ptrs[1] = {"codes", codes};
  spec.ptrs[2] = {"scale", scale};
  spec.ptrs[3] = {"zero", zero};
  spec.rows = rows;
  spec.cols = cols;
  spec.axis = axis;
  spec.group = group;
  spec.bits = bits;
  spec.dtype_name = "dtype";
  spec.dtype = dtype;
  spec.flags = flags;
  kv_shape sh;
  kivi_status st = kv_validate(ctx, &spec, &sh);
  if (st) return st;
  if (!(flags & KIVI_FLAG_TRUSTED) && (st = kv_check_finite(ctx, spec.op, x, dtype, &sh))) return st;
#define KV_Q(DT) launch_quantize<DT>(ctx, x, sh, codes, scale, zero)
  KV_DISPATCH_DT(dtype, KV_Q)
#undef KV_Q
  return kv_launched(ctx, spec.op, "k_uniform_quantize");
}

KIVI_API kivi_status kivi_uniform_dequantize(kivi_ctx_t ctx, const uint32_t *codes, const uint16_t *scale,
                                             const uint16_t *zero, int64_t rows, int64_t cols, kivi_axis axis,
                                             int32_t group, int32_t bits, void *out, kivi_dtype out_dtype) {
  kv_spec spec = kv_spec_init("kivi_uniform_dequantize", KV_NEED_MATRIX | KV_NEED_BITS);
  spec.ptrs[0] = {"codes", codes};
  spec.ptrs[1] = {"scale", scale};
  spec.ptrs[2] = {"zero", zero};
  spec.ptrs[3] = {"out", out};
  spec.rows = rows;
  spec.cols = cols;
  spec.axis = axis;
  spec.group = group;
  spec.bits = bits;
  spec.dtype_name = "out_dtype";
  spec.dtype = out_dtype;
  kv_shape sh;
  kivi_status st = kv_validate(ctx, &spec, &sh);
  if (st) return st;
#define KV_D(DT) launch_dequantize<DT>(ctx, codes, scale, zero, sh, out)
  KV_DISPATCH_DT(out_dtype, KV_D)
#undef KV_D
  return kv_launched(ctx, spec.op, "k_uniform_dequantize");
}

} /* extern "C" */
