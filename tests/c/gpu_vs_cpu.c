/*
 * gpu_vs_cpu.c — the CUDA build against the CPU reference, through the public ABI only.
 *
 * dlopen()s build/libkivi_cpu.so and build/libkivi_cuda.so (RTLD_LOCAL: both export the same
 * names), runs every op on seeded random data of awkward sizes on both, and compares:
 *   uniform codes + fp16 params bit for bit, dequantized outputs bit for bit, stats within float
 *   tolerance, codebook centroids within 1e-3 * (max - min) + one fp16 ulp (max seen reported),
 *   codes equal except for values within that bound of a decision boundary, pack/unpack bit for
 *   bit, error statuses and messages for bad arguments, NaN rejection (nothing written), a CUDA
 *   failure (1 TB allocation) after which the context still works.
 *
 * Build:  gcc -std=c11 -O2 -Wall -Wextra -Icuda/include tests/c/gpu_vs_cpu.c -o build/gpu_vs_cpu -ldl -lm
 * Run:    build/gpu_vs_cpu [seed]        correctness (exit 1 on any failure)
 *         build/gpu_vs_cpu SEED quick    the boundary-stress and unaligned cases only (for compute-sanitizer)
 *         build/gpu_vs_cpu bench         timing of the fused quantizers on an 8 x 32768 x 32 x 128 cache
 * Env:    KIVI_CPU_LIB, KIVI_CUDA_LIB override the library paths.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kivi.h"
#include "kivi_format.h"
#include "harness.h"

/* ---------------------------------------------------------------- the two libraries ------ */

/* clang-format rewraps this X-macro list differently on every pass: */
/* clang-format off */
#define KV_FNS(X)                                                                                                  \
  X(abi_version) X(backend_kind) X(status_str) X(last_error) X(device_count) X(ctx_create) X(ctx_destroy)           \
  X(ctx_last_error) X(ctx_device_name) X(ctx_synchronize) X(ctx_query) X(mem_alloc) X(mem_free) X(mem_upload)      \
  X(mem_download) X(mem_copy) X(mem_info) X(timer_start) X(timer_stop) X(bench_copy) X(stats_block)                 \
  X(uniform_quantize) X(uniform_dequantize) X(codebook_fit) X(codebook_quantize) X(codebook_encode)                \
  X(codebook_dequantize) X(codes_pack) X(codes_unpack)
/* clang-format on */

typedef struct lib {
  const char *name;
  void *h;
  kivi_ctx_t ctx;
#define KV_MEMBER(n) __typeof__(kivi_##n) *n;
  KV_FNS(KV_MEMBER)
#undef KV_MEMBER
} lib;

static int lib_open(lib *L, const char *name, const char *path) {
  memset(L, 0, sizeof *L);
  L->name = name;
  if (!(L->h = harness_dlopen(path))) return -1;
#define KV_SYM(n)                                                   \
  *(void **)&L->n = dlsym(L->h, "kivi_" #n);                        \
  if (!L->n) {                                                      \
    fprintf(stderr, "FAIL %s: missing export kivi_%s\n", path, #n); \
    return -1;                                                      \
  }
  KV_FNS(KV_SYM)
#undef KV_SYM
  kivi_status st = L->ctx_create(0, &L->ctx);
  if (st) {
    fprintf(stderr, "FAIL %s: kivi_ctx_create: %s %s\n", path, L->status_str(st), L->last_error());
    return -1;
  }
  return 0;
}

/* ---------------------------------------------------------------- reporting -------------- */

static void fail(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("FAIL ");
  vprintf(fmt, ap);
  printf(" (seed %llu)\n", (unsigned long long)g_seed);
  va_end(ap);
  n_fail++;
}
static void pass(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  printf("PASS ");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
  n_pass++;
}

/* A call that must succeed; on failure records it with the library's message. */
#define OK(L, call)                                                                        \
  do {                                                                                     \
    kivi_status st_ = (L)->call;                                                           \
    if (st_) {                                                                             \
      fail("%s: %s -> %s: %s", (L)->name, #call, (L)->status_str(st_), (L)->last_error()); \
      goto out;                                                                            \
    }                                                                                      \
  } while (0)

/* ---------------------------------------------------------------- data ------------------- */

static float urand(void) { return (float)((rng_next() >> 40) * (1.0 / 16777216.0)); } /* [0, 1) */
static float nrand(void) { return urand() + urand() + urand() + urand() - 2.0f; }

static const char *dname(kivi_dtype dt) { return dt == KIVI_F32 ? "f32" : (dt == KIVI_F16 ? "f16" : "bf16"); }
static const char *aname(kivi_axis a) { return a == KIVI_AXIS_TOKEN ? "token" : "channel"; }

/* Keys-like data: a few outlier columns, constant columns/rows (scale 0), exact half-step grids
   (rounding ties), the rest roughly Gaussian with a per-column offset. */
static void *make_x(int64_t rows, int64_t cols, kivi_dtype dt) {
  void *x = malloc((size_t)(rows * cols) * dsize(dt));
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) {
      float v;
      if (c % 31 == 7 || r % 11 == 4)
        v = 1.5f;
      else if (c % 23 == 11 || r % 13 == 6)
        v = (float)((c % 23 == 11 ? r : c) % 7) * 0.5f;
      else {
        v = nrand() + 0.05f * (float)(c % 9);
        if (c % 13 == 5) v = v * 30.0f + 4.0f;
      }
      set_elem(x, dt, r * cols + c, v);
    }
  return x;
}

/* ---------------------------------------------------------------- buffers ---------------- */

typedef struct buf {
  void *cpu, *gpu;
  size_t bytes;
} buf;

/* Same contents on both sides (host memory through the CPU build's own allocator). */
static int buf_new(lib *C, lib *G, buf *b, size_t bytes, const void *init, int fill) {
  b->bytes = bytes;
  b->cpu = b->gpu = NULL;
  if (C->mem_alloc(C->ctx, bytes, &b->cpu) || G->mem_alloc(G->ctx, bytes, &b->gpu)) {
    fail("allocation of %zu bytes: %s", bytes, G->last_error());
    return -1;
  }
  void *tmp = NULL;
  if (!init) {
    tmp = malloc(bytes);
    memset(tmp, fill, bytes);
    init = tmp;
  }
  memcpy(b->cpu, init, bytes);
  kivi_status st = G->mem_upload(G->ctx, b->gpu, init, bytes);
  free(tmp);
  if (st) {
    fail("upload: %s", G->last_error());
    return -1;
  }
  return 0;
}
static void buf_free(lib *C, lib *G, buf *b) {
  if (b->cpu) C->mem_free(C->ctx, b->cpu);
  if (b->gpu) G->mem_free(G->ctx, b->gpu);
  b->cpu = b->gpu = NULL;
}

/* buf_free of each buffer of a NULL-ended list. */
static void bufs_free(lib *C, lib *G, buf *const *list) {
  for (; *list; list++) buf_free(C, G, *list);
}
/* The GPU side's contents in a malloc'd host copy. */
static void *buf_get(lib *G, const buf *b) {
  void *h = malloc(b->bytes);
  kivi_status st = G->mem_download(G->ctx, h, b->gpu, b->bytes);
  if (st) {
    fail("download: %s", G->last_error());
    free(h);
    return NULL;
  }
  return h;
}
/* Bytes that differ; index of the first in *first. */
static int64_t bytes_diff(const void *a, const void *b, size_t n, int64_t *first) {
  int64_t cnt = 0;
  *first = -1;
  for (size_t i = 0; i < n; i++)
    if (((const uint8_t *)a)[i] != ((const uint8_t *)b)[i]) {
      if (*first < 0) *first = (int64_t)i;
      cnt++;
    }
  return cnt;
}
/* Compares the GPU copy of b with its CPU side bit for bit. */
static int same_bits(lib *G, const buf *b, const char *what, const char *tag) {
  void *h = buf_get(G, b);
  if (!h) return 0;
  int64_t first;
  int64_t d = bytes_diff(h, b->cpu, b->bytes, &first);
  if (d)
    fail("%s %s: %lld of %zu bytes differ, first at byte %lld", tag, what, (long long)d, b->bytes, (long long)first);
  free(h);
  return d == 0;
}

/* ---------------------------------------------------------------- one matrix case -------- */

static double max_cent_excess = 0.0; /* max |diff| / bound over all codebook centroids */
static double max_cent_diff = 0.0;
static int64_t code_boundary_diffs = 0, iters_diffs = 0;
static double max_stats_rel = 0.0, max_inertia_rel = 0.0;

static float f16ulp(float v) {
  float a = fabsf(v);
  if (a < 6.103515625e-05f) return 5.9604644775390625e-08f;
  int e;
  frexpf(a, &e);
  return ldexpf(1.0f, e - 11);
}

static void run_case(lib *C, lib *G, kivi_axis axis, int64_t rows, int64_t cols, kivi_dtype dt, int32_t group,
                     int32_t bits, int do_codebook, int iter_no) {
  char tag[160];
  snprintf(tag, sizeof tag, "%s %lldx%lld %s G=%d b=%d", aname(axis), (long long)rows, (long long)cols, dname(dt),
           group, bits);
  const int64_t n = rows * cols, groups = kivi_group_count(rows, cols, axis, group);
  const int32_t nc = 1 << bits, cpw = 32 / bits;
  const int64_t nwords = n / cpw;
  const kivi_dtype odt = (kivi_dtype)(iter_no % 3);
  const int fails0 = n_fail;
  void *x = make_x(rows, cols, dt);
  buf bx = {0}, bcodes = {0}, bscale = {0}, bzero = {0}, bout = {0}, bstats = {0}, bnf = {0}, bcent = {0},
      bcodes2 = {0}, biters = {0}, binert = {0};
  void *h = NULL, *h2 = NULL, *h3 = NULL;
  const int32_t max_iters = 10;
  if (buf_new(C, G, &bx, (size_t)n * dsize(dt), x, 0) || buf_new(C, G, &bcodes, (size_t)nwords * 4, NULL, 0xab) ||
      buf_new(C, G, &bscale, (size_t)groups * 2, NULL, 0xab) || buf_new(C, G, &bzero, (size_t)groups * 2, NULL, 0xab) ||
      buf_new(C, G, &bout, (size_t)n * dsize(odt), NULL, 0xab) ||
      buf_new(C, G, &bstats, (size_t)groups * 16, NULL, 0xab) || buf_new(C, G, &bnf, (size_t)groups * 4, NULL, 0xab))
    goto out;

  /* uniform: codes and params bit for bit, then dequantize (from identical inputs) bit for bit */
  OK(C, uniform_quantize(C->ctx, bx.cpu, dt, rows, cols, axis, group, bits, 0, bcodes.cpu, bscale.cpu, bzero.cpu));
  OK(G, uniform_quantize(G->ctx, bx.gpu, dt, rows, cols, axis, group, bits, 0, bcodes.gpu, bscale.gpu, bzero.gpu));
  same_bits(G, &bcodes, "uniform codes", tag);
  same_bits(G, &bscale, "uniform scale", tag);
  same_bits(G, &bzero, "uniform zero", tag);
  OK(G, mem_upload(G->ctx, bcodes.gpu, bcodes.cpu, bcodes.bytes));
  OK(G, mem_upload(G->ctx, bscale.gpu, bscale.cpu, bscale.bytes));
  OK(G, mem_upload(G->ctx, bzero.gpu, bzero.cpu, bzero.bytes));
  OK(C, uniform_dequantize(C->ctx, bcodes.cpu, bscale.cpu, bzero.cpu, rows, cols, axis, group, bits, bout.cpu, odt));
  OK(G, uniform_dequantize(G->ctx, bcodes.gpu, bscale.gpu, bzero.gpu, rows, cols, axis, group, bits, bout.gpu, odt));
  same_bits(
      G, &bout,
      odt == KIVI_F32 ? "uniform dequant f32" : (odt == KIVI_F16 ? "uniform dequant f16" : "uniform dequant bf16"),
      tag);

  /* stats */
  OK(C, stats_block(C->ctx, bx.cpu, dt, rows, cols, axis, group, bstats.cpu, bnf.cpu));
  OK(G, stats_block(G->ctx, bx.gpu, dt, rows, cols, axis, group, bstats.gpu, bnf.gpu));
  same_bits(G, &bnf, "stats nonfinite", tag);
  if (!(h = buf_get(G, &bstats))) goto out;
  {
    const float *a = (const float *)h, *b = (const float *)bstats.cpu;
    int64_t bad = 0;
    for (int64_t i = 0; i < groups * 4; i++) {
      const double d = fabs((double)a[i] - (double)b[i]);
      const double scale = i % 4 == 3 ? fabs(b[i]) + 1e-30 : fabs(b[i]) + fabs(b[i - i % 4 + 1] - b[i - i % 4]) + 1e-30;
      const double rel = d / scale;
      if (rel > max_stats_rel) max_stats_rel = rel;
      if (rel > 1e-5 || a[i] != a[i]) bad++;
    }
    if (bad) fail("%s stats: %lld values beyond 1e-5 relative", tag, (long long)bad);
  }
  free(h);
  h = NULL;

  if (do_codebook) {
    const kivi_fit fit = (kivi_fit)(iter_no & 1);
    const kivi_assign assign = (kivi_assign)((iter_no >> 1) & 1);
    if (buf_new(C, G, &bcent, (size_t)groups * nc * 2, NULL, 0xab) ||
        buf_new(C, G, &bcodes2, (size_t)nwords * 4, NULL, 0xab) ||
        buf_new(C, G, &biters, (size_t)groups * 4, NULL, 0xab) ||
        buf_new(C, G, &binert, (size_t)groups * (max_iters + 1) * 4, NULL, 0xab))
      goto out;
    OK(C, codebook_fit(C->ctx, bx.cpu, dt, rows, cols, axis, group, bits, fit, max_iters, 0, bcent.cpu, biters.cpu,
                       binert.cpu));
    OK(G, codebook_fit(G->ctx, bx.gpu, dt, rows, cols, axis, group, bits, fit, max_iters, 0, bcent.gpu, biters.gpu,
                       binert.gpu));
    if (!(h = buf_get(G, &bcent)) || !(h2 = buf_get(G, &biters)) || !(h3 = buf_get(G, &binert))) goto out;
    /* centroids within 1e-3 * (max - min) of the group + one fp16 ulp */
    int64_t bad = 0, diff_groups = 0;
    uint8_t *gdiff = (uint8_t *)calloc((size_t)groups, 1);
    float *bound = (float *)malloc((size_t)groups * sizeof(float));
    for (int64_t g = 0; g < groups; g++) {
      const float *st = (const float *)bstats.cpu + 4 * g;
      bound[g] = 1e-3f * (st[1] - st[0]);
      for (int32_t k = 0; k < nc; k++) {
        const float a = kivi_f16_to_f32(((const uint16_t *)h)[g * nc + k]);
        const float b = kivi_f16_to_f32(((const uint16_t *)bcent.cpu)[g * nc + k]);
        const double d = fabs((double)a - (double)b), lim = bound[g] + f16ulp(b);
        if (d > max_cent_diff) max_cent_diff = d;
        if (d / lim > max_cent_excess) max_cent_excess = d / lim;
        if (d > lim || a != a) bad++;
        if (((const uint16_t *)h)[g * nc + k] != ((const uint16_t *)bcent.cpu)[g * nc + k]) gdiff[g] = 1;
      }
      diff_groups += gdiff[g];
      if (((const int32_t *)h2)[g] != ((const int32_t *)biters.cpu)[g]) iters_diffs++;
      for (int32_t k = 0; k <= max_iters; k++) {
        const float a = ((const float *)h3)[g * (max_iters + 1) + k],
                    b = ((const float *)binert.cpu)[g * (max_iters + 1) + k];
        const double rel = fabs((double)a - (double)b) / (fabs((double)b) + 1e-20);
        if (rel > max_inertia_rel && fabs(a - b) > 1e-30) max_inertia_rel = rel;
        if (k && a > ((const float *)h3)[g * (max_iters + 1) + k - 1] * (1.0f + 1e-6f) + 1e-30f)
          bad += 0; /* non-increase is the CPU's contract too; compared through rel above */
      }
    }
    if (bad) fail("%s codebook_fit %s: %lld centroids beyond the bound", tag, fit ? "pinned" : "free", (long long)bad);

    /* encode (fit + codes) on both; codes may differ only near a decision boundary of a group whose
       centroids differ */
    memset(bcodes2.cpu, 0xab, bcodes2.bytes);
    OK(C, codebook_encode(C->ctx, bx.cpu, dt, rows, cols, axis, group, bits, fit, max_iters, assign, 0, bcent.cpu,
                          bcodes2.cpu));
    OK(G, codebook_encode(G->ctx, bx.gpu, dt, rows, cols, axis, group, bits, fit, max_iters, assign, 0, bcent.gpu,
                          bcodes2.gpu));
    free(h);
    if (!(h = buf_get(G, &bcodes2))) goto out;
    {
      const uint32_t *wa = (const uint32_t *)h, *wb = (const uint32_t *)bcodes2.cpu;
      int64_t hard = 0;
      for (int64_t g = 0; g < groups; g++) {
        const int32_t wpg = group / cpw;
        int differs = 0;
        for (int32_t w = 0; w < wpg; w++) differs |= wa[g * wpg + w] != wb[g * wpg + w];
        if (!differs) continue;
        /* element i of group g: token axis rows gr*G+i of column c; channel axis flat g*G+i */
        const uint16_t *cc = (const uint16_t *)bcent.cpu + g * nc;
        for (int32_t i = 0; i < group; i++) {
          const uint32_t qa = kivi_word_get(wa[g * wpg + i / cpw], i % cpw, bits);
          const uint32_t qb = kivi_word_get(wb[g * wpg + i / cpw], i % cpw, bits);
          if (qa == qb) continue;
          int64_t e;
          if (axis == KIVI_AXIS_TOKEN) {
            const int64_t gpc = rows / group, c = g / gpc, gr = g % gpc;
            e = (gr * group + i) * cols + c;
          } else {
            e = g * group + i;
          }
          const float v = get_elem(x, dt, e);
          double near = INFINITY;
          for (int32_t k = 0; k + 1 < nc; k++) {
            const float c0 = kivi_f16_to_f32(cc[k]), c1 = kivi_f16_to_f32(cc[k + 1]);
            const float t = assign == KIVI_ASSIGN_NEAREST ? 0.5f * (c0 + c1) : c1;
            if (fabs(v - t) < near) near = fabs(v - t);
          }
          if (gdiff[g] && near <= bound[g] + f16ulp(v))
            code_boundary_diffs++;
          else
            hard++;
        }
      }
      if (hard) fail("%s codebook_encode: %lld codes differ away from any decision boundary", tag, (long long)hard);
    }
    free(gdiff);
    free(bound);

    /* quantize against the CPU's centroids (same fp16 inputs): codes bit for bit; then dequantize */
    OK(G, mem_upload(G->ctx, bcent.gpu, bcent.cpu, bcent.bytes));
    OK(C, codebook_quantize(C->ctx, bx.cpu, dt, rows, cols, axis, group, bits, bcent.cpu, assign, 0, bcodes2.cpu));
    OK(G, codebook_quantize(G->ctx, bx.gpu, dt, rows, cols, axis, group, bits, bcent.gpu, assign, 0, bcodes2.gpu));
    same_bits(G, &bcodes2, assign ? "codebook_quantize interval codes" : "codebook_quantize nearest codes", tag);
    OK(G, mem_upload(G->ctx, bcodes2.gpu, bcodes2.cpu, bcodes2.bytes));
    OK(C, codebook_dequantize(C->ctx, bcodes2.cpu, bcent.cpu, rows, cols, axis, group, bits, bout.cpu, odt));
    OK(G, codebook_dequantize(G->ctx, bcodes2.gpu, bcent.gpu, rows, cols, axis, group, bits, bout.gpu, odt));
    same_bits(G, &bout, "codebook dequant", tag);
  }
  if (n_fail == fails0) pass("%s%s", tag, do_codebook ? " (uniform, stats, codebook)" : " (uniform, stats)");
out:
  free(h);
  free(h2);
  free(h3);
  free(x);
  bufs_free(
      C, G,
      (buf *const[]){&bx, &bcodes, &bscale, &bzero, &bout, &bstats, &bnf, &bcent, &bcodes2, &biters, &binert, NULL});
}

/* ---------------------------------------------------------------- misaligned pointers ---- */

/* x and out one element past an allocation's start: the kernels' unaligned paths. */
/*
 * Uniform codes where they are hardest to get right: every group's values sit within a few 16-bit
 * steps of its own decision boundaries z + (k - 1/2) s (the device finds 2-bit codes by comparing
 * with per-group thresholds, so each threshold must be exact). Groups of several kinds: moderate;
 * far from zero with coarse steps (exact ties); in the f16 subnormals; a boundary at exactly 0 with
 * a large |z|; constant (s = 0); a range of a few steps; and, with KIVI_FLAG_TRUSTED, groups holding
 * +-Inf, and for bf16 groups beyond the fp16 range (z = +-Inf). Codes and params bit for bit.
 */
static uint16_t to16(kivi_dtype dt, float v) { return dt == KIVI_F16 ? kivi_f32_to_f16(v) : kivi_f32_to_bf16(v); }
static float from16(kivi_dtype dt, uint16_t h) { return dt == KIVI_F16 ? kivi_f16_to_f32(h) : kivi_bf16_to_f32(h); }
static uint16_t step16(uint16_t h, int by) { /* by 16-bit steps along the number line (both zeros at 0) */
  int o = (h & 0x8000u) ? -(int)(h & 0x7fffu) : (int)h;
  o += by;
  return o >= 0 ? (uint16_t)o : (uint16_t)(0x8000u | (uint32_t)(-o));
}

static void run_boundary(lib *C, lib *G) {
  for (int dti = 0; dti < 2; dti++)
    for (int axis = 0; axis < 2; axis++)
      for (int gi = 0; gi < 3; gi++)
        for (int bits = 2; bits <= 4; bits += 2)
          for (int trusted = 0; trusted < 2; trusted++) {
            const kivi_dtype dt = dti ? KIVI_BF16 : KIVI_F16;
            const int32_t group = 32 << gi, top = (1 << bits) - 1;
            const int64_t rows = axis ? 37 : 4 * group, cols = axis ? 3 * group : 104; /* a partial tile of 40 */
            const int64_t n = rows * cols, groups = kivi_group_count(rows, cols, axis, group);
            const int64_t nwords = n / (32 / bits);
            char tag[96];
            snprintf(tag, sizeof tag, "boundaries %s %s G=%d b=%d%s", aname(axis), dname(dt), group, bits,
                     trusted ? " trusted" : "");
            const int fails0 = n_fail;
            int *kind = malloc((size_t)groups * sizeof *kind), *p0 = malloc((size_t)groups * sizeof *p0),
                *p1 = malloc((size_t)groups * sizeof *p1);
            uint16_t *lo = malloc((size_t)groups * 2), *hi = malloc((size_t)groups * 2), *x = malloc((size_t)n * 2);
            float *z = malloc((size_t)groups * sizeof *z), *sc = malloc((size_t)groups * sizeof *sc);
            for (int64_t g = 0; g < groups; g++) {
              const int nk = trusted ? (dt == KIVI_BF16 ? 10 : 8) : 6;
              kind[g] = (int)(rng_next() % (uint64_t)nk);
              float base, range;
              const float S = 0.1f + 4.0f * urand();
              switch (kind[g]) {
                case 0:
                  base = 2.0f * nrand();
                  range = 0.5f + 3.0f * urand();
                  break;
                case 1:
                  base = (rng_next() & 1 ? 1.0f : -1.0f) * (900.0f + 200.0f * urand());
                  range = 1.0f + 7.0f * urand();
                  break;
                case 2:
                  base = -2e-5f * urand();
                  range = 1e-6f + 4e-5f * urand();
                  break;
                case 3:
                  base = -0.5f * (float)top * S;
                  range = (float)top * S;
                  break; /* a boundary at 0 */
                case 4:
                  base = nrand();
                  range = 0.0f;
                  break; /* constant */
                case 5:
                  base = 3.0f + nrand();
                  range = 0.0f;
                  break; /* 1-4 steps: set below */
                case 6:
                  base = nrand();
                  range = 2.0f;
                  break; /* with -Inf */
                case 7:
                  base = nrand();
                  range = 2.0f;
                  break; /* with +Inf */
                case 8:
                  base = 7e4f + 1e4f * urand();
                  range = 5e4f;
                  break; /* z = +Inf */
                default:
                  base = -9e4f - 1e4f * urand();
                  range = 5e4f;
                  break; /* z = -Inf */
              }
              lo[g] = to16(dt, base);
              hi[g] = kind[g] == 5 ? step16(lo[g], 1 + (int)(rng_next() % 4)) : to16(dt, base + range);
              if (from16(dt, hi[g]) < from16(dt, lo[g])) hi[g] = lo[g];
              uint16_t sh, zh;
              kivi_uniform_params(from16(dt, lo[g]), from16(dt, hi[g]), bits, &sh, &zh);
              sc[g] = kivi_f16_to_f32(sh);
              z[g] = kivi_f16_to_f32(zh);
              p0[g] = (int)(rng_next() % (uint64_t)group);
              p1[g] = (p0[g] + 1 + (int)(rng_next() % (uint64_t)(group - 1))) % group;
            }
            for (int64_t r = 0; r < rows; r++)
              for (int64_t c = 0; c < cols; c++) {
                const int64_t g = kivi_group_of(r, c, rows, cols, axis, group);
                const int i = (int)(axis ? c % group : r % group);
                uint16_t h;
                if (i == p0[g])
                  h = kind[g] == 6 ? to16(dt, -INFINITY) : lo[g];
                else if (i == p1[g])
                  h = kind[g] == 7 ? to16(dt, INFINITY) : hi[g];
                else if (kind[g] == 4)
                  h = lo[g];
                else {
                  const int k = 1 + (int)(rng_next() % (uint64_t)top);
                  const float b = z[g] + ((float)k - 0.5f) * sc[g];
                  h = step16(to16(dt, b), (int)(rng_next() % 7) - 3);
                  const float v = from16(dt, h);
                  if (!(v >= from16(dt, lo[g])))
                    h = lo[g]; /* keep the group's min and max */
                  else if (!(v <= from16(dt, hi[g])))
                    h = hi[g];
                }
                x[r * cols + c] = h;
              }
            buf bx = {0}, bc = {0}, bs = {0}, bz = {0};
            if (buf_new(C, G, &bx, (size_t)n * 2, x, 0) || buf_new(C, G, &bc, (size_t)nwords * 4, NULL, 0xab) ||
                buf_new(C, G, &bs, (size_t)groups * 2, NULL, 0xab) ||
                buf_new(C, G, &bz, (size_t)groups * 2, NULL, 0xab))
              goto out;
            const int32_t flags = trusted ? KIVI_FLAG_TRUSTED : 0;
            OK(C, uniform_quantize(C->ctx, bx.cpu, dt, rows, cols, axis, group, bits, flags, bc.cpu, bs.cpu, bz.cpu));
            OK(G, uniform_quantize(G->ctx, bx.gpu, dt, rows, cols, axis, group, bits, flags, bc.gpu, bs.gpu, bz.gpu));
            same_bits(G, &bc, "codes", tag);
            same_bits(G, &bs, "scale", tag);
            same_bits(G, &bz, "zero", tag);
            if (n_fail == fails0) pass("%s", tag);
          out:
            bufs_free(C, G, (buf *const[]){&bx, &bc, &bs, &bz, NULL});
            free(kind), free(p0), free(p1), free(lo), free(hi), free(x), free(z), free(sc);
          }
}

static void run_unaligned(lib *C, lib *G) {
  for (int axis = 0; axis < 2; axis++)
    for (int dt = 0; dt < 3; dt++) {
      const int64_t rows = 128, cols = 96;
      const int32_t group = 32, bits = dt == 1 ? 2 : 4;
      const int64_t n = rows * cols, groups = kivi_group_count(rows, cols, axis, group), nwords = n / (32 / bits);
      char tag[96];
      snprintf(tag, sizeof tag, "unaligned %s %s", aname(axis), dname(dt));
      const int fails0 = n_fail;
      const size_t es = dsize(dt);
      void *x = make_x(rows, cols, dt);
      void *xs1 = malloc((size_t)(n + 1) * es);
      memcpy((char *)xs1 + es, x, (size_t)n * es);
      buf bx = {0}, bc = {0}, bs = {0}, bz = {0}, bo = {0}, bcent = {0};
      if (buf_new(C, G, &bx, (size_t)(n + 1) * es, xs1, 0) || buf_new(C, G, &bc, (size_t)nwords * 4, NULL, 0) ||
          buf_new(C, G, &bs, (size_t)groups * 2, NULL, 0) || buf_new(C, G, &bz, (size_t)groups * 2, NULL, 0) ||
          buf_new(C, G, &bo, (size_t)(n + 1) * es, NULL, 0x5a) ||
          buf_new(C, G, &bcent, (size_t)groups * (1 << bits) * 2, NULL, 0))
        goto out;
      OK(C,
         uniform_quantize(C->ctx, (char *)bx.cpu + es, dt, rows, cols, axis, group, bits, 0, bc.cpu, bs.cpu, bz.cpu));
      OK(G,
         uniform_quantize(G->ctx, (char *)bx.gpu + es, dt, rows, cols, axis, group, bits, 0, bc.gpu, bs.gpu, bz.gpu));
      same_bits(G, &bc, "codes", tag);
      same_bits(G, &bs, "scale", tag);
      OK(C, uniform_dequantize(C->ctx, bc.cpu, bs.cpu, bz.cpu, rows, cols, axis, group, bits, (char *)bo.cpu + es, dt));
      OK(G, uniform_dequantize(G->ctx, bc.gpu, bs.gpu, bz.gpu, rows, cols, axis, group, bits, (char *)bo.gpu + es, dt));
      same_bits(G, &bo, "dequant (and the element before out untouched)", tag);
      OK(C, codebook_encode(C->ctx, (char *)bx.cpu + es, dt, rows, cols, axis, group, bits, KIVI_FIT_FREE, 8,
                            KIVI_ASSIGN_NEAREST, 0, bcent.cpu, bc.cpu));
      OK(G, codebook_encode(G->ctx, (char *)bx.gpu + es, dt, rows, cols, axis, group, bits, KIVI_FIT_FREE, 8,
                            KIVI_ASSIGN_NEAREST, 0, bcent.gpu, bc.gpu));
      same_bits(G, &bcent, "codebook_encode centroids", tag);
      same_bits(G, &bc, "codebook_encode codes", tag);
      if (n_fail == fails0) pass("%s", tag);
    out:
      free(x);
      free(xs1);
      bufs_free(C, G, (buf *const[]){&bx, &bc, &bs, &bz, &bo, &bcent, NULL});
    }
}

/* ---------------------------------------------------------------- pack / unpack ---------- */

static void run_pack(lib *C, lib *G) {
  const int64_t ns[] = {16, 48, 4096 + 16, 1000000};
  for (int bi = 0; bi < 2; bi++)
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++)
      for (int off = 0; off < 2; off++) {
        const int32_t bits = bi ? 4 : 2, cpw = 32 / bits;
        const int64_t n = ns[ni] / cpw * cpw;
        char tag[96];
        snprintf(tag, sizeof tag, "pack/unpack n=%lld bits=%d%s", (long long)n, bits, off ? " unaligned" : "");
        const int fails0 = n_fail;
        uint8_t *q = (uint8_t *)malloc((size_t)n + 1);
        for (int64_t i = 0; i <= n; i++) q[i] = (uint8_t)(rng_next() & ((1u << bits) - 1));
        buf bq = {0}, bw = {0}, bu = {0};
        void *h = NULL;
        if (buf_new(C, G, &bq, (size_t)n + 1, q, 0) || buf_new(C, G, &bw, (size_t)(n / cpw) * 4, NULL, 0x11) ||
            buf_new(C, G, &bu, (size_t)n + 1, NULL, 0x77))
          goto out;
        OK(C, codes_pack(C->ctx, (uint8_t *)bq.cpu + off, n, bits, (uint32_t *)bw.cpu));
        OK(G, codes_pack(G->ctx, (uint8_t *)bq.gpu + off, n, bits, (uint32_t *)bw.gpu));
        same_bits(G, &bw, "words", tag);
        OK(C, codes_unpack(C->ctx, (uint32_t *)bw.cpu, n, bits, (uint8_t *)bu.cpu + off));
        OK(G, codes_unpack(G->ctx, (uint32_t *)bw.gpu, n, bits, (uint8_t *)bu.gpu + off));
        same_bits(G, &bu, "unpacked", tag);
        /* a code >= 2^bits: KIVI_ERR_ARG, same message, words untouched */
        {
          const int64_t at = n / 2 + 1;
          uint8_t big = (uint8_t)(1u << bits);
          OK(G, mem_upload(G->ctx, (uint8_t *)bq.gpu + off + at, &big, 1));
          ((uint8_t *)bq.cpu)[off + at] = big;
          OK(G, mem_upload(G->ctx, bw.gpu, bw.cpu, bw.bytes));
          kivi_status sc = C->codes_pack(C->ctx, (uint8_t *)bq.cpu + off, n, bits, (uint32_t *)bw.cpu);
          char mc[512];
          snprintf(mc, sizeof mc, "%s", C->last_error());
          kivi_status sg = G->codes_pack(G->ctx, (uint8_t *)bq.gpu + off, n, bits, (uint32_t *)bw.gpu);
          if (sg != KIVI_ERR_ARG || sc != KIVI_ERR_ARG)
            fail("%s bad code: cpu %d gpu %d", tag, sc, sg);
          else if (strcmp(mc, G->last_error()))
            fail("%s bad code messages differ:\n  cpu: %s\n  gpu: %s", tag, mc, G->last_error());
          same_bits(G, &bw, "words after a rejected pack", tag);
        }
        (void)h;
        if (n_fail == fails0) pass("%s", tag);
      out:
        free(q);
        bufs_free(C, G, (buf *const[]){&bq, &bw, &bu, NULL});
      }
}

/* ---------------------------------------------------------------- errors ----------------- */

static void expect_same_error(lib *C, lib *G, const char *what, kivi_status sc, const char *mc, kivi_status sg,
                              const char *mg) {
  if (sc == KIVI_OK || sg != sc)
    fail("%s: cpu %s, gpu %s (%s)", what, C->status_str(sc), G->status_str(sg), mg);
  else if (strcmp(mc, mg))
    fail("%s: messages differ\n  cpu: %s\n  gpu: %s", what, mc, mg);
  else
    pass("%s -> %s: %s", what, G->status_str(sg), mg);
}

static void run_errors(lib *C, lib *G) {
  const int64_t rows = 64, cols = 64, n = rows * cols;
  buf bx = {0}, bc = {0}, bs = {0}, bz = {0}, bcent = {0};
  char mc[512];
  kivi_status sc, sg;
  float *x = (float *)make_x(rows, cols, KIVI_F32);
  if (buf_new(C, G, &bx, (size_t)n * 4, x, 0) || buf_new(C, G, &bc, (size_t)n, NULL, 0x3c) ||
      buf_new(C, G, &bs, 4096, NULL, 0x3c) || buf_new(C, G, &bz, 4096, NULL, 0x3c) ||
      buf_new(C, G, &bcent, 4096 * 8, NULL, 0x3c))
    goto out;

#define BOTH(what, call_c, call_g)                \
  sc = C->call_c;                                 \
  snprintf(mc, sizeof mc, "%s", C->last_error()); \
  sg = G->call_g;                                 \
  expect_same_error(C, G, what, sc, mc, sg, G->last_error());

  BOTH("group 48", uniform_quantize(C->ctx, bx.cpu, KIVI_F32, rows, cols, 0, 48, 2, 0, bc.cpu, bs.cpu, bz.cpu),
       uniform_quantize(G->ctx, bx.gpu, KIVI_F32, rows, cols, 0, 48, 2, 0, bc.gpu, bs.gpu, bz.gpu))
  BOTH("bits 3", uniform_quantize(C->ctx, bx.cpu, KIVI_F32, rows, cols, 0, 32, 3, 0, bc.cpu, bs.cpu, bz.cpu),
       uniform_quantize(G->ctx, bx.gpu, KIVI_F32, rows, cols, 0, 32, 3, 0, bc.gpu, bs.gpu, bz.gpu))
  BOTH("rows not a multiple of group",
       uniform_quantize(C->ctx, bx.cpu, KIVI_F32, 48, cols, 0, 32, 2, 0, bc.cpu, bs.cpu, bz.cpu),
       uniform_quantize(G->ctx, bx.gpu, KIVI_F32, 48, cols, 0, 32, 2, 0, bc.gpu, bs.gpu, bz.gpu))
  BOTH("dtype 7", stats_block(C->ctx, bx.cpu, 7, rows, cols, 1, 32, (float *)bcent.cpu, (int32_t *)bs.cpu),
       stats_block(G->ctx, bx.gpu, 7, rows, cols, 1, 32, (float *)bcent.gpu, (int32_t *)bs.gpu))
  BOTH("NULL codes", uniform_quantize(C->ctx, bx.cpu, KIVI_F32, rows, cols, 0, 32, 2, 0, NULL, bs.cpu, bz.cpu),
       uniform_quantize(G->ctx, bx.gpu, KIVI_F32, rows, cols, 0, 32, 2, 0, NULL, bs.gpu, bz.gpu))
  BOTH("max_iters 0",
       codebook_fit(C->ctx, bx.cpu, KIVI_F32, rows, cols, 0, 32, 2, 0, 0, 0, (uint16_t *)bcent.cpu, NULL, NULL),
       codebook_fit(G->ctx, bx.gpu, KIVI_F32, rows, cols, 0, 32, 2, 0, 0, 0, (uint16_t *)bcent.gpu, NULL, NULL))
  BOTH("flags 6", uniform_quantize(C->ctx, bx.cpu, KIVI_F32, rows, cols, 0, 32, 2, 6, bc.cpu, bs.cpu, bz.cpu),
       uniform_quantize(G->ctx, bx.gpu, KIVI_F32, rows, cols, 0, 32, 2, 6, bc.gpu, bs.gpu, bz.gpu))
  BOTH("pack n=10", codes_pack(C->ctx, (uint8_t *)bc.cpu, 10, 2, (uint32_t *)bs.cpu),
       codes_pack(G->ctx, (uint8_t *)bc.gpu, 10, 2, (uint32_t *)bs.gpu))

  /* unsorted centroids: KIVI_ERR_ARG, codes untouched */
  {
    const int64_t groups = kivi_group_count(rows, cols, 0, 32);
    uint16_t *cent = (uint16_t *)malloc((size_t)groups * 4 * 2);
    for (int64_t g = 0; g < groups * 4; g++) cent[g] = kivi_f32_to_f16((float)(g % 4) - 1.0f);
    cent[5 * 4 + 2] = kivi_f32_to_f16(-3.0f);
    memcpy(bcent.cpu, cent, (size_t)groups * 8);
    OK(G, mem_upload(G->ctx, bcent.gpu, cent, (size_t)groups * 8));
    free(cent);
    BOTH("unsorted centroids",
         codebook_quantize(C->ctx, bx.cpu, KIVI_F32, rows, cols, 0, 32, 2, (uint16_t *)bcent.cpu, 0, 0,
                           (uint32_t *)bc.cpu),
         codebook_quantize(G->ctx, bx.gpu, KIVI_F32, rows, cols, 0, 32, 2, (uint16_t *)bcent.gpu, 0, 0,
                           (uint32_t *)bc.gpu))
    same_bits(G, &bc, "codes after rejected centroids", "errors");
  }

  /* NaN / Inf: KIVI_ERR_NONFINITE naming x, nothing written */
  {
    const float bad[3] = {NAN, INFINITY, -INFINITY};
    for (int k = 0; k < 3; k++) {
      const int64_t at = 1000 + 37 * k;
      float keep = x[at];
      x[at] = bad[k];
      memcpy(bx.cpu, x, (size_t)n * 4);
      OK(G, mem_upload(G->ctx, bx.gpu, x, (size_t)n * 4));
      BOTH(k == 0 ? "NaN in x (uniform)" : (k == 1 ? "+Inf in x (uniform)" : "-Inf in x (uniform)"),
           uniform_quantize(C->ctx, bx.cpu, KIVI_F32, rows, cols, k % 2, 32, 2, 0, bc.cpu, bs.cpu, bz.cpu),
           uniform_quantize(G->ctx, bx.gpu, KIVI_F32, rows, cols, k % 2, 32, 2, 0, bc.gpu, bs.gpu, bz.gpu))
      if (sg != KIVI_ERR_NONFINITE || !strstr(G->last_error(), " x "))
        fail("nonfinite: message must name x: %s", G->last_error());
      BOTH("NaN/Inf in x (codebook_encode)",
           codebook_encode(C->ctx, bx.cpu, KIVI_F32, rows, cols, 0, 32, 2, 0, 4, 0, 0, (uint16_t *)bcent.cpu,
                           (uint32_t *)bc.cpu),
           codebook_encode(G->ctx, bx.gpu, KIVI_F32, rows, cols, 0, 32, 2, 0, 4, 0, 0, (uint16_t *)bcent.gpu,
                           (uint32_t *)bc.gpu))
      BOTH("NaN/Inf in x (codebook_fit)",
           codebook_fit(C->ctx, bx.cpu, KIVI_F32, rows, cols, 1, 32, 4, 1, 4, 0, (uint16_t *)bcent.cpu, NULL, NULL),
           codebook_fit(G->ctx, bx.gpu, KIVI_F32, rows, cols, 1, 32, 4, 1, 4, 0, (uint16_t *)bcent.gpu, NULL, NULL))
      same_bits(G, &bc, "codes after NaN rejection (sentinel untouched)", "errors");
      same_bits(G, &bs, "scale after NaN rejection (sentinel untouched)", "errors");
      same_bits(G, &bcent, "centroids after NaN rejection (sentinel untouched)", "errors");
      /* trusted: must not fault; ctx still fine */
      sg = G->uniform_quantize(G->ctx, bx.gpu, KIVI_F32, rows, cols, 0, 32, 2, KIVI_FLAG_TRUSTED, bc.gpu, bs.gpu,
                               bz.gpu);
      if (sg ||
          (sg = G->codebook_encode(G->ctx, bx.gpu, KIVI_F32, rows, cols, 1, 32, 4, 0, 16, 0, KIVI_FLAG_TRUSTED,
                                   (uint16_t *)bcent.gpu, (uint32_t *)bc.gpu)) ||
          (sg = G->ctx_synchronize(G->ctx)))
        fail("trusted NaN input: %s %s", G->status_str(sg), G->last_error());
      else
        pass("trusted NaN/Inf input runs without a fault");
      /* restore the sentinels for the next round */
      memset(bc.cpu, 0x3c, bc.bytes);
      memset(bs.cpu, 0x3c, bs.bytes);
      memset(bcent.cpu, 0x3c, bcent.bytes);
      OK(G, mem_upload(G->ctx, bc.gpu, bc.cpu, bc.bytes));
      OK(G, mem_upload(G->ctx, bs.gpu, bs.cpu, bs.bytes));
      OK(G, mem_upload(G->ctx, bcent.gpu, bcent.cpu, bcent.bytes));
      x[at] = keep;
    }
    /* stats counts them rather than failing */
    x[5] = NAN;
    x[6] = INFINITY;
    memcpy(bx.cpu, x, (size_t)n * 4);
    OK(G, mem_upload(G->ctx, bx.gpu, x, (size_t)n * 4));
    buf bst = {0}, bnf = {0};
    const int64_t groups = kivi_group_count(rows, cols, 1, 32);
    if (buf_new(C, G, &bst, (size_t)groups * 16, NULL, 0) || buf_new(C, G, &bnf, (size_t)groups * 4, NULL, 0)) goto out;
    OK(C, stats_block(C->ctx, bx.cpu, KIVI_F32, rows, cols, 1, 32, (float *)bst.cpu, (int32_t *)bnf.cpu));
    OK(G, stats_block(G->ctx, bx.gpu, KIVI_F32, rows, cols, 1, 32, (float *)bst.gpu, (int32_t *)bnf.gpu));
    if (same_bits(G, &bnf, "nonfinite counts", "stats with NaN") &
        same_bits(G, &bst, "stats (finite values only)", "stats with NaN"))
      pass("stats with NaN/Inf: counts and finite-only stats match");
    buf_free(C, G, &bst);
    buf_free(C, G, &bnf);
  }

  /* a CUDA failure: 1 TB allocation -> an error carrying CUDA's message; the context still works */
  {
    void *p = NULL;
    sg = G->mem_alloc(G->ctx, 1ull << 40, &p);
    const char *m = G->last_error();
    if (sg == KIVI_OK) {
      fail("kivi_mem_alloc(1 TB) succeeded");
      G->mem_free(G->ctx, p);
    } else if ((sg != KIVI_ERR_NOMEM && sg != KIVI_ERR_CUDA) || !strstr(m, "cuda")) {
      fail("kivi_mem_alloc(1 TB): %s %s", G->status_str(sg), m);
    } else if (strcmp(m, G->ctx_last_error(G->ctx))) {
      fail("kivi_mem_alloc(1 TB): thread and ctx messages differ");
    } else {
      pass("kivi_mem_alloc(1 TB) -> %s: %s", G->status_str(sg), m);
      uint32_t a[4] = {1, 2, 3, 4}, b[4] = {0};
      void *q = NULL;
      if (G->mem_alloc(G->ctx, 16, &q) || G->mem_upload(G->ctx, q, a, 16) || G->mem_download(G->ctx, b, q, 16) ||
          memcmp(a, b, 16) || G->mem_free(G->ctx, q) || G->ctx_synchronize(G->ctx))
        fail("context unusable after a failed allocation: %s", G->last_error());
      else
        pass("context works after the failed allocation");
    }
  }
out:
  free(x);
  bufs_free(C, G, (buf *const[]){&bx, &bc, &bs, &bz, &bcent, NULL});
}

/* ---------------------------------------------------------------- bench ------------------ */

static int bench(lib *G) {
  const int64_t rows = 262144, cols = 4096, n = rows * cols; /* 8 seqs x 32768 tokens, 32 heads x 128 */
  const int32_t group = 32, bits = 2, runs = 10;
  char name[256] = "";
  G->ctx_device_name(G->ctx, name, sizeof name);
  double copy = 0;
  if (G->bench_copy(G->ctx, 1ull << 30, 20, &copy)) {
    printf("FAIL bench_copy: %s\n", G->last_error());
    return 1;
  }
  printf("device: %s\ncopy bandwidth (1 GiB D2D, read + write): %.1f GB/s\n", name, copy);
  const int64_t groups = n / group, nwords = n / (32 / bits);
  void *x = NULL, *codes = NULL, *scale = NULL, *zero = NULL, *cent = NULL;
  if (G->mem_alloc(G->ctx, (uint64_t)n * 2, &x) || G->mem_alloc(G->ctx, (uint64_t)nwords * 4, &codes) ||
      G->mem_alloc(G->ctx, (uint64_t)groups * 2, &scale) || G->mem_alloc(G->ctx, (uint64_t)groups * 2, &zero) ||
      G->mem_alloc(G->ctx, (uint64_t)groups * 4 * 2, &cent)) {
    printf("FAIL bench alloc: %s\n", G->last_error());
    return 1;
  }
  /* random fp16 data, 32 MiB at a time */
  const int64_t chunk = 1 << 24;
  uint16_t *h = (uint16_t *)malloc((size_t)chunk * 2);
  for (int64_t i = 0; i < chunk; i++) h[i] = kivi_f32_to_f16(nrand() * ((i % cols) % 13 == 5 ? 20.0f : 1.0f));
  for (int64_t off = 0; off < n; off += chunk)
    if (G->mem_upload(G->ctx, (uint16_t *)x + off, h, (uint64_t)chunk * 2)) {
      printf("FAIL bench upload: %s\n", G->last_error());
      return 1;
    }
  free(h);
  printf("%-46s %9s %9s %7s\n", "op (rows=262144 cols=4096 f16 G=32 2-bit)", "ms", "GB/s", "/copy");
  int rc = 0;
  for (int op = 0; op < 8; op++) {
    const kivi_axis axis = (kivi_axis)(op & 1);
    const int kind = op >> 1; /* 0 uniform trusted, 1 uniform with NaN scan, 2 codebook encode, 3 codebook quantize */
    const int32_t flags = kind == 1 ? 0 : KIVI_FLAG_TRUSTED;
    double bytes = (double)n * 2 + (double)nwords * 4;
    bytes += kind < 2 ? (double)groups * 4 : (double)groups * 8;
    /* bytes of the op itself (x once, codes and params); the NaN scan's second read of x and the
       centroid check of codebook_quantize are overhead inside the measured time */
    const char *names[4] = {"uniform_quantize (trusted)", "uniform_quantize (NaN scan)", "codebook_encode free 8 it",
                            "codebook_quantize nearest"};
    kivi_status st = KIVI_OK;
    float ms = 0;
    for (int r = -1; r < runs && !st; r++) {
      if (r == 0) st = G->timer_start(G->ctx);
      if (st) break;
      if (kind < 2)
        st = G->uniform_quantize(G->ctx, x, KIVI_F16, rows, cols, axis, group, bits, flags, (uint32_t *)codes,
                                 (uint16_t *)scale, (uint16_t *)zero);
      else if (kind == 2)
        st = G->codebook_encode(G->ctx, x, KIVI_F16, rows, cols, axis, group, bits, KIVI_FIT_FREE, 8,
                                KIVI_ASSIGN_NEAREST, flags, (uint16_t *)cent, (uint32_t *)codes);
      else
        st = G->codebook_quantize(G->ctx, x, KIVI_F16, rows, cols, axis, group, bits, (uint16_t *)cent,
                                  KIVI_ASSIGN_NEAREST, flags, (uint32_t *)codes);
      if (!st && r == -1) st = G->ctx_synchronize(G->ctx);
    }
    if (!st) st = G->timer_stop(G->ctx, &ms);
    if (st) {
      printf("FAIL %s %s: %s\n", names[kind], aname(axis), G->last_error());
      rc = 1;
      continue;
    }
    const double per = ms / runs, gbps = bytes / (per * 1e-3) / 1e9;
    char label[96];
    snprintf(label, sizeof label, "%s, %s", names[kind], axis ? "values/channel" : "keys/token");
    printf("%-46s %9.3f %9.1f %6.1f%%\n", label, per, gbps, 100.0 * gbps / copy);
  }
  G->mem_free(G->ctx, x);
  G->mem_free(G->ctx, codes);
  G->mem_free(G->ctx, scale);
  G->mem_free(G->ctx, zero);
  G->mem_free(G->ctx, cent);
  printf("target: uniform_quantize (trusted) >= 60%% of copy bandwidth\n");
  return rc;
}

/* ---------------------------------------------------------------- main ------------------- */

int main(int argc, char **argv) {
  const char *cpu_path = getenv("KIVI_CPU_LIB") ? getenv("KIVI_CPU_LIB") : "build/libkivi_cpu.so";
  const char *gpu_path = getenv("KIVI_CUDA_LIB") ? getenv("KIVI_CUDA_LIB") : "build/libkivi_cuda.so";
  const int is_bench = argc > 1 && !strcmp(argv[1], "bench");
  g_seed = argc > 1 && !is_bench ? strtoull(argv[1], NULL, 10) : 12345;
  rng_state = g_seed * 0x9E3779B97F4A7C15ull + 1;

  lib C, G;
  if (lib_open(&G, "cuda", gpu_path)) return 2;
  if (is_bench) return bench(&G);
  if (lib_open(&C, "cpu", cpu_path)) return 2;

  if (C.abi_version() != G.abi_version() || G.abi_version() != KIVI_ABI_VERSION) fail("abi versions differ");
  if (C.backend_kind() != 0 || G.backend_kind() != 1) fail("backend kinds %d/%d", C.backend_kind(), G.backend_kind());
  int32_t count = 0;
  char dev[256] = "";
  if (G.device_count(&count) || count < 1 || G.ctx_device_name(G.ctx, dev, sizeof dev))
    fail("device: %s", G.last_error());
  else
    pass("device %s (%d visible), seed %llu", dev, count, (unsigned long long)g_seed);

  /* "gpu_vs_cpu SEED quick": the boundary and unaligned cases only (small: for compute-sanitizer) */
  const int quick = argc > 2 && !strcmp(argv[2], "quick");
  int iter_no = 0;
  const int64_t tok_rows[] = {96, 384, 4096}, tok_cols[] = {40, 128, 4096};
  const int64_t ch_rows[] = {5, 17, 1000}, ch_cols[] = {64, 128, 4096};
  const int32_t groups_[] = {32, 64, 128};
  for (int axis = 0; axis < 2 && !quick; axis++)
    for (int ri = 0; ri < 3; ri++)
      for (int ci = 0; ci < 3; ci++)
        for (int dt = 0; dt < 3; dt++)
          for (int gi = 0; gi < 3; gi++)
            for (int b = 2; b <= 4; b += 2) {
              const int64_t rows = axis ? ch_rows[ri] : tok_rows[ri], cols = axis ? ch_cols[ci] : tok_cols[ci];
              const int32_t group = groups_[gi];
              if ((axis == 0 ? rows : cols) % group) continue;
              const int big = rows * cols > (1 << 20);
              /* the CPU's codebook fit is slow on the largest sizes: there, one dtype only */
              const int do_cb = !big || (dt == KIVI_F16 && gi == 0);
              run_case(&C, &G, (kivi_axis)axis, rows, cols, (kivi_dtype)dt, group, b, do_cb, iter_no++);
            }
  printf(
      "codebook: max |centroid diff| %.3g, max diff / bound %.3g, codes differing near a boundary %lld, "
      "iters differing %lld, max inertia rel diff %.3g; stats max rel diff %.3g\n",
      max_cent_diff, max_cent_excess, (long long)code_boundary_diffs, (long long)iters_diffs, max_inertia_rel,
      max_stats_rel);
  run_boundary(&C, &G);
  run_unaligned(&C, &G);
  if (!quick) {
    run_pack(&C, &G);
    run_errors(&C, &G);
  }

  G.ctx_destroy(G.ctx);
  C.ctx_destroy(C.ctx);
  printf("SUMMARY %d passed, %d failed (seed %llu)\n", n_pass, n_fail, (unsigned long long)g_seed);
  return n_fail ? 1 : 0;
}
