/*
 * codebook.c — non-uniform format: per-group centroids fitted by 1-D k-means (Lloyd-Max) in fp32,
 * codes by nearest centroid or the seed's interval table. kivi_codebook_fit, _quantize, _encode
 * (fit + quantize in one pass; same result as the two calls) and _dequantize.
 */
#include <stdlib.h>

#include "cpu_internal.h"

/* fp32 sum of squared errors of v under assignment a, in group order. */
static float group_sse(const float *v, const uint8_t *a, int32_t G, const float *c) {
  float sse = 0.0f;
  for (int32_t i = 0; i < G; i++) {
    const float e = v[i] - c[a[i]];
    sse += e * e;
  }
  return sse;
}

/* Returns 1 if any code changed. */
static int assign_nearest(const float *v, int32_t G, const float *c, int32_t n, uint8_t *a) {
  int changed = 0;
  for (int32_t i = 0; i < G; i++) {
    const uint8_t q = (uint8_t)kivi_nearest_code(v[i], c, n);
    changed |= q != a[i];
    a[i] = q;
  }
  return changed;
}

/* Fits the n centroids of one group v [G] (kivi.h kivi_codebook_fit) and writes them as sorted
   fp16 into h [n]. trace [max_iters + 1] may be NULL. Returns the number of updates applied. */
int32_t cpu_codebook_fit_group(const float *v, int32_t G, int32_t n, kivi_fit fit, int32_t max_iters, uint16_t *h,
                               float *trace) {
  float mn = v[0], mx = v[0];
  for (int32_t i = 1; i < G; i++) {
    mn = v[i] < mn ? v[i] : mn;
    mx = v[i] > mx ? v[i] : mx;
  }
  float c[KIVI_MAX_CENTROIDS];
  for (int32_t i = 0; i < n; i++) c[i] = mn + (float)i * (mx - mn) / (float)(n - 1);
  c[n - 1] = mx; /* the grid ends exactly at the max (the formula can miss it by an ulp) */

  uint8_t a[CPU_MAX_GROUP];
  for (int32_t i = 0; i < G; i++) a[i] = 0xff;
  assign_nearest(v, G, c, n, a);
  float sse = group_sse(v, a, G, c);
  if (trace) trace[0] = sse;

  const int32_t lo = fit == KIVI_FIT_PINNED ? 1 : 0, hi = fit == KIVI_FIT_PINNED ? n - 1 : n;
  int32_t it = 0;
  while (it < max_iters) {
    /* The mean as the old centroid plus the mean offset from it: the same value in exact
       arithmetic, but a fixed point stays fixed in fp32 (a constant group sums exact zeros,
       where a plain fp32 sum of G equal values is not G * v and would move the centroid). */
    float sum[KIVI_MAX_CENTROIDS] = {0};
    int32_t cnt[KIVI_MAX_CENTROIDS] = {0};
    for (int32_t i = 0; i < G; i++) {
      sum[a[i]] += v[i] - c[a[i]];
      cnt[a[i]]++;
    }
    for (int32_t k = lo; k < hi; k++)
      if (cnt[k]) c[k] = c[k] + sum[k] / (float)cnt[k];
    it++;
    const int changed = assign_nearest(v, G, c, n, a);
    sse = group_sse(v, a, G, c);
    if (trace) trace[it] = sse;
    if (!changed) break;
  }
  if (trace)
    for (int32_t k = it + 1; k <= max_iters; k++) trace[k] = sse;

  /* fp16, sorted ascending (Lloyd keeps the order; the sort only guards ties after rounding) */
  float cf[KIVI_MAX_CENTROIDS];
  for (int32_t k = 0; k < n; k++) {
    h[k] = kivi_f32_to_f16(c[k]);
    cf[k] = kivi_f16_to_f32(h[k]);
  }
  for (int32_t k = 1; k < n; k++) {
    const uint16_t hk = h[k];
    const float fk = cf[k];
    int32_t j = k;
    for (; j > 0 && cf[j - 1] > fk; j--) {
      cf[j] = cf[j - 1];
      h[j] = h[j - 1];
    }
    cf[j] = fk;
    h[j] = hk;
  }
  return it;
}

/* Codes of v [G] against fp16 centroids h [n], packed into the group's words. */
void cpu_codebook_code_group(const float *v, int32_t G, const uint16_t *h, int32_t n, kivi_assign assign, int32_t bits,
                             uint32_t *words) {
  float c[KIVI_MAX_CENTROIDS];
  uint8_t q[CPU_MAX_GROUP];
  for (int32_t k = 0; k < n; k++) c[k] = kivi_f16_to_f32(h[k]);
  if (assign == KIVI_ASSIGN_INTERVAL) {
    for (int32_t i = 0; i < G; i++) q[i] = (uint8_t)kivi_interval_code(v[i], c, n);
  } else {
    for (int32_t i = 0; i < G; i++) q[i] = (uint8_t)kivi_nearest_code(v[i], c, n);
  }
  cpu_pack(q, G, bits, words);
}

static kivi_status check_centroids(kivi_ctx_t ctx, const char *op, const uint16_t *cent, const cpu_shape *sh) {
  const int32_t n = sh->levels;
  for (int64_t g = 0; g < sh->groups; g++) {
    const uint16_t *h = cent + g * n;
    for (int32_t k = 0; k < n; k++) {
      if ((h[k] & 0x7c00u) == 0x7c00u)
        return cpu_fail(ctx, KIVI_ERR_ARG, "%s: centroids must be finite, got 0x%04x at group %lld index %d", op,
                        (unsigned)h[k], (long long)g, (int)k);
      if (k && kivi_f16_to_f32(h[k]) < kivi_f16_to_f32(h[k - 1]))
        return cpu_fail(ctx, KIVI_ERR_ARG,
                        "%s: centroids must be sorted ascending, got %g before %g at group %lld index %d", op,
                        (double)kivi_f16_to_f32(h[k - 1]), (double)kivi_f16_to_f32(h[k]), (long long)g, (int)k);
    }
  }
  return KIVI_OK;
}

/* What a walk over the groups of x does with each group. */
typedef enum { WALK_FIT, WALK_QUANTIZE, WALK_ENCODE } walk_kind;

typedef struct walk {
  walk_kind kind;
  kivi_fit fit;
  kivi_assign assign;
  int32_t max_iters;
  uint16_t *centroids_out;      /* FIT, ENCODE */
  const uint16_t *centroids_in; /* QUANTIZE */
  int32_t *iters;               /* FIT, may be NULL */
  float *inertia;               /* FIT, may be NULL */
  uint32_t *codes;              /* QUANTIZE, ENCODE */
} walk;

/* A walk that fits centroids (kivi_codebook_fit, kivi_codebook_encode); the rest left zero. */
static walk fitting(walk_kind kind, kivi_fit fit, int32_t max_iters, uint16_t *centroids) {
  const walk wk = {.kind = kind, .fit = fit, .max_iters = max_iters, .centroids_out = centroids};
  return wk;
}

static kivi_status walk_groups(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, const cpu_shape *sh,
                               const walk *wk) {
  float *tmp = NULL;
  kivi_status st;
  if (dtype != KIVI_F32 && (st = cpu_alloc(ctx, op, sizeof(float) * CPU_MAX_GROUP * CPU_TILE_COLS, (void **)&tmp)))
    return st;
  const int32_t nr = cpu_tile_rows(sh), n = sh->levels;
  float v[CPU_MAX_GROUP];
  for (int64_t r0 = 0; r0 < sh->rows; r0 += nr) {
    for (int64_t c0 = 0; c0 < sh->cols; c0 += CPU_TILE_COLS) {
      const int32_t nc = (int32_t)(sh->cols - c0 < CPU_TILE_COLS ? sh->cols - c0 : CPU_TILE_COLS);
      int64_t stride;
      const float *p = cpu_tile_load(x, dtype, sh->cols, r0, c0, nr, nc, tmp, &stride);
      for (int32_t k = 0; k < cpu_tile_groups(sh, nc); k++) {
        const int64_t g = cpu_tile_group(sh, r0, c0, k);
        cpu_tile_gather(sh, p, stride, k, v);
        if (wk->kind == WALK_QUANTIZE) {
          cpu_codebook_code_group(v, sh->group, wk->centroids_in + g * n, n, wk->assign, sh->bits,
                                  wk->codes + g * sh->wpg);
          continue;
        }
        uint16_t *h = wk->centroids_out + g * n;
        float *trace = wk->inertia ? wk->inertia + g * (wk->max_iters + 1) : NULL;
        const int32_t it = cpu_codebook_fit_group(v, sh->group, n, wk->fit, wk->max_iters, h, trace);
        if (wk->iters) wk->iters[g] = it;
        if (wk->kind == WALK_ENCODE)
          cpu_codebook_code_group(v, sh->group, h, n, wk->assign, sh->bits, wk->codes + g * sh->wpg);
      }
    }
  }
  free(tmp);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_codebook_fit(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                       kivi_axis axis, int32_t group, int32_t bits, kivi_fit fit, int32_t max_iters,
                                       int32_t flags, uint16_t *centroids, int32_t *iters, float *inertia) {
  KIVI_SPEC_ENTER(kivi_spec_codebook_fit(x, dtype, rows, cols, axis, group, bits, fit, max_iters, flags, centroids),
                  cpu_validate_input(ctx, &spec, &sh, x));
  walk wk = fitting(WALK_FIT, fit, max_iters, centroids);
  wk.iters = iters;
  wk.inertia = inertia;
  return walk_groups(ctx, spec.op, x, dtype, &sh, &wk);
}

KIVI_API kivi_status kivi_codebook_quantize(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                            kivi_axis axis, int32_t group, int32_t bits, const uint16_t *centroids,
                                            kivi_assign assign, int32_t flags, uint32_t *codes) {
  KIVI_SPEC_ENTER(kivi_spec_codebook_quantize(x, dtype, rows, cols, axis, group, bits, centroids, assign, flags, codes),
                  cpu_validate(ctx, &spec, &sh));
  if ((st = check_centroids(ctx, spec.op, centroids, &sh))) return st;
  if (!(flags & KIVI_FLAG_TRUSTED) && (st = cpu_check_finite(ctx, spec.op, x, dtype, &sh))) return st;
  const walk wk = {.kind = WALK_QUANTIZE, .assign = assign, .centroids_in = centroids, .codes = codes};
  return walk_groups(ctx, spec.op, x, dtype, &sh, &wk);
}

KIVI_API kivi_status kivi_codebook_encode(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                          kivi_axis axis, int32_t group, int32_t bits, kivi_fit fit, int32_t max_iters,
                                          kivi_assign assign, int32_t flags, uint16_t *centroids, uint32_t *codes) {
  KIVI_SPEC_ENTER(kivi_spec_codebook_encode(x, dtype, rows, cols, axis, group, bits, fit, max_iters, assign, flags,
                                            centroids, codes),
                  cpu_validate_input(ctx, &spec, &sh, x));
  walk wk = fitting(WALK_ENCODE, fit, max_iters, centroids);
  wk.assign = assign;
  wk.codes = codes;
  return walk_groups(ctx, spec.op, x, dtype, &sh, &wk);
}

KIVI_API kivi_status kivi_codebook_dequantize(kivi_ctx_t ctx, const uint32_t *codes, const uint16_t *centroids,
                                              int64_t rows, int64_t cols, kivi_axis axis, int32_t group, int32_t bits,
                                              void *out, kivi_dtype out_dtype) {
  KIVI_SPEC_ENTER(kivi_spec_codebook_dequantize(codes, centroids, rows, cols, axis, group, bits, out, out_dtype),
                  cpu_validate(ctx, &spec, &sh));
  float *tmp = NULL;
  if ((st = cpu_alloc(ctx, spec.op, sizeof(float) * CPU_MAX_GROUP * CPU_TILE_COLS, (void **)&tmp))) return st;

  const int32_t nr = cpu_tile_rows(&sh), n = sh.levels;
  uint8_t q[CPU_MAX_GROUP];
  float v[CPU_MAX_GROUP], c[KIVI_MAX_CENTROIDS];
  for (int64_t r0 = 0; r0 < rows; r0 += nr) {
    for (int64_t c0 = 0; c0 < cols; c0 += CPU_TILE_COLS) {
      const int32_t nc = (int32_t)(cols - c0 < CPU_TILE_COLS ? cols - c0 : CPU_TILE_COLS);
      for (int32_t k = 0; k < cpu_tile_groups(&sh, nc); k++) {
        const int64_t g = cpu_tile_group(&sh, r0, c0, k);
        for (int32_t j = 0; j < n; j++) c[j] = kivi_f16_to_f32(centroids[g * n + j]);
        cpu_unpack(codes + g * sh.wpg, group, bits, q);
        for (int32_t i = 0; i < group; i++) v[i] = c[q[i]];
        cpu_tile_scatter(&sh, tmp, nc, k, v);
      }
      cpu_tile_store(out, out_dtype, cols, r0, c0, nr, nc, tmp);
    }
  }
  free(tmp);
  return KIVI_OK;
}
