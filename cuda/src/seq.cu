/*
 * seq.cu — kivi_cache_seq_truncate and kivi_cache_seq_fork of the CUDA build: the rules and the page
 * bookkeeping are kivi_seq.h's (shared with the CPU build); here the copies of a fork (the partly
 * filled pages of every layer, the residual windows) and the new block table row, enqueued on the
 * cache's stream, so that they come before any later append or attention.
 */
#include <string.h>

#include "cache.cuh"
#include "kivi_seq.h"

extern "C" {

KIVI_API kivi_status kivi_cache_seq_truncate(kivi_cache_t c, int32_t seq, int64_t length) {
  static const char *op = "kivi_cache_seq_truncate";
  kivi_status st = kv_cache_seq_enter(c, op, seq);
  if (st) return st;
  const kivi_cache_config *g = &c->cfg;
  const int64_t at = (int64_t)seq * g->layers;
  KIVI_HOST_REFUSE(kv_fail, c->ctx, st,
                   kivi_seq_truncate_check(g, seq, length, c->len + at, c->qlen + at, 1, msg, sizeof msg));
  for (int32_t l = 0; l < g->layers; l++) c->len[at + l] = length;
  /* the window slots past length are garbage now: the next append overwrites them */
  const int32_t keep = kivi_seq_pages_for(g, c->qlen + at, 1);
  if (keep < c->npages[seq]) {
    kivi_pages_release_shared(c->free_pages, &c->nfree, c->page_refs, c->table + (int64_t)seq * g->max_pages, keep,
                              c->npages[seq]);
    c->npages[seq] = keep;
  }
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_fork(kivi_cache_t c, int32_t seq, int32_t *child) {
  static const char *op = "kivi_cache_seq_fork";
  kivi_status st = kv_cache_seq_enter(c, op, seq);
  if (st) return st;
  if (!child) return kv_fail(c->ctx, KIVI_ERR_ARG, "%s: child must not be NULL", op);
  const kivi_cache_config *g = &c->cfg;
  int32_t s = 0;
  while (s < g->max_seqs && c->live[s]) s++;
  if (s == g->max_seqs) KIVI_HOST_REFUSE(kv_fail, c->ctx, st, kivi_fork_no_slot(g->max_seqs, msg, sizeof msg));
  const int64_t at = (int64_t)seq * g->layers, cat = (int64_t)s * g->layers;
  const int32_t npages = c->npages[seq], full = kivi_seq_full_pages(g, c->qlen + at, 1);
  const int32_t shared = full < npages ? full : npages, copies = npages - shared;
  if (copies > c->nfree)
    KIVI_HOST_REFUSE(kv_fail, c->ctx, st, kivi_fork_full(seq, copies, c->nfree, g->max_pages, msg, sizeof msg));

  /* the copies first, on the stream (a failure leaves the host state as it was) */
  cudaStream_t stream = c->ctx->stream;
  const int32_t *prow = c->table + (int64_t)seq * g->max_pages;
  int32_t *crow = c->table + (int64_t)s * g->max_pages;
  for (int32_t i = 0; i < copies && !st; i++) {
    const int32_t from = prow[shared + i], to = c->free_pages[c->nfree - 1 - i];
    for (int32_t l = 0; l < g->layers && !st; l++) { /* each layer's page parts at its own offsets and sizes */
      const kivi_layer_layout &ly = c->lay[l];
      st = kv_cuda(c->ctx,
                   cudaMemcpyAsync(c->kpool + ly.kbase + (uint64_t)to * ly.kp.page,
                                   c->kpool + ly.kbase + (uint64_t)from * ly.kp.page, (size_t)ly.kp.page,
                                   cudaMemcpyDeviceToDevice, stream),
                   op, "cudaMemcpyAsync (K page)");
      if (!st)
        st = kv_cuda(c->ctx,
                     cudaMemcpyAsync(c->vpool + ly.vbase + (uint64_t)to * ly.vp.page,
                                     c->vpool + ly.vbase + (uint64_t)from * ly.vp.page, (size_t)ly.vp.page,
                                     cudaMemcpyDeviceToDevice, stream),
                     op, "cudaMemcpyAsync (V page)");
    }
  }
  const uint64_t win = (uint64_t)g->layers * c->W * g->kv_heads * g->head_dim; /* halves a sequence */
  if (!st)
    st = kv_cuda(c->ctx,
                 cudaMemcpyAsync(c->kwin + (uint64_t)s * win, c->kwin + (uint64_t)seq * win, (size_t)win * 2u,
                                 cudaMemcpyDeviceToDevice, stream),
                 op, "cudaMemcpyAsync (K window)");
  if (!st)
    st = kv_cuda(c->ctx,
                 cudaMemcpyAsync(c->vwin + (uint64_t)s * win, c->vwin + (uint64_t)seq * win, (size_t)win * 2u,
                                 cudaMemcpyDeviceToDevice, stream),
                 op, "cudaMemcpyAsync (V window)");
  if (st) return st;
  kivi_fork_table(c->free_pages, &c->nfree, c->page_refs, prow, crow, npages, shared);
  if (npages > 0 && (st = kv_upload(c->ctx, op, c->d_table + (int64_t)s * g->max_pages, crow,
                                    (size_t)npages * sizeof(int32_t), "cudaMemcpyAsync (block table)"))) {
    kivi_pages_release_shared(c->free_pages, &c->nfree, c->page_refs, crow, 0, npages);
    return st;
  }
  memcpy(c->len + cat, c->len + at, sizeof(int64_t) * (size_t)g->layers);
  memcpy(c->qlen + cat, c->qlen + at, sizeof(int64_t) * (size_t)g->layers);
  c->npages[s] = npages;
  c->live[s] = 1;
  *child = s;
  return KIVI_OK;
}

} /* extern "C" */
