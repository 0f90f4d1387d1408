/*
 * test_rng.h — the seeded generator shared by the C test drivers (splitmix64, uniform doubles,
 * Box-Muller normals) and the byte size of a data dtype. Header-only: every driver is one program.
 */
#ifndef KIVI_TEST_RNG_H
#define KIVI_TEST_RNG_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "kivi.h"

static uint64_t rng_state;
static uint64_t rng_next(void) {
  uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}
static double rng_unif(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_normal(void) {
  double u = rng_unif(), v = rng_unif();
  if (u < 1e-300) u = 1e-300;
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static size_t dsize(kivi_dtype dt) { return dt == KIVI_F32 ? 4 : 2; }

#endif /* KIVI_TEST_RNG_H */
