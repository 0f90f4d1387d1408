/*
 * attention_mma.cuh — the fused decode attention on tensor cores, for caches in the tensor-core
 * page layout (kivi_format.h: uniform 2-bit K, uniform or codebook 2-bit V, head_dim 64 or 128).
 * Instantiated by attention_mma_uniform.cu and attention_mma_codebook.cu; attention.cu launches it with
 * the same grid, splits and merge as k_cache_attend.
 *
 * A CTA of 4 warps takes one (batch entry, kv head, split, chunk of up to 8 query heads); warp w
 * takes the 32-token page tiles w, w + 4, ... of the split, then its 16-token window tiles, with its
 * own online softmax; the warps merge at the end. Each warp streams its tiles (key codes and params,
 * value codes, scales and zeros) through its own ring of NST cp.async stages.
 *
 * Keys, q.k = sum_c (q_c s_c) code_tc + sum_c q_c z_c per key group:
 *   mma m16n8k32 s8 x u8 -> s32, rows = query heads, k = channels, n = tokens.
 *   A = q_c s_c as three int8 planes (hi, mid, lo: each the rounding residual of the one before x 254:
 *   keys with outlier channels need the small channels' terms to ~2^-23 of the largest) with one fp32 scale
 *   per (head, group): rebuilt when the key group changes, each lane building one fragment register
 *   (4 channels) of every head and the owners reading theirs back from the warp's slice of shared memory.
 *   The hi plane fills rows 0-7 and the mid plane rows 8-15 of one A, so one MMA gives both (the
 *   rows of a fragment hold at most 8 heads); the lo plane takes a second MMA.
 *   B = codes straight from the packed word: (w >> 2i) & 0x03030303 is 4 codes, one per byte, of
 *   consecutive channels (kivi_mma_key_slot), so each lane reads its params and q with one LDS.128.
 *   s32 accumulators hold hi, mid and lo sums exactly, and so does (254 hi + mid) 254 + lo (|hi| <= 64
 *   keeps it below 2^31 for D <= 128): the score is one I2F and one FFMA away.
 * One query head a KV head (T1): with one head the MMA above uses one row of each 8-row half, so the
 *   key MMA turns around: rows = 16 tokens, columns 0-2 = the hi, mid and lo planes (B, s8; columns 3-7
 *   zero), A = the codes (u8), the same 4-consecutive-channel bytes. 8 MMAs a tile instead of 32; the
 *   lo column comes over from the next lane with one shuffle a row pair, lanes (g, 0) hold the 32
 *   scores (rows g, g + 8 of each m-tile) and two shuffles a run hand p to the value MMAs' B layout.
 *   The softmax state is the warp's (max shared, sums per lane until the window tiles).
 * Values, O^T = V^T P:
 *   mma m16n8k16 f16 -> f32, rows = channels, k = tokens, n = query heads.
 *   A = codes as fp16 subnormals: each lane reads its own D / 32 words a run (kivi_mma_value_code), in
 *   which slot k of each half (k = 0..3, or 4..7 after one shift by 8) is exactly a code pair of one
 *   fragment register, code x 2^(2k - 24) as a half: one LOP3 per two codes. The slots of a row share
 *   k, so the 2^(24 - 2k) comes back per row at the end.
 *   B = p_t s_t in fp16 (per token and value group; s_t pairs are stored in pair order, so one
 *   8-byte load gives both B registers). The zeros go through one more MMA: Z[g][h] = sum_t z p.
 * Token order: a 16-token run is worked as pairs (t, t + 8), t = 0..7, so that the thread holding
 * a score after the key MMA is the thread that needs it as a B operand of the value MMA.
 * Window tokens (fp16) use the same fragments: fp16 MMAs with q split into hi + lo halves.
 * Codebook values (VK 1): a 2-bit centroid is c0 + (c1 - c0) b0 + (c2 - c0) b1 + (c3 - c2 - c1 + c0) b0 b1
 *   in the code's bits b0, b1, so p.v is three MMAs over 0/1 planes of the same words (w & mask, w & mask'
 *   and (w & (w >> 1)) & mask, each bit an fp16 subnormal at the slot's scale, as the uniform codes) with
 *   B = p (c1 - c0), p (c2 - c0) / 2 and p (c3 - c2 - c1 + c0) per token, plus the c0 plane through the
 *   zero MMA. The differences are formed in fp16 from centroids scaled by 1/4 (exact: no overflow for any
 *   finite fp16 centroids), and the rows get the 4 back with their slot scale.
 * Key groups of 32, 64 or 128 tokens (a tile never straddles two); value groups VG of 32, 64 or 128.
 * Precision: key scores carry ~2^-22 of max |q_c s_c| per term (three int8 planes); p s rounds to fp16
 * (2^-11 relative, random across tokens); everything else accumulates in fp32.
 */
#ifndef KIVI_ATTENTION_MMA_CUH
#define KIVI_ATTENTION_MMA_CUH

#include "attention.cuh"
#include "attention_mma_keys16.cuh"
#include "attention_mma_parts.cuh"

/* ---------------------------------------------------------------- a CTA's phases --------- */

/* The CTA's query rows to shared memory (log2 units, [rows][D], rows past nq zero); a checked batch's first
   split checks them. */
template <int D>
__device__ __forceinline__ void kv_mma_load_q(const kv_attn_params &p, const kv_cta &cta, int qh0, int nq, float *qf,
                                              int rows = KV_MMA_HEADS) {
  const int b = cta.b;
  const bool qcheck = p.cdev && cta.split == 0;
  for (int i = threadIdx.x; i < rows * D; i += KV_MMA_THREADS) {
    const int h = i / D;
    qf[i] = h < nq ? kv_q_at(p, b, (int64_t)(qh0 + h) * D + i % D,
                             kv_row_at(p, (int64_t)b * p.qh + qh0 + h) * D + i % D, qcheck)
                   : 0.0f;
  }
  __syncthreads();
}

/* The key fragments of the key group at the head of stage stg: q s as three int8 planes with one scale
   per head (each lane builds one fragment register of every head, the owners read theirs back from the
   warp's slice of shared memory: A {hi, mid, hi, mid} and {lo, 0, lo, 0}, or with T1 the B fragments),
   and the score's scale ksc and offset kqz of this lane's head. */
template <int D, bool T1>
__device__ __forceinline__ void kv_mma_key_frags(const uint8_t *stg, const uint8_t *smem, uint32_t *abuf, int nq,
                                                 bool a_writer, const kv_mma_lane &L, uint4 (&ahm)[T1 ? 1 : D / 32],
                                                 uint4 (&alo)[T1 ? 1 : D / 32], uint32_t (&bq)[T1 ? D / 32 : 1][2],
                                                 float &ksc, float &kqz) {
  constexpr int NCH = D / 32;
  const int gid = L.gid;
  const uint32_t o_kpar = L.o_kpar, o_q = L.o_q, o_aw = L.o_aw, o_ar = L.o_ar;
  /* lane L builds fragment register (i, reg) of the owner quad lane tig_o: 4 channels, 3 planes */
  float sc[4], zc[4];
  {
    const uint4 sz4 = *(const uint4 *)(stg + o_kpar);
    const uint32_t sz[4] = {sz4.x, sz4.y, sz4.z, sz4.w};
#pragma unroll
    for (int b2 = 0; b2 < 4; b2++) {
      sc[b2] = kv_h2f(sz[b2] & 0xffffu);
      zc[b2] = kv_h2f(sz[b2] >> 16);
    }
  }
  __syncwarp(); /* every lane has read the previous group's fragments */
  for (int h = 0; h < nq; h++) {
    float qs[4], mx = 0.0f, qz = 0.0f;
    const float4 q4 = *(const float4 *)(smem + o_q + 4 * h * D);
    const float qv4[4] = {q4.x, q4.y, q4.z, q4.w};
#pragma unroll
    for (int b2 = 0; b2 < 4; b2++) {
      const float qv = qv4[b2];
      qs[b2] = qv * sc[b2];
      mx = fmaxf(mx, fabsf(qs[b2]));
      qz = fmaf(qv, zc[b2], qz);
    }
    /* mx >= 0 and never NaN (fmaxf drops NaN), so its bits order as its values: one REDUX */
    mx = __uint_as_float(__reduce_max_sync(KV_FULL, __float_as_uint(mx)));
#pragma unroll
    for (int o2 = 4 * NCH; o2 >= 1; o2 >>= 1) qz += __shfl_xor_sync(KV_FULL, qz, o2);
    /* x = q s inv with inv a power of two, |x| < 64 (mx (128 / 127) < 2^(E + 1), inv = 2^(5 - E)):
       no division and no branch. The exponent is clamped so that inv stays finite (mx 0: every
       x is 0) */
    const uint32_t ex = max(__float_as_uint(mx * (128.0f / 127.0f)) & 0x7f800000u, 7u << 23);
    const float inv = __uint_as_float((259u << 23) - ex);
    /* x + 1.5 * 2^23 rounds x to an integer held in the low mantissa bits: its low byte is int8 */
    constexpr float MAG = 12582912.0f;
    /* three planes: x = hi + mid / 254 + lo / 254^2, each rounded in turn */
    uint32_t hb[4], mb[4], lb[4];
#pragma unroll
    for (int b2 = 0; b2 < 4; b2++) {
      const float x = qs[b2] * inv;
      const float t = x + MAG;
      const float r1 = (x - (t - MAG)) * 254.0f;
      const float t1 = r1 + MAG;
      hb[b2] = __float_as_uint(t);
      mb[b2] = __float_as_uint(t1);
      lb[b2] = __float_as_uint(fmaf(r1 - (t1 - MAG), 254.0f, MAG));
    }
    auto pack = [](const uint32_t(&v)[4]) {
      return __byte_perm(__byte_perm(v[0], v[1], 0x0040), __byte_perm(v[2], v[3], 0x0040), 0x5410);
    };
    if (a_writer) {
      uint32_t *hs = (uint32_t *)((uint8_t *)abuf + o_aw) + h * kv_mma_aw(D);
      if constexpr (T1) {
        hs[0] = pack(hb);
        hs[8 * NCH] = pack(mb);
        hs[16 * NCH] = pack(lb);
      } else {
        hs[0] = pack(hb);
        hs[1] = pack(mb);
        hs[4 * NCH] = pack(lb);
      }
    }
    if (T1 || gid == h) {
      ksc = __uint_as_float(ex - (5u << 23)) * (1.0f / (254.0f * 254.0f)); /* 1 / (254^2 inv) */
      kqz = qz;
    }
  }
  __syncwarp();
  if constexpr (T1) {
    if (gid < 3) { /* columns 3-7 keep zeros */
      const uint4 *mine = (const uint4 *)((const uint8_t *)abuf + o_ar);
#pragma unroll
      for (int i = 0; i < NCH / 2; i++) {
        const uint4 w = mine[i];
        bq[2 * i][0] = w.x, bq[2 * i][1] = w.y, bq[2 * i + 1][0] = w.z, bq[2 * i + 1][1] = w.w;
      }
    }
  } else if (gid < nq) { /* the rows of heads past nq keep zeros */
    const uint4 *mine = (const uint4 *)((const uint8_t *)abuf + o_ar);
#pragma unroll
    for (int i = 0; i < NCH; i++) {
      ahm[i] = mine[i];
      alo[i] = mine[NCH + i];
    }
  }
}

/* T1 (one query head): the scores of a page tile with the tokens as rows, their online-softmax step, and p
   handed to the value MMAs' B layout (s[2 r][0], s[2 r + 1][0]: fp16 pairs of run r). */
template <int D, int NMT>
__device__ __forceinline__ void kv_mma_scores_t1(const uint8_t *stg, const kv_mma_lane &L,
                                                 const uint32_t (&bq)[D / 32][2], float ksc, float kqz, float &m,
                                                 float &l, float (&o)[NMT][4], float (&zacc)[4], float (&s)[4][2]) {
  constexpr int NCH = D / 32;
  const int tig = L.tig;
  const uint32_t o_kw = L.o_kw;
  /* one query head: tokens are the rows (m-tile r, row g: token 16 r + g), the hi / mid / lo planes
     columns 0-2 (B); A = the codes of a lane's two tokens, 4 consecutive channels a register */
  auto ka = [&](const uint32_t(&w)[2], int i, bool second) {
    if constexpr (D == 128)
      return (w[second] >> (2 * i)) & 0x03030303u;
    else
      return (w[0] >> (4 * i + (second ? 2 : 0))) & 0x03030303u;
  };
#pragma unroll
  for (int r = 0; r < 2; r++) {
    uint32_t kw[2][2]; /* [row half][word] */
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      const uint8_t *kr = stg + o_kw + (16 * r + 8 * hh) * (D / 4);
      if constexpr (D == 128) {
        const uint2 u = *(const uint2 *)kr;
        kw[hh][0] = u.x;
        kw[hh][1] = u.y;
      } else {
        kw[hh][0] = *(const uint32_t *)kr;
      }
    }
    int acc[4] = {0, 0, 0, 0}; /* lane (g, 0): hi, mid of rows g, g + 8; lane (g, 1): lo of them */
#pragma unroll
    for (int i = 0; i < NCH; i++)
      kv_mma_u8s8(acc, ka(kw[0], i, false), ka(kw[1], i, false), ka(kw[0], i, true), ka(kw[1], i, true), bq[i][0],
                  bq[i][1]);
    const int lo0 = __shfl_xor_sync(KV_FULL, acc[0], 1), lo8 = __shfl_xor_sync(KV_FULL, acc[2], 1);
    /* |hi sums| <= 64 x 3 x D, |mid|, |lo| sums <= 127 x 3 x D: below 2^31 at D 128 */
    s[r][0] = tig == 0 ? fmaf((float)((254 * acc[0] + acc[1]) * 254 + lo0), ksc, kqz) : -INFINITY;
    s[r][1] = tig == 0 ? fmaf((float)((254 * acc[2] + acc[3]) * 254 + lo8), ksc, kqz) : -INFINITY;
  }
  /* online softmax over the 32 scores (lanes (g, 0)): max over the rows, shared by the warp */
  float tm = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
  tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, 4));
  tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, 8));
  tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, 16));
  const float mn = fmaxf(m, __shfl_sync(KV_FULL, tm, 0));
  const float corr = kv_ex2(m - mn);
  m = mn;
#pragma unroll
  for (int r = 0; r < 2; r++) {
    s[r][0] = kv_ex2(s[r][0] - mn);
    s[r][1] = kv_ex2(s[r][1] - mn);
  }
  l = fmaf(l, corr, (s[0][0] + s[0][1]) + (s[1][0] + s[1][1]));
  if (corr != 1.0f) kv_mma_rescale(o, zacc, corr, corr); /* the same in every lane */
  /* B of the value MMAs as the other orientation lays it out: run r, register 0 = tokens (2 tig,
     2 tig + 8) = rows of lane (2 tig, 0), register 1 = (2 tig + 1, 2 tig + 9) = lane (2 tig + 1, 0) */
  const uint32_t ph[2] = {kv_pack_h2(s[0][0], s[0][1]), kv_pack_h2(s[1][0], s[1][1])};
#pragma unroll
  for (int r = 0; r < 2; r++) {
    s[2 * r][0] = __uint_as_float(__shfl_sync(KV_FULL, ph[r], 8 * tig));
    s[2 * r + 1][0] = __uint_as_float(__shfl_sync(KV_FULL, ph[r], 8 * tig + 4));
  }
}

/* The scores of a page tile (4 n-tiles of 8 tokens, rows = heads), their online-softmax step, and p as
   fp16 pairs (s[2 r][0], s[2 r + 1][0]: run r). */
template <int D, int NMT>
__device__ __forceinline__ void kv_mma_scores(const uint8_t *stg, const kv_mma_lane &L, const uint4 (&ahm)[D / 32],
                                              const uint4 (&alo)[D / 32], float ksc, float kqz, int rem, float &m,
                                              float &l, float (&o)[NMT][4], float (&zacc)[4], float (&s)[4][2]) {
  constexpr int NCH = D / 32;
  /* scores: 4 n-tiles of 8 tokens; n-tile j, column n is token 16 (j / 2) + (j % 2) + 2 (n / 2) + 8 (n % 2) */
  {
    uint32_t kw[4][2];
    kv_mma_key_words<D>(stg, L.o_kw, kw);
    /* B of chunk i: 4 codes a byte, (word >> 2 slot) & 0x03030303 (see the A-building roles) */
    auto kb = [&](int j, int i, uint32_t &b0, uint32_t &b1) {
      if constexpr (D == 128) {
        b0 = (kw[j][0] >> (2 * i)) & 0x03030303u;
        b1 = (kw[j][1] >> (2 * i)) & 0x03030303u;
      } else {
        b0 = (kw[j][0] >> (4 * i)) & 0x03030303u;
        b1 = (kw[j][0] >> (4 * i + 2)) & 0x03030303u;
      }
    };
#pragma unroll
    for (int j = 0; j < 4; j++) {
      int acc[4] = {0, 0, 0, 0}, acl[4] = {0, 0, 0, 0}; /* acc: rows 0-7 hi, rows 8-15 mid */
      uint32_t b0, b1;
#pragma unroll
      for (int i = 0; i < NCH; i++) {
        kb(j, i, b0, b1);
        kv_mma_s8u8(acc, ahm[i], b0, b1);
        kv_mma_s8u8(acl, alo[i], b0, b1);
      }
      /* |hi sums| <= 64 x 3 x D, |mid|, |lo| sums <= 127 x 3 x D: below 2^31 at D 128 */
      s[j][0] = fmaf((float)((254 * acc[0] + acc[2]) * 254 + acl[0]), ksc, kqz);
      s[j][1] = fmaf((float)((254 * acc[1] + acc[3]) * 254 + acl[1]), ksc, kqz);
    }
  }
  kv_mma_softmax_p(m, l, o, zacc, s, L.tig, rem);
}

/* The values of a page tile, two runs of 16 tokens, into O^T (p s or the codebook's bit planes) and Z. */
template <int D, int VG, int VK, int NMT>
__device__ __forceinline__ void kv_mma_values(const uint8_t *stg, const kv_mma_lane &L, const float (&s)[4][2],
                                              float (&o)[NMT][4], float (&zacc)[4]) {
  constexpr int ngv = D / VG, VPB = ngv * 64;
  const int gid = L.gid;
  const uint32_t o_vz = L.o_vz, o_vw = L.o_vw, o_vs = L.o_vs;
  /* values: two runs of 16 tokens */
#pragma unroll
  for (int r = 0; r < 2; r++) {
    /* B = p (fp16 pairs), as packed above */
    const uint32_t ph0 = __float_as_uint(s[2 * r][0]), ph1 = __float_as_uint(s[2 * r + 1][0]);
    {
      uint2 zz = make_uint2(0u, 0u);
      if (gid < ngv) zz = *(const uint2 *)(stg + o_vz + 32 * r);
      kv_mma_f16(zacc, zz.x, 0u, zz.y, 0u, ph0, ph1);
    }
    /* this lane's D / 32 words of the run: word q holds m-tiles 2q and 2q + 1 (kivi_mma_value_code) */
    uint32_t vw[D / 32];
    kv_mma_value_words<D>(stg, o_vw, r, vw);
    if constexpr (VK == 0) {
      uint32_t pb[ngv][2]; /* B = p s per value group */
#pragma unroll
      for (int gg = 0; gg < ngv; gg++) {
        const uint2 ss = *(const uint2 *)(stg + o_vs + gg * 64 + 32 * r);
        pb[gg][0] = kv_h2u(__hmul2(kv_u2h(ph0), kv_u2h(ss.x)));
        pb[gg][1] = kv_h2u(__hmul2(kv_u2h(ph1), kv_u2h(ss.y)));
      }
#pragma unroll
      for (int q = 0; q < NMT / 2; q++) {
        const uint32_t w = vw[q], w8 = w >> 8;
        kv_mma_f16(o[2 * q], w & 0x00030003u, w & 0x000c000cu, w8 & 0x00030003u, w8 & 0x000c000cu, pb[(32 * q) / VG][0],
                   pb[(32 * q) / VG][1]);
        kv_mma_f16(o[2 * q + 1], w & 0x00300030u, w & 0x00c000c0u, w8 & 0x00300030u, w8 & 0x00c000c0u,
                   pb[(32 * q + 16) / VG][0], pb[(32 * q + 16) / VG][1]);
      }
    } else {
      /* B of the three bit planes per value group: p (c1 - c0), p (c2 - c0) / 2, p (c3 - c2 - c1 + c0),
         all / 4 (see above) */
      uint32_t b0p[ngv][2], b1p[ngv][2], b2p[ngv][2];
      const __half2 q25 = __float2half2_rn(0.25f), h05 = __float2half2_rn(0.5f);
      const uint32_t pr[2] = {ph0, ph1};
#pragma unroll
      for (int gg = 0; gg < ngv; gg++) {
        uint2 c[4];
#pragma unroll
        for (int j = 0; j < 4; j++) c[j] = *(const uint2 *)(stg + o_vs + j * VPB + gg * 64 + 32 * r);
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const __half2 c0 = kv_u2h(e ? c[0].y : c[0].x), c1 = kv_u2h(e ? c[1].y : c[1].x);
          const __half2 c2 = kv_u2h(e ? c[2].y : c[2].x), c3 = kv_u2h(e ? c[3].y : c[3].x);
          const __half2 c0q = __hmul2(c0, q25), c2q = __hmul2(c2, q25);
          const __half2 d1 = __hfma2(c1, q25, __hneg2(c0q)), d2 = __hfma2(c2, q25, __hneg2(c0q));
          const __half2 d3 = __hsub2(__hfma2(c3, q25, __hneg2(c2q)), d1);
          const __half2 pv = kv_u2h(pr[e]);
          b0p[gg][e] = kv_h2u(__hmul2(pv, d1));
          b1p[gg][e] = kv_h2u(__hmul2(__hmul2(pv, h05), d2));
          b2p[gg][e] = kv_h2u(__hmul2(pv, d3));
        }
      }
#pragma unroll
      for (int q = 0; q < NMT / 2; q++) {
        const uint32_t w = vw[q], w8 = w >> 8, ww = w & (w >> 1), ww8 = ww >> 8;
        const int g0 = (32 * q) / VG, g1 = (32 * q + 16) / VG;
        /* m-tile 2q: slots 0 (a0, a2) and 1 (a1, a3); m-tile 2q + 1: slots 2 and 3 */
        kv_mma_f16(o[2 * q], w & 0x00010001u, w & 0x00040004u, w8 & 0x00010001u, w8 & 0x00040004u, b0p[g0][0],
                   b0p[g0][1]);
        kv_mma_f16(o[2 * q], w & 0x00020002u, w & 0x00080008u, w8 & 0x00020002u, w8 & 0x00080008u, b1p[g0][0],
                   b1p[g0][1]);
        kv_mma_f16(o[2 * q], ww & 0x00010001u, ww & 0x00040004u, ww8 & 0x00010001u, ww8 & 0x00040004u, b2p[g0][0],
                   b2p[g0][1]);
        kv_mma_f16(o[2 * q + 1], w & 0x00100010u, w & 0x00400040u, w8 & 0x00100010u, w8 & 0x00400040u, b0p[g1][0],
                   b0p[g1][1]);
        kv_mma_f16(o[2 * q + 1], w & 0x00200020u, w & 0x00800080u, w8 & 0x00200020u, w8 & 0x00800080u, b1p[g1][0],
                   b1p[g1][1]);
        kv_mma_f16(o[2 * q + 1], ww & 0x00100010u, ww & 0x00400040u, ww8 & 0x00100010u, ww8 & 0x00400040u, b2p[g1][0],
                   b2p[g1][1]);
      }
    }
  }
}

/* A window tile (16 fp16 tokens from t0, valid below e0; this lane's row sees those below erow): fp16 MMAs
   with q split into hi + lo halves, the online-softmax step, and V^T p into O^T. */
template <int D, int NMT>
__device__ __forceinline__ void kv_mma_window_tile(const kv_attn_params &p, int hkv, int64_t wbase, int t0, int e0,
                                                   int erow, const float *qf, const kv_mma_lane &L, float &m, float &l,
                                                   float (&o)[NMT][4], float (&zacc)[4]) {
  const int gid = L.gid, tig = L.tig;
  auto row = [&](int t, const uint16_t *win) { return win + ((wbase + t % p.W) * p.kvh + hkv) * (int64_t)D; };
  float s[4][2];
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const int t = t0 + j + 2 * (gid >> 1) + 8 * (gid & 1);
    const bool ok = t < e0;
    const uint32_t *kr = (const uint32_t *)row(ok ? t : t0, p.kwin);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      const float2 x0 = *(const float2 *)(qf + gid * D + 16 * kk + 2 * tig);
      const float2 x1 = *(const float2 *)(qf + gid * D + 16 * kk + 2 * tig + 8);
      const __half2 h0 = __floats2half2_rn(x0.x, x0.y), h1 = __floats2half2_rn(x1.x, x1.y);
      const float2 f0 = __half22float2(h0), f1 = __half22float2(h1);
      const uint32_t l0 = kv_pack_h2(x0.x - f0.x, x0.y - f0.y), l1 = kv_pack_h2(x1.x - f1.x, x1.y - f1.y);
      const uint32_t b0 = kr[8 * kk + tig], b1 = kr[8 * kk + tig + 4];
      kv_mma_f16(acc, kv_h2u(h0), 0u, kv_h2u(h1), 0u, b0, b1);
      kv_mma_f16(acc, l0, 0u, l1, 0u, b0, b1);
    }
    /* this lane's columns 2 tig, 2 tig + 1 are tokens t0 + j + 2 tig and + 8 */
    const int ta = t0 + j + 2 * tig;
    s[j][0] = ta < erow ? acc[0] : -INFINITY;
    s[j][1] = ta + 8 < erow ? acc[1] : -INFINITY;
    s[j + 2][0] = s[j + 2][1] = -INFINITY;
  }
  kv_mma_softmax(m, l, o, zacc, s, 1, tig);
  const uint32_t ph0 = kv_pack_h2(s[0][0], s[0][1]), ph1 = kv_pack_h2(s[1][0], s[1][1]);
  /* A = V^T: rows channels 16 mt + 2 gid (+1), k = tokens (2 tig, 2 tig + 8), (2 tig + 1, 2 tig + 9) */
  int tk[4];
  tk[0] = t0 + 2 * tig;
  tk[1] = tk[0] + 8;
  tk[2] = tk[0] + 1;
  tk[3] = tk[0] + 9;
  const uint32_t *vr[4];
  bool okk[4];
#pragma unroll
  for (int e = 0; e < 4; e++) {
    okk[e] = tk[e] < e0;
    vr[e] = (const uint32_t *)row(okk[e] ? tk[e] : t0, p.vwin);
  }
#pragma unroll
  for (int mt = 0; mt < NMT; mt++) {
    uint32_t x[4];
#pragma unroll
    for (int e = 0; e < 4; e++) x[e] = okk[e] ? vr[e][8 * mt + gid] : 0u; /* half2 (ch, ch + 1) */
    const uint32_t a0 = __byte_perm(x[0], x[1], 0x5410), a1 = __byte_perm(x[0], x[1], 0x7632);
    const uint32_t a2 = __byte_perm(x[2], x[3], 0x5410), a3 = __byte_perm(x[2], x[3], 0x7632);
    kv_mma_f16(o[mt], a0, a1, a2, a3, ph0, ph1);
  }
}

/* The warp's rows for the merge at cw [warps][8][D + 2]: max, sum and unnormalised output of each of the
   nq heads. */
template <int D, int VG, int NMT>
__device__ __forceinline__ void kv_mma_finish(float *cw, const kv_mma_lane &L, int nq, float m, float l,
                                              const float (&o)[NMT][4], const float (&zacc)[4]) {
  const int warp = L.warp, gid = L.gid, tig = L.tig;
  {
    float *mine = cw + warp * KV_MMA_HEADS * (D + 2);
    if (tig == 0 && gid < nq) {
      mine[gid * (D + 2)] = m;
      mine[gid * (D + 2) + 1] = l;
    }
#pragma unroll
    for (int mt = 0; mt < NMT; mt++) {
      const int gg = (16 * mt) / VG;
      const float z0 = __shfl_sync(KV_FULL, zacc[0], 4 * gg + tig), z1 = __shfl_sync(KV_FULL, zacc[1], 4 * gg + tig);
      const int ch = 16 * mt + 2 * gid;
      if (2 * tig < nq) {
        mine[(2 * tig) * (D + 2) + 2 + ch] = o[mt][0] + z0;
        mine[(2 * tig) * (D + 2) + 3 + ch] = o[mt][2] + z0;
      }
      if (2 * tig + 1 < nq) {
        mine[(2 * tig + 1) * (D + 2) + 2 + ch] = o[mt][1] + z1;
        mine[(2 * tig + 1) * (D + 2) + 3 + ch] = o[mt][3] + z1;
      }
    }
  }
}

/* ---------------------------------------------------------------- the kernel ------------- */

/* D: head dim; VG: value group size; VK: value format (0 uniform, 1 codebook); MINB: CTAs a SM (register
   cap); NST: ring stages; KM: the key side (kv_mma_keys: int8 planes of q s, T1 the turned-around key MMA
   of one query head a KV head, QF q fixed with the key scale applied per k-step, attention_mma_keys16.cuh) */
template <int D, int VG, int VK, int MINB, int NST, int KM>
static __global__ void __launch_bounds__(KV_MMA_THREADS, MINB) k_attend_mma(const __grid_constant__ kv_attn_params p) {
  constexpr bool T1 = KM == KV_KEYS_T1, QF = KM == KV_KEYS_QF;
  constexpr int NCH = D / 32;                                   /* key MMA k-chunks */
  constexpr int NMT = D / 16;                                   /* value MMA m-tiles */
  constexpr int KCB = 32 * D / 4, KPB = D * 4, VCB = 2 * D * 4; /* stage: key codes, key params, value codes */
  extern __shared__ __align__(16) uint8_t smem[];
  float *qf = (float *)smem;                                              /* [8][D], log2 units */
  const int nqa = min(KV_MMA_HEADS, p.ratio);                             /* heads of any CTA */
  uint32_t *abuf = (uint32_t *)(smem + KV_MMA_HEADS * D * sizeof(float)); /* per warp: kv_mma_aw(D) x nqa */
  uint8_t *rings =
      smem + KV_MMA_HEADS * D * sizeof(float) + kv_mma_abuf_bytes(D, p.ratio, KM); /* per warp [NST][stage] */
  const int warp = kv_keep(threadIdx.x >> 5), lane = kv_keep(threadIdx.x & 31);
  const int gid = kv_keep(lane >> 2), tig = kv_keep(lane & 3);
  kv_mma_lane L;
  L.warp = warp, L.lane = lane, L.gid = gid, L.tig = tig;

  const kv_cta cta = kv_cta_of(p);
  const int hc = cta.hc, hkv = cta.hkv, b = cta.b;
  const kv_seq_info si = cta.si;
  const int a0 = cta.a0, e0 = cta.e0, pend = cta.pend, ws0 = cta.ws0;
  if (a0 >= si.len) {
    kv_attn_cta_done<D>(p);
    return;
  }
  const int npt = a0 < pend ? (pend - a0) / 32 : 0; /* qlen and chunk are multiples of 32 */
  const int nwt = e0 > ws0 ? (e0 - ws0 + 15) / 16 : 0;
  const int ntiles = npt + nwt;
  const int qh0 = hkv * p.ratio + hc * KV_MMA_HEADS;
  const int nq = min(KV_MMA_HEADS, p.ratio - hc * KV_MMA_HEADS);
  constexpr int ngv = D / VG;     /* value groups */
  constexpr int VPB = ngv * 64;   /* stage: one plane of value params (a half a token and group) of 32 tokens */
  constexpr int NPL = VK ? 4 : 2; /* planes: scale, zero; or c0..c3 */
  constexpr int stage = kv_mma_stage_bytes(D, VG, NPL);
  static_assert(stage == KCB + KPB + VCB + NPL * VPB, "the stage layout the offsets below assume");
  const int lgK = __ffs(p.kg) - 1; /* a power of two */

  kv_mma_load_q<D>(p, cta, qh0, nq, qf);

  const int32_t *trow = p.table + (int64_t)si.slot * p.max_pages;
  const int64_t wbase = ((int64_t)si.slot * p.layers + p.layer) * p.W;

  /* state: softmax of head gid (the same in the 4 lanes of a quad), O^T and Z fragments */
  float m = -INFINITY, l = 0.0f;
  float o[NMT][4], zacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < NMT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
  uint4 ahm[T1 ? 1 : NCH], alo[T1 ? 1 : NCH]; /* key A fragments: {hi, mid, hi, mid} and {lo, 0, lo, 0} */
  uint32_t bq[T1 ? NCH : 1][2];               /* T1: key B fragments, column gid = plane gid (0 past 2) */
  uint32_t aq[QF ? D / 16 : 1][4];            /* QF: q' as the key A fragments {hi, lo, hi, lo} a k-step */
#pragma unroll
  for (int i = 0; i < (QF ? D / 16 : 1); i++) aq[i][0] = aq[i][1] = aq[i][2] = aq[i][3] = 0u;
  float qsc = 0.0f; /* QF: the score's scale */
  if constexpr (QF) qsc = kv_mma_q_frags<D>(qf, gid, tig, aq);
#pragma unroll
  for (int i = 0; i < (T1 ? 1 : NCH); i++) ahm[i] = alo[i] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int i = 0; i < (T1 ? NCH : 1); i++) bq[i][0] = bq[i][1] = 0u;
  /* A-building role of this lane: register (i, reg) of quad lane tig_o, channels ach .. ach + 3; it stores
     its hi / mid / lo words at awr (+1, lo 4 NCH further) in each head's slice of the warp's abuf */
  int ach, awr;
  {
    const int Ln = lane % (8 * NCH), to = Ln / (2 * NCH), ii = (Ln / 2) % NCH, rg = Ln % 2;
    ach = D == 128 ? 16 * (2 * to + rg) + 4 * ii : 16 * to + 8 * ii + 4 * rg;
    awr = to * 8 * NCH + 4 * ii + 2 * rg;
  }
  uint32_t *wabuf = abuf + warp * nqa * kv_mma_aw(D);
  const bool a_writer = 8 * NCH >= 32 || lane < 8 * NCH;
  if constexpr (!QF)
    for (int k = lane; k < nqa * kv_mma_aw(D); k += 32) wabuf[k] = 0u; /* the lo fragments' zeros */
  /* byte offsets of what this lane reads and writes in every tile, kept in registers (kv_keep): in a
     stage its key params, key words and value words, scales and zeros; its q channels; its fragment
     words in the warp's slice (written) and its own fragments (read) */
  L.o_kpar = kv_keep(KCB + 4 * ach), L.o_q = kv_keep(4 * ach);
  L.o_kw = kv_keep((T1 ? gid : 2 * (gid >> 1) + 8 * (gid & 1)) * (D / 4) + (D == 128 ? 8 : 4) * tig);
  L.o_vs = kv_keep(KCB + KPB + VCB + 8 * tig), L.o_vw = kv_keep(KCB + KPB + 4 * (D / 32) * lane);
  /* zeros (uniform: the second plane) or c0 (codebook: the first), group gid, as the zero MMA's A */
  L.o_vz = kv_keep(KCB + KPB + VCB + (VK ? 0 : VPB) + 64 * min(gid, ngv - 1) + 8 * tig);
  /* T1: the slice holds plane p's words of lane L at p 8 NCH + L, and lane (p, tig) reads its 2 NCH B words
     (chunk i, register rg at 2i + rg) at lane 2 NCH: the writer roles above list them in that order */
  L.o_aw = kv_keep(4 * (warp * nqa * kv_mma_aw(D) + (T1 ? lane % (8 * NCH) : awr)));
  L.o_ar = kv_keep(4 * (warp * nqa * kv_mma_aw(D) + (T1 ? lane * 2 * NCH : gid * kv_mma_aw(D) + tig * 8 * NCH)));
  float ksc = 0.0f, kqz = 0.0f; /* this lane's head: score = ((254 hi + mid) 254 + lo) ksc + kqz */
  int kgrp = -1;                /* key group (token / k_group) whose A is loaded */

  /* page tiles of this warp: g = warp + i * 4, streamed through the warp's ring of nst stages */
  const int my_pt = npt > warp ? (npt - warp + KV_MMA_WARPS - 1) / KV_MMA_WARPS : 0;
  uint8_t *ring = rings + (size_t)warp * NST * stage;
  const uint32_t o_ring = kv_keep((uint32_t)(ring - smem));
  /* tile i of this warp starts at token a0 + (warp + 4 i) 32 */
  const int tok0 = kv_keep(a0 + warp * 32);
  static_assert(KCB % 512 == 0 && VCB % 512 == 0, "whole chunks a lane");
  static_assert(D <= 128, "the combined int32 score sum needs 64 x 3 x D x 254^2 < 2^31");
  kv_mma_ring r;
  uint32_t next_page = kv_mma_ring_start<D, VG, NPL, NST>(r, p, trow, hkv, lane, ring, tok0, my_pt, 32 * KV_MMA_WARPS);

  /* with several queries a sequence (rows = query i x head), row gid's query sees the first
     len - qrows + i + 1 tokens: pages and window masked per row */
  const int lim = p.qrows == 1 ? INT_MAX : si.len - p.qrows + 1 + (hc * KV_MMA_HEADS + gid) / (p.ratio / p.qrows);
  for (int i = 0; i < my_pt; i++) {
    const uint8_t *stg = smem + (o_ring + kv_mma_ring_next<D, VG, NPL, NST>(r, lane, i, next_page));
    const int t0 = tok0 + i * (32 * KV_MMA_WARPS);
    /* A (q s as three int8 planes) for the key group of this tile */
    const int grp = t0 >> lgK;
    if (!QF && grp != kgrp) { /* a warp's tiles are 128 tokens apart: a new group every tile unless groups are longer */
      kgrp = grp;
      kv_mma_key_frags<D, T1>(stg, smem, abuf, nq, a_writer, L, ahm, alo, bq, ksc, kqz);
    }

    float s[4][2];
    if constexpr (QF)
      kv_mma_scores_qf<D, NMT>(stg, L, aq, qsc, lim - t0, m, l, o, zacc, s);
    else if constexpr (T1)
      kv_mma_scores_t1<D, NMT>(stg, L, bq, ksc, kqz, m, l, o, zacc, s);
    else
      kv_mma_scores<D, NMT>(stg, L, ahm, alo, ksc, kqz, lim - t0, m, l, o, zacc, s);

    kv_mma_values<D, VG, VK, NMT>(stg, L, s, o, zacc);
    __syncwarp();
  }
  kv_wait(0);
  if constexpr (T1) { /* the window tiles and the merge keep head 0's sum in lane 0's quad */
#pragma unroll
    for (int o2 = 16; o2 >= 1; o2 >>= 1) l += __shfl_xor_sync(KV_FULL, l, o2);
    if (lane != 0) l = 0.0f;
  }
  /* the page tiles accumulated code x 2^-24 x 4^k, k the code's slot in its half word (0 and 1 in
     even m-tiles, 2 and 3 in odd ones, the higher of each pair in rows 8-15): back to plain units
     before the window's fp16 values */
#pragma unroll
  for (int i = 0; i < NMT; i++) {
    const float f0 = (i % 2 ? 1048576.0f : 16777216.0f) * (VK ? 4.0f : 1.0f); /* 2^20, 2^24; codebook B / 4 */
    o[i][0] *= f0;
    o[i][1] *= f0;
    o[i][2] *= 0.25f * f0;
    o[i][3] *= 0.25f * f0;
  }

  /* window tiles: g = npt.. ntiles - 1 with g % 4 == warp */
  const int erow = min(e0, lim);
  for (int g = npt + ((warp - npt % KV_MMA_WARPS) + KV_MMA_WARPS) % KV_MMA_WARPS; g < ntiles; g += KV_MMA_WARPS)
    kv_mma_window_tile<D, NMT>(p, hkv, wbase, ws0 + (g - npt) * 16, e0, erow, qf, L, m, l, o, zacc);
  l += __shfl_xor_sync(KV_FULL, l, 1);
  l += __shfl_xor_sync(KV_FULL, l, 2);

  /* ---------------- merge the warps ---------------- */
  __syncthreads();
  float *cw = (float *)rings; /* [warps][8][D + 2] */
  kv_mma_finish<D, VG, NMT>(cw, L, nq, m, l, o, zacc);
  __syncthreads();
  kv_merge_warps<D, KV_MMA_WARPS>(p, cw, KV_MMA_HEADS, nq, (int64_t)b * p.qh + qh0);
  kv_attn_cta_done<D>(p);
}

#endif /* KIVI_ATTENTION_MMA_CUH */
