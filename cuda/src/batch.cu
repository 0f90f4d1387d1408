/*
 * batch.cu — decode batches of the CUDA build (kivi.h kivi_batch_*): the sequences and buffers of a
 * decode step, checked once on the host when the batch is made; each call then only enqueues work on
 * the context's stream, with no allocation and no wait for the device.
 *
 *   kivi_batch_attend: the cache's attention launch (attention.cu kv_attend_launch), which, unless
 *     trusted, checks q as it loads it, records a bad element, and fills out with NaN when this call or
 *     an earlier unread one met one (no second launch).
 *   kivi_batch_append: the block-table entries of new pages (k_batch_table, only when a sequence needs
 *     a page), the flush of each sequence whose window is full (cache.cu's, per sequence), then
 *     k_batch_window: one launch writing every sequence's token into its window slot, checking it.
 *
 * Deferred errors. A checking kernel's blocks fold their lowest bad key into a device word; the last
 * block to finish (an atomic counter) publishes it into the batch's record, which lives in mapped
 * pinned host memory, so the host reads it at its next call without any copy or wait (kivi_batch.h
 * has the record's rules, shared with the CPU build). A device word `pending` makes later checks
 * poison their outs until the host reads the error and clears it (a stream-ordered memset).
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "batch.cuh"
#include "cache.cuh"

template <int NB>
struct kv_bwin_params;
struct kv_btable_params;

struct kivi_batch {
  kivi_ctx_t ctx;
  kivi_cache_t cache;
  kivi_batch_args a;
  int32_t *seqs;                      /* [batch] slots (a copy) */
  uint32_t *gens;                     /* [batch] the slots' generations when the batch was made */
  int64_t *len, *qlen;                /* [batch] the lengths handed to kv_attend_launch */
  int64_t *extra;                     /* [batch] pages each sequence's append takes */
  kv_bwin_params<KIVI_BATCH_MAX> *wp; /* the append's launch parameters (made once: no allocation a call) */
  kv_btable_params *tp;
  kv_batch_dev *dev;           /* device */
  kivi_batch_record *record;   /* mapped pinned host memory: record + bad[batch] */
  kivi_batch_record *d_record; /* its device address */
  float *lse;                  /* [batch][q_heads] log-sum-exps written by attend (kivi_batch_set_lse), or NULL */
};

/* ---------------------------------------------------------------- kernels ---------------- */

template <int DT>
__device__ __forceinline__ uint32_t kv_bits(const void *__restrict__ x, int64_t i) {
  if constexpr (DT == KIVI_F32)
    return ((const uint32_t *)x)[i];
  else
    return ((const uint16_t *)x)[i];
}

struct kv_bwin_row {
  uint64_t win;  /* element offset of the token's window slot in kwin / vwin */
  int32_t write; /* 0 when the token went into a page with its flush (a window of R = 0) */
  int32_t pad;
};

/* The rows ride in the launch parameters, in an array of NB entries: the smallest of 8, 64 and
   KIVI_BATCH_MAX that holds the batch, so that a small batch does not pay for copying 8 KB of
   parameters at every launch. */
template <int NB>
struct kv_bwin_params {
  uint16_t *kwin, *vwin;
  const void *k, *v; /* [batch][row] */
  int32_t row, batch, check, layer;
  kv_batch_dev *dev;
  kivi_batch_record *rec;
  uint8_t *bad; /* the record's bad[batch] (device address) */
  kv_bwin_row R[NB];
};

/* One thread an element of every sequence's token: k and v rounded to fp16 into the window slot (as
   cache.cu's k_cache_window), and checked (NaN, Inf, beyond fp16) when p.check. */
template <int DT, int NB>
static __global__ void __launch_bounds__(256) k_batch_window(const __grid_constant__ kv_bwin_params<NB> p) {
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  unsigned long long mine = KIVI_CHECK_NONE;
  if (idx < (int64_t)p.batch * p.row) {
    const int32_t b = (int32_t)(idx / p.row), e = (int32_t)(idx % p.row);
    const uint32_t ku = kv_bits<DT>(p.k, idx), vu = kv_bits<DT>(p.v, idx);
    if (p.R[b].write) {
      const uint64_t dst = p.R[b].win + (uint64_t)e;
      if constexpr (DT == KIVI_F16) {
        p.kwin[dst] = (uint16_t)ku;
        p.vwin[dst] = (uint16_t)vu;
      } else {
        p.kwin[dst] = __half_as_ushort(__float2half_rn(kv_ld<DT>(p.k, idx)));
        p.vwin[dst] = __half_as_ushort(__float2half_rn(kv_ld<DT>(p.v, idx)));
      }
    }
    if (p.check) {
      const int32_t kk = kivi_bad_kind(ku, DT, 1), vk = kivi_bad_kind(vu, DT, 1);
      if (kk >= 0)
        mine = kivi_check_key(b, 0, e, kk);
      else if (vk >= 0)
        mine = kivi_check_key(b, 1, e, vk);
      if (mine != KIVI_CHECK_NONE) {
        ((volatile uint8_t *)p.bad)[b] = 1; /* the token is stored: its sequence holds it */
        __threadfence_system();
      }
    }
  }
  if (p.check) (void)kv_batch_finish(mine, p.dev, p.rec, 2, p.layer);
}

struct kv_btable_params {
  int32_t *table; /* the cache's device block tables [max_seqs][max_pages] */
  int32_t n;
  int32_t at[KIVI_BATCH_MAX * 2]; /* entry index (seq * max_pages + i) */
  int32_t page[KIVI_BATCH_MAX * 2];
};

/* New block-table entries of an append (kivi_cache_append uploads them; a batch passes them by value,
   so that nothing waits on a pageable copy). At most two a sequence: one token crosses one page. */
static __global__ void k_batch_table(const __grid_constant__ kv_btable_params p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < p.n) p.table[p.at[i]] = p.page[i];
}

/* ---------------------------------------------------------------- host ------------------- */

static int slot_live(const void *c, int32_t s) { return ((const kivi_cache *)c)->live[s]; }

static kivi_batch_slot slot_of(const void *cache, int32_t s, int32_t layer) {
  const kivi_cache *c = (const kivi_cache *)cache;
  return {c->live[s], c->gen[s], c->len[(int64_t)s * c->cfg.layers + layer]};
}

/* The batch and its context, then the checks every call makes first (kivi_batch.h kivi_batch_enter). */
static kivi_status enter(kivi_batch_t b, const char *op, int32_t layer, int need_kv) {
  if (!b) return kv_fail(NULL, KIVI_ERR_ARG, "%s: batch must not be NULL", op);
  kivi_status st = kv_enter(b->ctx, op);
  if (st) return st;
  char msg[KV_ERR_LEN];
  st = kivi_batch_enter(&b->cache->cfg, &b->a, b->record, b->gens, b->cache, slot_of, op, layer, need_kv, msg,
                        sizeof msg);
  return st ? kv_fail(b->ctx, st, "%s", msg) : KIVI_OK;
}

/* The start of kivi_batch_attend and kivi_batch_append: `op` (the export's name), the batch checked
   for `layer` (need_kv: for an append) into `st`, a refusal returned, then its cache `c` and config `g`. */
#define BATCH_ENTER(name, need_kv)               \
  static const char *op = #name;                 \
  kivi_status st = enter(b, op, layer, need_kv); \
  if (st) return st;                             \
  kivi_cache_t c = b->cache;                     \
  const kivi_cache_config &g = c->cfg

static void batch_release(kivi_batch_t b) {
  if (!b) return;
  if (b->dev) cudaFree(b->dev);
  if (b->record) cudaFreeHost(b->record);
  (void)cudaGetLastError();
  free(b->seqs);
  free(b->gens);
  free(b->len);
  free(b->qlen);
  free(b->extra);
  free(b->wp);
  free(b->tp);
  free(b);
}

/* k_batch_window for b's rows (b->wp filled), with parameters of nb rows. */
template <int NB>
static kivi_status window_launch_nb(kivi_batch_t b) {
  kv_bwin_params<NB> p;
  memcpy(&p, b->wp, offsetof(kv_bwin_params<NB>, R));
  memcpy(p.R, b->wp->R, sizeof(kv_bwin_row) * (size_t)b->a.batch);
  const unsigned grid = (unsigned)(((int64_t)b->a.batch * p.row + 255) / 256);
#define KV_WIN(DT) k_batch_window<DT, NB><<<grid, 256, 0, b->ctx->stream>>>(p)
  KV_DISPATCH_DT(b->a.kv_dtype, KV_WIN)
#undef KV_WIN
  return kv_launched(b->ctx, "kivi_batch_append", "k_batch_window");
}
static kivi_status window_launch(kivi_batch_t b, int nb) {
  return nb == 8 ? window_launch_nb<8>(b) : nb == 64 ? window_launch_nb<64>(b) : window_launch_nb<KIVI_BATCH_MAX>(b);
}

extern "C" {

KIVI_API kivi_status kivi_batch_create(kivi_cache_t cache, const int32_t *seqs, int32_t batch, const void *q,
                                       kivi_dtype q_dtype, void *out, kivi_dtype out_dtype, float scale, const void *k,
                                       const void *v, kivi_dtype kv_dtype, int32_t flags, kivi_batch_t *out_batch) {
  static const char *op = "kivi_batch_create";
  if (!cache) return kv_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  kivi_ctx_t ctx = cache->ctx;
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!out_batch) return kv_fail(ctx, KIVI_ERR_ARG, "%s: out_batch must not be NULL", op);
  const kivi_batch_args a = {seqs, batch, q, q_dtype, out, out_dtype, scale, k, v, kv_dtype, flags};
  char msg[KV_ERR_LEN];
  if ((st = kivi_batch_validate(&cache->cfg, &a, cache, slot_live, msg, sizeof msg)))
    return kv_fail(ctx, st, "%s", msg);
  kivi_batch_t b = (kivi_batch_t)calloc(1, sizeof *b);
  if (!b) return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate a batch of %d", op, (int)batch);
  b->seqs = (int32_t *)malloc(sizeof(int32_t) * (size_t)batch);
  b->gens = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)batch);
  b->len = (int64_t *)malloc(sizeof(int64_t) * (size_t)batch);
  b->qlen = (int64_t *)malloc(sizeof(int64_t) * (size_t)batch);
  b->extra = (int64_t *)malloc(sizeof(int64_t) * (size_t)batch);
  if (k) {
    b->wp = (kv_bwin_params<KIVI_BATCH_MAX> *)calloc(1, sizeof(kv_bwin_params<KIVI_BATCH_MAX>));
    b->tp = (kv_btable_params *)calloc(1, sizeof(kv_btable_params));
  }
  if (!b->seqs || !b->gens || !b->len || !b->qlen || !b->extra || (k && (!b->wp || !b->tp))) {
    batch_release(b);
    return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate a batch of %d", op, (int)batch);
  }
  if ((st = kv_cuda(ctx, cudaMalloc((void **)&b->dev, sizeof(kv_batch_dev)), op, "cudaMalloc (batch words)")) ||
      (st = kv_cuda(ctx, cudaHostAlloc((void **)&b->record, kivi_batch_record_bytes(batch), cudaHostAllocMapped), op,
                    "cudaHostAlloc (batch record)")) ||
      (st = kv_cuda(ctx, cudaHostGetDevicePointer((void **)&b->d_record, b->record, 0), op,
                    "cudaHostGetDevicePointer (batch record)"))) {
    batch_release(b);
    return st;
  }
  kivi_batch_record_init(b->record, batch);
  const kv_batch_dev init = {0ull, (unsigned long long)KIVI_CHECK_NONE, 0u};
  if ((st = kv_cuda(ctx, cudaMemcpyAsync(b->dev, &init, sizeof init, cudaMemcpyHostToDevice, ctx->stream), op,
                    "cudaMemcpyAsync (batch words)")) ||
      (st = kv_cuda(ctx, cudaStreamSynchronize(ctx->stream), op, "cudaStreamSynchronize"))) {
    batch_release(b);
    return st;
  }
  b->ctx = ctx;
  b->cache = cache;
  b->a = a;
  memcpy(b->seqs, seqs, sizeof(int32_t) * (size_t)batch);
  b->a.seqs = b->seqs;
  for (int32_t i = 0; i < batch; i++) b->gens[i] = cache->gen[seqs[i]];
  *out_batch = b;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_batch_destroy(kivi_batch_t b) {
  if (!b) return KIVI_OK;
  /* the batch's kernels may still write its words and record */
  if (cudaSetDevice(b->ctx->device) == cudaSuccess && !b->ctx->sticky) (void)cudaStreamSynchronize(b->ctx->stream);
  batch_release(b);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_batch_set_lse(kivi_batch_t b, float *lse) {
  static const char *op = "kivi_batch_set_lse";
  if (!b) return kv_fail(NULL, KIVI_ERR_ARG, "%s: batch must not be NULL", op);
  if (!b->a.q) return kv_fail(b->ctx, KIVI_ERR_STATE, "%s: the batch was made without q and out", op);
  b->lse = lse;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_batch_attend(kivi_batch_t b, int32_t layer) {
  BATCH_ENTER(kivi_batch_attend, 0);
  for (int32_t i = 0; i < b->a.batch; i++) {
    b->len[i] = c->len[(int64_t)b->seqs[i] * g.layers + layer];
    b->qlen[i] = c->qlen[(int64_t)b->seqs[i] * g.layers + layer];
    if (b->len[i] > INT32_MAX - 4096)
      return kv_fail(b->ctx, KIVI_ERR_UNSUPPORTED, "%s: seqs[%d] holds %lld tokens; attention supports below 2^31", op,
                     (int)i, (long long)b->len[i]);
  }
  /* unless trusted, the attention kernel checks q as it loads it and its last CTA publishes what it met */
  const kv_attn_check chk = {b->dev, b->d_record, 1};
  return kv_attend_launch_full(c, op, layer, b->a.batch, b->seqs, b->len, b->qlen, b->a.q, b->a.q_dtype, b->a.scale,
                               (void *)b->a.out, b->a.out_dtype, (b->a.flags & KIVI_FLAG_TRUSTED) ? NULL : &chk, b->lse,
                               1);
}

KIVI_API kivi_status kivi_batch_append(kivi_batch_t b, int32_t layer) {
  BATCH_ENTER(kivi_batch_append, 1);
  const int32_t n = b->a.batch;
  int64_t extra = 0;
  for (int32_t i = 0; i < n; i++) extra += (b->extra[i] = kv_append_extra(c, b->seqs[i], layer, 1, 1));
  if (extra > c->nfree)
    return kv_fail(b->ctx, KIVI_ERR_CAPACITY,
                   "%s: the page pool is full: the batch's %d sequences need %lld more page(s), %d of %d are free", op,
                   (int)n, (long long)extra, (int)c->nfree, (int)g.max_pages);
  const int64_t row = (int64_t)g.kv_heads * g.head_dim;
  /* pages: host table entries now, device entries by value in one small launch */
  if (extra > 0) {
    kv_btable_params *tp = b->tp;
    tp->table = c->d_table;
    tp->n = 0;
    int64_t taken = 0;
    for (int32_t i = 0; i < n; i++) {
      const int32_t s = b->seqs[i];
      kv_append_pages(c, s, b->extra[i], taken);
      for (int64_t j = 0; j < b->extra[i]; j++) {
        const int64_t at = (int64_t)s * g.max_pages + c->npages[s] + j;
        tp->at[tp->n] = (int32_t)at;
        tp->page[tp->n++] = c->table[at];
      }
      taken += b->extra[i];
    }
    k_batch_table<<<(tp->n + 127) / 128, 128, 0, b->ctx->stream>>>(*tp);
    if ((st = kv_launched(b->ctx, op, "k_batch_table"))) return st;
  }
  /* flushes (sequences whose window is full), then every token into its window slot in one launch */
  kv_bwin_params<KIVI_BATCH_MAX> *wp = b->wp;
  wp->kwin = c->kwin;
  wp->vwin = c->vwin;
  wp->k = b->a.k;
  wp->v = b->a.v;
  wp->row = (int32_t)row;
  wp->batch = n;
  wp->check = !(b->a.flags & KIVI_FLAG_TRUSTED);
  wp->layer = layer;
  wp->dev = b->dev;
  wp->rec = b->d_record;
  wp->bad = (uint8_t *)(b->d_record + 1);
  kv_flush_entry fe[KIVI_BATCH_MAX];
  int32_t nf = 0;
  for (int32_t i = 0; i < n; i++) {
    const int32_t s = b->seqs[i];
    const int64_t len = c->len[(int64_t)s * g.layers + layer], ql = c->qlen[(int64_t)s * g.layers + layer];
    const int64_t f = kivi_flush_count(&g, len, ql, 1);
    wp->R[i].win = (((uint64_t)s * g.layers + layer) * (uint64_t)c->W + (uint64_t)(len % c->W)) * (uint64_t)row;
    wp->R[i].write = ql + f - len <= 0; /* the token stays in fp16 (else its flush took it from the input) */
    if (f > 0) fe[nf++] = {s, layer, i};
  }
  /* the sequences that flush at this token, in one launch (their input rows: k + i * row) */
  if (nf > 0 && (st = kv_flush_launch(c, op, fe, nf, b->a.k, b->a.v, b->a.kv_dtype, 1))) return st;
  if ((st = window_launch(b, n <= 8 ? 8 : n <= 64 ? 64 : KIVI_BATCH_MAX))) return st;
  for (int32_t i = 0; i < n; i++) kv_append_commit(c, b->seqs[i], layer, 1, 1, b->extra[i]);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_batch_status(kivi_batch_t b, int32_t wait, int64_t *report, int32_t n, uint8_t *bad) {
  static const char *op = "kivi_batch_status";
  if (!b) return kv_fail(NULL, KIVI_ERR_ARG, "%s: batch must not be NULL", op);
  kivi_status st = kv_enter(b->ctx, op);
  if (st) return st;
  if (n < 0) return kv_fail(b->ctx, KIVI_ERR_ARG, "%s: n must be >= 0, got %d", op, (int)n);
  if (n > 0 && !report) return kv_fail(b->ctx, KIVI_ERR_ARG, "%s: report must not be NULL when n > 0", op);
  if (wait && (st = kv_cuda(b->ctx, cudaStreamSynchronize(b->ctx->stream), op, "work enqueued on the context")))
    return st;
  int64_t r[KIVI_REPORT_FIELDS];
  const int had = kivi_batch_take(b->record, b->a.batch, r, bad);
  for (int32_t i = 0; i < n; i++) report[i] = i < KIVI_REPORT_FIELDS ? r[i] : 0;
  if (!had) return KIVI_OK;
  /* later checks stop poisoning once this runs (stream order: after every call enqueued so far) */
  if ((st = kv_cuda(b->ctx, cudaMemsetAsync(&b->dev->pending, 0, sizeof b->dev->pending, b->ctx->stream), op,
                    "cudaMemsetAsync (batch words)")))
    return st;
  char msg[KV_ERR_LEN];
  const int64_t i = r[KIVI_REPORT_INDEX];
  kivi_batch_message(msg, sizeof msg, op, r, i >= 0 && i < b->a.batch ? b->seqs[i] : -1, b->cache->cfg.head_dim, 0);
  return kv_fail(b->ctx, KIVI_ERR_NONFINITE, "%s", msg);
}

} /* extern "C" */
