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

#define KIVI_MODEL_MAX_ARGS 6

typedef struct kivi_model_ptr {
  const char *name; /* NULL ends the list */
  const void *p;
} kivi_model_ptr;

typedef struct kivi_model_size {
  const char *name; /* NULL ends the list */
  int64_t v, lo, hi;
} kivi_model_size;

typedef struct kivi_model_args {
  kivi_model_ptr ptrs[KIVI_MODEL_MAX_ARGS];
  kivi_model_size sizes[KIVI_MODEL_MAX_ARGS];
} kivi_model_args;

/** KIVI_ERR_ARG with the message in msg [len] for the first NULL pointer or size out of [lo, hi], in
    the order given; else KIVI_OK. */
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
  return KIVI_OK;
}

/** The rules of kivi_model_attention beyond the sizes' ranges. */
static inline kivi_status kivi_model_check_heads(const char *op, int32_t q_heads, int32_t kv_heads, char *msg,
                                                 size_t len) {
  if (q_heads % kv_heads != 0) {
    snprintf(msg, len, "%s: q_heads must be a multiple of kv_heads (%d), got %d", op, (int)kv_heads, (int)q_heads);
    return KIVI_ERR_ARG;
  }
  return KIVI_OK;
}

/** dim even (rotary pairs). */
static inline kivi_status kivi_model_check_even(const char *op, const char *name, int32_t v, char *msg, size_t len) {
  if (v % 2 != 0) {
    snprintf(msg, len, "%s: %s must be even, got %d", op, name, (int)v);
    return KIVI_ERR_ARG;
  }
  return KIVI_OK;
}

/** silu(g) * u, in f32. */
KIVI_HD float kivi_swiglu1(float g, float u) { return g / (1.0f + expf(-g)) * u; }

#endif /* KIVI_MODEL_H */
