/*
 * batch.c — decode batches of the CPU build (kivi.h kivi_batch_*): the sequences and buffers of a
 * decode step, checked once when the batch is made; each call runs the cache's attention or append on
 * them. The deferred checks keep the CUDA build's semantics exactly (the scan runs inside the call
 * here, but the error is still reported by the next call or by kivi_batch_status, and outs are NaN
 * until then), so a program tested on the CPU build behaves the same on a GPU. The rules shared with
 * the CUDA build are in kivi_batch.h.
 */
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"
#include "kivi_batch.h"

struct kivi_batch {
  struct kivi_cache *cache;
  kivi_batch_args a;
  int32_t *seqs;             /* [batch] slots (a copy: the caller's array may change) */
  uint32_t *gens;            /* [batch] the slots' generations when the batch was made */
  int pending;               /* an error not read yet: later outs are NaN (the CUDA build's device word) */
  kivi_batch_record *record; /* + bad[batch] */
  float *tok;                /* [k_group][head_dim]: the append's flush scratch */
  float *lse;                /* [batch][q_heads] log-sum-exps written by attend (kivi_batch_set_lse), or NULL */
  int32_t *ones;             /* [batch] qlens of 1 for kivi_cache_attend_multi, made with lse */
};

static int slot_live(const void *c, int32_t s) { return ((const struct kivi_cache *)c)->seqs[s].live; }

KIVI_API kivi_status kivi_batch_create(kivi_cache_t cache, const int32_t *seqs, int32_t batch, const void *q,
                                       kivi_dtype q_dtype, void *out, kivi_dtype out_dtype, float scale, const void *k,
                                       const void *v, kivi_dtype kv_dtype, int32_t flags, kivi_batch_t *out_batch) {
  static const char *op = "kivi_batch_create";
  if (!cache) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  if (!out_batch) return cpu_fail(cache->ctx, KIVI_ERR_ARG, "%s: out_batch must not be NULL", op);
  const kivi_batch_args a = {seqs, batch, q, q_dtype, out, out_dtype, scale, k, v, kv_dtype, flags};
  char msg[CPU_ERR_LEN];
  kivi_status st = kivi_batch_validate(&cache->cfg, &a, cache, slot_live, msg, sizeof msg);
  if (st) return cpu_fail(cache->ctx, st, "%s", msg);
  struct kivi_batch *b = calloc(1, sizeof *b);
  if (b) {
    b->seqs = malloc(sizeof(int32_t) * (size_t)batch);
    b->gens = malloc(sizeof(uint32_t) * (size_t)batch);
    b->record = malloc(kivi_batch_record_bytes(batch));
    b->tok = k ? malloc(sizeof(float) * (size_t)cache->F * (size_t)cache->cfg.head_dim) : NULL;
  }
  if (!b || !b->seqs || !b->gens || !b->record || (k && !b->tok)) {
    kivi_batch_destroy(b);
    return cpu_fail(cache->ctx, KIVI_ERR_NOMEM, "%s: could not allocate a batch of %d", op, (int)batch);
  }
  b->cache = cache;
  b->a = a;
  memcpy(b->seqs, seqs, sizeof(int32_t) * (size_t)batch);
  b->a.seqs = b->seqs;
  for (int32_t i = 0; i < batch; i++) b->gens[i] = cache->seqs[seqs[i]].gen;
  kivi_batch_record_init(b->record, batch);
  *out_batch = b;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_batch_destroy(kivi_batch_t b) {
  if (!b) return KIVI_OK;
  free(b->seqs);
  free(b->gens);
  free(b->record);
  free(b->tok);
  free(b->ones);
  free(b);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_batch_set_lse(kivi_batch_t b, float *lse) {
  static const char *op = "kivi_batch_set_lse";
  if (!b) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: batch must not be NULL", op);
  if (!b->a.q) return cpu_fail(b->cache->ctx, KIVI_ERR_STATE, "%s: the batch was made without q and out", op);
  if (lse && !b->ones) {
    kivi_status st = cpu_alloc(b->cache->ctx, op, sizeof(int32_t) * (size_t)b->a.batch, (void **)&b->ones);
    if (st) return st;
    for (int32_t i = 0; i < b->a.batch; i++) b->ones[i] = 1;
  }
  b->lse = lse;
  return KIVI_OK;
}

static kivi_batch_slot slot_of(const void *cache, int32_t s, int32_t layer) {
  const struct kivi_cache *c = cache;
  const kivi_batch_slot r = {c->seqs[s].live, c->seqs[s].gen, cpu_cache_len(c, s, layer)[0]};
  return r;
}

/* The batch, then the checks every call makes first (kivi_batch.h kivi_batch_enter). */
static kivi_status enter(kivi_batch_t b, const char *op, int32_t layer, int need_kv) {
  if (!b) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: batch must not be NULL", op);
  char msg[CPU_ERR_LEN];
  const kivi_status st = kivi_batch_enter(&b->cache->cfg, &b->a, b->record, b->gens, b->cache, slot_of, op, layer,
                                          need_kv, msg, sizeof msg);
  return st ? cpu_fail(b->cache->ctx, st, "%s", msg) : KIVI_OK;
}

/* Records a call's first bad element (key) when no error is recorded yet; `any` last. */
static void publish(kivi_batch_t b, uint64_t key, int32_t op, int32_t layer) {
  if (b->record->key == KIVI_CHECK_NONE) {
    b->record->key = key;
    b->record->op = op;
    b->record->layer = layer;
  }
  b->record->any = 1;
  b->pending = 1;
}

/* The key of the first bad element of row `row` (n values from x + row * n) of `part`, or KIVI_CHECK_NONE:
   with f16range, what the cache refuses (NaN, Inf, beyond fp16), else NaN and Inf. */
static uint64_t scan_row(const void *x, kivi_dtype dtype, int64_t n, int32_t row, int32_t part, int f16range) {
  const int64_t es = dtype == KIVI_F32 ? 4 : 2;
  const uint8_t *p = (const uint8_t *)x + (int64_t)row * n * es;
  const int64_t e = f16range ? cpu_first_unquantizable(p, dtype, n) : cpu_first_nonfinite(p, dtype, n);
  if (e < 0) return KIVI_CHECK_NONE;
  uint32_t u = 0;
  if (es == 4)
    memcpy(&u, p + e * 4, 4);
  else {
    uint16_t h;
    memcpy(&h, p + e * 2, 2);
    u = h;
  }
  return kivi_check_key(row, part, e, kivi_bad_kind(u, dtype, f16range));
}

KIVI_API kivi_status kivi_batch_attend(kivi_batch_t b, int32_t layer) {
  static const char *op = "kivi_batch_attend";
  kivi_status st = enter(b, op, layer, 0);
  if (st) return st;
  const kivi_cache_config *g = &b->cache->cfg;
  const int64_t row = (int64_t)g->q_heads * g->head_dim, n = (int64_t)b->a.batch * row;
  if (!(b->a.flags & KIVI_FLAG_TRUSTED)) {
    uint64_t key = KIVI_CHECK_NONE;
    for (int32_t i = 0; i < b->a.batch && key == KIVI_CHECK_NONE; i++)
      key = scan_row(b->a.q, b->a.q_dtype, row, i, 0, 0);
    if (key != KIVI_CHECK_NONE) publish(b, key, 1, layer);
    if (b->pending) {
      for (int64_t i = 0; i < n; i++) cpu_store((void *)b->a.out, b->a.out_dtype, i, NAN);
      return KIVI_OK;
    }
  }
  if (b->lse)
    return kivi_cache_attend_multi(b->cache, layer, b->seqs, b->ones, b->a.batch, b->a.batch, b->a.q, b->a.q_dtype,
                                   b->a.scale, KIVI_FLAG_TRUSTED, (void *)b->a.out, b->a.out_dtype, b->lse);
  return kivi_cache_attend(b->cache, layer, b->seqs, b->a.batch, b->a.q, b->a.q_dtype, b->a.scale, KIVI_FLAG_TRUSTED,
                           (void *)b->a.out, b->a.out_dtype);
}

KIVI_API kivi_status kivi_batch_append(kivi_batch_t b, int32_t layer) {
  static const char *op = "kivi_batch_append";
  kivi_status st = enter(b, op, layer, 1);
  if (st) return st;
  struct kivi_cache *c = b->cache;
  const kivi_cache_config *g = &c->cfg;
  int64_t extra = 0;
  for (int32_t i = 0; i < b->a.batch; i++) extra += cpu_cache_append_pages(c, b->seqs[i], layer, layer + 1, 1);
  if (extra > c->n_free)
    return cpu_fail(c->ctx, KIVI_ERR_CAPACITY,
                    "%s: the page pool is full: the batch's %d sequences need %lld more page(s), %d of %d are free", op,
                    (int)b->a.batch, (long long)extra, (int)c->n_free, (int)g->max_pages);
  const int64_t row = (int64_t)g->kv_heads * g->head_dim, es = b->a.kv_dtype == KIVI_F32 ? 4 : 2;
  uint64_t first = KIVI_CHECK_NONE;
  for (int32_t i = 0; i < b->a.batch; i++) {
    if (!(b->a.flags & KIVI_FLAG_TRUSTED)) {
      uint64_t key = scan_row(b->a.k, b->a.kv_dtype, row, i, 0, 1);
      if (key == KIVI_CHECK_NONE) key = scan_row(b->a.v, b->a.kv_dtype, row, i, 1, 1);
      if (key != KIVI_CHECK_NONE) ((uint8_t *)(b->record + 1))[i] = 1; /* the token is stored: its sequence holds it */
      first = key < first ? key : first;
    }
    const int32_t s = b->seqs[i];
    cpu_cache_append_commit(c, s, layer, layer + 1, (const uint8_t *)b->a.k + i * row * es,
                            (const uint8_t *)b->a.v + i * row * es, b->a.kv_dtype, 1,
                            cpu_cache_append_pages(c, s, layer, layer + 1, 1), b->tok);
  }
  if (first != KIVI_CHECK_NONE) publish(b, first, 2, layer);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_batch_status(kivi_batch_t b, int32_t wait, int64_t *report, int32_t n, uint8_t *bad) {
  static const char *op = "kivi_batch_status";
  (void)wait; /* the CPU build's calls are done when they return */
  if (!b) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: batch must not be NULL", op);
  if (n < 0) return cpu_fail(b->cache->ctx, KIVI_ERR_ARG, "%s: n must be >= 0, got %d", op, (int)n);
  if (n > 0 && !report) return cpu_fail(b->cache->ctx, KIVI_ERR_ARG, "%s: report must not be NULL when n > 0", op);
  int64_t r[KIVI_REPORT_FIELDS];
  const int had = kivi_batch_take(b->record, b->a.batch, r, bad);
  for (int32_t i = 0; i < n; i++) report[i] = i < KIVI_REPORT_FIELDS ? r[i] : 0;
  if (!had) return KIVI_OK;
  b->pending = 0;
  char msg[CPU_ERR_LEN];
  const int64_t i = r[KIVI_REPORT_INDEX];
  kivi_batch_message(msg, sizeof msg, op, r, i >= 0 && i < b->a.batch ? b->seqs[i] : -1, b->cache->cfg.head_dim, 0);
  return cpu_fail(b->cache->ctx, KIVI_ERR_NONFINITE, "%s", msg);
}
