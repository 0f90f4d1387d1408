/*
 * cache_page.cuh — private to the CUDA cache's kernels (cache_append.cu, cache_read.cu): element
 * conversions, the codebook fit and the packing of one group, written operation for operation as the
 * CPU build's, and a page part's layout as the kernels take it (kv_part_dev).
 */
#ifndef KIVI_CUDA_CACHE_PAGE_CUH
#define KIVI_CUDA_CACHE_PAGE_CUH

#include "cache.cuh"

/* ---------------------------------------------------------------- device helpers --------- */

__device__ __forceinline__ float kv_hf(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t kv_fh(float f) { return __half_as_ushort(__float2half_rn(f)); }

/* Element i of x (runtime dtype) rounded to fp16 (f32: one RNE rounding; bf16: exact to f32 first). */
__device__ __forceinline__ uint16_t kv_in_half(const void *__restrict__ x, kivi_dtype dt, int64_t i) {
  if (dt == KIVI_F16) return ((const uint16_t *)x)[i];
  if (dt == KIVI_F32) return kv_fh(((const float *)x)[i]);
  return kv_fh(__uint_as_float((uint32_t)((const uint16_t *)x)[i] << 16));
}

/*
 * kivi_codebook_fit for one group (the CPU build's fit_group, operation for operation, without FMA
 * contraction): uniform grid, nearest assignment, updates c += sum(x - c) / count over the values
 * assigned under the current centroids, stop after `iters` updates or when no assignment changed.
 * Assignments are recomputed from the old and new centroids instead of stored. x[i * stride], G values.
 * Writes the fp16 centroids sorted ascending (stable, as the CPU's insertion sort).
 */
template <int NC>
__device__ void kv_cb_fit(const uint16_t *x, int stride, int G, int fit, int iters, uint16_t (&h)[NC]) {
  float mn = kv_hf(x[0]), mx = mn;
  for (int i = 1; i < G; i++) {
    const float v = kv_hf(x[i * stride]);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  float c[NC];
#pragma unroll
  for (int i = 0; i < NC; i++) c[i] = __fadd_rn(mn, __fdiv_rn(__fmul_rn((float)i, __fsub_rn(mx, mn)), (float)(NC - 1)));
  c[NC - 1] = mx;
  const bool pinned = fit == KIVI_FIT_PINNED;
  for (int it = 0; it < iters; it++) {
    float mid[NC - 1], sum[NC];
    int cnt[NC];
#pragma unroll
    for (int k = 0; k < NC - 1; k++) mid[k] = __fmul_rn(0.5f, __fadd_rn(c[k], c[k + 1]));
#pragma unroll
    for (int k = 0; k < NC; k++) {
      sum[k] = 0.0f;
      cnt[k] = 0;
    }
    for (int i = 0; i < G; i++) {
      const float v = kv_hf(x[i * stride]);
      int q = 0;
#pragma unroll
      for (int k = 0; k < NC - 1; k++) q += v >= mid[k] ? 1 : 0;
#pragma unroll
      for (int k = 0; k < NC; k++)
        if (q == k) {
          sum[k] = __fadd_rn(sum[k], __fsub_rn(v, c[k]));
          cnt[k]++;
        }
    }
    float cn[NC];
#pragma unroll
    for (int k = 0; k < NC; k++) {
      const bool moves = !pinned || (k > 0 && k < NC - 1);
      cn[k] = (moves && cnt[k]) ? __fadd_rn(c[k], __fdiv_rn(sum[k], (float)cnt[k])) : c[k];
    }
    float midn[NC - 1];
#pragma unroll
    for (int k = 0; k < NC - 1; k++) midn[k] = __fmul_rn(0.5f, __fadd_rn(cn[k], cn[k + 1]));
    bool changed = false;
    for (int i = 0; i < G && !changed; i++) {
      const float v = kv_hf(x[i * stride]);
      int q0 = 0, q1 = 0;
#pragma unroll
      for (int k = 0; k < NC - 1; k++) {
        q0 += v >= mid[k] ? 1 : 0;
        q1 += v >= midn[k] ? 1 : 0;
      }
      changed = q0 != q1;
    }
#pragma unroll
    for (int k = 0; k < NC; k++) c[k] = cn[k];
    if (!changed) break;
  }
  kv_centroids_f16_sorted<NC>(c, h);
}

/* Fit + codes of one group x[i * stride] (G values, G % cpw == 0); centroids to cent[NC], codes to words. */
template <int NC>
__device__ void kv_cb_group(const uint16_t *x, int stride, int G, int fit, int iters, uint16_t *cent, uint32_t *words) {
  constexpr int BITS = NC == 4 ? 2 : 4, CPW = 32 / BITS;
  uint16_t h[NC];
  kv_cb_fit<NC>(x, stride, G, fit, iters, h);
  float cf[NC];
#pragma unroll
  for (int k = 0; k < NC; k++) {
    cent[k] = h[k];
    cf[k] = kivi_f16_to_f32(h[k]);
  }
  for (int w = 0; w < G / CPW; w++) {
    uint32_t word = 0;
    for (int j = 0; j < CPW; j++) word |= kivi_nearest_code(kv_hf(x[(w * CPW + j) * stride]), cf, NC) << (BITS * j);
    words[w] = word;
  }
}

/** A page part (K or V) as the kernels take it. */
struct kv_part_dev {
  uint64_t codes, head, page; /* bytes: params offset in a head block, head block, page (all heads) */
  int32_t bits, kind, group, fit, iters;
};

/** The layout of the K (is_value 0) or V part of a page, for the kernels. */
static inline kv_part_dev kv_part_dev_of(const kivi_cache_config *c, const kivi_part_layout &l, int is_value) {
  kv_part_dev d;
  d.codes = l.codes;
  d.head = l.head;
  d.page = l.page;
  d.bits = is_value ? c->v_bits : c->k_bits;
  d.kind = is_value ? c->v_kind : c->k_kind;
  d.group = is_value ? c->v_group : c->k_group;
  d.fit = is_value ? c->v_fit : c->k_fit;
  d.iters = is_value ? c->v_iters : c->k_iters;
  return d;
}

#endif /* KIVI_CUDA_CACHE_PAGE_CUH */
