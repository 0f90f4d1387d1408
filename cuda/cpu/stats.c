/*
 * stats.c — kivi_stats_block: per-group min, max, mean, population variance over the finite
 * values, plus a count of the non-finite ones. Accumulates in double (it is the oracle).
 */
#include <stdlib.h>

#include "cpu_internal.h"

static void group_stats(const float *v, int32_t n, float *out4, int32_t *nonfinite) {
  kivi_minmax s = {0};
  for (int32_t i = 0; i < n; i++) kivi_minmax_add(&s, v[i]);
  double mean = 0.0, var = 0.0;
  if (s.cnt) {
    mean = s.sum / s.cnt;
    for (int32_t i = 0; i < n; i++) {
      if (!isfinite(v[i])) continue;
      const double d = (double)v[i] - mean;
      var += d * d;
    }
    var /= s.cnt;
  }
  out4[0] = s.mn;
  out4[1] = s.mx;
  out4[2] = (float)mean;
  out4[3] = (float)var;
  *nonfinite = s.bad;
}

KIVI_API kivi_status kivi_stats_block(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                      kivi_axis axis, int32_t group, float *stats, int32_t *nonfinite) {
  KIVI_SPEC_ENTER(kivi_spec_stats_block(x, dtype, rows, cols, axis, group, stats, nonfinite),
                  cpu_validate(ctx, &spec, &sh));
  float *tmp = NULL;
  if ((st = cpu_alloc(ctx, spec.op, sizeof(float) * CPU_MAX_GROUP * CPU_TILE_COLS, (void **)&tmp))) return st;

  const int32_t nr = cpu_tile_rows(&sh);
  float v[CPU_MAX_GROUP];
  for (int64_t r0 = 0; r0 < rows; r0 += nr) {
    for (int64_t c0 = 0; c0 < cols; c0 += CPU_TILE_COLS) {
      const int32_t nc = (int32_t)(cols - c0 < CPU_TILE_COLS ? cols - c0 : CPU_TILE_COLS);
      int64_t stride;
      const float *p = cpu_tile_load(x, dtype, cols, r0, c0, nr, nc, tmp, &stride);
      for (int32_t k = 0; k < cpu_tile_groups(&sh, nc); k++) {
        const int64_t g = cpu_tile_group(&sh, r0, c0, k);
        cpu_tile_gather(&sh, p, stride, k, v);
        group_stats(v, group, stats + 4 * g, nonfinite + g);
      }
    }
  }
  free(tmp);
  return KIVI_OK;
}
