/*
 * kivi_seq.h — the sequence operations beyond append, written once for the CPU build (C11) and the
 * CUDA build (nvcc): the rules and the bookkeeping of kivi_cache_seq_truncate and kivi_cache_seq_fork
 * (shared pages, reference counted), the argument rules of kivi_cache_attend_multi and
 * kivi_attention_merge. Each build keeps only its copies (memcpy or cudaMemcpyAsync) and its kernels;
 * the functions here write a failing check's message into a buffer and return the status.
 *
 * Shared pages: refs[page] counts the owners of a page beyond the first (0 for a page that one block
 * table holds), so the append paths, which take pages from the free stack, need not know about forks;
 * a release pushes a page back only when refs is 0, else takes one owner away.
 */
#ifndef KIVI_SEQ_H
#define KIVI_SEQ_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kivi.h"
#include "kivi_format.h"
#include "kivi_host.h"

/* ------------------------------------------------------------------ pages ----------------- */

/** Pages of a sequence that no write reaches again: those below every layer's quantized length (a
    flush writes at the quantized length, and a truncate never goes below it). qlen: layer 0's, then
    `stride` apart. */
static inline int32_t kivi_seq_full_pages(const kivi_cache_config *g, const int64_t *qlen, ptrdiff_t stride) {
  int64_t m = qlen[0];
  for (int32_t l = 1; l < g->layers; l++) m = qlen[l * stride] < m ? qlen[l * stride] : m;
  return (int32_t)(m / g->page_tokens);
}

/** Pages a block table needs for its layers' quantized lengths (the fullest layer's). */
static inline int32_t kivi_seq_pages_for(const kivi_cache_config *g, const int64_t *qlen, ptrdiff_t stride) {
  int64_t m = 0;
  for (int32_t l = 0; l < g->layers; l++) m = qlen[l * stride] > m ? qlen[l * stride] : m;
  return (int32_t)((m + g->page_tokens - 1) / g->page_tokens);
}

/** Gives back entries [from, npages) of a block table row, last first: a shared page loses one owner,
    a page with none left goes to the free stack. */
static inline void kivi_pages_release_shared(int32_t *free_pages, int32_t *nfree, int32_t *refs, const int32_t *row,
                                             int32_t from, int32_t npages) {
  for (int32_t i = npages - 1; i >= from; i--) {
    const int32_t p = row[i];
    if (refs[p] > 0)
      refs[p]--;
    else
      free_pages[(*nfree)++] = p;
  }
}

/** A fork's block table: the first `shared` entries of the parent's row (one owner more each), then
    fresh pages from the free stack for the rest (the caller copies them, checked to be free). */
static inline void kivi_fork_table(int32_t *free_pages, int32_t *nfree, int32_t *refs, const int32_t *parent,
                                   int32_t *child, int32_t npages, int32_t shared) {
  for (int32_t i = 0; i < shared; i++) {
    child[i] = parent[i];
    refs[parent[i]]++;
  }
  for (int32_t i = shared; i < npages; i++) child[i] = free_pages[--(*nfree)];
}

/* ------------------------------------------------------------------ rules ----------------- */

/** kivi_cache_seq_truncate's length against every layer's lengths (len, qlen `stride` apart). */
static inline kivi_status kivi_seq_truncate_check(const kivi_cache_config *g, int32_t seq, int64_t length,
                                                  const int64_t *len, const int64_t *qlen, ptrdiff_t stride, char *msg,
                                                  size_t n) {
  static const char *op = "kivi_cache_seq_truncate";
  if (length < 0)
    return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: length must be >= 0, got %lld", op, (long long)length);
  for (int32_t l = 0; l < g->layers; l++) {
    const int64_t ln = len[l * stride], ql = qlen[l * stride];
    if (length > ln)
      return kivi_host_msg(msg, n, KIVI_ERR_ARG,
                           "%s: length must be at most the length of sequence %d in every layer (%lld in layer %d), "
                           "got %lld",
                           op, (int)seq, (long long)ln, (int)l, (long long)length);
    if (length < ql)
      return kivi_host_msg(
          msg, n, KIVI_ERR_ARG,
          "%s: length must be >= %lld, the tokens of sequence %d already quantized into pages in layer "
          "%d (only tokens in the fp16 residual window can be dropped), got %lld",
          op, (long long)ql, (int)seq, (int)l, (long long)length);
  }
  return KIVI_OK;
}

/** kivi_cache_seq_fork's refusal for a pool without the pages the copies need. */
static inline kivi_status kivi_fork_full(int32_t seq, int32_t need, int32_t nfree, int32_t max_pages, char *msg,
                                         size_t n) {
  return kivi_host_msg(msg, n, KIVI_ERR_CAPACITY,
                       "kivi_cache_seq_fork: the page pool is full: forking sequence %d needs %d page(s) for its "
                       "partly filled page, %d of %d are free",
                       (int)seq, (int)need, (int)nfree, (int)max_pages);
}

/** kivi_cache_seq_fork's refusal when every slot is taken. */
static inline kivi_status kivi_fork_no_slot(int32_t max_seqs, char *msg, size_t n) {
  return kivi_host_msg(msg, n, KIVI_ERR_CAPACITY,
                       "kivi_cache_seq_fork: all %d sequence slots are taken (free one with kivi_cache_seq_free)",
                       (int)max_seqs);
}

/** What kivi_cache_attend_multi needs to know of a sequence slot in the call's layer. */
typedef struct kivi_seq_view {
  int live;
  int64_t len, qlen;
} kivi_seq_view;

/**
 * kivi_cache_attend_multi's arguments after the cache, in kivi.h's order: layer, seqs, qlens, batch,
 * tokens (the sum of qlens, KIVI_ERR_SHAPE otherwise), q, the dtypes, scale, flags, out; then each
 * sequence (range: KIVI_ERR_ARG, not live: KIVI_ERR_STATE) and its qlen (1..its length). `at` reads a
 * slot of the build's cache. On success *max_q is the largest qlen.
 */
static inline kivi_status kivi_multi_check(const kivi_cache_config *g, const void *cache,
                                           kivi_seq_view (*at)(const void *, int32_t, int32_t), int32_t layer,
                                           const int32_t *seqs, const int32_t *qlens, int32_t batch, int64_t tokens,
                                           const void *q, kivi_dtype q_dtype, float scale, int32_t flags,
                                           const void *out, kivi_dtype out_dtype, int32_t *max_q, char *msg, size_t n) {
  static const char *op = "kivi_cache_attend_multi";
  kivi_status st = kivi_layer_check(op, layer, g->layers, 0, msg, n);
  if (st) return st;
  if (!seqs) return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: seqs must not be NULL", op);
  if (!qlens) return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: qlens must not be NULL", op);
  if (batch < 1 || batch > KIVI_BATCH_MAX)
    return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: batch must be in 1..%d, got %d", op, KIVI_BATCH_MAX, (int)batch);
  if (!q) return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: q must not be NULL", op);
  if (!out) return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  if (q_dtype != KIVI_F32 && q_dtype != KIVI_F16 && q_dtype != KIVI_BF16)
    return kivi_host_msg(msg, n, KIVI_ERR_ARG,
                         "%s: q_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op, (int)q_dtype);
  if (out_dtype != KIVI_F32 && out_dtype != KIVI_F16 && out_dtype != KIVI_BF16)
    return kivi_host_msg(msg, n, KIVI_ERR_ARG,
                         "%s: out_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                         (int)out_dtype);
  if (!isfinite(scale))
    return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: scale must be finite, got %g", op, (double)scale);
  if (flags & ~(int32_t)KIVI_FLAG_TRUSTED)
    return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: flags must be 0 or KIVI_FLAG_TRUSTED (1), got %d", op, (int)flags);
  int64_t sum = 0;
  int32_t mq = 0;
  for (int32_t b = 0; b < batch; b++) {
    const int32_t s = seqs[b];
    if (s < 0 || s >= g->max_seqs)
      return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: seqs[%d] must be in 0..%d, got %d", op, (int)b,
                           (int)g->max_seqs - 1, (int)s);
    const kivi_seq_view v = at(cache, s, layer);
    if (!v.live)
      return kivi_host_msg(msg, n, KIVI_ERR_STATE, "%s: seqs[%d] (sequence %d) is not live", op, (int)b, (int)s);
    if (qlens[b] < 1)
      return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: qlens[%d] must be >= 1, got %d", op, (int)b, (int)qlens[b]);
    if (qlens[b] > v.len)
      return kivi_host_msg(
          msg, n, KIVI_ERR_ARG,
          "%s: qlens[%d] must be at most the length of sequence %d in layer %d (%lld): its queries are "
          "its newest tokens, append them first; got %d",
          op, (int)b, (int)s, (int)layer, (long long)v.len, (int)qlens[b]);
    sum += qlens[b];
    mq = qlens[b] > mq ? qlens[b] : mq;
  }
  if (tokens != sum)
    return kivi_host_msg(msg, n, KIVI_ERR_SHAPE, "%s: tokens must equal the sum of qlens (%lld), got %lld", op,
                         (long long)sum, (long long)tokens);
  *max_q = mq;
  return KIVI_OK;
}

/** kivi_attention_merge's arguments after the context. */
static inline kivi_status kivi_merge_check(int32_t parts, int64_t rows, int32_t head_dim, const void *outs,
                                           const void *lses, const void *out, char *msg, size_t n) {
  static const char *op = "kivi_attention_merge";
  if (parts < 1 || parts > 1024)
    return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: parts must be in 1..1024, got %d", op, (int)parts);
  if (rows < 1 || rows > INT32_MAX)
    return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: rows must be in 1..2147483647, got %lld", op, (long long)rows);
  if (head_dim < 1 || head_dim > 1024)
    return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: head_dim must be in 1..1024, got %d", op, (int)head_dim);
  if (!outs) return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: outs must not be NULL", op);
  if (!lses) return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: lses must not be NULL", op);
  if (!out) return kivi_host_msg(msg, n, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  return KIVI_OK;
}

#endif /* KIVI_SEQ_H */
