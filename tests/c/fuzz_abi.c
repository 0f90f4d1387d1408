/*
 * fuzz_abi.c — a seeded fuzzer of every export of kivi.h, linked with the CPU reference sources.
 *
 *   gcc -std=c11 -O1 -g -fsanitize=address,undefined -Icuda/include cuda/cpu/[a-z]*.c tests/c/fuzz_abi.c \
 *       -lm -o build/fuzz_abi
 *   ASAN_OPTIONS=allocator_may_return_null=1 build/fuzz_abi [seed] [iterations]
 *   (or KIVI_FUZZ_SEED / KIVI_FUZZ_ITERS; the defaults are seed 1 and 4000 iterations)
 *
 * Each iteration calls one export, chosen at random, with arguments that are each either sensible or
 * hostile (NULL, an out-of-range enum, a negative, zero, non-dividing or huge size, a dead sequence,
 * NaN / Inf data, outputs overlapping inputs). From kivi.h's documented rules it predicts the set of
 * statuses the call may return (several when several arguments are wrong: the order of the checks is
 * not part of the ABI) and checks:
 *  - the status is one of them (so always a documented one), and a failure leaves a message naming
 *    the op in kivi_last_error() and in kivi_ctx_last_error(ctx);
 *  - a failed call wrote nothing: every byte of the buffers it was given is compared with a copy
 *    taken before the call (the outputs are filled with a canary first), and a failed cache call
 *    leaves every sequence as it was (lengths, block tables, memory report, the dequantized K/V);
 *  - after each cache call, the lengths, page counts and memory report match a model of the cache
 *    built from kivi.h's window and paging rules.
 * Sizes that the rules accept are kept within the buffers the fuzzer owns (a valid call with a size
 * larger than its buffer is the caller's bug, which no library can detect); everything else is free.
 *
 * Decode batches (kivi_batch_*) are made with hostile arguments and driven a few calls each, against
 * the same model (fuzz_batch), deferred errors included.
 *
 * Overlap of `out` with `seqs` in kivi_cache_attend is fuzzed too (KIVI_FUZZ_ATTEND_ALIAS=0 leaves it
 * out): see the note at fuzz_attend.
 */
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kivi.h"
#include "kivi_format.h"
#include "harness.h"

/* ---------------------------------------------------------------- harness ---------------- */

/* The check harness is harness.h's; g_where names the export being called. */

/* A set of statuses: bit -st. */
typedef uint32_t stset;
#define S(st) ((stset)1u << (uint32_t)(-(st)))
#define S_OK S(KIVI_OK)

static int chance(double p) { return rng_unif() < p; }
static int64_t irange(int64_t lo, int64_t hi) { return lo + (int64_t)(rng_next() % (uint64_t)(hi - lo + 1)); }
static int32_t pick32(const int32_t *v, int n) { return v[rng_next() % (uint64_t)n]; }
static int64_t pick64(const int64_t *v, int n) { return v[rng_next() % (uint64_t)n]; }

/* Probability that one argument is made hostile. */
#define P_BAD 0.07

/* The arena: every buffer a call gets lies in it, so one snapshot covers them all. */
#define ARENA (1u << 20)
static uint8_t *arena, *shadow;
static size_t used_hi; /* bytes of the arena this call may touch (the snapshot's extent) */

typedef struct region {
  size_t off, bytes;
} region;

/* Regions of one call, laid out one after another (16-byte aligned), or, with `overlap`, at random
   aligned offsets that may overlap each other. Returns 0 if they do not fit. */
static int layout(region *r, int n, int overlap) {
  size_t at = 0, hi = 0;
  for (int i = 0; i < n; i++) {
    const size_t b = (r[i].bytes + 15u) & ~(size_t)15u;
    if (b > ARENA) return 0;
    if (overlap && chance(0.5)) {
      r[i].off = (size_t)irange(0, (int64_t)((ARENA - b) / 64)) * 64u;
      if (r[i].off > at + 4096) r[i].off = at > 256 ? (size_t)irange(0, (int64_t)at / 16) * 16u : 0;
    } else {
      r[i].off = at;
      at += b;
      if (at > ARENA) return 0;
    }
    if (r[i].off + b > hi) hi = r[i].off + b;
  }
  used_hi = hi;
  return 1;
}
static void *at(const region *r) { return arena + r->off; }

static void fill_canary(const region *r) {
  for (size_t i = 0; i < r->bytes; i++) arena[r->off + i] = (uint8_t)(0xA5 ^ (i * 29));
}

/* Seeded finite data, never zero: N(0, 1) scaled per element, a few outliers. */
static float rand_value(void) {
  double v = rng_normal() * (chance(0.05) ? 30.0 : 1.0);
  if (v == 0.0) v = 0.5;
  return (float)v;
}
static void fill_data(const region *r, kivi_dtype dt, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    const float f = rand_value();
    if (dt == KIVI_F32)
      ((float *)at(r))[i] = f;
    else if (dt == KIVI_F16)
      ((uint16_t *)at(r))[i] = kivi_f32_to_f16(f);
    else
      ((uint16_t *)at(r))[i] = kivi_f32_to_bf16(f);
  }
}
/* Puts a NaN or an Inf at a random element; returns 1. */
static int poison(const region *r, kivi_dtype dt, int64_t n) {
  const int64_t i = irange(0, n - 1);
  const int k = (int)irange(0, 2);
  if (dt == KIVI_F32)
    ((float *)at(r))[i] = k == 0 ? NAN : (k == 1 ? INFINITY : -INFINITY);
  else if (dt == KIVI_F16)
    ((uint16_t *)at(r))[i] = k == 0 ? 0x7e00u : (k == 1 ? 0x7c00u : 0xfc00u);
  else
    ((uint16_t *)at(r))[i] = k == 0 ? 0x7fc0u : (k == 1 ? 0x7f80u : 0xff80u);
  return 1;
}

static int dtype_ok(kivi_dtype dt) { return dt == KIVI_F32 || dt == KIVI_F16 || dt == KIVI_BF16; }
static kivi_dtype gen_dtype(void) {
  static const int32_t bad[] = {-1, 3, 4, 255, INT32_MIN, INT32_MAX};
  return chance(P_BAD) ? pick32(bad, 6) : (kivi_dtype)irange(0, 2);
}
static int32_t gen_flags(void) {
  static const int32_t bad[] = {2, 3, -1, 0x100, INT32_MIN};
  return chance(P_BAD) ? pick32(bad, 5) : (int32_t)chance(0.2);
}
static int flags_ok(int32_t f) { return f == 0 || f == KIVI_FLAG_TRUSTED; }

/* Snapshot before a call, and the checks after it. */
static void snapshot(void) { memcpy(shadow, arena, used_hi); }

static void check_status(kivi_ctx_t ctx, kivi_status st, stset want) {
  CHECK(st <= 0 && st >= KIVI_ERR_CAPACITY, "status %d is not a documented kivi_status", (int)st);
  if (st > 0 || st < KIVI_ERR_CAPACITY) return;
  CHECK(want & S(st), "returned %s (%d); expected one of mask 0x%x", kivi_status_str(st), (int)st, (unsigned)want);
  if (st == KIVI_OK) return;
  const char *msg = kivi_last_error();
  CHECK(msg && strstr(msg, g_where), "kivi_last_error() must name %s, got \"%s\"", g_where, msg ? msg : "(null)");
  if (ctx) CHECK(strcmp(kivi_ctx_last_error(ctx), msg) == 0, "kivi_ctx_last_error differs from kivi_last_error");
  size_t i = 0;
  while (i < used_hi && arena[i] == shadow[i]) i++;
  CHECK(i == used_hi, "the failed call (%s) wrote to its buffers (first changed byte at arena offset %zu)",
        kivi_status_str(st), i);
}

/* ---------------------------------------------------------------- library / context ------ */

static kivi_ctx_t g_ctx;
static int g_timer_started;

static kivi_ctx_t gen_ctx(void) { return chance(P_BAD) ? NULL : g_ctx; }

static void fuzz_library(void) {
  g_where = "library";
  CHECK(kivi_abi_version() == KIVI_ABI_VERSION, "kivi_abi_version");
  CHECK(kivi_backend_kind() == 0, "kivi_backend_kind of the CPU build");
  const int32_t code = chance(0.5) ? (int32_t)irange(-12, 2) : (int32_t)rng_next();
  const char *s = kivi_status_str(code);
  CHECK(s != NULL && strncmp(s, "KIVI_", 5) == 0, "kivi_status_str(%d)", (int)code);
  if (s)
    CHECK((strcmp(s, "KIVI_ERR_UNKNOWN") == 0) == (code > 0 || code < KIVI_ERR_CAPACITY), "kivi_status_str(%d) = %s",
          (int)code, s);
  const char *e = kivi_last_error();
  CHECK(e != NULL && strlen(e) < 512, "kivi_last_error is a NUL-terminated message");
  CHECK(kivi_ctx_last_error(NULL) != NULL, "kivi_ctx_last_error(NULL)");
  region r[1] = {{0, 4}};
  layout(r, 1, 0);
  fill_canary(&r[0]);
  snapshot();
  const int null = chance(0.3);
  g_where = "kivi_device_count";
  kivi_status st = kivi_device_count(null ? NULL : (int32_t *)at(&r[0]));
  check_status(NULL, st, null ? S(KIVI_ERR_ARG) : S_OK);
  if (!st) CHECK(*(int32_t *)at(&r[0]) == 1, "the CPU build has one device");
}

static void fuzz_ctx(void) {
  region r[1] = {{0, 64}};
  layout(r, 1, 0);
  fill_canary(&r[0]);
  snapshot();
  switch (irange(0, 6)) {
    case 6: {
      g_where = "kivi_debug_fault"; /* test only: the CPU build has no device to fault */
      kivi_ctx_t ctx = gen_ctx();
      check_status(ctx, kivi_debug_fault(ctx), ctx ? S(KIVI_ERR_NO_DEVICE) : S(KIVI_ERR_ARG));
      break;
    }
    case 0: {
      g_where = "kivi_ctx_create";
      static const int32_t devs[] = {0, 0, 0, 1, -1, 7, INT32_MIN, INT32_MAX};
      const int32_t dev = pick32(devs, 8);
      const int null = chance(0.2);
      stset want = (null ? S(KIVI_ERR_ARG) : 0) | (dev != 0 ? S(KIVI_ERR_NO_DEVICE) : 0);
      kivi_status st = kivi_ctx_create(dev, null ? NULL : (kivi_ctx_t *)at(&r[0]));
      check_status(NULL, st, want ? want : S_OK);
      if (!st) {
        kivi_ctx_t c = *(kivi_ctx_t *)at(&r[0]);
        CHECK(kivi_ctx_destroy(c) == KIVI_OK, "kivi_ctx_destroy");
      }
      g_where = "kivi_ctx_destroy";
      CHECK(kivi_ctx_destroy(NULL) == KIVI_OK, "kivi_ctx_destroy(NULL) is a no-op");
      break;
    }
    case 1: {
      g_where = "kivi_ctx_device_name";
      static const int32_t bad[] = {0, -1, INT32_MIN};
      kivi_ctx_t ctx = gen_ctx();
      char *name = chance(P_BAD) ? NULL : (char *)at(&r[0]);
      const int32_t len = chance(P_BAD) ? pick32(bad, 3) : (int32_t)irange(1, 64);
      stset want = (!ctx || !name || len < 1) ? S(KIVI_ERR_ARG) : S_OK;
      kivi_status st = kivi_ctx_device_name(ctx, name, len);
      check_status(ctx, st, want);
      if (!st) {
        const size_t n = strlen(name), want_n = len - 1 < 3 ? (size_t)len - 1 : 3;
        CHECK(n < (size_t)len && strncmp(name, "CPU", want_n) == 0, "device name \"%s\" (len %d)", name, (int)len);
      }
      break;
    }
    case 2:
      g_where = "kivi_ctx_synchronize";
      {
        kivi_ctx_t ctx = gen_ctx();
        check_status(ctx, kivi_ctx_synchronize(ctx), ctx ? S_OK : S(KIVI_ERR_ARG));
      }
      break;
    case 3: {
      g_where = "kivi_ctx_query";
      kivi_ctx_t ctx = gen_ctx();
      int32_t *done = chance(P_BAD) ? NULL : (int32_t *)at(&r[0]);
      kivi_status st = kivi_ctx_query(ctx, done);
      check_status(ctx, st, ctx && done ? S_OK : S(KIVI_ERR_ARG));
      if (!st) CHECK(*done == 1, "the CPU build is always done");
      break;
    }
    case 4: {
      g_where = "kivi_timer_start";
      kivi_ctx_t ctx = gen_ctx();
      kivi_status st = kivi_timer_start(ctx);
      check_status(ctx, st, ctx ? S_OK : S(KIVI_ERR_ARG));
      if (!st) g_timer_started = 1;
      break;
    }
    default: {
      g_where = "kivi_timer_stop";
      kivi_ctx_t ctx = gen_ctx();
      float *ms = chance(P_BAD) ? NULL : (float *)at(&r[0]);
      stset want = (!ctx || !ms) ? S(KIVI_ERR_ARG) : (g_timer_started ? S_OK : S(KIVI_ERR_STATE));
      kivi_status st = kivi_timer_stop(ctx, ms);
      check_status(ctx, st, want);
      if (!st) CHECK(*ms >= 0.0f && isfinite(*ms), "elapsed %g ms", (double)*ms);
      break;
    }
  }
}

/* ---------------------------------------------------------------- memory ----------------- */

#define MAX_ALLOCS 8
static void *g_allocs[MAX_ALLOCS];

static const uint64_t huge_sizes[] = {(uint64_t)1 << 50, (uint64_t)1 << 62, UINT64_MAX, UINT64_MAX - 100};

/* A byte count for an export that allocates: `bytes`, or (each with P_BAD) 0 or a size no allocator
   grants, which sets `want` to KIVI_ERR_NOMEM. */
static uint64_t maybe_bad_bytes(uint64_t bytes, stset *want) {
  if (chance(P_BAD)) return 0;
  if (chance(P_BAD)) {
    *want = S(KIVI_ERR_NOMEM);
    return huge_sizes[rng_next() % 4];
  }
  return bytes;
}

static void fuzz_mem(void) {
  region r[3] = {{0, 4096}, {0, 4096}, {0, 16}};
  const int overlap = chance(0.3);
  layout(r, 3, overlap);
  fill_data(&r[0], KIVI_F32, 1024);
  fill_data(&r[1], KIVI_F32, 1024);
  fill_canary(&r[2]);
  snapshot();
  kivi_ctx_t ctx = gen_ctx();
  switch (irange(0, 5)) {
    case 0: {
      g_where = "kivi_mem_alloc";
      const int slot = (int)irange(0, MAX_ALLOCS - 1);
      void **out = chance(P_BAD) ? NULL : (void **)at(&r[2]);
      stset want = S_OK;
      const uint64_t bytes = maybe_bad_bytes((uint64_t)irange(1, 100000), &want);
      if (!ctx || !out || bytes == 0) want = S(KIVI_ERR_ARG);
      if (g_allocs[slot] && want == S_OK) break; /* keep at most one allocation per slot */
      kivi_status st = kivi_mem_alloc(ctx, bytes, out);
      check_status(ctx, st, want);
      if (!st) {
        g_allocs[slot] = *out;
        CHECK(((uintptr_t)*out & 255u) == 0, "kivi_mem_alloc is 256-byte aligned");
        memset(g_allocs[slot], 0x3c, (size_t)bytes); /* the whole allocation is usable */
      }
      break;
    }
    case 1: {
      g_where = "kivi_mem_free";
      const int slot = (int)irange(0, MAX_ALLOCS - 1);
      void *p = chance(0.2) ? NULL : g_allocs[slot];
      if (!ctx && p) ctx = g_ctx; /* a NULL ctx would leak it: tested with p == NULL only */
      kivi_status st = kivi_mem_free(ctx, p);
      check_status(ctx, st, ctx ? S_OK : S(KIVI_ERR_ARG));
      if (!st && p) g_allocs[slot] = NULL;
      break;
    }
    case 2:
    case 3: {
      static const char *ops[] = {"kivi_mem_upload", "kivi_mem_download", "kivi_mem_copy"};
      const int which = (int)irange(0, 2);
      g_where = ops[which];
      void *dst = chance(P_BAD) ? NULL : at(&r[1]);
      const void *src = chance(P_BAD) ? NULL : at(&r[0]);
      uint64_t bytes = (uint64_t)irange(0, 4096);
      const int valid = ctx && dst && src;
      if (!valid && chance(0.5)) bytes = huge_sizes[rng_next() % 4];
      kivi_status st = which == 0   ? kivi_mem_upload(ctx, dst, src, bytes)
                       : which == 1 ? kivi_mem_download(ctx, dst, src, bytes)
                                    : kivi_mem_copy(ctx, dst, src, bytes);
      check_status(ctx, st, valid ? S_OK : S(KIVI_ERR_ARG));
      if (!st && bytes) {
        /* memmove semantics even when the two overlap */
        CHECK(memcmp(at(&r[1]), shadow + r[0].off, (size_t)bytes) == 0, "%s copied %llu bytes", g_where,
              (unsigned long long)bytes);
      }
      break;
    }
    case 4: {
      g_where = "kivi_mem_info";
      uint64_t *f = chance(P_BAD) ? NULL : (uint64_t *)at(&r[2]);
      uint64_t *t = chance(P_BAD) ? NULL : (uint64_t *)at(&r[2]) + 1;
      kivi_status st = kivi_mem_info(ctx, f, t);
      check_status(ctx, st, ctx && f && t ? (S_OK | S(KIVI_ERR_UNSUPPORTED)) : S(KIVI_ERR_ARG));
      if (!st) CHECK(*t > 0 && *f <= *t, "mem_info %llu of %llu", (unsigned long long)*f, (unsigned long long)*t);
      break;
    }
    default: {
      g_where = "kivi_bench_copy";
      double *gbps = chance(P_BAD) ? NULL : (double *)at(&r[2]);
      const uint64_t drawn = (uint64_t)irange(1, 4096);
      int32_t iters = (int32_t)irange(1, 3);
      stset want = S_OK;
      const uint64_t bytes = maybe_bad_bytes(drawn, &want);
      if (chance(P_BAD)) iters = chance(0.5) ? 0 : INT32_MIN;
      if (!ctx || !gbps || bytes == 0 || iters < 1) want = S(KIVI_ERR_ARG);
      kivi_status st = kivi_bench_copy(ctx, bytes, iters, gbps);
      check_status(ctx, st, want);
      if (!st) CHECK(*gbps > 0 && isfinite(*gbps), "gbps %g", *gbps);
      break;
    }
  }
}

/* ---------------------------------------------------------------- quantizers ------------- */

/* A matrix call's shared arguments, and what kivi.h says of them. */
typedef struct mat {
  int64_t rows, cols;
  kivi_axis axis;
  int32_t group, bits;
  kivi_dtype dtype;
} mat;

static mat gen_mat(int need_bits) {
  static const int32_t groups[] = {32, 64, 128};
  mat m;
  m.group = groups[rng_next() % 3];
  m.axis = (kivi_axis)irange(0, 1);
  const int64_t along = m.group * irange(1, 3), other = irange(1, 48);
  m.rows = m.axis == KIVI_AXIS_TOKEN ? along : other;
  m.cols = m.axis == KIVI_AXIS_TOKEN ? other : along;
  m.bits = chance(0.5) ? 2 : 4;
  m.dtype = gen_dtype();
  static const int64_t bad_size[] = {
      0, -1, -32, INT64_MIN, INT64_MAX, (int64_t)1 << 40, ((int64_t)1 << 40) + 32, (int64_t)1 << 20};
  static const int32_t bad_group[] = {0, -32, 16, 33, 96, 256, INT32_MAX, INT32_MIN};
  static const int32_t bad_bits[] = {0, 1, 3, 8, 16, -2, INT32_MAX};
  if (chance(P_BAD)) m.rows = chance(0.5) ? pick64(bad_size, 8) : m.rows + irange(1, 31);
  if (chance(P_BAD)) m.cols = chance(0.5) ? pick64(bad_size, 8) : m.cols + irange(1, 31);
  if (chance(P_BAD)) m.group = pick32(bad_group, 8);
  if (chance(P_BAD)) m.axis = chance(0.5) ? 2 : -1;
  if (need_bits && chance(P_BAD)) m.bits = pick32(bad_bits, 7);
  return m;
}

/* Statuses for m's arguments (0: all valid). */
static stset mat_errors(const mat *m, int need_bits, int has_dtype) {
  stset e = 0;
  if (m->rows < 1 || m->cols < 1 || m->rows > (KIVI_MAX_ELEMS - 1) / m->cols) e |= S(KIVI_ERR_ARG);
  if (!kivi_valid_group(m->group)) e |= S(KIVI_ERR_ARG);
  if (need_bits && !kivi_valid_bits(m->bits)) e |= S(KIVI_ERR_ARG);
  if (has_dtype && !dtype_ok(m->dtype)) e |= S(KIVI_ERR_ARG);
  if (m->axis != KIVI_AXIS_TOKEN && m->axis != KIVI_AXIS_CHANNEL)
    e |= S(KIVI_ERR_ARG);
  else if (m->rows >= 1 && m->cols >= 1 && kivi_valid_group(m->group) &&
           (m->axis == KIVI_AXIS_TOKEN ? m->rows : m->cols) % m->group)
    e |= S(KIVI_ERR_SHAPE);
  return e;
}

static void *maybe_null(const region *r) { return chance(P_BAD) ? NULL : at(r); }

/* Sizes of a valid call's buffers (in elements where typed). */
typedef struct sizes {
  int64_t elems, groups, words, cents;
} sizes;
static sizes mat_sizes(const mat *m) {
  sizes s;
  s.elems = m->rows * m->cols;
  s.groups = kivi_group_count(m->rows, m->cols, m->axis, m->group);
  s.words = s.elems / kivi_codes_per_word(kivi_valid_bits(m->bits) ? m->bits : 2);
  s.cents = s.groups * (kivi_valid_bits(m->bits) ? kivi_levels(m->bits) : 4);
  return s;
}

/* 1 when x [n] holds a value the quantizers refuse (their params are fp16): NaN, Inf, or a finite f32 /
   bf16 value that fp16 cannot hold (|x| >= 65520). Read after every region is filled: an overlapping
   region may have put any bits into x. */
static int unquantizable(const region *r, kivi_dtype dt, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    const float v = dt == KIVI_F32   ? ((const float *)at(r))[i]
                    : dt == KIVI_F16 ? kivi_f16_to_f32(((const uint16_t *)at(r))[i])
                                     : kivi_bf16_to_f32(((const uint16_t *)at(r))[i]);
    if (!(fabsf(v) < 65520.0f)) return 1;
  }
  return 0;
}
/* Puts a finite value beyond fp16's range (f32 / bf16 only) at a random element. */
static void poison_big(const region *r, kivi_dtype dt, int64_t n) {
  const int64_t i = irange(0, n - 1);
  const float v = chance(0.5) ? 65520.0f : -1e6f;
  if (dt == KIVI_F32)
    ((float *)at(r))[i] = v;
  else if (dt == KIVI_BF16)
    ((uint16_t *)at(r))[i] = kivi_f32_to_bf16(v);
}

/* Sorted finite fp16 centroids for every group (or, with bad, one group's unsorted / non-finite). */
static int fill_centroids(const region *r, int64_t groups, int32_t n, int bad) {
  uint16_t *h = (uint16_t *)at(r);
  for (int64_t g = 0; g < groups; g++) {
    float c = rand_value();
    for (int32_t k = 0; k < n; k++) {
      h[g * n + k] = kivi_f32_to_f16(c);
      c += (float)(rng_unif() * 0.7);
    }
  }
  if (!bad) return 0;
  const int64_t g = irange(0, groups - 1);
  const int32_t k = (int32_t)irange(1, n - 1);
  if (chance(0.5)) {
    h[g * n + k] = kivi_f32_to_f16(kivi_f16_to_f32(h[g * n + k - 1]) - 1.0f);
  } else {
    h[g * n + k] = chance(0.5) ? 0x7e00u : 0x7c00u;
  }
  return 1;
}

/* Lays out the regions of a quantizer call (layout; 0 when they do not fit), fills the outputs r[1..n)
   with canaries and, for a well-formed call, the input r[0] with data, now and then a NaN / Inf
   (*nonfinite set) or a value beyond fp16. */
static int quant_regions(region *r, int n, int overlap, int wellformed, kivi_dtype dt, int64_t elems, int *nonfinite) {
  if (!layout(r, n, overlap)) return 0;
  for (int i = 1; i < n; i++) fill_canary(&r[i]);
  if (!wellformed || !dtype_ok(dt)) return 1;
  fill_data(&r[0], dt, elems);
  if (!overlap && chance(0.15)) *nonfinite = poison(&r[0], dt, elems);
  if (!overlap && chance(0.05)) poison_big(&r[0], dt, elems);
  return 1;
}

static void fuzz_quant(void) {
  const int op = (int)irange(0, 8);
  const int need_bits = op != 0;
  mat m = gen_mat(need_bits);
  kivi_ctx_t ctx = gen_ctx();
  const int32_t flags = gen_flags();
  static const int32_t bad_enum[] = {2, -1, 7, INT32_MIN, INT32_MAX};
  stset e = mat_errors(&m, need_bits, op != 7 && op != 8);
  if (!ctx) e |= S(KIVI_ERR_ARG);
  /* Valid calls must fit; hostile ones get small buffers the library must not touch. */
  sizes z = {16, 16, 16, 64};
  if (!e) {
    z = mat_sizes(&m);
    if (z.elems > 32768) return;
  }
  const size_t xb = (size_t)z.elems * (dtype_ok(m.dtype) ? dsize(m.dtype) : 4);
  const int overlap = chance(0.15);
  int nonfinite = 0, bad_cent = 0;
  kivi_status st;
  stset want;
  switch (op) {
    case 0: { /* stats: x, stats, nonfinite */
      g_where = "kivi_stats_block";
      region r[3] = {{0, xb}, {0, (size_t)z.groups * 16}, {0, (size_t)z.groups * 4}};
      if (!layout(r, 3, overlap)) return;
      fill_canary(&r[1]), fill_canary(&r[2]);
      if (!e && dtype_ok(m.dtype)) {
        fill_data(&r[0], m.dtype, z.elems);
        if (!overlap && chance(0.2)) poison(&r[0], m.dtype, z.elems);
      }
      void *x = maybe_null(&r[0]), *s = maybe_null(&r[1]), *nf = maybe_null(&r[2]);
      if (!x || !s || !nf) e |= S(KIVI_ERR_ARG);
      snapshot();
      st = kivi_stats_block(ctx, x, m.dtype, m.rows, m.cols, m.axis, m.group, s, nf);
      want = e ? e : S_OK;
      break;
    }
    case 1:   /* uniform quantize: x, codes, scale, zero */
    case 2: { /* codebook encode: x, centroids, codes */
      g_where = op == 1 ? "kivi_uniform_quantize" : "kivi_codebook_encode";
      region r[4] = {{0, xb}, {0, (size_t)z.words * 4}, {0, (size_t)z.groups * 2}, {0, (size_t)z.cents * 2}};
      if (!quant_regions(r, 4, overlap, !e, m.dtype, z.elems, &nonfinite)) return;
      void *x = maybe_null(&r[0]), *codes = maybe_null(&r[1]), *p1 = maybe_null(&r[2]), *p2 = maybe_null(&r[3]);
      if (!flags_ok(flags) || !x || !codes || !p2 || (op == 1 && !p1)) e |= S(KIVI_ERR_ARG);
      const kivi_fit fit = chance(P_BAD) ? pick32(bad_enum, 5) : (kivi_fit)irange(0, 1);
      const kivi_assign asg = chance(P_BAD) ? pick32(bad_enum, 5) : (kivi_assign)irange(0, 1);
      const int32_t iters = chance(P_BAD) ? (chance(0.5) ? 0 : 257) : (int32_t)irange(1, 12);
      if (op == 2 && (fit < 0 || fit > 1 || asg < 0 || asg > 1 || iters < 1 || iters > 256)) e |= S(KIVI_ERR_ARG);
      if (!e && dtype_ok(m.dtype) && x) nonfinite = unquantizable(&r[0], m.dtype, z.elems);
      snapshot();
      if (op == 1)
        st = kivi_uniform_quantize(ctx, x, m.dtype, m.rows, m.cols, m.axis, m.group, m.bits, flags, codes, p1, p2);
      else
        st = kivi_codebook_encode(ctx, x, m.dtype, m.rows, m.cols, m.axis, m.group, m.bits, fit, iters, asg, flags, p2,
                                  codes);
      want = e ? e : (nonfinite && !(flags & KIVI_FLAG_TRUSTED) ? S(KIVI_ERR_NONFINITE) : S_OK);
      break;
    }
    case 3: { /* codebook fit: x, centroids, iters (may be NULL), inertia (may be NULL) */
      g_where = "kivi_codebook_fit";
      const kivi_fit fit = chance(P_BAD) ? pick32(bad_enum, 5) : (kivi_fit)irange(0, 1);
      const int32_t iters = chance(P_BAD) ? (chance(0.5) ? -1 : 1000) : (int32_t)irange(1, 12);
      const int64_t it_ok = iters >= 1 && iters <= 256 ? iters : 1;
      region r[4] = {
          {0, xb}, {0, (size_t)z.cents * 2}, {0, (size_t)z.groups * 4}, {0, (size_t)(z.groups * (it_ok + 1) * 4)}};
      if (!quant_regions(r, 4, overlap, !e, m.dtype, z.elems, &nonfinite)) return;
      void *x = maybe_null(&r[0]), *c = maybe_null(&r[1]);
      void *itp = chance(0.3) ? NULL : at(&r[2]), *inp = chance(0.3) ? NULL : at(&r[3]);
      if (!flags_ok(flags) || !x || !c || fit < 0 || fit > 1 || iters < 1 || iters > 256) e |= S(KIVI_ERR_ARG);
      if (!e && dtype_ok(m.dtype) && x) nonfinite = unquantizable(&r[0], m.dtype, z.elems);
      snapshot();
      st = kivi_codebook_fit(ctx, x, m.dtype, m.rows, m.cols, m.axis, m.group, m.bits, fit, iters, flags, c, itp, inp);
      want = e ? e : (nonfinite && !(flags & KIVI_FLAG_TRUSTED) ? S(KIVI_ERR_NONFINITE) : S_OK);
      if (!st && itp && !overlap) {
        int ok = 1;
        for (int64_t g = 0; g < z.groups; g++) ok &= ((int32_t *)itp)[g] >= 0 && ((int32_t *)itp)[g] <= iters;
        CHECK(ok, "iters [groups] within 0..max_iters");
      }
      break;
    }
    case 4: { /* codebook quantize: x, centroids, codes */
      g_where = "kivi_codebook_quantize";
      const kivi_assign asg = chance(P_BAD) ? pick32(bad_enum, 5) : (kivi_assign)irange(0, 1);
      region r[3] = {{0, xb}, {0, (size_t)z.cents * 2}, {0, (size_t)z.words * 4}};
      if (!layout(r, 3, overlap)) return;
      fill_canary(&r[2]);
      if (!e && dtype_ok(m.dtype)) {
        fill_data(&r[0], m.dtype, z.elems);
        if (!overlap && chance(0.15)) nonfinite = poison(&r[0], m.dtype, z.elems);
        if (!overlap && chance(0.05)) poison_big(&r[0], m.dtype, z.elems);
        bad_cent = fill_centroids(&r[1], z.groups, kivi_levels(m.bits), chance(0.15));
      }
      void *x = maybe_null(&r[0]), *c = maybe_null(&r[1]), *codes = maybe_null(&r[2]);
      if (!flags_ok(flags) || !x || !c || !codes || asg < 0 || asg > 1) e |= S(KIVI_ERR_ARG);
      if (!e && dtype_ok(m.dtype) && x) nonfinite = unquantizable(&r[0], m.dtype, z.elems);
      snapshot();
      st = kivi_codebook_quantize(ctx, x, m.dtype, m.rows, m.cols, m.axis, m.group, m.bits, c, asg, flags, codes);
      want = e ? e
               : (bad_cent ? S(KIVI_ERR_ARG) : 0) |
                     (nonfinite && !(flags & KIVI_FLAG_TRUSTED) ? S(KIVI_ERR_NONFINITE) : 0);
      if (!want) want = S_OK;
      break;
    }
    case 5:   /* uniform dequantize: codes, scale, zero, out */
    case 6: { /* codebook dequantize: codes, centroids, out */
      g_where = op == 5 ? "kivi_uniform_dequantize" : "kivi_codebook_dequantize";
      region r[4] = {{0, (size_t)z.words * 4}, {0, (size_t)z.cents * 2}, {0, (size_t)z.groups * 2}, {0, xb}};
      if (!layout(r, 4, overlap)) return;
      fill_canary(&r[3]);
      for (size_t i = 0; i < r[0].bytes; i++) arena[r[0].off + i] = (uint8_t)rng_next();
      if (!e) fill_centroids(&r[1], z.groups, kivi_valid_bits(m.bits) ? kivi_levels(m.bits) : 4, 0);
      if (!e && op == 5) fill_data(&r[2], KIVI_F16, z.groups);
      void *codes = maybe_null(&r[0]), *p1 = maybe_null(&r[1]), *p2 = maybe_null(&r[2]), *out = maybe_null(&r[3]);
      if (!codes || !p1 || !out || (op == 5 && !p2)) e |= S(KIVI_ERR_ARG);
      snapshot();
      if (op == 5)
        st = kivi_uniform_dequantize(ctx, codes, p2, p1, m.rows, m.cols, m.axis, m.group, m.bits, out, m.dtype);
      else
        st = kivi_codebook_dequantize(ctx, codes, p1, m.rows, m.cols, m.axis, m.group, m.bits, out, m.dtype);
      want = e ? e : S_OK;
      break;
    }
    default: { /* pack (7) / unpack (8): n codes, n / cpw words */
      g_where = op == 7 ? "kivi_codes_pack" : "kivi_codes_unpack";
      static const int64_t bad_n[] = {0, -1, -16, INT64_MIN, INT64_MAX, (int64_t)1 << 40};
      int64_t n = 16 * irange(1, 256);
      if (chance(P_BAD)) n = chance(0.5) ? pick64(bad_n, 6) : n + irange(1, 7);
      e = ctx ? 0 : S(KIVI_ERR_ARG);
      if (!kivi_valid_bits(m.bits) || n < 1 || n >= KIVI_MAX_ELEMS)
        e |= S(KIVI_ERR_ARG);
      else if (n % kivi_codes_per_word(m.bits))
        e |= S(KIVI_ERR_SHAPE);
      const int64_t nn = e ? 64 : n;
      region r[2] = {{0, (size_t)nn}, {0, (size_t)nn / 2}};
      if (!layout(r, 2, overlap)) return;
      int bad_code = 0;
      if (op == 7) {
        fill_canary(&r[1]);
        const int top = kivi_valid_bits(m.bits) ? kivi_levels(m.bits) : 4;
        for (int64_t i = 0; i < nn; i++) arena[r[0].off + i] = (uint8_t)irange(0, top - 1);
        if (chance(0.15)) arena[r[0].off + irange(0, nn - 1)] = (uint8_t)irange(top, 255), bad_code = 1;
      } else {
        fill_canary(&r[0]);
        for (size_t i = 0; i < r[1].bytes; i++) arena[r[1].off + i] = (uint8_t)rng_next();
      }
      void *codes = maybe_null(&r[0]), *words = maybe_null(&r[1]);
      if (!codes || !words) e |= S(KIVI_ERR_ARG);
      snapshot();
      st = op == 7 ? kivi_codes_pack(ctx, codes, n, m.bits, words) : kivi_codes_unpack(ctx, words, n, m.bits, codes);
      want = e ? e : (bad_code ? S(KIVI_ERR_ARG) : S_OK);
      break;
    }
  }
  check_status(ctx, st, want);
}

/* ---------------------------------------------------------------- paged cache ------------ */

#define MAX_CACHES 3
#define MAX_S 4
#define MAX_L 3

typedef struct fcache {
  kivi_cache_t h;
  kivi_cache_config cfg;
  int live[MAX_S];
  int64_t len[MAX_S][MAX_L], qlen[MAX_S][MAX_L];
  int32_t n_pages[MAX_S];
  int32_t used;
  int tainted; /* a trusted append stored a NaN / Inf: attention may be non-finite */
} fcache;

static fcache g_caches[MAX_CACHES];
static int g_attend_alias;
static int64_t g_batches, g_deferred; /* batches made, deferred errors read back */

static void gen_config(int32_t *a) {
  static const int32_t D[] = {64, 64, 128}, GK[] = {32, 32, 64}, B[] = {2, 4, 16};
  a[KIVI_CFG_LAYERS] = (int32_t)irange(1, MAX_L);
  a[KIVI_CFG_KV_HEADS] = (int32_t)irange(1, 2);
  a[KIVI_CFG_Q_HEADS] = a[KIVI_CFG_KV_HEADS] * (int32_t)(1 << irange(0, 2));
  a[KIVI_CFG_HEAD_DIM] = pick32(D, 3);
  a[KIVI_CFG_K_GROUP] = pick32(GK, 3);
  a[KIVI_CFG_PAGE_TOKENS] = a[KIVI_CFG_K_GROUP] * (int32_t)(1 << irange(0, 1));
  a[KIVI_CFG_RESIDUAL] = a[KIVI_CFG_K_GROUP] * (int32_t)irange(0, 2);
  a[KIVI_CFG_MAX_PAGES] = (int32_t)irange(1, 6);
  a[KIVI_CFG_MAX_SEQS] = (int32_t)irange(1, MAX_S);
  for (int o = 0; o <= KIVI_CFG_V_KIND - KIVI_CFG_K_KIND; o += KIVI_CFG_V_KIND - KIVI_CFG_K_KIND) {
    a[KIVI_CFG_K_KIND + o] = (int32_t)irange(0, 1);
    a[KIVI_CFG_K_BITS + o] = pick32(B, 3);
    a[KIVI_CFG_K_FIT + o] = (int32_t)irange(0, 1);
    a[KIVI_CFG_K_ITERS + o] = (int32_t)irange(1, 8);
  }
  a[KIVI_CFG_V_GROUP] = chance(0.5) ? 32 : 64;
}

/* kivi.h's rules for a config (0: valid). */
static int config_ok(const int32_t *a) {
  const int32_t L = a[KIVI_CFG_LAYERS], H = a[KIVI_CFG_KV_HEADS], QH = a[KIVI_CFG_Q_HEADS], D = a[KIVI_CFG_HEAD_DIM];
  const int32_t P = a[KIVI_CFG_PAGE_TOKENS], R = a[KIVI_CFG_RESIDUAL], Gk = a[KIVI_CFG_K_GROUP],
                Gv = a[KIVI_CFG_V_GROUP];
  if (L < 1 || H < 1 || QH < H || QH % H || QH / H > 32) return 0;
  if (D != 64 && D != 128 && D != 256) return 0;
  if (P != 32 && P != 64 && P != 128 && P != 256) return 0;
  if (!kivi_valid_group(Gk) || P % Gk || R < 0 || R % Gk) return 0;
  if (a[KIVI_CFG_MAX_PAGES] < 1 || a[KIVI_CFG_MAX_SEQS] < 1) return 0;
  if (!kivi_valid_group(Gv) || D % Gv) return 0;
  for (int o = 0; o <= KIVI_CFG_V_KIND - KIVI_CFG_K_KIND; o += KIVI_CFG_V_KIND - KIVI_CFG_K_KIND) {
    const int32_t kind = a[KIVI_CFG_K_KIND + o], bits = a[KIVI_CFG_K_BITS + o], fit = a[KIVI_CFG_K_FIT + o];
    const int32_t it = a[KIVI_CFG_K_ITERS + o];
    if (kind != KIVI_KIND_UNIFORM && kind != KIVI_KIND_CODEBOOK) return 0;
    if (bits != 2 && bits != 4 && bits != 16) return 0;
    if (fit != KIVI_FIT_FREE && fit != KIVI_FIT_PINNED) return 0;
    if (it < 1 || it > KIVI_MAX_ITERS) return 0;
  }
  return 1;
}

static int64_t row_elems(const fcache *c) { return (int64_t)c->cfg.kv_heads * c->cfg.head_dim; }

/* The library's view of a cache against the model: lengths, block tables, memory report. */
static void check_model(const fcache *c) {
  int64_t tokens = 0, quant = 0;
  for (int32_t s = 0; s < c->cfg.max_seqs; s++) {
    int64_t len = -1, q = -1;
    if (!c->live[s]) {
      CHECK(kivi_cache_seq_length(c->h, s, 0, &len, &q) == KIVI_ERR_STATE, "sequence %d is not live", (int)s);
      continue;
    }
    for (int32_t l = 0; l < c->cfg.layers; l++) {
      kivi_status st = kivi_cache_seq_length(c->h, s, l, &len, &q);
      CHECK(st == KIVI_OK && len == c->len[s][l] && q == c->qlen[s][l],
            "sequence %d layer %d: length %lld (%lld quantized), model %lld (%lld)", (int)s, (int)l, (long long)len,
            (long long)q, (long long)c->len[s][l], (long long)c->qlen[s][l]);
      CHECK(len - q < (int64_t)c->cfg.residual + c->cfg.k_group, "the window holds fewer than R + F tokens");
      tokens += len, quant += q;
    }
    int32_t count = -1;
    CHECK(kivi_cache_seq_pages(c->h, s, NULL, 0, &count) == KIVI_OK && count == c->n_pages[s],
          "sequence %d holds %d pages, model %d", (int)s, (int)count, (int)c->n_pages[s]);
  }
  uint64_t rep[KIVI_MEM_FIELDS];
  CHECK(kivi_cache_memory(c->h, rep, KIVI_MEM_FIELDS) == KIVI_OK, "kivi_cache_memory");
  CHECK(rep[KIVI_MEM_PAGES_USED] == (uint64_t)c->used && rep[KIVI_MEM_PAGES_TOTAL] == (uint64_t)c->cfg.max_pages &&
            rep[KIVI_MEM_TOKENS] == (uint64_t)tokens && rep[KIVI_MEM_QUANTIZED_TOKENS] == (uint64_t)quant,
        "memory report: %llu of %llu pages, %llu tokens (%llu quantized); model %d, %lld (%lld)",
        (unsigned long long)rep[KIVI_MEM_PAGES_USED], (unsigned long long)rep[KIVI_MEM_PAGES_TOTAL],
        (unsigned long long)rep[KIVI_MEM_TOKENS], (unsigned long long)rep[KIVI_MEM_QUANTIZED_TOKENS], (int)c->used,
        (long long)tokens, (long long)quant);
}

/* FNV-1a of everything a sequence holds (its dequantized K/V in every layer, its block table). */
static uint64_t seq_digest(const fcache *c, int32_t s) {
  uint64_t h = 1469598103934665603ull;
  int64_t most = 0;
  for (int32_t l = 0; l < c->cfg.layers; l++) most = c->len[s][l] > most ? c->len[s][l] : most;
  const size_t bytes = (size_t)(most * row_elems(c)) * 4u + 4u;
  float *k = malloc(bytes), *v = malloc(bytes);
  int32_t pages[64] = {0}, count = 0;
  kivi_cache_seq_pages(c->h, s, pages, 64, &count);
  for (int32_t l = 0; l < c->cfg.layers; l++) {
    memset(k, 0, bytes), memset(v, 0, bytes);
    kivi_cache_read(c->h, s, l, k, v, KIVI_F32);
    const uint8_t *pk = (const uint8_t *)k, *pv = (const uint8_t *)v;
    for (size_t i = 0; i < bytes; i++) h = (h ^ pk[i] ^ ((uint64_t)pv[i] << 8)) * 1099511628211ull;
  }
  for (int32_t i = 0; i < count && i < 64; i++) h = (h ^ (uint64_t)pages[i]) * 1099511628211ull;
  free(k);
  free(v);
  return h;
}

static int32_t gen_seq(const fcache *c) {
  static const int32_t bad[] = {-1, INT32_MIN, INT32_MAX, MAX_S + 5};
  if (chance(P_BAD)) return chance(0.5) ? pick32(bad, 4) : c->cfg.max_seqs;
  return (int32_t)irange(0, c->cfg.max_seqs - 1);
}
static stset seq_errors(const fcache *c, int32_t s) {
  if (s < 0 || s >= c->cfg.max_seqs) return S(KIVI_ERR_ARG);
  return c->live[s] ? 0 : S(KIVI_ERR_STATE);
}

static void fuzz_cache_create(void) {
  g_where = "kivi_cache_create";
  region r[2] = {{0, KIVI_CFG_FIELDS * 4}, {0, 8}};
  layout(r, 2, 0);
  int32_t *a = (int32_t *)at(&r[0]);
  gen_config(a);
  static const int32_t bad[] = {0, -1, INT32_MIN, INT32_MAX, 3, 33, 48, 100, 96, 512};
  int huge = 0;
  if (chance(0.3)) {
    const int f = (int)irange(0, KIVI_CFG_FIELDS - 1);
    a[f] = pick32(bad, 10);
    /* INT32_MAX is valid for these four: a pool that cannot be allocated (KIVI_ERR_NOMEM) */
    if (a[f] == INT32_MAX &&
        (f == KIVI_CFG_LAYERS || f == KIVI_CFG_KV_HEADS || f == KIVI_CFG_MAX_PAGES || f == KIVI_CFG_MAX_SEQS)) {
      if (f == KIVI_CFG_KV_HEADS) a[KIVI_CFG_Q_HEADS] = INT32_MAX;
      huge = 1;
    }
    /* a valid value beyond the model's arrays: made invalid instead */
    if (!huge && config_ok(a) &&
        (a[KIVI_CFG_LAYERS] > MAX_L || a[KIVI_CFG_MAX_SEQS] > MAX_S || a[KIVI_CFG_MAX_PAGES] > 64))
      a[f] = 0;
  }
  static const int32_t bad_n[] = {0, -1, KIVI_CFG_FIELDS - 1, KIVI_CFG_FIELDS + 1, INT32_MIN, INT32_MAX};
  const int32_t n = chance(P_BAD) ? pick32(bad_n, 6) : KIVI_CFG_FIELDS;
  kivi_ctx_t ctx = gen_ctx();
  kivi_cache_t *out = chance(P_BAD) ? NULL : (kivi_cache_t *)at(&r[1]);
  fill_canary(&r[1]);
  const int32_t *cfg = chance(P_BAD) ? NULL : a;
  stset e = (!ctx || !cfg || !out || n != KIVI_CFG_FIELDS || !config_ok(a)) ? S(KIVI_ERR_ARG) : 0;
  if (!e && huge) e = S(KIVI_ERR_NOMEM);
  snapshot();
  kivi_status st = kivi_cache_create(ctx, cfg, n, out);
  check_status(ctx, st, e ? e : S_OK);
  if (st) return;
  int slot = (int)irange(0, MAX_CACHES - 1);
  fcache *c = &g_caches[slot];
  kivi_cache_destroy(c->h);
  memset(c, 0, sizeof *c);
  c->h = *out;
  memcpy(&c->cfg, a, sizeof c->cfg);
  check_model(c);
}

static void fuzz_append(fcache *c) {
  g_where = "kivi_cache_append";
  const int32_t s = gen_seq(c), L = c->cfg.layers;
  int32_t layer = (int32_t)irange(-1, L - 1);
  if (chance(P_BAD)) layer = chance(0.5) ? L : (chance(0.5) ? -2 : INT32_MIN);
  static const int32_t bad_n[] = {0, -1, INT32_MIN};
  int32_t n = chance(0.2) ? (int32_t)irange(1, 3 * c->cfg.page_tokens + 7) : (int32_t)irange(1, 40);
  if (chance(P_BAD)) n = pick32(bad_n, 3);
  const kivi_dtype dt = gen_dtype();
  const int32_t flags = gen_flags();
  stset e = seq_errors(c, s);
  if (layer < -1 || layer >= L || n < 1 || !dtype_ok(dt) || !flags_ok(flags)) e |= S(KIVI_ERR_ARG);
  const int64_t nl = layer < 0 ? L : 1, elems = e ? 64 : nl * n * row_elems(c);
  const size_t b = (size_t)elems * (dtype_ok(dt) ? dsize(dt) : 4);
  region r[2] = {{0, b}, {0, b}};
  const int overlap = chance(0.2);
  if (!layout(r, 2, overlap)) return;
  int nonfinite = 0;
  if (!e) {
    fill_data(&r[0], dt, elems);
    fill_data(&r[1], dt, elems);
    if (!overlap && chance(0.1)) nonfinite = poison(&r[chance(0.5)], dt, elems);
  }
  void *k = maybe_null(&r[0]), *v = maybe_null(&r[1]);
  if (!k || !v) e |= S(KIVI_ERR_ARG);
  /* The documented paging rule: the table must cover every layer's quantized tokens. */
  int64_t need = 0, f[MAX_L] = {0};
  if (!e) {
    need = c->n_pages[s];
    for (int32_t l = 0; l < L; l++) {
      if (layer < 0 || l == layer) f[l] = kivi_flush_count(&c->cfg, c->len[s][l], c->qlen[s][l], n);
      const int64_t p = (c->qlen[s][l] + f[l] + c->cfg.page_tokens - 1) / c->cfg.page_tokens;
      need = p > need ? p : need;
    }
  }
  const int64_t extra = need - (e ? 0 : c->n_pages[s]);
  stset want = e;
  if (!want)
    want = nonfinite && !(flags & KIVI_FLAG_TRUSTED) ? S(KIVI_ERR_NONFINITE)
           : extra > c->cfg.max_pages - c->used      ? S(KIVI_ERR_CAPACITY)
                                                     : S_OK;
  const int32_t watch = (s >= 0 && s < c->cfg.max_seqs && c->live[s]) ? s : -1;
  const uint64_t before = watch >= 0 ? seq_digest(c, watch) : 0;
  snapshot();
  kivi_status st = kivi_cache_append(c->h, s, layer, k, v, dt, n, flags);
  check_status(g_ctx, st, want);
  if (st == KIVI_OK) {
    c->tainted |= nonfinite;
    for (int32_t l = 0; l < L; l++) {
      if (layer >= 0 && l != layer) continue;
      c->len[s][l] += n;
      c->qlen[s][l] += f[l];
    }
    c->n_pages[s] += (int32_t)extra;
    c->used += (int32_t)extra;
  } else if (watch >= 0) {
    CHECK(seq_digest(c, watch) == before, "a failed append (%s) changed sequence %d", kivi_status_str(st), (int)watch);
  }
  check_model(c);
}

/*
 * kivi_cache_attend / kivi_cache_bench_attend. `out` may overlap `seqs` (unless
 * KIVI_FUZZ_ATTEND_ALIAS=0): the CPU attention once re-read seqs[b] after writing earlier rows of out,
 * turning an aliased out into an unvalidated sequence index; it now works on a copy of the validated
 * ids, and this case keeps it so.
 */
static void fuzz_attend(fcache *c, int bench) {
  g_where = bench ? "kivi_cache_bench_attend" : "kivi_cache_attend";
  const int32_t L = c->cfg.layers, QH = c->cfg.q_heads, D = c->cfg.head_dim;
  int32_t layer = (int32_t)irange(0, L - 1);
  if (chance(P_BAD)) layer = chance(0.5) ? -1 : L;
  int32_t batch = (int32_t)irange(1, 4);
  if (chance(P_BAD)) batch = chance(0.5) ? 0 : INT32_MIN;
  const kivi_dtype qd = gen_dtype(), od = gen_dtype();
  const int32_t flags = bench ? 0 : gen_flags();
  float scale = (float)(rng_unif() * 0.3 + 0.01);
  if (chance(P_BAD)) scale = chance(0.5) ? NAN : -INFINITY;
  stset e = 0;
  if (layer < 0 || layer >= L || batch < 1 || !dtype_ok(qd) || !dtype_ok(od) || !isfinite(scale) || !flags_ok(flags))
    e |= S(KIVI_ERR_ARG);
  const int32_t nb = batch >= 1 ? batch : 1;
  const int64_t qe = (int64_t)nb * QH * D;
  region r[3] = {{0, (size_t)nb * 4}, {0, (size_t)qe * 4}, {0, (size_t)qe * 4}};
  const int overlap = chance(0.2);
  if (!layout(r, 3, overlap)) return;
  if (!g_attend_alias && r[2].off < r[0].off + r[0].bytes && r[0].off < r[2].off + r[2].bytes) return;
  /* outputs first, then inputs (an input overlapping an output starts as data, not canary) */
  fill_canary(&r[2]);
  int nonfinite = 0;
  if (dtype_ok(qd)) {
    fill_data(&r[1], qd, qe);
    if (!bench && !overlap && chance(0.1)) nonfinite = poison(&r[1], qd, qe);
  }
  /* mostly live sequences that hold tokens in the layer, so that many calls get through */
  int32_t *seqs = (int32_t *)at(&r[0]), ready[MAX_S], n_ready = 0;
  for (int32_t s = 0; s < c->cfg.max_seqs; s++)
    if (c->live[s] && layer >= 0 && layer < L && c->len[s][layer] > 0) ready[n_ready++] = s;
  for (int32_t b = 0; b < nb; b++) {
    const int32_t s = n_ready && !chance(0.15) ? ready[irange(0, n_ready - 1)] : gen_seq(c);
    seqs[b] = s;
    const stset se = seq_errors(c, s);
    e |= se;
    if (!se && layer >= 0 && layer < L && c->len[s][layer] < 1) e |= S(KIVI_ERR_STATE);
  }
  const int32_t *sp = chance(P_BAD) ? NULL : seqs;
  void *q = maybe_null(&r[1]), *out = maybe_null(&r[2]);
  if (!sp || !q || !out) e |= S(KIVI_ERR_ARG);
  int32_t iters = (int32_t)irange(1, 2);
  float ms_box[2];
  float *ms = chance(P_BAD) ? NULL : ms_box;
  if (bench && chance(P_BAD)) iters = chance(0.5) ? 0 : -5;
  if (bench && (iters < 1 || !ms)) e |= S(KIVI_ERR_ARG);
  stset want = e ? e : (nonfinite && !(flags & KIVI_FLAG_TRUSTED) ? S(KIVI_ERR_NONFINITE) : S_OK);
  snapshot();
  kivi_status st = bench ? kivi_cache_bench_attend(c->h, layer, sp, batch, q, qd, scale, out, od, iters, ms)
                         : kivi_cache_attend(c->h, layer, sp, batch, q, qd, scale, flags, out, od);
  /* bench_attend's warm-up names kivi_cache_attend in its messages */
  if (bench && st && strstr(kivi_last_error(), "kivi_cache_attend")) g_where = "kivi_cache_attend";
  check_status(g_ctx, st, want);
  const int aliased = r[2].off < r[1].off + r[1].bytes && r[1].off < r[2].off + r[2].bytes;
  if (st == KIVI_OK && !aliased && !nonfinite && !c->tainted) {
    int finite = 1;
    for (int64_t i = 0; i < qe; i++) {
      const float x = od == KIVI_F32   ? ((float *)out)[i]
                      : od == KIVI_F16 ? kivi_f16_to_f32(((uint16_t *)out)[i])
                                       : kivi_bf16_to_f32(((uint16_t *)out)[i]);
      finite &= isfinite(x) != 0;
    }
    CHECK(finite, "attention of finite data is finite");
  }
  check_model(c);
}

static void fuzz_cache_misc(fcache *c) {
  const int32_t s = gen_seq(c), L = c->cfg.layers;
  region r[3] = {{0, 256}, {0, 256}, {0, 256}};
  switch (irange(0, 6)) {
    case 5: {
      g_where = "kivi_cache_seq_copy";
      layout(r, 1, 0);
      fill_canary(&r[0]);
      int32_t *out = maybe_null(&r[0]);
      int32_t slot = -1;
      for (int32_t i = c->cfg.max_seqs - 1; i >= 0; i--)
        if (!c->live[i]) slot = i;
      stset e = seq_errors(c, s);
      if (!e)
        e = !out || slot < 0 || c->cfg.max_pages - c->used < c->n_pages[s] ? S(!out ? KIVI_ERR_ARG : KIVI_ERR_CAPACITY)
                                                                           : 0;
      snapshot();
      kivi_status st = kivi_cache_seq_copy(c->h, s, out);
      check_status(g_ctx, st, e ? e : S_OK);
      if (!st) {
        const int32_t id = *out;
        CHECK(id == slot, "a copy takes the first free slot (%d), got %d", (int)slot, (int)id);
        if (id >= 0 && id < c->cfg.max_seqs) {
          c->live[id] = 1;
          memcpy(c->len[id], c->len[s], sizeof c->len[id]);
          memcpy(c->qlen[id], c->qlen[s], sizeof c->qlen[id]);
          c->n_pages[id] = c->n_pages[s];
          c->used += c->n_pages[s];
        }
      }
      break;
    }
    case 0: {
      g_where = "kivi_cache_seq_create";
      layout(r, 1, 0);
      fill_canary(&r[0]);
      int32_t *out = maybe_null(&r[0]);
      int all = 1;
      for (int32_t i = 0; i < c->cfg.max_seqs; i++) all &= c->live[i];
      snapshot();
      kivi_status st = kivi_cache_seq_create(c->h, out);
      check_status(g_ctx, st, !out ? S(KIVI_ERR_ARG) : (all ? S(KIVI_ERR_CAPACITY) : S_OK));
      if (!st) {
        const int32_t id = *out;
        CHECK(id >= 0 && id < c->cfg.max_seqs && !c->live[id], "a new sequence takes a free slot, got %d", (int)id);
        if (id >= 0 && id < c->cfg.max_seqs) {
          c->live[id] = 1;
          memset(c->len[id], 0, sizeof c->len[id]);
          memset(c->qlen[id], 0, sizeof c->qlen[id]);
          c->n_pages[id] = 0;
        }
      }
      break;
    }
    case 1: {
      g_where = "kivi_cache_seq_free";
      layout(r, 1, 0);
      snapshot();
      kivi_status st = kivi_cache_seq_free(c->h, s);
      const stset e = seq_errors(c, s);
      check_status(g_ctx, st, e ? e : S_OK);
      if (!st) {
        c->live[s] = 0;
        c->used -= c->n_pages[s];
        c->n_pages[s] = 0;
      }
      break;
    }
    case 2: {
      g_where = "kivi_cache_seq_length";
      int32_t layer = (int32_t)irange(0, L - 1);
      if (chance(P_BAD)) layer = chance(0.5) ? -1 : L;
      layout(r, 2, chance(0.3));
      fill_canary(&r[0]), fill_canary(&r[1]);
      void *len = maybe_null(&r[0]), *q = maybe_null(&r[1]);
      stset e = seq_errors(c, s) | ((layer < 0 || layer >= L || !len || !q) ? S(KIVI_ERR_ARG) : 0);
      snapshot();
      check_status(g_ctx, kivi_cache_seq_length(c->h, s, layer, len, q), e ? e : S_OK);
      break;
    }
    case 3: {
      g_where = "kivi_cache_seq_pages";
      static const int32_t bad[] = {-1, INT32_MIN};
      int32_t cap = (int32_t)irange(0, 64);
      if (chance(P_BAD)) cap = pick32(bad, 2);
      layout(r, 2, 0);
      fill_canary(&r[0]), fill_canary(&r[1]);
      int32_t *pages = maybe_null(&r[0]), *count = maybe_null(&r[1]);
      if (cap == 0 && chance(0.5)) pages = NULL;
      stset e = seq_errors(c, s) | ((cap < 0 || (cap > 0 && !pages) || !count) ? S(KIVI_ERR_ARG) : 0);
      snapshot();
      kivi_status st = kivi_cache_seq_pages(c->h, s, pages, cap, count);
      check_status(g_ctx, st, e ? e : S_OK);
      if (!st) {
        const int32_t m = cap < *count ? cap : *count;
        int ok = *count == c->n_pages[s];
        for (int32_t i = 0; i < m; i++) ok &= pages[i] >= 0 && pages[i] < c->cfg.max_pages;
        if (pages) ok &= memcmp(pages + m, shadow + r[0].off + 4 * (size_t)m, 256 - 4 * (size_t)m) == 0;
        CHECK(ok, "seq_pages: %d ids (model %d), in range, nothing written past cap", (int)*count, (int)c->n_pages[s]);
      }
      break;
    }
    case 4: {
      g_where = "kivi_cache_read";
      int32_t layer = (int32_t)irange(0, L - 1);
      if (chance(P_BAD)) layer = chance(0.5) ? -1 : L;
      const kivi_dtype dt = gen_dtype();
      stset e = seq_errors(c, s) | ((layer < 0 || layer >= L || !dtype_ok(dt)) ? S(KIVI_ERR_ARG) : 0);
      const size_t b = e ? 64 : (size_t)(c->len[s][layer] * row_elems(c)) * dsize(dt);
      r[0].bytes = r[1].bytes = b;
      if (!layout(r, 2, chance(0.2))) return;
      fill_canary(&r[0]), fill_canary(&r[1]);
      void *k = maybe_null(&r[0]), *v = maybe_null(&r[1]);
      if (!k || !v) e |= S(KIVI_ERR_ARG);
      snapshot();
      check_status(g_ctx, kivi_cache_read(c->h, s, layer, k, v, dt), e ? e : S_OK);
      break;
    }
    default: {
      g_where = "kivi_cache_memory";
      static const int32_t bad[] = {0, -1, INT32_MIN};
      int32_t n = chance(0.5) ? (int32_t)irange(1, KIVI_MEM_FIELDS) : (chance(0.5) ? INT32_MAX : KIVI_MEM_FIELDS + 3);
      if (chance(P_BAD)) n = pick32(bad, 3);
      layout(r, 1, 0);
      fill_canary(&r[0]);
      uint64_t *rep = maybe_null(&r[0]);
      snapshot();
      kivi_status st = kivi_cache_memory(c->h, rep, n);
      check_status(g_ctx, st, (!rep || n < 1) ? S(KIVI_ERR_ARG) : S_OK);
      if (!st) {
        const size_t m = (size_t)(n < KIVI_MEM_FIELDS ? n : KIVI_MEM_FIELDS) * 8u;
        CHECK(memcmp(arena + r[0].off + m, shadow + r[0].off + m, 256 - m) == 0,
              "kivi_cache_memory wrote past min(n_fields, KIVI_MEM_FIELDS)");
      }
      break;
    }
  }
  check_model(c);
}

/*
 * Decode batches (kivi_batch_*): a batch made from random and hostile arguments, then a few calls on
 * it (attend, append, status), each predicted from kivi.h: a failed call changes no sequence; a bad
 * q or k / v passes the call (the check is deferred) and the next call fails with
 * KIVI_ERR_NONFINITE until kivi_batch_status reads it, an attend's out then NaN; appends move the
 * model as kivi_cache_append would, one token a sequence. The batch's buffers live in this call's
 * arena layout, so the batch is destroyed before the call ends.
 */
static void fuzz_batch(fcache *c) {
  g_where = "kivi_batch_create";
  const int32_t L = c->cfg.layers, QH = c->cfg.q_heads, D = c->cfg.head_dim, H = c->cfg.kv_heads;
  int32_t live = 0;
  for (int32_t i = 0; i < c->cfg.max_seqs; i++) live += c->live[i];
  int32_t batch = (int32_t)irange(1, live > 0 && !chance(0.1) ? live : c->cfg.max_seqs);
  static const int32_t bad_batch[] = {0, -1, KIVI_BATCH_MAX + 1, INT32_MIN};
  if (chance(P_BAD)) batch = pick32(bad_batch, 4);
  const int32_t nb = batch >= 1 && batch <= MAX_S ? batch : 1;
  const int with_q = chance(0.7), with_k = !with_q || chance(0.6);
  const kivi_dtype qd = gen_dtype(), od = gen_dtype(), kd = gen_dtype();
  const int32_t flags = gen_flags();
  float scale = (float)(rng_unif() * 0.3 + 0.01);
  if (chance(P_BAD)) scale = NAN;
  const int64_t qe = (int64_t)nb * QH * D, ke = (int64_t)nb * H * D;
  region r[7] = {{0, (size_t)nb * 4}, {0, (size_t)qe * 4},         {0, (size_t)qe * 4}, {0, (size_t)ke * 4},
                 {0, (size_t)ke * 4}, {0, 8 * KIVI_REPORT_FIELDS}, {0, MAX_S}};
  if (!layout(r, 7, 0)) return;
  stset e = 0;
  if (batch < 1 || batch > KIVI_BATCH_MAX) e |= S(KIVI_ERR_ARG);
  /* distinct live sequences, mostly; sometimes a repeat, a dead or an out-of-range one */
  int32_t *seqs = (int32_t *)at(&r[0]);
  int32_t order[MAX_S], n_live = 0;
  for (int32_t i = 0; i < c->cfg.max_seqs; i++)
    if (c->live[i]) order[n_live++] = i;
  for (int32_t i = n_live - 1; i > 0; i--) { /* live ones first, shuffled */
    const int32_t j = (int32_t)irange(0, i), t = order[i];
    order[i] = order[j], order[j] = t;
  }
  for (int32_t i = 0, m = n_live; i < c->cfg.max_seqs; i++)
    if (!c->live[i]) order[m++] = i;
  for (int32_t b = 0; b < nb; b++) {
    seqs[b] = chance(0.1) ? gen_seq(c) : (chance(0.05) && b > 0 ? seqs[0] : order[b % c->cfg.max_seqs]);
    const stset se = seq_errors(c, seqs[b]);
    e |= se;
    for (int32_t j = 0; j < b && !se; j++)
      if (seqs[j] == seqs[b]) e |= S(KIVI_ERR_ARG);
  }
  void *q = with_q ? at(&r[1]) : NULL, *out = with_q ? at(&r[2]) : NULL;
  void *k = with_k ? at(&r[3]) : NULL, *v = with_k ? at(&r[4]) : NULL;
  if (chance(P_BAD)) (chance(0.5) ? (q = NULL) : (v = NULL));
  if (chance(P_BAD) && with_q) out = q; /* out over q */
  const int32_t *sp = chance(P_BAD) ? NULL : seqs;
  if (!sp || !q != !out || !k != !v || (!q && !k)) e |= S(KIVI_ERR_ARG);
  if (q && (!dtype_ok(qd) || !dtype_ok(od) || !isfinite(scale))) e |= S(KIVI_ERR_ARG);
  if (k && !dtype_ok(kd)) e |= S(KIVI_ERR_ARG);
  if (q && out == q) e |= S(KIVI_ERR_ARG);
  if (!flags_ok(flags)) e |= S(KIVI_ERR_ARG);
  if (q && dtype_ok(qd)) fill_data(&r[1], qd, qe);
  if (k && dtype_ok(kd)) fill_data(&r[3], kd, ke), fill_data(&r[4], kd, ke);
  kivi_batch_t *made = chance(P_BAD) ? NULL : (kivi_batch_t *)at(&r[5]);
  if (!made) e |= S(KIVI_ERR_ARG);
  snapshot();
  kivi_status st = kivi_batch_create(c->h, sp, batch, q, qd, out, od, scale, k, v, kd, flags, made);
  check_status(g_ctx, st, e ? e : S_OK);
  if (st) return;
  kivi_batch_t bh = *made;
  g_batches++;
  int pending = 0; /* a deferred error the next call must find */
  for (int call = 0; call < 4; call++) {
    int32_t layer = (int32_t)irange(0, L - 1);
    if (chance(P_BAD)) layer = chance(0.5) ? -1 : L;
    const int what = (int)irange(0, 3);
    if (what == 3) { /* kivi_batch_status */
      g_where = "kivi_batch_status";
      int64_t rep[KIVI_REPORT_FIELDS];
      uint8_t bad[MAX_S];
      snapshot();
      st = kivi_batch_status(bh, 0, rep, KIVI_REPORT_FIELDS, bad);
      check_status(g_ctx, st, pending ? S(KIVI_ERR_NONFINITE) : S_OK);
      CHECK(pending ? rep[KIVI_REPORT_OP] != 0 : rep[KIVI_REPORT_OP] == 0, "report op %lld", (long long)rep[0]);
      g_deferred += pending;
      pending = 0;
      continue;
    }
    stset ce = (layer < 0 || layer >= L) ? S(KIVI_ERR_ARG) : 0;
    if (what == 0) { /* attend */
      g_where = "kivi_batch_attend";
      if (!q) ce |= S(KIVI_ERR_STATE);
      for (int32_t b = 0; b < nb && !ce; b++)
        if (!c->live[seqs[b]] || c->len[seqs[b]][layer] < 1) ce |= S(KIVI_ERR_STATE);
      int bad_q = 0;
      if (q && !(flags & KIVI_FLAG_TRUSTED) && chance(0.15)) bad_q = poison(&r[1], qd, qe);
      snapshot();
      st = kivi_batch_attend(bh, layer);
      check_status(g_ctx, st, pending ? (S(KIVI_ERR_NONFINITE) | ce) : (ce ? ce : S_OK));
      if (!st && bad_q) {
        int nan = 1;
        for (int64_t i = 0; i < qe; i++) {
          const float x = od == KIVI_F32   ? ((float *)out)[i]
                          : od == KIVI_F16 ? kivi_f16_to_f32(((uint16_t *)out)[i])
                                           : kivi_bf16_to_f32(((uint16_t *)out)[i]);
          nan &= x != x;
        }
        CHECK(nan, "an attend whose q is not finite writes NaN");
        pending = 1;
      }
      if (q && dtype_ok(qd)) fill_data(&r[1], qd, qe); /* finite again */
    } else {                                           /* append, or a sequence freed behind the batch's back first */
      g_where = "kivi_batch_append";
      if (what == 2 && chance(0.3)) {
        const int32_t s = seqs[irange(0, nb - 1)];
        if (c->live[s] && kivi_cache_seq_free(c->h, s) == KIVI_OK) {
          c->live[s] = 0;
          c->used -= c->n_pages[s];
          c->n_pages[s] = 0;
        }
      }
      if (!k) ce |= S(KIVI_ERR_STATE);
      for (int32_t b = 0; b < nb; b++)
        if (!c->live[seqs[b]]) ce |= S(KIVI_ERR_STATE);
      int64_t extra = 0, f[MAX_S] = {0}, ex[MAX_S] = {0};
      if (!ce) {
        for (int32_t b = 0; b < nb; b++) {
          const int32_t s = seqs[b];
          f[b] = kivi_flush_count(&c->cfg, c->len[s][layer], c->qlen[s][layer], 1);
          int64_t need = c->n_pages[s];
          for (int32_t l = 0; l < L; l++) {
            const int64_t p = (c->qlen[s][l] + (l == layer ? f[b] : 0) + c->cfg.page_tokens - 1) / c->cfg.page_tokens;
            need = p > need ? p : need;
          }
          ex[b] = need - c->n_pages[s];
          extra += ex[b];
        }
      }
      int bad_kv = 0;
      if (k && !(flags & KIVI_FLAG_TRUSTED) && chance(0.15)) bad_kv = poison(&r[chance(0.5) ? 3 : 4], kd, ke);
      const stset want = pending                              ? (S(KIVI_ERR_NONFINITE) | ce)
                         : ce                                 ? ce
                         : extra > c->cfg.max_pages - c->used ? S(KIVI_ERR_CAPACITY)
                                                              : S_OK;
      uint64_t before[MAX_S] = {0};
      for (int32_t b = 0; b < nb; b++) before[b] = c->live[seqs[b]] ? seq_digest(c, seqs[b]) : 0;
      snapshot();
      st = kivi_batch_append(bh, layer);
      check_status(g_ctx, st, want);
      if (!st) {
        for (int32_t b = 0; b < nb; b++) {
          const int32_t s = seqs[b];
          c->len[s][layer] += 1;
          c->qlen[s][layer] += f[b];
          c->n_pages[s] += (int32_t)ex[b];
          c->used += (int32_t)ex[b];
        }
        if (bad_kv) c->tainted = 1, pending = 1;
      } else {
        for (int32_t b = 0; b < nb; b++)
          if (c->live[seqs[b]])
            CHECK(seq_digest(c, seqs[b]) == before[b], "a failed batch append (%s) changed sequence %d",
                  kivi_status_str(st), (int)seqs[b]);
      }
      if (k && dtype_ok(kd)) fill_data(&r[3], kd, ke), fill_data(&r[4], kd, ke);
    }
    check_model(c);
  }
  g_where = "kivi_batch_destroy";
  CHECK(kivi_batch_destroy(bh) == KIVI_OK && kivi_batch_destroy(NULL) == KIVI_OK, "kivi_batch_destroy");
}

static void fuzz_cache(void) {
  fcache *c = &g_caches[irange(0, MAX_CACHES - 1)];
  if (!c->h || chance(0.02)) {
    fuzz_cache_create();
    return;
  }
  if (chance(0.01)) {
    g_where = "kivi_cache_destroy";
    CHECK(kivi_cache_destroy(c->h) == KIVI_OK && kivi_cache_destroy(NULL) == KIVI_OK, "kivi_cache_destroy");
    memset(c, 0, sizeof *c);
    return;
  }
  if (chance(0.03)) { /* every cache export with a NULL cache */
    g_where = "NULL cache";
    int32_t i32 = 0, seqs[1] = {0};
    int64_t a = 0, b = 0;
    uint64_t rep[KIVI_MEM_FIELDS];
    float q[64], o[64], ms;
    CHECK(kivi_cache_seq_create(NULL, &i32) == KIVI_ERR_ARG, "seq_create");
    CHECK(kivi_cache_seq_free(NULL, 0) == KIVI_ERR_ARG, "seq_free");
    CHECK(kivi_cache_seq_length(NULL, 0, 0, &a, &b) == KIVI_ERR_ARG, "seq_length");
    CHECK(kivi_cache_seq_pages(NULL, 0, NULL, 0, &i32) == KIVI_ERR_ARG, "seq_pages");
    CHECK(kivi_cache_append(NULL, 0, 0, q, q, KIVI_F32, 1, 0) == KIVI_ERR_ARG, "append");
    CHECK(kivi_cache_attend(NULL, 0, seqs, 1, q, KIVI_F32, 1.0f, 0, o, KIVI_F32) == KIVI_ERR_ARG, "attend");
    CHECK(kivi_cache_read(NULL, 0, 0, q, o, KIVI_F32) == KIVI_ERR_ARG, "read");
    CHECK(kivi_cache_bench_attend(NULL, 0, seqs, 1, q, KIVI_F32, 1.0f, o, KIVI_F32, 1, &ms) == KIVI_ERR_ARG, "bench");
    CHECK(kivi_cache_memory(NULL, rep, KIVI_MEM_FIELDS) == KIVI_ERR_ARG, "memory");
    CHECK(strstr(kivi_last_error(), "kivi_cache_memory") != NULL, "the message names the op");
    int64_t rep64[KIVI_REPORT_FIELDS];
    kivi_batch_t bh = NULL;
    CHECK(
        kivi_batch_create(NULL, seqs, 1, q, KIVI_F32, o, KIVI_F32, 1.0f, NULL, NULL, KIVI_F32, 0, &bh) == KIVI_ERR_ARG,
        "batch_create");
    CHECK(kivi_batch_attend(NULL, 0) == KIVI_ERR_ARG && kivi_batch_append(NULL, 0) == KIVI_ERR_ARG, "batch calls");
    CHECK(kivi_batch_status(NULL, 1, rep64, KIVI_REPORT_FIELDS, NULL) == KIVI_ERR_ARG, "batch_status");
    CHECK(kivi_batch_destroy(NULL) == KIVI_OK, "batch_destroy");
    return;
  }
  const double u = rng_unif();
  if (u < 0.32)
    fuzz_append(c);
  else if (u < 0.5)
    fuzz_attend(c, chance(0.1));
  else if (u < 0.6)
    fuzz_batch(c);
  else
    fuzz_cache_misc(c);
}

/* ---------------------------------------------------------------- main ------------------- */

static int64_t env_int(const char *name, int64_t dflt) {
  const char *v = getenv(name);
  return v && *v ? strtoll(v, NULL, 10) : dflt;
}

/* ---------------------------------------------------------------- model ops -------------- */
/* Each kivi_model_* op with small seeded sizes, or hostile ones (0, negative, one past the op's limit,
   an odd rotary dim, q_heads not a multiple of kv_heads, a bad accumulate flag, a NULL pointer or
   ctx): a hostile call returns KIVI_ERR_ARG naming the op and writes nothing; a valid one returns
   KIVI_OK, token ids and positions out of range included (NaN rows, never a read out of bounds). */

/* A size in [lo, hi], or (with probability P_BAD, *bad set) one the rules refuse. */
static int32_t model_size(int32_t lo, int32_t hi, int64_t limit, int *bad) {
  if (!chance(P_BAD)) return (int32_t)irange(lo, hi);
  *bad = 1;
  static const int32_t hostile[] = {0, -1, INT32_MIN};
  return chance(0.3) && limit < INT32_MAX ? (int32_t)(limit + 1) : pick32(hostile, 3);
}

static void fill_ids(const region *r, int32_t n, int32_t hi) {
  for (int32_t i = 0; i < n; i++) ((int32_t *)at(r))[i] = (int32_t)irange(-1, hi); /* -1 and hi are out of range */
}

static void fuzz_model(void) {
  const int op = (int)irange(0, 7);
  kivi_ctx_t ctx = gen_ctx();
  int bad = !ctx, rows_bad = 0;
  const int32_t rows = model_size(1, 6, KIVI_MODEL_MAX_ROWS, &rows_bad);
  if (op != 5 && op != 6) bad |= rows_bad; /* attention and the fill have no rows */
  kivi_status st = KIVI_OK;
  region r[4];
  int nr = 0;
  /* buffer bytes: the valid call's, or 16 bytes the refused call must not touch */
#define MB(n) (bad ? (size_t)16 : (size_t)(n))
/* The regions q, laid out at random into r (returns from the op when they do not fit). */
#define LAY_OUT(q)                                            \
  memcpy(r, q, sizeof q), nr = (int)(sizeof q / sizeof q[0]); \
  if (!layout(r, nr, 0)) return
  switch (op) {
    case 0: { /* embed: tokens, table, out */
      g_where = "kivi_model_embed";
      const int32_t vocab = model_size(1, 8, KIVI_MODEL_MAX_ROWS, &bad),
                    dim = model_size(1, 32, KIVI_MODEL_MAX_DIM, &bad);
      region q[3] = {{0, MB(4 * rows)}, {0, MB(2 * vocab * dim)}, {0, MB(4 * rows * dim)}};
      LAY_OUT(q);
      fill_canary(&r[2]);
      if (!bad) fill_ids(&r[0], rows, vocab), fill_data(&r[1], KIVI_F16, (int64_t)vocab * dim);
      void *t = maybe_null(&r[0]), *tab = maybe_null(&r[1]), *out = maybe_null(&r[2]);
      bad |= !t || !tab || !out;
      snapshot();
      st = kivi_model_embed(ctx, t, rows, tab, vocab, dim, out);
      break;
    }
    case 1:   /* rmsnorm: x, w, out */
    case 4: { /* swiglu: gate, up, out (n = rows x dim) */
      const int32_t dim = model_size(1, 32, KIVI_MODEL_MAX_DIM, &bad);
      g_where = op == 1 ? "kivi_model_rmsnorm" : "kivi_model_swiglu";
      region q[3] = {{0, MB(4 * rows * dim)}, {0, MB(op == 1 ? 2 * dim : 4 * rows * dim)}, {0, MB(4 * rows * dim)}};
      LAY_OUT(q);
      fill_canary(&r[2]);
      if (!bad)
        fill_data(&r[0], KIVI_F32, (int64_t)rows * dim),
            fill_data(&r[1], op == 1 ? KIVI_F16 : KIVI_F32, op == 1 ? dim : (int64_t)rows * dim);
      void *a = maybe_null(&r[0]), *b = maybe_null(&r[1]), *out = maybe_null(&r[2]);
      bad |= !a || !b || !out;
      snapshot();
      if (op == 1)
        st = kivi_model_rmsnorm(ctx, a, b, rows, dim, 1e-5f, out);
      else
        st = kivi_model_swiglu(ctx, a, b, bad ? -1 : rows * dim, out);
      break;
    }
    case 2: { /* linear (the f32 or the f16 path: the same rules): x, w, y */
      const int f16 = chance(0.5);
      g_where = f16 ? "kivi_model_linear_f16" : "kivi_model_linear";
      const int32_t n = model_size(1, 16, KIVI_MODEL_MAX_ROWS, &bad), k = model_size(1, 40, KIVI_MODEL_MAX_DIM, &bad);
      const int32_t acc = chance(P_BAD) ? (bad = 1, chance(0.5) ? 2 : -1) : (int32_t)irange(0, 1);
      region q[3] = {{0, MB(4 * rows * k)}, {0, MB(2 * n * k)}, {0, MB(4 * rows * n)}};
      LAY_OUT(q);
      if (!bad)
        fill_data(&r[0], KIVI_F32, (int64_t)rows * k), fill_data(&r[1], KIVI_F16, (int64_t)n * k),
            fill_data(&r[2], KIVI_F32, (int64_t)rows * n);
      else
        fill_canary(&r[2]);
      void *x = maybe_null(&r[0]), *w = maybe_null(&r[1]), *y = maybe_null(&r[2]);
      bad |= !x || !w || !y;
      snapshot();
      st =
          f16 ? kivi_model_linear_f16(ctx, x, w, rows, n, k, acc, y) : kivi_model_linear(ctx, x, w, rows, n, k, acc, y);
      break;
    }
    case 6: { /* fill_normal: out; a NaN mean or a negative std is refused */
      g_where = "kivi_model_fill_normal";
      const int32_t n = model_size(1, 64, KIVI_MAX_ELEMS - 1, &bad);
      float mean = 0.5f, std = 0.25f;
      if (chance(P_BAD)) {
        bad = 1;
        if (chance(0.5))
          mean = NAN;
        else
          std = -1.0f;
      }
      region q[1] = {{0, MB(2 * (int64_t)n)}};
      LAY_OUT(q);
      fill_canary(&r[0]);
      void *out = maybe_null(&r[0]);
      bad |= !out;
      snapshot();
      st = kivi_model_fill_normal(ctx, out, n, g_seed + (uint64_t)g_iter, mean, std);
      break;
    }
    case 3: { /* rope: x (in place), pos, cs */
      g_where = "kivi_model_rope";
      const int32_t heads = model_size(1, 3, KIVI_MODEL_MAX_DIM, &bad),
                    max_pos = model_size(1, 8, KIVI_MODEL_MAX_ROWS, &bad);
      int32_t dim = 2 * (int32_t)irange(1, 16);
      if (chance(P_BAD)) dim += 1, bad = 1; /* odd */
      region q[3] = {{0, MB(4 * rows * heads * dim)}, {0, MB(4 * rows)}, {0, MB(4 * max_pos * dim)}};
      LAY_OUT(q);
      if (!bad)
        fill_data(&r[0], KIVI_F32, (int64_t)rows * heads * dim), fill_ids(&r[1], rows, max_pos),
            fill_data(&r[2], KIVI_F32, (int64_t)max_pos * dim);
      else
        fill_canary(&r[0]);
      void *x = maybe_null(&r[0]), *pos = maybe_null(&r[1]), *cs = maybe_null(&r[2]);
      bad |= !x || !pos || !cs;
      snapshot();
      st = kivi_model_rope(ctx, x, rows, heads, dim, pos, cs, max_pos);
      break;
    }
    case 5: { /* attention: q, k, v, out */
      g_where = "kivi_model_attention";
      const int32_t batch = model_size(1, 2, KIVI_MODEL_MAX_DIM, &bad),
                    tokens = model_size(1, 8, KIVI_MODEL_MAX_TOKENS, &bad);
      const int32_t kvh = model_size(1, 2, 1024, &bad), hd = model_size(1, 16, 1024, &bad);
      int32_t qh = bad ? 2 : kvh * (int32_t)irange(1, 3);
      if (chance(P_BAD) && !bad && kvh > 1) qh += 1, bad = 1; /* not a multiple of kv_heads */
      const int64_t bt = (int64_t)batch * tokens;
      region q[4] = {
          {0, MB(4 * bt * qh * hd)}, {0, MB(4 * bt * kvh * hd)}, {0, MB(4 * bt * kvh * hd)}, {0, MB(4 * bt * qh * hd)}};
      LAY_OUT(q);
      fill_canary(&r[3]);
      if (!bad)
        fill_data(&r[0], KIVI_F32, bt * qh * hd), fill_data(&r[1], KIVI_F32, bt * kvh * hd),
            fill_data(&r[2], KIVI_F32, bt * kvh * hd);
      void *pq = maybe_null(&r[0]), *pk = maybe_null(&r[1]), *pv = maybe_null(&r[2]), *out = maybe_null(&r[3]);
      bad |= !pq || !pk || !pv || !out;
      snapshot();
      st = kivi_model_attention(ctx, pq, pk, pv, batch, tokens, qh, kvh, hd, 0.25f, out);
      break;
    }
    default: { /* log_softmax: x in place */
      g_where = "kivi_model_log_softmax";
      const int32_t n = model_size(1, 40, KIVI_MODEL_MAX_ROWS, &bad);
      region q[1] = {{0, MB(4 * rows * n)}};
      LAY_OUT(q);
      if (!bad)
        fill_data(&r[0], KIVI_F32, (int64_t)rows * n);
      else
        fill_canary(&r[0]);
      void *x = maybe_null(&r[0]);
      bad |= !x;
      snapshot();
      st = kivi_model_log_softmax(ctx, x, rows, n);
      break;
    }
  }
#undef MB
#undef LAY_OUT
  check_status(ctx, st, bad ? S(KIVI_ERR_ARG) : S_OK);
}

int main(int argc, char **argv) {
  g_seed = (uint64_t)env_int("KIVI_FUZZ_SEED", 1);
  int64_t iters = env_int("KIVI_FUZZ_ITERS", 4000);
  if (argc > 1) g_seed = strtoull(argv[1], NULL, 10);
  if (argc > 2) iters = strtoll(argv[2], NULL, 10);
  g_attend_alias = (int)env_int("KIVI_FUZZ_ATTEND_ALIAS", 1);
  rng_state = g_seed;
  arena = malloc(ARENA);
  shadow = malloc(ARENA);
  if (!arena || !shadow || kivi_ctx_create(0, &g_ctx) != KIVI_OK) {
    printf("FAIL: setup: %s\n", kivi_last_error());
    return 1;
  }
  memset(arena, 0x5a, ARENA);
  int64_t calls[6] = {0};
  for (g_iter = 0; g_iter < iters && n_fail < 40; g_iter++) {
    const double u = rng_unif();
    const int area = u < 0.05 ? 0 : u < 0.12 ? 1 : u < 0.22 ? 2 : u < 0.55 ? 3 : u < 0.62 ? 5 : 4;
    calls[area]++;
    switch (area) {
      case 0: fuzz_library(); break;
      case 1: fuzz_ctx(); break;
      case 2: fuzz_mem(); break;
      case 3: fuzz_quant(); break;
      case 5: fuzz_model(); break;
      default: fuzz_cache(); break;
    }
  }
  for (int i = 0; i < MAX_CACHES; i++) kivi_cache_destroy(g_caches[i].h);
  for (int i = 0; i < MAX_ALLOCS; i++) kivi_mem_free(g_ctx, g_allocs[i]);
  kivi_ctx_destroy(g_ctx);
  free(arena);
  free(shadow);
  printf(
      "fuzz_abi: seed %llu, %lld iterations (library %lld, context %lld, memory %lld, quantizers %lld, cache %lld; "
      "model ops %lld; %lld batches made, %lld deferred errors read)\n",
      (unsigned long long)g_seed, (long long)g_iter, (long long)calls[0], (long long)calls[1], (long long)calls[2],
      (long long)calls[3], (long long)calls[4], (long long)calls[5], (long long)g_batches, (long long)g_deferred);
  return check_summary();
}
