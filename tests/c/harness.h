/*
 * harness.h — what the C test drivers share: the check harness (CHECK counts a check and prints the
 * first failures with file, line, seed and where the driver is), the seeded generator (splitmix64,
 * uniform doubles, Box-Muller normals) and the byte size of a data dtype. Header-only: every driver
 * is one program.
 */
#ifndef KIVI_TEST_HARNESS_H
#define KIVI_TEST_HARNESS_H

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kivi.h"

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

#endif /* KIVI_TEST_HARNESS_H */
