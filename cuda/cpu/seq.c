/*
 * seq.c — kivi_cache_seq_truncate and kivi_cache_seq_fork of the CPU build: the rules and the page
 * bookkeeping are kivi_seq.h's (shared with the CUDA build); here only the copies of a fork (the
 * partly filled pages of every layer and the residual windows) with memcpy.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"
#include "kivi_seq.h"

typedef struct kivi_cache cache_t;

KIVI_API kivi_status kivi_cache_seq_truncate(kivi_cache_t c, int32_t seq, int64_t length) {
  static const char *op = "kivi_cache_seq_truncate";
  if (!c) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  kivi_status st = cpu_cache_check_seq(c, op, "seq", seq);
  if (st) return st;
  const int64_t *ln = cpu_cache_len(c, seq, 0); /* len, qlen of each layer side by side */
  KIVI_HOST_REFUSE(cpu_fail, c->ctx, st, kivi_seq_truncate_check(&c->cfg, seq, length, ln, ln + 1, 2, msg, sizeof msg));
  for (int32_t l = 0; l < c->cfg.layers; l++) cpu_cache_len(c, seq, l)[0] = length;
  /* the window slots past length are garbage now: the next append overwrites them */
  const int32_t keep = kivi_seq_pages_for(&c->cfg, ln + 1, 2);
  if (keep < c->seqs[seq].n_pages) {
    kivi_pages_release_shared(c->free_pages, &c->n_free, c->page_refs, c->tables + (int64_t)seq * c->cfg.max_pages,
                              keep, c->seqs[seq].n_pages);
    c->seqs[seq].n_pages = keep;
  }
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_fork(kivi_cache_t c, int32_t seq, int32_t *child) {
  static const char *op = "kivi_cache_seq_fork";
  if (!c) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  kivi_status st = cpu_cache_check_seq(c, op, "seq", seq);
  if (st) return st;
  if (!child) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: child must not be NULL", op);
  const kivi_cache_config *g = &c->cfg;
  int32_t s = 0;
  while (s < g->max_seqs && c->seqs[s].live) s++;
  if (s == g->max_seqs) KIVI_HOST_REFUSE(cpu_fail, c->ctx, st, kivi_fork_no_slot(g->max_seqs, msg, sizeof msg));
  const int64_t *ln = cpu_cache_len(c, seq, 0);
  const int32_t npages = c->seqs[seq].n_pages, shared = kivi_seq_full_pages(g, ln + 1, 2);
  const int32_t copies = npages - (shared < npages ? shared : npages);
  if (copies > c->n_free)
    KIVI_HOST_REFUSE(cpu_fail, c->ctx, st, kivi_fork_full(seq, copies, c->n_free, g->max_pages, msg, sizeof msg));

  const int32_t *prow = c->tables + (int64_t)seq * g->max_pages;
  int32_t *crow = c->tables + (int64_t)s * g->max_pages;
  kivi_fork_table(c->free_pages, &c->n_free, c->page_refs, prow, crow, npages, npages - copies);
  for (int32_t i = npages - copies; i < npages; i++)
    for (int32_t l = 0; l < g->layers; l++) {
      memcpy(cpu_cache_block(c, 0, l, crow[i], 0), cpu_cache_block(c, 0, l, prow[i], 0), (size_t)c->lay[l].kp.page);
      memcpy(cpu_cache_block(c, 1, l, crow[i], 0), cpu_cache_block(c, 1, l, prow[i], 0), (size_t)c->lay[l].vp.page);
    }
  const size_t win = sizeof(uint16_t) * (size_t)g->layers * (size_t)c->W * (size_t)g->kv_heads * (size_t)g->head_dim;
  memcpy(cpu_cache_win(c, 0, s, 0, 0), cpu_cache_win(c, 0, seq, 0, 0), win);
  memcpy(cpu_cache_win(c, 1, s, 0, 0), cpu_cache_win(c, 1, seq, 0, 0), win);
  memcpy(cpu_cache_len(c, s, 0), ln, sizeof(int64_t) * 2u * (size_t)g->layers);
  c->seqs[s].live = 1;
  c->seqs[s].n_pages = npages;
  *child = s;
  return KIVI_OK;
}
