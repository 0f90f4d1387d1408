/*
 * uniform_token.cu — kivi_uniform_quantize along the token axis (keys, a group = G rows of one
 * column, words run along rows): a lane owns a pair of columns (one 32-bit load of two f16/bf16
 * values; one column for f32 or odd widths), so a warp reads 128 contiguous bytes per row. A CTA of 8
 * warps takes a tile of columns x 8 (or 16) groups of rows, stages codes and params in shared memory
 * and writes each column's run contiguously (k_uniform_quantize_token_staged; with 2 bits, G 32 and
 * pairs, in two alternating buffers). G 128 uses the simpler per-thread strip kernel.
 */
#include "uniform.cuh"

/* ---------------------------------------------------------------- quantize, token axis --- */

/* Task t = (column block, strip of KV_STRIP_ROWS rows). raw words hold EPT values of one row. */
template <int DT, int EPT, int G, int BITS>
static __global__ void __launch_bounds__(128)
    k_uniform_quantize_token(const void *__restrict__ x, int64_t rows, int64_t cols, int64_t ncolblk, int64_t ntasks,
                             uint32_t *__restrict__ codes, uint16_t *__restrict__ scale, uint16_t *__restrict__ zero) {
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
            if constexpr (ES == 4 || EPT == 2)
              raw[k][i] = *(const uint32_t *)q;
            else
              raw[k][i] = *(const uint16_t *)q;
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
  constexpr int TC = 32 * EPT;                         /* columns per tile */
  constexpr int RW = GPI * WPG;                        /* words per column per step (>= 16) */
  constexpr int RWP = RW + 1;                          /* padded row of s_codes */
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
  auto load = [&](int64_t t, uint32_t(&raw)[K][G]) {
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
          if constexpr (ES == 4 || EPT == 2)
            raw[k][i] = __ldcs((const unsigned int *)q);
          else
            raw[k][i] = __ldcs((const unsigned short *)q);
        }
      } else {
#pragma unroll
        for (int i = 0; i < G; i++) raw[k][i] = 0u;
      }
    }
  };
  /* codes and params of task t from raw, staged in buffer `slot` and written out */
  auto work = [&](int64_t t, const uint32_t(&raw)[K][G], int slot) {
    const int64_t cbase = task_cols(t);
    const int64_t gbase = task_groups(t);
    uint32_t *s_codes = sb_codes[DB ? slot : 0];
    uint16_t *s_scale = sb_scale[DB ? slot : 0], *s_zero = sb_zero[DB ? slot : 0];
#pragma unroll
    for (int k = 0; k < K; k++) {
      const int gl = warp * K + k;           /* group of the step */
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
            if (j < 8)
              r0 |= bits;
            else
              r8 |= bits;
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

/* ---------------------------------------------------------------- launch ----------------- */

template <int DT>
static void launch_token(kivi_ctx_t ctx, const void *x, const kv_shape &sh, uint32_t *codes, uint16_t *scale,
                         uint16_t *zero) {
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
#define KV_Q_TOKEN_S(G, B)                                                                                   \
  if (pairs)                                                                                                 \
    k_uniform_quantize_token_staged<(DT == KIVI_F32 ? KIVI_F16 : DT), 2, G, B>                               \
        <<<grid, KV_TS_THREADS, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, codes, scale, zero); \
  else                                                                                                       \
    k_uniform_quantize_token_staged<DT, 1, G, B>                                                             \
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
#define KV_Q_TOKEN(G, B)                                                                           \
  if (pairs)                                                                                       \
    k_uniform_quantize_token<(DT == KIVI_F32 ? KIVI_F16 : DT), 2, G, B>                            \
        <<<grid, 128, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, codes, scale, zero); \
  else                                                                                             \
    k_uniform_quantize_token<DT, 1, G, B>                                                          \
        <<<grid, 128, 0, ctx->stream>>>(x, sh.rows, sh.cols, ncolblk, ntasks, codes, scale, zero);
  KV_DISPATCH_GB(sh.group, sh.bits, KV_Q_TOKEN)
#undef KV_Q_TOKEN
}

void kv_uniform_quantize_token(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, const kv_shape &sh, uint32_t *codes,
                               uint16_t *scale, uint16_t *zero) {
#define KV_Q(DT) launch_token<DT>(ctx, x, sh, codes, scale, zero)
  KV_DISPATCH_DT(dtype, KV_Q)
#undef KV_Q
}
