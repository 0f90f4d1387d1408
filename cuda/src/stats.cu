/*
 * stats.cu — kivi_stats_block: per group min, max, mean and population variance over the finite
 * values, and the count of NaN/Inf. One thread per group (group.cuh), values in registers, two
 * passes in double in the group's order: the CPU build's arithmetic step for step (double sums,
 * no contraction: __dadd_rn / __dmul_rn), so both builds agree to the last bit in practice.
 * Never fails on non-finite input.
 */
#include "group.cuh"

template <int DT, int G>
static __global__ void __launch_bounds__(128)
    k_stats_block(const void *__restrict__ x, int64_t rows, int64_t cols, int32_t axis, int64_t groups, bool aligned,
                  float *__restrict__ stats, int32_t *__restrict__ nonfinite) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < groups; t += stride) {
    const kv_gloc l = kv_group_at(t, axis, rows, cols, G);
    float v[G];
    kv_load_group<DT, G>(x, l, aligned, v);
    double sum = 0.0;
    float mn = 0.0f, mx = 0.0f;
    int32_t cnt = 0, bad = 0;
#pragma unroll
    for (int i = 0; i < G; i++) {
      const float a = v[i];
      if (!isfinite(a)) {
        bad++;
        continue;
      }
      if (cnt == 0 || a < mn) mn = a;
      if (cnt == 0 || a > mx) mx = a;
      sum = __dadd_rn(sum, (double)a);
      cnt++;
    }
    double mean = 0.0, var = 0.0;
    if (cnt) {
      mean = __ddiv_rn(sum, (double)cnt);
#pragma unroll
      for (int i = 0; i < G; i++) {
        if (!isfinite(v[i])) continue;
        const double d = __dsub_rn((double)v[i], mean);
        var = __dadd_rn(var, __dmul_rn(d, d));
      }
      var = __ddiv_rn(var, (double)cnt);
    }
    float *o = stats + 4 * l.g;
    o[0] = mn;
    o[1] = mx;
    o[2] = (float)mean;
    o[3] = (float)var;
    nonfinite[l.g] = bad;
  }
}

extern "C" KIVI_API kivi_status kivi_stats_block(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows,
                                                 int64_t cols, kivi_axis axis, int32_t group, float *stats,
                                                 int32_t *nonfinite) {
  kv_spec spec = kv_spec_init("kivi_stats_block", KV_NEED_MATRIX);
  spec.ptrs[0] = {"x", x};
  spec.ptrs[1] = {"stats", stats};
  spec.ptrs[2] = {"nonfinite", nonfinite};
  spec.rows = rows;
  spec.cols = cols;
  spec.axis = axis;
  spec.group = group;
  spec.dtype_name = "dtype";
  spec.dtype = dtype;
  kv_shape sh;
  kivi_status st = kv_validate(ctx, &spec, &sh);
  if (st) return st;
  const bool aligned = ((uintptr_t)x & 15u) == 0;
  const unsigned grid = kv_grid(ctx, (sh.groups + 127) / 128, 16);
#define KV_ST_G(DT, G)                                                                                             \
  k_stats_block<DT, G><<<grid, 128, 0, ctx->stream>>>(x, sh.rows, sh.cols, sh.axis, sh.groups, aligned, stats, \
                                                      nonfinite)
#define KV_ST(DT)                         \
  if (group == 32) KV_ST_G(DT, 32);       \
  else if (group == 64) KV_ST_G(DT, 64);  \
  else KV_ST_G(DT, 128);
  KV_DISPATCH_DT(dtype, KV_ST)
#undef KV_ST
#undef KV_ST_G
  return kv_launched(ctx, spec.op, "k_stats_block");
}
