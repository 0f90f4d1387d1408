/*
 * stats.cu — kivi_stats_block: per group min, max, mean and population variance over the finite
 * values, and the count of NaN/Inf. Never fails on non-finite input.
 *
 * Token axis (a group is G rows of one column): one thread per group, neighbouring threads on
 * neighbouring columns so every row load is coalesced and no reduction is needed; two passes in
 * double in the group's order, the CPU build's arithmetic step for step.
 * Channel axis (a group is G consecutive values of a row): 8 lanes share a group, each loading
 * G / 8 contiguous values with 16-byte loads; min, max, counts and the double sums of both passes
 * are combined with warp shuffles (no atomics). The sums then differ from the CPU's sequential
 * order by double rounding only, far below the fp32 result's rounding.
 */
#include "group.cuh"

template <int DT, int G>
static __global__ void __launch_bounds__(128)
    k_stats_block(const void *__restrict__ x, int64_t rows, int64_t cols, int32_t axis, int64_t groups, bool aligned,
                  float *__restrict__ stats, int32_t *__restrict__ nonfinite) {
  for (int64_t t = kv_grid_first(); t < groups; t += kv_grid_stride()) {
    float v[G];
    const kv_gloc l = kv_load_group_at<DT, G>(x, t, axis, rows, cols, aligned, v);
    kivi_minmax s = {};
#pragma unroll
    for (int i = 0; i < G; i++) kivi_minmax_add(&s, v[i]);
    double mean = 0.0, var = 0.0;
    if (s.cnt) {
      mean = __ddiv_rn(s.sum, (double)s.cnt);
#pragma unroll
      for (int i = 0; i < G; i++) {
        if (!isfinite(v[i])) continue;
        const double d = __dsub_rn((double)v[i], mean);
        var = __dadd_rn(var, __dmul_rn(d, d));
      }
      var = __ddiv_rn(var, (double)s.cnt);
    }
    float *o = stats + 4 * l.g;
    o[0] = s.mn;
    o[1] = s.mx;
    o[2] = (float)mean;
    o[3] = (float)var;
    nonfinite[l.g] = s.bad;
  }
}

/** Lanes sharing one channel-axis group. */
constexpr int KV_STATS_LANES = 8;

template <typename T>
__device__ __forceinline__ T kv_lanes_sum(T v) {
#pragma unroll
  for (int o = KV_STATS_LANES / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <int DT, int G>
static __global__ void __launch_bounds__(256)
    k_stats_channel(const void *__restrict__ x, int64_t groups, bool aligned, float *__restrict__ stats,
                    int32_t *__restrict__ nonfinite) {
  constexpr int PER = G / KV_STATS_LANES; /* values per lane: 4, 8 or 16 */
  constexpr int V = kv_vec<DT>::n;
  const int lane = threadIdx.x % KV_STATS_LANES;
  const int64_t first = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / KV_STATS_LANES;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x / KV_STATS_LANES;
  /* Every lane runs the same trip count, so the shuffles always see the whole warp. */
  const int64_t trips = (groups + stride - 1) / stride;
  for (int64_t k = 0; k < trips; k++) {
    const int64_t g = first + k * stride;
    const bool live = g < groups;
    float v[PER];
    const int64_t e = (live ? g : 0) * G + (int64_t)lane * PER;
    if constexpr (PER % V == 0) {
#pragma unroll
      for (int q = 0; q < PER / V; q++) {
        float t[V];
        kv_ld_chunk<DT>(x, e + q * V, aligned, t);
#pragma unroll
        for (int j = 0; j < V; j++) v[q * V + j] = t[j];
      }
    } else {
#pragma unroll
      for (int i = 0; i < PER; i++) v[i] = kv_ld<DT>(x, e + i);
    }
    float mn = INFINITY, mx = -INFINITY;
    double sum = 0.0;
    int32_t cnt = 0, bad = 0;
#pragma unroll
    for (int i = 0; i < PER; i++) {
      if (!isfinite(v[i])) {
        bad++;
        continue;
      }
      mn = fminf(mn, v[i]);
      mx = fmaxf(mx, v[i]);
      sum += (double)v[i];
      cnt++;
    }
#pragma unroll
    for (int o = KV_STATS_LANES / 2; o > 0; o >>= 1) {
      mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, o));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    }
    sum = kv_lanes_sum(sum);
    cnt = kv_lanes_sum(cnt);
    bad = kv_lanes_sum(bad);
    const double mean = cnt ? sum / (double)cnt : 0.0;
    double sq = 0.0;
#pragma unroll
    for (int i = 0; i < PER; i++) {
      if (!isfinite(v[i])) continue;
      const double d = (double)v[i] - mean;
      sq += d * d;
    }
    sq = kv_lanes_sum(sq);
    if (live && lane == 0) {
      float *o = stats + 4 * g;
      o[0] = cnt ? mn : 0.0f;
      o[1] = cnt ? mx : 0.0f;
      o[2] = (float)mean;
      o[3] = cnt ? (float)(sq / (double)cnt) : 0.0f;
      nonfinite[g] = bad;
    }
  }
}

extern "C" KIVI_API kivi_status kivi_stats_block(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows,
                                                 int64_t cols, kivi_axis axis, int32_t group, float *stats,
                                                 int32_t *nonfinite) {
  KIVI_SPEC_ENTER(kivi_spec_stats_block(x, dtype, rows, cols, axis, group, stats, nonfinite),
                  kv_validate(ctx, &spec, &sh));
  const bool aligned = ((uintptr_t)x & 15u) == 0;
  const unsigned grid = kv_grid(ctx, (sh.groups + 127) / 128, 16);
  const unsigned grid_c = kv_grid(ctx, (sh.groups * KV_STATS_LANES + 255) / 256, 8);
#define KV_ST_G(DT, G)                                                                                \
  if (sh.axis == KIVI_AXIS_CHANNEL)                                                                   \
    k_stats_channel<DT, G><<<grid_c, 256, 0, ctx->stream>>>(x, sh.groups, aligned, stats, nonfinite); \
  else                                                                                                \
    k_stats_block<DT, G>                                                                              \
        <<<grid, 128, 0, ctx->stream>>>(x, sh.rows, sh.cols, sh.axis, sh.groups, aligned, stats, nonfinite)
#define KV_ST(DT)           \
  if (group == 32) {        \
    KV_ST_G(DT, 32);        \
  } else if (group == 64) { \
    KV_ST_G(DT, 64);        \
  } else {                  \
    KV_ST_G(DT, 128);       \
  }
  KV_DISPATCH_DT(dtype, KV_ST)
#undef KV_ST
#undef KV_ST_G
  return kv_launched(ctx, spec.op, "k_stats_block");
}
