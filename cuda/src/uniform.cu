/*
 * uniform.cu — KIVI's asymmetric min/max format on the device: kivi_uniform_quantize (one fused
 * pass: read x once, min/max in registers, fp16 params, codes packed, no intermediate buffer) and
 * kivi_uniform_dequantize.
 *
 * Token axis (keys, a group = G rows of one column, words run along rows): a thread owns one
 * column (f32, or odd cols) or a pair of columns (one 32-bit load of two f16/bf16 values), so a
 * warp reads 128 contiguous bytes per row; it loops over the G rows of a group with every load in
 * flight, needs no shuffles for min/max, and walks a strip of consecutive groups so that its
 * packed words and params are contiguous runs.
 * Channel axis (values, a group = G consecutive columns): the matrix is a flat array of groups;
 * each lane loads one 16-byte chunk (8 halves or 4 floats), G / chunk lanes share a group and reduce
 * min/max with __shfl_xor_sync, and the lanes of one word OR their code bits together by shuffle.
 */
#include "common.cuh"

#define KV_STRIP_ROWS 512 /* rows of a token-axis strip: whole groups for every G */

/* The exact formula, out of line: taken only near a rounding tie, so it stays out of the hot loop. */
static __device__ __noinline__ uint32_t kv_ucode_exact(float x, float z, float s, int32_t bits) {
  return kivi_uniform_code(x, z, s, bits);
}

/*
 * kivi_uniform_code(x, z, s) without a division per value: t = (x - z) * rinv (rinv = 1 / s, both
 * correctly rounded) is within |Q| * 2^-23 of Q = (x - z) / s, and RN(Q) within |Q| * 2^-24. Where
 * it matters (t in [-1, top + 1], |Q| < 17) that puts t and RN(Q) less than 4e-6 apart.
 * t is clamped to [0, top] first (fmaxf turns a NaN t into 0, which is the reference's code for a
 * NaN quotient; t < 0 or t > top means Q rounds to <= 0 or >= top, both clamped the same), then
 * rounded to nearest-even by the 1.5 * 2^23 trick (exact for 0 <= tc <= 15: m's low bits are the
 * integer), without the slower F2I / FRND instructions. When tc is at least 1e-4 from a
 * half-integer, t and RN(Q) round to the same integer; near a half-integer the exact formula
 * decides. __fadd_rn / __fmul_rn keep nvcc from contracting into FMAs.
 */
#define KV_MAGIC 12582912.0f /* 1.5 * 2^23 */
#define KV_MAGIC_BITS 0x4B400000u
template <int BITS>
__device__ __forceinline__ uint32_t kv_ucode(float x, float z, float s, float rinv) {
  if (!(s > 0.0f)) return 0u;
  constexpr float top = (float)((1 << BITS) - 1);
  const float t = __fmul_rn(__fsub_rn(x, z), rinv);
  const float tc = fminf(fmaxf(t, 0.0f), top);
  const float m = __fadd_rn(tc, KV_MAGIC);
  const float d = __fsub_rn(tc, __fsub_rn(m, KV_MAGIC));
  if (!(fabsf(d) < 0.4999f)) return kv_ucode_exact(x, z, s, BITS) & ((1u << BITS) - 1u);
  return __float_as_uint(m) - KV_MAGIC_BITS;
}

/** 1 / s for kv_ucode (unused when s is not > 0). */
__device__ __forceinline__ float kv_rinv(float s) { return s > 0.0f ? 1.0f / s : 0.0f; }

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
          float mn = kv_word_elem<DT>(raw[k][0], e), mx = mn;
#pragma unroll
          for (int i = 1; i < G; i++) {
            const float v = kv_word_elem<DT>(raw[k][i], e);
            mn = fminf(mn, v);
            mx = fmaxf(mx, v);
          }
          uint16_t sh, zh;
          kivi_uniform_params(mn, mx, BITS, &sh, &zh);
          const float s = kivi_f16_to_f32(sh), z = kivi_f16_to_f32(zh), rinv = kv_rinv(s);
          const int64_t c = c0 + e;
          scale[c * gpc + gr + k] = sh;
          zero[c * gpc + gr + k] = zh;
          uint32_t *wout = codes + c * wpc + (gr + k) * WPG;
#pragma unroll
          for (int w = 0; w < WPG; w++) {
            uint32_t word = 0;
#pragma unroll
            for (int j = 0; j < CPW; j++)
              word |= kv_ucode<BITS>(kv_word_elem<DT>(raw[k][w * CPW + j], e), z, s, rinv) << (BITS * j);
            wout[w] = word;
          }
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

template <int DT, int EPT, int G, int BITS>
static __global__ void __launch_bounds__(KV_TS_THREADS, (DT == KIVI_BF16 && G >= 64) ? 1 : 2) /* bf16 G 64 spills at 128 regs */
    k_uniform_quantize_token_staged(const void *__restrict__ x, int64_t rows, int64_t cols, int64_t ncolblk,
                                    int64_t ntasks, uint32_t *__restrict__ codes, uint16_t *__restrict__ scale,
                                    uint16_t *__restrict__ zero) {
  constexpr int CPW = 32 / BITS, WPG = G / CPW;
  constexpr int K = G >= 64 ? 1 : 2;
  constexpr int NW = KV_TS_THREADS / 32, GPI = NW * K; /* groups per column per step */
  constexpr int TC = 32 * EPT;                          /* columns per tile */
  constexpr int RW = GPI * WPG;                         /* words per column per step (>= 32) */
  constexpr int RWP = RW + 1;                           /* padded row of s_codes */
  constexpr int ES = kv_dt<DT>::size;
  static_assert(EPT == 1 || (EPT == 2 && ES == 2), "pairs are 16-bit values");
  static_assert(RW % 32 == 0, "a warp's readout stays in one column");
  __shared__ uint32_t s_codes[TC * RWP];
  __shared__ uint16_t s_scale[TC * GPI], s_zero[TC * GPI];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t gpc = rows / G, wpc = rows / CPW;
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x) {
    const int64_t cbase = (t % ncolblk) * TC;
    const int64_t gbase = (t / ncolblk) * GPI;
    const int64_t c0 = cbase + lane * EPT;
    const bool col_ok = c0 < cols; /* cols % EPT == 0: the pair is all in or all out */
    const int64_t g0 = gbase + warp * K;
    uint32_t raw[K][G];
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
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int gl = warp * K + k; /* group of the step */
#pragma unroll
      for (int e = 0; e < EPT; e++) {
        float mn = kv_word_elem<DT>(raw[k][0], e), mx = mn;
#pragma unroll
        for (int i = 1; i < G; i++) {
          const float v = kv_word_elem<DT>(raw[k][i], e);
          mn = fminf(mn, v);
          mx = fmaxf(mx, v);
        }
        uint16_t sh, zh;
        kivi_uniform_params(mn, mx, BITS, &sh, &zh);
        const float s = kivi_f16_to_f32(sh), z = kivi_f16_to_f32(zh), rinv = kv_rinv(s);
        const int cl = lane * EPT + e; /* column of the tile */
        s_scale[cl * GPI + gl] = sh;
        s_zero[cl * GPI + gl] = zh;
#pragma unroll
        for (int w = 0; w < WPG; w++) {
          uint32_t word = 0;
#pragma unroll
          for (int j = 0; j < CPW; j++)
            word |= kv_ucode<BITS>(kv_word_elem<DT>(raw[k][w * CPW + j], e), z, s, rinv) << (BITS * j);
          s_codes[cl * RWP + gl * WPG + w] = word;
        }
      }
    }
    __syncthreads();
    /* words: a warp writes 32 consecutive words of one column (128 bytes) per pass */
    const int64_t ncl = cols - cbase < TC ? cols - cbase : TC;
    const int64_t ngl = gpc - gbase < GPI ? gpc - gbase : GPI;
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
    __syncthreads();
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
      uint16_t sh, zh;
      kivi_uniform_params(mn, mx, BITS, &sh, &zh);
      const float s = kivi_f16_to_f32(sh), z = kivi_f16_to_f32(zh), rinv = kv_rinv(s);
      uint32_t piece = 0;
#pragma unroll
      for (int j = 0; j < V; j++) piece |= kv_ucode<BITS>(v[u][j], z, s, rinv) << (BITS * j);
      if constexpr (LPW > 1) {
        piece <<= CB * (lane % LPW);
#pragma unroll
        for (int off = LPW / 2; off >= 1; off >>= 1) piece |= __shfl_xor_sync(0xffffffffu, piece, off);
      }
      if (ok && lane % LPW == 0) codes[i / LPW] = piece;
      if (ok && lane % L == 0) {
        scale[i / L] = sh;
        zero[i / L] = zh;
      }
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
      const int64_t ncolblk = (sh.cols + 32 * ept - 1) / (32 * ept);
      const int64_t gpi = (KV_TS_THREADS / 32) * (sh.group >= 64 ? 1 : 2);
      const int64_t ntasks = ncolblk * ((sh.row_groups + gpi - 1) / gpi);
      const unsigned grid = kv_grid(ctx, ntasks, 2); /* 2 CTAs resident per SM */
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
