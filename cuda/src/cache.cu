/*
 * cache.cu — the paged 2-bit / 4-bit KV cache of the CUDA build: kivi_cache_create / _destroy,
 * sequence slots (a deep copy of one included: k_copy_pages) and kivi_cache_memory. The append is in
 * cache_append.cu, the read in cache_read.cu, the input scan in cache_scan.cu, attention in
 * attention.cu; the bookkeeping rules are kivi_host.h's.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.cuh"
#include "kivi_seq.h"

/* ---------------------------------------------------------------- host helpers ----------- */

kivi_status kv_cache_enter(kivi_cache_t c, const char *op) {
  if (!c) return kv_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  return kv_enter(c->ctx, op);
}

kivi_status kv_cache_seq_enter(kivi_cache_t c, const char *op, int32_t seq) {
  kivi_status st = kv_cache_enter(c, op);
  return st ? st : kv_cache_check_seq(c, op, seq);
}

kivi_status kv_cache_io_enter(kivi_cache_t c, const char *op, int32_t seq, int append, int32_t layer, int32_t n_tokens,
                              const void *k, const void *v, kivi_dtype dtype, int32_t flags) {
  kivi_status st = kv_cache_seq_enter(c, op, seq);
  if (st) return st;
  char msg[KV_ERR_LEN];
  st = kivi_cache_io_check(op, append, layer, c->cfg.layers, n_tokens, k, v, dtype, flags, msg, sizeof msg);
  return st ? kv_fail(c->ctx, st, "%s", msg) : KIVI_OK;
}

kivi_status kv_cache_check_seq(kivi_cache_t c, const char *op, int32_t seq) {
  char msg[KV_ERR_LEN];
  const int live = seq >= 0 && seq < c->cfg.max_seqs && c->live[seq];
  kivi_status st = kivi_seq_check(op, "seq", seq, c->cfg.max_seqs, live, msg, sizeof msg);
  return st ? kv_fail(c->ctx, st, "%s", msg) : KIVI_OK;
}

/* A slot's pages and lengths back to none (a new or a freed sequence). */
static void slot_clear(kivi_cache_t c, int32_t s) {
  c->npages[s] = 0;
  const int64_t at = (int64_t)s * c->cfg.layers;
  memset(c->len + at, 0, sizeof(int64_t) * (size_t)c->cfg.layers);
  memset(c->qlen + at, 0, sizeof(int64_t) * (size_t)c->cfg.layers);
}

static void cache_release(kivi_cache_t c) {
  void *device[] = {c->kpool, c->vpool, c->kwin, c->vwin, c->d_table, c->ws};
  for (void *p : device)
    if (p) cudaFree(p);
  (void)cudaGetLastError();
  void *host[] = {c->live, c->gen, c->table, c->npages, c->len, c->qlen, c->free_pages, c->lay, c->page_refs, c};
  for (void *p : host) free(p);
}

/* Page (blockIdx.x, the i-th of a block table row) of layer blockIdx.y: its block of `page16` 16-byte
   words copied from the source row's page to the copy's (kivi_cache_seq_copy). Block tables live on
   the device, so one launch a pool copies a whole sequence. */
static __global__ void k_copy_pages(uint8_t *pool, uint64_t page16, int32_t max_pages, const int32_t *src_row,
                                    const int32_t *dst_row) {
  const uint64_t layer = (uint64_t)blockIdx.y * (uint64_t)max_pages;
  const uint4 *from = (const uint4 *)pool + (layer + (uint64_t)src_row[blockIdx.x]) * page16;
  uint4 *to = (uint4 *)pool + (layer + (uint64_t)dst_row[blockIdx.x]) * page16;
  for (uint64_t j = threadIdx.x; j < page16; j += blockDim.x) to[j] = from[j];
}

/* ---------------------------------------------------------------- exports ---------------- */

extern "C" {

KIVI_API kivi_status kivi_cache_create(kivi_ctx_t ctx, const int32_t *config, int32_t n_fields, kivi_cache_t *out) {
  static const char *op = "kivi_cache_create";
  KIVI_HOST_ENTER(kv_enter, kv_fail, ctx, op, kivi_cache_create_check(config, n_fields, out, msg, sizeof msg));

  kivi_cache_t c = (kivi_cache_t)calloc(1, sizeof *c);
  if (!c) return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate %zu bytes", op, sizeof *c);
  c->ctx = ctx;
  memcpy(&c->cfg, config, sizeof c->cfg);
  const kivi_cache_config &g = c->cfg;
  c->F = kivi_flush_tokens(&g);
  c->W = kivi_window_tokens(&g);
  c->P = g.page_tokens;
  c->D = g.head_dim;
  const size_t S = (size_t)g.max_seqs, L = (size_t)g.layers, MP = (size_t)g.max_pages;
  c->live = (uint8_t *)calloc(S, 1);
  c->gen = (uint32_t *)calloc(S, sizeof(uint32_t));
  c->table = (int32_t *)calloc(S * MP, sizeof(int32_t));
  c->npages = (int32_t *)calloc(S, sizeof(int32_t));
  c->len = (int64_t *)calloc(S * L, sizeof(int64_t));
  c->qlen = (int64_t *)calloc(S * L, sizeof(int64_t));
  c->free_pages = (int32_t *)malloc(MP * sizeof(int32_t));
  c->lay = (kivi_layer_layout *)calloc(L, sizeof(kivi_layer_layout));
  c->page_refs = (int32_t *)calloc(MP, sizeof(int32_t));
  if (!c->live || !c->gen || !c->table || !c->npages || !c->len || !c->qlen || !c->free_pages || !c->lay ||
      !c->page_refs) {
    cache_release(c);
    return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the host metadata (%zu sequences x %zu pages)", op, S,
                   MP);
  }
  c->nfree = kivi_pages_init(c->free_pages, g.max_pages);

  uint64_t kbytes = 0, vbytes = 0;
  if (!kivi_cache_layouts(config, n_fields, c->lay, &kbytes, &vbytes)) {
    cache_release(c);
    return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: the page pools of %zu layers x %zu pages pass 2^62 bytes", op, L, MP);
  }
  const uint64_t wbytes = (uint64_t)S * L * (uint64_t)c->W * (uint64_t)g.kv_heads * (uint64_t)g.head_dim * 2u;
  const uint64_t tbytes = (uint64_t)S * MP * 4u;
  struct {
    void **p;
    uint64_t bytes;
    const char *what;
  } allocs[5] = {{(void **)&c->kpool, kbytes, "the K page pool"},
                 {(void **)&c->vpool, vbytes, "the V page pool"},
                 {(void **)&c->kwin, wbytes, "the K residual windows"},
                 {(void **)&c->vwin, wbytes, "the V residual windows"},
                 {(void **)&c->d_table, tbytes, "the block tables"}};
  for (int i = 0; i < 5; i++) {
    cudaError_t e = cudaMalloc(allocs[i].p, (size_t)(allocs[i].bytes ? allocs[i].bytes : 16));
    if (e != cudaSuccess) {
      char what[160];
      snprintf(what, sizeof what, "cudaMalloc of %llu bytes for %s", (unsigned long long)allocs[i].bytes,
               allocs[i].what);
      st = kv_cuda(ctx, e, op, what);
      cache_release(c);
      return st;
    }
    /* zeroed once: pages never written hold finite params, so masked tokens cannot poison a sum */
    if ((st = kv_cuda(ctx, cudaMemsetAsync(*allocs[i].p, 0, (size_t)allocs[i].bytes, ctx->stream), op,
                      "cudaMemsetAsync"))) {
      cache_release(c);
      return st;
    }
  }
  c->pool_bytes = kbytes + vbytes + 2 * wbytes;
  if ((st = kv_cuda(ctx, cudaStreamSynchronize(ctx->stream), op, "cudaStreamSynchronize"))) {
    cache_release(c);
    return st;
  }
  *out = c;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_destroy(kivi_cache_t cache) {
  if (!cache) return KIVI_OK;
  kivi_ctx_t ctx = cache->ctx;
  if (ctx && cudaSetDevice(ctx->device) == cudaSuccess && !ctx->sticky) (void)cudaStreamSynchronize(ctx->stream);
  cache_release(cache);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_create(kivi_cache_t cache, int32_t *seq) {
  static const char *op = "kivi_cache_seq_create";
  kivi_status st = kv_cache_enter(cache, op);
  if (st) return st;
  if (!seq) return kv_fail(cache->ctx, KIVI_ERR_ARG, "%s: seq must not be NULL", op);
  for (int32_t s = 0; s < cache->cfg.max_seqs; s++) {
    if (cache->live[s]) continue;
    cache->live[s] = 1;
    slot_clear(cache, s);
    *seq = s;
    return KIVI_OK;
  }
  char msg[KV_ERR_LEN];
  return kv_fail(cache->ctx, kivi_seq_full(cache->cfg.max_seqs, msg, sizeof msg), "%s", msg);
}

KIVI_API kivi_status kivi_cache_seq_free(kivi_cache_t cache, int32_t seq) {
  kivi_status st = kv_cache_seq_enter(cache, "kivi_cache_seq_free", seq);
  if (st) return st;
  kivi_pages_release_shared(cache->free_pages, &cache->nfree, cache->page_refs,
                            cache->table + (int64_t)seq * cache->cfg.max_pages, 0, cache->npages[seq]);
  cache->live[seq] = 0;
  cache->gen[seq]++; /* a batch made before this sees the slot as another sequence */
  slot_clear(cache, seq);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_copy(kivi_cache_t cache, int32_t src, int32_t *dst) {
  static const char *op = "kivi_cache_seq_copy";
  kivi_status st = kv_cache_enter(cache, op);
  if (st) return st;
  char msg[KV_ERR_LEN];
  const int live = src >= 0 && src < cache->cfg.max_seqs && cache->live[src];
  if ((st = kivi_seq_check(op, "src", src, cache->cfg.max_seqs, live, msg, sizeof msg)))
    return kv_fail(cache->ctx, st, "%s", msg);
  const kivi_cache_config &g = cache->cfg;
  kivi_ctx_t ctx = cache->ctx;
  int32_t s = 0;
  while (s < g.max_seqs && cache->live[s]) s++;
  const int32_t np = cache->npages[src];
  if ((st = kivi_seq_copy_check(src, dst, s < g.max_seqs ? s : -1, g.max_seqs, np, cache->nfree, g.max_pages,
                                g.page_tokens, msg, sizeof msg)))
    return kv_fail(ctx, st, "%s", msg);
  int32_t *row = cache->table + (int64_t)s * g.max_pages;
  const int32_t nfree = cache->nfree;
  kivi_pages_take(cache->free_pages, &cache->nfree, row, np);
  /* The copy's block-table row first (the page kernels read both rows from the device table). */
  if (np > 0)
    st = kv_upload(ctx, op, cache->d_table + (int64_t)s * g.max_pages, row, (size_t)np * sizeof(int32_t),
                   "cudaMemcpyAsync (block table)");
  /* one launch a pool and stretch of layers of one format (their pages lie one layer after the other) */
  for (int32_t a = 0, b; a < g.layers && !st && np > 0; a = b) {
    const kivi_layer_layout &ly = cache->lay[a];
    for (b = a + 1; b < g.layers && !memcmp(&cache->lay[b].cfg, &ly.cfg, sizeof ly.cfg); b++) {
    }
    const dim3 grid((unsigned)np, (unsigned)(b - a));
    const int32_t *from = cache->d_table + (int64_t)src * g.max_pages, *to = cache->d_table + (int64_t)s * g.max_pages;
    k_copy_pages<<<grid, 256, 0, ctx->stream>>>(cache->kpool + ly.kbase, ly.kp.page / 16u, g.max_pages, from, to);
    if (!(st = kv_launched(ctx, op, "k_copy_pages"))) {
      k_copy_pages<<<grid, 256, 0, ctx->stream>>>(cache->vpool + ly.vbase, ly.vp.page / 16u, g.max_pages, from, to);
      st = kv_launched(ctx, op, "k_copy_pages");
    }
  }
  const size_t win = sizeof(uint16_t) * (size_t)g.layers * (size_t)cache->W * (size_t)g.kv_heads * (size_t)g.head_dim;
  uint16_t *wins[2] = {cache->kwin, cache->vwin};
  for (int p = 0; p < 2 && !st; p++)
    st = kv_cuda(ctx,
                 cudaMemcpyAsync((uint8_t *)wins[p] + (size_t)s * win, (const uint8_t *)wins[p] + (size_t)src * win,
                                 win, cudaMemcpyDeviceToDevice, ctx->stream),
                 op, "cudaMemcpyAsync (window)");
  if (st) { /* the pages back on the stack as they were: the slot stays free */
    cache->nfree = nfree;
    return st;
  }
  cache->live[s] = 1;
  cache->npages[s] = np;
  const int64_t at = (int64_t)s * g.layers, from = (int64_t)src * g.layers;
  memcpy(cache->len + at, cache->len + from, sizeof(int64_t) * (size_t)g.layers);
  memcpy(cache->qlen + at, cache->qlen + from, sizeof(int64_t) * (size_t)g.layers);
  *dst = s;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_length(kivi_cache_t cache, int32_t seq, int32_t layer, int64_t *length,
                                           int64_t *quantized) {
  char msg[KV_ERR_LEN];
  kivi_status st = kv_cache_seq_enter(cache, "kivi_cache_seq_length", seq);
  if (st) return st;
  if ((st = kivi_seq_length_check(layer, cache->cfg.layers, length, quantized, msg, sizeof msg)))
    return kv_fail(cache->ctx, st, "%s", msg);
  *length = cache->len[(int64_t)seq * cache->cfg.layers + layer];
  *quantized = cache->qlen[(int64_t)seq * cache->cfg.layers + layer];
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_pages(kivi_cache_t cache, int32_t seq, int32_t *pages, int32_t cap,
                                          int32_t *count) {
  kivi_status st = kv_cache_seq_enter(cache, "kivi_cache_seq_pages", seq);
  char msg[KV_ERR_LEN];
  if (st) return st;
  if ((st = kivi_seq_pages_check(pages, cap, count, msg, sizeof msg))) return kv_fail(cache->ctx, st, "%s", msg);
  *count = kivi_seq_pages_copy(cache->table + (int64_t)seq * cache->cfg.max_pages, cache->npages[seq], pages, cap);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_memory(kivi_cache_t cache, uint64_t *report, int32_t n_fields) {
  static const char *op = "kivi_cache_memory";
  kivi_status st = kv_cache_enter(cache, op);
  if (st) return st;
  kivi_cache_t c = cache;
  const kivi_cache_config &g = c->cfg;
  if (!report) return kv_fail(c->ctx, KIVI_ERR_ARG, "%s: report must not be NULL", op);
  if (n_fields < 1) return kv_fail(c->ctx, KIVI_ERR_ARG, "%s: n_fields must be >= 1, got %d", op, (int)n_fields);
  const uint64_t used = (uint64_t)(g.max_pages - c->nfree);
  const uint64_t blocks = used * (uint64_t)g.kv_heads;
  uint64_t resid = 0, tokens = 0, qtok = 0, codes = 0, params = 0;
  for (int32_t l = 0; l < g.layers; l++) {
    codes += c->lay[l].kp.codes + c->lay[l].vp.codes;
    params += c->lay[l].kp.params + c->lay[l].vp.params;
  }
  for (int32_t s = 0; s < g.max_seqs; s++) {
    if (!c->live[s]) continue;
    for (int32_t l = 0; l < g.layers; l++) {
      const int64_t len = c->len[(int64_t)s * g.layers + l], ql = c->qlen[(int64_t)s * g.layers + l];
      resid += (uint64_t)(len - ql) * (uint64_t)g.kv_heads * (uint64_t)g.head_dim * 4u;
      tokens += (uint64_t)len;
      qtok += (uint64_t)ql;
    }
  }
  uint64_t r[KIVI_MEM_FIELDS];
  r[KIVI_MEM_CODE_BYTES] = blocks * codes;
  r[KIVI_MEM_PARAM_BYTES] = blocks * params;
  r[KIVI_MEM_RESIDUAL_BYTES] = resid;
  r[KIVI_MEM_TABLE_BYTES] = (uint64_t)g.max_seqs * ((uint64_t)g.max_pages * 4u + (uint64_t)g.layers * 16u + 8u);
  r[KIVI_MEM_POOL_BYTES] = c->pool_bytes;
  r[KIVI_MEM_PAGES_USED] = used;
  r[KIVI_MEM_PAGES_TOTAL] = (uint64_t)g.max_pages;
  r[KIVI_MEM_TOKENS] = tokens;
  r[KIVI_MEM_QUANTIZED_TOKENS] = qtok;
  const int32_t m = n_fields < KIVI_MEM_FIELDS ? n_fields : KIVI_MEM_FIELDS;
  memcpy(report, r, sizeof(uint64_t) * (size_t)m);
  return KIVI_OK;
}

} /* extern "C" */
