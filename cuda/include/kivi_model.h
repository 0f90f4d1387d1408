/*
 * kivi_model.h — the argument rules of the model ops (kivi.h kivi_model_*), written once for the CPU
 * build (C11) and the CUDA build (nvcc): each build fills a kivi_model_args with the call's pointers
 * and sizes, kivi_model_check writes the message of the first broken rule, and the build reports it
 * through its own error slot. The per-element math both builds share is here too.
 */
#ifndef KIVI_MODEL_H
#define KIVI_MODEL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>

#include "kivi.h"
#include "kivi_format.h"
#include "kivi_host.h"

#define KIVI_MODEL_MAX_ARGS 6

/* A named pointer argument, as kivi_host.h's specs hold them. */
typedef kivi_arg_ptr kivi_model_ptr;

typedef struct kivi_model_size {
  const char *name; /* NULL ends the list */
  int64_t v, lo, hi;
} kivi_model_size;

typedef struct kivi_model_args {
  kivi_model_ptr ptrs[KIVI_MODEL_MAX_ARGS];
  kivi_model_size sizes[KIVI_MODEL_MAX_ARGS];
  const char *even; /* the name of sizes[2] when it must be even (rotary pairs), else NULL */
  int32_t heads;    /* 1: sizes[2] (q_heads) must be a multiple of sizes[3] (kv_heads) */
} kivi_model_args;

/** KIVI_ERR_ARG with the message in msg [len] for the first broken rule (a NULL pointer, a size out of
    [lo, hi], in the order given, then the op's own rule); else KIVI_OK. */
static inline kivi_status kivi_model_check(const char *op, const kivi_model_args *a, char *msg, size_t len) {
  for (int i = 0; i < KIVI_MODEL_MAX_ARGS && a->ptrs[i].name; i++) {
    if (!a->ptrs[i].p) {
      snprintf(msg, len, "%s: %s must not be NULL", op, a->ptrs[i].name);
      return KIVI_ERR_ARG;
    }
  }
  for (int i = 0; i < KIVI_MODEL_MAX_ARGS && a->sizes[i].name; i++) {
    const kivi_model_size *s = &a->sizes[i];
    if (s->v < s->lo || s->v > s->hi) {
      snprintf(msg, len, "%s: %s must be between %lld and %lld, got %lld", op, s->name, (long long)s->lo,
               (long long)s->hi, (long long)s->v);
      return KIVI_ERR_ARG;
    }
  }
  if (a->even && a->sizes[2].v % 2 != 0) {
    snprintf(msg, len, "%s: %s must be even, got %lld", op, a->even, (long long)a->sizes[2].v);
    return KIVI_ERR_ARG;
  }
  if (a->heads && a->sizes[2].v % a->sizes[3].v != 0) {
    snprintf(msg, len, "%s: q_heads must be a multiple of kv_heads (%lld), got %lld", op, (long long)a->sizes[3].v,
             (long long)a->sizes[2].v);
    return KIVI_ERR_ARG;
  }
  return KIVI_OK;
}

/* The arguments of each op, as kivi_model_check reads them (one list for both builds). */
/* The start of every kivi_model_* export, in both builds: `op` names it, and the arguments that
 * NAME_args makes of the rest pass the build's own `check` (a static function of ctx, op and the
 * args) before anything else runs; a failure returns its status from the export. */
#define KIVI_MODEL_ENTER(name, ...)                   \
  static const char *op = #name;                      \
  const kivi_model_args a = name##_args(__VA_ARGS__); \
  kivi_status st = check(ctx, op, &a);                \
  if (st) return st

static inline kivi_model_args kivi_model_embed_args(const int32_t *tokens, int32_t rows, const uint16_t *table,
                                                    int32_t vocab, int32_t dim, const float *out) {
  const kivi_model_args a = {{{"tokens", tokens}, {"table", table}, {"out", out}},
                             {{"rows", rows, 1, KIVI_MODEL_MAX_ROWS},
                              {"vocab", vocab, 1, KIVI_MODEL_MAX_ROWS},
                              {"dim", dim, 1, KIVI_MODEL_MAX_DIM}},
                             NULL,
                             0};
  return a;
}

static inline kivi_model_args kivi_model_rmsnorm_args(const float *x, const uint16_t *w, int32_t rows, int32_t dim,
                                                      const float *out) {
  const kivi_model_args a = {{{"x", x}, {"w", w}, {"out", out}},
                             {{"rows", rows, 1, KIVI_MODEL_MAX_ROWS}, {"dim", dim, 1, KIVI_MODEL_MAX_DIM}},
                             NULL,
                             0};
  return a;
}

static inline kivi_model_args kivi_model_linear_args(const float *x, const uint16_t *w, int32_t rows, int32_t n,
                                                     int32_t k, int32_t accumulate, const float *y) {
  const kivi_model_args a = {{{"x", x}, {"w", w}, {"y", y}},
                             {{"rows", rows, 1, KIVI_MODEL_MAX_ROWS},
                              {"n", n, 1, KIVI_MODEL_MAX_ROWS},
                              {"k", k, 1, KIVI_MODEL_MAX_DIM},
                              {"accumulate", accumulate, 0, 1}},
                             NULL,
                             0};
  return a;
}

/* kivi_model_linear_f16 takes kivi_model_linear's arguments under the same rules. */
static inline kivi_model_args kivi_model_linear_f16_args(const float *x, const uint16_t *w, int32_t rows, int32_t n,
                                                         int32_t k, int32_t accumulate, const float *y) {
  return kivi_model_linear_args(x, w, rows, n, k, accumulate, y);
}

static inline kivi_model_args kivi_model_rope_args(const float *x, int32_t rows, int32_t heads, int32_t dim,
                                                   const int32_t *pos, const float *cs, int32_t max_pos) {
  const kivi_model_args a = {{{"x", x}, {"pos", pos}, {"cs", cs}},
                             {{"rows", rows, 1, KIVI_MODEL_MAX_ROWS},
                              {"heads", heads, 1, KIVI_MODEL_MAX_DIM},
                              {"dim", dim, 2, KIVI_MODEL_MAX_DIM},
                              {"max_pos", max_pos, 1, KIVI_MODEL_MAX_ROWS}},
                             "dim",
                             0};
  return a;
}

static inline kivi_model_args kivi_model_swiglu_args(const float *gate, const float *up, int32_t n, const float *out) {
  const kivi_model_args a = {
      {{"gate", gate}, {"up", up}, {"out", out}}, {{"n", n, 1, (int64_t)KIVI_MODEL_MAX_ROWS * 64}}, NULL, 0};
  return a;
}

static inline kivi_model_args kivi_model_attention_args(const float *q, const float *k, const float *v, int32_t batch,
                                                        int32_t tokens, int32_t q_heads, int32_t kv_heads,
                                                        int32_t head_dim, const float *out) {
  const kivi_model_args a = {{{"q", q}, {"k", k}, {"v", v}, {"out", out}},
                             {{"batch", batch, 1, KIVI_MODEL_MAX_DIM},
                              {"tokens", tokens, 1, KIVI_MODEL_MAX_TOKENS},
                              {"q_heads", q_heads, 1, 1024},
                              {"kv_heads", kv_heads, 1, 1024},
                              {"head_dim", head_dim, 1, 1024}},
                             NULL,
                             1};
  return a;
}

static inline kivi_model_args kivi_model_log_softmax_args(const float *x, int32_t rows, int32_t n) {
  const kivi_model_args a = {
      {{"x", x}}, {{"rows", rows, 1, KIVI_MODEL_MAX_ROWS}, {"n", n, 1, KIVI_MODEL_MAX_ROWS}}, NULL, 0};
  return a;
}

static inline kivi_model_args kivi_model_fill_normal_args(const uint16_t *out, int64_t n) {
  const kivi_model_args a = {{{"out", out}}, {{"n", n, 1, KIVI_MAX_ELEMS - 1}}, NULL, 0};
  return a;
}

/** kivi_model_fill_normal's mean and std (finite, std >= 0), after kivi_model_check. */
static inline kivi_status kivi_model_fill_check(const char *op, float mean, float std, char *msg, size_t len) {
  if (!isfinite(mean)) {
    snprintf(msg, len, "%s: mean must be finite, got %g", op, (double)mean);
    return KIVI_ERR_ARG;
  }
  if (!(std >= 0.0f && isfinite(std))) {
    snprintf(msg, len, "%s: std must be finite and >= 0, got %g", op, (double)std);
    return KIVI_ERR_ARG;
  }
  return KIVI_OK;
}

/** splitmix64's finalizer: a bijective mix of 64 bits. */
KIVI_HD uint64_t kivi_mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/** Element i of kivi_model_fill_normal: two hashes of (seed, i) give eight 16-bit uniforms whose
    centred sum, times 1 / sqrt(8 (2^32 - 1) / 12), has mean 0 and variance 1. Integer math, an exact
    int-to-float conversion, one product and one fmaf: the same bits in C and CUDA. */
KIVI_HD uint16_t kivi_fill_normal1(uint64_t seed, int64_t i, float mean, float std) {
  const uint64_t base = kivi_mix64(seed + 0x9e3779b97f4a7c15ull) + (uint64_t)i * 2u;
  const uint64_t h0 = kivi_mix64(base), h1 = kivi_mix64(base + 1u);
  int64_t s = 0;
  for (int j = 0; j < 4; j++) s += (int64_t)((h0 >> (16 * j)) & 0xffffu) + (int64_t)((h1 >> (16 * j)) & 0xffffu);
  const float z = (float)(s - 262140) * 1.8688124e-05f; /* 1 / sqrt(8 * (65536^2 - 1) / 12) */
  return kivi_f32_to_f16(fmaf(std, z, mean));
}

/** silu(g) * u, in f32. */
KIVI_HD float kivi_swiglu1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

#endif /* KIVI_MODEL_H */
