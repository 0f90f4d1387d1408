/*
 * cache.c — the paged KV cache of the CPU build: create / destroy, sequence slots, append (residual
 * window + flush into quantized pages), read-back and the memory report. The page layout is
 * kivi_format.h's; the per-group quantizers are uniform.c's and codebook.c's, so a page holds the
 * bits the standalone ops give for the same fp16-rounded tokens.
 *
 * Page ids come from a LIFO stack: the pool starts as 0, 1, 2, ... (page 0 popped first) and a freed
 * sequence pushes its pages back last-to-first, so the next pops return them in their old order.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_internal.h"
#include "kivi_seq.h"

typedef struct kivi_cache cache_t;

/* ---------------------------------------------------------------- create / destroy ------- */

/* a * b into *out; 0 on overflow of size_t. */
static int mul_size(uint64_t a, uint64_t b, uint64_t *out) {
  if (a && b > (uint64_t)SIZE_MAX / a) return 0;
  *out = a * b;
  return 1;
}

KIVI_API kivi_status kivi_cache_destroy(kivi_cache_t cache) {
  if (!cache) return KIVI_OK;
  void *owned[] = {cache->kpool, cache->vpool,      cache->kwin, cache->vwin,      cache->seqs, cache->tables,
                   cache->lens,  cache->free_pages, cache->lay,  cache->page_refs, cache};
  for (size_t i = 0; i < sizeof owned / sizeof owned[0]; i++) free(owned[i]);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_create(kivi_ctx_t ctx, const int32_t *config, int32_t n_fields, kivi_cache_t *out) {
  static const char *op = "kivi_cache_create";
  KIVI_HOST_ENTER(cpu_need_ctx, cpu_fail, ctx, op, kivi_cache_create_check(config, n_fields, out, msg, sizeof msg));

  cache_t *c = calloc(1, sizeof *c);
  if (!c) return cpu_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate %zu bytes", op, sizeof *c);
  c->ctx = ctx;
  memcpy(&c->cfg, config, sizeof c->cfg);
  const kivi_cache_config *g = &c->cfg;
  c->F = kivi_flush_tokens(g);
  c->W = kivi_window_tokens(g);

  uint64_t kpool = 0, vpool = 0, win, t;
  c->lay = calloc((size_t)g->layers, sizeof *c->lay);
  int ok =
      c->lay && kivi_cache_layouts(config, n_fields, c->lay, &kpool, &vpool) && kpool <= SIZE_MAX && vpool <= SIZE_MAX;
  ok = ok && mul_size((uint64_t)g->max_seqs * (uint64_t)g->layers, (uint64_t)c->W, &t) &&
       mul_size(t, (uint64_t)g->kv_heads * (uint64_t)g->head_dim * 2u, &win);
  if (ok) {
    c->kpool = calloc(1, (size_t)kpool);
    c->vpool = calloc(1, (size_t)vpool);
    c->kwin = calloc(1, (size_t)win);
    c->vwin = calloc(1, (size_t)win);
    c->seqs = calloc((size_t)g->max_seqs, sizeof *c->seqs);
    c->tables = calloc((size_t)g->max_seqs * (size_t)g->max_pages, sizeof *c->tables);
    c->lens = calloc((size_t)g->max_seqs * (size_t)g->layers * 2u, sizeof *c->lens);
    c->free_pages = calloc((size_t)g->max_pages, sizeof *c->free_pages);
    c->page_refs = calloc((size_t)g->max_pages, sizeof *c->page_refs);
    ok = c->kpool && c->vpool && c->kwin && c->vwin && c->seqs && c->tables && c->lens && c->free_pages && c->page_refs;
  }
  if (!ok) {
    const unsigned long long kb = c->lay ? c->lay[0].kp.page : 0, vb = c->lay ? c->lay[0].vp.page : 0;
    kivi_cache_destroy(c);
    return cpu_fail(ctx, KIVI_ERR_NOMEM,
                    "%s: could not allocate the pool (%d layers x %d pages x (%llu + %llu) bytes in layer 0) and the "
                    "residual windows",
                    op, (int)config[KIVI_CFG_LAYERS], (int)config[KIVI_CFG_MAX_PAGES], kb, vb);
  }
  c->pool_bytes = kpool + vpool + 2u * win;
  c->n_free = kivi_pages_init(c->free_pages, g->max_pages);
  *out = c;
  return KIVI_OK;
}

/* ---------------------------------------------------------------- sequences -------------- */

static kivi_status need_cache(const cache_t *c, const char *op) {
  if (!c) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  return KIVI_OK;
}

kivi_status cpu_cache_check_seq(const cache_t *c, const char *op, const char *name, int32_t seq) {
  char msg[CPU_ERR_LEN];
  const int live = seq >= 0 && seq < c->cfg.max_seqs && c->seqs[seq].live;
  kivi_status st = kivi_seq_check(op, name, seq, c->cfg.max_seqs, live, msg, sizeof msg);
  return st ? cpu_fail(c->ctx, st, "%s", msg) : KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_create(kivi_cache_t c, int32_t *seq) {
  static const char *op = "kivi_cache_seq_create";
  kivi_status st = need_cache(c, op);
  if (st) return st;
  if (!seq) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: seq must not be NULL", op);
  for (int32_t s = 0; s < c->cfg.max_seqs; s++) {
    if (c->seqs[s].live) continue;
    c->seqs[s].live = 1;
    c->seqs[s].n_pages = 0;
    memset(cpu_cache_len(c, s, 0), 0, sizeof(int64_t) * 2u * (size_t)c->cfg.layers);
    *seq = s;
    return KIVI_OK;
  }
  char msg[CPU_ERR_LEN];
  return cpu_fail(c->ctx, kivi_seq_full(c->cfg.max_seqs, msg, sizeof msg), "%s", msg);
}

KIVI_API kivi_status kivi_cache_seq_free(kivi_cache_t c, int32_t seq) {
  static const char *op = "kivi_cache_seq_free";
  kivi_status st = need_cache(c, op);
  if (st || (st = cpu_cache_check_seq(c, op, "seq", seq))) return st;
  kivi_pages_release_shared(c->free_pages, &c->n_free, c->page_refs, c->tables + (int64_t)seq * c->cfg.max_pages, 0,
                            c->seqs[seq].n_pages);
  c->seqs[seq].live = 0;
  c->seqs[seq].n_pages = 0;
  c->seqs[seq].gen++; /* a batch made before this sees the slot as another sequence */
  memset(cpu_cache_len(c, seq, 0), 0, sizeof(int64_t) * 2u * (size_t)c->cfg.layers);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_copy(kivi_cache_t c, int32_t src, int32_t *dst) {
  static const char *op = "kivi_cache_seq_copy";
  kivi_status st = need_cache(c, op);
  if (st || (st = cpu_cache_check_seq(c, op, "src", src))) return st;
  const kivi_cache_config *g = &c->cfg;
  int32_t s = 0;
  while (s < g->max_seqs && c->seqs[s].live) s++;
  const int32_t np = c->seqs[src].n_pages;
  KIVI_HOST_REFUSE(cpu_fail, c->ctx, st,
                   kivi_seq_copy_check(src, dst, s < g->max_seqs ? s : -1, g->max_seqs, np, c->n_free, g->max_pages,
                                       g->page_tokens, msg, sizeof msg));
  int32_t *row = c->tables + (int64_t)s * g->max_pages;
  const int32_t *srow = c->tables + (int64_t)src * g->max_pages;
  kivi_pages_take(c->free_pages, &c->n_free, row, np);
  for (int32_t l = 0; l < g->layers; l++) {
    for (int32_t i = 0; i < np; i++) {
      memcpy(cpu_cache_block(c, 0, l, row[i], 0), cpu_cache_block(c, 0, l, srow[i], 0), c->lay[l].kp.page);
      memcpy(cpu_cache_block(c, 1, l, row[i], 0), cpu_cache_block(c, 1, l, srow[i], 0), c->lay[l].vp.page);
    }
  }
  const size_t win = sizeof(uint16_t) * (size_t)g->layers * (size_t)c->W * (size_t)g->kv_heads * (size_t)g->head_dim;
  memcpy(cpu_cache_win(c, 0, s, 0, 0), cpu_cache_win(c, 0, src, 0, 0), win);
  memcpy(cpu_cache_win(c, 1, s, 0, 0), cpu_cache_win(c, 1, src, 0, 0), win);
  memcpy(cpu_cache_len(c, s, 0), cpu_cache_len(c, src, 0), sizeof(int64_t) * 2u * (size_t)g->layers);
  c->seqs[s].live = 1;
  c->seqs[s].n_pages = np;
  *dst = s;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_length(kivi_cache_t c, int32_t seq, int32_t layer, int64_t *length,
                                           int64_t *quantized) {
  static const char *op = "kivi_cache_seq_length";
  kivi_status st = need_cache(c, op);
  char msg[CPU_ERR_LEN];
  if (st || (st = cpu_cache_check_seq(c, op, "seq", seq))) return st;
  if ((st = kivi_seq_length_check(layer, c->cfg.layers, length, quantized, msg, sizeof msg)))
    return cpu_fail(c->ctx, st, "%s", msg);
  const int64_t *l = cpu_cache_len(c, seq, layer);
  *length = l[0];
  *quantized = l[1];
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_pages(kivi_cache_t c, int32_t seq, int32_t *pages, int32_t cap, int32_t *count) {
  static const char *op = "kivi_cache_seq_pages";
  kivi_status st = need_cache(c, op);
  if (st || (st = cpu_cache_check_seq(c, op, "seq", seq))) return st;
  KIVI_HOST_REFUSE(cpu_fail, c->ctx, st, kivi_seq_pages_check(pages, cap, count, msg, sizeof msg));
  *count = kivi_seq_pages_copy(c->tables + (int64_t)seq * c->cfg.max_pages, c->seqs[seq].n_pages, pages, cap);
  return KIVI_OK;
}

/* ---------------------------------------------------------------- page (de)quantization -- */

/* One group of G values v[i] at page elements (t0 + i * dt, d0 + i * dd) of a head block: params where
   kivi_format.h puts them, each code into its slot (whatever the layout, the group's codes are
   computed as one run, then placed). */
static void quantize_group(const kivi_layer_layout *L, int is_value, uint8_t *block, const float *v, int32_t G,
                           int32_t t0, int32_t d0, int32_t dt, int32_t dd) {
  const kivi_cache_config *g = &L->cfg;
  const int32_t bits = is_value ? g->v_bits : g->k_bits, n = kivi_levels(bits), cpw = kivi_codes_per_word(bits);
  uint32_t *codes = (uint32_t *)block;
  uint16_t *params = (uint16_t *)(block + (is_value ? L->vp.codes : L->kp.codes));
  uint32_t words[CPU_MAX_GROUP / 8];
  if ((is_value ? g->v_kind : g->k_kind) == KIVI_KIND_UNIFORM) {
    int64_t si, zi;
    kivi_page_uniform_at(g, is_value, t0, d0, &si, &zi);
    cpu_uniform_group(v, G, bits, &params[si], &params[zi], words);
  } else {
    uint16_t cent[KIVI_MAX_CENTROIDS];
    cpu_codebook_fit_group(v, G, n, is_value ? g->v_fit : g->k_fit, is_value ? g->v_iters : g->k_iters, cent, NULL);
    cpu_codebook_code_group(v, G, cent, n, KIVI_ASSIGN_NEAREST, bits, words);
    for (int32_t j = 0; j < n; j++) params[kivi_page_centroid_at(g, is_value, t0, d0, j)] = cent[j];
  }
  for (int32_t i = 0; i < G; i++) {
    int32_t slot;
    const int64_t w = kivi_page_code_at(g, is_value, t0 + i * dt, d0 + i * dd, &slot);
    const uint32_t mask = ((1u << bits) - 1u) << (bits * slot);
    codes[w] = (codes[w] & ~mask) | kivi_word_put(kivi_word_get(words[i / cpw], i % cpw, bits), slot, bits);
  }
}

/* Keys of one flush group: tokens [o, o + F) of a head block from tok [F][D] (one head's rows, floats
   of fp16 values). Gk == F, so each channel is exactly one group. */
static void quantize_k_group(const kivi_layer_layout *L, uint8_t *block, int32_t o, const float *tok) {
  const kivi_cache_config *g = &L->cfg;
  const int32_t D = g->head_dim, F = kivi_flush_tokens(g);
  if (g->k_bits == 16) {
    uint16_t *h = (uint16_t *)block + (int64_t)o * D;
    for (int32_t i = 0; i < F * D; i++) h[i] = kivi_f32_to_f16(tok[i]); /* exact: tok holds fp16 values */
    return;
  }
  float v[CPU_MAX_GROUP];
  for (int32_t d = 0; d < D; d++) {
    for (int32_t i = 0; i < F; i++) v[i] = tok[(int64_t)i * D + d];
    quantize_group(L, 0, block, v, F, o, d, 1, 0);
  }
}

/* Values of rows [o, o + F) of a head block from tok [F][D]: per token, groups of Gv channels. */
static void quantize_v_rows(const kivi_layer_layout *L, uint8_t *block, int32_t o, const float *tok) {
  const kivi_cache_config *g = &L->cfg;
  const int32_t D = g->head_dim, F = kivi_flush_tokens(g), Gv = g->v_group;
  if (g->v_bits == 16) {
    uint16_t *h = (uint16_t *)block + (int64_t)o * D;
    for (int32_t i = 0; i < F * D; i++) h[i] = kivi_f32_to_f16(tok[i]);
    return;
  }
  for (int32_t i = 0; i < F; i++)
    for (int32_t k = 0; k < D / Gv; k++)
      quantize_group(L, 1, block, tok + (int64_t)i * D + (int64_t)k * Gv, Gv, o + i, k * Gv, 0, 1);
}

/* Unpacking: AVX2 where the build targets it (a vector shift by per-lane counts; _mm256_fmadd_ps is
   the same single rounding as fmaf, so the values are identical to the scalar path). */
#if defined(__AVX2__) && defined(__FMA__)
#define CPU_DEQ_AVX2 1
static inline __m256i deq_shifts(int32_t bits, int32_t half) { /* shifts of codes [8 * half, 8 * half + 8) */
  return bits == 2 ? _mm256_setr_epi32(16 * half + 0, 16 * half + 2, 16 * half + 4, 16 * half + 6, 16 * half + 8,
                                       16 * half + 10, 16 * half + 12, 16 * half + 14)
                   : _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
}
/* Codes [8 * j, 8 * j + 8) of the run of words wd (cpw codes a word). */
static inline __m256i deq_codes8(const uint32_t *wd, int32_t j, int32_t bits, __m256i sh0, __m256i sh1) {
  const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
  const __m256i w = _mm256_set1_epi32((int)(bits == 2 ? wd[j / 2] : wd[j]));
  const __m256i sh = (bits == 2 && (j & 1)) ? sh1 : sh0;
  return _mm256_and_si256(_mm256_srlv_epi32(w, sh), mask);
}
#endif

/* Uniform dequantization of nw packed words: dst[w * cpw + i] = kivi_uniform_value(code i of word w, z, s). */
static inline __attribute__((always_inline)) void deq_uniform(const uint32_t *wd, int32_t nw, int32_t bits, float s,
                                                              float z, float *dst) {
  const int32_t cpw = 32 / bits;
#ifdef CPU_DEQ_AVX2
  const __m256i sh0 = deq_shifts(bits, 0), sh1 = deq_shifts(bits, 1);
  const __m256 vs = _mm256_set1_ps(s), vz = _mm256_set1_ps(z);
  for (int32_t j = 0; j < nw * cpw / 8; j++)
    _mm256_storeu_ps(dst + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(deq_codes8(wd, j, bits, sh0, sh1)), vs, vz));
#else
  const uint32_t mask = (1u << bits) - 1u;
  for (int32_t w = 0; w < nw; w++)
    for (int32_t i = 0; i < cpw; i++) dst[w * cpw + i] = kivi_uniform_value((wd[w] >> (bits * i)) & mask, z, s);
#endif
}

/* Codebook lookup of nw packed words against float centroids cf [2^bits]. */
static inline __attribute__((always_inline)) void deq_codebook(const uint32_t *wd, int32_t nw, int32_t bits,
                                                               const float *cf, float *dst) {
  const int32_t cpw = 32 / bits;
#ifdef CPU_DEQ_AVX2
  const __m256i sh0 = deq_shifts(bits, 0), sh1 = deq_shifts(bits, 1);
  float lo[8] = {0}, hi[8] = {0};
  for (int32_t i = 0; i < (1 << bits); i++) (i < 8 ? lo : hi)[i & 7] = cf[i];
  const __m256 vlo = _mm256_loadu_ps(lo), vhi = _mm256_loadu_ps(hi);
  for (int32_t j = 0; j < nw * cpw / 8; j++) {
    const __m256i q = deq_codes8(wd, j, bits, sh0, sh1);
    __m256 r = _mm256_permutevar8x32_ps(vlo, q); /* uses the low 3 bits of each code */
    if (bits == 4) {
      const __m256 top = _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)); /* bit 3 -> sign bit */
      r = _mm256_blendv_ps(r, _mm256_permutevar8x32_ps(vhi, q), top);
    }
    _mm256_storeu_ps(dst + 8 * j, r);
  }
#else
  const uint32_t mask = (1u << bits) - 1u;
  for (int32_t w = 0; w < nw; w++)
    for (int32_t i = 0; i < cpw; i++) dst[w * cpw + i] = cf[(wd[w] >> (bits * i)) & mask];
#endif
}

#define DEQ_UNIFORM(wd, nw, bits, s, z, dst) \
  ((bits) == 2 ? deq_uniform(wd, nw, 2, s, z, dst) : deq_uniform(wd, nw, 4, s, z, dst))
#define DEQ_CODEBOOK(wd, nw, bits, cf, dst) \
  ((bits) == 2 ? deq_codebook(wd, nw, 2, cf, dst) : deq_codebook(wd, nw, 4, cf, dst))

/* One group gi of a head block (the plain layout): wpg words wd, its params (uniform scale and zero,
   or n centroids) into dst. */
static inline void deq_group(int32_t kind, const uint16_t *params, int64_t gi, int32_t n, const uint32_t *wd,
                             int32_t wpg, int32_t bits, float *dst) {
  if (kind == KIVI_KIND_UNIFORM) {
    const float s = kivi_f16_to_f32(params[gi * 2]), z = kivi_f16_to_f32(params[gi * 2 + 1]);
    DEQ_UNIFORM(wd, wpg, bits, s, z, dst);
  } else {
    float cf[KIVI_MAX_CENTROIDS];
    for (int32_t j = 0; j < n; j++) cf[j] = kivi_f16_to_f32(params[gi * n + j]);
    DEQ_CODEBOOK(wd, wpg, bits, cf, dst);
  }
}

void cpu_cache_dequant_k(const kivi_layer_layout *L, const uint8_t *block, int32_t nt, float *kd) {
  const kivi_cache_config *g = &L->cfg;
  const int32_t D = g->head_dim, P = g->page_tokens, Gk = g->k_group, bits = g->k_bits;
  if (bits == 16) { /* [P][D] -> [D][P], 8 tokens at a time (nt is a multiple of F) */
    const uint16_t *h = (const uint16_t *)block;
    float tmp[8 * 256];
    for (int32_t t0 = 0; t0 < nt; t0 += 8) {
      cpu_f16_to_f32_n(h + (int64_t)t0 * D, tmp, 8 * (int64_t)D);
      for (int32_t d = 0; d < D; d++)
        for (int32_t j = 0; j < 8; j++) kd[(int64_t)d * P + t0 + j] = tmp[j * D + d];
    }
    return;
  }
  const uint32_t *codes = (const uint32_t *)block;
  const uint16_t *params = (const uint16_t *)(block + L->kp.codes);
  if (kivi_cache_mma_layout(g)) { /* codes [P][D / 16], params half2 [P / Gk][D] */
    const int32_t wpt = D / 16;
    for (int32_t t0 = 0; t0 < nt; t0 += Gk) {
      const uint16_t *pr = params + 2 * (int64_t)(t0 / Gk) * D;
      for (int32_t d = 0; d < D; d++) { /* one channel of the group: tokens contiguous in kd */
        const float s = kivi_f16_to_f32(pr[2 * d]), z = kivi_f16_to_f32(pr[2 * d + 1]);
        const uint32_t *wd = codes + (int64_t)t0 * wpt + d / 16;
        const int32_t sh = 2 * kivi_mma_key_slot(d);
        float *dst = kd + (int64_t)d * P + t0;
        for (int32_t i = 0; i < Gk; i++) dst[i] = kivi_uniform_value((wd[(int64_t)i * wpt] >> sh) & 3u, z, s);
      }
    }
    return;
  }
  const int32_t cpw = kivi_codes_per_word(bits), n = kivi_levels(bits), wpr = P / cpw, gpr = P / Gk;
  const int32_t wpg = Gk / cpw;
  for (int32_t d = 0; d < D; d++) {
    float *row = kd + (int64_t)d * P;
    for (int32_t k = 0; k < nt / Gk; k++) {
      const int64_t gi = (int64_t)d * gpr + k;
      const uint32_t *wd = codes + (int64_t)d * wpr + (int64_t)k * wpg;
      deq_group(g->k_kind, params, gi, n, wd, wpg, bits, row + (int64_t)k * Gk);
    }
  }
}

/* kv_spread4[x]: the four 2-bit codes of byte x as four bytes (a compile-time table) */
#define KV_SP(x) (((x)&0x3u) | ((x)&0xcu) << 6 | ((x)&0x30u) << 12 | ((x)&0xc0u) << 18)
#define KV_SP4(x) KV_SP((x)), KV_SP((x) + 1u), KV_SP((x) + 2u), KV_SP((x) + 3u)
#define KV_SP16(x) KV_SP4((x)), KV_SP4((x) + 4u), KV_SP4((x) + 8u), KV_SP4((x) + 12u)
#define KV_SP64(x) KV_SP16((x)), KV_SP16((x) + 16u), KV_SP16((x) + 32u), KV_SP16((x) + 48u)
static const uint32_t kv_spread4[256] = {KV_SP64(0u), KV_SP64(64u), KV_SP64(128u), KV_SP64(192u)};
#undef KV_SP64
#undef KV_SP16
#undef KV_SP4
#undef KV_SP

void cpu_cache_dequant_v(const kivi_layer_layout *L, const uint8_t *block, int32_t nt, float *vt) {
  const kivi_cache_config *g = &L->cfg;
  const int32_t D = g->head_dim, Gv = g->v_group, bits = g->v_bits;
  if (bits == 16) {
    cpu_f16_to_f32_n((const uint16_t *)block, vt, (int64_t)nt * D);
    return;
  }
  const uint32_t *codes = (const uint32_t *)block;
  const uint16_t *params = (const uint16_t *)(block + L->vp.codes);
  if (kivi_cache_mma_layout(g)) { /* codes [P / 16][D] (fragment order), params planes [D / Gv][P] in pair order:
                                     uniform scale then zero, codebook c0..c3 */
    const int64_t P = g->page_tokens, plane = (int64_t)(D / Gv) * P;
    const int cb = g->v_kind == KIVI_KIND_CODEBOOK;
    /* byte b of a word holds one token's codes for channels d0, d0 + 1, d0 + 16, d0 + 17 (slots 4b..4b+3,
       kivi_mma_value_slot); kv_spread4 gives those four codes as bytes, two 16-bit halves */
    for (int32_t t0 = 0; t0 < nt; t0 += 16) { /* a run: its codes unscrambled into bytes, then token by token */
      const uint32_t *wd = codes + (int64_t)(t0 / 16) * D;
      uint8_t c8[16][256];
      for (int32_t w = 0; w < D; w++) {
        const uint32_t x = wd[w];
        int32_t u0, d0; /* slot 0; byte b is token u0 + {0, 1, 8, 9}[b] */
        kivi_mma_value_slot(D, w, 0, &u0, &d0);
        for (int32_t b = 0; b < 4; b++) {
          const uint32_t e = kv_spread4[(x >> (8 * b)) & 0xffu];
          uint8_t *row = c8[u0 + 8 * (b >> 1) + (b & 1)] + d0;
          const uint16_t lo = (uint16_t)e, hi = (uint16_t)(e >> 16);
          memcpy(row, &lo, 2);
          memcpy(row + 16, &hi, 2);
        }
      }
      for (int32_t u = 0; u < 16 && t0 + u < nt; u++) {
        const int32_t pos = kivi_pair_pos(t0 + u);
        float *dst = vt + (int64_t)(t0 + u) * D;
        for (int32_t k = 0; k < D / Gv; k++) {
          if (cb) {
            float cf[4];
            for (int32_t j = 0; j < 4; j++) cf[j] = kivi_f16_to_f32(params[j * plane + k * P + pos]);
            for (int32_t d = k * Gv; d < (k + 1) * Gv; d++) dst[d] = cf[c8[u][d]];
          } else {
            const float s = kivi_f16_to_f32(params[k * P + pos]), z = kivi_f16_to_f32(params[plane + k * P + pos]);
            for (int32_t d = k * Gv; d < (k + 1) * Gv; d++) dst[d] = kivi_uniform_value(c8[u][d], z, s);
          }
        }
      }
    }
    return;
  }
  const int32_t cpw = kivi_codes_per_word(bits), n = kivi_levels(bits), wpr = D / cpw, gpr = D / Gv;
  const int32_t wpg = Gv / cpw;
  for (int32_t t = 0; t < nt; t++) {
    for (int32_t k = 0; k < gpr; k++) {
      const int64_t gi = (int64_t)t * gpr + k;
      const uint32_t *wd = codes + (int64_t)t * wpr + (int64_t)k * wpg;
      deq_group(g->v_kind, params, gi, n, wd, wpg, bits, vt + (int64_t)t * D + (int64_t)k * Gv);
    }
  }
}

/* ---------------------------------------------------------------- append ----------------- */

/* Element i of the input as fp16 bits (the cache's storage precision). */
static inline uint16_t input_f16(const void *x, kivi_dtype dtype, int64_t i) {
  return dtype == KIVI_F16 ? ((const uint16_t *)x)[i] : kivi_f32_to_f16(cpu_load(x, dtype, i));
}

/* First f32 / bf16 element that fp16 rounds to Inf (|x| >= 65520, kivi_f32_to_f16), or -1. */
static int64_t first_f16_overflow(const void *x, kivi_dtype dtype, int64_t total) {
  if (dtype == KIVI_F16) return -1;
  for (int64_t i = 0; i < total; i++)
    if (fabsf(cpu_load(x, dtype, i)) >= 65520.0f) return i;
  return -1;
}

static kivi_status scan_input(const cache_t *c, const char *op, const char *name, const void *x, kivi_dtype dtype,
                              int64_t total, int32_t n, int32_t layer0) {
  const int64_t row = (int64_t)c->cfg.kv_heads * c->cfg.head_dim;
  int64_t i = cpu_first_nonfinite(x, dtype, total);
  if (i < 0 && (i = first_f16_overflow(x, dtype, total)) >= 0)
    return cpu_fail(c->ctx, KIVI_ERR_NONFINITE,
                    "%s: %s must lie within the fp16 range (|x| < 65520) that the cache stores, got %g at index %lld "
                    "(layer %lld, token %lld, head %lld, channel %lld)",
                    op, name, (double)cpu_load(x, dtype, i), (long long)i, (long long)(layer0 + i / (row * n)),
                    (long long)(i / row % n), (long long)(i % row / c->cfg.head_dim), (long long)(i % c->cfg.head_dim));
  if (i < 0) return KIVI_OK;
  const float v = cpu_load(x, dtype, i);
  return cpu_fail(c->ctx, KIVI_ERR_NONFINITE,
                  "%s: %s must be finite, got %s at index %lld (layer %lld, token %lld, head %lld, channel %lld); "
                  "pass KIVI_FLAG_TRUSTED only for data known to be finite",
                  op, name, v != v ? "NaN" : (v > 0 ? "+Inf" : "-Inf"), (long long)i,
                  (long long)(layer0 + i / (row * n)), (long long)(i / row % n), (long long)(i % row / c->cfg.head_dim),
                  (long long)(i % c->cfg.head_dim));
}

KIVI_API kivi_status kivi_cache_append(kivi_cache_t c, int32_t seq, int32_t layer, const void *k, const void *v,
                                       kivi_dtype dtype, int32_t n, int32_t flags) {
  static const char *op = "kivi_cache_append";
  kivi_status st = need_cache(c, op);
  char msg[CPU_ERR_LEN];
  if (st || (st = cpu_cache_check_seq(c, op, "seq", seq))) return st;
  if ((st = kivi_cache_io_check(op, 1, layer, c->cfg.layers, n, k, v, dtype, flags, msg, sizeof msg)))
    return cpu_fail(c->ctx, st, "%s", msg);

  const kivi_cache_config *g = &c->cfg;
  const int32_t L0 = layer < 0 ? 0 : layer, L1 = layer < 0 ? g->layers : layer + 1;
  const int32_t D = g->head_dim, F = c->F;
  const int64_t per_layer = (int64_t)n * g->kv_heads * D;
  if (!(flags & KIVI_FLAG_TRUSTED)) {
    if ((st = scan_input(c, op, "k", k, dtype, per_layer * (L1 - L0), n, L0))) return st;
    if ((st = scan_input(c, op, "v", v, dtype, per_layer * (L1 - L0), n, L0))) return st;
  }

  const int64_t extra = cpu_cache_append_pages(c, seq, L0, L1, n);
  if (extra > c->n_free)
    return cpu_fail(c->ctx, KIVI_ERR_CAPACITY,
                    "%s: the page pool is full: sequence %d needs %lld more page(s), %d of %d are free", op, (int)seq,
                    (long long)extra, (int)c->n_free, (int)g->max_pages);
  float *tok = NULL; /* one head's F flushed tokens [F][D] */
  if ((st = cpu_alloc(c->ctx, op, sizeof(float) * (size_t)F * (size_t)D, (void **)&tok))) return st;
  cpu_cache_append_commit(c, seq, L0, L1, k, v, dtype, n, extra, tok);
  free(tok);
  return KIVI_OK;
}

int64_t cpu_cache_append_pages(const cache_t *c, int32_t seq, int32_t L0, int32_t L1, int32_t n) {
  const int64_t *ln = cpu_cache_len(c, seq, 0); /* len, qlen of each layer side by side */
  return kivi_pages_needed(&c->cfg, c->seqs[seq].n_pages, ln, ln + 1, 2, L0, L1, n);
}

void cpu_cache_append_commit(cache_t *c, int32_t seq, int32_t L0, int32_t L1, const void *k, const void *v,
                             kivi_dtype dtype, int32_t n, int64_t extra, float *tok) {
  const kivi_cache_config *g = &c->cfg;
  const int32_t D = g->head_dim, H = g->kv_heads, P = g->page_tokens, F = c->F, W = c->W;
  const int64_t row = (int64_t)H * D, per_layer = (int64_t)n * row;
  int32_t *table = c->tables + (int64_t)seq * g->max_pages;
  for (int64_t i = 0; i < extra; i++) table[c->seqs[seq].n_pages++] = c->free_pages[--c->n_free];

  for (int32_t l = L0; l < L1; l++) {
    int64_t *ln = cpu_cache_len(c, seq, l);
    const int64_t len = ln[0], qlen = ln[1], f = kivi_flush_count(&c->cfg, len, qlen, n);
    const void *kin[2] = {k, v};
    const int64_t base = (int64_t)(l - L0) * per_layer; /* element offset of this layer's input */
    for (int64_t p = qlen; p < qlen + f; p += F) {
      const int32_t page = table[p / P], o = (int32_t)(p % P);
      for (int is_v = 0; is_v < 2; is_v++) {
        for (int32_t h = 0; h < H; h++) {
          for (int32_t i = 0; i < F; i++) {
            const int64_t pi = p + i;
            float *dst = tok + (int64_t)i * D;
            if (pi < len) {
              const uint16_t *src = cpu_cache_win(c, is_v, seq, l, pi % W) + (int64_t)h * D;
              for (int32_t d = 0; d < D; d++) dst[d] = kivi_f16_to_f32(src[d]);
            } else {
              const int64_t e = base + (pi - len) * row + (int64_t)h * D;
              for (int32_t d = 0; d < D; d++) dst[d] = kivi_f16_to_f32(input_f16(kin[is_v], dtype, e + d));
            }
          }
          uint8_t *block = cpu_cache_block(c, is_v, l, page, h);
          if (is_v)
            quantize_v_rows(&c->lay[l], block, o, tok);
          else
            quantize_k_group(&c->lay[l], block, o, tok);
        }
      }
    }
    /* The tokens that stay in fp16 go to their window slots (after the flush read the old ones). */
    const int64_t first = qlen + f > len ? qlen + f - len : 0; /* first input row not flushed */
    for (int64_t i = first; i < n; i++) {
      const int64_t e = base + i * row, slot = (len + i) % W;
      for (int is_v = 0; is_v < 2; is_v++) {
        uint16_t *dst = cpu_cache_win(c, is_v, seq, l, slot);
        for (int64_t j = 0; j < row; j++) dst[j] = input_f16(kin[is_v], dtype, e + j);
      }
    }
    ln[0] = len + n;
    ln[1] = qlen + f;
  }
}

/* ---------------------------------------------------------------- read / memory ---------- */

KIVI_API kivi_status kivi_cache_read(kivi_cache_t c, int32_t seq, int32_t layer, void *k, void *v, kivi_dtype dtype) {
  static const char *op = "kivi_cache_read";
  kivi_status st = need_cache(c, op);
  char msg[CPU_ERR_LEN];
  if (st || (st = cpu_cache_check_seq(c, op, "seq", seq))) return st;
  if ((st = kivi_cache_io_check(op, 0, layer, c->cfg.layers, 1, k, v, dtype, 0, msg, sizeof msg)))
    return cpu_fail(c->ctx, st, "%s", msg);
  const kivi_cache_config *g = &c->cfg;
  const int32_t D = g->head_dim, H = g->kv_heads, P = g->page_tokens, W = c->W;
  const int64_t row = (int64_t)H * D, *ln = cpu_cache_len(c, seq, layer), len = ln[0], qlen = ln[1];
  float *buf = NULL; /* kd [D][P], then vt [P][D] */
  if ((st = cpu_alloc(c->ctx, op, sizeof(float) * (size_t)P * (size_t)D, (void **)&buf))) return st;
  const int32_t *table = c->tables + (int64_t)seq * g->max_pages;
  for (int64_t t0 = 0; t0 < qlen; t0 += P) {
    const int32_t nt = (int32_t)(qlen - t0 < P ? qlen - t0 : P);
    for (int32_t h = 0; h < H; h++) {
      cpu_cache_dequant_k(&c->lay[layer], cpu_cache_block(c, 0, layer, table[t0 / P], h), nt, buf);
      for (int32_t t = 0; t < nt; t++)
        for (int32_t d = 0; d < D; d++)
          cpu_store(k, dtype, (t0 + t) * row + (int64_t)h * D + d, buf[(int64_t)d * P + t]);
      cpu_cache_dequant_v(&c->lay[layer], cpu_cache_block(c, 1, layer, table[t0 / P], h), nt, buf);
      for (int32_t t = 0; t < nt; t++)
        for (int32_t d = 0; d < D; d++)
          cpu_store(v, dtype, (t0 + t) * row + (int64_t)h * D + d, buf[(int64_t)t * D + d]);
    }
  }
  for (int64_t p = qlen; p < len; p++) {
    const uint16_t *ks = cpu_cache_win(c, 0, seq, layer, p % W), *vs = cpu_cache_win(c, 1, seq, layer, p % W);
    for (int64_t j = 0; j < row; j++) {
      cpu_store(k, dtype, p * row + j, kivi_f16_to_f32(ks[j]));
      cpu_store(v, dtype, p * row + j, kivi_f16_to_f32(vs[j]));
    }
  }
  free(buf);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_memory(kivi_cache_t c, uint64_t *report, int32_t n_fields) {
  static const char *op = "kivi_cache_memory";
  kivi_status st = need_cache(c, op);
  if (st) return st;
  if (!report) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: report must not be NULL", op);
  if (n_fields < 1) return cpu_fail(c->ctx, KIVI_ERR_ARG, "%s: n_fields must be >= 1, got %d", op, (int)n_fields);
  const kivi_cache_config *g = &c->cfg;
  const uint64_t used = (uint64_t)(g->max_pages - c->n_free), heads = (uint64_t)g->kv_heads;
  uint64_t r[KIVI_MEM_FIELDS] = {0}, resid = 0, tokens = 0, quant = 0, codes = 0, params = 0;
  for (int32_t l = 0; l < g->layers; l++) {
    codes += c->lay[l].kp.codes + c->lay[l].vp.codes;
    params += c->lay[l].kp.params + c->lay[l].vp.params;
  }
  for (int32_t s = 0; s < g->max_seqs; s++) {
    if (!c->seqs[s].live) continue;
    for (int32_t l = 0; l < g->layers; l++) {
      const int64_t *ln = cpu_cache_len(c, s, l);
      tokens += (uint64_t)ln[0];
      quant += (uint64_t)ln[1];
      resid += (uint64_t)(ln[0] - ln[1]);
    }
  }
  r[KIVI_MEM_CODE_BYTES] = used * heads * codes;
  r[KIVI_MEM_PARAM_BYTES] = used * heads * params;
  r[KIVI_MEM_RESIDUAL_BYTES] = resid * (uint64_t)g->kv_heads * (uint64_t)g->head_dim * 4u;
  r[KIVI_MEM_TABLE_BYTES] = (uint64_t)g->max_seqs * ((uint64_t)g->max_pages * 4u + (uint64_t)g->layers * 16u + 8u);
  r[KIVI_MEM_POOL_BYTES] = c->pool_bytes;
  r[KIVI_MEM_PAGES_USED] = used;
  r[KIVI_MEM_PAGES_TOTAL] = (uint64_t)g->max_pages;
  r[KIVI_MEM_TOKENS] = tokens;
  r[KIVI_MEM_QUANTIZED_TOKENS] = quant;
  const int32_t m = n_fields < KIVI_MEM_FIELDS ? n_fields : KIVI_MEM_FIELDS;
  memcpy(report, r, sizeof(uint64_t) * (size_t)m);
  return KIVI_OK;
}
