/*
 * attention_mma_keys16.cuh — the key side of the tensor-core decode attention for several query heads a
 * KV head (KM 2 of k_attend_mma, attention_mma.cuh): q s as fp16 hi + lo halves against the codes as fp16
 * subnormals.
 *
 * The int8-plane key side (kv_mma_key_frags) rebuilds q s as three int8 planes for every query head each
 * key group (32 tokens): ~75 instructions a head and lane, a third of a tile's work at a GQA ratio of 4.
 * Here a head costs about half of that and the score stays exact to ~2^-22:
 *   mma m16n8k16 f16 -> f32, rows = query heads, k = channels, n = tokens.
 *   A = y = q s 2^-2i inv per (head, channel) of the group, inv a power of two per head (|y| < 2^15):
 *   its fp16 rounding (hi) in row h, the rest (lo) in row h + 8, so hi + lo is y to ~2^-22. Each lane
 *   builds one 4-channel block of every head (the lanes' blocks ordered so that the stores do not
 *   conflict) and the owners read theirs back from the warp's slice of shared memory.
 *   B = codes as fp16 subnormals: the mask 0x00030003 << 2i of a key word is the half pair c 4^i 2^-24
 *   of channels (4i, 4i + 2) of the word (after a shift by 8: 4i + 1, 4i + 3), one LOP a pair; a k-step
 *   takes one slot i of one of this lane's key words, and A holds q s 4^-i in the same channel order.
 *   The score is (hi + lo rows) 2^24 / inv + q.z (q.z summed over the warp in fp32).
 * Against kv_mma_key_frags: no max-exponent planes (one fp16 rounding and its residual instead of three
 * int8 roundings), and the codes need no byte spreading; the MMAs are as many.
 */
#ifndef KIVI_ATTENTION_MMA_KEYS16_CUH
#define KIVI_ATTENTION_MMA_KEYS16_CUH

#include "attention_mma_parts.cuh"

/* Key words a lane reads of a token row (D / 64: channels 16 (NW tig + h) .. + 15 in word h). */
template <int D>
__host__ __device__ constexpr int kv_k16_words() {
  return D / 64;
}

/* The block of 4 channels (4 b .. 4 b + 3) lane `lane` builds for every head: k-step ks = lane / 4 of quad
   lane tig = lane % 4, b = 4 (D / 64) tig + ks (lanes past D / 4 build none). Eight consecutive lanes
   store 16 bytes each at ks 16 + tig 4 words: every bank once. */
template <int D>
__device__ __forceinline__ int kv_k16_block(int lane) {
  return 4 * kv_k16_words<D>() * (lane % 4) + lane / 4;
}

/* The key A fragments of the key group at the head of stage stg for heads 0 .. nq - 1 (each lane builds
   block kv_k16_block of every head into the warp's slice wab, [head][ks][tig] x 4 words, head stride
   kv_mma_aw16(D); the owner (gid, tig) reads its D / 16 k-steps back), and the score's scale ksc and
   offset kqz of head gid. */
template <int D>
__device__ __forceinline__ void kv_mma_key_frags16(const uint8_t *stg, const float *qf, uint32_t *wab, int nq,
                                                   const kv_mma_lane &L, uint32_t (&aq)[D / 16][4], float &ksc,
                                                   float &kqz) {
  constexpr int KCB = 32 * D / 4, NKS = D / 16;
  const int lane = L.lane, gid = L.gid, tig = L.tig;
  const int b = kv_k16_block<D>(lane), i = (lane / 4) % 4;
  const bool builds = lane < D / 4;
  float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, zc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (builds) {
    const uint4 sz4 = *(const uint4 *)(stg + KCB + 16 * b);
    const uint32_t sz[4] = {sz4.x, sz4.y, sz4.z, sz4.w};
#pragma unroll
    for (int e = 0; e < 4; e++) {
      sc[e] = kv_h2f(sz[e] & 0xffffu);
      zc[e] = kv_h2f(sz[e] >> 16);
    }
  }
  __syncwarp(); /* every lane has read the previous group's fragments */
  for (int h = 0; h < nq; h++) {
    const float4 q4 = builds ? *(const float4 *)(qf + h * D + 4 * b) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    const float qv[4] = {q4.x, q4.y, q4.z, q4.w};
    float x[4], mx = 0.0f, qz = 0.0f;
#pragma unroll
    for (int e = 0; e < 4; e++) {
      x[e] = qv[e] * sc[e];
      mx = fmaxf(mx, fabsf(x[e]));
      qz = fmaf(qv[e], zc[e], qz);
    }
    /* mx >= 0 and never NaN (fmaxf drops NaN), so its bits order as its values: one REDUX */
    mx = __uint_as_float(__reduce_max_sync(KV_FULL, __float_as_uint(mx)));
#pragma unroll
    for (int o2 = 16; o2 >= 1; o2 >>= 1) qz += __shfl_xor_sync(KV_FULL, qz, o2);
    /* inv = 2^(14 - floor(log2 mx)): |x inv| < 2^15, below fp16's largest; the exponent clamped so that inv
       stays finite (mx 0: every x is 0); the slot's 4^-i goes with it */
    const uint32_t ex = max(__float_as_uint(mx) & 0x7f800000u, 27u << 23);
    const float inv = __uint_as_float(((268u - 2u * (uint32_t)i) << 23) - ex);
    if (builds) {
      uint32_t w[4];
#pragma unroll
      for (int e = 0; e < 2; e++) { /* pairs (0, 2) and (1, 3): the k-slots 2 tig (+1) and 2 tig + 8 (+9) */
        const float y0 = x[e] * inv, y1 = x[e + 2] * inv;
        const __half2 hi = __floats2half2_rn(y0, y1);
        const float2 back = __half22float2(hi);
        w[2 * e] = kv_h2u(hi);
        w[2 * e + 1] = kv_pack_h2(y0 - back.x, y1 - back.y);
      }
      *(uint4 *)(wab + h * kv_mma_aw16(D) + 16 * (lane / 4) + 4 * tig) = make_uint4(w[0], w[1], w[2], w[3]);
    }
    if (gid == h) {
      ksc = __uint_as_float(ex + (10u << 23)); /* 2^24 / (inv 4^i) */
      kqz = qz;
    }
  }
  __syncwarp();
  if (gid < nq) { /* the rows of heads past nq keep zeros */
    const uint4 *mine = (const uint4 *)(wab + gid * kv_mma_aw16(D) + 4 * tig);
#pragma unroll
    for (int ks = 0; ks < NKS; ks++) {
      const uint4 u = mine[4 * ks];
      aq[ks][0] = u.x, aq[ks][1] = u.y, aq[ks][2] = u.z, aq[ks][3] = u.w;
    }
  }
}

/* The scores of a page tile (4 n-tiles of 8 tokens, rows = heads, as kv_mma_scores), their online-softmax
   step, and p as fp16 pairs (s[2 r][0], s[2 r + 1][0]: run r). */
template <int D, int NMT>
__device__ __forceinline__ void kv_mma_scores_k16(const uint8_t *stg, const kv_mma_lane &L,
                                                  const uint32_t (&aq)[D / 16][4], float ksc, float kqz, float &m,
                                                  float &l, float (&o)[NMT][4], float (&zacc)[4], float (&s)[4][2]) {
  constexpr int NW = kv_k16_words<D>();
  uint32_t kw[4][2];
  kv_mma_key_words<D>(stg, L.o_kw, kw);
  float acc[4][4];
#pragma unroll
  for (int j = 0; j < 4; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
  for (int h = 0; h < NW; h++) {
    uint32_t kw8[4];
#pragma unroll
    for (int j = 0; j < 4; j++) kw8[j] = kw[j][h] >> 8;
#pragma unroll
    for (int i = 0; i < 4; i++) {
      const uint32_t msk = 0x00030003u << (2 * i);
      const uint32_t(&a)[4] = aq[4 * h + i];
#pragma unroll
      for (int j = 0; j < 4; j++) kv_mma_f16(acc[j], a[0], a[1], a[2], a[3], kw[j][h] & msk, kw8[j] & msk);
    }
  }
  /* rows gid (hi) and gid + 8 (lo) of the same head and token */
#pragma unroll
  for (int j = 0; j < 4; j++) {
    s[j][0] = fmaf(acc[j][0] + acc[j][2], ksc, kqz);
    s[j][1] = fmaf(acc[j][1] + acc[j][3], ksc, kqz);
  }
  kv_mma_softmax_p(m, l, o, zacc, s, L.tig);
}

#endif /* KIVI_ATTENTION_MMA_KEYS16_CUH */
