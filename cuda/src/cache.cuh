/*
 * cache.cuh — private to the CUDA build: the paged KV cache object shared by cache.cu (create,
 * sequences, memory report), cache_append.cu, cache_read.cu, cache_scan.cu, batch.cu and attention.cu
 * (fused decode attention).
 *
 * Device memory (allocated once by kivi_cache_create):
 *   K pool, V pool   bytes per layer [max_pages][kv_heads][part.head] (kivi_format.h page layout; a
 *                    layer's part from its own format, at its offset kivi_layer_layout.kbase / vbase)
 *   K / V windows    half  [max_seqs][layers][W][kv_heads][D]          (W = R + F, slot = p % W)
 *   block table      int32 [max_seqs][max_pages]                       (rows uploaded on change)
 * The host keeps the authoritative copy of all metadata (live flags, tables, lengths, free stack),
 * so every validation and every plan is made on the host before anything is enqueued.
 */
#ifndef KIVI_CUDA_CACHE_CUH
#define KIVI_CUDA_CACHE_CUH

#include "common.cuh"
#include "kivi_batch.h"

/* Largest batch of kivi_cache_attend: the per-entry sequence info travels by value in the kernel
   parameters (12 bytes per entry, well inside CUDA 12.1+'s 32 KB parameter limit). */
#define KV_ATTN_MAX_BATCH 512

struct kivi_cache {
  kivi_ctx_t ctx;
  kivi_cache_config cfg;
  kivi_layer_layout *lay; /* host [layers]: each layer's formats, page parts and pool offsets */
  int32_t F, W, P, D;

  /* device */
  uint8_t *kpool, *vpool; /* per layer (at lay[l].kbase / vbase) [max_pages][kv_heads][part.head] */
  uint16_t *kwin, *vwin;  /* half [max_seqs][layers][W][kv_heads][D] */
  int32_t *d_table;       /* [max_seqs][max_pages] */
  uint64_t pool_bytes;    /* kpool + vpool + both windows */

  /* host mirror */
  uint8_t *live;       /* [max_seqs] */
  uint32_t *gen;       /* [max_seqs] bumped when a slot is freed: batches tell a reused slot from theirs */
  int32_t *table;      /* [max_seqs][max_pages] */
  int32_t *npages;     /* [max_seqs] */
  int64_t *len, *qlen; /* [max_seqs][layers] */
  int32_t *free_pages; /* LIFO stack [max_pages]; top at nfree - 1 */
  int32_t nfree;
  int32_t *page_refs; /* [max_pages] owners beyond the first of each page (forks share pages: kivi_seq.h) */

  /* attention workspace (split partials), grown on demand */
  float *ws;
  uint64_t ws_bytes;
};

struct kv_batch_dev;
/** Where a checked decode batch's attention records a non-finite q (batch.cuh); op: the record's call. */
struct kv_attn_check {
  kv_batch_dev *dev;
  kivi_batch_record *rec;
  int32_t op;
};
/** Launches the fused decode attention (attention.cu); arguments already validated on the host.
    slot/len/qlen: host [batch]; chk: NULL, or check q on the device and record a bad element there. */
kivi_status kv_attend_launch(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                             const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype, float scale,
                             void *out, kivi_dtype out_dtype, const kv_attn_check *chk);
/** kv_attend_launch that also writes the natural log-sum-exp of each (batch entry, query head) into lse
    (device f32 [batch][q_heads]) where lse is not NULL (a decode batch with kivi_batch_set_lse). */
kivi_status kv_attend_launch_full(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                                  const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype,
                                  float scale, void *out, kivi_dtype out_dtype, const kv_attn_check *chk, float *lse,
                                  int32_t qrows, bool direct = false);
/** kv_attend_launch that also writes the natural log-sum-exp of each (batch entry, query head) into lse
    (device f32 [batch][q_heads]) where lse is not NULL (kivi_cache_attend_multi). */
kivi_status kv_attend_launch_lse(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                                 const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype,
                                 float scale, void *out, kivi_dtype out_dtype, float *lse);
/** kv_attend_launch_lse for qrows queries a sequence on the tensor-core kernel (kivi_cache_attend_multi):
    q, out [batch][q_heads x qrows][D] in the order (kv head, query i, head of its group), lse likewise, or
    with direct in the caller's order [batch][qrows][q_heads] (every sequence with qrows queries); query i
    of a sequence of len tokens sees the first len - qrows + i + 1 of them. */
kivi_status kv_attend_launch_rows(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                                  const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype,
                                  float scale, void *out, kivi_dtype out_dtype, float *lse, int32_t qrows, bool direct);

/* The steps of an append, shared by kivi_cache_append and kivi_batch_append (batch.cu). n tokens to seq
   in layers [l0, l0 + nl), k / v [nl][n][kv_heads][head_dim]; all host-side checks already made. */
/** Pages the append needs beyond the sequence's block table. */
int64_t kv_append_extra(const kivi_cache *c, int32_t seq, int32_t l0, int32_t nl, int64_t n);
/** Writes the sequence's next `extra` host table entries from the free stack, below its top `skip`
    pages (taken by sequences before it in the same batch). Uploading them is the caller's. */
void kv_append_pages(kivi_cache *c, int32_t seq, int64_t extra, int64_t skip);
/** One (sequence, layer) of a flush launch; in_index its block of the input (k + in_index * n rows). */
struct kv_flush_entry {
  int32_t seq, layer, in_index;
};
/** Launches the flushes of cnt entries' appends of n tokens each (their pages already in the device
    table), from the host lengths: one launch for up to 128 entries (the ones with nothing to flush
    are skipped). */
kivi_status kv_flush_launch(kivi_cache *c, const char *op, const kv_flush_entry *e, int32_t cnt, const void *k,
                            const void *v, kivi_dtype dtype, int64_t n);
/** Launches the flushes of the append (its pages already in the device table), from the host lengths. */
kivi_status kv_append_flush(kivi_cache *c, const char *op, int32_t seq, int32_t l0, int32_t nl, const void *k,
                            const void *v, kivi_dtype dtype, int64_t n);
/** Launches the window writes of the append (after its flushes: they read the slots it overwrites). */
kivi_status kv_append_window(kivi_cache *c, const char *op, int32_t seq, int32_t l0, int32_t nl, const void *k,
                             const void *v, kivi_dtype dtype, int64_t n);
/** The host state after the launches: pages taken, lengths. */
void kv_append_commit(kivi_cache *c, int32_t seq, int32_t l0, int32_t nl, int64_t n, int64_t extra);

/** The cache (KIVI_ERR_ARG when NULL) and its context (kv_enter). Every cache export starts here. */
kivi_status kv_cache_enter(kivi_cache_t c, const char *op);
/** seq names a live slot (kivi_seq_check's rules, reported on the cache's context). */
kivi_status kv_cache_check_seq(kivi_cache_t c, const char *op, int32_t seq);

/** kv_cache_enter, then kv_cache_check_seq: what every export on one sequence checks first. */
kivi_status kv_cache_seq_enter(kivi_cache_t c, const char *op, int32_t seq);
/** kv_cache_seq_enter, then kivi_cache_io_check: the checks kivi_cache_append (append 1)
    and kivi_cache_read (append 0) make before their own. */
kivi_status kv_cache_io_enter(kivi_cache_t c, const char *op, int32_t seq, int append, int32_t layer, int32_t n_tokens,
                              const void *k, const void *v, kivi_dtype dtype, int32_t flags);

/** First non-finite element of x [n] (dtype), or with f16range also the first beyond fp16, into *first (-1 if
    none); waits. Uses scratch slot `slot`. */
kivi_status kv_cache_scan(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, int64_t n, bool f16range,
                          int slot, int64_t *first);
/** "NaN", "+Inf", "-Inf" or (a finite value beyond fp16, formatted into buf) for element i of x. */
const char *kv_cache_bad_name(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t i, char (&buf)[32]);

#endif /* KIVI_CUDA_CACHE_CUH */
