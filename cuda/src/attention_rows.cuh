/*
 * attention_rows.cuh — the tensor-core attention for many query rows a KV head (k_attend_rows): several
 * query tokens a sequence (attendMulti: verification, a prefill chunk; attention.cu's rows_blocks), over
 * caches in the tensor-core page layout with uniform 2-bit keys (kivi_format.h).
 *
 * k_attend_mma (attention_mma.cuh) gives a CTA 8 rows: its key MMA puts q's hi and lo halves in rows 0-7
 * and 8-15, its value MMA has the heads as n. With 32 rows a KV head, 4 CTAs read and decode every page
 * tile, and a codebook's values take three bit-plane MMAs per code word. Here a warp takes 16 rows, as
 * FlashAttention does (queries as the m of every MMA):
 *   keys: mma m16n8k16 f16 -> f32, rows = 16 query rows, k = channels, n = tokens. A = q' s per k-step,
 *     hi = q'hi s rounded and lo = its residual + q'lo s (two MMAs, one for each: the score stays exact
 *     to ~2^-22, as the q-fixed key side of attention_mma_keys16.cuh), B = the codes as fp16 subnormals
 *     from the packed words (the same words and lanes as there), q'.z by two more MMAs a k-step.
 *     q' = q 2^-E per row is built once into the warp's slice of shared memory, two LDS.128 a k-step.
 *   values: O = P V, mma m16n8k16 f16 -> f32, rows = query rows, k = tokens, n = 8 channels. A = p
 *     straight from the score fragments (the C layout of the key MMA is the A layout here). B = the
 *     value codes: the registers each lane decodes in k_attend_mma as A of V^T are, lane by lane, B of V
 *     (rows 0-7 of an m-tile of channels are the n of one n-tile, rows 8-15 of the next).
 *     Uniform: codes as fp16 subnormals x 2^(2 slot), A = p s per value group (s per token), zeros by one
 *     MMA a run (B = z per token in column = group). Codebook: each B register is two centroids looked up
 *     by the codes (PRMT from the token's four fp16 centroids: exact), A = p: one MMA a code word
 *     instead of three.
 * A CTA of 4 warps takes 16 RB rows (RB = 1, 2 or 4 blocks of 16) of one (batch entry, kv head, split):
 * warp w takes row block w % RB and the page tiles w / RB, w / RB + 4 / RB, ... of the split through its
 * own cp.async ring (kv_mma_issue_tile), then its window tiles; the 4 / RB warps of a row block merge at
 * the end (kv_merge_warps). Rows past the KV head's rows are zero and not written. Row i of a sequence's
 * qrows queries sees len - qrows + i + 1 tokens: pages and window are masked per row.
 * Measured on an H200 against k_attend_mma (8 x 32768 GQA 32/8, default cache, same call): qlen 8 510 ->
 * 457 us, a 512-token chunk 27.7 -> 23.7 ms. The key side is now most of a tile's MMAs (10 a k-step for
 * 16 rows: 8 for q' s hi and lo over 4 n-tiles, 2 for q'.z), and a warp holds 186 registers (2 CTAs a SM).
 * Keeping hi and lo in separate accumulators (no dependent pair a k-step) measured the same: not kept.
 */
#ifndef KIVI_ATTENTION_ROWS_CUH
#define KIVI_ATTENTION_ROWS_CUH

#include "attention.cuh"
#include "attention_mma.cuh"
#include "attention_mma_keys16.cuh"
#include "attention_mma_parts.cuh"

/* One online-softmax step of a warp's two rows (g: e2 = 0, g + 8: e2 = 1) over this lane's scores
   s[nj][4] ({g, g, g + 8, g + 8} of n-tile j), then p in place; O and Z rescaled. */
template <int NJ, int NNT>
__device__ __forceinline__ void kv_rows_softmax(float (&m)[2], float (&l)[2], float (&o)[NNT][4], float (&zacc)[4],
                                                float (&s)[NJ][4]) {
#pragma unroll
  for (int e2 = 0; e2 < 2; e2++) {
    float tm = -INFINITY;
#pragma unroll
    for (int j = 0; j < NJ; j++) tm = fmaxf(tm, fmaxf(s[j][2 * e2], s[j][2 * e2 + 1]));
    tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, 1));
    tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, 2));
    const float mn = fmaxf(m[e2], tm);
    /* a row that has seen no token yet keeps max -inf and sum 0: 0 stands in for the max */
    const float mb = mn == -INFINITY ? 0.0f : mn;
    const float corr = kv_ex2(m[e2] - mb);
    m[e2] = mn;
    float ls = 0.0f;
#pragma unroll
    for (int j = 0; j < NJ; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        s[j][2 * e2 + e] = kv_ex2(s[j][2 * e2 + e] - mb);
        ls += s[j][2 * e2 + e];
      }
    l[e2] = fmaf(l[e2], corr, ls);
    if (__any_sync(KV_FULL, corr != 1.0f)) {
#pragma unroll
      for (int nt = 0; nt < NNT; nt++) {
        o[nt][2 * e2] *= corr;
        o[nt][2 * e2 + 1] *= corr;
      }
      zacc[2 * e2] *= corr;
      zacc[2 * e2 + 1] *= corr;
    }
  }
}

/* The channels of value n-tile nt: column n is channel kv_rows_ch0(nt) + 2 n, the channel order of the
   tensor-core page layout's value codes (kivi_mma_value_code: rows g and g + 8 of m-tile mt of V^T are
   channels 16 mt + 2 g and + 1); n-tile 4 q + sl holds slot sl of the lane's value word q. */
__host__ __device__ constexpr int kv_rows_ch0(int nt) { return 16 * (2 * (nt >> 2) + ((nt & 3) >> 1)) + (nt & 1); }

/* Two centroids as one B register: token a's (halves c0..c3 in a01, a23) at code x & 3, token b's at code
   (x >> 16) & 3, exact (PRMT picks bytes 2c, 2c + 1 of the token's 8 bytes of centroids). */
__device__ __forceinline__ uint32_t kv_rows_look(uint32_t x, uint32_t a01, uint32_t a23, uint32_t b01, uint32_t b23) {
  const uint32_t sel = (x & 0x00030003u) * 34u + 0x00100010u; /* nibbles 2c, 2c + 1 of each half */
  return __byte_perm(__byte_perm(a01, a23, sel), __byte_perm(b01, b23, sel >> 8), 0x7610);
}

/* D: head dim; VG: value group size; VK: value format (0 uniform, 1 codebook); NST: ring stages a warp. */
template <int D, int VG, int VK, int NST>
static __global__ void __launch_bounds__(KV_MMA_THREADS, 2) k_attend_rows(const __grid_constant__ kv_attn_params p) {
  constexpr int NW = kv_k16_words<D>(), NNT = D / 8, NKS = D / 16;
  constexpr int KCB = 32 * D / 4, KPB = D * 4, VCB = 2 * D * 4;
  constexpr int ngv = D / VG, VPB = ngv * 64, NPL = VK ? 4 : 2;
  constexpr int stage = kv_mma_stage_bytes(D, VG, NPL);
  const int RB = p.rb, NS = KV_MMA_WARPS / RB, RPC = 16 * RB; /* row blocks, token streams, rows a CTA */
  extern __shared__ __align__(16) uint8_t smem[];
  float *qf = (float *)smem; /* [RPC][D], log2 units */
  uint8_t *qfr = smem + (size_t)RPC * D * sizeof(float);
  uint8_t *rings = qfr + KV_MMA_WARPS * kv_rows_qfrag_bytes(D);
  const int warp = kv_keep(threadIdx.x >> 5), lane = kv_keep(threadIdx.x & 31);
  const int gid = kv_keep(lane >> 2), tig = kv_keep(lane & 3);
  const int rb = warp % RB, strm = warp / RB;

  const kv_cta cta = kv_cta_of(p);
  const int hc = cta.hc, hkv = cta.hkv, b = cta.b;
  const kv_seq_info si = cta.si;
  const int a0 = cta.a0, e0 = cta.e0, pend = cta.pend, ws0 = cta.ws0;
  if (a0 >= si.len) {
    kv_attn_cta_done<D>(p);
    return;
  }
  const int npt = a0 < pend ? (pend - a0) / 32 : 0;
  const int nwt = e0 > ws0 ? (e0 - ws0 + 15) / 16 : 0;
  const int qh0 = hkv * p.ratio + hc * RPC;
  const int nq = min(RPC, p.ratio - hc * RPC);

  kv_mma_load_q<D>(p, cta, qh0, nq, qf, RPC);

  /* q' of this warp's rows g and g + 8 as the key A fragments, into the warp's slice: k-step ks, hi
     {g 02, g+8 02, g 13, g+8 13} at [ks][0][lane], lo at [ks][1][lane] (uint4 each) */
  uint32_t *fr = (uint32_t *)(qfr + warp * kv_rows_qfrag_bytes(D));
  float ksc[2];
#pragma unroll
  for (int e2 = 0; e2 < 2; e2++) {
    uint32_t aq[NKS][4];
    ksc[e2] = kv_mma_q_frags<D>(qf + (rb * 16 + 8 * e2) * D, gid, tig, aq);
#pragma unroll
    for (int ks = 0; ks < NKS; ks++) {
      uint32_t *hi = fr + (ks * 2 * 32 + lane) * 4, *lo = hi + 32 * 4;
      hi[e2] = aq[ks][0];
      hi[2 + e2] = aq[ks][2];
      lo[e2] = aq[ks][1];
      lo[2 + e2] = aq[ks][3];
    }
  }
  __syncwarp();

  const int32_t *trow = p.table + (int64_t)si.slot * p.max_pages;
  const int64_t wbase = ((int64_t)si.slot * p.layers + p.layer) * p.W;

  /* state of rows g (e2 0) and g + 8 (e2 1): softmax, O (n-tile nt: channels kv_rows_ch0(nt) + 4 tig, + 2), Z
     (uniform: columns 2 tig, 2 tig + 1 = value groups) */
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[NNT][4], zacc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < NNT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;

  /* rows g and g + 8 see the first lim tokens (query (row / heads a KV head) of qrows) */
  int lim[2];
#pragma unroll
  for (int e2 = 0; e2 < 2; e2++)
    lim[e2] = p.qrows == 1 ? INT_MAX : si.len - p.qrows + 1 + (hc * RPC + rb * 16 + gid + 8 * e2) / (p.ratio / p.qrows);

  /* lane offsets in a stage, as k_attend_mma's */
  const uint32_t o_kw = kv_keep((2 * (gid >> 1) + 8 * (gid & 1)) * (D / 4) + (D == 128 ? 8 : 4) * tig);
  const uint32_t o_kp = kv_keep(KCB + 64u * NW * tig);
  const uint32_t o_vs = kv_keep(KCB + KPB + VCB + 8 * tig), o_vw = kv_keep(KCB + KPB + 4 * (D / 32) * lane);
  const uint32_t o_vz = kv_keep(KCB + KPB + VCB + (VK ? 0 : VPB) + 64 * min(gid, ngv - 1) + 8 * tig);

  const int my_pt = npt > strm ? (npt - strm + NS - 1) / NS : 0;
  uint8_t *ring = rings + (size_t)warp * NST * stage;
  const uint32_t o_ring = kv_keep((uint32_t)(ring - smem));
  const int tok0 = kv_keep(a0 + strm * 32);
  kv_mma_ring r;
  uint32_t next_page = kv_mma_ring_start<D, VG, NPL, NST>(r, p, trow, hkv, lane, ring, tok0, my_pt, 32 * NS);

  for (int i = 0; i < my_pt; i++) {
    const uint8_t *stg = smem + (o_ring + kv_mma_ring_next<D, VG, NPL, NST>(r, lane, i, next_page));
    const int t0 = tok0 + i * 32 * NS;

    /* ---- scores: 4 n-tiles of 8 tokens (n-tile j, column n: token 16 (j / 2) + (j % 2) + 2 (n / 2) +
       8 (n % 2)), rows g and g + 8 ---- */
    float s[4][4];
    {
      uint32_t kw[4][2];
      kv_mma_key_words<D>(stg, o_kw, kw);
      float az[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int j = 0; j < 4; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
      for (int h = 0; h < NW; h++)
#pragma unroll
        for (int ii = 0; ii < 4; ii++) {
          const int ks = 4 * h + ii;
          const uint4 qh = *(const uint4 *)(fr + (ks * 2 * 32 + lane) * 4);
          const uint4 ql = *(const uint4 *)(fr + ((ks * 2 + 1) * 32 + lane) * 4);
          const uint4 sz = *(const uint4 *)(stg + o_kp + 64 * h + 16 * ii);
          const __half2 s02 = kv_u2h(__byte_perm(sz.x, sz.z, 0x5410)), s13 = kv_u2h(__byte_perm(sz.y, sz.w, 0x5410));
          const uint32_t z02 = __byte_perm(sz.x, sz.z, 0x7632), z13 = __byte_perm(sz.y, sz.w, 0x7632);
          kv_mma_f16(az, qh.x, qh.y, qh.z, qh.w, z02, z13); /* q'.z in every column */
          kv_mma_f16(az, ql.x, ql.y, ql.z, ql.w, z02, z13);
          const __half2 h0 = __hmul2(kv_u2h(qh.x), s02), h1 = __hmul2(kv_u2h(qh.y), s02);
          const __half2 h2 = __hmul2(kv_u2h(qh.z), s13), h3 = __hmul2(kv_u2h(qh.w), s13);
          const uint32_t l0 = kv_h2u(__hfma2(kv_u2h(ql.x), s02, __hfma2(kv_u2h(qh.x), s02, __hneg2(h0))));
          const uint32_t l1 = kv_h2u(__hfma2(kv_u2h(ql.y), s02, __hfma2(kv_u2h(qh.y), s02, __hneg2(h1))));
          const uint32_t l2 = kv_h2u(__hfma2(kv_u2h(ql.z), s13, __hfma2(kv_u2h(qh.z), s13, __hneg2(h2))));
          const uint32_t l3 = kv_h2u(__hfma2(kv_u2h(ql.w), s13, __hfma2(kv_u2h(qh.w), s13, __hneg2(h3))));
#pragma unroll
          for (int j = 0; j < 4; j++) {
            const uint32_t w = kw[j][h] >> (2 * ii), w8 = w >> 8;
            const uint32_t b0 = w & 0x00030003u, b1 = w8 & 0x00030003u;
            kv_mma_f16(s[j], kv_h2u(h0), kv_h2u(h1), kv_h2u(h2), kv_h2u(h3), b0, b1);
            kv_mma_f16(s[j], l0, l1, l2, l3, b0, b1);
          }
        }
        /* x 2^24 (the codes' subnormal scale) and 2^E (q's), plus q'.z; tokens past a row's limit masked */
#pragma unroll
      for (int e2 = 0; e2 < 2; e2++) {
        const float k24 = ksc[e2] * 16777216.0f, qz = az[2 * e2] * ksc[e2];
        const int rem = lim[e2] - t0;
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
          for (int e = 0; e < 2; e++) {
            const int tok = 16 * (j >> 1) + (j & 1) + 2 * tig + 8 * e;
            s[j][2 * e2 + e] = tok < rem ? fmaf(s[j][2 * e2 + e], k24, qz) : -INFINITY;
          }
      }
    }
    kv_rows_softmax<4, NNT>(m, l, o, zacc, s);

    /* ---- values, two runs of 16 tokens: A = p (run r: n-tiles 2 r, 2 r + 1) ---- */
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
      const uint32_t pa0 = kv_pack_h2(s[2 * rr][0], s[2 * rr][1]), pa1 = kv_pack_h2(s[2 * rr][2], s[2 * rr][3]);
      const uint32_t pa2 = kv_pack_h2(s[2 * rr + 1][0], s[2 * rr + 1][1]);
      const uint32_t pa3 = kv_pack_h2(s[2 * rr + 1][2], s[2 * rr + 1][3]);
      uint32_t vw[D / 32];
      kv_mma_value_words<D>(stg, o_vw, rr, vw);
      if constexpr (VK == 0) {
        {
          uint2 zz = make_uint2(0u, 0u);
          if (gid < ngv) zz = *(const uint2 *)(stg + o_vz + 32 * rr);
          kv_mma_f16(zacc, pa0, pa1, pa2, pa3, zz.x, zz.y);
        }
        uint32_t ap[ngv][4]; /* A = p s per value group */
#pragma unroll
        for (int gg = 0; gg < ngv; gg++) {
          const uint2 ss = *(const uint2 *)(stg + o_vs + gg * 64 + 32 * rr);
          ap[gg][0] = kv_h2u(__hmul2(kv_u2h(pa0), kv_u2h(ss.x)));
          ap[gg][1] = kv_h2u(__hmul2(kv_u2h(pa1), kv_u2h(ss.x)));
          ap[gg][2] = kv_h2u(__hmul2(kv_u2h(pa2), kv_u2h(ss.y)));
          ap[gg][3] = kv_h2u(__hmul2(kv_u2h(pa3), kv_u2h(ss.y)));
        }
#pragma unroll
        for (int q = 0; q < D / 32; q++) {
          const uint32_t w = vw[q], w8 = w >> 8;
#pragma unroll
          for (int sl = 0; sl < 4; sl++) {
            const int nt = 4 * q + sl, gg = kv_rows_ch0(nt) / VG;
            const uint32_t mk = 0x00030003u << (2 * sl);
            kv_mma_f16(o[nt], ap[gg][0], ap[gg][1], ap[gg][2], ap[gg][3], w & mk, w8 & mk);
          }
        }
      } else {
        /* the four tokens of this lane's A columns: (a, b) = k 2 tig, 2 tig + 1; (c, d) = + 8; their
           centroids c0..c3 per value group as {c0, c1}, {c2, c3} */
#pragma unroll
        for (int gg = 0; gg < ngv; gg++) {
          uint2 c[4];
#pragma unroll
          for (int j = 0; j < 4; j++) c[j] = *(const uint2 *)(stg + o_vs + j * VPB + gg * 64 + 32 * rr);
          const uint32_t a01 = __byte_perm(c[0].x, c[1].x, 0x5410), a23 = __byte_perm(c[2].x, c[3].x, 0x5410);
          const uint32_t b01 = __byte_perm(c[0].x, c[1].x, 0x7632), b23 = __byte_perm(c[2].x, c[3].x, 0x7632);
          const uint32_t c01 = __byte_perm(c[0].y, c[1].y, 0x5410), c23 = __byte_perm(c[2].y, c[3].y, 0x5410);
          const uint32_t d01 = __byte_perm(c[0].y, c[1].y, 0x7632), d23 = __byte_perm(c[2].y, c[3].y, 0x7632);
#pragma unroll
          for (int q = 0; q < D / 32; q++) {
#pragma unroll
            for (int sl = 0; sl < 4; sl++) {
              const int nt = 4 * q + sl;
              if (kv_rows_ch0(nt) / VG != gg) continue;
              const uint32_t x = vw[q] >> (2 * sl), x8 = x >> 8;
              kv_mma_f16(o[nt], pa0, pa1, pa2, pa3, kv_rows_look(x, a01, a23, b01, b23),
                         kv_rows_look(x8, c01, c23, d01, d23));
            }
          }
        }
      }
    }
    __syncwarp();
  }
  kv_wait(0);
  if constexpr (VK == 0) { /* the codes' slot scales: n-tile nt holds code x 2^(2 (nt % 4) - 24) */
#pragma unroll
    for (int nt = 0; nt < NNT; nt++) {
      const float f = (float)(1 << (24 - 2 * (nt % 4)));
      o[nt][0] *= f, o[nt][1] *= f, o[nt][2] *= f, o[nt][3] *= f;
    }
  }

  /* ---- window tiles (fp16): 16 tokens from ws0 + 16 k, k = strm, strm + NS, ... ---- */
  for (int k = strm; k < nwt; k += NS) {
    const int tw = ws0 + 16 * k;
    auto row = [&](int t, const uint16_t *win) { return win + ((wbase + t % p.W) * p.kvh + hkv) * (int64_t)D; };
    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
    const int tk0 = tw + gid, tk1 = tw + 8 + gid; /* this lane's B columns: tokens of n-tiles 0, 1 */
    const uint32_t *kr0 = (const uint32_t *)row(tk0 < e0 ? tk0 : tw, p.kwin);
    const uint32_t *kr1 = (const uint32_t *)row(tk1 < e0 ? tk1 : tw, p.kwin);
    const float *q0 = qf + (rb * 16 + gid) * D, *q8 = q0 + 8 * D;
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
      const float2 x[4] = {*(const float2 *)(q0 + 16 * kk + 2 * tig), *(const float2 *)(q8 + 16 * kk + 2 * tig),
                           *(const float2 *)(q0 + 16 * kk + 2 * tig + 8),
                           *(const float2 *)(q8 + 16 * kk + 2 * tig + 8)};
      uint32_t ah[4], al[4];
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const __half2 hh = __floats2half2_rn(x[e].x, x[e].y);
        const float2 f = __half22float2(hh);
        ah[e] = kv_h2u(hh);
        al[e] = kv_pack_h2(x[e].x - f.x, x[e].y - f.y);
      }
      const uint32_t b00 = kr0[8 * kk + tig], b01 = kr0[8 * kk + tig + 4];
      const uint32_t b10 = kr1[8 * kk + tig], b11 = kr1[8 * kk + tig + 4];
      kv_mma_f16(s[0], ah[0], ah[1], ah[2], ah[3], b00, b01);
      kv_mma_f16(s[0], al[0], al[1], al[2], al[3], b00, b01);
      kv_mma_f16(s[1], ah[0], ah[1], ah[2], ah[3], b10, b11);
      kv_mma_f16(s[1], al[0], al[1], al[2], al[3], b10, b11);
    }
    /* column 2 tig (+1) of n-tile j is token tw + 8 j + 2 tig (+1) */
#pragma unroll
    for (int e2 = 0; e2 < 2; e2++) {
      const int erow = min(e0, lim[e2]);
#pragma unroll
      for (int j = 0; j < 2; j++)
#pragma unroll
        for (int e = 0; e < 2; e++)
          if (tw + 8 * j + 2 * tig + e >= erow) s[j][2 * e2 + e] = -INFINITY;
    }
    kv_rows_softmax<2, NNT>(m, l, o, zacc, s);
    const uint32_t pa0 = kv_pack_h2(s[0][0], s[0][1]), pa1 = kv_pack_h2(s[0][2], s[0][3]);
    const uint32_t pa2 = kv_pack_h2(s[1][0], s[1][1]), pa3 = kv_pack_h2(s[1][2], s[1][3]);
    /* B = V: k 2 tig, 2 tig + 1 (tokens tw + 2 tig, + 1), 2 tig + 8, + 9; n = gid, channel kv_rows_ch0(nt) +
       2 gid (the pages' order); zero
       past the window's end (p is 0 there, and the stale rows need not be finite) */
    const int tv[4] = {tw + 2 * tig, tw + 2 * tig + 1, tw + 2 * tig + 8, tw + 2 * tig + 9};
    const uint16_t *vr[4];
#pragma unroll
    for (int e = 0; e < 4; e++) vr[e] = tv[e] < e0 ? row(tv[e], p.vwin) + 2 * gid : nullptr;
#pragma unroll
    for (int nt = 0; nt < NNT; nt++) {
      uint32_t x[4];
#pragma unroll
      for (int e = 0; e < 4; e++) x[e] = vr[e] ? (uint32_t)vr[e][kv_rows_ch0(nt)] : 0u;
      kv_mma_f16(o[nt], pa0, pa1, pa2, pa3, x[0] | (x[1] << 16), x[2] | (x[3] << 16));
    }
  }
#pragma unroll
  for (int e2 = 0; e2 < 2; e2++) {
    l[e2] += __shfl_xor_sync(KV_FULL, l[e2], 1);
    l[e2] += __shfl_xor_sync(KV_FULL, l[e2], 2);
  }

  /* ---- merge: the NS warps of each row block (cw [NS][RPC][D + 2]: max, sum, unnormalised output) ---- */
  __syncthreads();
  float *cw = (float *)rings;
#pragma unroll
  for (int e2 = 0; e2 < 2; e2++) {
    float *mine = cw + (strm * RPC + rb * 16 + gid + 8 * e2) * (D + 2);
    if (tig == 0) {
      mine[0] = m[e2];
      mine[1] = l[e2];
    }
#pragma unroll
    for (int nt = 0; nt < NNT; nt++) {
      float z = 0.0f;
      if constexpr (VK == 0) { /* Z of this row and the n-tile's value group: lane (gid, gg / 2), column gg % 2 */
        const int gg = kv_rows_ch0(nt) / VG;
        z = __shfl_sync(KV_FULL, zacc[2 * e2 + (gg & 1)], (lane & ~3) | (gg >> 1));
      }
      mine[2 + kv_rows_ch0(nt) + 4 * tig] = o[nt][2 * e2] + z;
      mine[4 + kv_rows_ch0(nt) + 4 * tig] = o[nt][2 * e2 + 1] + z;
    }
  }
  __syncthreads();
  const int64_t oh0 = (int64_t)b * p.qh + qh0;
  if (NS == 4)
    kv_merge_warps<D, 4>(p, cw, RPC, nq, oh0);
  else if (NS == 2)
    kv_merge_warps<D, 2>(p, cw, RPC, nq, oh0);
  else
    kv_merge_warps<D, 1>(p, cw, RPC, nq, oh0);
  kv_attn_cta_done<D>(p);
}

#endif /* KIVI_ATTENTION_ROWS_CUH */
