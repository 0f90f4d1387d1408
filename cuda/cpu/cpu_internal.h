/*
 * cpu_internal.h — private helpers of the CPU reference build (never installed, never exported:
 * the library is built with -fvisibility=hidden and only kivi.h's KIVI_API symbols are visible).
 */
#ifndef KIVI_CPU_INTERNAL_H
#define KIVI_CPU_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "kivi.h"
#include "kivi_format.h"
#include "kivi_host.h"

#if defined(__AVX__)
#include <immintrin.h>
#endif

#define CPU_ERR_LEN 512
/* Columns per tile: a tile is G rows x CPU_TILE_COLS columns (token axis) or 1 row x CPU_TILE_COLS
   columns (channel axis; a multiple of every group size), small enough to stay in L2. */
#define CPU_TILE_COLS 512
#define CPU_MAX_GROUP 128

struct kivi_ctx {
  int32_t device;
  char err[CPU_ERR_LEN];
  struct timespec t0;
  int timer_started;
};

/** Writes the message into the thread-local slot and (if ctx) the context's slot; returns st. */
kivi_status cpu_fail(kivi_ctx_t ctx, kivi_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* ---------------------------------------------------------------- validation ------------- */

/* The argument rules and each export's spec are kivi_host.h's, shared with the CUDA build. */
typedef kivi_spec cpu_spec;
typedef kivi_shape cpu_shape;

/** ctx, then kivi_spec_check (everything the spec names, in a fixed order); on success fills *sh (may be
    NULL). */
kivi_status cpu_validate(kivi_ctx_t ctx, const cpu_spec *s, cpu_shape *sh);
/** cpu_validate, then, unless the spec's flags say KIVI_FLAG_TRUSTED, the scan of the input x
    (cpu_check_finite). */
kivi_status cpu_validate_input(kivi_ctx_t ctx, const cpu_spec *s, cpu_shape *sh, const void *x);
/** ctx non-null (for ops outside the quantizer rules). */
kivi_status cpu_need_ctx(kivi_ctx_t ctx, const char *op);
/** The quantizers' scan of x [rows][cols]: NaN, Inf, or a finite f32 / bf16 value beyond fp16's range
    (|x| >= 65520; the params are fp16): KIVI_ERR_NONFINITE naming the first such element. */
kivi_status cpu_check_finite(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, const cpu_shape *sh);
/** Index of the first element of x[0 .. n) the quantizers refuse (kivi_unquantizable: NaN, Inf, or a
    finite f32 / bf16 value fp16 turns into Inf), or -1. */
int64_t cpu_first_unquantizable(const void *x, kivi_dtype dtype, int64_t total);
/** Index of the first NaN / Inf among x[0 .. n), or -1 if all are finite. */
int64_t cpu_first_nonfinite(const void *x, kivi_dtype dtype, int64_t n);
/** malloc that reports KIVI_ERR_NOMEM through cpu_fail; *out = NULL on failure. */
kivi_status cpu_alloc(kivi_ctx_t ctx, const char *op, size_t bytes, void **out);
/** n scratch buffers at once (*out[i] of bytes[i]), or none: a failure frees those made, leaves them
   NULL and returns its status. */
kivi_status cpu_alloc_all(kivi_ctx_t ctx, const char *op, int n, const size_t *bytes, void **const *out);

/* ---------------------------------------------------------------- elements --------------- */

static inline float cpu_load(const void *x, kivi_dtype dtype, int64_t i) {
  switch (dtype) {
    case KIVI_F16: return kivi_f16_to_f32(((const uint16_t *)x)[i]);
    case KIVI_BF16: return kivi_bf16_to_f32(((const uint16_t *)x)[i]);
    default: return ((const float *)x)[i];
  }
}

static inline void cpu_store(void *out, kivi_dtype dtype, int64_t i, float v) {
  switch (dtype) {
    case KIVI_F16: ((uint16_t *)out)[i] = kivi_f32_to_f16(v); break;
    case KIVI_BF16: ((uint16_t *)out)[i] = kivi_f32_to_bf16(v); break;
    default: ((float *)out)[i] = v; break;
  }
}

/** fp16 -> float for n values (exact, as kivi_f16_to_f32; F16C where the build targets it). */
static inline void cpu_f16_to_f32_n(const uint16_t *h, float *f, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
  for (; i < n; i++) f[i] = kivi_f16_to_f32(h[i]);
}

/* ---------------------------------------------------------------- tiles ------------------ */
/*
 * Every op walks the matrix in tiles: rows [r0, r0 + nr) x cols [c0, c0 + nc), nr = group on the
 * token axis (a tile holds whole groups: one per column) and 1 on the channel axis (nc / group
 * groups, one after another). Tiles are visited row block by row block.
 */

/** Rows of a tile. */
static inline int32_t cpu_tile_rows(const cpu_shape *sh) { return sh->axis == KIVI_AXIS_TOKEN ? sh->group : 1; }
/** Groups in a tile of nc columns. */
static inline int32_t cpu_tile_groups(const cpu_shape *sh, int32_t nc) {
  return sh->axis == KIVI_AXIS_TOKEN ? nc : nc / sh->group;
}
/** Index of the k-th group of the tile at (r0, c0). */
static inline int64_t cpu_tile_group(const cpu_shape *sh, int64_t r0, int64_t c0, int32_t k) {
  return sh->axis == KIVI_AXIS_TOKEN ? (c0 + k) * sh->row_groups + r0 / sh->group
                                     : r0 * sh->col_groups + c0 / sh->group + k;
}
/** Copies the k-th group of a tile (p, row stride) into v [group], in axis order. */
static inline void cpu_tile_gather(const cpu_shape *sh, const float *p, int64_t stride, int32_t k, float *v) {
  if (sh->axis == KIVI_AXIS_TOKEN) {
    for (int32_t r = 0; r < sh->group; r++) v[r] = p[r * stride + k];
  } else {
    const float *q = p + (int64_t)k * sh->group;
    for (int32_t i = 0; i < sh->group; i++) v[i] = q[i];
  }
}
/** Writes v [group] as the k-th group of a dense tile p [nr][nc]. */
static inline void cpu_tile_scatter(const cpu_shape *sh, float *p, int32_t nc, int32_t k, const float *v) {
  if (sh->axis == KIVI_AXIS_TOKEN) {
    for (int32_t r = 0; r < sh->group; r++) p[(int64_t)r * nc + k] = v[r];
  } else {
    float *q = p + (int64_t)k * sh->group;
    for (int32_t i = 0; i < sh->group; i++) q[i] = v[i];
  }
}

/** A float view of x[r0 .. r0 + nr)[c0 .. c0 + nc): x itself for f32 (*stride = cols), else the
    values converted into tmp [nr][nc] (*stride = nc). */
const float *cpu_tile_load(const void *x, kivi_dtype dtype, int64_t cols, int64_t r0, int64_t c0, int32_t nr,
                           int32_t nc, float *tmp, int64_t *stride);
/** Stores a dense tile src [nr][nc] into out[r0 .. r0 + nr)[c0 .. c0 + nc) as dtype. */
void cpu_tile_store(void *out, kivi_dtype dtype, int64_t cols, int64_t r0, int64_t c0, int32_t nr, int32_t nc,
                    const float *src);

/* ---------------------------------------------------------------- packing ---------------- */

/** Packs n codes (n % cpw == 0) into n / cpw words, LSB first. */
static inline void cpu_pack(const uint8_t *q, int64_t n, int32_t bits, uint32_t *words) {
  const int32_t cpw = kivi_codes_per_word(bits);
  for (int64_t w = 0; w < n / cpw; w++) {
    uint32_t acc = 0;
    for (int32_t j = 0; j < cpw; j++) acc |= kivi_word_put(q[w * cpw + j], j, bits);
    words[w] = acc;
  }
}
/** Unpacks n / cpw words into n codes. */
static inline void cpu_unpack(const uint32_t *words, int64_t n, int32_t bits, uint8_t *q) {
  const int32_t cpw = kivi_codes_per_word(bits);
  for (int64_t w = 0; w < n / cpw; w++) {
    const uint32_t word = words[w];
    for (int32_t j = 0; j < cpw; j++) q[w * cpw + j] = (uint8_t)kivi_word_get(word, j, bits);
  }
}

/* ---------------------------------------------------------------- per-group quantizers --- */
/* The group-level cores of the quantizer ops, shared with the paged cache (cache.c), so a page holds
   exactly the bits the standalone ops would produce for the same values. */

/** Uniform (KIVI) group v [G], G a multiple of 8: fp16 scale and zero, codes packed into G / cpw words. */
void cpu_uniform_group(const float *v, int32_t G, int32_t bits, uint16_t *scale, uint16_t *zero, uint32_t *words);
/** Fits the n centroids of group v [G] (kivi_codebook_fit) into h [n] (fp16, sorted); trace
    [max_iters + 1] may be NULL. Returns the number of updates applied. */
int32_t cpu_codebook_fit_group(const float *v, int32_t G, int32_t n, kivi_fit fit, int32_t max_iters, uint16_t *h,
                               float *trace);
/** Codes of group v [G] against fp16 centroids h [n] under `assign`, packed into G / cpw words. */
void cpu_codebook_code_group(const float *v, int32_t G, const uint16_t *h, int32_t n, kivi_assign assign, int32_t bits,
                             uint32_t *words);

/* ---------------------------------------------------------------- paged cache ------------ */

/** Per sequence slot state (the per-layer lengths live in kivi_cache.lens). */
typedef struct cpu_seq {
  int32_t live;
  int32_t n_pages; /* entries of its block table in use */
  uint32_t gen;    /* bumped when the slot is freed: decode batches tell a reused slot from theirs */
} cpu_seq;

struct kivi_cache {
  kivi_ctx_t ctx;
  kivi_cache_config cfg;
  kivi_layer_layout *lay; /* [layers]: each layer's formats, page parts and pool offsets */
  int32_t F, W;           /* flush unit (k_group) and window capacity R + F */
  uint8_t *kpool, *vpool; /* per layer (at lay[l].kbase / vbase) [max_pages][part.page] bytes */
  uint16_t *kwin, *vwin;  /* fp16 [max_seqs][layers][W][kv_heads][head_dim] */
  uint64_t pool_bytes;    /* kpool + vpool + kwin + vwin */
  cpu_seq *seqs;          /* [max_seqs] */
  int32_t *tables;        /* [max_seqs][max_pages] block tables */
  int64_t *lens;          /* [max_seqs][layers][2]: len, qlen */
  int32_t *free_pages;    /* [max_pages] LIFO stack of free page ids, top at n_free - 1 */
  int32_t n_free;
  int32_t *page_refs; /* [max_pages] owners beyond the first of each page (forks share pages: kivi_seq.h) */
};

static inline int64_t *cpu_cache_len(const struct kivi_cache *c, int32_t seq, int32_t layer) {
  return c->lens + ((int64_t)seq * c->cfg.layers + layer) * 2;
}
/** Head block of (layer, page, head) in the K (is_value 0) or V pool. */
static inline uint8_t *cpu_cache_block(const struct kivi_cache *c, int is_value, int32_t layer, int32_t page,
                                       int32_t head) {
  const kivi_layer_layout *L = &c->lay[layer];
  const kivi_part_layout *p = is_value ? &L->vp : &L->kp;
  uint8_t *pool = is_value ? c->vpool + L->vbase : c->kpool + L->kbase;
  return pool + (uint64_t)page * p->page + (uint64_t)head * p->head;
}
/** Window row of (seq, layer, slot): fp16 [kv_heads][head_dim]. */
static inline uint16_t *cpu_cache_win(const struct kivi_cache *c, int is_value, int32_t seq, int32_t layer,
                                      int64_t slot) {
  const uint64_t row = (uint64_t)c->cfg.kv_heads * (uint64_t)c->cfg.head_dim;
  return (is_value ? c->vwin : c->kwin) +
         (((uint64_t)seq * (uint64_t)c->cfg.layers + (uint64_t)layer) * (uint64_t)c->W + (uint64_t)slot) * row;
}
/** Dequantized keys of tokens [0, nt) of a head block of layer L: kd [head_dim][page_tokens] (channel major). */
void cpu_cache_dequant_k(const kivi_layer_layout *L, const uint8_t *block, int32_t nt, float *kd);
/** Dequantized values of tokens [0, nt) of a head block of layer L: vt [page_tokens][head_dim] (token major). */
void cpu_cache_dequant_v(const kivi_layer_layout *L, const uint8_t *block, int32_t nt, float *vt);
/** Pages seq's block table needs beyond those it holds for an append of n tokens to layers [L0, L1). */
int64_t cpu_cache_append_pages(const struct kivi_cache *c, int32_t seq, int32_t L0, int32_t L1, int32_t n);
/** The append after every check passed (extra = cpu_cache_append_pages <= free pages): takes the pages,
    quantizes the flushed groups, writes the window slots, updates the lengths. k, v: [L1 - L0][n][kv_heads]
    [head_dim]; tok: scratch [k_group][head_dim] floats. Nothing in it can fail. */
void cpu_cache_append_commit(struct kivi_cache *c, int32_t seq, int32_t L0, int32_t L1, const void *k, const void *v,
                             kivi_dtype dtype, int32_t n, int64_t extra, float *tok);
/** Validates the cache pointer and seq (range: KIVI_ERR_ARG, not live: KIVI_ERR_STATE). */
kivi_status cpu_cache_check_seq(const struct kivi_cache *c, const char *op, const char *name, int32_t seq);

#endif /* KIVI_CPU_INTERNAL_H */
