/*
 * seq_smoke.c — C smoke test of the sequence operations of the CPU reference build (kivi_seq.h's rules):
 * truncate, fork (shared pages, reference counted), multi-token attention and the merge, with their
 * error paths. Run under AddressSanitizer / UBSan and valgrind by tests/sanitizers_test.ts.
 *
 *   gcc -std=c11 -O1 -g -Wall -Wextra -Icuda/include $(ls cuda/cpu/[a-z]*.c) tests/c/seq_smoke.c -lm -o build/seq_smoke
 *   build/seq_smoke [seed]
 *
 * Checks: a fork reads as its parent and shares the parent's full pages (and only those); appends to
 * either never show in the other (each equals a sequence fed the same tokens); pages go back when the
 * last owner frees them; multi-token attention equals a double causal softmax over kivi_cache_read's
 * K and V; qlens of 1 equal kivi_cache_attend; the merge of two key ranges equals the whole.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"
#include "kivi.h"

enum { L = 2, H = 2, QH = 4, D = 64, ROW = H * D, P = 64 };

static kivi_cache_t make_cache(kivi_ctx_t ctx, int32_t pages, int32_t seqs) {
  const int32_t cfg[KIVI_CFG_FIELDS] = {
      L, H, QH, D, P, 32, pages, seqs, KIVI_KIND_UNIFORM, 2, 32, 0, 8, KIVI_KIND_CODEBOOK, 2, 32, 0, 8};
  kivi_cache_t c = NULL;
  CHECK(kivi_cache_create(ctx, cfg, KIVI_CFG_FIELDS, &c) == KIVI_OK, "create");
  return c;
}

/* n seeded tokens into every layer of seq (the same draws for the same rng state). */
static void feed(kivi_cache_t c, int32_t seq, int32_t n) {
  float *k = malloc(sizeof(float) * (size_t)L * n * ROW), *v = malloc(sizeof(float) * (size_t)L * n * ROW);
  for (int64_t i = 0; i < (int64_t)L * n * ROW; i++) {
    k[i] = (float)rng_normal();
    v[i] = (float)rng_normal();
  }
  CHECK(kivi_cache_append(c, seq, -1, k, v, KIVI_F32, n, 0) == KIVI_OK, "append %d", n);
  free(k);
  free(v);
}

static int64_t len_of(kivi_cache_t c, int32_t s, int32_t l, int64_t *q) {
  int64_t n = -1, qq = -1;
  CHECK(kivi_cache_seq_length(c, s, l, &n, &qq) == KIVI_OK, "length");
  if (q) *q = qq;
  return n;
}

/* read() of two sequences equal in every layer */
static int same(kivi_cache_t c, int32_t a, int32_t b) {
  int ok = 1;
  for (int32_t l = 0; l < L; l++) {
    const int64_t n = len_of(c, a, l, NULL);
    if (n != len_of(c, b, l, NULL)) return 0;
    float *x = malloc(sizeof(float) * (size_t)(4 * n * ROW + 4));
    CHECK(kivi_cache_read(c, a, l, x, x + n * ROW, KIVI_F32) == KIVI_OK, "read");
    CHECK(kivi_cache_read(c, b, l, x + 2 * n * ROW, x + 3 * n * ROW, KIVI_F32) == KIVI_OK, "read");
    ok = ok && memcmp(x, x + 2 * n * ROW, sizeof(float) * (size_t)(2 * n * ROW)) == 0;
    free(x);
  }
  return ok;
}

static uint64_t pages_used(kivi_cache_t c) {
  uint64_t r[KIVI_MEM_FIELDS];
  CHECK(kivi_cache_memory(c, r, KIVI_MEM_FIELDS) == KIVI_OK, "memory");
  return r[KIVI_MEM_PAGES_USED];
}

static void test_fork_truncate(kivi_ctx_t ctx) {
  g_where = "fork / truncate";
  kivi_cache_t c = make_cache(ctx, 32, 8);
  int32_t a, b, b2, twin;
  CHECK(kivi_cache_seq_create(c, &a) == KIVI_OK, "seq");
  const uint64_t s0 = rng_state;
  feed(c, a, 150); /* quantized 96: page 0 full, page 1 half */
  CHECK(pages_used(c) == 2, "2 pages");
  CHECK(kivi_cache_seq_fork(c, a, &b) == KIVI_OK, "fork");
  CHECK(pages_used(c) == 3, "a fork costs the half page: %llu", (unsigned long long)pages_used(c));
  int32_t pa[8], pb[8], na, nb;
  kivi_cache_seq_pages(c, a, pa, 8, &na);
  kivi_cache_seq_pages(c, b, pb, 8, &nb);
  CHECK(na == 2 && nb == 2 && pa[0] == pb[0] && pa[1] != pb[1], "page 0 shared, page 1 copied");
  CHECK(same(c, a, b), "the fork reads as its parent");
  feed(c, b, 77);
  CHECK(kivi_cache_seq_fork(c, b, &b2) == KIVI_OK, "fork of a fork");
  const uint64_t s1 = rng_state;
  feed(c, a, 40);
  /* a twin fed a's tokens from scratch holds what a holds: b's appends never reached a's pages */
  CHECK(kivi_cache_seq_create(c, &twin) == KIVI_OK, "seq");
  const uint64_t s2 = rng_state;
  rng_state = s0;
  feed(c, twin, 150);
  rng_state = s1;
  feed(c, twin, 40);
  rng_state = s2;
  CHECK(same(c, a, twin), "the parent holds its own tokens only");
  CHECK(kivi_cache_seq_free(c, twin) == KIVI_OK, "free twin");
  CHECK(same(c, b, b2), "a fork of a fork reads as its parent");
  /* truncate: to the window's edge, then below it (refused) */
  int64_t q;
  const int64_t n = len_of(c, a, 0, &q);
  CHECK(kivi_cache_seq_truncate(c, a, n + 1) == KIVI_ERR_ARG, "above the length");
  CHECK(kivi_cache_seq_truncate(c, a, q - 1) == KIVI_ERR_ARG, "below the window");
  CHECK(kivi_cache_seq_truncate(c, a, -1) == KIVI_ERR_ARG, "negative");
  CHECK(len_of(c, a, 1, NULL) == n, "refused: unchanged");
  CHECK(kivi_cache_seq_truncate(c, a, q) == KIVI_OK, "to the window's edge");
  CHECK(len_of(c, a, 0, NULL) == q && len_of(c, a, 1, NULL) == q, "truncated");
  /* frees in any order: the pool empties when the last owner goes */
  CHECK(kivi_cache_seq_free(c, a) == KIVI_OK, "free a");
  CHECK(same(c, b, b2) || len_of(c, b, 0, NULL) != len_of(c, b2, 0, NULL), "b unaffected");
  CHECK(kivi_cache_seq_free(c, b) == KIVI_OK && kivi_cache_seq_free(c, b2) == KIVI_OK, "free");
  CHECK(pages_used(c) == 0, "every page back: %llu", (unsigned long long)pages_used(c));
  /* errors */
  CHECK(kivi_cache_seq_fork(c, a, &b) == KIVI_ERR_STATE, "fork of a freed sequence");
  CHECK(kivi_cache_seq_fork(NULL, 0, &b) == KIVI_ERR_ARG, "NULL cache");
  CHECK(kivi_cache_seq_create(c, &a) == KIVI_OK, "seq");
  CHECK(kivi_cache_seq_fork(c, a, NULL) == KIVI_ERR_ARG, "NULL child");
  CHECK(kivi_cache_seq_truncate(c, 99, 0) == KIVI_ERR_ARG, "seq out of range");
  kivi_cache_destroy(c);
  /* a pool too small for the copy, and no slot */
  c = make_cache(ctx, 2, 2);
  CHECK(kivi_cache_seq_create(c, &a) == KIVI_OK, "seq");
  feed(c, a, 150);
  CHECK(kivi_cache_seq_fork(c, a, &b) == KIVI_ERR_CAPACITY, "pool exhausted");
  CHECK(pages_used(c) == 2, "unchanged");
  CHECK(kivi_cache_seq_truncate(c, a, 100) == KIVI_OK, "truncate");
  int32_t x;
  CHECK(kivi_cache_seq_create(c, &x) == KIVI_OK, "seq");
  CHECK(kivi_cache_seq_fork(c, x, &b) == KIVI_ERR_CAPACITY, "no slot");
  kivi_cache_destroy(c);
  g_where = "";
}

static void test_multi(kivi_ctx_t ctx) {
  g_where = "attend_multi / merge";
  kivi_cache_t c = make_cache(ctx, 64, 4);
  int32_t s[3];
  const int32_t lens[3] = {9, 200, 70}, qlens[3] = {9, 13, 1};
  for (int i = 0; i < 3; i++) {
    CHECK(kivi_cache_seq_create(c, &s[i]) == KIVI_OK, "seq");
    feed(c, s[i], lens[i]);
  }
  const int64_t T = 23;
  float *q = malloc(sizeof(float) * T * QH * D), *out = malloc(sizeof(float) * T * QH * D);
  float *lse = malloc(sizeof(float) * T * QH);
  for (int64_t i = 0; i < T * QH * D; i++) q[i] = (float)rng_normal();
  const float scale = 0.125f;
  CHECK(kivi_cache_attend_multi(c, 1, s, qlens, 3, T, q, KIVI_F32, scale, 0, out, KIVI_F32, lse) == KIVI_OK, "multi");
  int64_t t0 = 0;
  double worst = 0;
  for (int b = 0; b < 3; b++) {
    const int64_t n = lens[b];
    float *k = malloc(sizeof(float) * n * ROW), *v = malloc(sizeof(float) * n * ROW);
    CHECK(kivi_cache_read(c, s[b], 1, k, v, KIVI_F32) == KIVI_OK, "read");
    for (int32_t i = 0; i < qlens[b]; i++)
      for (int32_t h = 0; h < QH; h++) {
        const int64_t see = n - qlens[b] + i + 1, qo = ((t0 + i) * QH + h) * D;
        double m = -INFINITY, sum = 0, acc[D] = {0}, sc[256];
        for (int64_t t = 0; t < see; t++) {
          double d = 0;
          for (int32_t j = 0; j < D; j++) d += (double)q[qo + j] * k[(t * H + h / 2) * D + j];
          sc[t] = d * scale;
          m = sc[t] > m ? sc[t] : m;
        }
        for (int64_t t = 0; t < see; t++) {
          const double w = exp(sc[t] - m);
          sum += w;
          for (int32_t j = 0; j < D; j++) acc[j] += w * v[(t * H + h / 2) * D + j];
        }
        for (int32_t j = 0; j < D; j++) worst = fmax(worst, fabs(acc[j] / sum - out[qo + j]));
        worst = fmax(worst, fabs(m + log(sum) - lse[(t0 + i) * QH + h]) / (1 + fabs(m + log(sum))));
      }
    t0 += qlens[b];
    free(k);
    free(v);
  }
  CHECK(worst < 1e-5, "multi against the double oracle: %g", worst);
  /* qlens of 1 give kivi_cache_attend */
  const int32_t ones[3] = {1, 1, 1};
  float *o2 = malloc(sizeof(float) * 3 * QH * D);
  CHECK(kivi_cache_attend_multi(c, 0, s, ones, 3, 3, q, KIVI_F32, scale, 0, out, KIVI_F32, NULL) == KIVI_OK, "ones");
  CHECK(kivi_cache_attend(c, 0, s, 3, q, KIVI_F32, scale, 0, o2, KIVI_F32) == KIVI_OK, "attend");
  double w1 = 0;
  for (int64_t i = 0; i < 3 * QH * D; i++) w1 = fmax(w1, fabs(out[i] - o2[i]));
  CHECK(w1 < 1e-6, "qlens of 1 vs attend: %g", w1);
  /* errors, nothing written */
  const float sentinel = 12345.0f;
  for (int64_t i = 0; i < T * QH * D; i++) out[i] = sentinel;
  const int32_t big[3] = {10, 1, 1}, zero[3] = {0, 1, 1};
  CHECK(kivi_cache_attend_multi(c, 0, s, big, 3, 12, q, KIVI_F32, scale, 0, out, KIVI_F32, NULL) == KIVI_ERR_ARG,
        "qlen over the length");
  CHECK(kivi_cache_attend_multi(c, 0, s, zero, 3, 2, q, KIVI_F32, scale, 0, out, KIVI_F32, NULL) == KIVI_ERR_ARG,
        "qlen 0");
  CHECK(kivi_cache_attend_multi(c, 0, s, qlens, 3, 22, q, KIVI_F32, scale, 0, out, KIVI_F32, NULL) == KIVI_ERR_SHAPE,
        "tokens not the sum");
  CHECK(kivi_cache_attend_multi(c, 0, s, NULL, 3, 23, q, KIVI_F32, scale, 0, out, KIVI_F32, NULL) == KIVI_ERR_ARG,
        "NULL qlens");
  CHECK(kivi_cache_attend_multi(c, 2, s, qlens, 3, 23, q, KIVI_F32, scale, 0, out, KIVI_F32, NULL) == KIVI_ERR_ARG,
        "layer");
  q[5] = NAN;
  CHECK(
      kivi_cache_attend_multi(c, 0, s, qlens, 3, 23, q, KIVI_F32, scale, 0, out, KIVI_F32, NULL) == KIVI_ERR_NONFINITE,
      "NaN q");
  int untouched = 1;
  for (int64_t i = 0; i < T * QH * D; i++) untouched = untouched && out[i] == sentinel;
  CHECK(untouched, "a refused call wrote out");
  /* merge: two halves of one row set equal the whole */
  float parts[2 * 2 * D], pl[4], mo[2 * D], ml[2];
  for (int i = 0; i < 4 * D; i++) parts[i] = (float)rng_normal();
  for (int i = 0; i < 4; i++) pl[i] = (float)rng_normal();
  pl[3] = -INFINITY;
  CHECK(kivi_attention_merge(ctx, 2, 2, D, parts, pl, mo, ml) == KIVI_OK, "merge");
  const double w0 = 1 / (1 + exp((double)pl[2] - pl[0]));
  CHECK(fabs(mo[0] - (w0 * parts[0] + (1 - w0) * parts[2 * D])) < 1e-5, "merge row 0");
  CHECK(mo[D] == parts[D] && ml[1] == pl[1], "an empty part adds nothing");
  CHECK(kivi_attention_merge(ctx, 0, 2, D, parts, pl, mo, ml) == KIVI_ERR_ARG, "parts 0");
  CHECK(kivi_attention_merge(ctx, 2, 2, D, NULL, pl, mo, ml) == KIVI_ERR_ARG, "NULL outs");
  free(q);
  free(out);
  free(lse);
  free(o2);
  kivi_cache_destroy(c);
  g_where = "";
}

int main(int argc, char **argv) {
  harness_args(argc, argv, "seq_smoke", 20261202ull, NULL, 0);
  g_last_error = kivi_last_error;
  kivi_ctx_t ctx = harness_ctx();
  if (!ctx) return 1;
  test_fork_truncate(ctx);
  test_multi(ctx);
  kivi_ctx_destroy(ctx);
  return check_summary();
}
