/*
 * codebook.cu — non-uniform format on the device: kivi_codebook_fit (1-D k-means / Lloyd-Max in
 * fp32), kivi_codebook_quantize, kivi_codebook_encode (fit + quantize + pack in one kernel, x read
 * once) and kivi_codebook_dequantize.
 *
 * One thread per group (group.cuh): the G values, the codes (packed 4 bits each), the centroids and
 * the per-cluster sums live in registers (every array indexed by unrolled constants). The thread
 * walks its group in the group's order, so min/max, the cluster sums (fp32, sequential), the means
 * (IEEE division), the nearest-centroid test (kivi_format.h's midpoints) and the squared-error sum
 * are the CPU build's operations in the CPU build's order, with no contraction (__f*_rn).
 */
#include "group.cuh"

/* Nearest code of a under sorted centroids c (kivi_nearest_code's comparisons) and that centroid. */
template <int NC>
__device__ __forceinline__ uint32_t kv_nearest(float a, const float (&mid)[NC - 1], const float (&c)[NC], float *cq) {
  uint32_t q = 0;
#pragma unroll
  for (int i = 0; i < NC - 1; i++) q += (a >= mid[i]) ? 1u : 0u;
  float r = c[0];
#pragma unroll
  for (int k = 1; k < NC; k++) r = (q >= (uint32_t)k) ? c[k] : r;
  *cq = r;
  return q;
}

template <int NC>
__device__ __forceinline__ void kv_mids(const float (&c)[NC], float (&mid)[NC - 1]) {
#pragma unroll
  for (int i = 0; i < NC - 1; i++) mid[i] = __fmul_rn(0.5f, __fadd_rn(c[i], c[i + 1]));
}

/* Assigns every value (codes packed 4 bits per value into qp), returns the fp32 squared-error sum in
   group order; *changed |= any code differs from the previous qp. */
template <int G, int NC>
__device__ __forceinline__ float kv_assign(const float (&v)[G], const float (&c)[NC], uint32_t (&qp)[G / 8],
                                           bool *changed) {
  float mid[NC - 1];
  kv_mids<NC>(c, mid);
  float sse = 0.0f;
  bool ch = false;
#pragma unroll
  for (int w = 0; w < G / 8; w++) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
      float cq;
      const uint32_t q = kv_nearest<NC>(v[w * 8 + j], mid, c, &cq);
      const float e = __fsub_rn(v[w * 8 + j], cq);
      sse = __fadd_rn(sse, __fmul_rn(e, e));
      word |= q << (4 * j);
    }
    ch |= word != qp[w];
    qp[w] = word;
  }
  *changed = ch;
  return sse;
}

/*
 * kivi.h kivi_codebook_fit for one group, as the CPU build's fit_group: uniform grid from min/max
 * (last centroid exactly max), nearest assignment, then up to max_iters updates c += (sum of
 * (x - c)) / count in group order (pinned: the inner centroids only; empty clusters keep theirs),
 * stopping when no code changed. Writes the sorted
 * fp16 centroids to h; trace [max_iters + 1] (may be NULL). Returns the number of updates.
 */
template <int G, int NC>
__device__ int32_t kv_fit_group(const float (&v)[G], int32_t fit, int32_t max_iters, uint16_t (&h)[NC],
                                float *__restrict__ trace) {
  float mn = v[0], mx = v[0];
#pragma unroll
  for (int i = 1; i < G; i++) {
    mn = v[i] < mn ? v[i] : mn;
    mx = v[i] > mx ? v[i] : mx;
  }
  float c[NC];
#pragma unroll
  for (int i = 0; i < NC; i++) c[i] = __fadd_rn(mn, __fdiv_rn(__fmul_rn((float)i, __fsub_rn(mx, mn)), (float)(NC - 1)));
  c[NC - 1] = mx;

  uint32_t qp[G / 8];
#pragma unroll
  for (int w = 0; w < G / 8; w++) qp[w] = 0xffffffffu; /* no code yet (codes are < 16) */
  bool changed;
  float sse = kv_assign<G, NC>(v, c, qp, &changed);
  if (trace) trace[0] = sse;

  const bool pinned = fit == KIVI_FIT_PINNED;
  int32_t it = 0;
  while (it < max_iters) {
    float sum[NC];
    int32_t cnt[NC];
#pragma unroll
    for (int k = 0; k < NC; k++) {
      sum[k] = 0.0f;
      cnt[k] = 0;
    }
#pragma unroll
    for (int i = 0; i < G; i++) {
      const uint32_t q = (qp[i / 8] >> (4 * (i % 8))) & 15u;
#pragma unroll
      for (int k = 0; k < NC; k++) {
        if (q == (uint32_t)k) {
          sum[k] = __fadd_rn(sum[k], __fsub_rn(v[i], c[k]));
          cnt[k]++;
        }
      }
    }
#pragma unroll
    for (int k = 0; k < NC; k++) {
      const bool moves = !pinned || (k > 0 && k < NC - 1);
      if (moves && cnt[k]) c[k] = __fadd_rn(c[k], __fdiv_rn(sum[k], (float)cnt[k]));
    }
    it++;
    sse = kv_assign<G, NC>(v, c, qp, &changed);
    if (trace) trace[it] = sse;
    if (!changed) break;
  }
  if (trace)
    for (int32_t k = it + 1; k <= max_iters; k++) trace[k] = sse;

  kv_centroids_f16_sorted<NC>(c, h);
  return it;
}

/* Codes of the group against fp16 centroids h (sorted), written as the group's G / cpw words. */
template <int G, int BITS>
__device__ __forceinline__ void kv_code_group(const float (&v)[G], const uint16_t (&h)[1 << BITS], int32_t assign,
                                              uint32_t *__restrict__ words) {
  constexpr int NC = 1 << BITS, CPW = 32 / BITS;
  float c[NC], mid[NC - 1];
#pragma unroll
  for (int k = 0; k < NC; k++) c[k] = kivi_f16_to_f32(h[k]);
  kv_mids<NC>(c, mid);
  const bool interval = assign == KIVI_ASSIGN_INTERVAL;
#pragma unroll
  for (int w = 0; w < G / CPW; w++) {
    uint32_t word = 0;
#pragma unroll
    for (int j = 0; j < CPW; j++) {
      const float a = v[w * CPW + j];
      uint32_t q;
      if (interval) {
        /* kivi_interval_code */
        q = 0;
#pragma unroll
        for (int i = 1; i + 1 < NC; i++) q += (a >= c[i]) ? 1u : 0u;
        if (a > c[NC - 1]) q = NC - 1;
      } else {
        q = 0;
#pragma unroll
        for (int i = 0; i < NC - 1; i++) q += (a >= mid[i]) ? 1u : 0u;
      }
      word |= q << (BITS * j);
    }
    words[w] = word;
  }
}

/* ---------------------------------------------------------------- kernels ---------------- */

/* mode 0: fit (centroids, iters, inertia), 1: encode (fit + codes). */
template <int DT, int G, int BITS>
static __global__ void __launch_bounds__(128)
    k_codebook_fit(const void *__restrict__ x, int64_t rows, int64_t cols, int32_t axis, int64_t groups, bool aligned,
                   int32_t fit, int32_t max_iters, int32_t assign, uint16_t *__restrict__ centroids,
                   int32_t *__restrict__ iters, float *__restrict__ inertia, uint32_t *__restrict__ codes) {
  constexpr int NC = 1 << BITS, CPW = 32 / BITS;
  for (int64_t t = kv_grid_first(); t < groups; t += kv_grid_stride()) {
    float v[G];
    const kv_gloc l = kv_load_group_at<DT, G>(x, t, axis, rows, cols, aligned, v);
    uint16_t h[NC];
    float *trace = inertia ? inertia + l.g * (int64_t)(max_iters + 1) : nullptr;
    const int32_t it = kv_fit_group<G, NC>(v, fit, max_iters, h, trace);
#pragma unroll
    for (int k = 0; k < NC; k++) centroids[l.g * NC + k] = h[k];
    if (iters) iters[l.g] = it;
    if (codes) kv_code_group<G, BITS>(v, h, assign, codes + l.g * (G / CPW));
  }
}

template <int DT, int G, int BITS>
static __global__ void __launch_bounds__(128)
    k_codebook_quantize(const void *__restrict__ x, int64_t rows, int64_t cols, int32_t axis, int64_t groups,
                        bool aligned, const uint16_t *__restrict__ centroids, int32_t assign,
                        uint32_t *__restrict__ codes) {
  constexpr int NC = 1 << BITS, CPW = 32 / BITS;
  for (int64_t t = kv_grid_first(); t < groups; t += kv_grid_stride()) {
    float v[G];
    const kv_gloc l = kv_load_group_at<DT, G>(x, t, axis, rows, cols, aligned, v);
    uint16_t h[NC];
#pragma unroll
    for (int k = 0; k < NC; k++) h[k] = centroids[l.g * NC + k];
    kv_code_group<G, BITS>(v, h, assign, codes + l.g * (G / CPW));
  }
}

template <int ODT, int G, int BITS>
static __global__ void __launch_bounds__(128)
    k_codebook_dequantize(const uint32_t *__restrict__ codes, const uint16_t *__restrict__ centroids, int64_t rows,
                          int64_t cols, int32_t axis, int64_t groups, void *__restrict__ out) {
  constexpr int NC = 1 << BITS, CPW = 32 / BITS;
  for (int64_t t = kv_grid_first(); t < groups; t += kv_grid_stride()) {
    const kv_gloc l = kv_group_at(t, axis, rows, cols, G);
    float c[NC];
#pragma unroll
    for (int k = 0; k < NC; k++) c[k] = kivi_f16_to_f32(centroids[l.g * NC + k]);
    const uint32_t *wp = codes + l.g * (G / CPW);
#pragma unroll
    for (int w = 0; w < G / CPW; w++) {
      const uint32_t word = wp[w];
#pragma unroll
      for (int j = 0; j < CPW; j++) {
        const uint32_t q = kivi_word_get(word, j, BITS);
        float r = c[0];
#pragma unroll
        for (int k = 1; k < NC; k++) r = q == (uint32_t)k ? c[k] : r;
        kv_st<ODT>(out, l.base + (int64_t)(w * CPW + j) * l.step, r);
      }
    }
  }
}

/* Thread per group: first group whose centroids are not finite or not ascending. */
template <int NC>
static __global__ void k_check_centroids(const uint16_t *__restrict__ centroids, int64_t groups,
                                         unsigned long long *__restrict__ first_bad) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t bad = INT64_MAX;
  for (int64_t g = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; g < groups; g += stride) {
    float prev = 0.0f;
    bool ok = true;
#pragma unroll
    for (int k = 0; k < NC; k++) {
      const uint16_t hk = centroids[g * NC + k];
      const float f = kivi_f16_to_f32(hk);
      if ((hk & 0x7c00u) == 0x7c00u || (k && f < prev)) ok = false;
      prev = f;
    }
    if (!ok && g < bad) bad = g;
  }
  if (bad != INT64_MAX) atomicMin(first_bad, (unsigned long long)bad);
}

/* ---------------------------------------------------------------- launch ----------------- */

static kivi_status fit_or_encode(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, const kv_shape &sh,
                                 int32_t fit, int32_t max_iters, int32_t assign, int32_t flags, uint16_t *centroids,
                                 int32_t *iters, float *inertia, uint32_t *codes) {
  kivi_status st;
  if (!(flags & KIVI_FLAG_TRUSTED) && (st = kv_check_finite(ctx, op, x, dtype, &sh))) return st;
  const bool aligned = ((uintptr_t)x & 15u) == 0;
  const unsigned grid = kv_grid(ctx, (sh.groups + 127) / 128, 16);
#define KV_FIT_GB(G, B)                                                                                          \
  k_codebook_fit<DT, G, B><<<grid, 128, 0, ctx->stream>>>(x, sh.rows, sh.cols, sh.axis, sh.groups, aligned, fit, \
                                                          max_iters, assign, centroids, iters, inertia, codes)
  KV_DISPATCH_DT_GB(dtype, sh.group, sh.bits, KV_FIT_GB)
#undef KV_FIT_GB
  return kv_launched(ctx, op, codes ? "k_codebook_fit (encode)" : "k_codebook_fit");
}

extern "C" {

KIVI_API kivi_status kivi_codebook_fit(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                       kivi_axis axis, int32_t group, int32_t bits, kivi_fit fit, int32_t max_iters,
                                       int32_t flags, uint16_t *centroids, int32_t *iters, float *inertia) {
  KIVI_SPEC_ENTER(kivi_spec_codebook_fit(x, dtype, rows, cols, axis, group, bits, fit, max_iters, flags, centroids),
                  kv_validate(ctx, &spec, &sh));
  return fit_or_encode(ctx, spec.op, x, dtype, sh, fit, max_iters, KIVI_ASSIGN_NEAREST, flags, centroids, iters,
                       inertia, nullptr);
}

KIVI_API kivi_status kivi_codebook_encode(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                          kivi_axis axis, int32_t group, int32_t bits, kivi_fit fit, int32_t max_iters,
                                          kivi_assign assign, int32_t flags, uint16_t *centroids, uint32_t *codes) {
  KIVI_SPEC_ENTER(kivi_spec_codebook_encode(x, dtype, rows, cols, axis, group, bits, fit, max_iters, assign, flags,
                                            centroids, codes),
                  kv_validate(ctx, &spec, &sh));
  return fit_or_encode(ctx, spec.op, x, dtype, sh, fit, max_iters, assign, flags, centroids, nullptr, nullptr, codes);
}

KIVI_API kivi_status kivi_codebook_quantize(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                            kivi_axis axis, int32_t group, int32_t bits, const uint16_t *centroids,
                                            kivi_assign assign, int32_t flags, uint32_t *codes) {
  KIVI_SPEC_ENTER(kivi_spec_codebook_quantize(x, dtype, rows, cols, axis, group, bits, centroids, assign, flags, codes),
                  kv_validate(ctx, &spec, &sh));

  /* centroids first (as the CPU build), then x */
  if ((st = kv_scratch_reset(ctx, spec.op))) return st;
  const unsigned cgrid = kv_grid(ctx, (sh.groups + 255) / 256, 8);
  if (sh.levels == 4)
    k_check_centroids<4><<<cgrid, 256, 0, ctx->stream>>>(centroids, sh.groups, ctx->d_scratch + KV_SLOT_CENTROIDS);
  else
    k_check_centroids<16><<<cgrid, 256, 0, ctx->stream>>>(centroids, sh.groups, ctx->d_scratch + KV_SLOT_CENTROIDS);
  if ((st = kv_launched(ctx, spec.op, "k_check_centroids"))) return st;
  if ((st = kv_scratch_read(ctx, spec.op))) return st;
  const unsigned long long badg = ctx->h_scratch[KV_SLOT_CENTROIDS];
  if (badg != ~0ull) {
    uint16_t h[KIVI_MAX_CENTROIDS];
    const int n = sh.levels;
    if ((st = kv_cuda(ctx, cudaMemcpy(h, centroids + (int64_t)badg * n, sizeof(uint16_t) * n, cudaMemcpyDeviceToHost),
                      spec.op, "cudaMemcpy (bad centroids)")))
      return st;
    for (int k = 0; k < n; k++) {
      if ((h[k] & 0x7c00u) == 0x7c00u)
        return kv_fail(ctx, KIVI_ERR_ARG, "%s: centroids must be finite, got 0x%04x at group %lld index %d", spec.op,
                       (unsigned)h[k], (long long)badg, k);
      if (k && kivi_f16_to_f32(h[k]) < kivi_f16_to_f32(h[k - 1]))
        return kv_fail(ctx, KIVI_ERR_ARG,
                       "%s: centroids must be sorted ascending, got %g before %g at group %lld index %d", spec.op,
                       (double)kivi_f16_to_f32(h[k - 1]), (double)kivi_f16_to_f32(h[k]), (long long)badg, k);
    }
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: centroids of group %lld are not finite and ascending", spec.op,
                   (long long)badg);
  }
  if (!(flags & KIVI_FLAG_TRUSTED) && (st = kv_check_finite(ctx, spec.op, x, dtype, &sh))) return st;

  const bool aligned = ((uintptr_t)x & 15u) == 0;
  const unsigned grid = kv_grid(ctx, (sh.groups + 127) / 128, 16);
#define KV_CQ_GB(G, B)          \
  k_codebook_quantize<DT, G, B> \
      <<<grid, 128, 0, ctx->stream>>>(x, sh.rows, sh.cols, sh.axis, sh.groups, aligned, centroids, assign, codes)
  KV_DISPATCH_DT_GB(dtype, sh.group, sh.bits, KV_CQ_GB)
#undef KV_CQ_GB
  return kv_launched(ctx, spec.op, "k_codebook_quantize");
}

KIVI_API kivi_status kivi_codebook_dequantize(kivi_ctx_t ctx, const uint32_t *codes, const uint16_t *centroids,
                                              int64_t rows, int64_t cols, kivi_axis axis, int32_t group, int32_t bits,
                                              void *out, kivi_dtype out_dtype) {
  KIVI_SPEC_ENTER(kivi_spec_codebook_dequantize(codes, centroids, rows, cols, axis, group, bits, out, out_dtype),
                  kv_validate(ctx, &spec, &sh));
  const unsigned grid = kv_grid(ctx, (sh.groups + 127) / 128, 16);
#define KV_CD_GB(G, B)            \
  k_codebook_dequantize<DT, G, B> \
      <<<grid, 128, 0, ctx->stream>>>(codes, centroids, sh.rows, sh.cols, sh.axis, sh.groups, out)
  KV_DISPATCH_DT_GB(out_dtype, sh.group, sh.bits, KV_CD_GB)
#undef KV_CD_GB
  return kv_launched(ctx, spec.op, "k_codebook_dequantize");
}

} /* extern "C" */
