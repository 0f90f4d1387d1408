/*
 * cache_scan.cu — the cache's scan of its inputs on the device (k and v of an append, q of an
 * attention): the first NaN or Inf, or with f16range also the first finite value fp16 cannot hold,
 * and its name for the message.
 */
#include <stdio.h>

#include "cache.cuh"

/* ---------------------------------------------------------------- NaN / Inf scan --------- */

/* NaN / Inf, or with f16range also a finite f32 / bf16 that fp16 rounds to Inf (|x| >= 65520) */
template <int DT>
__device__ __forceinline__ bool kv_c_bad(uint32_t u, bool f16range) {
  const uint32_t lim = f16range ? 0x477ff000u : 0x7f800000u;
  if constexpr (DT == KIVI_F32)
    return (u & 0x7fffffffu) >= lim;
  else if constexpr (DT == KIVI_F16)
    return (u & 0x7c00u) == 0x7c00u;
  else
    return ((u << 16) & 0x7fffffffu) >= lim;
}

/* Grid-stride over x [n]; the lowest bad index goes to *first by atomicMin (only finders touch it). */
template <int DT>
static __global__ void k_cache_scan(const void *__restrict__ x, int64_t n, bool f16range,
                                    unsigned long long *__restrict__ first) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t bad = INT64_MAX;
  const bool vec = ((uintptr_t)x & 15u) == 0;
  constexpr int V = 16 / kv_dt<DT>::size;
  int64_t from = 0;
  if (vec) {
    const uint4 *xv = (const uint4 *)x;
    const int64_t nv = n / V;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += stride) {
      const uint4 u = xv[i];
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int e = 0; e < V; e++) {
        const uint32_t b = DT == KIVI_F32 ? w[e] : ((w[e / 2] >> (16 * (e & 1))) & 0xffffu);
        if (kv_c_bad<DT>(b, f16range) && i * V + e < bad) bad = i * V + e;
      }
    }
    from = nv * V;
  }
  for (int64_t i = from + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t b = DT == KIVI_F32 ? ((const uint32_t *)x)[i] : (uint32_t)((const uint16_t *)x)[i];
    if (kv_c_bad<DT>(b, f16range) && i < bad) bad = i;
  }
  if (bad != INT64_MAX) atomicMin(first, (unsigned long long)bad);
}

kivi_status kv_cache_scan(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, int64_t n, bool f16range,
                          int slot, int64_t *first) {
  *first = -1;
  kivi_status st = kv_scratch_reset(ctx, op);
  if (st) return st;
  const int64_t bytes = n * (dtype == KIVI_F32 ? 4 : 2);
  const unsigned grid = kv_grid(ctx, (bytes + 256 * 64 - 1) / (256 * 64), 8);
  unsigned long long *s = ctx->d_scratch + slot;
#define KV_SCAN(DT) k_cache_scan<DT><<<grid, 256, 0, ctx->stream>>>(x, n, f16range, s)
  KV_DISPATCH_DT(dtype, KV_SCAN)
#undef KV_SCAN
  if ((st = kv_launched(ctx, op, "k_cache_scan"))) return st;
  if ((st = kv_scratch_read(ctx, op))) return st;
  const unsigned long long b = ctx->h_scratch[slot];
  if (b != ~0ull) *first = (int64_t)b;
  return KIVI_OK;
}

const char *kv_cache_bad_name(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t i, char (&buf)[32]) {
  uint32_t bits = 0;
  const size_t es = dtype == KIVI_F32 ? 4 : 2;
  if (cudaMemcpy(&bits, (const char *)x + (size_t)i * es, es, cudaMemcpyDeviceToHost) != cudaSuccess) {
    (void)cudaGetLastError();
    return "a non-finite value";
  }
  (void)ctx;
  const float v = dtype == KIVI_F32
                      ? kivi_bits_f32(bits)
                      : (dtype == KIVI_F16 ? kivi_f16_to_f32((uint16_t)bits) : kivi_bf16_to_f32((uint16_t)bits));
  if (v == v && v != INFINITY && v != -INFINITY) {
    snprintf(buf, sizeof buf, "%g (beyond fp16)", (double)v);
    return buf;
  }
  return v != v ? "NaN" : (v > 0 ? "+Inf" : "-Inf");
}
