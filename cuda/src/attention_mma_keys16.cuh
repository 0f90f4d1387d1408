/*
 * attention_mma_keys16.cuh — the key side of the tensor-core decode attention for several query heads a
 * KV head (KM 2, kv_mma_keys KV_KEYS_QF, of k_attend_mma in attention_mma.cuh): q fixed for the CTA, the
 * key scale applied per k-step in fp16, the codes as fp16 subnormals.
 *
 * The int8-plane key side (kv_mma_key_frags) rebuilds q s as three int8 planes for every query head each
 * key group (32 tokens): a serial chain of reductions a head, a third of a tile's work at a GQA ratio of
 * 4 and growing with it. Here nothing is rebuilt per group and the work a tile does not grow with the
 * ratio (rows of the MMA are heads), while the score stays exact to ~2^-22:
 *   mma m16n8k16 f16 -> f32, rows = query heads, k = channels, n = tokens.
 *   q' = q 2^-E (|q'| < 1, E per head) as hi + lo halves, built once (kv_mma_q_frags).
 *   A = q' s per k-step: hi = q'hi s rounded (HMUL2), lo = its exact residual (HFMA2) + q'lo s (HFMA2), the
 *   hi halves in row h, the lo halves in row h + 8: hi + lo is q' s to ~2^-22.
 *   B = the codes: the key word shifted to slot i and masked (0x00030003: channels 4i and 4i + 2 of the word,
 *   after a shift by 8: 4i + 1, 4i + 3) is the half pair c 2^-24 (fp16 subnormals, exact; the products and
 *   sums are fp32, where the 2^-24 costs nothing and comes back with the score's scale).
 *   The zeros: one more MMA a k-step, A = q' and B = z in every column, so every score gets q'.z.
 *   A k-step takes one slot i of one of this lane's key words, and A holds q's channels in the order the
 *   words give them (a dot product does not mind).
 * Measured against the int8 planes on an H200 (8 x 32768, same build, both orders): GQA 32/8 default
 * cache 137.9 -> 121.9 us, 2-bit 110.9 -> 91.8; 32/4 104.7 -> 71.5 and 92.7 -> 55.9 (codes - 1024 by an
 * HSUB2 instead of subnormals: 134.3, 104.4, 78.0, 62.7). Keys dequantized to fp16 (s c + z rounded) ran
 * 122.6 us at 32/8 but missed 2e-3 against the CPU build by up to 3x with outlier channels (an fp16
 * rounding of a key of |k| ~ 30 moves a score by ~0.02): not kept. q s rebuilt per group as fp16 hi +
 * lo planes (the int8 builder's roles) ran 135.8 and 97.0 us: not kept (docs/performance.md).
 */
#ifndef KIVI_ATTENTION_MMA_KEYS16_CUH
#define KIVI_ATTENTION_MMA_KEYS16_CUH

#include "attention_mma_parts.cuh"

/* Key words a lane reads of a token row (D / 64: channels 16 (NW tig + h) .. + 15 in word h). */
template <int D>
__host__ __device__ constexpr int kv_k16_words() {
  return D / 64;
}

/* q' = q 2^-E as the A fragments of the D / 16 k-steps (k-step 4 h + i: slot i of key word h; {hi, lo,
   hi, lo} for the channel pairs (0, 2) and (1, 3) of the slot), and 2^E (the score's scale). Rows of qf
   past the CTA's heads are zero. */
template <int D>
__device__ __forceinline__ float kv_mma_q_frags(const float *qf, int gid, int tig, uint32_t (&aq)[D / 16][4]) {
  constexpr int NW = kv_k16_words<D>();
  float4 x[D / 16];
  float mx = 0.0f;
#pragma unroll
  for (int h = 0; h < NW; h++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      x[4 * h + i] = *(const float4 *)(qf + gid * D + 16 * (NW * tig + h) + 4 * i);
      const float4 v = x[4 * h + i];
      mx = fmaxf(fmaxf(mx, fmaxf(fabsf(v.x), fabsf(v.y))), fmaxf(fabsf(v.z), fabsf(v.w)));
    }
  mx = fmaxf(mx, __shfl_xor_sync(KV_FULL, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(KV_FULL, mx, 2));
  /* 2^-E with E = floor(log2 mx) + 1, the exponent clamped so that both stay finite (mx 0: q' is 0) */
  const uint32_t ex = min(max(__float_as_uint(mx) & 0x7f800000u, 27u << 23), 227u << 23);
  const float sc = __uint_as_float((253u << 23) - ex);
#pragma unroll
  for (int ks = 0; ks < D / 16; ks++) {
    const float pr[2][2] = {{x[ks].x * sc, x[ks].z * sc}, {x[ks].y * sc, x[ks].w * sc}};
#pragma unroll
    for (int e = 0; e < 2; e++) {
      const __half2 hi = __floats2half2_rn(pr[e][0], pr[e][1]);
      const float2 b = __half22float2(hi);
      aq[ks][2 * e] = kv_h2u(hi);
      aq[ks][2 * e + 1] = kv_pack_h2(pr[e][0] - b.x, pr[e][1] - b.y);
    }
  }
  return __uint_as_float(ex + (1u << 23));
}

/* The scores of a page tile with q fixed (above), their online-softmax step (this lane's row sees the
   tile's first rem tokens), and p as fp16 pairs. */
template <int D, int NMT>
__device__ __forceinline__ void kv_mma_scores_qf(const uint8_t *stg, const kv_mma_lane &L,
                                                 const uint32_t (&aq)[D / 16][4], float ksc, int rem, float &m,
                                                 float &l, float (&o)[NMT][4], float (&zacc)[4], float (&s)[4][2]) {
  constexpr int NW = kv_k16_words<D>(), KCB = 32 * D / 4;
  const uint32_t o_kp = KCB + 64u * NW * L.tig;
  uint32_t kw[4][2];
  kv_mma_key_words<D>(stg, L.o_kw, kw);
  float acc[4][4], az[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int j = 0; j < 4; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
  for (int h = 0; h < NW; h++)
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const uint32_t(&a)[4] = aq[4 * h + i];
      /* (scale, zero) of channels c .. c + 3, c = 16 (NW tig + h) + 4 i: pairs (c, c + 2) and (c + 1, c + 3) */
      const uint4 sz = *(const uint4 *)(stg + o_kp + 64 * h + 16 * i);
      const __half2 s02 = kv_u2h(__byte_perm(sz.x, sz.z, 0x5410)), s13 = kv_u2h(__byte_perm(sz.y, sz.w, 0x5410));
      const uint32_t z02 = __byte_perm(sz.x, sz.z, 0x7632), z13 = __byte_perm(sz.y, sz.w, 0x7632);
      kv_mma_f16(az, a[0], a[1], a[2], a[3], z02, z13); /* q'.z in every column */
      /* A = q' s: hi = q'hi s rounded, lo = its exact residual + q'lo s */
      const __half2 h02 = __hmul2(kv_u2h(a[0]), s02), h13 = __hmul2(kv_u2h(a[2]), s13);
      const __half2 l02 = __hfma2(kv_u2h(a[1]), s02, __hfma2(kv_u2h(a[0]), s02, __hneg2(h02)));
      const __half2 l13 = __hfma2(kv_u2h(a[3]), s13, __hfma2(kv_u2h(a[2]), s13, __hneg2(h13)));
#pragma unroll
      for (int j = 0; j < 4; j++) { /* B: the codes c 2^-24 (fp16 subnormals, exact), one AND a pair */
        const uint32_t w = kw[j][h] >> (2 * i), w8 = w >> 8;
        kv_mma_f16(acc[j], kv_h2u(h02), kv_h2u(l02), kv_h2u(h13), kv_h2u(l13), w & 0x00030003u, w8 & 0x00030003u);
      }
    }
  /* rows gid (hi) and gid + 8 (lo) of the same head and token (x 2^24: the codes' subnormal scale), and q'.z */
  const float qz = (az[0] + az[2]) * ksc, ksc24 = ksc * 16777216.0f;
#pragma unroll
  for (int j = 0; j < 4; j++) {
    s[j][0] = fmaf(acc[j][0] + acc[j][2], ksc24, qz);
    s[j][1] = fmaf(acc[j][1] + acc[j][3], ksc24, qz);
  }
  kv_mma_softmax_p(m, l, o, zacc, s, L.tig, rem);
}

#endif /* KIVI_ATTENTION_MMA_KEYS16_CUH */
