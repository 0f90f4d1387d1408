/*
 * kivi_batch.h — the decode batch's rules (kivi.h kivi_batch_*), defined once for the CPU build (C11)
 * and the CUDA build (nvcc): the arguments a batch is made from, how a bad element is classified and
 * ordered, the record of a deferred error that the checks write and the host reads, and the words of
 * its report. Each build keeps only what differs: where the record lives (host memory; mapped pinned
 * memory that the CUDA check kernels write) and how the work is launched.
 */
#ifndef KIVI_BATCH_H
#define KIVI_BATCH_H

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "kivi.h"
#include "kivi_format.h"

/* ------------------------------------------------------------------ bad elements ---------- */

/** The KIVI_REPORT_KIND of an element given by its bits (a 16-bit dtype in the low half), or -1 for a
    good one: 0 NaN, 1 +Inf, 2 -Inf, 3 a finite f32 / bf16 value that fp16 turns into Inf (bad only
    with f16range: the cache stores k and v in fp16, while q only has to be finite). */
KIVI_HD int32_t kivi_bad_kind(uint32_t u, int32_t dtype, int f16range) {
  if (dtype == KIVI_F16) {
    if ((u & 0x7c00u) != 0x7c00u) return -1;
    return (u & 0x3ffu) ? 0 : ((u & 0x8000u) ? 2 : 1);
  }
  const uint32_t w = dtype == KIVI_F32 ? u : u << 16;
  if ((w & 0x7f800000u) == 0x7f800000u) return (w & 0x7fffffu) ? 0 : ((w & 0x80000000u) ? 2 : 1);
  return f16range && (w & 0x7fffffffu) >= 0x477ff000u ? 3 : -1;
}

/** No bad element (the largest key). */
#define KIVI_CHECK_NONE (~(uint64_t)0)

/** The key of a bad element; the lowest key of a call is its first bad element: by batch index, then
    part (0 q or k, 1 v), then element of the row, with the kind in the low bits. */
KIVI_HD uint64_t kivi_check_key(int64_t b, int32_t part, int64_t elem, int32_t kind) {
  return ((uint64_t)b << 34) | ((uint64_t)part << 33) | ((uint64_t)elem << 2) | (uint64_t)kind;
}

/* ------------------------------------------------------------------ the error record ------ */

/** A batch's deferred error as the host sees it, followed in memory by uint8_t bad[batch]. The checks
    write it (a call that met a bad value sets bad[b] for each bad sequence b, then the key and call
    when no error is recorded yet, then `any`); the host reads and clears it (kivi_batch_take). */
typedef struct kivi_batch_record {
  volatile uint64_t key; /* KIVI_CHECK_NONE, or the key of the first unread error */
  volatile int32_t op;   /* its call: 1 kivi_batch_attend, 2 kivi_batch_append */
  volatile int32_t layer;
  volatile uint32_t any; /* some call met a bad value since the last read */
  uint32_t pad;
} kivi_batch_record;
KIVI_STATIC_ASSERT(sizeof(kivi_batch_record) == 24, "the record is shared with the device");

/** Bytes of a record with its bad flags. */
static inline size_t kivi_batch_record_bytes(int32_t batch) { return sizeof(kivi_batch_record) + (size_t)batch; }

static inline void kivi_batch_record_init(kivi_batch_record *r, int32_t batch) {
  memset((void *)r, 0, kivi_batch_record_bytes(batch));
  r->key = KIVI_CHECK_NONE;
}

/** The report (kivi.h KIVI_REPORT_*) of the recorded error, without clearing it; 0 when there is none. */
static inline int kivi_batch_peek(const kivi_batch_record *r, int64_t *report /* [KIVI_REPORT_FIELDS] */) {
  for (int i = 0; i < KIVI_REPORT_FIELDS; i++) report[i] = 0;
  if (!r->any) return 0;
  const uint64_t key = r->key;
  if (key == KIVI_CHECK_NONE) {
    for (int i = 0; i < KIVI_REPORT_FIELDS; i++) report[i] = -1;
    return 1;
  }
  report[KIVI_REPORT_OP] = r->op;
  report[KIVI_REPORT_LAYER] = r->layer;
  report[KIVI_REPORT_INDEX] = (int64_t)(key >> 34);
  report[KIVI_REPORT_PART] = (int64_t)((key >> 33) & 1u);
  report[KIVI_REPORT_ELEMENT] = (int64_t)((key >> 2) & 0x7fffffffu);
  report[KIVI_REPORT_KIND] = (int64_t)(key & 3u);
  return 1;
}

/** Reads and clears the record: the report, and bad_out[b] (may be NULL) for the sequences that took a
    bad token. `any` is cleared before the key and the flags are read after both, so a check writing
    while this runs is either in this report or left recorded for the next (with its details lost at
    worst, never its flags). Returns 1 when there was an error. */
static inline int kivi_batch_take(kivi_batch_record *r, int32_t batch, int64_t *report, uint8_t *bad_out) {
  const int had = kivi_batch_peek(r, report);
  if (bad_out) memset(bad_out, 0, (size_t)batch);
  if (!had) return 0;
  r->any = 0;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  r->key = KIVI_CHECK_NONE;
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
  volatile uint8_t *bad = (volatile uint8_t *)(r + 1);
  for (int32_t b = 0; b < batch; b++) {
    if (!bad[b]) continue;
    bad[b] = 0;
    if (bad_out) bad_out[b] = 1;
  }
  return 1;
}

/** The message of a deferred error (host only). `op` is the export reporting it; seq the sequence slot of
    the reported batch index; pending: the export fails because the error is still unread. */
static inline void kivi_batch_message(char *buf, size_t len, const char *op, const int64_t *report, int32_t seq,
                                      int32_t head_dim, int pending) {
  static const char *kinds[4] = {"NaN", "+Inf", "-Inf", "a finite value beyond fp16's range (|x| >= 65520)"};
  const char *tail = pending ? "; read the error with kivi_batch_status first" : "";
  if (report[KIVI_REPORT_OP] < 1) {
    snprintf(buf, len,
             "%s: earlier calls of this batch met non-finite values (the details of the first were not kept); "
             "the batch's outs since are NaN and the sequences they appended to may hold them%s",
             op, tail);
    return;
  }
  const int attend = report[KIVI_REPORT_OP] == 1;
  const int64_t kind = report[KIVI_REPORT_KIND] >= 0 && report[KIVI_REPORT_KIND] <= 3 ? report[KIVI_REPORT_KIND] : 0;
  snprintf(buf, len, "%s: %s (layer %lld) met %s in %s at batch %lld (sequence %d), head %lld, channel %lld; %s%s", op,
           attend ? "kivi_batch_attend" : "kivi_batch_append", (long long)report[KIVI_REPORT_LAYER], kinds[kind],
           attend ? "q" : (report[KIVI_REPORT_PART] ? "v" : "k"), (long long)report[KIVI_REPORT_INDEX], (int)seq,
           (long long)(report[KIVI_REPORT_ELEMENT] / head_dim), (long long)(report[KIVI_REPORT_ELEMENT] % head_dim),
           attend ? "that call's out and every out the batch wrote after it are NaN"
                  : "the token was stored, so the sequence holds it from now on (free it), and every out the batch "
                    "wrote after it is NaN",
           tail);
}

/* ------------------------------------------------------------------ making a batch -------- */

/** kivi_batch_create's arguments. */
typedef struct kivi_batch_args {
  const int32_t *seqs;
  int32_t batch;
  const void *q;
  kivi_dtype q_dtype;
  const void *out;
  kivi_dtype out_dtype;
  float scale;
  const void *k, *v;
  kivi_dtype kv_dtype;
  int32_t flags;
} kivi_batch_args;

static inline int kivi_batch_dtype_ok(kivi_dtype d) { return d == KIVI_F32 || d == KIVI_F16 || d == KIVI_BF16; }

static inline int kivi_batch_overlap(const void *a, uint64_t an, const void *b, uint64_t bn) {
  const uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
  return a && b && x < y + bn && y < x + an;
}

/** Checks the arguments against the cache's config, in a fixed order (host only): KIVI_OK, or the status
    of the first bad one with "kivi_batch_create: ..." in msg. live(cache, s) says whether slot s holds a
    sequence. */
static inline kivi_status kivi_batch_validate(const kivi_cache_config *g, const kivi_batch_args *a, const void *cache,
                                              int (*live)(const void *, int32_t), char *msg, size_t len) {
  const char *op = "kivi_batch_create";
  if (!a->seqs) return snprintf(msg, len, "%s: seqs must not be NULL", op), KIVI_ERR_ARG;
  if (a->batch < 1 || a->batch > KIVI_BATCH_MAX)
    return snprintf(msg, len, "%s: batch must be in 1..%d, got %d", op, KIVI_BATCH_MAX, (int)a->batch), KIVI_ERR_ARG;
  if (!a->q != !a->out)
    return snprintf(msg, len, "%s: q and out must be given together (or both NULL)", op), KIVI_ERR_ARG;
  if (!a->k != !a->v) return snprintf(msg, len, "%s: k and v must be given together (or both NULL)", op), KIVI_ERR_ARG;
  if (!a->q && !a->k)
    return snprintf(msg, len, "%s: a batch needs q and out, or k and v, or all four", op), KIVI_ERR_ARG;
  if (a->q && !kivi_batch_dtype_ok(a->q_dtype))
    return snprintf(msg, len, "%s: q_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                    (int)a->q_dtype),
           KIVI_ERR_ARG;
  if (a->q && !kivi_batch_dtype_ok(a->out_dtype))
    return snprintf(msg, len, "%s: out_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                    (int)a->out_dtype),
           KIVI_ERR_ARG;
  if (a->q && !isfinite(a->scale))
    return snprintf(msg, len, "%s: scale must be finite, got %g", op, (double)a->scale), KIVI_ERR_ARG;
  if (a->k && !kivi_batch_dtype_ok(a->kv_dtype))
    return snprintf(msg, len, "%s: kv_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                    (int)a->kv_dtype),
           KIVI_ERR_ARG;
  if (a->flags & ~(int32_t)KIVI_FLAG_TRUSTED)
    return snprintf(msg, len, "%s: flags must be 0 or KIVI_FLAG_TRUSTED (1), got %d", op, (int)a->flags), KIVI_ERR_ARG;
  const uint64_t es_q = a->q_dtype == KIVI_F32 ? 4 : 2, es_o = a->out_dtype == KIVI_F32 ? 4 : 2;
  const uint64_t es_kv = a->kv_dtype == KIVI_F32 ? 4 : 2;
  const uint64_t nq = (uint64_t)a->batch * (uint64_t)g->q_heads * (uint64_t)g->head_dim;
  const uint64_t nk = (uint64_t)a->batch * (uint64_t)g->kv_heads * (uint64_t)g->head_dim;
  if (a->q && kivi_batch_overlap(a->out, nq * es_o, a->q, nq * es_q))
    return snprintf(msg, len, "%s: out must not overlap q", op), KIVI_ERR_ARG;
  if (a->q && kivi_batch_overlap(a->out, nq * es_o, a->k, nk * es_kv))
    return snprintf(msg, len, "%s: out must not overlap k", op), KIVI_ERR_ARG;
  if (a->q && kivi_batch_overlap(a->out, nq * es_o, a->v, nk * es_kv))
    return snprintf(msg, len, "%s: out must not overlap v", op), KIVI_ERR_ARG;
  for (int32_t i = 0; i < a->batch; i++) {
    const int32_t s = a->seqs[i];
    if (s < 0 || s >= g->max_seqs)
      return snprintf(msg, len, "%s: seqs[%d] must be in 0..%d, got %d", op, (int)i, (int)g->max_seqs - 1, (int)s),
             KIVI_ERR_ARG;
    if (!live(cache, s))
      return snprintf(msg, len, "%s: seqs[%d] (sequence %d) is not live", op, (int)i, (int)s), KIVI_ERR_STATE;
    for (int32_t j = 0; j < i; j++)
      if (a->seqs[j] == s)
        return snprintf(msg, len, "%s: seqs[%d] repeats seqs[%d] (sequence %d); a batch holds each sequence once", op,
                        (int)i, (int)j, (int)s),
               KIVI_ERR_ARG;
  }
  return KIVI_OK;
}

/* ------------------------------------------------------------------ every call ----------- */

/** What a build tells kivi_batch_enter about a slot: live or not, its generation (bumped when it is
    freed), and its length in the call's layer. */
typedef struct kivi_batch_slot {
  int live;
  uint32_t gen;
  int64_t len;
} kivi_batch_slot;

/** The checks every kivi_batch_attend / kivi_batch_append makes first, in this order (host only): an
    unread error (KIVI_ERR_NONFINITE, its message), the buffers the call needs (KIVI_ERR_STATE), the
    layer (KIVI_ERR_ARG), then each sequence still the one the batch was made with (gens: their
    generations then) and, for attend, holding a token in the layer (KIVI_ERR_STATE). KIVI_OK, or the
    status with "<op>: ..." in msg. */
static inline kivi_status kivi_batch_enter(const kivi_cache_config *g, const kivi_batch_args *a,
                                           const kivi_batch_record *rec, const uint32_t *gens, const void *cache,
                                           kivi_batch_slot (*slot)(const void *, int32_t, int32_t), const char *op,
                                           int32_t layer, int need_kv, char *msg, size_t len) {
  if (rec->any) {
    int64_t report[KIVI_REPORT_FIELDS];
    kivi_batch_peek(rec, report);
    const int64_t i = report[KIVI_REPORT_INDEX];
    kivi_batch_message(msg, len, op, report, i >= 0 && i < a->batch ? a->seqs[i] : -1, g->head_dim, 1);
    return KIVI_ERR_NONFINITE;
  }
  if (need_kv ? !a->k : !a->q)
    return snprintf(msg, len, "%s: the batch was made without %s", op, need_kv ? "k and v" : "q and out"),
           KIVI_ERR_STATE;
  if (layer < 0 || layer >= g->layers)
    return snprintf(msg, len, "%s: layer must be in 0..%d, got %d", op, (int)g->layers - 1, (int)layer), KIVI_ERR_ARG;
  for (int32_t i = 0; i < a->batch; i++) {
    const int32_t s = a->seqs[i];
    const kivi_batch_slot at = slot(cache, s, layer);
    if (!at.live || at.gen != gens[i])
      return snprintf(msg, len, "%s: seqs[%d] (sequence %d) was freed after the batch was made; make a new batch", op,
                      (int)i, (int)s),
             KIVI_ERR_STATE;
    if (!need_kv && at.len < 1)
      return snprintf(msg, len, "%s: seqs[%d] (sequence %d) holds no token in layer %d", op, (int)i, (int)s,
                      (int)layer),
             KIVI_ERR_STATE;
  }
  return KIVI_OK;
}

#endif /* KIVI_BATCH_H */
