/*
 * attention.c — decode attention over the paged cache, the oracle of the CUDA kernel: for each
 * sequence and KV head, the keys and values of every page (and of the fp16 window) are dequantized
 * once into a small float block, exactly as kivi_cache_read gives them, and shared by the query
 * heads of the GQA group. Scores, softmax (max subtracted) and the weighted sum run in double.
 *
 * Two passes per (sequence, KV head): keys -> scores [ratio][len]; softmax; values -> out. Blocks are
 * page-sized: kd [D][P] keys channel-major (a score loop over tokens vectorizes without a reduction),
 * vt [P][D] values token-major (the weighted sum vectorizes over channels).
 */
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "cpu_internal.h"

typedef struct kivi_cache cache_t;

/* Keys (is_v 0, into kd [D][P]) or values (is_v 1, into vt [P][D]) of tokens [t0, t0 + nt) of head
   kh, which lie in one page (t0 + nt <= qlen) or all in the window (t0 >= qlen). */
static void load_block(const cache_t *c, int is_v, int32_t seq, int32_t layer, int32_t kh, int64_t t0, int32_t nt,
                       int64_t qlen, float *buf) {
  const int32_t D = c->cfg.head_dim, P = c->cfg.page_tokens;
  if (t0 < qlen) {
    const int32_t page = c->tables[(int64_t)seq * c->cfg.max_pages + t0 / P];
    const uint8_t *block = cpu_cache_block(c, is_v, layer, page, kh);
    if (is_v)
      cpu_cache_dequant_v(&c->lay[layer], block, nt, buf);
    else
      cpu_cache_dequant_k(&c->lay[layer], block, nt, buf);
    return;
  }
  for (int32_t t = 0; t < nt; t++) {
    const uint16_t *src = cpu_cache_win(c, is_v, seq, layer, (t0 + t) % c->W) + (int64_t)kh * D;
    if (is_v) {
      cpu_f16_to_f32_n(src, buf + (int64_t)t * D, D);
    } else {
      float tmp[256];
      cpu_f16_to_f32_n(src, tmp, D);
      for (int32_t d = 0; d < D; d++) buf[(int64_t)d * P + t] = tmp[d];
    }
  }
}

/* Next block after t0: page blocks up to qlen, then window chunks of up to P tokens. */
static int32_t block_tokens(int64_t t0, int64_t qlen, int64_t len, int32_t P) {
  const int64_t end = t0 < qlen ? qlen : len;
  return (int32_t)(end - t0 < P ? end - t0 : P);
}

KIVI_API kivi_status kivi_cache_attend(kivi_cache_t c, int32_t layer, const int32_t *seqs, int32_t batch, const void *q,
                                       kivi_dtype q_dtype, float scale, int32_t flags, void *out,
                                       kivi_dtype out_dtype) {
  static const char *op = "kivi_cache_attend";
  if (!c) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  const kivi_cache_config *g = &c->cfg;
  if (layer < 0 || layer >= g->layers)
    return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: layer must be in 0..%d, got %d", op, (int)g->layers - 1, (int)layer);
  if (!seqs) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: seqs must not be NULL", op);
  if (batch < 1) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: batch must be >= 1, got %d", op, (int)batch);
  if (!q) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: q must not be NULL", op);
  if (!out) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  if (q_dtype != KIVI_F32 && q_dtype != KIVI_F16 && q_dtype != KIVI_BF16)
    return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: q_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                    (int)q_dtype);
  if (out_dtype != KIVI_F32 && out_dtype != KIVI_F16 && out_dtype != KIVI_BF16)
    return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: out_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d",
                    op, (int)out_dtype);
  if (!isfinite(scale)) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: scale must be finite, got %g", op, (double)scale);
  if (flags & ~(int32_t)KIVI_FLAG_TRUSTED)
    return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: flags must be 0 or KIVI_FLAG_TRUSTED (1), got %d", op, (int)flags);
  int64_t max_len = 0;
  for (int32_t b = 0; b < batch; b++) {
    char name[48];
    snprintf(name, sizeof name, "seqs[%d]", (int)b);
    kivi_status st = cpu_cache_check_seq(c, op, name, seqs[b]);
    if (st) return st;
    const int64_t len = cpu_cache_len(c, seqs[b], layer)[0];
    if (len < 1)
      return cpu_fail(c->ctx, KIVI_ERR_STATE, "%s: seqs[%d] (sequence %d) holds no token in layer %d", op, (int)b,
                      (int)seqs[b], (int)layer);
    max_len = len > max_len ? len : max_len;
  }
  const int32_t D = g->head_dim, P = g->page_tokens, H = g->kv_heads, QH = g->q_heads, ratio = QH / H;
  const int64_t q_elems = (int64_t)batch * QH * D;
  if (!(flags & KIVI_FLAG_TRUSTED)) {
    const int64_t i = cpu_first_nonfinite(q, q_dtype, q_elems);
    if (i >= 0) {
      const float x = cpu_load(q, q_dtype, i);
      return cpu_fail(c->ctx, KIVI_ERR_NONFINITE,
                      "%s: q must be finite, got %s at index %lld (batch %lld, head %lld, channel %lld); "
                      "pass KIVI_FLAG_TRUSTED only for data known to be finite",
                      op, x != x ? "NaN" : (x > 0 ? "+Inf" : "-Inf"), (long long)i, (long long)(i / ((int64_t)QH * D)),
                      (long long)(i / D % QH), (long long)(i % D));
    }
  }

  /* Scratch: one block (kd or vt), the group's queries, scores / weights, accumulators. */
  const size_t blk = (size_t)P * (size_t)D;
  float *buf = NULL, *qf = NULL;
  double *sc = NULL, *acc = NULL;
  int32_t *ids = NULL; /* the validated seqs: out may overlap seqs, which would then change below */
  const size_t bytes[] = {sizeof(int32_t) * (size_t)batch, sizeof(float) * blk,
                          sizeof(float) * (size_t)ratio * (size_t)D, sizeof(double) * (size_t)ratio * (size_t)max_len,
                          sizeof(double) * (size_t)ratio * (size_t)D};
  void **bufs[] = {(void **)&ids, (void **)&buf, (void **)&qf, (void **)&sc, (void **)&acc};
  kivi_status st = cpu_alloc_all(c->ctx, op, 5, bytes, bufs);
  if (st) return st;
  memcpy(ids, seqs, sizeof(int32_t) * (size_t)batch);

  for (int32_t b = 0; b < batch; b++) {
    const int32_t seq = ids[b];
    const int64_t *ln = cpu_cache_len(c, seq, layer), len = ln[0], qlen = ln[1];
    for (int32_t kh = 0; kh < H; kh++) {
      const int64_t q0 = ((int64_t)b * QH + (int64_t)kh * ratio) * D; /* first query head of the group */
      for (int64_t i = 0; i < (int64_t)ratio * D; i++) qf[i] = cpu_load(q, q_dtype, q0 + i);

      /* Pass 1: scores. */
      for (int64_t t0 = 0; t0 < len;) {
        const int32_t nt = block_tokens(t0, qlen, len, P);
        load_block(c, 0, seq, layer, kh, t0, nt, qlen, buf);
        for (int32_t r = 0; r < ratio; r++) {
          double *s = sc + (int64_t)r * max_len + t0;
          const float *qr = qf + (int64_t)r * D;
          for (int32_t t = 0; t < nt; t++) s[t] = 0.0;
          for (int32_t d = 0; d < D; d++) {
            const double qd = (double)qr[d];
            const float *kr = buf + (int64_t)d * P;
            for (int32_t t = 0; t < nt; t++) s[t] += qd * (double)kr[t];
          }
          for (int32_t t = 0; t < nt; t++) s[t] *= (double)scale;
        }
        t0 += nt;
      }

      /* Softmax weights (unnormalized), sums. */
      double sums[32];
      for (int32_t r = 0; r < ratio; r++) {
        double *s = sc + (int64_t)r * max_len, m = s[0], sum = 0.0;
        for (int64_t t = 1; t < len; t++) m = s[t] > m ? s[t] : m;
        for (int64_t t = 0; t < len; t++) {
          s[t] = exp(s[t] - m);
          sum += s[t];
        }
        sums[r] = sum;
      }

      /* Pass 2: weighted values. */
      for (int64_t i = 0; i < (int64_t)ratio * D; i++) acc[i] = 0.0;
      for (int64_t t0 = 0; t0 < len;) {
        const int32_t nt = block_tokens(t0, qlen, len, P);
        load_block(c, 1, seq, layer, kh, t0, nt, qlen, buf);
        for (int32_t r = 0; r < ratio; r++) {
          const double *w = sc + (int64_t)r * max_len + t0;
          double *a = acc + (int64_t)r * D;
          for (int32_t t = 0; t < nt; t++) {
            const double wt = w[t];
            const float *vr = buf + (int64_t)t * D;
            for (int32_t d = 0; d < D; d++) a[d] += wt * (double)vr[d];
          }
        }
        t0 += nt;
      }
      for (int32_t r = 0; r < ratio; r++)
        for (int32_t d = 0; d < D; d++)
          cpu_store(out, out_dtype, q0 + (int64_t)r * D + d, (float)(acc[(int64_t)r * D + d] / sums[r]));
    }
  }
  free(buf);
  free(qf);
  free(sc);
  free(acc);
  free(ids);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_bench_attend(kivi_cache_t c, int32_t layer, const int32_t *seqs, int32_t batch,
                                             const void *q, kivi_dtype q_dtype, float scale, void *out,
                                             kivi_dtype out_dtype, int32_t iters, float *ms) {
  static const char *op = "kivi_cache_bench_attend";
  if (!c) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  if (iters < 1) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: iters must be >= 1, got %d", op, (int)iters);
  if (!ms) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: ms must not be NULL", op);
  if (!seqs) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: seqs must not be NULL", op);
  if (batch < 1) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: batch must be >= 1, got %d", op, (int)batch);
  int32_t *ids = NULL; /* out may overlap seqs: every timed call gets the ids as they were */
  kivi_status st = cpu_alloc(c->ctx, op, sizeof(int32_t) * (size_t)batch, (void **)&ids);
  if (st) return st;
  memcpy(ids, seqs, sizeof(int32_t) * (size_t)batch);
  /* The warm-up call validates everything (its errors name kivi_cache_attend). */
  st = kivi_cache_attend(c, layer, ids, batch, q, q_dtype, scale, KIVI_FLAG_TRUSTED, out, out_dtype);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int32_t i = 0; i < iters && !st; i++)
    st = kivi_cache_attend(c, layer, ids, batch, q, q_dtype, scale, KIVI_FLAG_TRUSTED, out, out_dtype);
  clock_gettime(CLOCK_MONOTONIC, &t1);
  free(ids);
  if (st) return st;
  const double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
  *ms = (float)(s * 1e3 / iters);
  return KIVI_OK;
}
