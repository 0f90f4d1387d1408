/*
 * group.cuh — one thread per group: where a group lives and how to load it. Used by the ops whose
 * per-group work is long or order-sensitive (statistics, codebook fitting): one thread walks its
 * group in the group's own order, so sums come out exactly as the CPU build's sequential loops.
 *
 * Thread t (0 <= t < groups) takes, on the token axis, group row gr = t / cols of column
 * c = t % cols (neighbouring threads read neighbouring columns: coalesced), and on the channel axis
 * group t itself (16-byte loads along the row). Element i of the group sits at x[base + i * step],
 * and its code is slot i of the group's words codes[g * (G / cpw) ...] on both axes.
 */
#ifndef KIVI_CUDA_GROUP_CUH
#define KIVI_CUDA_GROUP_CUH

#include "common.cuh"

struct kv_gloc {
  int64_t g;    /* group index (kivi.h numbering) */
  int64_t base; /* element index of the group's first value */
  int64_t step; /* elements between consecutive values of the group */
};

__device__ __forceinline__ kv_gloc kv_group_at(int64_t t, int32_t axis, int64_t rows, int64_t cols, int32_t G) {
  kv_gloc l;
  if (axis == KIVI_AXIS_TOKEN) {
    const int64_t gr = t / cols, c = t % cols;
    l.g = c * (rows / G) + gr;
    l.base = gr * G * cols + c;
    l.step = cols;
  } else {
    l.g = t;
    l.base = t * G;
    l.step = 1;
  }
  return l;
}

/** The G values of a group as floats, in group order. */
template <int DT, int G>
__device__ __forceinline__ void kv_load_group(const void *__restrict__ x, const kv_gloc &l, bool aligned,
                                              float (&v)[G]) {
  constexpr int V = kv_vec<DT>::n;
  if (l.step == 1) {
#pragma unroll
    for (int q = 0; q < G / V; q++) {
      float t[V];
      kv_ld_chunk<DT>(x, l.base + q * V, aligned, t);
#pragma unroll
      for (int j = 0; j < V; j++) v[q * V + j] = t[j];
    }
  } else {
#pragma unroll
    for (int i = 0; i < G; i++) v[i] = kv_ld<DT>(x, l.base + (int64_t)i * l.step);
  }
}

/** Group t's location, its G values loaded into v (kv_group_at, then kv_load_group). */
template <int DT, int G>
__device__ __forceinline__ kv_gloc kv_load_group_at(const void *__restrict__ x, int64_t t, int32_t axis, int64_t rows,
                                                    int64_t cols, bool aligned, float (&v)[G]) {
  const kv_gloc l = kv_group_at(t, axis, rows, cols, G);
  kv_load_group<DT, G>(x, l, aligned, v);
  return l;
}

#endif /* KIVI_CUDA_GROUP_CUH */
