/*
 * attention_simt.cuh — the fused decode attention on CUDA cores (k_cache_attend), for every cache
 * format outside the tensor-core page layout (4-bit, codebook keys, bits 16, head_dim 256, ...).
 * Included once, by attention.cu, which selects and launches it.
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
#ifndef KIVI_ATTENTION_SIMT_CUH
#define KIVI_ATTENTION_SIMT_CUH

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
    kv_attn_cta_done<D>(p);
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
  kv_attn_cta_done<D>(p);
}

#endif /* KIVI_ATTENTION_SIMT_CUH */
