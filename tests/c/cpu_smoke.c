/*
 * cpu_smoke.c — C smoke test of the CPU reference build (build/libkivi_cpu.so).
 *
 *   gcc -std=c11 -O1 -g -Wall -Wextra -Icuda/include tests/c/cpu_smoke.c -Lbuild -lkivi_cpu -lm -o build/cpu_smoke
 *   LD_LIBRARY_PATH=build build/cpu_smoke [seed] [--quick]
 *
 * Seeded random inputs of awkward sizes in f32 / f16 / bf16; the expected codes and layouts are
 * recomputed here element by element from kivi_format.h (an independent walk over the matrix),
 * tolerances come from fp16 rounding of the stored parameters. Prints PASS/FAIL counts.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kivi.h"
#include "kivi_format.h"
#include "harness.h"

/* ---------------------------------------------------------------- rng / data ------------- */

static const char *dname(kivi_dtype dt) { return dt == KIVI_F32 ? "f32" : dt == KIVI_F16 ? "f16" : "bf16"; }

/* x in dtype, plus xf = the same values as floats (rounded through dtype). Some columns are outliers,
   some groups constant, values never all zero. */
static void *make_input(kivi_dtype dt, int64_t rows, int64_t cols, float **xf_out) {
  int64_t n = rows * cols;
  void *x = malloc((size_t)n * dsize(dt));
  float *xf = malloc((size_t)n * sizeof(float));
  for (int64_t i = 0; i < n; i++) {
    int64_t c = i % cols;
    double v = rng_normal() * (c % 7 == 3 ? 8.0 : 1.0) + (c % 5 == 1 ? 2.5 : 0.0);
    float f = (float)v;
    if (dt == KIVI_F32) {
      ((float *)x)[i] = f;
      xf[i] = f;
    } else if (dt == KIVI_F16) {
      uint16_t h = kivi_f32_to_f16(f);
      ((uint16_t *)x)[i] = h;
      xf[i] = kivi_f16_to_f32(h);
    } else {
      uint16_t h = kivi_f32_to_bf16(f);
      ((uint16_t *)x)[i] = h;
      xf[i] = kivi_bf16_to_f32(h);
    }
  }
  *xf_out = xf;
  return x;
}

/* Makes group 0 constant (every value equal to the group's first). */
static void make_group0_constant(void *x, float *xf, kivi_dtype dt, int64_t rows, int64_t cols, kivi_axis axis,
                                 int32_t G) {
  (void)rows;
  float v = xf[0];
  for (int32_t k = 0; k < G; k++) {
    int64_t i = axis == KIVI_AXIS_TOKEN ? (int64_t)k * cols : k;
    set_elem(x, dt, i, v);
    xf[i] = v;
  }
}

static uint32_t code_at(const uint32_t *codes, int64_t r, int64_t c, int64_t rows, int64_t cols, kivi_axis axis,
                        int32_t bits) {
  int32_t slot;
  int64_t w = kivi_word_of(r, c, rows, cols, axis, bits, &slot);
  return kivi_word_get(codes[w], slot, bits);
}

/* Values of group g, in axis order, from xf. */
static void group_values(const float *xf, int64_t rows, int64_t cols, kivi_axis axis, int32_t G, int64_t g, float *v,
                         int64_t *idx) {
  for (int32_t k = 0; k < G; k++) {
    int64_t r, c;
    if (axis == KIVI_AXIS_TOKEN) {
      c = g / (rows / G);
      r = (g % (rows / G)) * G + k;
    } else {
      r = g / (cols / G);
      c = (g % (cols / G)) * G + k;
    }
    if (idx) idx[k] = r * cols + c;
    v[k] = xf[r * cols + c];
  }
}

/* ---------------------------------------------------------------- tests ------------------ */

typedef struct cfg {
  int64_t rows, cols;
  kivi_axis axis;
  int32_t group, bits;
  kivi_dtype dtype;
} cfg;

static void test_uniform(kivi_ctx_t ctx, cfg k) {
  const int64_t n = k.rows * k.cols, groups = kivi_group_count(k.rows, k.cols, k.axis, k.group);
  const int64_t words = kivi_word_count(k.rows, k.cols, k.bits);
  float *xf;
  void *x = make_input(k.dtype, k.rows, k.cols, &xf);
  make_group0_constant(x, xf, k.dtype, k.rows, k.cols, k.axis, k.group);
  uint32_t *codes = malloc(words * 4);
  uint16_t *scale = malloc(groups * 2), *zero = malloc(groups * 2);
  float *out = malloc(n * 4);
  uint16_t *out16 = malloc(n * 2);
  kivi_status st =
      kivi_uniform_quantize(ctx, x, k.dtype, k.rows, k.cols, k.axis, k.group, k.bits, 0, codes, scale, zero);
  CHECK(st == KIVI_OK, "uniform_quantize %s: %s", dname(k.dtype), kivi_last_error());
  st = kivi_uniform_dequantize(ctx, codes, scale, zero, k.rows, k.cols, k.axis, k.group, k.bits, out, KIVI_F32);
  CHECK(st == KIVI_OK, "uniform_dequantize: %s", kivi_last_error());
  st = kivi_uniform_dequantize(ctx, codes, scale, zero, k.rows, k.cols, k.axis, k.group, k.bits, out16, KIVI_F16);
  CHECK(st == KIVI_OK, "uniform_dequantize f16: %s", kivi_last_error());

  const int32_t top = (1 << k.bits) - 1, G = k.group;
  float v[128];
  int64_t idx[128];
  int bad_params = 0, bad_codes = 0, bad_err = 0, bad_deq = 0, nan_out = 0;
  for (int64_t g = 0; g < groups; g++) {
    group_values(xf, k.rows, k.cols, k.axis, G, g, v, idx);
    float mn = v[0], mx = v[0];
    for (int32_t i = 1; i < G; i++) {
      mn = fminf(mn, v[i]);
      mx = fmaxf(mx, v[i]);
    }
    uint16_t sh, zh;
    kivi_uniform_params(mn, mx, k.bits, &sh, &zh);
    if (sh != scale[g] || zh != zero[g]) bad_params++;
    float s = kivi_f16_to_f32(sh), z = kivi_f16_to_f32(zh);
    double s_true = ((double)mx - mn) / top;
    double bound =
        s / 2.0 + fabs((double)mn - z) + top * fabs(s_true - s) + 8 * FLT_EPSILON * (fabs(mx) + fabs(mn) + s);
    for (int32_t i = 0; i < G; i++) {
      int64_t r = idx[i] / k.cols, c = idx[i] % k.cols;
      uint32_t q = code_at(codes, r, c, k.rows, k.cols, k.axis, k.bits);
      if (q != kivi_uniform_code(v[i], z, s, k.bits)) bad_codes++;
      float d = out[idx[i]];
      if (d != kivi_uniform_value(q, z, s)) bad_deq++;
      if (out16[idx[i]] != kivi_f32_to_f16(d)) bad_deq++;
      if (isnan(d)) nan_out++;
      if (fabs((double)d - v[i]) > bound) bad_err++;
    }
    if (g == 0) { /* constant group: exact (scale 0) where fp16 holds the constant, else one code within s / 2 */
      if (kivi_f16_to_f32(kivi_f32_to_f16(v[0])) == v[0]) {
        CHECK(scale[0] == 0 || scale[0] == 0x8000, "constant group scale %04x", scale[0]);
        for (int32_t i = 0; i < G; i++) CHECK(out[idx[i]] == z, "constant group dequant %g != %g", out[idx[i]], z);
      } else {
        for (int32_t i = 0; i < G; i++)
          CHECK(out[idx[i]] == out[idx[0]] && fabs((double)out[idx[i]] - v[0]) <= s / 2.0 + FLT_EPSILON * fabs(v[0]),
                "constant group %g dequant %g, scale %g", v[0], out[idx[i]], s);
      }
    }
  }
  CHECK(bad_params == 0, "uniform %s axis %d G %d b %d: %d groups with wrong params", dname(k.dtype), k.axis, G, k.bits,
        bad_params);
  CHECK(bad_codes == 0, "uniform %s axis %d G %d b %d: %d wrong codes", dname(k.dtype), k.axis, G, k.bits, bad_codes);
  CHECK(bad_deq == 0, "uniform dequant: %d values differ from fmaf(q, s, z)", bad_deq);
  CHECK(bad_err == 0, "uniform %s: %d values outside scale/2 + slack", dname(k.dtype), bad_err);
  CHECK(nan_out == 0, "uniform dequant: %d NaN", nan_out);

  /* the trusted path gives the same result on finite data */
  uint32_t *codes2 = malloc(words * 4);
  uint16_t *scale2 = malloc(groups * 2), *zero2 = malloc(groups * 2);
  st = kivi_uniform_quantize(ctx, x, k.dtype, k.rows, k.cols, k.axis, k.group, k.bits, KIVI_FLAG_TRUSTED, codes2,
                             scale2, zero2);
  CHECK(st == KIVI_OK && !memcmp(codes, codes2, words * 4) && !memcmp(scale, scale2, groups * 2) &&
            !memcmp(zero, zero2, groups * 2),
        "trusted quantize differs");
  free(codes2), free(scale2), free(zero2);
  free(x), free(xf), free(codes), free(scale), free(zero), free(out), free(out16);
}

/* SSE of group g for a dequantized matrix d against xf (double). */
static double group_sse(const float *xf, const float *d, cfg k, int64_t g) {
  float v[128];
  int64_t idx[128];
  group_values(xf, k.rows, k.cols, k.axis, k.group, g, v, idx);
  double s = 0;
  for (int32_t i = 0; i < k.group; i++) {
    double e = (double)v[i] - d[idx[i]];
    s += e * e;
  }
  return s;
}

static void test_codebook(kivi_ctx_t ctx, cfg k, kivi_fit fit) {
  const int64_t n = k.rows * k.cols, groups = kivi_group_count(k.rows, k.cols, k.axis, k.group);
  const int64_t words = kivi_word_count(k.rows, k.cols, k.bits);
  const int32_t L = 1 << k.bits, G = k.group, max_iters = 25;
  float *xf;
  void *x = make_input(k.dtype, k.rows, k.cols, &xf);
  make_group0_constant(x, xf, k.dtype, k.rows, k.cols, k.axis, k.group);
  uint16_t *cent = malloc(groups * L * 2), *cent2 = malloc(groups * L * 2);
  int32_t *iters = malloc(groups * 4);
  float *inertia = malloc(groups * (max_iters + 1) * 4);
  uint32_t *codes = malloc(words * 4), *codes2 = malloc(words * 4), *ucodes = malloc(words * 4);
  uint16_t *scale = malloc(groups * 2), *zero = malloc(groups * 2);
  float *d_cb = malloc(n * 4), *d_un = malloc(n * 4);

  kivi_status st =
      kivi_codebook_fit(ctx, x, k.dtype, k.rows, k.cols, k.axis, G, k.bits, fit, max_iters, 0, cent, iters, inertia);
  CHECK(st == KIVI_OK, "codebook_fit: %s", kivi_last_error());
  int bad_sorted = 0, bad_trace = 0, bad_iters = 0, bad_pin = 0;
  float v[128];
  for (int64_t g = 0; g < groups; g++) {
    for (int32_t j = 1; j < L; j++)
      if (kivi_f16_to_f32(cent[g * L + j]) < kivi_f16_to_f32(cent[g * L + j - 1])) bad_sorted++;
    const float *tr = inertia + g * (max_iters + 1);
    for (int32_t j = 1; j <= max_iters; j++)
      if (tr[j] > tr[j - 1]) bad_trace++;
    if (iters[g] < 1 || iters[g] > max_iters) bad_iters++;
    for (int32_t j = iters[g]; j <= max_iters; j++)
      if (iters[g] >= 1 && iters[g] <= max_iters && tr[j] != tr[iters[g]]) bad_trace++;
    if (fit == KIVI_FIT_PINNED) {
      group_values(xf, k.rows, k.cols, k.axis, G, g, v, NULL);
      float mn = v[0], mx = v[0];
      for (int32_t i = 1; i < G; i++) mn = fminf(mn, v[i]), mx = fmaxf(mx, v[i]);
      if (cent[g * L] != kivi_f32_to_f16(mn) || cent[g * L + L - 1] != kivi_f32_to_f16(mx)) bad_pin++;
    }
  }
  CHECK(bad_sorted == 0, "codebook centroids not sorted in %d places", bad_sorted);
  CHECK(bad_trace == 0, "codebook inertia trace increases / not repeated in %d places", bad_trace);
  CHECK(bad_iters == 0, "codebook iters out of 1..max_iters in %d groups", bad_iters);
  CHECK(bad_pin == 0, "pinned fit moved the outer centroids in %d groups", bad_pin);
  CHECK(iters[0] == 1 && inertia[0] == 0.0f, "constant group: iters %d inertia %g", iters[0], inertia[0]);

  for (int a = 0; a < 2; a++) {
    kivi_assign assign = a ? KIVI_ASSIGN_INTERVAL : KIVI_ASSIGN_NEAREST;
    st = kivi_codebook_quantize(ctx, x, k.dtype, k.rows, k.cols, k.axis, G, k.bits, cent, assign, 0, codes);
    CHECK(st == KIVI_OK, "codebook_quantize: %s", kivi_last_error());
    st = kivi_codebook_encode(ctx, x, k.dtype, k.rows, k.cols, k.axis, G, k.bits, fit, max_iters, assign, 0, cent2,
                              codes2);
    CHECK(st == KIVI_OK, "codebook_encode: %s", kivi_last_error());
    CHECK(!memcmp(cent, cent2, groups * L * 2), "encode centroids differ from fit");
    CHECK(!memcmp(codes, codes2, words * 4), "encode codes differ from quantize (assign %d)", assign);
    /* codes = the header's formula on the fp16 centroids, at the documented positions */
    int bad_codes = 0, bad_deq = 0;
    st = kivi_codebook_dequantize(ctx, codes, cent, k.rows, k.cols, k.axis, G, k.bits, d_cb, KIVI_F32);
    CHECK(st == KIVI_OK, "codebook_dequantize: %s", kivi_last_error());
    for (int64_t r = 0; r < k.rows; r++)
      for (int64_t c = 0; c < k.cols; c++) {
        int64_t g = kivi_group_of(r, c, k.rows, k.cols, k.axis, G);
        float cf[16];
        for (int32_t j = 0; j < L; j++) cf[j] = kivi_f16_to_f32(cent[g * L + j]);
        float xv = xf[r * k.cols + c];
        uint32_t want = assign ? kivi_interval_code(xv, cf, L) : kivi_nearest_code(xv, cf, L);
        uint32_t q = code_at(codes, r, c, k.rows, k.cols, k.axis, k.bits);
        if (q != want) bad_codes++;
        if (d_cb[r * k.cols + c] != cf[q]) bad_deq++;
      }
    CHECK(bad_codes == 0, "codebook codes (assign %d) wrong: %d", assign, bad_codes);
    CHECK(bad_deq == 0, "codebook dequant wrong: %d", bad_deq);
  }

  /* codebook (nearest) SSE <= uniform SSE per group, up to fp16 rounding of the parameters:
     sqrt(SSE_cb) <= sqrt(SSE_un) + sqrt(G) * 5 * 2^-11 * max|x| */
  st = kivi_codebook_quantize(ctx, x, k.dtype, k.rows, k.cols, k.axis, G, k.bits, cent, KIVI_ASSIGN_NEAREST, 0, codes);
  st |= kivi_codebook_dequantize(ctx, codes, cent, k.rows, k.cols, k.axis, G, k.bits, d_cb, KIVI_F32);
  st |= kivi_uniform_quantize(ctx, x, k.dtype, k.rows, k.cols, k.axis, G, k.bits, 0, ucodes, scale, zero);
  st |= kivi_uniform_dequantize(ctx, ucodes, scale, zero, k.rows, k.cols, k.axis, G, k.bits, d_un, KIVI_F32);
  CHECK(st == KIVI_OK, "codebook vs uniform calls: %s", kivi_last_error());
  int worse = 0;
  double tot_cb = 0, tot_un = 0;
  for (int64_t g = 0; g < groups; g++) {
    group_values(xf, k.rows, k.cols, k.axis, G, g, v, NULL);
    float m = 0;
    for (int32_t i = 0; i < G; i++) m = fmaxf(m, fabsf(v[i]));
    double a = group_sse(xf, d_cb, k, g), b = group_sse(xf, d_un, k, g);
    tot_cb += a, tot_un += b;
    if (sqrt(a) > sqrt(b) + sqrt((double)G) * 5.0 * ldexp(1.0, -11) * m) worse++;
  }
  CHECK(worse == 0, "codebook (fit %d) SSE above uniform in %d of %lld groups", fit, worse, (long long)groups);
  CHECK(tot_cb < tot_un, "codebook total SSE %g not below uniform %g", tot_cb, tot_un);

  free(x), free(xf), free(cent), free(cent2), free(iters), free(inertia), free(codes), free(codes2), free(ucodes);
  free(scale), free(zero), free(d_cb), free(d_un);
}

static void test_stats(kivi_ctx_t ctx, cfg k) {
  const int64_t groups = kivi_group_count(k.rows, k.cols, k.axis, k.group);
  float *xf;
  void *x = make_input(k.dtype, k.rows, k.cols, &xf);
  /* a NaN and an Inf in group 1 (which then has group - 2 finite values) */
  float v[128];
  int64_t idx[128];
  group_values(xf, k.rows, k.cols, k.axis, k.group, 1, v, idx);
  set_elem(x, k.dtype, idx[3], NAN);
  set_elem(x, k.dtype, idx[7], -INFINITY);
  xf[idx[3]] = get_elem(x, k.dtype, idx[3]);
  xf[idx[7]] = get_elem(x, k.dtype, idx[7]);
  float *stats = malloc(groups * 16);
  int32_t *nf = malloc(groups * 4);
  kivi_status st = kivi_stats_block(ctx, x, k.dtype, k.rows, k.cols, k.axis, k.group, stats, nf);
  CHECK(st == KIVI_OK, "stats_block: %s", kivi_last_error());
  int bad = 0;
  for (int64_t g = 0; g < groups; g++) {
    group_values(xf, k.rows, k.cols, k.axis, k.group, g, v, NULL);
    double sum = 0, mn = INFINITY, mx = -INFINITY;
    int cnt = 0, nonf = 0;
    for (int32_t i = 0; i < k.group; i++) {
      if (!isfinite(v[i])) {
        nonf++;
        continue;
      }
      sum += v[i], cnt++;
      mn = fmin(mn, v[i]), mx = fmax(mx, v[i]);
    }
    double mean = sum / cnt, var = 0;
    for (int32_t i = 0; i < k.group; i++)
      if (isfinite(v[i])) var += (v[i] - mean) * (v[i] - mean);
    var /= cnt;
    const float *s = stats + 4 * g;
    if (s[0] != (float)mn || s[1] != (float)mx || fabs(s[2] - mean) > 1e-5 * (1 + fabs(mean)) ||
        fabs(s[3] - var) > 1e-5 * (1 + var) || nf[g] != nonf)
      bad++;
  }
  CHECK(bad == 0, "stats wrong in %d groups", bad);
  CHECK(nf[1] == 2, "stats nonfinite[1] = %d", nf[1]);
  free(x), free(xf), free(stats), free(nf);
}

static void test_pack(kivi_ctx_t ctx) {
  for (int32_t bits = 2; bits <= 4; bits += 2) {
    const int64_t n = 16 * 37;
    uint8_t *c = malloc(n), *c2 = malloc(n);
    uint32_t *w = malloc(n / (32 / bits) * 4);
    for (int64_t i = 0; i < n; i++) c[i] = (uint8_t)(rng_next() % (1u << bits));
    CHECK(kivi_codes_pack(ctx, c, n, bits, w) == KIVI_OK, "pack: %s", kivi_last_error());
    int bad = 0;
    for (int64_t i = 0; i < n; i++)
      if (kivi_word_get(w[i / (32 / bits)], (int32_t)(i % (32 / bits)), bits) != c[i]) bad++;
    CHECK(bad == 0, "pack layout wrong at %d codes (bits %d)", bad, bits);
    CHECK(kivi_codes_unpack(ctx, w, n, bits, c2) == KIVI_OK && !memcmp(c, c2, n), "unpack round trip (bits %d)", bits);
    free(c), free(c2), free(w);
  }
}

/* The seed's worked example: centroids [0, 1, 4, 6], data [0.1 .. 5.9] repeated to fill a group. */
static void test_worked_example(kivi_ctx_t ctx) {
  static const float data[8] = {0.1f, 0.5f, 1.2f, 2.5f, 3.8f, 4.2f, 5.1f, 5.9f};
  static const uint32_t want_iv[8] = {0, 0, 1, 1, 1, 2, 2, 2}, want_nn[8] = {0, 1, 1, 2, 2, 2, 3, 3};
  float x[32], out[32];
  for (int i = 0; i < 32; i++) x[i] = data[i % 8];
  uint16_t cent[4] = {kivi_f32_to_f16(0), kivi_f32_to_f16(1), kivi_f32_to_f16(4), kivi_f32_to_f16(6)};
  for (int ax = 0; ax < 2; ax++) {
    int64_t rows = ax == KIVI_AXIS_TOKEN ? 32 : 1, cols = ax == KIVI_AXIS_TOKEN ? 1 : 32;
    for (int a = 0; a < 2; a++) {
      uint32_t codes[2];
      kivi_status st = kivi_codebook_quantize(ctx, x, KIVI_F32, rows, cols, ax, 32, 2, cent, a, 0, codes);
      st |= kivi_codebook_dequantize(ctx, codes, cent, rows, cols, ax, 32, 2, out, KIVI_F32);
      CHECK(st == KIVI_OK, "worked example: %s", kivi_last_error());
      int bad = 0;
      double mae = 0;
      for (int i = 0; i < 32; i++) {
        uint32_t q = kivi_word_get(codes[i / 16], i % 16, 2);
        if (q != (a ? want_iv : want_nn)[i % 8]) bad++;
        mae += fabs((double)x[i] - out[i]) / 32;
      }
      CHECK(bad == 0, "worked example axis %d assign %d: %d wrong codes", ax, a, bad);
      CHECK(fabs(mae - (a ? 1.0375 : 0.4625)) < 1e-6, "worked example axis %d assign %d: MAE %.6f", ax, a, mae);
      if (a) {
        static const float want_d[8] = {0, 0, 1, 1, 1, 4, 4, 4};
        int bd = 0;
        for (int i = 0; i < 8; i++) bd += out[i] != want_d[i];
        CHECK(bd == 0, "worked example interval dequant wrong");
      }
    }
  }
}

/* ---------------------------------------------------------------- error paths ------------ */

#define SENT 0xA5
static int untouched(const void *p, size_t n) {
  const uint8_t *b = p;
  for (size_t i = 0; i < n; i++)
    if (b[i] != SENT) return 0;
  return 1;
}

/* Output buffers of every op (big enough for the shapes used below), sentinel-filled per call. */
static uint32_t o_codes[4096];
static uint16_t o_scale[512], o_zero[512], o_cent[512 * 16];
static float o_f[8192], o_stats[2048], o_inertia[512 * 300];
static int32_t o_i[512], o_nf[512];
static uint8_t o_u8[8192];
static uint32_t o_words[4096];

static void fill_outputs(void) {
  memset(o_codes, SENT, sizeof o_codes), memset(o_scale, SENT, sizeof o_scale), memset(o_zero, SENT, sizeof o_zero);
  memset(o_cent, SENT, sizeof o_cent), memset(o_f, SENT, sizeof o_f), memset(o_stats, SENT, sizeof o_stats);
  memset(o_inertia, SENT, sizeof o_inertia), memset(o_i, SENT, sizeof o_i), memset(o_nf, SENT, sizeof o_nf);
  memset(o_u8, SENT, sizeof o_u8), memset(o_words, SENT, sizeof o_words);
}
static int outputs_untouched(void) {
  return untouched(o_codes, sizeof o_codes) && untouched(o_scale, sizeof o_scale) && untouched(o_zero, sizeof o_zero) &&
         untouched(o_cent, sizeof o_cent) && untouched(o_f, sizeof o_f) && untouched(o_stats, sizeof o_stats) &&
         untouched(o_inertia, sizeof o_inertia) && untouched(o_i, sizeof o_i) && untouched(o_nf, sizeof o_nf) &&
         untouched(o_u8, sizeof o_u8) && untouched(o_words, sizeof o_words);
}

/* A call that must fail with `want` and a message naming op and needle, its outputs untouched. */
#define TRY_ERR(call, what, ...)             \
  do {                                       \
    fill_outputs();                          \
    const kivi_status st_ = (call);          \
    expect_err(ctx, what, st_, __VA_ARGS__); \
  } while (0)

static void expect_err(kivi_ctx_t ctx, const char *what, kivi_status got, kivi_status want, const char *op,
                       const char *needle) {
  const char *msg = kivi_last_error();
  CHECK(got == want, "%s: status %s, want %s (%s)", what, kivi_status_str(got), kivi_status_str(want), msg);
  CHECK(strstr(msg, op) != NULL, "%s: message does not name %s: '%s'", what, op, msg);
  if (needle) CHECK(strstr(msg, needle) != NULL, "%s: message lacks '%s': '%s'", what, needle, msg);
  if (ctx) CHECK(!strcmp(kivi_ctx_last_error(ctx), msg), "%s: ctx message differs", what);
  CHECK(outputs_untouched(), "%s: an output buffer was written", what);
}

static void test_errors(kivi_ctx_t ctx) {
  /* a valid base call: rows 64, cols 64, G 32; x finite f32 */
  static float x[64 * 64];
  static uint16_t xh[64 * 64];
  for (int i = 0; i < 64 * 64; i++) x[i] = (float)rng_normal(), xh[i] = kivi_f32_to_f16(x[i]);
  const int64_t R = 64, C = 64;
  kivi_status st;
#define UQ(...) (fill_outputs(), kivi_uniform_quantize(__VA_ARGS__))
  const char *uq = "kivi_uniform_quantize";
  st = UQ(NULL, x, KIVI_F32, R, C, 0, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(NULL, "null ctx", st, KIVI_ERR_ARG, uq, "ctx");
  st = UQ(ctx, NULL, KIVI_F32, R, C, 0, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "null x", st, KIVI_ERR_ARG, uq, "x must not be NULL");
  st = UQ(ctx, x, KIVI_F32, R, C, 0, 32, 2, 0, o_codes, NULL, o_zero);
  expect_err(ctx, "null scale", st, KIVI_ERR_ARG, uq, "scale");
  st = UQ(ctx, x, KIVI_F32, 0, C, 0, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "rows 0", st, KIVI_ERR_ARG, uq, "rows");
  st = UQ(ctx, x, KIVI_F32, R, -3, 0, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "cols -3", st, KIVI_ERR_ARG, uq, "-3");
  st = UQ(ctx, x, KIVI_F32, (int64_t)1 << 20, (int64_t)1 << 20, 0, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "too big", st, KIVI_ERR_ARG, uq, "2^40");
  st = UQ(ctx, x, KIVI_F32, R, C, 0, 48, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "group 48", st, KIVI_ERR_ARG, uq, "group must be 32, 64 or 128, got 48");
  st = UQ(ctx, x, KIVI_F32, R, C, 0, 32, 3, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "bits 3", st, KIVI_ERR_ARG, uq, "bits must be 2 or 4, got 3");
  st = UQ(ctx, x, 7, R, C, 0, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "dtype 7", st, KIVI_ERR_ARG, uq, "dtype");
  st = UQ(ctx, x, KIVI_F32, R, C, 2, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "axis 2", st, KIVI_ERR_ARG, uq, "axis");
  st = UQ(ctx, x, KIVI_F32, 40, C, KIVI_AXIS_TOKEN, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "rows % G", st, KIVI_ERR_SHAPE, uq, "rows (40) must be a multiple of group (32) for KIVI_AXIS_TOKEN");
  st = UQ(ctx, x, KIVI_F32, R, 48, KIVI_AXIS_CHANNEL, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "cols % G", st, KIVI_ERR_SHAPE, uq, "cols (48)");
  st = UQ(ctx, x, KIVI_F32, R, C, 0, 32, 2, 6, o_codes, o_scale, o_zero);
  expect_err(ctx, "flags 6", st, KIVI_ERR_ARG, uq, "flags");
  x[1000] = NAN;
  st = UQ(ctx, x, KIVI_F32, R, C, 0, 32, 2, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "NaN x", st, KIVI_ERR_NONFINITE, uq, "index 1000");
  st = UQ(ctx, x, KIVI_F32, R, C, 0, 32, 2, KIVI_FLAG_TRUSTED, o_codes, o_scale, o_zero);
  CHECK(st == KIVI_OK, "trusted NaN must not fail");
  x[1000] = 0.5f;
  xh[4095] = 0x7c00; /* +Inf in the last element */
  st = UQ(ctx, xh, KIVI_F16, R, C, 1, 64, 4, 0, o_codes, o_scale, o_zero);
  expect_err(ctx, "Inf xh", st, KIVI_ERR_NONFINITE, uq, "index 4095");
  xh[4095] = kivi_f32_to_bf16(1.0f) | 0x7f80; /* bf16 Inf/NaN pattern */
  TRY_ERR(kivi_uniform_quantize(ctx, xh, KIVI_BF16, R, C, 1, 64, 4, 0, o_codes, o_scale, o_zero), "NaN bf16",
          KIVI_ERR_NONFINITE, uq, "x must be finite");
  xh[4095] = kivi_f32_to_f16(0.25f);

  const char *ud = "kivi_uniform_dequantize";
  static uint32_t codes[1024];
  static uint16_t sc[128], zr[128];
  memset(codes, 0, sizeof codes), memset(sc, 0, sizeof sc), memset(zr, 0, sizeof zr);
  TRY_ERR(kivi_uniform_dequantize(ctx, codes, sc, zr, R, C, 0, 32, 2, o_f, 5), "dequant out_dtype", KIVI_ERR_ARG, ud,
          "out_dtype");
  TRY_ERR(kivi_uniform_dequantize(ctx, codes, sc, NULL, R, C, 0, 32, 2, o_f, KIVI_F32), "dequant null zero",
          KIVI_ERR_ARG, ud, "zero");
  TRY_ERR(kivi_uniform_dequantize(ctx, codes, sc, zr, R, C, 0, 128, 2, o_f, KIVI_F32), "dequant shape", KIVI_ERR_SHAPE,
          ud, "multiple of group");

  const char *cf = "kivi_codebook_fit";
  TRY_ERR(kivi_codebook_fit(ctx, x, KIVI_F32, R, C, 0, 32, 2, 2, 10, 0, o_cent, o_i, o_inertia), "fit enum",
          KIVI_ERR_ARG, cf, "fit");
  TRY_ERR(kivi_codebook_fit(ctx, x, KIVI_F32, R, C, 0, 32, 2, 0, 0, 0, o_cent, o_i, o_inertia), "max_iters 0",
          KIVI_ERR_ARG, cf, "max_iters");
  TRY_ERR(kivi_codebook_fit(ctx, x, KIVI_F32, R, C, 0, 32, 2, 0, 257, 0, o_cent, o_i, o_inertia), "max_iters 257",
          KIVI_ERR_ARG, cf, "257");
  x[4000] = -INFINITY;
  TRY_ERR(kivi_codebook_fit(ctx, x, KIVI_F32, R, C, 1, 32, 4, 1, 10, 0, o_cent, o_i, o_inertia), "fit Inf",
          KIVI_ERR_NONFINITE, cf, "index 4000");
  fill_outputs();
  st = kivi_codebook_fit(ctx, x, KIVI_F32, R, C, 1, 32, 4, 1, 10, KIVI_FLAG_TRUSTED, o_cent, o_i, o_inertia);
  CHECK(st == KIVI_OK, "trusted fit with Inf must not fail");
  TRY_ERR(kivi_codebook_encode(ctx, x, KIVI_F32, R, C, 1, 32, 4, 1, 10, 0, 0, o_cent, o_codes), "encode Inf",
          KIVI_ERR_NONFINITE, "kivi_codebook_encode", "x must be finite");
  x[4000] = 1.0f;
  TRY_ERR(kivi_codebook_encode(ctx, x, KIVI_F32, R, C, 1, 32, 4, 1, 10, 9, 0, o_cent, o_codes), "encode assign",
          KIVI_ERR_ARG, "kivi_codebook_encode", "assign");
  TRY_ERR(kivi_codebook_encode(ctx, x, KIVI_F32, R, C, 1, 32, 4, 1, 10, 0, 0, NULL, o_codes), "encode null centroids",
          KIVI_ERR_ARG, "kivi_codebook_encode", "centroids");

  const char *cq = "kivi_codebook_quantize";
  static uint16_t cent[128 * 4];
  const int64_t groups = 128; /* R=64, C=64, G=32 */
  for (int64_t g = 0; g < groups; g++)
    for (int j = 0; j < 4; j++) cent[g * 4 + j] = kivi_f32_to_f16(-1.5f + j);
  fill_outputs();
  st = kivi_codebook_quantize(ctx, x, KIVI_F32, R, C, 0, 32, 2, cent, 0, 0, o_codes);
  CHECK(st == KIVI_OK && !untouched(o_codes, 1024 * 4) && untouched(o_codes + 1024, sizeof o_codes - 4096),
        "valid codebook_quantize writes exactly its codes: %s", kivi_last_error());
  uint16_t keep = cent[77 * 4 + 2];
  cent[77 * 4 + 2] = kivi_f32_to_f16(-5.0f);
  TRY_ERR(kivi_codebook_quantize(ctx, x, KIVI_F32, R, C, 0, 32, 2, cent, 0, 0, o_codes), "unsorted centroids",
          KIVI_ERR_ARG, cq, "group 77");
  cent[77 * 4 + 2] = 0x7e00; /* NaN */
  TRY_ERR(kivi_codebook_quantize(ctx, x, KIVI_F32, R, C, 0, 32, 2, cent, 1, 0, o_codes), "NaN centroid", KIVI_ERR_ARG,
          cq, "centroids must be finite");
  cent[77 * 4 + 2] = keep;
  TRY_ERR(kivi_codebook_quantize(ctx, x, KIVI_F32, R, C, 0, 32, 2, cent, 2, 0, o_codes), "assign 2", KIVI_ERR_ARG, cq,
          "assign");

  TRY_ERR(kivi_codebook_dequantize(ctx, codes, cent, R, C, 0, 64, 4, NULL, KIVI_F32), "cb dequant null out",
          KIVI_ERR_ARG, "kivi_codebook_dequantize", "out");
  TRY_ERR(kivi_stats_block(ctx, x, KIVI_F32, R, C, 0, 16, o_stats, o_nf), "stats group 16", KIVI_ERR_ARG,
          "kivi_stats_block", "group");
  TRY_ERR(kivi_stats_block(ctx, x, KIVI_F32, R, 32, 1, 64, o_stats, o_nf), "stats shape", KIVI_ERR_SHAPE,
          "kivi_stats_block", "cols (32)");

  static uint8_t pc[64];
  for (int i = 0; i < 64; i++) pc[i] = (uint8_t)(i % 4);
  pc[37] = 4;
  TRY_ERR(kivi_codes_pack(ctx, pc, 64, 2, o_words), "pack code 4", KIVI_ERR_ARG, "kivi_codes_pack", "codes[37]");
  TRY_ERR(kivi_codes_pack(ctx, pc, 60, 4, o_words), "pack n % cpw", KIVI_ERR_SHAPE, "kivi_codes_pack", "n (60)");
  TRY_ERR(kivi_codes_pack(ctx, pc, 0, 4, o_words), "pack n 0", KIVI_ERR_ARG, "kivi_codes_pack", "n");
  TRY_ERR(kivi_codes_unpack(ctx, codes, 64, 8, o_u8), "unpack bits 8", KIVI_ERR_ARG, "kivi_codes_unpack", "bits");
  TRY_ERR(kivi_codes_unpack(ctx, NULL, 64, 2, o_u8), "unpack null", KIVI_ERR_ARG, "kivi_codes_unpack", "words");
}

static void test_library(kivi_ctx_t ctx) {
  CHECK(kivi_abi_version() == KIVI_ABI_VERSION, "abi version");
  CHECK(kivi_backend_kind() == 0, "backend kind");
  CHECK(!strcmp(kivi_status_str(KIVI_ERR_SHAPE), "KIVI_ERR_SHAPE"), "status_str");
  CHECK(!strcmp(kivi_status_str(-99), "KIVI_ERR_UNKNOWN"), "status_str unknown");
  int32_t n = 0;
  CHECK(kivi_device_count(&n) == KIVI_OK && n == 1, "device_count");
  kivi_ctx_t bad = (kivi_ctx_t)1;
  CHECK(kivi_ctx_create(1, &bad) == KIVI_ERR_NO_DEVICE && bad == (kivi_ctx_t)1, "ctx_create(1)");
  CHECK(strstr(kivi_last_error(), "device") != NULL, "ctx_create message");
  char name[128];
  CHECK(kivi_ctx_device_name(ctx, name, sizeof name) == KIVI_OK && !strncmp(name, "CPU", 3), "device name '%s'", name);
  char tiny[4];
  CHECK(kivi_ctx_device_name(ctx, tiny, 4) == KIVI_OK && strlen(tiny) == 3, "device name truncation");
  int32_t done = 0;
  CHECK(kivi_ctx_query(ctx, &done) == KIVI_OK && done == 1, "query");
  CHECK(kivi_ctx_synchronize(ctx) == KIVI_OK, "synchronize");
  void *p = NULL, *q = NULL;
  CHECK(kivi_mem_alloc(ctx, 0, &p) == KIVI_ERR_ARG, "alloc 0");
  CHECK(kivi_mem_alloc(ctx, 1000, &p) == KIVI_OK && ((uintptr_t)p % 256) == 0, "alloc aligned");
  CHECK(kivi_mem_alloc(ctx, 1000, &q) == KIVI_OK, "alloc");
  char h[1000], h2[1000];
  for (int i = 0; i < 1000; i++) h[i] = (char)i;
  CHECK(kivi_mem_upload(ctx, p, h, 1000) == KIVI_OK && kivi_mem_copy(ctx, q, p, 1000) == KIVI_OK &&
            kivi_mem_download(ctx, h2, q, 1000) == KIVI_OK && !memcmp(h, h2, 1000),
        "upload/copy/download");
  CHECK(kivi_mem_upload(ctx, NULL, h, 10) == KIVI_ERR_ARG, "upload null");
  CHECK(kivi_mem_free(ctx, p) == KIVI_OK && kivi_mem_free(ctx, q) == KIVI_OK && kivi_mem_free(ctx, NULL) == KIVI_OK,
        "free");
  uint64_t fr = 0, tot = 0;
  CHECK(kivi_mem_info(ctx, &fr, &tot) == KIVI_OK && tot > 0 && fr <= tot, "mem_info");
  float ms = -1;
  kivi_ctx_t c2;
  CHECK(kivi_ctx_create(0, &c2) == KIVI_OK, "ctx_create");
  CHECK(kivi_timer_stop(c2, &ms) == KIVI_ERR_STATE, "timer_stop before start");
  CHECK(kivi_timer_start(c2) == KIVI_OK && kivi_timer_stop(c2, &ms) == KIVI_OK && ms >= 0, "timer");
  CHECK(kivi_ctx_destroy(c2) == KIVI_OK && kivi_ctx_destroy(NULL) == KIVI_OK, "destroy");
  double gbps = 0;
  CHECK(kivi_bench_copy(ctx, 1 << 20, 3, &gbps) == KIVI_OK && gbps > 0, "bench_copy %g", gbps);
  CHECK(kivi_bench_copy(ctx, 1 << 20, 0, &gbps) == KIVI_ERR_ARG, "bench_copy iters 0");
}

int main(int argc, char **argv) {
  static const char *const flags[] = {"--quick"}; /* the shapes of at most 8192 values only (for valgrind) */
  const int quick = harness_args(argc, argv, "cpu_smoke", 20261128ull, flags, 1) & 1;
  kivi_ctx_t ctx = harness_ctx();
  if (!ctx) return 1;
  test_library(ctx);
  test_pack(ctx);
  test_worked_example(ctx);
  const cfg shapes[] = {
      {96, 40, KIVI_AXIS_TOKEN, 32, 2, 0},   {5, 192, KIVI_AXIS_CHANNEL, 64, 2, 0},
      {128, 600, KIVI_AXIS_TOKEN, 64, 4, 0}, {3, 1152, KIVI_AXIS_CHANNEL, 128, 4, 0},
      {256, 17, KIVI_AXIS_TOKEN, 128, 2, 0}, {7, 96, KIVI_AXIS_CHANNEL, 32, 4, 0},
      {640, 40, KIVI_AXIS_TOKEN, 32, 2, 0},  {320, 136, KIVI_AXIS_TOKEN, 32, 4, 0}, /* several super-tiles */
  };
  for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
    for (kivi_dtype dt = KIVI_F32; dt <= KIVI_BF16; dt++) {
      if (quick && shapes[s].rows * shapes[s].cols > 8192) continue;
      cfg k = shapes[s];
      k.dtype = dt;
      test_uniform(ctx, k);
      test_codebook(ctx, k, KIVI_FIT_PINNED);
      test_codebook(ctx, k, KIVI_FIT_FREE);
      test_stats(ctx, k);
    }
  test_errors(ctx);
  kivi_ctx_destroy(ctx);
  return check_summary();
}
