/*
 * attention_multi.c — several query tokens a sequence (kivi_cache_attend_multi) and the merge of
 * partial results (kivi_attention_merge) in the CPU build, the oracle of the CUDA build. Each sequence
 * of the call is read once as kivi_cache_read gives it (pages dequantized, the window in fp16); then
 * each query i of it scores the prefix it sees (causal), in double as kivi_cache_attend does: scores,
 * softmax with the max subtracted, the weighted sum, and the natural log-sum-exp m + ln(sum).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"
#include "kivi_seq.h"

typedef struct kivi_cache cache_t;

static kivi_seq_view view_at(const void *cache, int32_t s, int32_t layer) {
  const cache_t *c = (const cache_t *)cache;
  kivi_seq_view v = {c->seqs[s].live, 0, 0};
  if (v.live) {
    v.len = cpu_cache_len(c, s, layer)[0];
    v.qlen = cpu_cache_len(c, s, layer)[1];
  }
  return v;
}

KIVI_API kivi_status kivi_cache_attend_multi(kivi_cache_t c, int32_t layer, const int32_t *seqs, const int32_t *qlens,
                                             int32_t batch, int64_t tokens, const void *q, kivi_dtype q_dtype,
                                             float scale, int32_t flags, void *out, kivi_dtype out_dtype, float *lse) {
  static const char *op = "kivi_cache_attend_multi";
  if (!c) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  const kivi_cache_config *g = &c->cfg;
  kivi_status st;
  int32_t max_q = 0;
  KIVI_HOST_REFUSE(cpu_fail, c->ctx, st,
                   kivi_multi_check(g, c, view_at, layer, seqs, qlens, batch, tokens, q, q_dtype, scale, flags, out,
                                    out_dtype, &max_q, msg, sizeof msg));
  const int32_t D = g->head_dim, H = g->kv_heads, QH = g->q_heads, ratio = QH / H;
  const int64_t row = (int64_t)QH * D;
  if (!(flags & KIVI_FLAG_TRUSTED)) {
    const int64_t i = cpu_first_nonfinite(q, q_dtype, tokens * row);
    if (i >= 0) {
      const float x = cpu_load(q, q_dtype, i);
      return cpu_fail(c->ctx, KIVI_ERR_NONFINITE,
                      "%s: q must be finite, got %s at index %lld (token %lld, head %lld, channel %lld); "
                      "pass KIVI_FLAG_TRUSTED only for data known to be finite",
                      op, x != x ? "NaN" : (x > 0 ? "+Inf" : "-Inf"), (long long)i, (long long)(i / row),
                      (long long)(i / D % QH), (long long)(i % D));
    }
  }
  int64_t max_len = 0;
  for (int32_t b = 0; b < batch; b++) {
    const int64_t len = cpu_cache_len(c, seqs[b], layer)[0];
    max_len = len > max_len ? len : max_len;
  }
  /* scratch: the validated ids and qlens (out may overlap them), one sequence's K and V, scores, a row */
  const int64_t kv = max_len * H * D;
  int32_t *ids = NULL;
  float *kbuf = NULL, *vbuf = NULL;
  double *sc = NULL, *acc = NULL;
  const size_t bytes[] = {sizeof(int32_t) * 2u * (size_t)batch, sizeof(float) * (size_t)kv, sizeof(float) * (size_t)kv,
                          sizeof(double) * (size_t)max_len, sizeof(double) * (size_t)D};
  void **bufs[] = {(void **)&ids, (void **)&kbuf, (void **)&vbuf, (void **)&sc, (void **)&acc};
  if ((st = cpu_alloc_all(c->ctx, op, 5, bytes, bufs))) return st;
  memcpy(ids, seqs, sizeof(int32_t) * (size_t)batch);
  memcpy(ids + batch, qlens, sizeof(int32_t) * (size_t)batch);
  int64_t t0 = 0; /* first query row of sequence b */
  for (int32_t b = 0; b < batch && !st; b++) {
    const int32_t seq = ids[b], nq = ids[batch + b];
    const int64_t len = cpu_cache_len(c, seq, layer)[0];
    if ((st = kivi_cache_read(c, seq, layer, kbuf, vbuf, KIVI_F32))) break;
    for (int32_t i = 0; i < nq; i++) {
      const int64_t see = len - nq + i + 1, t = t0 + i;
      for (int32_t h = 0; h < QH; h++) {
        const int32_t kh = h / ratio;
        const int64_t qo = t * row + (int64_t)h * D;
        double m = -INFINITY, sum = 0.0, qd[256];
        for (int32_t d = 0; d < D; d++) qd[d] = (double)cpu_load(q, q_dtype, qo + d);
        for (int64_t j = 0; j < see; j++) {
          const float *kr = kbuf + (j * H + kh) * D;
          double s = 0.0;
          for (int32_t d = 0; d < D; d++) s += qd[d] * (double)kr[d];
          sc[j] = s * (double)scale;
          m = sc[j] > m ? sc[j] : m;
        }
        for (int32_t d = 0; d < D; d++) acc[d] = 0.0;
        for (int64_t j = 0; j < see; j++) {
          const double w = exp(sc[j] - m);
          const float *vr = vbuf + (j * H + kh) * D;
          sum += w;
          for (int32_t d = 0; d < D; d++) acc[d] += w * (double)vr[d];
        }
        for (int32_t d = 0; d < D; d++) cpu_store(out, out_dtype, qo + d, (float)(acc[d] / sum));
        if (lse) lse[t * QH + h] = (float)(m + log(sum));
      }
    }
    t0 += nq;
  }
  free(ids);
  free(kbuf);
  free(vbuf);
  free(sc);
  free(acc);
  return st;
}

KIVI_API kivi_status kivi_attention_merge(kivi_ctx_t ctx, int32_t parts, int64_t rows, int32_t head_dim,
                                          const float *outs, const float *lses, float *out, float *lse_out) {
  static const char *op = "kivi_attention_merge";
  KIVI_HOST_ENTER(cpu_need_ctx, cpu_fail, ctx, op,
                  kivi_merge_check(parts, rows, head_dim, outs, lses, out, msg, sizeof msg));
  double acc[1024];
  for (int64_t r = 0; r < rows; r++) {
    double m = -INFINITY, sum = 0.0;
    for (int32_t p = 0; p < parts; p++) m = lses[p * rows + r] > m ? lses[p * rows + r] : m;
    for (int32_t d = 0; d < head_dim; d++) acc[d] = 0.0;
    if (m != -INFINITY) {
      for (int32_t p = 0; p < parts; p++) {
        const double w = exp((double)lses[p * rows + r] - m);
        const float *o = outs + ((int64_t)p * rows + r) * head_dim;
        sum += w;
        for (int32_t d = 0; d < head_dim; d++) acc[d] += w * (double)o[d];
      }
    }
    for (int32_t d = 0; d < head_dim; d++) out[r * head_dim + d] = sum > 0.0 ? (float)(acc[d] / sum) : 0.0f;
    if (lse_out) lse_out[r] = sum > 0.0 ? (float)(m + log(sum)) : -INFINITY;
  }
  return KIVI_OK;
}
