/*
 * attention.cu — fused decode attention over the paged cache (kivi_cache_attend) and the small
 * flash-decoding split. Caches in the tensor-core page layout (kivi_cache_mma_layout: uniform
 * 2-bit K, uniform or codebook 2-bit V, head_dim 64 or 128) run k_attend_mma (attention_mma.cuh,
 * instantiated in attention_mma_{uniform,codebook}.cu); every other format runs k_cache_attend below,
 * on CUDA cores. Both share the grid, the splits and the merges (attention.cuh).
 *
 * Grid: one CTA of 4 warps per (batch entry, kv head, split of the sequence, chunk of HC query
 * heads); HC = 4, 2 or 1 query heads of one GQA group share every K/V byte the CTA reads here, 8 in
 * the tensor-core kernel (larger ratios take several chunks, the last one partly empty where HC does
 * not divide the ratio; the chunks read the same pages at about the same time, mostly from L2).
 * Splits cut the sequence into chunks of whole tiles so that the grid fills the GPU; when there is
 * more than one, the CTA writes (max, sum, unnormalised output) per head to the workspace and
 * k_attend_combine merges them (2 launches); with one split the CTA writes the output itself (1).
 *
 * Inside a CTA the 4 warps are independent: warp w takes tiles w, w + 4, ... of the CTA's range
 * (page tiles of TT tokens, then fp16 window tiles of TTW tokens), each warp streams its tiles
 * through its own ring of cp.async stages (16-byte copies where the layout allows, NST deep), keeps
 * its own online softmax, and the 4 states are merged once at the end. No block barrier in the loop.
 *
 * Lane roles (both phases): lane = hsub * LPS + lp, LPS = D / 8 lanes cover one row of D channels,
 * lane lp owns channels 8 lp .. 8 lp + 7; SPW = 32 / LPS rows (or octets) are worked at once.
 *  - scores: lanes walk octets of 8 tokens; each lane sums its 8 channels for the 8 tokens, then a
 *    butterfly reduce-scatter over the LPS lanes leaves every lane one token's score.
 *  - values: lane (lp, hsub) accumulates its 8 channels over tokens hsub, hsub + SPW, ...
 * Key codes are staged transposed (row d at slot (d % 8) * LPS + d / 8) so that the 8 rows of lane
 * lp are read without bank conflicts.
 *
 * Dequantization without I2F: a 2-bit code c moved to mantissa bits 19..20 (or 21..22) of 1.0f
 * gives f = 1 + c / 16 (or 1 + c / 4) with one shift (shared by two codes) and one LOP3.
 *  keys (per-channel groups):   sum_d q_d (s_d c + z_d) over a lane's channels is
 *                                2^(23-b) * (sum_d (q_d s_d) f_d - sum_d q_d s_d + 2^(b-23) sum_d q_d z_d):
 *                                one FFMA per code and head, the constants folded once per group.
 *  values (per-token groups):   out_d = sum_t p_t (s_t c_td + z_t) = 2^(23-b_d) (A_d - S) + Z with
 *                                A_d = sum_t (p_t s_t) f_td, S = sum_t p_t s_t, Z = sum_t p_t z_t.
 * All scores and sums are fp32; scores are in log2 units (q pre-scaled by scale * log2(e), exp2).
 */
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include <mutex>

#include "attention.cuh"

/* ---------------------------------------------------------------- small helpers ---------- */

/* rows x rb bytes, global row r at g + r * gs, smem row at s + place(r) * rb; chunk CH bytes. */
template <int CH>
__device__ __forceinline__ void kv_copy_rows(uint32_t s, const uint8_t *g, int64_t gs, int rows, int rb, bool transpose,
                                             int lps, int lane) {
  const int per_row = rb / CH, total = rows * per_row;
  for (int i = lane; i < total; i += 32) {
    const int r = i / per_row, k = i - r * per_row;
    const int sr = transpose ? (r & 7) * lps + (r >> 3) : r;
    kv_cpa<CH>(s + (uint32_t)(sr * rb + k * CH), g + r * gs + k * CH);
  }
}
__device__ __forceinline__ void kv_copy_rows_any(uint32_t s, const uint8_t *g, int64_t gs, int rows, int rb,
                                                 bool transpose, int lps, int lane) {
  if (rb % 16 == 0)
    kv_copy_rows<16>(s, g, gs, rows, rb, transpose, lps, lane);
  else if (rb % 8 == 0)
    kv_copy_rows<8>(s, g, gs, rows, rb, transpose, lps, lane);
  else
    kv_copy_rows<4>(s, g, gs, rows, rb, transpose, lps, lane);
}
/* contiguous bytes (a multiple of 16, 16-byte aligned both sides) */
__device__ __forceinline__ void kv_copy_flat(uint32_t s, const uint8_t *g, int bytes, int lane) {
  for (int i = lane * 16; i < bytes; i += 32 * 16) kv_cpa<16>(s + (uint32_t)i, g + i);
}

template <int K>
__device__ __forceinline__ uint32_t kv_sh(uint32_t w) {
  if constexpr (K >= 0)
    return w << K;
  else
    return w >> (-K);
}
/* 1 + (bits b.. of x) / 2^(23-b): x already shifted, mask selects the code; one LOP3 (0xEA: (a & b) | c) */
__device__ __forceinline__ float kv_mf(uint32_t x, uint32_t mask, uint32_t one) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(mask), "r"(one));
  return __uint_as_float(r);
}

/* 8 halves of a uint4 to floats */
__device__ __forceinline__ void kv_u4_to_f8(const uint4 u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const float2 t = __half22float2(*reinterpret_cast<const __half2 *>(&w[i]));
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

/*
 * v[8][HC] per lane, summed over groups of LANES consecutive lanes (aligned): afterwards the lane
 * holds in r[HC] the sum of value idx = (lane % LANES) / (LANES / 8).
 */
template <int HC, int LANES>
__device__ __forceinline__ void kv_reduce8(float (&v)[8][HC], float (&r)[HC], int lane) {
  static_assert(LANES >= 8 && LANES <= 32, "lanes");
  const bool u4 = (lane & (LANES / 2)) != 0, u2 = (lane & (LANES / 4)) != 0, u1 = (lane & (LANES / 8)) != 0;
  float a[4][HC];
#pragma unroll
  for (int k = 0; k < 4; k++)
#pragma unroll
    for (int h = 0; h < HC; h++) {
      const float send = u4 ? v[k][h] : v[k + 4][h], keep = u4 ? v[k + 4][h] : v[k][h];
      a[k][h] = keep + __shfl_xor_sync(KV_FULL, send, LANES / 2);
    }
  float b[2][HC];
#pragma unroll
  for (int k = 0; k < 2; k++)
#pragma unroll
    for (int h = 0; h < HC; h++) {
      const float send = u2 ? a[k][h] : a[k + 2][h], keep = u2 ? a[k + 2][h] : a[k][h];
      b[k][h] = keep + __shfl_xor_sync(KV_FULL, send, LANES / 4);
    }
#pragma unroll
  for (int h = 0; h < HC; h++) {
    const float send = u1 ? b[0][h] : b[1][h], keep = u1 ? b[1][h] : b[0][h];
    r[h] = keep + __shfl_xor_sync(KV_FULL, send, LANES / 8);
  }
#pragma unroll
  for (int off = LANES / 16; off >= 1; off >>= 1)
#pragma unroll
    for (int h = 0; h < HC; h++) r[h] += __shfl_xor_sync(KV_FULL, r[h], off);
}

/* ---------------------------------------------------------------- main kernel ------------ */

template <int D, int HC>
static __global__ void __launch_bounds__(KV_THREADS, HC == 4 ? 2 : 4)
    k_cache_attend(const __grid_constant__ kv_attn_params p) {
  constexpr int LPS = D / 8, SPW = 32 / LPS;
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int lp = lane % LPS, hsub = lane / LPS;

  const kv_cta cta = kv_cta_of(p);
  const int hc = cta.hc, hkv = cta.hkv, b = cta.b;
  const kv_seq_info si = cta.si;
  const int a0 = cta.a0, e0 = cta.e0, pend = cta.pend, ws0 = cta.ws0;
  if (a0 >= si.len) {
    kv_attn_finish<D>(p, p.nsplit == 1);
    return;
  }
  const int TT = p.TT, TTW = p.TTW;
  const int npt = a0 < pend ? (pend - a0 + TT - 1) / TT : 0;
  const int nwt = e0 > ws0 ? (e0 - ws0 + TTW - 1) / TTW : 0;
  const int ntiles = npt + nwt;
  const int my_tiles = ntiles > warp ? (ntiles - warp + KV_WARPS - 1) / KV_WARPS : 0;
  const int qh0 = hkv * p.ratio + hc * HC;
  const int nq = min(HC, p.ratio - hc * HC); /* heads of this chunk: the last one of a ratio HC does not divide
                                                is partly empty (its rows compute on q = 0 and are not written) */
  const uint32_t ONE = p.one, M19 = p.m19, M21 = p.m21, M4 = p.m4;

  /* formats */
  const int kbits = p.kbits, vbits = p.vbits;
  const bool kq = kbits != 16, vq = vbits != 16;
  const bool kcb = kq && p.kkind == KIVI_KIND_CODEBOOK, vcb = vq && p.vkind == KIVI_KIND_CODEBOOK;
  const int keb = kcb ? 2 << kbits : 4, veb = vcb ? 2 << vbits : 4;
  const int KWB = kq ? TT * kbits / 8 : 0;              /* key code bytes per channel row */
  const int NGK = kq ? (TT > p.kg ? TT / p.kg : 1) : 0; /* key groups per tile */
  const int KPB = NGK * keb;                            /* key param bytes per channel row */
  const int kbytes = kq ? D * (KWB + KPB) : TT * D * 2;
  const int vcbytes = vq ? TT * D * vbits / 8 : TT * D * 2;
  const int vgpr = D / p.vg;
  /* value accumulation domain: 0 = 2-bit uniform (b 19 / 21), 1 = 4-bit uniform (b 19), 2 = direct */
  const int vmode = (vq && !vcb) ? (vbits == 2 ? 0 : 1) : 2;

  /* query rows (scaled to log2 units); a checked batch's first split checks them, warp 0 alone */
  float qf[HC][8];
#pragma unroll
  for (int h = 0; h < HC; h++)
#pragma unroll
    for (int c = 0; c < 8; c++)
      qf[h][c] = h < nq ? kv_q_at(p, b, 0, ((int64_t)b * p.qh + qh0 + h) * D + 8 * lp + c, false) : 0.0f;
  if (p.cdev && cta.split == 0 && warp == 0)
    for (int i = lane; i < nq * D; i += 32)
      (void)kv_q_at(p, b, (int64_t)qh0 * D + i, ((int64_t)b * p.qh + qh0) * D + i, true);

  uint8_t *ring = smem + (size_t)warp * p.nst * p.stage_bytes;
  float *pbuf = (float *)(smem + (size_t)KV_WARPS * p.nst * p.stage_bytes) + warp * KV_TT_MAX * HC;
  const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring);
  const int32_t *trow = p.table + (int64_t)si.slot * p.max_pages;
  const int64_t wbase = ((int64_t)si.slot * p.layers + p.layer) * p.W;

  auto issue = [&](int i) {
    if (i < my_tiles) {
      const int g = warp + i * KV_WARPS;
      const uint32_t st = ring_s + (uint32_t)((i % p.nst) * p.stage_bytes);
      if (g < npt) {
        const int t0 = a0 + g * TT;
        const int64_t page = trow[t0 / p.P];
        const int off = t0 % p.P;
        const uint8_t *kb = p.kpool + (uint64_t)page * p.kpage + (uint64_t)hkv * p.khead;
        const uint8_t *vb = p.vpool + (uint64_t)page * p.vpage + (uint64_t)hkv * p.vhead;
        if (kq) {
          kv_copy_rows_any(st, kb + off * kbits / 8, p.P * kbits / 8, D, KWB, true, LPS, lane);
          kv_copy_rows_any(st + D * KWB, kb + p.kcodes + (off / p.kg) * keb, (p.P / p.kg) * keb, D, KPB, true, LPS,
                           lane);
        } else {
          kv_copy_flat(st, kb + (int64_t)off * D * 2, TT * D * 2, lane);
        }
        if (vq) {
          kv_copy_flat(st + kbytes, vb + (int64_t)off * D * vbits / 8, vcbytes, lane);
          kv_copy_flat(st + kbytes + vcbytes, vb + p.vcodes + (int64_t)off * vgpr * veb, TT * vgpr * veb, lane);
        } else {
          kv_copy_flat(st + kbytes, vb + (int64_t)off * D * 2, vcbytes, lane);
        }
      } else {
        const int t0 = ws0 + (g - npt) * TTW;
        const int nv = min(TTW, e0 - t0);
        constexpr int PR = D / 8; /* 16-byte chunks per row */
        for (int k = lane; k < nv * PR; k += 32) {
          const int r = k / PR, c = k % PR;
          const int64_t slot = (t0 + r) % p.W;
          const int64_t src = ((wbase + slot) * p.kvh + hkv) * D + c * 8;
          kv_cpa<16>(st + (uint32_t)((r * D + c * 8) * 2), p.kwin + src);
          kv_cpa<16>(st + (uint32_t)(((TTW + r) * D + c * 8) * 2), p.vwin + src);
        }
      }
    }
    kv_commit();
  };

  /* online softmax state (per head), value accumulators of this lane's 8 channels */
  float m[HC], lsum[HC], A[8][HC], S[HC], Z[HC];
#pragma unroll
  for (int h = 0; h < HC; h++) {
    m[h] = -INFINITY;
    lsum[h] = 0.0f;
    S[h] = 0.0f;
    Z[h] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) A[j][h] = 0.0f;
  }

  for (int s = 0; s < p.nst - 1; s++) issue(s);

  for (int i = 0; i < my_tiles; i++) {
    issue(i + p.nst - 1);
    kv_wait(p.nst - 1);
    __syncwarp();
    const uint8_t *stg = ring + (size_t)(i % p.nst) * p.stage_bytes;
    const int g = warp + i * KV_WARPS;
    const bool page = g < npt;
    const int t0 = page ? a0 + g * TT : ws0 + (g - npt) * TTW;
    const int tt = page ? TT : TTW;
    const int nv = page ? min(TT, pend - t0) : min(TTW, e0 - t0);
    const int noct = tt / 8, ops = (noct + SPW - 1) / SPW;

    /* ---------------- scores ---------------- */
    float tmax[HC];
#pragma unroll
    for (int h = 0; h < HC; h++) tmax[h] = -INFINITY;
    {
      int gi_prev = -1;
      float qs[HC][8], init_lo[HC], init_hi[HC];
#pragma unroll
      for (int h = 0; h < HC; h++) {
        init_lo[h] = init_hi[h] = 0.0f;
#pragma unroll
        for (int c = 0; c < 8; c++) qs[h][c] = 0.0f;
      }
      const bool kpage_q = page && kq;
#pragma unroll 1
      for (int oi = 0; oi < ops; oi++) { /* ops is uniform across the warp */
        {
          const int o = hsub * ops + oi;
          const int oc = o < noct ? o : noct - 1;
          const int tok0 = oc * 8;
          float acc[8][HC];
          float fac_lo = 1.0f, fac_hi = 1.0f; /* score = reduced * fac (per token parity for 2-bit) */
          if (kpage_q && !kcb) {
            const int gi = NGK > 1 ? tok0 / p.kg : 0;
            if (gi != gi_prev) {
              gi_prev = gi;
              float As[HC], Bs[HC];
#pragma unroll
              for (int h = 0; h < HC; h++) As[h] = Bs[h] = 0.0f;
#pragma unroll
              for (int c = 0; c < 8; c++) {
                const uint32_t sz = *(const uint32_t *)(stg + D * KWB + (c * LPS + lp) * KPB + gi * 4);
                const float sc_ = kv_h2f(sz & 0xffffu), zc = kv_h2f(sz >> 16);
#pragma unroll
                for (int h = 0; h < HC; h++) {
                  qs[h][c] = qf[h][c] * sc_;
                  As[h] += qs[h][c];
                  Bs[h] = fmaf(qf[h][c], zc, Bs[h]);
                }
              }
#pragma unroll
              for (int h = 0; h < HC; h++) {
                init_lo[h] = fmaf(Bs[h], 0.0625f, -As[h]);                         /* b = 19 */
                init_hi[h] = kbits == 2 ? fmaf(Bs[h], 0.25f, -As[h]) : init_lo[h]; /* b = 21 */
              }
            }
            if (kbits == 2) {
              fac_lo = 16.0f;
              fac_hi = 4.0f;
#pragma unroll
              for (int t = 0; t < 8; t++)
#pragma unroll
                for (int h = 0; h < HC; h++) acc[t][h] = (t & 1) ? init_hi[h] : init_lo[h];
#pragma unroll
              for (int c = 0; c < 8; c++) {
                uint32_t w = *(const uint32_t *)(stg + (c * LPS + lp) * KWB + (tok0 >> 4) * 4);
                w = (tok0 & 8) ? (w >> 16) : w;
                float f[8];
                {
                  uint32_t x;
                  x = kv_sh<19>(w);
                  f[0] = kv_mf(x, M19, ONE);
                  f[1] = kv_mf(x, M21, ONE);
                  x = kv_sh<15>(w);
                  f[2] = kv_mf(x, M19, ONE);
                  f[3] = kv_mf(x, M21, ONE);
                  x = kv_sh<11>(w);
                  f[4] = kv_mf(x, M19, ONE);
                  f[5] = kv_mf(x, M21, ONE);
                  x = kv_sh<7>(w);
                  f[6] = kv_mf(x, M19, ONE);
                  f[7] = kv_mf(x, M21, ONE);
                }
#pragma unroll
                for (int t = 0; t < 8; t++)
#pragma unroll
                  for (int h = 0; h < HC; h++) acc[t][h] = fmaf(qs[h][c], f[t], acc[t][h]);
              }
            } else { /* 4-bit: b = 19 for every code */
              fac_lo = fac_hi = 16.0f;
#pragma unroll
              for (int t = 0; t < 8; t++)
#pragma unroll
                for (int h = 0; h < HC; h++) acc[t][h] = init_lo[h];
#pragma unroll
              for (int c = 0; c < 8; c++) {
                const uint32_t w = *(const uint32_t *)(stg + (c * LPS + lp) * KWB + (tok0 >> 3) * 4);
                float f[8];
                f[0] = kv_mf(kv_sh<19>(w), M4, ONE);
                f[1] = kv_mf(kv_sh<15>(w), M4, ONE);
                f[2] = kv_mf(kv_sh<11>(w), M4, ONE);
                f[3] = kv_mf(kv_sh<7>(w), M4, ONE);
                f[4] = kv_mf(kv_sh<3>(w), M4, ONE);
                f[5] = kv_mf(kv_sh<-1>(w), M4, ONE);
                f[6] = kv_mf(kv_sh<-5>(w), M4, ONE);
                f[7] = kv_mf(kv_sh<-9>(w), M4, ONE);
#pragma unroll
                for (int t = 0; t < 8; t++)
#pragma unroll
                  for (int h = 0; h < HC; h++) acc[t][h] = fmaf(qs[h][c], f[t], acc[t][h]);
              }
            }
          } else if (kpage_q) { /* codebook keys: centroid lookup per code */
            const int gi = NGK > 1 ? tok0 / p.kg : 0;
            const int nc = 1 << kbits, cpw = 32 / kbits;
#pragma unroll
            for (int t = 0; t < 8; t++)
#pragma unroll
              for (int h = 0; h < HC; h++) acc[t][h] = 0.0f;
#pragma unroll
            for (int c = 0; c < 8; c++) {
              const int slot = c * LPS + lp;
              const uint32_t w = *(const uint32_t *)(stg + slot * KWB + (tok0 / cpw) * 4);
              const uint16_t *cent = (const uint16_t *)(stg + D * KWB + slot * KPB) + gi * nc;
              const int sh0 = (tok0 % cpw) * kbits;
#pragma unroll
              for (int t = 0; t < 8; t++) {
                const uint32_t code = (w >> (sh0 + t * kbits)) & (uint32_t)(nc - 1);
                const float kv = kv_h2f(cent[code]);
#pragma unroll
                for (int h = 0; h < HC; h++) acc[t][h] = fmaf(qf[h][c], kv, acc[t][h]);
              }
            }
          } else { /* fp16 rows: [tt][D] */
#pragma unroll
            for (int t = 0; t < 8; t++) {
              const uint4 u = *(const uint4 *)(stg + ((tok0 + t) * D + 8 * lp) * 2);
              float kf[8];
              kv_u4_to_f8(u, kf);
#pragma unroll
              for (int h = 0; h < HC; h++) {
                float s_ = 0.0f;
#pragma unroll
                for (int c = 0; c < 8; c++) s_ = fmaf(qf[h][c], kf[c], s_);
                acc[t][h] = s_;
              }
            }
          }
          float r[HC];
          kv_reduce8<HC, LPS>(acc, r, lane);
          const int idx = lp / (LPS / 8);
          const bool valid = o < noct && tok0 + idx < nv;
          const float fac = (idx & 1) ? fac_hi : fac_lo;
          /* raw scores (log2 units) to the warp's buffer; exp2 in one pass below */
#pragma unroll
          for (int h = 0; h < HC; h++) {
            const float sv = valid ? r[h] * fac : -INFINITY;
            tmax[h] = fmaxf(tmax[h], sv);
            if (o < noct && (lp % (LPS / 8)) == 0) pbuf[(o * 8 + idx) * HC + h] = sv;
          }
        }
      }
    }

    /* ---------------- online softmax ---------------- */
    {
      float corr[HC];
      bool rescale = false;
#pragma unroll
      for (int h = 0; h < HC; h++) {
        float tm = tmax[h];
#pragma unroll
        for (int off = 16; off >= 1; off >>= 1) tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, off));
        const float mn = fmaxf(m[h], tm);
        corr[h] = exp2f(m[h] - mn);
        rescale |= mn != m[h];
        m[h] = mn;
        lsum[h] *= corr[h];
      }
      __syncwarp();
      for (int t = lane; t < tt; t += 32) {
#pragma unroll
        for (int h = 0; h < HC; h++) {
          const float pv = exp2f(pbuf[t * HC + h] - m[h]);
          lsum[h] += pv;
          pbuf[t * HC + h] = pv;
        }
      }
      if (rescale) { /* m is warp-uniform, so is the branch */
#pragma unroll
        for (int h = 0; h < HC; h++) {
          S[h] *= corr[h];
          Z[h] *= corr[h];
#pragma unroll
          for (int j = 0; j < 8; j++) A[j][h] *= corr[h];
        }
      }
    }
    __syncwarp();

    /* ---------------- values ---------------- */
    if (page && vq && !vcb) {
      const uint8_t *vc = stg + kbytes, *vpar = stg + kbytes + vcbytes;
      const int gcol = (8 * lp) / p.vg;
      if (vbits == 2) {
        const int wpr = D / 16;
#pragma unroll 2
        for (int t = hsub; t < nv; t += SPW) {
          uint32_t w = *(const uint32_t *)(vc + (t * wpr + (lp >> 1)) * 4);
          w = (lp & 1) ? (w >> 16) : w;
          const uint32_t sz = *(const uint32_t *)(vpar + (t * vgpr + gcol) * 4);
          const float s_ = kv_h2f(sz & 0xffffu), z_ = kv_h2f(sz >> 16);
          float ps[HC];
#pragma unroll
          for (int h = 0; h < HC; h++) {
            const float pv = pbuf[t * HC + h];
            ps[h] = pv * s_;
            S[h] += ps[h];
            Z[h] = fmaf(pv, z_, Z[h]);
          }
          float f[8];
          uint32_t x;
          x = kv_sh<19>(w);
          f[0] = kv_mf(x, M19, ONE);
          f[1] = kv_mf(x, M21, ONE);
          x = kv_sh<15>(w);
          f[2] = kv_mf(x, M19, ONE);
          f[3] = kv_mf(x, M21, ONE);
          x = kv_sh<11>(w);
          f[4] = kv_mf(x, M19, ONE);
          f[5] = kv_mf(x, M21, ONE);
          x = kv_sh<7>(w);
          f[6] = kv_mf(x, M19, ONE);
          f[7] = kv_mf(x, M21, ONE);
#pragma unroll
          for (int j = 0; j < 8; j++)
#pragma unroll
            for (int h = 0; h < HC; h++) A[j][h] = fmaf(ps[h], f[j], A[j][h]);
        }
      } else {
        const int wpr = D / 8;
#pragma unroll 2
        for (int t = hsub; t < nv; t += SPW) {
          const uint32_t w = *(const uint32_t *)(vc + (t * wpr + lp) * 4);
          const uint32_t sz = *(const uint32_t *)(vpar + (t * vgpr + gcol) * 4);
          const float s_ = kv_h2f(sz & 0xffffu), z_ = kv_h2f(sz >> 16);
          float ps[HC];
#pragma unroll
          for (int h = 0; h < HC; h++) {
            const float pv = pbuf[t * HC + h];
            ps[h] = pv * s_;
            S[h] += ps[h];
            Z[h] = fmaf(pv, z_, Z[h]);
          }
          float f[8];
          f[0] = kv_mf(kv_sh<19>(w), M4, ONE);
          f[1] = kv_mf(kv_sh<15>(w), M4, ONE);
          f[2] = kv_mf(kv_sh<11>(w), M4, ONE);
          f[3] = kv_mf(kv_sh<7>(w), M4, ONE);
          f[4] = kv_mf(kv_sh<3>(w), M4, ONE);
          f[5] = kv_mf(kv_sh<-1>(w), M4, ONE);
          f[6] = kv_mf(kv_sh<-5>(w), M4, ONE);
          f[7] = kv_mf(kv_sh<-9>(w), M4, ONE);
#pragma unroll
          for (int j = 0; j < 8; j++)
#pragma unroll
            for (int h = 0; h < HC; h++) A[j][h] = fmaf(ps[h], f[j], A[j][h]);
        }
      }
    } else if (page && vcb) {
      const uint8_t *vc = stg + kbytes, *vpar = stg + kbytes + vcbytes;
      const int gcol = (8 * lp) / p.vg, nc = 1 << vbits, cpw = 32 / vbits, wpr = D / cpw;
      const int widx = (8 * lp) / cpw, sh0 = ((8 * lp) % cpw) * vbits;
      for (int t = hsub; t < nv; t += SPW) {
        const uint32_t w = *(const uint32_t *)(vc + (t * wpr + widx) * 4);
        const uint16_t *cent = (const uint16_t *)(vpar + (t * vgpr + gcol) * veb);
        float pv[HC];
#pragma unroll
        for (int h = 0; h < HC; h++) pv[h] = pbuf[t * HC + h];
#pragma unroll
        for (int j = 0; j < 8; j++) {
          const float vv = kv_h2f(cent[(w >> (sh0 + j * vbits)) & (uint32_t)(nc - 1)]);
#pragma unroll
          for (int h = 0; h < HC; h++) A[j][h] = fmaf(pv[h], vv, A[j][h]);
        }
      }
    } else { /* fp16 rows (16-bit pages or the window) into the accumulator's domain */
      const uint8_t *v16 = stg + (page ? kbytes : TTW * D * 2);
      const float flo = vmode == 2 ? 1.0f : 0.0625f, fhi = vmode == 0 ? 0.25f : flo;
#pragma unroll 2
      for (int t = hsub; t < nv; t += SPW) {
        const uint4 u = *(const uint4 *)(v16 + (t * D + 8 * lp) * 2);
        float vf[8];
        kv_u4_to_f8(u, vf);
#pragma unroll
        for (int h = 0; h < HC; h++) {
          const float pv = pbuf[t * HC + h];
          const float plo = pv * flo, phi = pv * fhi;
#pragma unroll
          for (int j = 0; j < 8; j++) A[j][h] = fmaf((j & 1) ? phi : plo, vf[j], A[j][h]);
        }
      }
    }
    __syncwarp();
  }
  kv_wait(0);

  /* ---------------- merge lanes, then warps ---------------- */
#pragma unroll
  for (int off = LPS; off < 32; off <<= 1)
#pragma unroll
    for (int h = 0; h < HC; h++) {
      S[h] += __shfl_xor_sync(KV_FULL, S[h], off);
      Z[h] += __shfl_xor_sync(KV_FULL, Z[h], off);
#pragma unroll
      for (int j = 0; j < 8; j++) A[j][h] += __shfl_xor_sync(KV_FULL, A[j][h], off);
    }
#pragma unroll
  for (int h = 0; h < HC; h++)
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) lsum[h] += __shfl_xor_sync(KV_FULL, lsum[h], off);

  __syncthreads();           /* every warp is done with its ring: reuse it for the merge */
  float *cw = (float *)smem; /* [warps][HC][D + 2] */
  {
    const float ilo = vmode == 2 ? 1.0f : 16.0f, ihi = vmode == 0 ? 4.0f : ilo;
    if (hsub == 0) {
#pragma unroll
      for (int h = 0; h < HC; h++) {
        float *row = cw + (warp * HC + h) * (D + 2);
        if (lp == 0) {
          row[0] = m[h];
          row[1] = lsum[h];
        }
#pragma unroll
        for (int j = 0; j < 8; j++) row[2 + 8 * lp + j] = (A[j][h] - S[h]) * ((j & 1) ? ihi : ilo) + Z[h];
      }
    }
  }
  __syncthreads();
  kv_merge_warps<D, KV_WARPS>(p, cw, HC, nq, (int64_t)b * p.qh + qh0);
  kv_attn_finish<D>(p, p.nsplit == 1);
}

/* ---------------------------------------------------------------- host side -------------- */

#ifdef KV_FAST_BUILD /* development: one head_dim only */
#define KV_D_OK(D) ((D) == 128)
#else
#define KV_D_OK(D) true
#endif
template <int D>
static kv_attn_kernel pick_hc(int hc) {
  if constexpr (!KV_D_OK(D)) {
    (void)hc;
    return NULL;
  } else {
    switch (hc) {
      case 4: return k_cache_attend<D, 4>;
      case 2: return k_cache_attend<D, 2>;
      default: return k_cache_attend<D, 1>;
    }
  }
}

static kv_attn_kernel pick_kernel(int D, int hc) {
  switch (D) {
    case 64: return pick_hc<64>(hc);
    case 128: return pick_hc<128>(hc);
    default: return pick_hc<256>(hc);
  }
}

struct kv_kernel_info {
  kv_attn_kernel fn;
  int device;
  int regs;
  size_t smem_set; /* dynamic smem limit already set */
  size_t occ_smem; /* occupancy below was computed for this dynamic smem */
  int occ;
};

/* Per-process cache of register counts, smem limits and occupancy (kernels x devices is small);
   entries are never removed, so a pointer stays valid; g_kinfo_mu guards lookups and updates. */
static kv_kernel_info g_kinfo[64];
static int g_nkinfo;
static std::mutex g_kinfo_mu;

static kv_kernel_info *kernel_info(kivi_ctx_t ctx, kv_attn_kernel fn, const char *op, kivi_status *st) {
  for (int i = 0; i < g_nkinfo; i++)
    if (g_kinfo[i].fn == fn && g_kinfo[i].device == ctx->device) return &g_kinfo[i];
  cudaFuncAttributes fa;
  if ((*st = kv_cuda(ctx, cudaFuncGetAttributes(&fa, (const void *)fn), op, "cudaFuncGetAttributes"))) return NULL;
  kv_kernel_info *ki = g_nkinfo < 64 ? &g_kinfo[g_nkinfo++] : &g_kinfo[63];
  ki->fn = fn;
  ki->device = ctx->device;
  ki->regs = fa.numRegs;
  ki->smem_set = 48 * 1024;
  ki->occ_smem = 0;
  ki->occ = 0;
  return ki;
}

/* CTAs of a launch before splitting (batch x kv heads x head chunks), and the SMs they spread over */
static int64_t kv_units(const kivi_cache_t c, const kv_attn_params *p) {
  return (int64_t)p->batch * c->cfg.kv_heads * p->nhc;
}
static int64_t kv_sms(const kivi_ctx_t ctx) { return ctx->sm_count > 0 ? ctx->sm_count : 1; }

/* The workspace: the sequences of a batch larger than KV_SEQ_INLINE [KV_ATTN_MAX_BATCH], then the
   partials of the splits. */
static uint64_t kv_ws_head(const kivi_cache_config &g) {
  (void)g;
  return ((uint64_t)KV_ATTN_MAX_BATCH * sizeof(kv_seq_info) + 255) & ~(uint64_t)255;
}
static kivi_status kv_ws_ensure(kivi_cache_t c, const char *op, uint64_t partial_bytes) {
  kivi_ctx_t ctx = c->ctx;
  const uint64_t head = kv_ws_head(c->cfg), need = head + partial_bytes;
  if (need <= c->ws_bytes) return KIVI_OK;
  if (c->ws) {
    (void)cudaStreamSynchronize(ctx->stream);
    cudaFree(c->ws);
    c->ws = NULL;
    c->ws_bytes = 0;
  }
  const uint64_t want = head + partial_bytes + partial_bytes / 4;
  kivi_status st;
  if ((st = kv_cuda(ctx, cudaMalloc((void **)&c->ws, (size_t)want), op, "cudaMalloc (attention workspace)"))) return st;
  c->ws_bytes = want;
  return KIVI_OK;
}

/* Splits (minimising waves x tiles per CTA, plus a fixed cost per CTA), the workspace, the sequences of
   a large batch (seq: host [batch]) and the launch of fn (grid = batch x kv heads x head chunks x
   splits; the merge of the splits happens inside it). */
static kivi_status launch_split(kivi_cache_t c, const char *op, kv_attn_params *p, const kv_seq_info *seq,
                                kv_attn_kernel fn, int threads, size_t smem, int bps, int TT, int64_t maxlen,
                                const char *name) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  const int D = g.head_dim, batch = p->batch;
  kivi_status st = KIVI_OK;
  const int64_t units = kv_units(c, p), slots = kv_sms(ctx) * bps;
  const int64_t max_ns = (maxlen + 4 * TT - 1) / (4 * TT);
  int64_t best_ns = 1;
  double best = 1e300;
  for (int64_t ns = 1; ns <= max_ns && ns <= 1024; ns++) {
    const int64_t chunk = ((maxlen + ns - 1) / ns + TT - 1) / TT * TT;
    const int64_t real_ns = (maxlen + chunk - 1) / chunk;
    if (real_ns != ns) continue;
    const int64_t waves = (units * ns + slots - 1) / slots;
    const double cost = (double)waves * ((double)chunk / TT + 3.0) + (ns > 1 ? 2.0 : 0.0);
    if (cost < best - 1e-9) {
      best = cost;
      best_ns = ns;
    }
  }
  /* KIVI_NSPLIT=n forces the split count (development: measure the cost model's choice against others) */
  static const int64_t forced_ns = getenv("KIVI_NSPLIT") ? atoll(getenv("KIVI_NSPLIT")) : 0;
  if (forced_ns > 0) best_ns = forced_ns < max_ns ? forced_ns : (max_ns > 0 ? max_ns : 1);
  int64_t chunk = ((maxlen + best_ns - 1) / best_ns + TT - 1) / TT * TT;
  best_ns = (maxlen + chunk - 1) / chunk;
  p->nsplit = (int32_t)best_ns;
  p->chunk = (int32_t)chunk;

  if (best_ns > 1 || batch > KV_SEQ_INLINE) {
    const uint64_t partial = best_ns > 1 ? (uint64_t)batch * g.q_heads * best_ns * (D + 2) * sizeof(float) : 0;
    if ((st = kv_ws_ensure(c, op, partial))) return st;
    uint8_t *w = (uint8_t *)c->ws;
    p->dseq = (const kv_seq_info *)w;
    p->ws = (float *)(w + kv_ws_head(g));
    /* pageable source: the copy takes the data before it returns (a few KB, stream-ordered) */
    if (batch > KV_SEQ_INLINE &&
        (st = kv_cuda(ctx,
                      cudaMemcpyAsync((void *)p->dseq, seq, (size_t)batch * sizeof(kv_seq_info), cudaMemcpyHostToDevice,
                                      ctx->stream),
                      op, "cudaMemcpyAsync (attention sequences)")))
      return st;
  }

  const unsigned grid = (unsigned)(units * best_ns);
  fn<<<grid, threads, smem, ctx->stream>>>(*p);
  if ((st = kv_launched(ctx, op, name)) || best_ns == 1) return st;
  const unsigned cg = (unsigned)batch * (unsigned)g.q_heads;
  switch (D) {
    case 64: k_attend_combine<64><<<cg, 64, 0, ctx->stream>>>(*p); break;
    case 128: k_attend_combine<128><<<cg, 128, 0, ctx->stream>>>(*p); break;
    default: k_attend_combine<256><<<cg, 256, 0, ctx->stream>>>(*p); break;
  }
  return kv_launched(ctx, op, "k_attend_combine");
}

/* The tensor-core kernel (caches in the tensor-core page layout): 32-token tiles, up to 8 heads a CTA. */
static kivi_status mma_launch(kivi_cache_t c, const char *op, kv_attn_params *p, const kv_seq_info *seq,
                              int64_t maxlen) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  const int D = g.head_dim;
  /* CTAs per SM: 4 (registers capped at 128) where the grid has at least one (sequence, kv head, head
     chunk) unit an SM, else 3. Measured on an H200, same run, 3 -> 4 CTAs (GQA kernel, T1 = false):
     8x32768 273 -> 270 us, 8x8192 85 -> 80, 32x4096 169 -> 151; but with few units (1 x 32 heads),
     where the sequence is split into many short chunks, 1x32768 46 -> 49 and 1x4096 16.7 -> 17.2. The
     T1 kernel spills 68 bytes at 128 registers and still gains where the grid is large (32x4096
     157 -> 147 us; 8x32768 the same). Four stages a warp either way (3 and 5 measured slower at
     8x32768). */
  constexpr int nst = KV_MMA_NST;
  /* KIVI_MMA_CTAS=3 or 4 forces the choice (development: compare the two in one build) */
  static const int forced = getenv("KIVI_MMA_CTAS") ? atoi(getenv("KIVI_MMA_CTAS")) : 0;
  const bool many = forced ? forced >= 4 : kv_units(c, p) >= kv_sms(ctx);
  /* one query head a KV head: the key MMA takes tokens as rows and the three planes as columns (T1) */
  const bool one = g.q_heads == g.kv_heads;
  const bool cb = g.v_kind == KIVI_KIND_CODEBOOK;
  kv_attn_kernel fn =
      cb ? kv_mma_kernel_codebook(D, g.v_group, one, many) : kv_mma_kernel_uniform(D, g.v_group, one, many);
  if (!fn)
    return kv_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: head_dim %d with value groups of %d is not built into this library",
                   op, D, (int)g.v_group);
  /* a ring of nst stages a warp (32 tokens: key codes + params, value codes + param planes) */
  const size_t stage = (size_t)kv_mma_stage_bytes(D, g.v_group, cb ? 4 : 2);
  const size_t ring = (size_t)KV_MMA_WARPS * nst * stage;
  const size_t merge = (size_t)KV_MMA_WARPS * KV_MMA_HEADS * (D + 2) * sizeof(float);
  const size_t abuf = kv_mma_abuf_bytes(D, g.q_heads / g.kv_heads);
  const size_t smem = (size_t)KV_MMA_HEADS * D * sizeof(float) + abuf + (ring > merge ? ring : merge);
  kivi_status st = KIVI_OK;
  int bps = 1;
  {
    std::lock_guard<std::mutex> lock(g_kinfo_mu);
    kv_kernel_info *ki = kernel_info(ctx, fn, op, &st);
    if (!ki) return st;
    if (smem > ki->smem_set) {
      if ((st = kv_cuda(ctx,
                        cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                        op, "cudaFuncSetAttribute (k_attend_mma)")))
        return st;
      ki->smem_set = smem;
    }
    if (ki->occ_smem != smem) {
      if ((st = kv_cuda(ctx,
                        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ki->occ, (const void *)fn, KV_MMA_THREADS, smem),
                        op, "cudaOccupancyMaxActiveBlocksPerMultiprocessor")))
        return st;
      ki->occ_smem = smem;
    }
    bps = ki->occ < 1 ? 1 : ki->occ;
  }
  return launch_split(c, op, p, seq, fn, KV_MMA_THREADS, smem, bps, 32, maxlen, "k_attend_mma");
}

kivi_status kv_attend_launch(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                             const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype, float scale,
                             void *out, kivi_dtype out_dtype, const kv_attn_check *chk) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  const int D = g.head_dim, ratio = g.q_heads / g.kv_heads;
  const bool mma = kivi_cache_mma_layout(&g);
  /* measured on H200, ratio 4: HC 4 (255 regs, 2 CTAs/SM) beats HC 2 by 1.2x and HC 1 by 1.9x; ratios
     that 4 does not divide take chunks of 4 with a partly empty last one (ratio 7: 2 CTAs reading the
     pages, not 7) */
  const int HC = mma ? KV_MMA_HEADS : ratio >= 4 ? 4 : (ratio >= 2 ? 2 : 1);
  const int nhc = (ratio + HC - 1) / HC;
  kivi_status st = KIVI_OK;

  kv_attn_params params;
  memset(&params, 0, sizeof params);
  kv_attn_params *p = &params;
  p->kpool = c->kpool + (uint64_t)layer * g.max_pages * c->kp.page;
  p->vpool = c->vpool + (uint64_t)layer * g.max_pages * c->vp.page;
  p->kwin = c->kwin;
  p->vwin = c->vwin;
  p->table = c->d_table;
  p->q = q;
  p->out = out;
  p->kpage = c->kp.page;
  p->vpage = c->vp.page;
  p->khead = (uint32_t)c->kp.head;
  p->vhead = (uint32_t)c->vp.head;
  p->kcodes = (uint32_t)c->kp.codes;
  p->vcodes = (uint32_t)c->vp.codes;
  p->max_pages = g.max_pages;
  p->layers = g.layers;
  p->layer = layer;
  p->kvh = g.kv_heads;
  p->qh = g.q_heads;
  p->ratio = ratio;
  p->nhc = nhc;
  p->W = c->W;
  p->P = g.page_tokens;
  p->kbits = g.k_bits;
  p->vbits = g.v_bits;
  p->kkind = g.k_kind;
  p->vkind = g.v_kind;
  p->kg = g.k_group;
  p->vg = g.v_group;
  p->q_dtype = q_dtype;
  p->out_dtype = out_dtype;
  p->qscale = scale * 1.4426950408889634f;
  p->batch = batch;
  if (chk) {
    p->cdev = chk->dev;
    p->crec = chk->rec;
    p->cop = chk->op;
  }
  int64_t maxlen = 0;
  kv_seq_info seq[KV_ATTN_MAX_BATCH];
  for (int32_t i = 0; i < batch; i++) {
    seq[i].slot = slot[i];
    seq[i].len = (int32_t)len[i];
    seq[i].qlen = (int32_t)qlen[i];
    if (i < KV_SEQ_INLINE) p->seq[i] = seq[i];
    maxlen = len[i] > maxlen ? len[i] : maxlen;
  }

  if (mma) return mma_launch(c, op, p, seq, maxlen);

  /* tiles and stages */
  const bool kq = g.k_bits != 16, vq = g.v_bits != 16;
  const int TT = (kq && vq) ? (g.page_tokens < KV_TT_MAX ? g.page_tokens : KV_TT_MAX) : 16;
  const int keb = (kq && g.k_kind == KIVI_KIND_CODEBOOK) ? 2 << g.k_bits : 4;
  const int veb = (vq && g.v_kind == KIVI_KIND_CODEBOOK) ? 2 << g.v_bits : 4;
  const int ngk = TT > g.k_group ? TT / g.k_group : 1;
  const int kbytes = kq ? D * (TT * g.k_bits / 8 + ngk * keb) : TT * D * 2;
  const int vbytes = vq ? TT * D * g.v_bits / 8 + TT * (D / g.v_group) * veb : TT * D * 2;
  int stage = kbytes + vbytes;
  /* window tiles (fp16 rows): 16 tokens, or 8 where 16 would make the stage larger than a page tile */
  const int TTW = 2 * 16 * D * 2 <= stage ? 16 : 8;
  const int wstage = 2 * TTW * D * 2;
  stage = stage > wstage ? stage : wstage;
  p->TTW = TTW;
  p->one = 0x3f800000u;
  p->m19 = 3u << 19;
  p->m21 = 3u << 21;
  p->m4 = 15u << 19;
  stage = (stage + 15) & ~15;
  p->TT = TT;
  p->stage_bytes = stage;

  kv_attn_kernel fn = pick_kernel(D, HC);
  if (!fn) return kv_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: head_dim %d is not built into this library", op, D);
  std::lock_guard<std::mutex> lock(g_kinfo_mu);
  kv_kernel_info *ki = kernel_info(ctx, fn, op, &st);
  if (!ki) return st;
  /* stages: as deep as the register-limited occupancy leaves shared memory for (2..4) */
  const int per_warp_regs = ((ki->regs * 32 + 255) / 256) * 256;
  int by_regs = 65536 / (per_warp_regs * KV_WARPS);
  by_regs = by_regs < 1 ? 1 : (by_regs > 8 ? 8 : by_regs);
  const size_t extra = (size_t)KV_WARPS * KV_TT_MAX * HC * sizeof(float);
  const size_t budget = (size_t)(220 * 1024) / by_regs;
  int nst = (int)((budget > extra ? budget - extra : 0) / ((size_t)KV_WARPS * stage));
  nst = nst < 2 ? 2 : (nst > 4 ? 4 : nst);
  size_t smem = (size_t)KV_WARPS * nst * stage + extra;
  const size_t merge = (size_t)KV_WARPS * HC * (D + 2) * sizeof(float);
  if (smem < merge) smem = merge;
  p->nst = nst;
  if (smem > ki->smem_set) {
    if ((st = kv_cuda(ctx,
                      cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                      op, "cudaFuncSetAttribute (k_cache_attend)"))) {
      return st;
    }
    ki->smem_set = smem;
  }
  int bps = 1;
  if ((st = kv_cuda(ctx, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, (const void *)fn, KV_THREADS, smem), op,
                    "cudaOccupancyMaxActiveBlocksPerMultiprocessor"))) {
    return st;
  }
  if (bps < 1) bps = 1;

  return launch_split(c, op, p, seq, fn, KV_THREADS, smem, bps, TT, maxlen, "k_cache_attend");
}

/* ---------------------------------------------------------------- export ----------------- */

extern "C" {

KIVI_API kivi_status kivi_cache_attend(kivi_cache_t cache, int32_t layer, const int32_t *seqs, int32_t batch,
                                       const void *q, kivi_dtype q_dtype, float scale, int32_t flags, void *out,
                                       kivi_dtype out_dtype) {
  static const char *op = "kivi_cache_attend";
  if (!cache) return kv_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  kivi_ctx_t ctx = cache->ctx;
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  const kivi_cache_config &g = cache->cfg;
  if (layer < 0 || layer >= g.layers)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: layer must be in 0..%d, got %d", op, (int)g.layers - 1, (int)layer);
  if (!seqs) return kv_fail(ctx, KIVI_ERR_ARG, "%s: seqs must not be NULL", op);
  if (batch < 1) return kv_fail(ctx, KIVI_ERR_ARG, "%s: batch must be >= 1, got %d", op, (int)batch);
  if (batch > KV_ATTN_MAX_BATCH)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: batch must be at most %d in the CUDA build (split larger batches), got %d",
                   op, KV_ATTN_MAX_BATCH, (int)batch);
  if (!q) return kv_fail(ctx, KIVI_ERR_ARG, "%s: q must not be NULL", op);
  if (!out) return kv_fail(ctx, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  if (q_dtype != KIVI_F32 && q_dtype != KIVI_F16 && q_dtype != KIVI_BF16)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: q_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                   (int)q_dtype);
  if (out_dtype != KIVI_F32 && out_dtype != KIVI_F16 && out_dtype != KIVI_BF16)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: out_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                   (int)out_dtype);
  if (!isfinite(scale)) return kv_fail(ctx, KIVI_ERR_ARG, "%s: scale must be finite, got %g", op, (double)scale);
  if (flags & ~(int32_t)KIVI_FLAG_TRUSTED)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: flags must be 0 or KIVI_FLAG_TRUSTED (1), got %d", op, (int)flags);
  int32_t slot[KV_ATTN_MAX_BATCH];
  int64_t len[KV_ATTN_MAX_BATCH], qlen[KV_ATTN_MAX_BATCH];
  for (int32_t i = 0; i < batch; i++) {
    const int32_t s = seqs[i];
    if (s < 0 || s >= g.max_seqs)
      return kv_fail(ctx, KIVI_ERR_ARG, "%s: seqs[%d] must be in 0..%d, got %d", op, (int)i, (int)g.max_seqs - 1,
                     (int)s);
    if (!cache->live[s])
      return kv_fail(ctx, KIVI_ERR_STATE, "%s: seqs[%d] (sequence %d) is not live", op, (int)i, (int)s);
    slot[i] = s;
    len[i] = cache->len[(int64_t)s * g.layers + layer];
    qlen[i] = cache->qlen[(int64_t)s * g.layers + layer];
    if (len[i] < 1)
      return kv_fail(ctx, KIVI_ERR_STATE, "%s: seqs[%d] (sequence %d) holds no token in layer %d", op, (int)i, (int)s,
                     (int)layer);
    if (len[i] > INT32_MAX - 4096)
      return kv_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: seqs[%d] holds %lld tokens; attention supports below 2^31", op,
                     (int)i, (long long)len[i]);
  }
  if (!(flags & KIVI_FLAG_TRUSTED)) {
    const int64_t n = (int64_t)batch * g.q_heads * g.head_dim;
    int64_t bad;
    if ((st = kv_cache_scan(ctx, op, q, q_dtype, n, false, KV_SLOT_NONFINITE, &bad))) return st;
    if (bad >= 0) {
      const int64_t row = (int64_t)g.q_heads * g.head_dim;
      char buf[32];
      return kv_fail(ctx, KIVI_ERR_NONFINITE,
                     "%s: q must be finite, got %s at batch %lld, head %d, channel %d; pass KIVI_FLAG_TRUSTED only "
                     "for data known to be finite",
                     op, kv_cache_bad_name(ctx, q, q_dtype, bad, buf), (long long)(bad / row),
                     (int)((bad % row) / g.head_dim), (int)(bad % g.head_dim));
    }
  }
  return kv_attend_launch(cache, op, layer, batch, slot, len, qlen, q, q_dtype, scale, out, out_dtype, NULL);
}

KIVI_API kivi_status kivi_cache_bench_attend(kivi_cache_t cache, int32_t layer, const int32_t *seqs, int32_t batch,
                                             const void *q, kivi_dtype q_dtype, float scale, void *out,
                                             kivi_dtype out_dtype, int32_t iters, float *ms) {
  static const char *op = "kivi_cache_bench_attend";
  if (!cache) return kv_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  kivi_ctx_t ctx = cache->ctx;
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (iters < 1) return kv_fail(ctx, KIVI_ERR_ARG, "%s: iters must be >= 1, got %d", op, (int)iters);
  if (!ms) return kv_fail(ctx, KIVI_ERR_ARG, "%s: ms must not be NULL", op);
  /* the warm-up call validates everything (its errors name kivi_cache_attend) */
  if ((st = kivi_cache_attend(cache, layer, seqs, batch, q, q_dtype, scale, KIVI_FLAG_TRUSTED, out, out_dtype)))
    return st;
  cudaEvent_t e0 = NULL, e1 = NULL;
  float t = 0.0f;
  if ((st = kv_cuda(ctx, cudaEventCreate(&e0), op, "cudaEventCreate")) ||
      (st = kv_cuda(ctx, cudaEventCreate(&e1), op, "cudaEventCreate")) ||
      (st = kv_cuda(ctx, cudaEventRecord(e0, ctx->stream), op, "cudaEventRecord")))
    goto done;
  for (int32_t i = 0; i < iters; i++)
    if ((st = kivi_cache_attend(cache, layer, seqs, batch, q, q_dtype, scale, KIVI_FLAG_TRUSTED, out, out_dtype)))
      goto done;
  if ((st = kv_cuda(ctx, cudaEventRecord(e1, ctx->stream), op, "cudaEventRecord")) ||
      (st = kv_cuda(ctx, cudaEventSynchronize(e1), op, "cudaEventSynchronize")) ||
      (st = kv_cuda(ctx, cudaEventElapsedTime(&t, e0, e1), op, "cudaEventElapsedTime")))
    goto done;
  *ms = t / (float)iters;
done:
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  return st;
}

} /* extern "C" */
