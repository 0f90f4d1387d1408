/*
 * kivi_host.h — the host logic of kivi.h, written once for the CPU build (C11) and the CUDA build
 * (nvcc): the status names, the argument rules every quantizer export checks (and the spec each
 * export fills, in one table below), the cache's config rules and the sequence and page bookkeeping
 * both caches share. Each build keeps only its device work and where it reports an error: the
 * functions here write the message into a buffer and return the status, and the build copies it to
 * its context (cpu_fail, kv_fail). The TypeScript checks (src/_checks.ts, src/cache_config.ts) give
 * the typed errors first with the same rules.
 */
#ifndef KIVI_HOST_H
#define KIVI_HOST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kivi.h"
#include "kivi_format.h"

/* ------------------------------------------------------------------ messages -------------- */

/** Formats "op: ..." into msg and returns st (a failing check's one line). */
static inline kivi_status kivi_host_msg(char *msg, size_t len, kivi_status st, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static inline kivi_status kivi_host_msg(char *msg, size_t len, kivi_status st, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, len, fmt, ap);
  va_end(ap);
  return st;
}

/** kivi_status_str of both builds. */
static inline const char *kivi_status_name(kivi_status code) {
  switch (code) {
    case KIVI_OK: return "KIVI_OK";
    case KIVI_ERR_ARG: return "KIVI_ERR_ARG";
    case KIVI_ERR_SHAPE: return "KIVI_ERR_SHAPE";
    case KIVI_ERR_NONFINITE: return "KIVI_ERR_NONFINITE";
    case KIVI_ERR_NOMEM: return "KIVI_ERR_NOMEM";
    case KIVI_ERR_CUDA: return "KIVI_ERR_CUDA";
    case KIVI_ERR_CUDA_STICKY: return "KIVI_ERR_CUDA_STICKY";
    case KIVI_ERR_NO_DEVICE: return "KIVI_ERR_NO_DEVICE";
    case KIVI_ERR_STATE: return "KIVI_ERR_STATE";
    case KIVI_ERR_UNSUPPORTED: return "KIVI_ERR_UNSUPPORTED";
    case KIVI_ERR_CAPACITY: return "KIVI_ERR_CAPACITY";
    default: return "KIVI_ERR_UNKNOWN";
  }
}

/* ------------------------------------------------------------------ argument rules -------- */

/* What kivi_spec_check checks beyond the required pointers. */
enum {
  KIVI_NEED_MATRIX = 1 << 0, /* rows, cols, axis, group */
  KIVI_NEED_N = 1 << 1,      /* n (pack / unpack) */
  KIVI_NEED_BITS = 1 << 2,
  KIVI_NEED_FIT = 1 << 3,
  KIVI_NEED_ASSIGN = 1 << 4,
  KIVI_NEED_ITERS = 1 << 5,
  KIVI_NEED_FLAGS = 1 << 6
};
#define KIVI_SPEC_PTRS 6

typedef struct kivi_arg_ptr {
  const char *name; /* NULL ends the list */
  const void *p;
} kivi_arg_ptr;

/** The arguments of one call, as the shared rules of kivi.h see them. */
typedef struct kivi_spec {
  const char *op;
  unsigned need;
  kivi_arg_ptr ptrs[KIVI_SPEC_PTRS]; /* pointers that must not be NULL */
  int64_t rows, cols, n;
  kivi_axis axis;
  int32_t group, bits;
  const char *dtype_name; /* "dtype" or "out_dtype"; NULL: no dtype argument */
  kivi_dtype dtype;
  kivi_fit fit;
  kivi_assign assign;
  int32_t max_iters, flags;
} kivi_spec;

/** Derived sizes of a checked call. */
typedef struct kivi_shape {
  int64_t rows, cols, groups;
  int64_t row_groups; /* groups per column (token axis: rows / group) */
  int64_t col_groups; /* groups per row (channel axis: cols / group) */
  int32_t axis, group, bits, cpw, levels;
  int32_t wpg; /* packed words per group: group / cpw (a group's words are [g * wpg, (g + 1) * wpg)) */
} kivi_shape;

static inline const char *kivi_axis_name(kivi_axis a) {
  return a == KIVI_AXIS_TOKEN ? "KIVI_AXIS_TOKEN" : "KIVI_AXIS_CHANNEL";
}

/** The sizes rows x cols, grouped along axis: rows, cols and their product below 2^40, a valid group. */
static inline kivi_status kivi_check_matrix(const kivi_spec *s, char *msg, size_t len) {
  const char *op = s->op;
  if (s->rows < 1)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: rows must be >= 1, got %lld", op, (long long)s->rows);
  if (s->cols < 1)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: cols must be >= 1, got %lld", op, (long long)s->cols);
  if (s->rows > (KIVI_MAX_ELEMS - 1) / s->cols)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: rows * cols must be below 2^40, got %lld x %lld", op,
                         (long long)s->rows, (long long)s->cols);
  if (!kivi_valid_group(s->group))
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: group must be 32, 64 or 128, got %d", op, (int)s->group);
  return KIVI_OK;
}

/** The axis, and a group dividing the grouped axis (after the bits and dtype, in kivi.h's order). */
static inline kivi_status kivi_check_axis(const kivi_spec *s, char *msg, size_t len) {
  if (s->axis != KIVI_AXIS_TOKEN && s->axis != KIVI_AXIS_CHANNEL)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG,
                         "%s: axis must be KIVI_AXIS_TOKEN (0) or KIVI_AXIS_CHANNEL (1), got %d", s->op, (int)s->axis);
  const int64_t along = s->axis == KIVI_AXIS_TOKEN ? s->rows : s->cols;
  if (along % s->group)
    return kivi_host_msg(msg, len, KIVI_ERR_SHAPE, "%s: %s (%lld) must be a multiple of group (%d) for %s", s->op,
                         s->axis == KIVI_AXIS_TOKEN ? "rows" : "cols", (long long)along, (int)s->group,
                         kivi_axis_name(s->axis));
  return KIVI_OK;
}

/** The enum and flag arguments the spec names. */
static inline kivi_status kivi_check_options(const kivi_spec *s, char *msg, size_t len) {
  const char *op = s->op;
  if ((s->need & KIVI_NEED_FIT) && s->fit != KIVI_FIT_FREE && s->fit != KIVI_FIT_PINNED)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: fit must be KIVI_FIT_FREE (0) or KIVI_FIT_PINNED (1), got %d", op,
                         (int)s->fit);
  if ((s->need & KIVI_NEED_ITERS) && (s->max_iters < 1 || s->max_iters > KIVI_MAX_ITERS))
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: max_iters must be in 1..%d, got %d", op, KIVI_MAX_ITERS,
                         (int)s->max_iters);
  if ((s->need & KIVI_NEED_ASSIGN) && s->assign != KIVI_ASSIGN_NEAREST && s->assign != KIVI_ASSIGN_INTERVAL)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG,
                         "%s: assign must be KIVI_ASSIGN_NEAREST (0) or KIVI_ASSIGN_INTERVAL (1), got %d", op,
                         (int)s->assign);
  if ((s->need & KIVI_NEED_FLAGS) && (s->flags & ~(int32_t)KIVI_FLAG_TRUSTED))
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: flags must be 0 or KIVI_FLAG_TRUSTED (1), got %d", op,
                         (int)s->flags);
  return KIVI_OK;
}

/** The derived sizes of a checked spec. */
static inline void kivi_spec_shape(const kivi_spec *s, kivi_shape *sh) {
  memset(sh, 0, sizeof *sh);
  if (s->need & KIVI_NEED_MATRIX) {
    sh->rows = s->rows;
    sh->cols = s->cols;
    sh->axis = s->axis;
    sh->group = s->group;
    sh->row_groups = s->rows / s->group;
    sh->col_groups = s->cols / s->group;
    sh->groups = kivi_group_count(s->rows, s->cols, s->axis, s->group);
  }
  if (s->need & KIVI_NEED_BITS) {
    sh->bits = s->bits;
    sh->cpw = kivi_codes_per_word(s->bits);
    sh->levels = kivi_levels(s->bits);
    sh->wpg = sh->group / sh->cpw;
  }
}

/**
 * Checks everything the spec names, in a fixed order (pointers, n, matrix sizes, bits, dtype, axis and
 * group, codes per word, fit, iterations, assignment, flags); on success fills *sh (may be NULL), else
 * writes the message and returns the status. The context is the caller's to check first.
 */
static inline kivi_status kivi_spec_check(const kivi_spec *s, kivi_shape *sh, char *msg, size_t len) {
  const char *op = s->op;
  kivi_status st;
  for (int i = 0; i < KIVI_SPEC_PTRS && s->ptrs[i].name; i++)
    if (!s->ptrs[i].p) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: %s must not be NULL", op, s->ptrs[i].name);
  if (s->need & KIVI_NEED_N) {
    if (s->n < 1) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: n must be >= 1, got %lld", op, (long long)s->n);
    if (s->n >= KIVI_MAX_ELEMS)
      return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: n must be below 2^40, got %lld", op, (long long)s->n);
  }
  if ((s->need & KIVI_NEED_MATRIX) && (st = kivi_check_matrix(s, msg, len))) return st;
  if ((s->need & KIVI_NEED_BITS) && !kivi_valid_bits(s->bits))
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: bits must be 2 or 4, got %d", op, (int)s->bits);
  if (s->dtype_name && s->dtype != KIVI_F32 && s->dtype != KIVI_F16 && s->dtype != KIVI_BF16)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: %s must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d",
                         op, s->dtype_name, (int)s->dtype);
  if ((s->need & KIVI_NEED_MATRIX) && (st = kivi_check_axis(s, msg, len))) return st;
  if ((s->need & KIVI_NEED_N) && (s->need & KIVI_NEED_BITS) && s->n % kivi_codes_per_word(s->bits))
    return kivi_host_msg(msg, len, KIVI_ERR_SHAPE, "%s: n (%lld) must be a multiple of %d (codes per word at %d bits)",
                         op, (long long)s->n, (int)kivi_codes_per_word(s->bits), (int)s->bits);
  if ((st = kivi_check_options(s, msg, len))) return st;
  if (sh) kivi_spec_shape(s, sh);
  return KIVI_OK;
}

/* Runs `check`, a rule check of these headers that writes its message into `msg` (the char[512]
 * this declares; pass msg, sizeof msg), into `st`, and returns a refusal from the export through the
 * build's `fail` (cpu_fail, kv_fail) on `ctx`, with that message. */
#define KIVI_HOST_REFUSE(fail, ctx, st, check)             \
  do {                                                     \
    char msg[512];                                         \
    if (((st) = (check))) return fail(ctx, st, "%s", msg); \
  } while (0)

/* The start of an export on a context in either build: the build's context check `enter`
 * (cpu_need_ctx, kv_enter) of ctx for `op`, then `check` as KIVI_HOST_REFUSE; declares the status
 * `st`, and a refusal returns it from the export. */
#define KIVI_HOST_ENTER(enter, fail, ctx, op, check) \
  kivi_status st = enter(ctx, op);                   \
  if (st) return st;                                 \
  KIVI_HOST_REFUSE(fail, ctx, st, check)

/* The start of a quantizer export in either build: `spec` (what `make` returns: a kivi_spec_* of the
 * export's arguments), its shape `sh` and the status `st`, which `validate` (the build's validator,
 * an expression of ctx, &spec and &sh) sets; a refusal returns it from the export. */
#define KIVI_SPEC_ENTER(make, validate) \
  const kivi_spec spec = make;          \
  kivi_shape sh;                        \
  kivi_status st = validate;            \
  if (st) return st

/* ------------------------------------------------------------------ the exports' specs ---- */

/* One spec per quantizer export of kivi.h: its name, what it checks and its required pointers, so
   the two builds cannot drift apart on an export's rules. */

/** A spec with the required pointers (names NULL past the last). */
static inline kivi_spec kivi_spec_make(const char *op, unsigned need, const char *n0, const void *p0, const char *n1,
                                       const void *p1, const char *n2, const void *p2, const char *n3, const void *p3) {
  kivi_spec s;
  memset(&s, 0, sizeof s);
  s.op = op;
  s.need = need;
  const char *names[4] = {n0, n1, n2, n3};
  const void *ptrs[4] = {p0, p1, p2, p3};
  for (int i = 0; i < 4; i++) {
    s.ptrs[i].name = names[i];
    s.ptrs[i].p = ptrs[i];
  }
  return s;
}

/** The matrix arguments of a spec (rows x cols grouped along axis, bits, the dtype argument's name). */
static inline void kivi_spec_matrix(kivi_spec *s, int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                    int32_t bits, const char *dtype_name, kivi_dtype dtype) {
  s->rows = rows;
  s->cols = cols;
  s->axis = axis;
  s->group = group;
  s->bits = bits;
  s->dtype_name = dtype_name;
  s->dtype = dtype;
}

/** The codebook options of a spec. */
static inline void kivi_spec_codebook(kivi_spec *s, kivi_fit fit, int32_t max_iters, kivi_assign assign,
                                      int32_t flags) {
  s->fit = fit;
  s->max_iters = max_iters;
  s->assign = assign;
  s->flags = flags;
}

#define KIVI_NEED_QUANT (KIVI_NEED_MATRIX | KIVI_NEED_BITS)

static inline kivi_spec kivi_spec_uniform_quantize(const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                                   kivi_axis axis, int32_t group, int32_t bits, int32_t flags,
                                                   const void *codes, const void *scale, const void *zero) {
  kivi_spec s = kivi_spec_make("kivi_uniform_quantize", KIVI_NEED_QUANT | KIVI_NEED_FLAGS, "x", x, "codes", codes,
                               "scale", scale, "zero", zero);
  kivi_spec_matrix(&s, rows, cols, axis, group, bits, "dtype", dtype);
  s.flags = flags;
  return s;
}

static inline kivi_spec kivi_spec_uniform_dequantize(const void *codes, const void *scale, const void *zero,
                                                     int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                                     int32_t bits, const void *out, kivi_dtype out_dtype) {
  kivi_spec s = kivi_spec_make("kivi_uniform_dequantize", KIVI_NEED_QUANT, "codes", codes, "scale", scale, "zero", zero,
                               "out", out);
  kivi_spec_matrix(&s, rows, cols, axis, group, bits, "out_dtype", out_dtype);
  return s;
}

static inline kivi_spec kivi_spec_codebook_fit(const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                               kivi_axis axis, int32_t group, int32_t bits, kivi_fit fit,
                                               int32_t max_iters, int32_t flags, const void *centroids) {
  kivi_spec s = kivi_spec_make("kivi_codebook_fit", KIVI_NEED_QUANT | KIVI_NEED_FIT | KIVI_NEED_ITERS | KIVI_NEED_FLAGS,
                               "x", x, "centroids", centroids, NULL, NULL, NULL, NULL);
  kivi_spec_matrix(&s, rows, cols, axis, group, bits, "dtype", dtype);
  kivi_spec_codebook(&s, fit, max_iters, KIVI_ASSIGN_NEAREST, flags);
  return s;
}

static inline kivi_spec kivi_spec_codebook_quantize(const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                                    kivi_axis axis, int32_t group, int32_t bits, const void *centroids,
                                                    kivi_assign assign, int32_t flags, const void *codes) {
  kivi_spec s = kivi_spec_make("kivi_codebook_quantize", KIVI_NEED_QUANT | KIVI_NEED_ASSIGN | KIVI_NEED_FLAGS, "x", x,
                               "centroids", centroids, "codes", codes, NULL, NULL);
  kivi_spec_matrix(&s, rows, cols, axis, group, bits, "dtype", dtype);
  kivi_spec_codebook(&s, KIVI_FIT_FREE, 0, assign, flags);
  return s;
}

static inline kivi_spec kivi_spec_codebook_encode(const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                                  kivi_axis axis, int32_t group, int32_t bits, kivi_fit fit,
                                                  int32_t max_iters, kivi_assign assign, int32_t flags,
                                                  const void *centroids, const void *codes) {
  kivi_spec s = kivi_spec_make("kivi_codebook_encode",
                               KIVI_NEED_QUANT | KIVI_NEED_FIT | KIVI_NEED_ITERS | KIVI_NEED_ASSIGN | KIVI_NEED_FLAGS,
                               "x", x, "centroids", centroids, "codes", codes, NULL, NULL);
  kivi_spec_matrix(&s, rows, cols, axis, group, bits, "dtype", dtype);
  kivi_spec_codebook(&s, fit, max_iters, assign, flags);
  return s;
}

static inline kivi_spec kivi_spec_codebook_dequantize(const void *codes, const void *centroids, int64_t rows,
                                                      int64_t cols, kivi_axis axis, int32_t group, int32_t bits,
                                                      const void *out, kivi_dtype out_dtype) {
  kivi_spec s = kivi_spec_make("kivi_codebook_dequantize", KIVI_NEED_QUANT, "codes", codes, "centroids", centroids,
                               "out", out, NULL, NULL);
  kivi_spec_matrix(&s, rows, cols, axis, group, bits, "out_dtype", out_dtype);
  return s;
}

static inline kivi_spec kivi_spec_stats_block(const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                              kivi_axis axis, int32_t group, const void *stats, const void *nonfinite) {
  kivi_spec s =
      kivi_spec_make("kivi_stats_block", KIVI_NEED_MATRIX, "x", x, "stats", stats, "nonfinite", nonfinite, NULL, NULL);
  kivi_spec_matrix(&s, rows, cols, axis, group, 0, "dtype", dtype);
  return s;
}

/** kivi_codes_pack (pack != 0: codes -> words) and kivi_codes_unpack (words -> codes). */
static inline kivi_spec kivi_spec_codes(int pack, const void *codes, const void *words, int64_t n, int32_t bits) {
  kivi_spec s = pack ? kivi_spec_make("kivi_codes_pack", KIVI_NEED_N | KIVI_NEED_BITS, "codes", codes, "words", words,
                                      NULL, NULL, NULL, NULL)
                     : kivi_spec_make("kivi_codes_unpack", KIVI_NEED_N | KIVI_NEED_BITS, "words", words, "codes", codes,
                                      NULL, NULL, NULL, NULL);
  s.n = n;
  s.bits = bits;
  return s;
}

/* ------------------------------------------------------------------ cache config ---------- */

static const char *const kivi_cfg_names[KIVI_CFG_FIELDS] = {
    "KIVI_CFG_LAYERS",   "KIVI_CFG_KV_HEADS",  "KIVI_CFG_Q_HEADS",  "KIVI_CFG_HEAD_DIM", "KIVI_CFG_PAGE_TOKENS",
    "KIVI_CFG_RESIDUAL", "KIVI_CFG_MAX_PAGES", "KIVI_CFG_MAX_SEQS", "KIVI_CFG_K_KIND",   "KIVI_CFG_K_BITS",
    "KIVI_CFG_K_GROUP",  "KIVI_CFG_K_FIT",     "KIVI_CFG_K_ITERS",  "KIVI_CFG_V_KIND",   "KIVI_CFG_V_BITS",
    "KIVI_CFG_V_GROUP",  "KIVI_CFG_V_FIT",     "KIVI_CFG_V_ITERS"};
static const char *const kivi_cfg_short[KIVI_CFG_FIELDS] = {
    "layers", "kv_heads", "q_heads", "head_dim", "page_tokens", "residual", "max_pages", "max_seqs", "k_kind",
    "k_bits", "k_group",  "k_fit",   "k_iters",  "v_kind",      "v_bits",   "v_group",   "v_fit",    "v_iters"};

/** config[f] breaks its rule: "kivi_cache_create: config[KIVI_CFG_X] (x) must be <rule>, got <v>"; for a
    layer's format field (layer >= 0; a holds the cache's fields with that layer's format in place) the
    field's index in the per-layer part and the layer. */
static inline kivi_status kivi_cfg_bad_at(char *msg, size_t len, const int32_t *a, int f, const char *rule,
                                          int32_t layer) {
  if (layer < 0)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "kivi_cache_create: config[%s] (%s) must be %s, got %d",
                         kivi_cfg_names[f], kivi_cfg_short[f], rule, (int)a[f]);
  return kivi_host_msg(msg, len, KIVI_ERR_ARG,
                       "kivi_cache_create: config[KIVI_CFG_FIELDS + %d * KIVI_LAYER_FIELDS + %d] (layer %d's %s) must "
                       "be %s, got %d",
                       (int)layer, f - KIVI_CFG_K_KIND, (int)layer, kivi_cfg_short[f], rule, (int)a[f]);
}
static inline kivi_status kivi_cfg_bad(char *msg, size_t len, const int32_t *a, int f, const char *rule) {
  return kivi_cfg_bad_at(msg, len, a, f, rule, -1);
}

/** The rules of one part's format (part 0 keys, 1 values: kind, bits, value group, fit, iterations);
    layer >= 0: a layer's format (see kivi_cfg_bad_at). */
static inline kivi_status kivi_cfg_check_part(const int32_t *a, int part, int32_t layer, char *msg, size_t len) {
  const int o = part ? KIVI_CFG_V_KIND - KIVI_CFG_K_KIND : 0;
  const int32_t bits = a[KIVI_CFG_K_BITS + o], kind = a[KIVI_CFG_K_KIND + o], D = a[KIVI_CFG_HEAD_DIM];
  char rule[64];
  if (kind != KIVI_KIND_UNIFORM && kind != KIVI_KIND_CODEBOOK)
    return kivi_cfg_bad_at(msg, len, a, KIVI_CFG_K_KIND + o, "KIVI_KIND_UNIFORM (0) or KIVI_KIND_CODEBOOK (1)", layer);
  if (bits != 2 && bits != 4 && bits != 16)
    return kivi_cfg_bad_at(msg, len, a, KIVI_CFG_K_BITS + o, "2, 4 or 16", layer);
  if (part && !kivi_valid_group(a[KIVI_CFG_V_GROUP]))
    return kivi_cfg_bad_at(msg, len, a, KIVI_CFG_V_GROUP, "32, 64 or 128", layer);
  if (part && D % a[KIVI_CFG_V_GROUP]) {
    snprintf(rule, sizeof rule, "a divisor of head_dim (%d)", (int)D);
    return kivi_cfg_bad_at(msg, len, a, KIVI_CFG_V_GROUP, rule, layer);
  }
  if (a[KIVI_CFG_K_FIT + o] != KIVI_FIT_FREE && a[KIVI_CFG_K_FIT + o] != KIVI_FIT_PINNED)
    return kivi_cfg_bad_at(msg, len, a, KIVI_CFG_K_FIT + o, "KIVI_FIT_FREE (0) or KIVI_FIT_PINNED (1)", layer);
  if (a[KIVI_CFG_K_ITERS + o] < 1 || a[KIVI_CFG_K_ITERS + o] > KIVI_MAX_ITERS)
    return kivi_cfg_bad_at(msg, len, a, KIVI_CFG_K_ITERS + o, "in 1..256", layer);
  return KIVI_OK;
}

/** The cache's fields `a` with layer l's format fields in place (per-layer configs; `full` holds them
    after the KIVI_CFG_FIELDS cache fields), into t [KIVI_CFG_FIELDS]. */
static inline void kivi_cfg_layer_fields(const int32_t *full, int32_t l, int32_t *t) {
  memcpy(t, full, sizeof(int32_t) * KIVI_CFG_FIELDS);
  memcpy(t + KIVI_CFG_K_KIND, full + KIVI_CFG_FIELDS + (int64_t)l * KIVI_LAYER_FIELDS,
         sizeof(int32_t) * KIVI_LAYER_FIELDS);
}

/**
 * The rules of kivi.h's cache config array (the order of kivi.h's KIVI_CFG_* comments; the first
 * broken rule is reported). src/cache_config.ts resolveCacheOptions checks the same rules first.
 */
static inline kivi_status kivi_cache_config_check(const int32_t *a, char *msg, size_t len) {
  const int32_t kvh = a[KIVI_CFG_KV_HEADS], qh = a[KIVI_CFG_Q_HEADS];
  const int32_t D = a[KIVI_CFG_HEAD_DIM], P = a[KIVI_CFG_PAGE_TOKENS], Gk = a[KIVI_CFG_K_GROUP];
  char rule[96];
  if (a[KIVI_CFG_LAYERS] < 1) return kivi_cfg_bad(msg, len, a, KIVI_CFG_LAYERS, ">= 1");
  if (kvh < 1) return kivi_cfg_bad(msg, len, a, KIVI_CFG_KV_HEADS, ">= 1");
  if (qh < kvh || qh % kvh || qh / kvh > 32) {
    snprintf(rule, sizeof rule, "a multiple of kv_heads (%d) at most 32 times it", (int)kvh);
    return kivi_cfg_bad(msg, len, a, KIVI_CFG_Q_HEADS, rule);
  }
  if (D != 64 && D != 128 && D != 256) return kivi_cfg_bad(msg, len, a, KIVI_CFG_HEAD_DIM, "64, 128 or 256");
  if (!kivi_valid_group(Gk)) return kivi_cfg_bad(msg, len, a, KIVI_CFG_K_GROUP, "32, 64 or 128");
  if (P != 32 && P != 64 && P != 128 && P != 256)
    return kivi_cfg_bad(msg, len, a, KIVI_CFG_PAGE_TOKENS, "32, 64, 128 or 256");
  if (P % Gk) {
    snprintf(rule, sizeof rule, "a multiple of k_group (%d)", (int)Gk);
    return kivi_cfg_bad(msg, len, a, KIVI_CFG_PAGE_TOKENS, rule);
  }
  if (a[KIVI_CFG_RESIDUAL] < 0 || a[KIVI_CFG_RESIDUAL] % Gk) {
    snprintf(rule, sizeof rule, ">= 0 and a multiple of k_group (%d)", (int)Gk);
    return kivi_cfg_bad(msg, len, a, KIVI_CFG_RESIDUAL, rule);
  }
  if (a[KIVI_CFG_MAX_PAGES] < 1) return kivi_cfg_bad(msg, len, a, KIVI_CFG_MAX_PAGES, ">= 1");
  if (a[KIVI_CFG_MAX_SEQS] < 1) return kivi_cfg_bad(msg, len, a, KIVI_CFG_MAX_SEQS, ">= 1");
  kivi_status st = kivi_cfg_check_part(a, 0, -1, msg, len);
  return st ? st : kivi_cfg_check_part(a, 1, -1, msg, len);
}

/** The per-layer formats of a config of KIVI_CFG_FIELDS + layers * KIVI_LAYER_FIELDS fields (after
    kivi_cache_config_check passed on the cache's fields): each layer's the rules of a format, and its
    key group the cache's (the flush unit and the window are one for all layers). */
static inline kivi_status kivi_cache_layers_check(const int32_t *a, char *msg, size_t len) {
  int32_t t[KIVI_CFG_FIELDS];
  char rule[96];
  for (int32_t l = 0; l < a[KIVI_CFG_LAYERS]; l++) {
    kivi_cfg_layer_fields(a, l, t);
    if (t[KIVI_CFG_K_GROUP] != a[KIVI_CFG_K_GROUP]) {
      snprintf(rule, sizeof rule, "the cache's k_group (%d), the flush unit all layers share",
               (int)a[KIVI_CFG_K_GROUP]);
      return kivi_cfg_bad_at(msg, len, t, KIVI_CFG_K_GROUP, rule, l);
    }
    kivi_status st = kivi_cfg_check_part(t, 0, l, msg, len);
    if (st || (st = kivi_cfg_check_part(t, 1, l, msg, len))) return st;
  }
  return KIVI_OK;
}

/**
 * Each layer's layout (lay [layers]) of a checked config of n_fields fields: its formats (the cache's,
 * or its own per-layer fields), page parts and base offsets in the pools, layer after layer, and the
 * pools' sizes in bytes. Returns 0 when a pool's size passes 2^62 bytes (the caller reports NOMEM).
 */
static inline int kivi_cache_layouts(const int32_t *config, int32_t n_fields, kivi_layer_layout *lay, uint64_t *kbytes,
                                     uint64_t *vbytes) {
  const int32_t layers = config[KIVI_CFG_LAYERS];
  const uint64_t pages = (uint64_t)config[KIVI_CFG_MAX_PAGES], lim = (uint64_t)1 << 62;
  uint64_t kb = 0, vb = 0;
  for (int32_t l = 0; l < layers; l++) {
    int32_t t[KIVI_CFG_FIELDS];
    if (n_fields > KIVI_CFG_FIELDS)
      kivi_cfg_layer_fields(config, l, t);
    else
      memcpy(t, config, sizeof t);
    memcpy(&lay[l].cfg, t, sizeof lay[l].cfg);
    lay[l].kp = kivi_page_part(&lay[l].cfg, 0);
    lay[l].vp = kivi_page_part(&lay[l].cfg, 1);
    lay[l].kbase = kb;
    lay[l].vbase = vb;
    if (lay[l].kp.page > lim / pages || lay[l].vp.page > lim / pages) return 0;
    kb += pages * lay[l].kp.page;
    vb += pages * lay[l].vp.page;
    if (kb > lim || vb > lim) return 0;
  }
  *kbytes = kb;
  *vbytes = vb;
  return 1;
}

/** kivi_cache_create's arguments after the context: config, out, n_fields, then the config's rules. */
static inline kivi_status kivi_cache_create_check(const int32_t *config, int32_t n_fields, const void *out, char *msg,
                                                  size_t len) {
  static const char *op = "kivi_cache_create";
  if (!config) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: config must not be NULL", op);
  if (!out) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  if (n_fields < KIVI_CFG_FIELDS)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG,
                         "%s: n_fields must be KIVI_CFG_FIELDS (%d) or KIVI_CFG_FIELDS + layers * KIVI_LAYER_FIELDS, "
                         "got %d",
                         op, (int)KIVI_CFG_FIELDS, (int)n_fields);
  kivi_status st = kivi_cache_config_check(config, msg, len);
  if (st || n_fields == KIVI_CFG_FIELDS) return st;
  if ((int64_t)n_fields != KIVI_CFG_FIELDS + (int64_t)config[KIVI_CFG_LAYERS] * KIVI_LAYER_FIELDS)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG,
                         "%s: n_fields must be KIVI_CFG_FIELDS (%d) or KIVI_CFG_FIELDS + layers * KIVI_LAYER_FIELDS "
                         "(%lld), got %d",
                         op, (int)KIVI_CFG_FIELDS,
                         (long long)(KIVI_CFG_FIELDS + (int64_t)config[KIVI_CFG_LAYERS] * KIVI_LAYER_FIELDS),
                         (int)n_fields);
  return kivi_cache_layers_check(config, msg, len);
}

/* ------------------------------------------------------------------ sequences and pages --- */

/* Both caches keep, on the host, a live flag and a page count per sequence slot, a block table
   [max_seqs][max_pages], lengths per slot and layer, and a LIFO stack of free pages (top at nfree - 1;
   a fresh cache pops page 0, 1, 2, ...). The functions below are that bookkeeping; a length array is
   passed with its stride between layers (the CPU build keeps len and qlen side by side). */

/** seq names a slot (KIVI_ERR_ARG) that is live (KIVI_ERR_STATE). `name` is the argument's name. */
static inline kivi_status kivi_seq_check(const char *op, const char *name, int32_t seq, int32_t max_seqs, int live,
                                         char *msg, size_t len) {
  if (seq < 0 || seq >= max_seqs)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: %s must be in 0..%d, got %d", op, name, (int)max_seqs - 1,
                         (int)seq);
  if (!live)
    return kivi_host_msg(msg, len, KIVI_ERR_STATE,
                         "%s: %s %d is not a live sequence (create it with kivi_cache_seq_create)", op, name, (int)seq);
  return KIVI_OK;
}

/** layer in 0..layers-1 (or -1, all layers, where allow_all). */
static inline kivi_status kivi_layer_check(const char *op, int32_t layer, int32_t layers, int allow_all, char *msg,
                                           size_t len) {
  if (layer >= (allow_all ? -1 : 0) && layer < layers) return KIVI_OK;
  return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: layer must be in %s..%d, got %d", op, allow_all ? "-1" : "0",
                       (int)layers - 1, (int)layer);
}

/** The data arguments of kivi_cache_append (append: layer -1 for all, n_tokens, k, v, dtype, flags)
    or of kivi_cache_read (layer, k, v, dtype), after the sequence. */
static inline kivi_status kivi_cache_io_check(const char *op, int append, int32_t layer, int32_t layers,
                                              int32_t n_tokens, const void *k, const void *v, kivi_dtype dtype,
                                              int32_t flags, char *msg, size_t len) {
  kivi_status st = kivi_layer_check(op, layer, layers, append, msg, len);
  if (st) return st;
  if (append && n_tokens < 1)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: n_tokens must be >= 1, got %d", op, (int)n_tokens);
  if (!k) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: k must not be NULL", op);
  if (!v) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: v must not be NULL", op);
  if (dtype != KIVI_F32 && dtype != KIVI_F16 && dtype != KIVI_BF16)
    return kivi_host_msg(msg, len, KIVI_ERR_ARG,
                         "%s: dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op, (int)dtype);
  if (append && (flags & ~(int32_t)KIVI_FLAG_TRUSTED))
    return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: flags must be 0 or KIVI_FLAG_TRUSTED (1), got %d", op,
                         (int)flags);
  return KIVI_OK;
}

/** Every slot taken (kivi_cache_seq_create found none free). */
static inline kivi_status kivi_seq_full(int32_t max_seqs, char *msg, size_t len) {
  return kivi_host_msg(msg, len, KIVI_ERR_CAPACITY,
                       "kivi_cache_seq_create: all %d sequence slots are taken (free one with kivi_cache_seq_free)",
                       (int)max_seqs);
}

/** kivi_cache_seq_copy's plan, after src was found live: dst not NULL, a free slot (`slot`, -1 when
    none) and as many free pages as src holds. Nothing is taken here, so a refusal changes nothing. */
static inline kivi_status kivi_seq_copy_check(int32_t src, const int32_t *dst, int32_t slot, int32_t max_seqs,
                                              int32_t src_pages, int32_t nfree, int32_t max_pages, int32_t page_tokens,
                                              char *msg, size_t len) {
  static const char *op = "kivi_cache_seq_copy";
  if (!dst) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: dst must not be NULL", op);
  if (slot < 0)
    return kivi_host_msg(msg, len, KIVI_ERR_CAPACITY,
                         "%s: all %d sequence slots are taken (free one with kivi_cache_seq_free)", op, (int)max_seqs);
  if (src_pages > nfree)
    return kivi_host_msg(
        msg, len, KIVI_ERR_CAPACITY,
        "%s: the page pool is full: copying sequence %d needs %d pages of %d tokens, %d of %d are free", op, (int)src,
        (int)src_pages, (int)page_tokens, (int)nfree, (int)max_pages);
  return KIVI_OK;
}

/** Pops n pages off the free stack into a block table row (the copy's pages, in the order an append
    would take them). */
static inline void kivi_pages_take(int32_t *free_pages, int32_t *nfree, int32_t *row, int32_t n) {
  for (int32_t i = 0; i < n; i++) row[i] = free_pages[--(*nfree)];
}

/** kivi_cache_seq_length's arguments after the sequence: the layer and the two outputs. */
static inline kivi_status kivi_seq_length_check(int32_t layer, int32_t layers, const int64_t *length,
                                                const int64_t *quantized, char *msg, size_t len) {
  static const char *op = "kivi_cache_seq_length";
  kivi_status st = kivi_layer_check(op, layer, layers, 0, msg, len);
  if (st) return st;
  if (!length) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: length must not be NULL", op);
  if (!quantized) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: quantized must not be NULL", op);
  return KIVI_OK;
}

/** kivi_cache_seq_pages's output arguments. */
static inline kivi_status kivi_seq_pages_check(const int32_t *pages, int32_t cap, const int32_t *count, char *msg,
                                               size_t len) {
  static const char *op = "kivi_cache_seq_pages";
  if (cap < 0) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: cap must be >= 0, got %d", op, (int)cap);
  if (cap > 0 && !pages) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: pages must not be NULL when cap > 0", op);
  if (!count) return kivi_host_msg(msg, len, KIVI_ERR_ARG, "%s: count must not be NULL", op);
  return KIVI_OK;
}

/** Copies min(cap, n) entries of a block table row into pages and returns n. */
static inline int32_t kivi_seq_pages_copy(const int32_t *row, int32_t n, int32_t *pages, int32_t cap) {
  const int32_t m = cap < n ? cap : n;
  if (m > 0) memcpy(pages, row, sizeof(int32_t) * (size_t)m);
  return n;
}

/** A fresh free stack [max_pages]: pops hand out page 0, 1, 2, ... */
static inline int32_t kivi_pages_init(int32_t *free_pages, int32_t max_pages) {
  for (int32_t i = 0; i < max_pages; i++) free_pages[i] = max_pages - 1 - i;
  return max_pages;
}

/** Gives a freed sequence's pages back, last first, so later pops return them in their old order. */
static inline void kivi_pages_release(int32_t *free_pages, int32_t *nfree, const int32_t *row, int32_t npages) {
  for (int32_t i = npages - 1; i >= 0; i--) free_pages[(*nfree)++] = row[i];
}

/**
 * Pages a sequence's block table needs beyond the `npages` it holds for an append of n tokens to
 * layers [l0, l1): the table is shared by all layers, so it must cover the quantized tokens of the
 * fullest layer after the flush. len / qlen: the sequence's lengths of layer 0, `stride` apart.
 */
static inline int64_t kivi_pages_needed(const kivi_cache_config *g, int32_t npages, const int64_t *len,
                                        const int64_t *qlen, ptrdiff_t stride, int32_t l0, int32_t l1, int64_t n) {
  int64_t need = npages;
  for (int32_t l = 0; l < g->layers; l++) {
    const int64_t ln = len[l * stride], ql = qlen[l * stride];
    const int64_t f = (l >= l0 && l < l1) ? kivi_flush_count(g, ln, ql, n) : 0;
    const int64_t pages = (ql + f + g->page_tokens - 1) / g->page_tokens;
    need = pages > need ? pages : need;
  }
  return need - npages;
}

#endif /* KIVI_HOST_H */
