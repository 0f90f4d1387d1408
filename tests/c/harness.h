/*
 * harness.h — what the C test drivers share: the check harness (CHECK counts a check and prints the
 * first failures with file, line, seed and where the driver is), the seeded generator (splitmix64,
 * uniform doubles, Box-Muller normals) and the byte size of a data dtype. Header-only: every driver
 * is one program.
 */
#ifndef KIVI_TEST_HARNESS_H
#define KIVI_TEST_HARNESS_H

#include <dlfcn.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kivi.h"
#include "kivi_format.h"

static uint64_t rng_state;
static inline uint64_t rng_next(void) {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static inline double rng_unif(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }
static inline double rng_normal(void) {
  double u = rng_unif(), v = rng_unif();
  if (u < 1e-300) u = 1e-300;
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static inline size_t dsize(kivi_dtype dt) { return dt == KIVI_F32 ? 4 : 2; }

/** Element i of x in dtype dt, written from / read as a float (the library's conversions). */
static inline void set_elem(void *x, kivi_dtype dt, int64_t i, float f) {
  if (dt == KIVI_F32)
    ((float *)x)[i] = f;
  else if (dt == KIVI_F16)
    ((uint16_t *)x)[i] = kivi_f32_to_f16(f);
  else
    ((uint16_t *)x)[i] = kivi_f32_to_bf16(f);
}
static inline float get_elem(const void *x, kivi_dtype dt, int64_t i) {
  if (dt == KIVI_F32) return ((const float *)x)[i];
  if (dt == KIVI_F16) return kivi_f16_to_f32(((const uint16_t *)x)[i]);
  return kivi_bf16_to_f32(((const uint16_t *)x)[i]);
}

/* ------------------------------------------------------------------ checks ---------------- */

static int n_pass, n_fail;
/** The run's seed, printed with every failure. */
static uint64_t g_seed;
/** Where the driver is (a case, an export), printed with a failure when not empty. */
static const char *g_where = "";
/** The iteration of a driver that loops (the fuzzer), printed with a failure when >= 0. */
static int64_t g_iter = -1;
/** Failures printed (the rest only counted). */
static int g_max_printed = 40;
/** Printed after a failure's message when set, e.g. kivi_last_error. */
static const char *(*g_last_error)(void);

/* One check: counted, and the first g_max_printed failures printed with where they happened. */
static inline void check_at(int ok, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static inline void check_at(int ok, const char *file, int line, const char *fmt, ...) {
  if (ok) {
    n_pass++;
    return;
  }
  if (++n_fail > g_max_printed) return;
  printf("FAIL %s:%d (seed %llu", file, line, (unsigned long long)g_seed);
  if (g_iter >= 0) printf(", iteration %lld", (long long)g_iter);
  if (g_where[0]) printf(", %s", g_where);
  printf("): ");
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  if (g_last_error) printf(" [last error: %s]", g_last_error());
  printf("\n");
}
#define CHECK(cond, ...) check_at((cond) != 0, __FILE__, __LINE__, __VA_ARGS__)

/** The last line of a run, which the test runner reads: "PASS: n passed, 0 failed"; the exit code. */
static inline int check_summary(void) {
  printf("%s: %d passed, %d failed\n", n_fail ? "FAIL" : "PASS", n_pass, n_fail);
  return n_fail ? 1 : 0;
}

/* ------------------------------------------------------------------ a driver's start ------ */

/**
 * Reads a driver's command line, `[seed] [flags...]`: returns a bitmask of the flags given (bit i for
 * flags[i]), sets g_seed (default `seed`) and the generator, and prints "<name> seed <n>".
 */
static inline unsigned harness_args(int argc, char **argv, const char *name, uint64_t seed, const char *const *flags,
                                    int nflags) {
  unsigned on = 0;
  g_seed = seed;
  for (int i = 1; i < argc; i++) {
    int f = 0;
    while (f < nflags && strcmp(argv[i], flags[f]) != 0) f++;
    if (f < nflags)
      on |= 1u << f;
    else
      g_seed = strtoull(argv[i], NULL, 10);
  }
  rng_state = g_seed;
  printf("%s seed %llu\n", name, (unsigned long long)g_seed);
  return on;
}

/** dlopen of a library the driver compares (GPU-vs-CPU drivers), or NULL after a line on stderr. */
static inline void *harness_dlopen(const char *path) {
  void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!h) fprintf(stderr, "FAIL dlopen %s: %s\n", path, dlerror());
  return h;
}

/** A context on device 0, or NULL after a FAIL line. */
static inline kivi_ctx_t harness_ctx(void) {
  kivi_ctx_t ctx = NULL;
  if (kivi_ctx_create(0, &ctx) != KIVI_OK) {
    printf("FAIL: ctx_create: %s\n", kivi_last_error());
    return NULL;
  }
  return ctx;
}

#endif /* KIVI_TEST_HARNESS_H */
