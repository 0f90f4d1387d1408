/*
 * model.c — the model ops of the CPU build (kivi.h kivi_model_*): the C reference of a Llama forward
 * pass. Every op computes in f32; the linear layer widens each fp16 weight row once per call and
 * takes four rows against each input row, so the inner loop is eight independent lanes the compiler
 * turns into vector multiply-adds.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"
#include "kivi_model.h"

/* Checks ctx, then the shared rules of kivi_model.h. */
static kivi_status check(kivi_ctx_t ctx, const char *op, const kivi_model_args *a) {
  kivi_status st = cpu_need_ctx(ctx, op);
  if (st) return st;
  char msg[CPU_ERR_LEN];
  st = kivi_model_check(op, a, msg, sizeof msg);
  return st ? cpu_fail(ctx, st, "%s", msg) : KIVI_OK;
}

static void nan_row(float *out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = NAN;
}

KIVI_API kivi_status kivi_model_embed(kivi_ctx_t ctx, const int32_t *tokens, int32_t rows, const uint16_t *table,
                                      int32_t vocab, int32_t dim, float *out) {
  KIVI_MODEL_ENTER(kivi_model_embed, tokens, rows, table, vocab, dim, out);
  for (int32_t r = 0; r < rows; r++) {
    float *o = out + (int64_t)r * dim;
    const int32_t t = tokens[r];
    if (t < 0 || t >= vocab)
      nan_row(o, dim);
    else
      cpu_f16_to_f32_n(table + (int64_t)t * dim, o, dim);
  }
  return KIVI_OK;
}

KIVI_API kivi_status kivi_model_rmsnorm(kivi_ctx_t ctx, const float *x, const uint16_t *w, int32_t rows, int32_t dim,
                                        float eps, float *out) {
  KIVI_MODEL_ENTER(kivi_model_rmsnorm, x, w, rows, dim, out);
  for (int32_t r = 0; r < rows; r++) {
    const float *xr = x + (int64_t)r * dim;
    float *o = out + (int64_t)r * dim;
    float ss = 0.0f;
    for (int32_t i = 0; i < dim; i++) ss += xr[i] * xr[i];
    const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int32_t i = 0; i < dim; i++) o[i] = xr[i] * inv * kivi_f16_to_f32(w[i]);
  }
  return KIVI_OK;
}

/* Dots of x [k] with four f32 rows, eight lanes each, then the lanes summed in order. */
static void dot4(const float *x, const float *w, int32_t k, float out[4]) {
  float acc[4][8] = {{0}};
  int32_t j = 0;
  for (; j + 8 <= k; j += 8) {
    for (int r = 0; r < 4; r++) {
      const float *wr = w + (int64_t)r * k + j;
      for (int i = 0; i < 8; i++) acc[r][i] += x[j + i] * wr[i];
    }
  }
  for (int r = 0; r < 4; r++) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += acc[r][i];
    for (int32_t jj = j; jj < k; jj++) s += x[jj] * w[(int64_t)r * k + jj];
    out[r] = s;
  }
}

/* y (+)= x W^T for checked arguments: each fp16 weight row widened once, four rows a pass. */
static kivi_status linear(kivi_ctx_t ctx, const char *op, const float *x, const uint16_t *w, int32_t rows, int32_t n,
                          int32_t k, int32_t accumulate, float *y) {
  float *wf;
  kivi_status st;
  if ((st = cpu_alloc(ctx, op, (size_t)4 * (size_t)k * sizeof(float), (void **)&wf))) return st;
  for (int32_t n0 = 0; n0 < n; n0 += 4) {
    const int32_t nr = n - n0 < 4 ? n - n0 : 4;
    memset(wf, 0, (size_t)4 * (size_t)k * sizeof(float));
    for (int32_t r = 0; r < nr; r++) cpu_f16_to_f32_n(w + (int64_t)(n0 + r) * k, wf + (int64_t)r * k, k);
    for (int32_t i = 0; i < rows; i++) {
      float d[4];
      dot4(x + (int64_t)i * k, wf, k, d);
      float *yr = y + (int64_t)i * n + n0;
      for (int32_t r = 0; r < nr; r++) yr[r] = accumulate ? yr[r] + d[r] : d[r];
    }
  }
  free(wf);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_model_linear(kivi_ctx_t ctx, const float *x, const uint16_t *w, int32_t rows, int32_t n,
                                       int32_t k, int32_t accumulate, float *y) {
  KIVI_MODEL_ENTER(kivi_model_linear, x, w, rows, n, k, accumulate, y);
  return linear(ctx, op, x, w, rows, n, k, accumulate, y);
}

/* The CUDA build's tensor-core GEMM multiplies fp16 x by fp16 W exactly and sums in f32: rounding x
   to fp16 first makes this the same math (the order of the sums aside). */
KIVI_API kivi_status kivi_model_linear_f16(kivi_ctx_t ctx, const float *x, const uint16_t *w, int32_t rows, int32_t n,
                                           int32_t k, int32_t accumulate, float *y) {
  KIVI_MODEL_ENTER(kivi_model_linear_f16, x, w, rows, n, k, accumulate, y);
  float *xh;
  const int64_t m = (int64_t)rows * k;
  if ((st = cpu_alloc(ctx, op, (size_t)m * sizeof(float), (void **)&xh))) return st;
  for (int64_t i = 0; i < m; i++) xh[i] = kivi_f16_to_f32(kivi_f32_to_f16(x[i]));
  st = linear(ctx, op, xh, w, rows, n, k, accumulate, y);
  free(xh);
  return st;
}

KIVI_API kivi_status kivi_model_fill_normal(kivi_ctx_t ctx, uint16_t *out, int64_t n, uint64_t seed, float mean,
                                            float std) {
  KIVI_MODEL_ENTER(kivi_model_fill_normal, out, n);
  char msg[CPU_ERR_LEN];
  if ((st = kivi_model_fill_check(op, mean, std, msg, sizeof msg))) return cpu_fail(ctx, st, "%s", msg);
  for (int64_t i = 0; i < n; i++) out[i] = kivi_fill_normal1(seed, i, mean, std);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_model_rope(kivi_ctx_t ctx, float *x, int32_t rows, int32_t heads, int32_t dim,
                                     const int32_t *pos, const float *cs, int32_t max_pos) {
  KIVI_MODEL_ENTER(kivi_model_rope, x, rows, heads, dim, pos, cs, max_pos);
  const int32_t half = dim / 2;
  for (int32_t r = 0; r < rows; r++) {
    float *xr = x + (int64_t)r * heads * dim;
    const int32_t p = pos[r];
    if (p < 0 || p >= max_pos) {
      nan_row(xr, (int64_t)heads * dim);
      continue;
    }
    const float *c = cs + (int64_t)p * dim, *s = c + half;
    for (int32_t h = 0; h < heads; h++) {
      float *xh = xr + (int64_t)h * dim;
      for (int32_t i = 0; i < half; i++) {
        const float x1 = xh[i], x2 = xh[i + half];
        xh[i] = x1 * c[i] - x2 * s[i];
        xh[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  }
  return KIVI_OK;
}

KIVI_API kivi_status kivi_model_swiglu(kivi_ctx_t ctx, const float *gate, const float *up, int32_t n, float *out) {
  KIVI_MODEL_ENTER(kivi_model_swiglu, gate, up, n, out);
  for (int32_t i = 0; i < n; i++) out[i] = kivi_swiglu1(gate[i], up[i]);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_model_attention(kivi_ctx_t ctx, const float *q, const float *k, const float *v, int32_t batch,
                                          int32_t tokens, int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                                          float scale, float *out) {
  KIVI_MODEL_ENTER(kivi_model_attention, q, k, v, batch, tokens, q_heads, kv_heads, head_dim, out);
  float *p;
  if ((st = cpu_alloc(ctx, op, (size_t)tokens * sizeof(float), (void **)&p))) return st;
  const int32_t ratio = q_heads / kv_heads;
  const int64_t qrow = (int64_t)q_heads * head_dim, krow = (int64_t)kv_heads * head_dim;
  for (int32_t b = 0; b < batch; b++) {
    const float *kb = k + (int64_t)b * tokens * krow, *vb = v + (int64_t)b * tokens * krow;
    for (int32_t t = 0; t < tokens; t++) {
      for (int32_t h = 0; h < q_heads; h++) {
        const float *qh = q + ((int64_t)b * tokens + t) * qrow + (int64_t)h * head_dim;
        const int64_t kvo = (int64_t)(h / ratio) * head_dim;
        float m = -INFINITY;
        for (int32_t j = 0; j <= t; j++) {
          const float *kj = kb + j * krow + kvo;
          float s = 0.0f;
          for (int32_t d = 0; d < head_dim; d++) s += qh[d] * kj[d];
          p[j] = s * scale;
          if (p[j] > m) m = p[j];
        }
        float sum = 0.0f;
        for (int32_t j = 0; j <= t; j++) sum += p[j] = expf(p[j] - m);
        float *o = out + ((int64_t)b * tokens + t) * qrow + (int64_t)h * head_dim;
        for (int32_t d = 0; d < head_dim; d++) o[d] = 0.0f;
        for (int32_t j = 0; j <= t; j++) {
          const float *vj = vb + j * krow + kvo;
          const float pj = p[j] / sum;
          for (int32_t d = 0; d < head_dim; d++) o[d] += pj * vj[d];
        }
      }
    }
  }
  free(p);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_model_log_softmax(kivi_ctx_t ctx, float *x, int32_t rows, int32_t n) {
  KIVI_MODEL_ENTER(kivi_model_log_softmax, x, rows, n);
  for (int32_t r = 0; r < rows; r++) {
    float *xr = x + (int64_t)r * n;
    float m = -INFINITY;
    for (int32_t i = 0; i < n; i++) m = xr[i] > m ? xr[i] : m;
    float sum = 0.0f;
    for (int32_t i = 0; i < n; i++) sum += expf(xr[i] - m);
    const float lse = m + logf(sum);
    for (int32_t i = 0; i < n; i++) xr[i] -= lse;
  }
  return KIVI_OK;
}
