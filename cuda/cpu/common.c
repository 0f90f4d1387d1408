/*
 * common.c — library, context, memory and timing exports of the CPU build, plus the helpers every
 * op shares (error slot, argument validation, NaN/Inf scan, tile load/store).
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cpu_internal.h"

static _Thread_local char tl_err[CPU_ERR_LEN];

kivi_status cpu_fail(kivi_ctx_t ctx, kivi_status st, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl_err, sizeof tl_err, fmt, ap);
  va_end(ap);
  if (ctx) snprintf(ctx->err, sizeof ctx->err, "%s", tl_err);
  return st;
}

kivi_status cpu_need_ctx(kivi_ctx_t ctx, const char *op) {
  if (!ctx) return cpu_fail(NULL, KIVI_ERR_ARG, "%s: ctx must not be NULL", op);
  return KIVI_OK;
}

kivi_status cpu_alloc(kivi_ctx_t ctx, const char *op, size_t bytes, void **out) {
  *out = malloc(bytes ? bytes : 1);
  if (!*out) return cpu_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate %zu bytes of scratch memory", op, bytes);
  return KIVI_OK;
}

kivi_status cpu_alloc_all(kivi_ctx_t ctx, const char *op, int n, const size_t *bytes, void **const *out) {
  for (int i = 0; i < n; i++) {
    kivi_status st = cpu_alloc(ctx, op, bytes[i], out[i]);
    if (st) {
      for (int j = 0; j < i; j++) {
        free(*out[j]);
        *out[j] = NULL;
      }
      return st;
    }
  }
  return KIVI_OK;
}

/* ---------------------------------------------------------------- validation ------------- */

kivi_status cpu_validate(kivi_ctx_t ctx, const cpu_spec *s, cpu_shape *sh) {
  KIVI_HOST_ENTER(cpu_need_ctx, cpu_fail, ctx, s->op, kivi_spec_check(s, sh, msg, sizeof msg));
  return KIVI_OK;
}

kivi_status cpu_validate_input(kivi_ctx_t ctx, const cpu_spec *s, cpu_shape *sh, const void *x) {
  kivi_status st = cpu_validate(ctx, s, sh);
  if (st || (s->flags & KIVI_FLAG_TRUSTED)) return st;
  return cpu_check_finite(ctx, s->op, x, s->dtype, sh);
}

/* ---------------------------------------------------------------- NaN / Inf scan --------- */

#define SCAN_CHUNK 4096

static int bad_at(const void *x, kivi_dtype dtype, int64_t i) {
  if (dtype == KIVI_F32) return (kivi_f32_bits(((const float *)x)[i]) & 0x7f800000u) == 0x7f800000u;
  const uint16_t h = ((const uint16_t *)x)[i];
  return dtype == KIVI_F16 ? (h & 0x7c00u) == 0x7c00u : (h & 0x7f80u) == 0x7f80u;
}

/* Branch-free OR over a chunk so the common (all finite) case vectorizes. */
static int chunk_bad(const void *x, kivi_dtype dtype, int64_t i0, int64_t n) {
  uint32_t bad = 0;
  if (dtype == KIVI_F32) {
    const uint32_t *u = (const uint32_t *)x + i0;
    for (int64_t i = 0; i < n; i++) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
  } else {
    const uint16_t *h = (const uint16_t *)x + i0;
    const uint16_t m = dtype == KIVI_F16 ? 0x7c00u : 0x7f80u;
    for (int64_t i = 0; i < n; i++) bad |= (uint32_t)((h[i] & m) == m);
  }
  return bad != 0;
}

int64_t cpu_first_nonfinite(const void *x, kivi_dtype dtype, int64_t total) {
  for (int64_t i0 = 0; i0 < total; i0 += SCAN_CHUNK) {
    const int64_t n = total - i0 < SCAN_CHUNK ? total - i0 : SCAN_CHUNK;
    if (!chunk_bad(x, dtype, i0, n)) continue;
    for (int64_t i = i0; i < i0 + n; i++)
      if (bad_at(x, dtype, i)) return i;
  }
  return -1;
}

static int unquantizable_at(const void *x, kivi_dtype dtype, int64_t i) {
  return kivi_unquantizable(dtype == KIVI_F32 ? ((const uint32_t *)x)[i] : ((const uint16_t *)x)[i], dtype);
}

int64_t cpu_first_unquantizable(const void *x, kivi_dtype dtype, int64_t total) {
  for (int64_t i0 = 0; i0 < total; i0 += SCAN_CHUNK) {
    const int64_t n = total - i0 < SCAN_CHUNK ? total - i0 : SCAN_CHUNK;
    uint32_t bad = 0; /* branch-free over the chunk, as chunk_bad */
    for (int64_t i = i0; i < i0 + n; i++) bad |= (uint32_t)unquantizable_at(x, dtype, i);
    if (!bad) continue;
    for (int64_t i = i0; i < i0 + n; i++)
      if (unquantizable_at(x, dtype, i)) return i;
  }
  return -1;
}

kivi_status cpu_check_finite(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, const cpu_shape *sh) {
  const int64_t i = cpu_first_unquantizable(x, dtype, sh->rows * sh->cols);
  if (i < 0) return KIVI_OK;
  const int64_t r = i / sh->cols, c = i % sh->cols;
  char msg[CPU_ERR_LEN];
  kivi_unquantizable_message(msg, sizeof msg, op, cpu_load(x, dtype, i), i, r, c,
                             kivi_group_of(r, c, sh->rows, sh->cols, sh->axis, sh->group));
  return cpu_fail(ctx, KIVI_ERR_NONFINITE, "%s", msg);
}

/* ---------------------------------------------------------------- tiles ------------------ */

const float *cpu_tile_load(const void *x, kivi_dtype dtype, int64_t cols, int64_t r0, int64_t c0, int32_t nr,
                           int32_t nc, float *tmp, int64_t *stride) {
  if (dtype == KIVI_F32) {
    *stride = cols;
    return (const float *)x + r0 * cols + c0;
  }
  const uint16_t *h = (const uint16_t *)x;
  for (int32_t r = 0; r < nr; r++) {
    const uint16_t *src = h + (r0 + r) * cols + c0;
    float *dst = tmp + (int64_t)r * nc;
    if (dtype == KIVI_F16) {
      for (int32_t c = 0; c < nc; c++) dst[c] = kivi_f16_to_f32(src[c]);
    } else {
      for (int32_t c = 0; c < nc; c++) dst[c] = kivi_bf16_to_f32(src[c]);
    }
  }
  *stride = nc;
  return tmp;
}

void cpu_tile_store(void *out, kivi_dtype dtype, int64_t cols, int64_t r0, int64_t c0, int32_t nr, int32_t nc,
                    const float *src) {
  for (int32_t r = 0; r < nr; r++) {
    const float *s = src + (int64_t)r * nc;
    const int64_t o = (r0 + r) * cols + c0;
    if (dtype == KIVI_F32) {
      memcpy((float *)out + o, s, (size_t)nc * sizeof(float));
    } else if (dtype == KIVI_F16) {
      uint16_t *d = (uint16_t *)out + o;
      for (int32_t c = 0; c < nc; c++) d[c] = kivi_f32_to_f16(s[c]);
    } else {
      uint16_t *d = (uint16_t *)out + o;
      for (int32_t c = 0; c < nc; c++) d[c] = kivi_f32_to_bf16(s[c]);
    }
  }
}

/* ---------------------------------------------------------------- library ---------------- */

KIVI_API int32_t kivi_abi_version(void) { return KIVI_ABI_VERSION; }
KIVI_API int32_t kivi_backend_kind(void) { return 0; }

KIVI_API const char *kivi_status_str(kivi_status code) { return kivi_status_name(code); }

KIVI_API const char *kivi_last_error(void) { return tl_err; }

KIVI_API kivi_status kivi_device_count(int32_t *count) {
  if (!count) return cpu_fail(NULL, KIVI_ERR_ARG, "kivi_device_count: count must not be NULL");
  *count = 1;
  return KIVI_OK;
}

/* ---------------------------------------------------------------- context ---------------- */

KIVI_API kivi_status kivi_ctx_create(int32_t device, kivi_ctx_t *out) {
  if (!out) return cpu_fail(NULL, KIVI_ERR_ARG, "kivi_ctx_create: out must not be NULL");
  if (device != 0)
    return cpu_fail(NULL, KIVI_ERR_NO_DEVICE, "kivi_ctx_create: device must be 0 in the CPU build, got %d",
                    (int)device);
  kivi_ctx_t ctx = calloc(1, sizeof *ctx);
  if (!ctx) return cpu_fail(NULL, KIVI_ERR_NOMEM, "kivi_ctx_create: could not allocate %zu bytes", sizeof *ctx);
  ctx->device = device;
  *out = ctx;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_ctx_destroy(kivi_ctx_t ctx) {
  free(ctx);
  return KIVI_OK;
}

KIVI_API const char *kivi_ctx_last_error(kivi_ctx_t ctx) { return ctx ? ctx->err : ""; }

static void cpu_model(char *buf, size_t len) {
  buf[0] = 0;
  FILE *f = fopen("/proc/cpuinfo", "r");
  if (!f) return;
  char line[512];
  while (fgets(line, sizeof line, f)) {
    if (strncmp(line, "model name", 10) != 0) continue;
    const char *v = strchr(line, ':');
    if (!v) break;
    v++;
    while (*v == ' ' || *v == '\t') v++;
    snprintf(buf, len, "%s", v);
    size_t n = strlen(buf);
    while (n && (buf[n - 1] == '\n' || buf[n - 1] == ' ')) buf[--n] = 0;
    break;
  }
  fclose(f);
}

KIVI_API kivi_status kivi_ctx_device_name(kivi_ctx_t ctx, char *name, int32_t len) {
  static const char *op = "kivi_ctx_device_name";
  kivi_status st = cpu_need_ctx(ctx, op);
  if (st) return st;
  if (!name) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: name must not be NULL", op);
  if (len < 1) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: len must be >= 1, got %d", op, (int)len);
  char model[256], full[320];
  cpu_model(model, sizeof model);
  const long threads = sysconf(_SC_NPROCESSORS_ONLN);
  if (model[0] && threads > 0)
    snprintf(full, sizeof full, "CPU: %s (%ld threads)", model, threads);
  else if (model[0])
    snprintf(full, sizeof full, "CPU: %s", model);
  else
    snprintf(full, sizeof full, "CPU");
  snprintf(name, (size_t)len, "%s", full);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_ctx_synchronize(kivi_ctx_t ctx) { return cpu_need_ctx(ctx, "kivi_ctx_synchronize"); }

KIVI_API kivi_status kivi_ctx_query(kivi_ctx_t ctx, int32_t *done) {
  kivi_status st = cpu_need_ctx(ctx, "kivi_ctx_query");
  if (st) return st;
  if (!done) return cpu_fail(ctx, KIVI_ERR_ARG, "kivi_ctx_query: done must not be NULL");
  *done = 1;
  return KIVI_OK;
}

/* ---------------------------------------------------------------- memory ----------------- */

KIVI_API kivi_status kivi_mem_alloc(kivi_ctx_t ctx, uint64_t bytes, void **out) {
  static const char *op = "kivi_mem_alloc";
  kivi_status st = cpu_need_ctx(ctx, op);
  if (st) return st;
  if (!out) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  if (bytes == 0) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: bytes must be > 0, got 0", op);
  if (bytes > (uint64_t)SIZE_MAX - 255u)
    return cpu_fail(ctx, KIVI_ERR_NOMEM, "%s: cannot allocate %llu bytes", op, (unsigned long long)bytes);
  const size_t rounded = ((size_t)bytes + 255u) & ~(size_t)255u;
  void *p = aligned_alloc(256, rounded);
  if (!p) return cpu_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate %llu bytes", op, (unsigned long long)bytes);
  *out = p;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_mem_free(kivi_ctx_t ctx, void *data) {
  kivi_status st = cpu_need_ctx(ctx, "kivi_mem_free");
  if (st) return st;
  free(data);
  return KIVI_OK;
}

static kivi_status mem_move(kivi_ctx_t ctx, const char *op, const char *dst_name, void *dst, const char *src_name,
                            const void *src, uint64_t bytes) {
  kivi_status st = cpu_need_ctx(ctx, op);
  if (st) return st;
  if (!dst) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: %s must not be NULL", op, dst_name);
  if (!src) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: %s must not be NULL", op, src_name);
  if (bytes) memmove(dst, src, (size_t)bytes);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_mem_upload(kivi_ctx_t ctx, void *dst_data, const void *src_host, uint64_t bytes) {
  return mem_move(ctx, "kivi_mem_upload", "dst_data", dst_data, "src_host", src_host, bytes);
}
KIVI_API kivi_status kivi_mem_download(kivi_ctx_t ctx, void *dst_host, const void *src_data, uint64_t bytes) {
  return mem_move(ctx, "kivi_mem_download", "dst_host", dst_host, "src_data", src_data, bytes);
}
KIVI_API kivi_status kivi_mem_copy(kivi_ctx_t ctx, void *dst_data, const void *src_data, uint64_t bytes) {
  return mem_move(ctx, "kivi_mem_copy", "dst_data", dst_data, "src_data", src_data, bytes);
}

KIVI_API kivi_status kivi_mem_info(kivi_ctx_t ctx, uint64_t *free_bytes, uint64_t *total_bytes) {
  static const char *op = "kivi_mem_info";
  kivi_status st = cpu_need_ctx(ctx, op);
  if (st) return st;
  if (!free_bytes) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: free_bytes must not be NULL", op);
  if (!total_bytes) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: total_bytes must not be NULL", op);
  const long page = sysconf(_SC_PAGESIZE), total = sysconf(_SC_PHYS_PAGES), avail = sysconf(_SC_AVPHYS_PAGES);
  if (page <= 0 || total <= 0 || avail < 0)
    return cpu_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: sysconf cannot report physical memory here", op);
  *free_bytes = (uint64_t)avail * (uint64_t)page;
  *total_bytes = (uint64_t)total * (uint64_t)page;
  return KIVI_OK;
}

/* ---------------------------------------------------------------- testing ---------------- */

KIVI_API kivi_status kivi_debug_fault(kivi_ctx_t ctx) {
  static const char *op = "kivi_debug_fault";
  kivi_status st = cpu_need_ctx(ctx, op);
  if (st) return st;
  return cpu_fail(ctx, KIVI_ERR_NO_DEVICE,
                  "%s: the CPU build has no CUDA device to fault (a test-only export of the CUDA build)", op);
}

/* ---------------------------------------------------------------- timing ----------------- */

static double elapsed_s(const struct timespec *a, const struct timespec *b) {
  return (double)(b->tv_sec - a->tv_sec) + (double)(b->tv_nsec - a->tv_nsec) * 1e-9;
}

KIVI_API kivi_status kivi_timer_start(kivi_ctx_t ctx) {
  kivi_status st = cpu_need_ctx(ctx, "kivi_timer_start");
  if (st) return st;
  clock_gettime(CLOCK_MONOTONIC, &ctx->t0);
  ctx->timer_started = 1;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_timer_stop(kivi_ctx_t ctx, float *ms) {
  static const char *op = "kivi_timer_stop";
  struct timespec t1;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  kivi_status st = cpu_need_ctx(ctx, op);
  if (st) return st;
  if (!ms) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: ms must not be NULL", op);
  if (!ctx->timer_started) return cpu_fail(ctx, KIVI_ERR_STATE, "%s: call kivi_timer_start first", op);
  *ms = (float)(elapsed_s(&ctx->t0, &t1) * 1e3);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_bench_copy(kivi_ctx_t ctx, uint64_t bytes, int32_t iters, double *gbps) {
  static const char *op = "kivi_bench_copy";
  kivi_status st = cpu_need_ctx(ctx, op);
  if (st) return st;
  if (!gbps) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: gbps must not be NULL", op);
  if (bytes == 0) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: bytes must be > 0, got 0", op);
  if (iters < 1) return cpu_fail(ctx, KIVI_ERR_ARG, "%s: iters must be >= 1, got %d", op, (int)iters);
  if (bytes > (uint64_t)SIZE_MAX / 2)
    return cpu_fail(ctx, KIVI_ERR_NOMEM, "%s: cannot allocate 2 x %llu bytes", op, (unsigned long long)bytes);
  char *src = malloc((size_t)bytes), *dst = malloc((size_t)bytes);
  if (!src || !dst) {
    free(src);
    free(dst);
    return cpu_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate 2 x %llu bytes", op, (unsigned long long)bytes);
  }
  memset(src, 1, (size_t)bytes);
  memcpy(dst, src, (size_t)bytes); /* warm-up: faults dst's pages in */
  __asm__ volatile("" ::: "memory");
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int32_t i = 0; i < iters; i++) {
    memcpy(dst, src, (size_t)bytes);
    __asm__ volatile("" ::: "memory"); /* keeps every copy: dst counts as read */
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  free(src);
  free(dst);
  double s = elapsed_s(&t0, &t1);
  if (s <= 0) s = 1e-9;
  *gbps = 2.0 * (double)bytes * (double)iters / s / 1e9;
  return KIVI_OK;
}
