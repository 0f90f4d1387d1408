/*
 * attention_simt_bits.cuh — the bit tricks and lane reductions of the CUDA-core decode attention
 * (attention_simt.cuh): codes to floats without I2F, fp16 rows to floats, the butterfly reduce-scatter of
 * the key scores. Included by attention_simt.cuh.
 */
#ifndef KIVI_ATTENTION_SIMT_BITS_CUH
#define KIVI_ATTENTION_SIMT_BITS_CUH

#include "attention.cuh"

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

/* One butterfly step of kv_reduce8: of the 2N vectors in v the lane keeps the half `upper` picks and
   adds the other half, sent by the lane `off` away (which keeps the opposite half), into out. */
template <int N, int HC>
__device__ __forceinline__ void kv_fold(const float (&v)[2 * N][HC], float (&out)[N][HC], bool upper, int off) {
#pragma unroll
  for (int k = 0; k < N; k++)
#pragma unroll
    for (int h = 0; h < HC; h++) {
      const float send = upper ? v[k][h] : v[k + N][h], keep = upper ? v[k + N][h] : v[k][h];
      out[k][h] = keep + __shfl_xor_sync(KV_FULL, send, off);
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
  float a[4][HC], b[2][HC], c[1][HC];
  kv_fold<4>(v, a, u4, LANES / 2);
  kv_fold<2>(a, b, u2, LANES / 4);
  kv_fold<1>(b, c, u1, LANES / 8);
#pragma unroll
  for (int h = 0; h < HC; h++) r[h] = c[0][h];
#pragma unroll
  for (int off = LANES / 16; off >= 1; off >>= 1)
#pragma unroll
    for (int h = 0; h < HC; h++) r[h] += __shfl_xor_sync(KV_FULL, r[h], off);
}

/* Codes 2K and 2K + 1 of w (after the shift by 19 - 4K: code 2K at b 19, 2K + 1 at b 21) into f. */
template <int K>
__device__ __forceinline__ void kv_unpack2x2(uint32_t w, uint32_t m19, uint32_t m21, uint32_t one, float (&f)[8]) {
  const uint32_t x = kv_sh<19 - 4 * K>(w);
  f[2 * K] = kv_mf(x, m19, one);
  f[2 * K + 1] = kv_mf(x, m21, one);
}
/* 8 2-bit codes of w (after the shift by 19, 15, 11, 7: codes 2k at b 19, 2k + 1 at b 21) as 1 + c / 16 and
   1 + c / 4 */
__device__ __forceinline__ void kv_unpack2x8(uint32_t w, uint32_t m19, uint32_t m21, uint32_t one, float (&f)[8]) {
  kv_unpack2x2<0>(w, m19, m21, one, f);
  kv_unpack2x2<1>(w, m19, m21, one, f);
  kv_unpack2x2<2>(w, m19, m21, one, f);
  kv_unpack2x2<3>(w, m19, m21, one, f);
}
/* 8 4-bit codes of w as 1 + c / 16 (b 19) */
__device__ __forceinline__ void kv_unpack4x8(uint32_t w, uint32_t m4, uint32_t one, float (&f)[8]) {
  f[0] = kv_mf(kv_sh<19>(w), m4, one);
  f[1] = kv_mf(kv_sh<15>(w), m4, one);
  f[2] = kv_mf(kv_sh<11>(w), m4, one);
  f[3] = kv_mf(kv_sh<7>(w), m4, one);
  f[4] = kv_mf(kv_sh<3>(w), m4, one);
  f[5] = kv_mf(kv_sh<-1>(w), m4, one);
  f[6] = kv_mf(kv_sh<-5>(w), m4, one);
  f[7] = kv_mf(kv_sh<-9>(w), m4, one);
}

#endif /* KIVI_ATTENTION_SIMT_BITS_CUH */
