/*
 * cache_smoke.c — C smoke test of the paged KV cache in the CPU reference build.
 *
 *   gcc -std=c11 -O1 -g -Wall -Wextra -Icuda/include tests/c/cache_smoke.c -Lbuild -lkivi_cpu -lm -o build/cache_smoke
 *   LD_LIBRARY_PATH=build build/cache_smoke [seed] [--bench] [--quick]
 *
 * A host mirror keeps every appended token rounded to fp16 (the cache's storage precision). The
 * expected read-back is computed independently: pages = the standalone quantizer ops (uniform or
 * codebook encode + dequantize) on the mirror's first qlen tokens per head, window = the mirror itself;
 * qlen = the largest multiple of F with len - qlen >= R (0 below R + F). Attention is checked against
 * a plain double softmax over kivi_cache_read's K and V. Error paths check that nothing changed.
 * --bench times kivi_cache_attend for 1 sequence x 4096 tokens x 32 heads x 128 dims, 2-bit vs 16-bit.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kivi.h"
#include "kivi_format.h"
#include "harness.h"

static float f16r(float f) { return kivi_f16_to_f32(kivi_f32_to_f16(f)); }

/* ---------------------------------------------------------------- config ----------------- */

typedef struct tcfg {
  const char *name;
  int32_t a[KIVI_CFG_FIELDS];
} tcfg;

static tcfg make_cfg(const char *name, int32_t layers, int32_t kvh, int32_t qh, int32_t D, int32_t P, int32_t R,
                     int32_t max_pages, int32_t max_seqs, int32_t kk, int32_t kb, int32_t kg, int32_t vk, int32_t vb,
                     int32_t vg) {
  /* kivi.h's KIVI_CFG_* order; pinned codebook keys (12 iterations), free values (20) */
  const tcfg t = {
      name,
      {layers, kvh, qh, D, P, R, max_pages, max_seqs, kk, kb, kg, KIVI_FIT_PINNED, 12, vk, vb, vg, KIVI_FIT_FREE, 20}};
  return t;
}

/* ---------------------------------------------------------------- mirror ----------------- */

typedef struct mirror {
  int64_t len, cap;
  float *k, *v; /* [cap][H][D], fp16-rounded values */
} mirror;

typedef struct tcache {
  kivi_ctx_t ctx;
  kivi_cache_t c;
  const int32_t *a;
  int32_t L, H, QH, D, P, R, F;
  int64_t row; /* H * D */
} tcache;

static void mirror_reserve(mirror *m, int64_t need, int64_t row) {
  if (need <= m->cap) return;
  int64_t cap = m->cap ? m->cap : 64;
  while (cap < need) cap *= 2;
  m->k = realloc(m->k, sizeof(float) * (size_t)(cap * row));
  m->v = realloc(m->v, sizeof(float) * (size_t)(cap * row));
  m->cap = cap;
}

/* Random K / V input for `layers` layers x n tokens in dt; returns the buffers. */
static void make_kv(const tcache *t, int32_t layers, int32_t n, kivi_dtype dt, void **k, void **v) {
  const int64_t total = (int64_t)layers * n * t->row;
  *k = malloc((size_t)total * dsize(dt));
  *v = malloc((size_t)total * dsize(dt));
  for (int64_t i = 0; i < total; i++) {
    const int64_t c = i % t->D;
    const double ko = (c % 11 == 3 ? 9.0 : 1.0), koff = (c % 5 == 1 ? 3.0 : 0.0);
    set_elem(*k, dt, i, (float)(rng_normal() * ko + koff));
    set_elem(*v, dt, i, (float)(rng_normal() * (c % 13 == 7 ? 4.0 : 1.0)));
  }
}

/* Appends to the cache and (on success) the mirrors of the affected layers. */
static kivi_status do_append(tcache *t, mirror *ms, int32_t seq, int32_t layer, const void *k, const void *v,
                             kivi_dtype dt, int32_t n, int32_t flags) {
  kivi_status st = kivi_cache_append(t->c, seq, layer, k, v, dt, n, flags);
  if (st) return st;
  const int32_t L0 = layer < 0 ? 0 : layer, L1 = layer < 0 ? t->L : layer + 1;
  for (int32_t l = L0; l < L1; l++) {
    mirror *m = &ms[l];
    mirror_reserve(m, m->len + n, t->row);
    const int64_t src = (int64_t)(l - L0) * n * t->row;
    for (int64_t i = 0; i < (int64_t)n * t->row; i++) {
      m->k[m->len * t->row + i] = f16r(get_elem(k, dt, src + i));
      m->v[m->len * t->row + i] = f16r(get_elem(v, dt, src + i));
    }
    m->len += n;
  }
  return st;
}

static int64_t expect_qlen(const tcache *t, int64_t len) { return len >= t->R + t->F ? (len - t->R) / t->F * t->F : 0; }

/* Lengths of every layer against the mirrors, and the page count. */
static void check_lengths(const tcache *t, const mirror *ms, int32_t seq, const char *what) {
  int64_t max_q = 0;
  for (int32_t l = 0; l < t->L; l++) {
    int64_t len = -1, q = -1;
    CHECK(kivi_cache_seq_length(t->c, seq, l, &len, &q) == KIVI_OK, "seq_length");
    const int64_t eq = expect_qlen(t, ms[l].len);
    CHECK(len == ms[l].len && q == eq, "%s: layer %d len %lld (want %lld) qlen %lld (want %lld)", what, l,
          (long long)len, (long long)ms[l].len, (long long)q, (long long)eq);
    CHECK(q % t->F == 0 && len - q < t->R + t->F && (q == 0 || len - q >= t->R), "%s: invariants", what);
    max_q = q > max_q ? q : max_q;
  }
  int32_t count = -1;
  CHECK(kivi_cache_seq_pages(t->c, seq, NULL, 0, &count) == KIVI_OK, "seq_pages");
  CHECK(count == (int32_t)((max_q + t->P - 1) / t->P), "%s: pages %d, want %lld", what, count,
        (long long)((max_q + t->P - 1) / t->P));
}

/* Standalone quantize + dequantize of x [rows][cols] (f32) with the part's format into y. */
static void standalone(const tcache *t, int is_v, const float *x, int64_t rows, int64_t cols, float *y) {
  const int32_t *a = t->a;
  const int o = is_v ? KIVI_CFG_V_KIND - KIVI_CFG_K_KIND : 0;
  const int32_t kind = a[KIVI_CFG_K_KIND + o], bits = a[KIVI_CFG_K_BITS + o], G = a[KIVI_CFG_K_GROUP + o];
  const kivi_axis axis = is_v ? KIVI_AXIS_CHANNEL : KIVI_AXIS_TOKEN;
  if (bits == 16) {
    memcpy(y, x, sizeof(float) * (size_t)(rows * cols));
    return;
  }
  const int64_t groups = kivi_group_count(rows, cols, axis, G), words = kivi_word_count(rows, cols, bits);
  uint32_t *codes = malloc(sizeof(uint32_t) * (size_t)words);
  kivi_status st;
  if (kind == KIVI_KIND_UNIFORM) {
    uint16_t *s = malloc(2 * (size_t)groups), *z = malloc(2 * (size_t)groups);
    st = kivi_uniform_quantize(t->ctx, x, KIVI_F32, rows, cols, axis, G, bits, 0, codes, s, z);
    if (!st) st = kivi_uniform_dequantize(t->ctx, codes, s, z, rows, cols, axis, G, bits, y, KIVI_F32);
    free(s);
    free(z);
  } else {
    uint16_t *cent = malloc(2 * (size_t)groups << bits);
    st = kivi_codebook_encode(t->ctx, x, KIVI_F32, rows, cols, axis, G, bits, a[KIVI_CFG_K_FIT + o],
                              a[KIVI_CFG_K_ITERS + o], KIVI_ASSIGN_NEAREST, 0, cent, codes);
    if (!st) st = kivi_codebook_dequantize(t->ctx, codes, cent, rows, cols, axis, G, bits, y, KIVI_F32);
    free(cent);
  }
  CHECK(st == KIVI_OK, "standalone quantizer");
  free(codes);
}

/* Expected read-back of one layer: ek, ev [len][H][D]. */
static void expected_read(const tcache *t, const mirror *m, float *ek, float *ev) {
  const int64_t len = m->len, q = expect_qlen(t, len), D = t->D;
  memcpy(ek, m->k, sizeof(float) * (size_t)(len * t->row));
  memcpy(ev, m->v, sizeof(float) * (size_t)(len * t->row));
  if (!q) return;
  float *x = malloc(sizeof(float) * (size_t)(q * D)), *y = malloc(sizeof(float) * (size_t)(q * D));
  for (int is_v = 0; is_v < 2; is_v++) {
    const float *src = is_v ? m->v : m->k;
    float *dst = is_v ? ev : ek;
    for (int32_t h = 0; h < t->H; h++) {
      for (int64_t i = 0; i < q; i++) memcpy(x + i * D, src + i * t->row + h * D, sizeof(float) * (size_t)D);
      standalone(t, is_v, x, q, D, y);
      for (int64_t i = 0; i < q; i++) memcpy(dst + i * t->row + h * D, y + i * D, sizeof(float) * (size_t)D);
    }
  }
  free(x);
  free(y);
}

static int64_t first_diff(const float *a, const float *b, int64_t n) {
  for (int64_t i = 0; i < n; i++)
    if (memcmp(&a[i], &b[i], 4)) return i;
  return -1;
}

/* Double-precision reference attention for one query [QH][D] over K, V [len][H][D]. */
static void ref_attend(const tcache *t, const float *K, const float *V, int64_t len, const float *q, float scale,
                       double *out) {
  const int32_t ratio = t->QH / t->H, D = t->D;
  double *s = malloc(sizeof(double) * (size_t)len);
  for (int32_t h = 0; h < t->QH; h++) {
    const int32_t kh = h / ratio;
    double m = -INFINITY, sum = 0;
    for (int64_t i = 0; i < len; i++) {
      double acc = 0;
      for (int32_t d = 0; d < D; d++) acc += (double)q[h * D + d] * (double)K[i * t->row + kh * D + d];
      s[i] = (double)scale * acc;
      if (s[i] > m) m = s[i];
    }
    for (int64_t i = 0; i < len; i++) {
      s[i] = exp(s[i] - m);
      sum += s[i];
    }
    for (int32_t d = 0; d < D; d++) {
      double acc = 0;
      for (int64_t i = 0; i < len; i++) acc += s[i] * (double)V[i * t->row + kh * D + d];
      out[h * D + d] = acc / sum;
    }
  }
  free(s);
}

/* Full check of one sequence: lengths, read in three dtypes against the expectation. */
static void check_read(tcache *t, const mirror *ms, int32_t seq, const char *what) {
  check_lengths(t, ms, seq, what);
  for (int32_t l = 0; l < t->L; l++) {
    const int64_t n = ms[l].len * t->row;
    float *k = malloc(sizeof(float) * (size_t)(n + 1)), *v = malloc(sizeof(float) * (size_t)(n + 1));
    float *ek = malloc(sizeof(float) * (size_t)(n + 1)), *ev = malloc(sizeof(float) * (size_t)(n + 1));
    k[n] = v[n] = 12345.0f; /* a guard past the end */
    CHECK(kivi_cache_read(t->c, seq, l, k, v, KIVI_F32) == KIVI_OK, "read");
    CHECK(k[n] == 12345.0f && v[n] == 12345.0f, "%s: read wrote past length", what);
    expected_read(t, &ms[l], ek, ev);
    int64_t dk = first_diff(k, ek, n), dv = first_diff(v, ev, n);
    CHECK(dk < 0, "%s layer %d: K read differs at %lld (token %lld): %.9g vs %.9g", what, l, (long long)dk,
          (long long)(dk / t->row), dk >= 0 ? k[dk] : 0.0, dk >= 0 ? ek[dk] : 0.0);
    CHECK(dv < 0, "%s layer %d: V read differs at %lld (token %lld): %.9g vs %.9g", what, l, (long long)dv,
          (long long)(dv / t->row), dv >= 0 ? v[dv] : 0.0, dv >= 0 ? ev[dv] : 0.0);
    /* f16 / bf16 read = the f32 read converted */
    uint16_t *kh = malloc(2 * (size_t)(n + 1)), *vh = malloc(2 * (size_t)(n + 1));
    for (kivi_dtype dt = KIVI_F16; dt <= KIVI_BF16; dt++) {
      CHECK(kivi_cache_read(t->c, seq, l, kh, vh, dt) == KIVI_OK, "read dt %d", dt);
      int bad = 0;
      for (int64_t i = 0; i < n; i++) {
        uint16_t ke = dt == KIVI_F16 ? kivi_f32_to_f16(k[i]) : kivi_f32_to_bf16(k[i]);
        uint16_t ve = dt == KIVI_F16 ? kivi_f32_to_f16(v[i]) : kivi_f32_to_bf16(v[i]);
        bad += kh[i] != ke || vh[i] != ve;
      }
      CHECK(!bad, "%s: read dtype %d: %d mismatches", what, dt, bad);
    }
    free(kh);
    free(vh);
    free(k);
    free(v);
    free(ek);
    free(ev);
  }
}

/* Attention of a batch (seqs may repeat) against the double reference over kivi_cache_read. */
static void check_attend(tcache *t, const mirror *const *mss, const int32_t *seqs, int32_t batch, int32_t layer,
                         const char *what) {
  const int64_t qn = (int64_t)t->QH * t->D;
  float *q = malloc(sizeof(float) * (size_t)(batch * qn)), *out = malloc(sizeof(float) * (size_t)(batch * qn));
  uint16_t *qh = malloc(2 * (size_t)(batch * qn)), *oh = malloc(2 * (size_t)(batch * qn));
  for (int64_t i = 0; i < batch * qn; i++) q[i] = (float)(rng_normal() * 0.7);
  const float scale = 1.0f / sqrtf((float)t->D);
  CHECK(kivi_cache_attend(t->c, layer, seqs, batch, q, KIVI_F32, scale, 0, out, KIVI_F32) == KIVI_OK, "%s: attend",
        what);
  double *ref = malloc(sizeof(double) * (size_t)qn);
  double worst = 0;
  for (int32_t b = 0; b < batch; b++) {
    const int64_t len = mss[b][layer].len, n = len * t->row;
    float *k = malloc(sizeof(float) * (size_t)n), *v = malloc(sizeof(float) * (size_t)n);
    CHECK(kivi_cache_read(t->c, seqs[b], layer, k, v, KIVI_F32) == KIVI_OK, "read");
    ref_attend(t, k, v, len, q + b * qn, scale, ref);
    double vmax = 0;
    for (int64_t i = 0; i < n; i++) vmax = fabs(v[i]) > vmax ? fabs(v[i]) : vmax;
    for (int64_t i = 0; i < qn; i++) {
      const double e = fabs((double)out[b * qn + i] - ref[i]) / (fabs(ref[i]) + 1e-6 * vmax);
      worst = e > worst ? e : worst;
    }
    free(k);
    free(v);
  }
  CHECK(worst <= 1e-6, "%s: attention relative error %.3g", what, worst);
  /* f16 q and f16 / bf16 out: same math on the f16-rounded q, output converted */
  for (int64_t i = 0; i < batch * qn; i++) {
    qh[i] = kivi_f32_to_f16(q[i]);
    q[i] = kivi_f16_to_f32(qh[i]);
  }
  CHECK(kivi_cache_attend(t->c, layer, seqs, batch, q, KIVI_F32, scale, 0, out, KIVI_F32) == KIVI_OK, "attend");
  for (kivi_dtype dt = KIVI_F16; dt <= KIVI_BF16; dt++) {
    CHECK(kivi_cache_attend(t->c, layer, seqs, batch, qh, KIVI_F16, scale, 0, oh, dt) == KIVI_OK, "attend f16");
    int bad = 0;
    for (int64_t i = 0; i < batch * qn; i++)
      bad += oh[i] != (dt == KIVI_F16 ? kivi_f32_to_f16(out[i]) : kivi_f32_to_bf16(out[i]));
    CHECK(!bad, "%s: attend f16 q, out dtype %d: %d mismatches", what, dt, bad);
  }
  free(ref);
  free(q);
  free(out);
  free(qh);
  free(oh);
}

static int open_cache(tcache *t, kivi_ctx_t ctx, const tcfg *cfg) {
  memset(t, 0, sizeof *t);
  t->ctx = ctx;
  t->a = cfg->a;
  t->L = cfg->a[KIVI_CFG_LAYERS];
  t->H = cfg->a[KIVI_CFG_KV_HEADS];
  t->QH = cfg->a[KIVI_CFG_Q_HEADS];
  t->D = cfg->a[KIVI_CFG_HEAD_DIM];
  t->P = cfg->a[KIVI_CFG_PAGE_TOKENS];
  t->R = cfg->a[KIVI_CFG_RESIDUAL];
  t->F = cfg->a[KIVI_CFG_K_GROUP];
  t->row = (int64_t)t->H * t->D;
  kivi_status st = kivi_cache_create(ctx, cfg->a, KIVI_CFG_FIELDS, &t->c);
  CHECK(st == KIVI_OK, "%s: create", cfg->name);
  return st == KIVI_OK;
}

static void free_mirrors(mirror *ms, int32_t L) {
  for (int32_t l = 0; l < L; l++) {
    free(ms[l].k);
    free(ms[l].v);
    ms[l] = (mirror){0};
  }
}

/* ---------------------------------------------------------------- prefill + decode ------- */

static void test_prefill_decode(kivi_ctx_t ctx, const tcfg *cfg) {
  tcache t;
  if (!open_cache(&t, ctx, cfg)) return;
  const int64_t lens[] = {1, 31, t.R, t.R + t.F, 97, 1000};
  for (size_t li = 0; li < sizeof lens / sizeof lens[0]; li++) {
    const int32_t n0 = (int32_t)lens[li];
    if (n0 < 1) continue;
    char what[160];
    mirror ms[4] = {{0}}, ms2[4] = {{0}};
    int32_t seq = -1, other = -1;
    CHECK(kivi_cache_seq_create(t.c, &seq) == KIVI_OK, "seq_create");
    /* prefill: all layers at once (odd cases) or layer by layer */
    const kivi_dtype dt = (kivi_dtype)(li % 3);
    void *k, *v;
    if (li % 2) {
      make_kv(&t, t.L, n0, dt, &k, &v);
      CHECK(do_append(&t, ms, seq, -1, k, v, dt, n0, 0) == KIVI_OK, "%s: prefill %d", cfg->name, n0);
      free(k);
      free(v);
    } else {
      for (int32_t l = 0; l < t.L; l++) {
        make_kv(&t, 1, n0, dt, &k, &v);
        CHECK(do_append(&t, ms, seq, l, k, v, dt, n0, 0) == KIVI_OK, "%s: prefill %d layer %d", cfg->name, n0, l);
        free(k);
        free(v);
      }
    }
    snprintf(what, sizeof what, "%s prefill %d", cfg->name, n0);
    check_read(&t, ms, seq, what);
    /* a second, shorter sequence for batched attention */
    CHECK(kivi_cache_seq_create(t.c, &other) == KIVI_OK, "seq_create 2");
    make_kv(&t, t.L, 5 + (int32_t)li * 7, KIVI_F32, &k, &v);
    CHECK(do_append(&t, ms2, other, -1, k, v, KIVI_F32, 5 + (int32_t)li * 7, 0) == KIVI_OK, "append other");
    free(k);
    free(v);
    {
      const int32_t seqs[4] = {seq, other, seq, seq};
      const mirror *mss[4] = {ms, ms2, ms, ms};
      check_attend(&t, mss, seqs, 4, t.L - 1, what);
    }
    /* decode: single tokens (and a chunk of 5) across at least two flush boundaries */
    const int32_t steps = 2 * t.F + 9;
    for (int32_t s = 0; s < steps; s++) {
      const int32_t n = s == 7 ? 5 : 1;
      const kivi_dtype ddt = (kivi_dtype)(s % 3);
      if (s % 4 == 0) {
        make_kv(&t, t.L, n, ddt, &k, &v);
        CHECK(do_append(&t, ms, seq, -1, k, v, ddt, n, 0) == KIVI_OK, "decode append");
        free(k);
        free(v);
      } else {
        for (int32_t l = 0; l < t.L; l++) {
          make_kv(&t, 1, n, ddt, &k, &v);
          CHECK(do_append(&t, ms, seq, l, k, v, ddt, n, 0) == KIVI_OK, "decode append layer");
          free(k);
          free(v);
        }
      }
      snprintf(what, sizeof what, "%s prefill %d decode %d", cfg->name, n0, s);
      check_lengths(&t, ms, seq, what);
      if (s % 16 == 15 || s == steps - 1) {
        check_read(&t, ms, seq, what);
        const int32_t seqs[2] = {other, seq};
        const mirror *mss[2] = {ms2, ms};
        check_attend(&t, mss, seqs, 2, 0, what);
      }
    }
    CHECK(kivi_cache_seq_free(t.c, seq) == KIVI_OK && kivi_cache_seq_free(t.c, other) == KIVI_OK, "seq_free");
    free_mirrors(ms, t.L);
    free_mirrors(ms2, t.L);
    uint64_t rep[KIVI_MEM_FIELDS];
    CHECK(kivi_cache_memory(t.c, rep, KIVI_MEM_FIELDS) == KIVI_OK && rep[KIVI_MEM_PAGES_USED] == 0 &&
              rep[KIVI_MEM_TOKENS] == 0 && rep[KIVI_MEM_RESIDUAL_BYTES] == 0,
          "%s: empty after free", cfg->name);
  }
  kivi_cache_destroy(t.c);
}

/* Layers of different lengths share one block table. */
static void test_uneven_layers(kivi_ctx_t ctx, const tcfg *cfg) {
  tcache t;
  if (!open_cache(&t, ctx, cfg)) return;
  mirror ms[4] = {{0}};
  int32_t seq;
  CHECK(kivi_cache_seq_create(t.c, &seq) == KIVI_OK, "seq_create");
  void *k, *v;
  make_kv(&t, 1, 300, KIVI_F32, &k, &v);
  CHECK(do_append(&t, ms, seq, t.L - 1, k, v, KIVI_F32, 300, 0) == KIVI_OK, "append last layer");
  free(k);
  free(v);
  make_kv(&t, 1, 40, KIVI_BF16, &k, &v);
  CHECK(do_append(&t, ms, seq, 0, k, v, KIVI_BF16, 40, 0) == KIVI_OK, "append layer 0");
  free(k);
  free(v);
  check_read(&t, ms, seq, "uneven layers");
  const mirror *mss[1] = {ms};
  check_attend(&t, mss, &seq, 1, 0, "uneven layers, layer 0");
  check_attend(&t, mss, &seq, 1, t.L - 1, "uneven layers, last layer");
  free_mirrors(ms, t.L);
  kivi_cache_destroy(t.c);
}

/* ---------------------------------------------------------------- state snapshots -------- */

typedef struct snap {
  int64_t len[4], q[4];
  int32_t npages, pages[256];
  uint64_t mem[KIVI_MEM_FIELDS];
  float *k[4], *v[4], *out;
} snap;

static void take_snap(tcache *t, int32_t seq, const float *q, snap *s) {
  memset(s, 0, sizeof *s);
  kivi_cache_memory(t->c, s->mem, KIVI_MEM_FIELDS);
  kivi_cache_seq_pages(t->c, seq, s->pages, 256, &s->npages);
  for (int32_t l = 0; l < t->L; l++) {
    kivi_cache_seq_length(t->c, seq, l, &s->len[l], &s->q[l]);
    const int64_t n = s->len[l] * t->row;
    s->k[l] = calloc((size_t)n + 1, sizeof(float));
    s->v[l] = calloc((size_t)n + 1, sizeof(float));
    kivi_cache_read(t->c, seq, l, s->k[l], s->v[l], KIVI_F32);
  }
  s->out = calloc((size_t)(t->QH * t->D), sizeof(float));
  if (s->len[0] > 0) kivi_cache_attend(t->c, 0, &seq, 1, q, KIVI_F32, 0.125f, 0, s->out, KIVI_F32);
}

static int same_snap(const tcache *t, const snap *a, const snap *b) {
  if (memcmp(a->len, b->len, sizeof a->len) || memcmp(a->q, b->q, sizeof a->q)) return 0;
  if (a->npages != b->npages || memcmp(a->pages, b->pages, sizeof a->pages)) return 0;
  if (memcmp(a->mem, b->mem, sizeof a->mem)) return 0;
  for (int32_t l = 0; l < t->L; l++) {
    const size_t n = (size_t)(a->len[l] * t->row) * sizeof(float);
    if (memcmp(a->k[l], b->k[l], n) || memcmp(a->v[l], b->v[l], n)) return 0;
  }
  return !memcmp(a->out, b->out, sizeof(float) * (size_t)(t->QH * t->D));
}

static void free_snap(const tcache *t, snap *s) {
  for (int32_t l = 0; l < t->L; l++) {
    free(s->k[l]);
    free(s->v[l]);
  }
  free(s->out);
}

/* Full pool, NaN / Inf input, bad arguments: an error and nothing changed. */
static void test_errors_unchanged(kivi_ctx_t ctx) {
  /* 6 pages of 32 tokens, R 32, F 32, 2 layers */
  tcfg cfg = make_cfg("capacity", 2, 2, 4, 64, 32, 32, 6, 3, KIVI_KIND_UNIFORM, 2, 32, KIVI_KIND_CODEBOOK, 2, 64);
  tcache t;
  if (!open_cache(&t, ctx, &cfg)) return;
  mirror ms[4] = {{0}};
  int32_t seq, seq2;
  CHECK(kivi_cache_seq_create(t.c, &seq) == KIVI_OK && kivi_cache_seq_create(t.c, &seq2) == KIVI_OK, "seq_create");
  void *k, *v;
  make_kv(&t, t.L, 150, KIVI_F32, &k, &v); /* qlen 96 -> 3 pages */
  CHECK(do_append(&t, ms, seq, -1, k, v, KIVI_F32, 150, 0) == KIVI_OK, "prefill");
  free(k);
  free(v);
  float q[4 * 64];
  for (int i = 0; i < 4 * 64; i++) q[i] = (float)rng_normal();
  snap a, b;

  /* 140 more tokens in every layer: qlen 256 -> 8 pages, 5 more needed, 3 free */
  take_snap(&t, seq, q, &a);
  make_kv(&t, t.L, 140, KIVI_F16, &k, &v);
  kivi_status st = kivi_cache_append(t.c, seq, -1, k, v, KIVI_F16, 140, 0);
  CHECK(st == KIVI_ERR_CAPACITY, "full pool gives KIVI_ERR_CAPACITY, got %d", st);
  CHECK(strstr(kivi_last_error(), "5 more") && strstr(kivi_last_error(), "3 of 6"), "capacity message: %s",
        kivi_last_error());
  take_snap(&t, seq, q, &b);
  CHECK(same_snap(&t, &a, &b), "full pool changed the cache");
  free_snap(&t, &b);
  /* one layer alone needs the same pages */
  st = kivi_cache_append(t.c, seq, 1, k, v, KIVI_F16, 140, 0);
  CHECK(st == KIVI_ERR_CAPACITY, "full pool (one layer), got %d", st);
  take_snap(&t, seq, q, &b);
  CHECK(same_snap(&t, &a, &b), "full pool (one layer) changed the cache");
  free_snap(&t, &b);
  /* what fits still goes in: 92 tokens -> qlen 192 -> 6 pages, the pool is now empty */
  CHECK(do_append(&t, ms, seq, -1, k, v, KIVI_F16, 92, 0) == KIVI_OK, "append that fits");
  free(k);
  free(v);
  check_read(&t, ms, seq, "after capacity error");
  free_snap(&t, &a);

  /* the other sequence cannot get a page now, but its window still takes tokens */
  make_kv(&t, t.L, 63, KIVI_F32, &k, &v);
  CHECK(kivi_cache_append(t.c, seq2, -1, k, v, KIVI_F32, 63, 0) == KIVI_OK, "window-only append");
  free(k);
  free(v);
  make_kv(&t, t.L, 1, KIVI_F32, &k, &v);
  CHECK(kivi_cache_append(t.c, seq2, 0, k, v, KIVI_F32, 1, 0) == KIVI_ERR_CAPACITY, "first flush needs a page");
  free(k);
  free(v);

  /* NaN in k (layer 1 of 2), Inf in v: nothing changes in any layer */
  take_snap(&t, seq, q, &a);
  make_kv(&t, t.L, 20, KIVI_F32, &k, &v);
  ((float *)k)[20 * t.row + 77] = NAN;
  st = kivi_cache_append(t.c, seq, -1, k, v, KIVI_F32, 20, 0);
  CHECK(st == KIVI_ERR_NONFINITE && strstr(kivi_last_error(), " k must be finite"), "NaN in k: %d %s", st,
        kivi_last_error());
  ((float *)k)[20 * t.row + 77] = 0.5f;
  ((float *)v)[3 * t.row + 5] = -INFINITY;
  st = kivi_cache_append(t.c, seq, -1, k, v, KIVI_F32, 20, 0);
  CHECK(st == KIVI_ERR_NONFINITE && strstr(kivi_last_error(), " v must be finite"), "Inf in v: %d %s", st,
        kivi_last_error());
  ((float *)v)[3 * t.row + 5] = 0.25f;
  ((float *)v)[7 * t.row + 9] = 70000.0f; /* finite, but Inf once stored as fp16 */
  st = kivi_cache_append(t.c, seq, -1, k, v, KIVI_F32, 20, 0);
  CHECK(st == KIVI_ERR_NONFINITE && strstr(kivi_last_error(), " v must lie within the fp16 range") &&
            strstr(kivi_last_error(), "70000"),
        "70000 in v: %d %s", st, kivi_last_error());
  take_snap(&t, seq, q, &b);
  CHECK(same_snap(&t, &a, &b), "NaN / Inf / beyond-fp16 input changed the cache");
  free_snap(&t, &b);
  free_snap(&t, &a);
  free(k);
  free(v);
  /* f16 NaN */
  make_kv(&t, 1, 3, KIVI_F16, &k, &v);
  ((uint16_t *)v)[2 * t.row + 1] = 0x7e00;
  CHECK(kivi_cache_append(t.c, seq, 0, k, v, KIVI_F16, 3, 0) == KIVI_ERR_NONFINITE, "f16 NaN in v");
  free(k);
  free(v);

  /* bad arguments */
  make_kv(&t, t.L, 2, KIVI_F32, &k, &v);
  CHECK(kivi_cache_append(NULL, seq, 0, k, v, KIVI_F32, 2, 0) == KIVI_ERR_ARG, "NULL cache");
  CHECK(kivi_cache_append(t.c, 7, 0, k, v, KIVI_F32, 2, 0) == KIVI_ERR_ARG, "seq out of range");
  CHECK(kivi_cache_append(t.c, 2, 0, k, v, KIVI_F32, 2, 0) == KIVI_ERR_STATE, "seq not live");
  CHECK(kivi_cache_append(t.c, seq, 2, k, v, KIVI_F32, 2, 0) == KIVI_ERR_ARG, "layer 2");
  CHECK(kivi_cache_append(t.c, seq, -2, k, v, KIVI_F32, 2, 0) == KIVI_ERR_ARG, "layer -2");
  CHECK(kivi_cache_append(t.c, seq, 0, k, v, KIVI_F32, 0, 0) == KIVI_ERR_ARG, "n 0");
  CHECK(kivi_cache_append(t.c, seq, 0, NULL, v, KIVI_F32, 2, 0) == KIVI_ERR_ARG, "k NULL");
  CHECK(kivi_cache_append(t.c, seq, 0, k, NULL, KIVI_F32, 2, 0) == KIVI_ERR_ARG, "v NULL");
  CHECK(kivi_cache_append(t.c, seq, 0, k, v, 3, 2, 0) == KIVI_ERR_ARG, "dtype 3");
  CHECK(kivi_cache_append(t.c, seq, 0, k, v, KIVI_F32, 2, 2) == KIVI_ERR_ARG, "flags 2");
  float out[4 * 64], out0[4 * 64];
  for (int i = 0; i < 4 * 64; i++) out[i] = out0[i] = -7.0f;
  const int32_t empty_batch[2] = {seq, 2};
  CHECK(kivi_cache_attend(t.c, 0, empty_batch, 2, q, KIVI_F32, 0.1f, 0, out, KIVI_F32) == KIVI_ERR_STATE,
        "attend on a dead seq");
  int32_t seq3;
  CHECK(kivi_cache_seq_create(t.c, &seq3) == KIVI_OK && seq3 == 2, "seq_create 3");
  const int32_t empty2[2] = {seq, seq3};
  CHECK(kivi_cache_attend(t.c, 0, empty2, 2, q, KIVI_F32, 0.1f, 0, out, KIVI_F32) == KIVI_ERR_STATE,
        "attend on an empty seq");
  int32_t seq4 = -5;
  CHECK(kivi_cache_seq_create(t.c, &seq4) == KIVI_ERR_CAPACITY && seq4 == -5, "no free slot");
  CHECK(kivi_cache_attend(t.c, 2, &seq, 1, q, KIVI_F32, 0.1f, 0, out, KIVI_F32) == KIVI_ERR_ARG, "attend layer");
  CHECK(kivi_cache_attend(t.c, 0, &seq, 0, q, KIVI_F32, 0.1f, 0, out, KIVI_F32) == KIVI_ERR_ARG, "attend batch 0");
  CHECK(kivi_cache_attend(t.c, 0, &seq, 1, q, KIVI_F32, NAN, 0, out, KIVI_F32) == KIVI_ERR_ARG, "attend scale NaN");
  CHECK(kivi_cache_attend(t.c, 0, &seq, 1, q, 9, 0.1f, 0, out, KIVI_F32) == KIVI_ERR_ARG, "attend q_dtype");
  CHECK(kivi_cache_attend(t.c, 0, &seq, 1, q, KIVI_F32, 0.1f, 0, out, 9) == KIVI_ERR_ARG, "attend out_dtype");
  CHECK(kivi_cache_attend(t.c, 0, NULL, 1, q, KIVI_F32, 0.1f, 0, out, KIVI_F32) == KIVI_ERR_ARG, "attend seqs NULL");
  q[100] = INFINITY;
  CHECK(kivi_cache_attend(t.c, 0, &seq, 1, q, KIVI_F32, 0.1f, 0, out, KIVI_F32) == KIVI_ERR_NONFINITE, "attend Inf q");
  CHECK(!memcmp(out, out0, sizeof out), "failed attend wrote its output");
  CHECK(kivi_cache_attend(t.c, 0, &seq, 1, q, KIVI_F32, 0.1f, KIVI_FLAG_TRUSTED, out, KIVI_F32) == KIVI_OK,
        "trusted Inf q does not fail");
  q[100] = 0.25f;
  /* trusted NaN input: no crash, lengths advance */
  ((float *)k)[5] = NAN;
  CHECK(kivi_cache_append(t.c, seq3, -1, k, v, KIVI_F32, 2, KIVI_FLAG_TRUSTED) == KIVI_OK, "trusted NaN append");
  free(k);
  free(v);
  float ms_ = -1;
  CHECK(kivi_cache_bench_attend(t.c, 0, &seq, 1, q, KIVI_F32, 0.1f, out, KIVI_F32, 2, &ms_) == KIVI_OK && ms_ >= 0,
        "bench_attend");
  CHECK(kivi_cache_bench_attend(t.c, 0, &seq, 1, q, KIVI_F32, 0.1f, out, KIVI_F32, 0, &ms_) == KIVI_ERR_ARG,
        "bench_attend iters 0");

  int64_t len, ql;
  int32_t pages[8], count;
  uint64_t rep[KIVI_MEM_FIELDS];
  CHECK(kivi_cache_seq_length(t.c, seq, 2, &len, &ql) == KIVI_ERR_ARG, "seq_length layer");
  CHECK(kivi_cache_seq_length(t.c, seq, 0, NULL, &ql) == KIVI_ERR_ARG, "seq_length NULL");
  CHECK(kivi_cache_seq_length(NULL, seq, 0, &len, &ql) == KIVI_ERR_ARG, "seq_length NULL cache");
  CHECK(kivi_cache_seq_pages(t.c, seq, pages, -1, &count) == KIVI_ERR_ARG, "seq_pages cap");
  CHECK(kivi_cache_seq_pages(t.c, seq, pages, 2, &count) == KIVI_OK && count == 6, "seq_pages cap 2: %d", count);
  CHECK(kivi_cache_read(t.c, seq, 0, NULL, q, KIVI_F32) == KIVI_ERR_ARG, "read NULL");
  CHECK(kivi_cache_read(t.c, 5, 0, q, q, KIVI_F32) == KIVI_ERR_ARG, "read seq");
  CHECK(kivi_cache_memory(t.c, rep, 0) == KIVI_ERR_ARG, "memory n_fields 0");
  CHECK(kivi_cache_memory(NULL, rep, 3) == KIVI_ERR_ARG, "memory NULL cache");
  for (int i = 0; i < KIVI_MEM_FIELDS; i++) rep[i] = 99;
  CHECK(kivi_cache_memory(t.c, rep, 3) == KIVI_OK && rep[3] == 99 && rep[2] != 99, "memory writes n_fields");
  CHECK(kivi_cache_seq_free(t.c, seq3) == KIVI_OK && kivi_cache_seq_free(t.c, seq3) == KIVI_ERR_STATE, "double free");
  CHECK(kivi_cache_seq_free(NULL, 0) == KIVI_ERR_ARG && kivi_cache_seq_create(NULL, &seq4) == KIVI_ERR_ARG, "NULL");

  /* memory report against the state */
  {
    const kivi_cache_config *cc = (const kivi_cache_config *)cfg.a;
    const kivi_part_layout kp = kivi_page_part(cc, 0), vp = kivi_page_part(cc, 1);
    int64_t tok = 0, qt = 0;
    int32_t c1, c2;
    kivi_cache_seq_pages(t.c, seq, NULL, 0, &c1);
    kivi_cache_seq_pages(t.c, seq2, NULL, 0, &c2);
    for (int32_t s = 0; s < 2; s++)
      for (int32_t l = 0; l < t.L; l++) {
        kivi_cache_seq_length(t.c, s ? seq2 : seq, l, &len, &ql);
        tok += len;
        qt += ql;
      }
    const uint64_t used = (uint64_t)(c1 + c2), hl = (uint64_t)t.L * t.H;
    CHECK(kivi_cache_memory(t.c, rep, KIVI_MEM_FIELDS) == KIVI_OK, "memory");
    CHECK(rep[KIVI_MEM_PAGES_USED] == used && rep[KIVI_MEM_PAGES_TOTAL] == 6, "pages used/total");
    CHECK(rep[KIVI_MEM_CODE_BYTES] == used * hl * (kp.codes + vp.codes), "code bytes");
    CHECK(rep[KIVI_MEM_PARAM_BYTES] == used * hl * (kp.params + vp.params), "param bytes");
    CHECK(rep[KIVI_MEM_TOKENS] == (uint64_t)tok && rep[KIVI_MEM_QUANTIZED_TOKENS] == (uint64_t)qt, "tokens");
    CHECK(rep[KIVI_MEM_RESIDUAL_BYTES] == (uint64_t)(tok - qt) * t.row * 4, "residual bytes");
    CHECK(rep[KIVI_MEM_TABLE_BYTES] == 3u * (6u * 4u + 2u * 16u + 8u), "table bytes");
    const uint64_t win = 3ull * 2 * 64 * t.row * 2;
    CHECK(rep[KIVI_MEM_POOL_BYTES] == 2 * 6 * (kp.page + vp.page) + 2 * win, "pool bytes %llu",
          (unsigned long long)rep[KIVI_MEM_POOL_BYTES]);
  }
  free_mirrors(ms, t.L);
  CHECK(kivi_cache_destroy(t.c) == KIVI_OK && kivi_cache_destroy(NULL) == KIVI_OK, "destroy");
}

/* Pages of a freed sequence are reused (LIFO) and nothing of it shows in the next one. */
static void test_reuse(kivi_ctx_t ctx, const tcfg *cfg) {
  tcache t;
  if (!open_cache(&t, ctx, cfg)) return;
  mirror ms[4] = {{0}}, ms2[4] = {{0}};
  int32_t a, b, pa[64], pb[64], na, nb;
  void *k, *v;
  CHECK(kivi_cache_seq_create(t.c, &a) == KIVI_OK, "seq_create");
  make_kv(&t, t.L, 700, KIVI_F32, &k, &v);
  /* large values so any leak shows */
  for (int64_t i = 0; i < (int64_t)t.L * 700 * t.row; i++) {
    ((float *)k)[i] = ((float *)k)[i] * 50.0f + 400.0f;
    ((float *)v)[i] = ((float *)v)[i] * 50.0f - 300.0f;
  }
  CHECK(do_append(&t, ms, a, -1, k, v, KIVI_F32, 700, 0) == KIVI_OK, "append a");
  free(k);
  free(v);
  CHECK(kivi_cache_seq_pages(t.c, a, pa, 64, &na) == KIVI_OK && na > 1, "pages a");
  CHECK(kivi_cache_seq_free(t.c, a) == KIVI_OK, "free a");
  CHECK(kivi_cache_seq_create(t.c, &b) == KIVI_OK && b == a, "slot reused");
  int64_t len = -1, ql = -1;
  CHECK(kivi_cache_seq_length(t.c, b, 0, &len, &ql) == KIVI_OK && len == 0 && ql == 0, "new seq empty");
  const int32_t n1 = t.R + t.F + 5; /* one flush group in the first page, the rest in the window */
  make_kv(&t, t.L, n1, KIVI_F16, &k, &v);
  CHECK(do_append(&t, ms2, b, -1, k, v, KIVI_F16, n1, 0) == KIVI_OK, "append b");
  free(k);
  free(v);
  CHECK(kivi_cache_seq_pages(t.c, b, pb, 64, &nb) == KIVI_OK && nb == 1 && pb[0] == pa[0], "LIFO reuse: %d vs %d",
        pb[0], pa[0]);
  check_read(&t, ms2, b, "reused pages");
  const mirror *mss[1] = {ms2};
  check_attend(&t, mss, &b, 1, 0, "reused pages");
  for (int32_t s = 0; s < t.F + 3; s++) { /* decode over the next flush */
    make_kv(&t, t.L, 1, KIVI_F32, &k, &v);
    CHECK(do_append(&t, ms2, b, -1, k, v, KIVI_F32, 1, 0) == KIVI_OK, "decode b");
    free(k);
    free(v);
  }
  check_read(&t, ms2, b, "reused pages after decode");
  check_attend(&t, mss, &b, 1, t.L - 1, "reused pages after decode");
  free_mirrors(ms, t.L);
  free_mirrors(ms2, t.L);
  kivi_cache_destroy(t.c);
}

/* ---------------------------------------------------------------- config validation ------ */

static void test_bad_config(kivi_ctx_t ctx) {
  const tcfg good = make_cfg("good", 2, 2, 8, 128, 64, 32, 16, 2, KIVI_KIND_UNIFORM, 2, 32, KIVI_KIND_CODEBOOK, 2, 64);
  struct {
    int field;
    int32_t value;
  } bad[] = {
      {KIVI_CFG_LAYERS, 0},       {KIVI_CFG_KV_HEADS, 0},   {KIVI_CFG_Q_HEADS, 3},   {KIVI_CFG_Q_HEADS, 1},
      {KIVI_CFG_Q_HEADS, 66},     {KIVI_CFG_HEAD_DIM, 96},  {KIVI_CFG_HEAD_DIM, 0},  {KIVI_CFG_PAGE_TOKENS, 48},
      {KIVI_CFG_PAGE_TOKENS, 16}, {KIVI_CFG_RESIDUAL, -32}, {KIVI_CFG_RESIDUAL, 40}, {KIVI_CFG_MAX_PAGES, 0},
      {KIVI_CFG_MAX_SEQS, 0},     {KIVI_CFG_K_KIND, 2},     {KIVI_CFG_K_BITS, 3},    {KIVI_CFG_K_BITS, 8},
      {KIVI_CFG_K_GROUP, 16},     {KIVI_CFG_K_GROUP, 128},  {KIVI_CFG_K_FIT, 2},     {KIVI_CFG_K_ITERS, 0},
      {KIVI_CFG_K_ITERS, 257},    {KIVI_CFG_V_KIND, -1},    {KIVI_CFG_V_BITS, 1},    {KIVI_CFG_V_GROUP, 48},
      {KIVI_CFG_V_FIT, 5},        {KIVI_CFG_V_ITERS, 0},
  };
  static const char *names[] = {"KIVI_CFG_LAYERS",      "KIVI_CFG_KV_HEADS", "KIVI_CFG_Q_HEADS",   "KIVI_CFG_HEAD_DIM",
                                "KIVI_CFG_PAGE_TOKENS", "KIVI_CFG_RESIDUAL", "KIVI_CFG_MAX_PAGES", "KIVI_CFG_MAX_SEQS",
                                "KIVI_CFG_K_KIND",      "KIVI_CFG_K_BITS",   "KIVI_CFG_K_GROUP",   "KIVI_CFG_K_FIT",
                                "KIVI_CFG_K_ITERS",     "KIVI_CFG_V_KIND",   "KIVI_CFG_V_BITS",    "KIVI_CFG_V_GROUP",
                                "KIVI_CFG_V_FIT",       "KIVI_CFG_V_ITERS"};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    tcfg c = good;
    c.a[bad[i].field] = bad[i].value;
    kivi_cache_t out = (kivi_cache_t)(uintptr_t)0x1234;
    kivi_status st = kivi_cache_create(ctx, c.a, KIVI_CFG_FIELDS, &out);
    /* page_tokens 128 with k_group 128 is fine; K_GROUP 128 with page 64 is not */
    CHECK(st == KIVI_ERR_ARG && out == (kivi_cache_t)(uintptr_t)0x1234, "bad %s = %d gives %d", names[bad[i].field],
          bad[i].value, st);
    const char *msg = kivi_last_error();
    CHECK(strstr(msg, "kivi_cache_create") && (strstr(msg, names[bad[i].field]) || bad[i].field == KIVI_CFG_K_GROUP),
          "message names the field: %s", msg);
  }
  {
    tcfg c = good;
    c.a[KIVI_CFG_HEAD_DIM] = 64;
    c.a[KIVI_CFG_V_GROUP] = 128; /* does not divide head_dim 64 */
    kivi_cache_t out = NULL;
    CHECK(kivi_cache_create(ctx, c.a, KIVI_CFG_FIELDS, &out) == KIVI_ERR_ARG && !out, "v_group > head_dim");
  }
  kivi_cache_t out = NULL;
  CHECK(kivi_cache_create(ctx, good.a, KIVI_CFG_FIELDS - 1, &out) == KIVI_ERR_ARG && !out, "n_fields");
  CHECK(kivi_cache_create(ctx, NULL, KIVI_CFG_FIELDS, &out) == KIVI_ERR_ARG, "config NULL");
  CHECK(kivi_cache_create(NULL, good.a, KIVI_CFG_FIELDS, &out) == KIVI_ERR_ARG, "ctx NULL");
  CHECK(kivi_cache_create(ctx, good.a, KIVI_CFG_FIELDS, NULL) == KIVI_ERR_ARG, "out NULL");
  {
    tcfg c = good;
    c.a[KIVI_CFG_MAX_PAGES] = 0x7fffffff;
    c.a[KIVI_CFG_LAYERS] = 0x7fffffff;
    CHECK(kivi_cache_create(ctx, c.a, KIVI_CFG_FIELDS, &out) == KIVI_ERR_NOMEM && !out, "huge pool gives NOMEM");
  }
  CHECK(kivi_cache_create(ctx, good.a, KIVI_CFG_FIELDS, &out) == KIVI_OK && out, "good config");
  kivi_cache_destroy(out);
  { /* per-layer formats: layers x KIVI_LAYER_FIELDS after the cache's fields */
    int32_t a[KIVI_CFG_FIELDS + 2 * KIVI_LAYER_FIELDS];
    memcpy(a, good.a, sizeof(int32_t) * KIVI_CFG_FIELDS);
    for (int l = 0; l < 2; l++) memcpy(a + KIVI_CFG_FIELDS + l * KIVI_LAYER_FIELDS, good.a + KIVI_CFG_K_KIND, 40);
    a[KIVI_CFG_FIELDS + KIVI_LAYER_FIELDS + 1] = 4; /* layer 1's keys: 4 bits */
    out = NULL;
    CHECK(kivi_cache_create(ctx, a, KIVI_CFG_FIELDS + 2 * KIVI_LAYER_FIELDS, &out) == KIVI_OK && out, "per-layer");
    kivi_cache_destroy(out);
    out = NULL;
    CHECK(kivi_cache_create(ctx, a, KIVI_CFG_FIELDS + KIVI_LAYER_FIELDS, &out) == KIVI_ERR_ARG && !out,
          "per-layer n_fields for one layer of two");
    a[KIVI_CFG_FIELDS + KIVI_LAYER_FIELDS + 1] = 3;
    CHECK(kivi_cache_create(ctx, a, KIVI_CFG_FIELDS + 2 * KIVI_LAYER_FIELDS, &out) == KIVI_ERR_ARG && !out,
          "per-layer bits 3");
    CHECK(!strcmp(kivi_last_error(),
                  "kivi_cache_create: config[KIVI_CFG_FIELDS + 1 * KIVI_LAYER_FIELDS + 1] "
                  "(layer 1's k_bits) must be 2, 4 or 16, got 3"),
          "message: %s", kivi_last_error());
    a[KIVI_CFG_FIELDS + KIVI_LAYER_FIELDS + 1] = 2;
    a[KIVI_CFG_FIELDS + 2] = 64; /* layer 0's key group */
    CHECK(kivi_cache_create(ctx, a, KIVI_CFG_FIELDS + 2 * KIVI_LAYER_FIELDS, &out) == KIVI_ERR_ARG && !out,
          "per-layer key group");
    CHECK(strstr(kivi_last_error(), "the flush unit all layers share"), "message: %s", kivi_last_error());
  }
  /* the documented message format */
  tcfg c = good;
  c.a[KIVI_CFG_HEAD_DIM] = 96;
  kivi_cache_create(ctx, c.a, KIVI_CFG_FIELDS, &out);
  CHECK(!strcmp(kivi_last_error(),
                "kivi_cache_create: config[KIVI_CFG_HEAD_DIM] (head_dim) must be 64, 128 or 256, got 96"),
        "message: %s", kivi_last_error());
}

/* ---------------------------------------------------------------- benchmark -------------- */

static void bench(kivi_ctx_t ctx) {
  const int32_t T = 4096, H = 32, D = 128;
  const int32_t bits[2] = {2, 16};
  for (int i = 0; i < 2; i++) {
    tcfg cfg = make_cfg("bench", 1, H, H, D, 128, 128, T / 128 + 2, 1, KIVI_KIND_UNIFORM, bits[i], 32,
                        KIVI_KIND_UNIFORM, bits[i], 32);
    tcache t;
    if (!open_cache(&t, ctx, &cfg)) return;
    int32_t seq;
    kivi_cache_seq_create(t.c, &seq);
    void *k, *v;
    make_kv(&t, 1, T, KIVI_F16, &k, &v);
    CHECK(kivi_cache_append(t.c, seq, 0, k, v, KIVI_F16, T, 0) == KIVI_OK, "bench prefill");
    free(k);
    free(v);
    float *q = malloc(sizeof(float) * H * D), *out = malloc(sizeof(float) * H * D), ms = 0;
    for (int32_t j = 0; j < H * D; j++) q[j] = (float)rng_normal();
    CHECK(kivi_cache_bench_attend(t.c, 0, &seq, 1, q, KIVI_F32, 0.088f, out, KIVI_F32, 10, &ms) == KIVI_OK,
          "bench_attend");
    uint64_t rep[KIVI_MEM_FIELDS];
    kivi_cache_memory(t.c, rep, KIVI_MEM_FIELDS);
    printf(
        "bench attend 1 x %d tokens x %d heads x %d dims, K/V %2d-bit: %.3f ms/call (pages %.2f MiB, residual "
        "%.2f MiB)\n",
        T, H, D, bits[i], ms, (double)(rep[0] + rep[1]) / 1048576.0, (double)rep[2] / 1048576.0);
    free(q);
    free(out);
    kivi_cache_destroy(t.c);
  }
}

int main(int argc, char **argv) {
  static const char *const flags[] = {"--bench", "--quick"}; /* --quick: the first config only, for valgrind */
  const unsigned on = harness_args(argc, argv, "cache_smoke", 20261128ull, flags, 2);
  const int do_bench = on & 1, quick = (on >> 1) & 1;
  g_last_error = kivi_last_error;
  kivi_ctx_t ctx = harness_ctx();
  if (!ctx) return 1;
  const int U = KIVI_KIND_UNIFORM, C = KIVI_KIND_CODEBOOK;
  const tcfg cfgs[] = {
      /*       name                              L  kvh qh  D    P    R  pages seqs  K kind/bits/group  V
         kind/bits/group */
      make_cfg("K uni2 G32 / V cb2 G64, P32 R32", 2, 2, 2, 64, 32, 32, 128, 3, U, 2, 32, C, 2, 64),
      make_cfg("K uni2 G32 / V cb2 G64, P64 R0 GQA4", 1, 2, 8, 128, 64, 0, 64, 3, U, 2, 32, C, 2, 64),
      make_cfg("K/V uni4 G64/G32, P128 R128 GQA4", 2, 2, 8, 128, 128, 128, 32, 3, U, 4, 64, U, 4, 32),
      make_cfg("K/V 16-bit, P64 R32", 2, 2, 2, 64, 64, 32, 64, 3, U, 16, 32, U, 16, 32),
      make_cfg("K cb4 G128 / V uni2 G128, P128 R0", 1, 2, 8, 128, 128, 0, 32, 3, C, 4, 128, U, 2, 128),
      make_cfg("K 16-bit / V uni2 G32, P32 R128", 1, 2, 2, 64, 32, 128, 128, 3, U, 16, 32, U, 2, 32),
      make_cfg("K uni2 G64 / V uni2 G128, P128 R64 GQA7", 1, 2, 14, 128, 128, 64, 48, 3, U, 2, 64, U, 2, 128),
      make_cfg("K uni2 G128 / V cb2 G32, P128 R128 GQA16", 1, 1, 16, 64, 128, 128, 48, 3, U, 2, 128, C, 2, 32),
  };
  test_bad_config(ctx);
  for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++) {
    if (quick && i != 0) continue;
    test_prefill_decode(ctx, &cfgs[i]);
    test_uneven_layers(ctx, &cfgs[i]);
    test_reuse(ctx, &cfgs[i]);
  }
  test_errors_unchanged(ctx);
  if (do_bench) bench(ctx);
  kivi_ctx_destroy(ctx);
  return check_summary();
}
