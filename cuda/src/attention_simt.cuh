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
#include "attention_simt_bits.cuh"

/* ---------------------------------------------------------------- tile copies ------------ */

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

/* ---------------------------------------------------------------- a CTA's phases --------- */
/* Lane roles and shared-memory addresses go to the phases as arguments: read back from a struct field they
   lose what the compiler knows of them (a lane is below 32, an address is shared), and the code changes. */

/* What the phases of a CTA read, constant through the kernel: its tokens and this warp's tiles, its query
   heads, the formats and the stage layout, the sequence's page row and window base. */
struct kv_simt_cta {
  int b, hkv, a0, e0, pend, ws0;
  int TT, TTW, npt, my_tiles;
  int qh0, nq; /* heads of this chunk: the last one of a ratio HC does not divide is partly empty (its rows
                  compute on q = 0 and are not written) */
  uint32_t ONE, M19, M21, M4;
  int kbits, vbits;
  bool kq, vq, kcb, vcb;
  int keb, veb;
  int KWB; /* key code bytes per channel row */
  int NGK; /* key groups per tile */
  int KPB; /* key param bytes per channel row */
  int kbytes, vcbytes, vgpr;
  int vmode; /* value accumulation domain: 0 = 2-bit uniform (b 19 / 21), 1 = 4-bit uniform (b 19), 2 = direct */
  const int32_t *trow;
  int64_t wbase;
};

/* The online softmax state of a lane (per head) and the value accumulators of its 8 channels. */
template <int HC>
struct kv_simt_state {
  float m[HC], lsum[HC], A[8][HC], S[HC], Z[HC];
};

/* A key group's params folded into q (2- and 4-bit uniform keys), kept while the group lasts. */
template <int HC>
struct kv_simt_kgroup {
  float qs[HC][8], init_lo[HC], init_hi[HC];
};

/* The state before the first token: max -inf, sums and accumulators 0. */
template <int HC>
__device__ __forceinline__ void kv_simt_state_init(kv_simt_state<HC> &st) {
#pragma unroll
  for (int h = 0; h < HC; h++) {
    st.m[h] = -INFINITY;
    st.lsum[h] = 0.0f;
    st.S[h] = 0.0f;
    st.Z[h] = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; j++) st.A[j][h] = 0.0f;
  }
}
/* No group folded yet. */
template <int HC>
__device__ __forceinline__ void kv_simt_kgroup_init(kv_simt_kgroup<HC> &kg) {
#pragma unroll
  for (int h = 0; h < HC; h++) {
    kg.init_lo[h] = kg.init_hi[h] = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; k++) kg.qs[h][k] = 0.0f;
  }
}

/* The CTA's geometry and formats, as warp `warp` sees them (a CTA with tokens to attend). */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_cta_init(const kv_attn_params &p, const kv_cta &cta, int warp, kv_simt_cta &c) {
  c.b = cta.b, c.hkv = cta.hkv;
  c.a0 = cta.a0, c.e0 = cta.e0, c.pend = cta.pend, c.ws0 = cta.ws0;
  c.TT = p.TT, c.TTW = p.TTW;
  c.npt = c.a0 < c.pend ? (c.pend - c.a0 + c.TT - 1) / c.TT : 0;
  const int nwt = c.e0 > c.ws0 ? (c.e0 - c.ws0 + c.TTW - 1) / c.TTW : 0;
  const int ntiles = c.npt + nwt;
  c.my_tiles = ntiles > warp ? (ntiles - warp + KV_WARPS - 1) / KV_WARPS : 0;
  c.qh0 = c.hkv * p.ratio + cta.hc * HC;
  c.nq = min(HC, p.ratio - cta.hc * HC);
  c.ONE = p.one, c.M19 = p.m19, c.M21 = p.m21, c.M4 = p.m4;

  c.kbits = p.kbits, c.vbits = p.vbits;
  c.kq = c.kbits != 16, c.vq = c.vbits != 16;
  c.kcb = c.kq && p.kkind == KIVI_KIND_CODEBOOK, c.vcb = c.vq && p.vkind == KIVI_KIND_CODEBOOK;
  c.keb = c.kcb ? 2 << c.kbits : 4, c.veb = c.vcb ? 2 << c.vbits : 4;
  c.KWB = c.kq ? c.TT * c.kbits / 8 : 0;
  c.NGK = c.kq ? (c.TT > p.kg ? c.TT / p.kg : 1) : 0;
  c.KPB = c.NGK * c.keb;
  c.kbytes = c.kq ? D * (c.KWB + c.KPB) : c.TT * D * 2;
  c.vcbytes = c.vq ? c.TT * D * c.vbits / 8 : c.TT * D * 2;
  c.vgpr = D / p.vg;
  c.vmode = (c.vq && !c.vcb) ? (c.vbits == 2 ? 0 : 1) : 2;
}
/* The sequence's page row and window base (after the q loads: the order the kernel was tuned in). */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_cta_seq(const kv_attn_params &p, const kv_cta &cta, kv_simt_cta &c) {
  c.trow = p.table + (int64_t)cta.si.slot * p.max_pages;
  c.wbase = ((int64_t)cta.si.slot * p.layers + p.layer) * p.W;
}

/* Starts the copy of the warp's tile i (page or window) into its ring stage i % nst, then commits the
   group (an empty one past the warp's tiles, so that kv_wait counts stay aligned). */
template <int D>
__device__ __forceinline__ void kv_simt_issue_tile(const kv_attn_params &p, const kv_simt_cta &c, int warp, int lane,
                                                   uint32_t ring_s, int i) {
  constexpr int LPS = D / 8;
  if (i < c.my_tiles) {
    const int g = warp + i * KV_WARPS;
    const uint32_t st = ring_s + (uint32_t)((i % p.nst) * p.stage_bytes);
    if (g < c.npt) {
      const int t0 = c.a0 + g * c.TT;
      const int64_t page = c.trow[t0 / p.P];
      const int off = t0 % p.P;
      const uint8_t *kb = p.kpool + (uint64_t)page * p.kpage + (uint64_t)c.hkv * p.khead;
      const uint8_t *vb = p.vpool + (uint64_t)page * p.vpage + (uint64_t)c.hkv * p.vhead;
      if (c.kq) {
        kv_copy_rows_any(st, kb + off * c.kbits / 8, p.P * c.kbits / 8, D, c.KWB, true, LPS, lane);
        kv_copy_rows_any(st + D * c.KWB, kb + p.kcodes + (off / p.kg) * c.keb, (p.P / p.kg) * c.keb, D, c.KPB, true,
                         LPS, lane);
      } else {
        kv_copy_flat(st, kb + (int64_t)off * D * 2, c.TT * D * 2, lane);
      }
      if (c.vq) {
        kv_copy_flat(st + c.kbytes, vb + (int64_t)off * D * c.vbits / 8, c.vcbytes, lane);
        kv_copy_flat(st + c.kbytes + c.vcbytes, vb + p.vcodes + (int64_t)off * c.vgpr * c.veb, c.TT * c.vgpr * c.veb,
                     lane);
      } else {
        kv_copy_flat(st + c.kbytes, vb + (int64_t)off * D * 2, c.vcbytes, lane);
      }
    } else {
      const int t0 = c.ws0 + (g - c.npt) * c.TTW;
      const int nv = min(c.TTW, c.e0 - t0);
      constexpr int PR = D / 8; /* 16-byte chunks per row */
      for (int k = lane; k < nv * PR; k += 32) {
        const int r = k / PR, ch = k % PR;
        const int64_t slot = (t0 + r) % p.W;
        const int64_t src = ((c.wbase + slot) * p.kvh + c.hkv) * D + ch * 8;
        kv_cpa<16>(st + (uint32_t)((r * D + ch * 8) * 2), p.kwin + src);
        kv_cpa<16>(st + (uint32_t)(((c.TTW + r) * D + ch * 8) * 2), p.vwin + src);
      }
    }
  }
  kv_commit();
}

/* This lane's 8 channels of the CTA's query rows (scaled to log2 units); a checked batch's first split
   checks them, warp 0 alone. */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_load_q(const kv_attn_params &p, const kv_simt_cta &c, int split, int warp,
                                               int lane, float (&qf)[HC][8]) {
  const int lp = lane % (D / 8);
#pragma unroll
  for (int h = 0; h < HC; h++)
#pragma unroll
    for (int k = 0; k < 8; k++)
      qf[h][k] = h < c.nq ? kv_q_at(p, c.b, 0, ((int64_t)c.b * p.qh + c.qh0 + h) * D + 8 * lp + k, false) : 0.0f;
  if (p.cdev && split == 0 && warp == 0)
    for (int i = lane; i < c.nq * D; i += 32)
      (void)kv_q_at(p, c.b, (int64_t)c.qh0 * D + i, ((int64_t)c.b * p.qh + c.qh0) * D + i, true);
}

/* Folds key group gi's scales and zeros into q (uniform keys): qs = q s per channel, and the score's
   constant term per head for b 19 (init_lo) and b 21 (init_hi). */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_key_group(const kv_simt_cta &c, int lp, const uint8_t *stg, int gi,
                                                  const float (&qf)[HC][8], kv_simt_kgroup<HC> &kg) {
  constexpr int LPS = D / 8;
  float As[HC], Bs[HC];
#pragma unroll
  for (int h = 0; h < HC; h++) As[h] = Bs[h] = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; k++) {
    const uint32_t sz = *(const uint32_t *)(stg + D * c.KWB + (k * LPS + lp) * c.KPB + gi * 4);
    const float sc_ = kv_h2f(sz & 0xffffu), zc = kv_h2f(sz >> 16);
#pragma unroll
    for (int h = 0; h < HC; h++) {
      kg.qs[h][k] = qf[h][k] * sc_;
      As[h] += kg.qs[h][k];
      Bs[h] = fmaf(qf[h][k], zc, Bs[h]);
    }
  }
#pragma unroll
  for (int h = 0; h < HC; h++) {
    kg.init_lo[h] = fmaf(Bs[h], 0.0625f, -As[h]);                              /* b = 19 */
    kg.init_hi[h] = c.kbits == 2 ? fmaf(Bs[h], 0.25f, -As[h]) : kg.init_lo[h]; /* b = 21 */
  }
}

/* This lane's partial scores of the octet of uniform BITS-bit keys at tok0 (2 bits: score = reduced x fac_lo
   for even tokens, x fac_hi for odd ones; 4 bits: b = 19 for every code). */
template <int D, int HC, int BITS>
__device__ __forceinline__ void kv_simt_key_uniform(const kv_simt_cta &c, int lp, const uint8_t *stg, int tok0,
                                                    const kv_simt_kgroup<HC> &kg, float (&acc)[8][HC]) {
  constexpr int LPS = D / 8;
#pragma unroll
  for (int t = 0; t < 8; t++)
#pragma unroll
    for (int h = 0; h < HC; h++) acc[t][h] = (BITS == 2 && (t & 1)) ? kg.init_hi[h] : kg.init_lo[h];
#pragma unroll
  for (int k = 0; k < 8; k++) {
    /* a word holds 16 tokens of 2-bit codes (the octet in its low or high half) or 8 of 4-bit ones */
    uint32_t w = *(const uint32_t *)(stg + (k * LPS + lp) * c.KWB + (tok0 >> (BITS == 2 ? 4 : 3)) * 4);
    float f[8];
    if constexpr (BITS == 2) {
      w = (tok0 & 8) ? (w >> 16) : w;
      kv_unpack2x8(w, c.M19, c.M21, c.ONE, f);
    } else {
      kv_unpack4x8(w, c.M4, c.ONE, f);
    }
#pragma unroll
    for (int t = 0; t < 8; t++)
#pragma unroll
      for (int h = 0; h < HC; h++) acc[t][h] = fmaf(kg.qs[h][k], f[t], acc[t][h]);
  }
}

/* This lane's partial scores of the octet of codebook keys at tok0: a centroid lookup per code. */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_key_codebook(const kv_attn_params &p, const kv_simt_cta &c, int lp,
                                                     const uint8_t *stg, int tok0, const float (&qf)[HC][8],
                                                     float (&acc)[8][HC]) {
  constexpr int LPS = D / 8;
  const int gi = c.NGK > 1 ? tok0 / p.kg : 0;
  const int nc = 1 << c.kbits, cpw = 32 / c.kbits;
#pragma unroll
  for (int t = 0; t < 8; t++)
#pragma unroll
    for (int h = 0; h < HC; h++) acc[t][h] = 0.0f;
#pragma unroll
  for (int k = 0; k < 8; k++) {
    const int slot = k * LPS + lp;
    const uint32_t w = *(const uint32_t *)(stg + slot * c.KWB + (tok0 / cpw) * 4);
    const uint16_t *cent = (const uint16_t *)(stg + D * c.KWB + slot * c.KPB) + gi * nc;
    const int sh0 = (tok0 % cpw) * c.kbits;
#pragma unroll
    for (int t = 0; t < 8; t++) {
      const uint32_t code = (w >> (sh0 + t * c.kbits)) & (uint32_t)(nc - 1);
      const float kv = kv_h2f(cent[code]);
#pragma unroll
      for (int h = 0; h < HC; h++) acc[t][h] = fmaf(qf[h][k], kv, acc[t][h]);
    }
  }
}

/* This lane's partial scores of the octet of fp16 keys at tok0 (rows [tt][D]: 16-bit pages or the window). */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_key_f16(const kv_simt_cta &c, int lp, const uint8_t *stg, int tok0,
                                                const float (&qf)[HC][8], float (&acc)[8][HC]) {
#pragma unroll
  for (int t = 0; t < 8; t++) {
    const uint4 u = *(const uint4 *)(stg + ((tok0 + t) * D + 8 * lp) * 2);
    float kf[8];
    kv_u4_to_f8(u, kf);
#pragma unroll
    for (int h = 0; h < HC; h++) {
      float s_ = 0.0f;
#pragma unroll
      for (int k = 0; k < 8; k++) s_ = fmaf(qf[h][k], kf[k], s_);
      acc[t][h] = s_;
    }
  }
}

/* This lane's share of the scores of octet o of a tile (tokens 8 o ..; nv valid, noct octets): dequantized
   keys dotted with q, reduced over the LPS lanes of a row, scaled and written raw (log2 units) to the warp's
   pbuf [tt][HC]; their max per head into tmax. kg holds the key group folded last (gi_prev). */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_score_octet(const kv_attn_params &p, const kv_simt_cta &c, int lane,
                                                    const uint8_t *stg, float *pbuf, bool kpage_q, int o, int noct,
                                                    int nv, const float (&qf)[HC][8], int &gi_prev,
                                                    kv_simt_kgroup<HC> &kg, float (&tmax)[HC]) {
  constexpr int LPS = D / 8;
  const int lp = lane % LPS;
  const int oc = o < noct ? o : noct - 1;
  const int tok0 = oc * 8;
  float acc[8][HC];
  float fac_lo = 1.0f, fac_hi = 1.0f; /* score = reduced * fac (per token parity for 2-bit) */
  if (kpage_q && !c.kcb) {
    const int gi = c.NGK > 1 ? tok0 / p.kg : 0;
    if (gi != gi_prev) {
      gi_prev = gi;
      kv_simt_key_group<D, HC>(c, lp, stg, gi, qf, kg);
    }
    if (c.kbits == 2) {
      fac_lo = 16.0f;
      fac_hi = 4.0f;
      kv_simt_key_uniform<D, HC, 2>(c, lp, stg, tok0, kg, acc);
    } else {
      fac_lo = fac_hi = 16.0f;
      kv_simt_key_uniform<D, HC, 4>(c, lp, stg, tok0, kg, acc);
    }
  } else if (kpage_q) {
    kv_simt_key_codebook<D, HC>(p, c, lp, stg, tok0, qf, acc);
  } else {
    kv_simt_key_f16<D, HC>(c, lp, stg, tok0, qf, acc);
  }
  float r[HC];
  kv_reduce8<HC, LPS>(acc, r, lane);
  const int idx = lp / (LPS / 8);
  const bool valid = o < noct && tok0 + idx < nv;
  const float fac = (idx & 1) ? fac_hi : fac_lo;
  /* raw scores (log2 units) to the warp's buffer; exp2 in one pass (kv_simt_softmax) */
#pragma unroll
  for (int h = 0; h < HC; h++) {
    const float sv = valid ? r[h] * fac : -INFINITY;
    tmax[h] = fmaxf(tmax[h], sv);
    if (o < noct && (lp % (LPS / 8)) == 0) pbuf[(o * 8 + idx) * HC + h] = sv;
  }
}

/* One online-softmax step over a tile: the new max per head (tmax, over the warp), the tile's scores in
   pbuf turned to probabilities, the sums and accumulators rescaled. */
template <int HC>
__device__ __forceinline__ void kv_simt_softmax(int lane, float *pbuf, int tt, float (&tmax)[HC],
                                                kv_simt_state<HC> &st) {
  float corr[HC];
  bool rescale = false;
#pragma unroll
  for (int h = 0; h < HC; h++) {
    float tm = tmax[h];
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, off));
    const float mn = fmaxf(st.m[h], tm);
    corr[h] = exp2f(st.m[h] - mn);
    rescale |= mn != st.m[h];
    st.m[h] = mn;
    st.lsum[h] *= corr[h];
  }
  __syncwarp();
  for (int t = lane; t < tt; t += 32) {
#pragma unroll
    for (int h = 0; h < HC; h++) {
      const float pv = exp2f(pbuf[t * HC + h] - st.m[h]);
      st.lsum[h] += pv;
      pbuf[t * HC + h] = pv;
    }
  }
  if (rescale) { /* m is warp-uniform, so is the branch */
#pragma unroll
    for (int h = 0; h < HC; h++) {
      st.S[h] *= corr[h];
      st.Z[h] *= corr[h];
#pragma unroll
      for (int j = 0; j < 8; j++) st.A[j][h] *= corr[h];
    }
  }
}

/* Token t's probabilities times its value group's scale (ps), into S and Z (uniform values). */
template <int HC>
__device__ __forceinline__ void kv_simt_value_params(const kv_simt_cta &c, const uint8_t *vpar, const float *pbuf,
                                                     int t, int gcol, float (&ps)[HC], kv_simt_state<HC> &st) {
  const uint32_t sz = *(const uint32_t *)(vpar + (t * c.vgpr + gcol) * 4);
  const float s_ = kv_h2f(sz & 0xffffu), z_ = kv_h2f(sz >> 16);
#pragma unroll
  for (int h = 0; h < HC; h++) {
    const float pv = pbuf[t * HC + h];
    ps[h] = pv * s_;
    st.S[h] += ps[h];
    st.Z[h] = fmaf(pv, z_, st.Z[h]);
  }
}

/* The tile's nv uniform 2- or 4-bit value rows, weighted by pbuf, into this lane's accumulators. */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_values_uniform(const kv_attn_params &p, const kv_simt_cta &c, int lane,
                                                       const uint8_t *stg, const float *pbuf, int nv,
                                                       kv_simt_state<HC> &st) {
  constexpr int SPW = 32 / (D / 8);
  const int lp = lane % (D / 8), hsub = lane / (D / 8);
  const uint8_t *vc = stg + c.kbytes, *vpar = stg + c.kbytes + c.vcbytes;
  const int gcol = (8 * lp) / p.vg;
  if (c.vbits == 2) {
    const int wpr = D / 16;
#pragma unroll 2
    for (int t = hsub; t < nv; t += SPW) {
      uint32_t w = *(const uint32_t *)(vc + (t * wpr + (lp >> 1)) * 4);
      w = (lp & 1) ? (w >> 16) : w;
      float ps[HC];
      kv_simt_value_params(c, vpar, pbuf, t, gcol, ps, st);
      float f[8];
      kv_unpack2x8(w, c.M19, c.M21, c.ONE, f);
#pragma unroll
      for (int j = 0; j < 8; j++)
#pragma unroll
        for (int h = 0; h < HC; h++) st.A[j][h] = fmaf(ps[h], f[j], st.A[j][h]);
    }
  } else {
    const int wpr = D / 8;
#pragma unroll 2
    for (int t = hsub; t < nv; t += SPW) {
      const uint32_t w = *(const uint32_t *)(vc + (t * wpr + lp) * 4);
      float ps[HC];
      kv_simt_value_params(c, vpar, pbuf, t, gcol, ps, st);
      float f[8];
      kv_unpack4x8(w, c.M4, c.ONE, f);
#pragma unroll
      for (int j = 0; j < 8; j++)
#pragma unroll
        for (int h = 0; h < HC; h++) st.A[j][h] = fmaf(ps[h], f[j], st.A[j][h]);
    }
  }
}

/* The tile's nv codebook value rows (a centroid lookup per code), weighted by pbuf, into the accumulators. */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_values_codebook(const kv_attn_params &p, const kv_simt_cta &c, int lane,
                                                        const uint8_t *stg, const float *pbuf, int nv,
                                                        kv_simt_state<HC> &st) {
  constexpr int SPW = 32 / (D / 8);
  const int lp = lane % (D / 8), hsub = lane / (D / 8), vbits = c.vbits;
  const uint8_t *vc = stg + c.kbytes, *vpar = stg + c.kbytes + c.vcbytes;
  const int gcol = (8 * lp) / p.vg, nc = 1 << vbits, cpw = 32 / vbits, wpr = D / cpw;
  const int widx = (8 * lp) / cpw, sh0 = ((8 * lp) % cpw) * vbits;
  for (int t = hsub; t < nv; t += SPW) {
    const uint32_t w = *(const uint32_t *)(vc + (t * wpr + widx) * 4);
    const uint16_t *cent = (const uint16_t *)(vpar + (t * c.vgpr + gcol) * c.veb);
    float pv[HC];
#pragma unroll
    for (int h = 0; h < HC; h++) pv[h] = pbuf[t * HC + h];
#pragma unroll
    for (int j = 0; j < 8; j++) {
      const float vv = kv_h2f(cent[(w >> (sh0 + j * vbits)) & (uint32_t)(nc - 1)]);
#pragma unroll
      for (int h = 0; h < HC; h++) st.A[j][h] = fmaf(pv[h], vv, st.A[j][h]);
    }
  }
}

/* The tile's nv fp16 value rows (16-bit pages or the window), weighted by pbuf, into the accumulators'
   domain (vmode). */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_values_f16(const kv_simt_cta &c, int lane, const uint8_t *stg,
                                                   const float *pbuf, bool page, int nv, kv_simt_state<HC> &st) {
  constexpr int SPW = 32 / (D / 8);
  const int lp = lane % (D / 8), hsub = lane / (D / 8);
  const uint8_t *v16 = stg + (page ? c.kbytes : c.TTW * D * 2);
  const float flo = c.vmode == 2 ? 1.0f : 0.0625f, fhi = c.vmode == 0 ? 0.25f : flo;
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
      for (int j = 0; j < 8; j++) st.A[j][h] = fmaf((j & 1) ? phi : plo, vf[j], st.A[j][h]);
    }
  }
}

/* Merges the lanes' accumulators, then the warps' states (through shared memory, the rings' space), and
   writes the CTA's outputs or its split's partials. */
template <int D, int HC>
__device__ __forceinline__ void kv_simt_finish(const kv_attn_params &p, const kv_simt_cta &c, int warp, int lane,
                                               kv_simt_state<HC> &st, uint8_t *smem) {
  constexpr int LPS = D / 8;
  const int lp = lane % LPS, hsub = lane / LPS;
#pragma unroll
  for (int off = LPS; off < 32; off <<= 1)
#pragma unroll
    for (int h = 0; h < HC; h++) {
      st.S[h] += __shfl_xor_sync(KV_FULL, st.S[h], off);
      st.Z[h] += __shfl_xor_sync(KV_FULL, st.Z[h], off);
#pragma unroll
      for (int j = 0; j < 8; j++) st.A[j][h] += __shfl_xor_sync(KV_FULL, st.A[j][h], off);
    }
#pragma unroll
  for (int h = 0; h < HC; h++)
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) st.lsum[h] += __shfl_xor_sync(KV_FULL, st.lsum[h], off);

  __syncthreads();           /* every warp is done with its ring: reuse it for the merge */
  float *cw = (float *)smem; /* [warps][HC][D + 2] */
  {
    const float ilo = c.vmode == 2 ? 1.0f : 16.0f, ihi = c.vmode == 0 ? 4.0f : ilo;
    if (hsub == 0) {
#pragma unroll
      for (int h = 0; h < HC; h++) {
        float *row = cw + (warp * HC + h) * (D + 2);
        if (lp == 0) {
          row[0] = st.m[h];
          row[1] = st.lsum[h];
        }
#pragma unroll
        for (int j = 0; j < 8; j++) row[2 + 8 * lp + j] = (st.A[j][h] - st.S[h]) * ((j & 1) ? ihi : ilo) + st.Z[h];
      }
    }
  }
  __syncthreads();
  kv_merge_warps<D, KV_WARPS>(p, cw, HC, c.nq, (int64_t)c.b * p.qh + c.qh0);
}

/* ---------------------------------------------------------------- the kernel ------------- */

template <int D, int HC>
static __global__ void __launch_bounds__(KV_THREADS, HC == 4 ? 2 : 4)
    k_cache_attend(const __grid_constant__ kv_attn_params p) {
  constexpr int LPS = D / 8, SPW = 32 / LPS;
  extern __shared__ __align__(16) uint8_t smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int hsub = lane / LPS;
  const kv_cta cta = kv_cta_of(p);
  if (cta.a0 >= cta.si.len) {
    kv_attn_cta_done<D>(p);
    return;
  }
  kv_simt_cta c;
  kv_simt_cta_init<D, HC>(p, cta, warp, c);
  float qf[HC][8];
  kv_simt_load_q<D, HC>(p, c, cta.split, warp, lane, qf);
  uint8_t *ring = smem + (size_t)warp * p.nst * p.stage_bytes;
  float *pbuf = (float *)(smem + (size_t)KV_WARPS * p.nst * p.stage_bytes) + warp * KV_TT_MAX * HC; /* [tt][HC] */
  const uint32_t ring_s = (uint32_t)__cvta_generic_to_shared(ring);
  kv_simt_cta_seq<D, HC>(p, cta, c);

  kv_simt_state<HC> st;
  kv_simt_state_init(st);
  for (int s = 0; s < p.nst - 1; s++) kv_simt_issue_tile<D>(p, c, warp, lane, ring_s, s);
  for (int i = 0; i < c.my_tiles; i++) {
    kv_simt_issue_tile<D>(p, c, warp, lane, ring_s, i + p.nst - 1);
    kv_wait(p.nst - 1);
    __syncwarp();
    const uint8_t *stg = ring + (size_t)(i % p.nst) * p.stage_bytes;
    const int g = warp + i * KV_WARPS;
    const bool page = g < c.npt;
    const int t0 = page ? c.a0 + g * c.TT : c.ws0 + (g - c.npt) * c.TTW;
    const int tt = page ? c.TT : c.TTW;
    const int nv = page ? min(c.TT, c.pend - t0) : min(c.TTW, c.e0 - t0);
    const int noct = tt / 8, ops = (noct + SPW - 1) / SPW;

    float tmax[HC];
#pragma unroll
    for (int h = 0; h < HC; h++) tmax[h] = -INFINITY;
    {
      int gi_prev = -1;
      kv_simt_kgroup<HC> kg;
      kv_simt_kgroup_init(kg);
      const bool kpage_q = page && c.kq;
#pragma unroll 1
      for (int oi = 0; oi < ops; oi++) /* ops is uniform across the warp */
        kv_simt_score_octet<D, HC>(p, c, lane, stg, pbuf, kpage_q, hsub * ops + oi, noct, nv, qf, gi_prev, kg, tmax);
    }
    kv_simt_softmax<HC>(lane, pbuf, tt, tmax, st);
    __syncwarp();
    if (page && c.vq && !c.vcb)
      kv_simt_values_uniform<D, HC>(p, c, lane, stg, pbuf, nv, st);
    else if (page && c.vcb)
      kv_simt_values_codebook<D, HC>(p, c, lane, stg, pbuf, nv, st);
    else
      kv_simt_values_f16<D, HC>(c, lane, stg, pbuf, page, nv, st);
    __syncwarp();
  }
  kv_wait(0);
  kv_simt_finish<D, HC>(p, c, warp, lane, st, smem);
  kv_attn_cta_done<D>(p);
}

#endif /* KIVI_ATTENTION_SIMT_CUH */
