/*
 * common.cu — library, context, memory and timing exports of the CUDA build, plus what every op
 * shares: the error slots, CUDA error mapping (sticky faults poison the context), the argument
 * validator (same rules, order and messages as the CPU build) and the NaN/Inf pre-scan.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"

static thread_local char tl_err[KV_ERR_LEN];

kivi_status kv_fail(kivi_ctx_t ctx, kivi_status st, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl_err, sizeof tl_err, fmt, ap);
  va_end(ap);
  if (ctx) snprintf(ctx->error, sizeof ctx->error, "%s", tl_err);
  return st;
}

/* Faults after which the CUDA context (and so ours) cannot be used again. */
static bool kv_is_sticky(cudaError_t e) {
  switch (e) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorContained:
    case cudaErrorExternalDevice:
    case cudaErrorTensorMemoryLeak:
    case cudaErrorContextIsDestroyed:
    case cudaErrorPriorLaunchFailure: return true;
    default: return false;
  }
}

kivi_status kv_cuda(kivi_ctx_t ctx, cudaError_t e, const char *op, const char *what) {
  if (e == cudaSuccess) return KIVI_OK;
  if (kv_is_sticky(e)) {
    kivi_status st = kv_fail(ctx, KIVI_ERR_CUDA_STICKY,
                             "%s: %s failed with a sticky CUDA fault: %s (%s); the context is unusable, destroy it", op,
                             what, cudaGetErrorString(e), cudaGetErrorName(e));
    if (ctx && !ctx->sticky) {
      ctx->sticky = 1;
      snprintf(ctx->sticky_msg, sizeof ctx->sticky_msg, "%s", tl_err);
    }
    return st;
  }
  (void)cudaGetLastError(); /* clear the non-sticky error so the next call starts clean */
  return kv_fail(ctx, e == cudaErrorMemoryAllocation ? KIVI_ERR_NOMEM : KIVI_ERR_CUDA, "%s: %s failed: %s (%s)", op,
                 what, cudaGetErrorString(e), cudaGetErrorName(e));
}

kivi_status kv_enter(kivi_ctx_t ctx, const char *op) {
  if (!ctx) return kv_fail(NULL, KIVI_ERR_ARG, "%s: ctx must not be NULL", op);
  if (ctx->sticky)
    return kv_fail(ctx, KIVI_ERR_CUDA_STICKY,
                   "%s: the context is unusable after an earlier sticky CUDA fault (%s); destroy it", op,
                   ctx->sticky_msg);
  return kv_cuda(ctx, cudaSetDevice(ctx->device), op, "cudaSetDevice");
}

kivi_status kv_launched(kivi_ctx_t ctx, const char *op, const char *kernel) {
  return kv_cuda(ctx, cudaGetLastError(), op, kernel);
}

unsigned kv_grid(kivi_ctx_t ctx, int64_t work, int per_sm) {
  int64_t cap = (int64_t)(ctx->sm_count > 0 ? ctx->sm_count : 1) * per_sm;
  int64_t g = work < cap ? work : cap;
  return (unsigned)(g < 1 ? 1 : g);
}

/* ---------------------------------------------------------------- validation ------------- */

kivi_status kv_validate(kivi_ctx_t ctx, const kv_spec *s, kv_shape *sh) {
  KIVI_HOST_ENTER(kv_enter, kv_fail, ctx, s->op, kivi_spec_check(s, sh, msg, sizeof msg));
  return KIVI_OK;
}

kivi_status kv_validate_input(kivi_ctx_t ctx, const kv_spec *s, kv_shape *sh, const void *x) {
  kivi_status st = kv_validate(ctx, s, sh);
  if (st || (s->flags & KIVI_FLAG_TRUSTED)) return st;
  return kv_check_finite(ctx, s->op, x, s->dtype, sh);
}

kivi_status kv_scratch_reset(kivi_ctx_t ctx, const char *op) {
  return kv_cuda(ctx, cudaMemsetAsync(ctx->d_scratch, 0xff, KV_SLOTS * sizeof(unsigned long long), ctx->stream), op,
                 "cudaMemsetAsync (validation flags)");
}

kivi_status kv_scratch_read(kivi_ctx_t ctx, const char *op) {
  kivi_status st = kv_cuda(ctx,
                           cudaMemcpyAsync(ctx->h_scratch, ctx->d_scratch, KV_SLOTS * sizeof(unsigned long long),
                                           cudaMemcpyDeviceToHost, ctx->stream),
                           op, "cudaMemcpyAsync (validation flags)");
  if (st) return st;
  return kv_cuda(ctx, cudaStreamSynchronize(ctx->stream), op, "cudaStreamSynchronize (validation)");
}

/* ---------------------------------------------------------------- NaN / Inf / range scan - */

/* What the quantizers (fp16 params) refuse: Inf or NaN, or a finite f32 / bf16 value that fp16 rounds
   to Inf (|x| >= 65520, as kivi_f32_to_f16; bf16 from 65536 up). Same rule as the CPU build's scan. */
template <int DT>
__device__ __forceinline__ bool kv_bad_bits(uint32_t u) {
  return kivi_unquantizable(u, DT);
}

/* x [n]: 16-byte loads when aligned (grid-stride), records the first bad index by atomicMin (only
   threads that found one touch the flag). */
template <int DT>
static __global__ void k_scan_nonfinite(const void *__restrict__ x, int64_t n, bool aligned,
                                        unsigned long long *__restrict__ first_bad) {
  constexpr int V = kv_vec<DT>::n;
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t bad = INT64_MAX;
  int64_t scalar_from = 0;
  if (aligned) {
    const int64_t nv = n / V;
    const uint4 *xv = (const uint4 *)x;
    for (int64_t i = tid; i < nv; i += stride) {
      const uint4 u = xv[i];
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
      bool any = false;
#pragma unroll
      for (int k = 0; k < 4; k++) {
        if constexpr (DT == KIVI_F32)
          any |= kv_bad_bits<DT>(w[k]);
        else
          any |= kv_bad_bits<DT>(w[k] & 0xffffu) | kv_bad_bits<DT>(w[k] >> 16);
      }
      if (any) {
        for (int k = 0; k < V; k++) {
          const uint32_t e = DT == KIVI_F32 ? w[k] : ((w[k / 2] >> (16 * (k & 1))) & 0xffffu);
          if (kv_bad_bits<DT>(e)) {
            bad = bad < i * V + k ? bad : i * V + k;
            break;
          }
        }
      }
    }
    scalar_from = nv * V;
  }
  for (int64_t i = scalar_from + tid; i < n; i += stride) {
    const uint32_t e = DT == KIVI_F32 ? ((const uint32_t *)x)[i] : (uint32_t)((const uint16_t *)x)[i];
    if (kv_bad_bits<DT>(e)) bad = bad < i ? bad : i;
  }
  if (bad != INT64_MAX) atomicMin(first_bad, (unsigned long long)bad);
}

kivi_status kv_check_finite(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, const kv_shape *sh) {
  const int64_t n = sh->rows * sh->cols;
  kivi_status st = kv_scratch_reset(ctx, op);
  if (st) return st;
  const bool aligned = ((uintptr_t)x & 15u) == 0;
  const int threads = 256;
  const int64_t per_block = (int64_t)threads * 16; /* ~16 bytes per thread per pass at minimum */
  const unsigned grid = kv_grid(ctx, (n * (dtype == KIVI_F32 ? 4 : 2) + per_block * 16 - 1) / (per_block * 16), 8);
  unsigned long long *slot = ctx->d_scratch + KV_SLOT_NONFINITE;
#define KV_SCAN(DT) k_scan_nonfinite<DT><<<grid, threads, 0, ctx->stream>>>(x, n, aligned, slot)
  KV_DISPATCH_DT(dtype, KV_SCAN)
#undef KV_SCAN
  if ((st = kv_launched(ctx, op, "k_scan_nonfinite"))) return st;
  if ((st = kv_scratch_read(ctx, op))) return st;
  const unsigned long long bad = ctx->h_scratch[KV_SLOT_NONFINITE];
  if (bad == ~0ull) return KIVI_OK;
  /* One element to name it: NaN, +Inf or -Inf. */
  const int64_t i = (int64_t)bad;
  uint32_t bits = 0;
  const size_t es = dtype == KIVI_F32 ? 4 : 2;
  st = kv_cuda(ctx, cudaMemcpy(&bits, (const char *)x + (size_t)i * es, es, cudaMemcpyDeviceToHost), op,
               "cudaMemcpy (bad element)");
  if (st) return st;
  float v = dtype == KIVI_F32
                ? kivi_bits_f32(bits)
                : (dtype == KIVI_F16 ? kivi_f16_to_f32((uint16_t)bits) : kivi_bf16_to_f32((uint16_t)bits));
  const int64_t r = i / sh->cols, c = i % sh->cols;
  char msg[KV_ERR_LEN];
  kivi_unquantizable_message(msg, sizeof msg, op, v, i, r, c,
                             kivi_group_of(r, c, sh->rows, sh->cols, sh->axis, sh->group));
  return kv_fail(ctx, KIVI_ERR_NONFINITE, "%s", msg);
}

/* ---------------------------------------------------------------- staged uploads --------- */

/* The staging ring: KV_UP_PARTS parts of KV_UP_PART bytes of pinned host memory. Uploads fill the current
   part; the next part is taken once the event recorded after its last copy has completed (a whole ring of
   uploads ago: done long since in any steady loop), so a host plan (row indices, a large batch's sequences,
   block-table rows) reaches the device without the wait for the stream that a copy from pageable memory
   makes: the host's work on the next call overlaps the device's on this one. */
#define KV_UP_PARTS 4
#define KV_UP_PART ((size_t)1 << 20)
struct kv_up_ring {
  uint8_t *host; /* pinned [KV_UP_PARTS * KV_UP_PART] */
  cudaEvent_t ev[KV_UP_PARTS];
  int part;
  size_t used; /* bytes of the current part in use */
};

void kv_upload_release(kivi_ctx_t ctx) {
  kv_up_ring *u = ctx->up;
  if (!u) return;
  for (int i = 0; i < KV_UP_PARTS; i++)
    if (u->ev[i]) cudaEventDestroy(u->ev[i]);
  if (u->host) cudaFreeHost(u->host);
  free(u);
  ctx->up = NULL;
}

/* The ring, made on first use; NULL where pinned memory or events are not to be had (the uploads then go
   from pageable memory: slower, never wrong). */
static kv_up_ring *up_ring(kivi_ctx_t ctx) {
  if (ctx->up) return ctx->up;
  kv_up_ring *u = (kv_up_ring *)calloc(1, sizeof *u);
  if (!u) return NULL;
  ctx->up = u;
  bool ok = cudaMallocHost((void **)&u->host, KV_UP_PARTS * KV_UP_PART) == cudaSuccess;
  for (int i = 0; ok && i < KV_UP_PARTS; i++)
    ok = cudaEventCreateWithFlags(&u->ev[i], cudaEventDisableTiming) == cudaSuccess;
  if (!ok) {
    (void)cudaGetLastError();
    kv_upload_release(ctx);
    return NULL;
  }
  return u;
}

kivi_status kv_upload(kivi_ctx_t ctx, const char *op, void *dst, const void *src, size_t bytes, const char *what) {
  if (bytes == 0) return KIVI_OK;
  kv_up_ring *u = bytes <= KV_UP_PART ? up_ring(ctx) : NULL;
  if (!u) return kv_cuda(ctx, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, ctx->stream), op, what);
  size_t at = (u->used + 15) & ~(size_t)15;
  kivi_status st;
  if (at + bytes > KV_UP_PART) { /* the next part, once its last copy is done */
    u->part = (u->part + 1) % KV_UP_PARTS;
    u->used = at = 0;
    if ((st = kv_cuda(ctx, cudaEventSynchronize(u->ev[u->part]), op, "cudaEventSynchronize (staged upload)")))
      return st;
  }
  uint8_t *h = u->host + (size_t)u->part * KV_UP_PART + at;
  memcpy(h, src, bytes);
  u->used = at + bytes;
  if ((st = kv_cuda(ctx, cudaMemcpyAsync(dst, h, bytes, cudaMemcpyHostToDevice, ctx->stream), op, what))) return st;
  return kv_cuda(ctx, cudaEventRecord(u->ev[u->part], ctx->stream), op, "cudaEventRecord (staged upload)");
}

/* ---------------------------------------------------------------- library ---------------- */

extern "C" {

KIVI_API int32_t kivi_abi_version(void) { return KIVI_ABI_VERSION; }
KIVI_API int32_t kivi_backend_kind(void) { return 1; }

KIVI_API const char *kivi_status_str(kivi_status code) { return kivi_status_name(code); }

KIVI_API const char *kivi_last_error(void) { return tl_err; }

KIVI_API kivi_status kivi_device_count(int32_t *count) {
  if (!count) return kv_fail(NULL, KIVI_ERR_ARG, "kivi_device_count: count must not be NULL");
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 0; /* no driver or no device: zero devices, not an error */
  }
  *count = n;
  return KIVI_OK;
}

/* ---------------------------------------------------------------- context ---------------- */

static void ctx_release(kivi_ctx_t ctx) {
  kv_upload_release(ctx);
  kv_blas_release(ctx);
  if (ctx->h_scratch) cudaFreeHost(ctx->h_scratch);
  if (ctx->d_scratch) cudaFree(ctx->d_scratch);
  if (ctx->ev_start) cudaEventDestroy(ctx->ev_start);
  if (ctx->ev_stop) cudaEventDestroy(ctx->ev_stop);
  if (ctx->stream) cudaStreamDestroy(ctx->stream);
  (void)cudaGetLastError();
  free(ctx);
}

KIVI_API kivi_status kivi_ctx_create(int32_t device, kivi_ctx_t *out) {
  static const char *op = "kivi_ctx_create";
  if (!out) return kv_fail(NULL, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return kv_fail(NULL, KIVI_ERR_NO_DEVICE, "%s: no CUDA device: %s (%s)", op, cudaGetErrorString(e),
                   cudaGetErrorName(e));
  }
  if (device < 0 || device >= n)
    return kv_fail(NULL, KIVI_ERR_NO_DEVICE, "%s: device must be in 0..%d, got %d", op, n - 1, (int)device);
  kivi_ctx_t ctx = (kivi_ctx_t)calloc(1, sizeof *ctx);
  if (!ctx) return kv_fail(NULL, KIVI_ERR_NOMEM, "%s: could not allocate %zu bytes", op, sizeof *ctx);
  ctx->device = device;
  kivi_status st;
  if ((st = kv_cuda(NULL, cudaSetDevice(device), op, "cudaSetDevice")) ||
      (st = kv_cuda(NULL, cudaDeviceGetAttribute(&ctx->sm_count, cudaDevAttrMultiProcessorCount, device), op,
                    "cudaDeviceGetAttribute")) ||
      (st = kv_cuda(NULL, cudaStreamCreateWithFlags(&ctx->stream, cudaStreamNonBlocking), op,
                    "cudaStreamCreateWithFlags")) ||
      (st = kv_cuda(NULL, cudaEventCreate(&ctx->ev_start), op, "cudaEventCreate")) ||
      (st = kv_cuda(NULL, cudaEventCreate(&ctx->ev_stop), op, "cudaEventCreate")) ||
      (st = kv_cuda(NULL, cudaMalloc((void **)&ctx->d_scratch, KV_SLOTS * sizeof(unsigned long long)), op,
                    "cudaMalloc (scratch)")) ||
      (st = kv_cuda(NULL, cudaMallocHost((void **)&ctx->h_scratch, KV_SLOTS * sizeof(unsigned long long)), op,
                    "cudaMallocHost (scratch)"))) {
    ctx_release(ctx);
    return st;
  }
  *out = ctx;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_ctx_destroy(kivi_ctx_t ctx) {
  if (!ctx) return KIVI_OK;
  if (cudaSetDevice(ctx->device) == cudaSuccess && !ctx->sticky) (void)cudaStreamSynchronize(ctx->stream);
  ctx_release(ctx);
  return KIVI_OK;
}

KIVI_API const char *kivi_ctx_last_error(kivi_ctx_t ctx) { return ctx ? ctx->error : ""; }

KIVI_API kivi_status kivi_ctx_device_name(kivi_ctx_t ctx, char *name, int32_t len) {
  static const char *op = "kivi_ctx_device_name";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!name) return kv_fail(ctx, KIVI_ERR_ARG, "%s: name must not be NULL", op);
  if (len < 1) return kv_fail(ctx, KIVI_ERR_ARG, "%s: len must be >= 1, got %d", op, (int)len);
  cudaDeviceProp prop;
  if ((st = kv_cuda(ctx, cudaGetDeviceProperties(&prop, ctx->device), op, "cudaGetDeviceProperties"))) return st;
  snprintf(name, (size_t)len, "%s", prop.name);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_ctx_synchronize(kivi_ctx_t ctx) {
  static const char *op = "kivi_ctx_synchronize";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  return kv_cuda(ctx, cudaStreamSynchronize(ctx->stream), op, "work enqueued on the context");
}

KIVI_API kivi_status kivi_ctx_query(kivi_ctx_t ctx, int32_t *done) {
  static const char *op = "kivi_ctx_query";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!done) return kv_fail(ctx, KIVI_ERR_ARG, "%s: done must not be NULL", op);
  cudaError_t e = cudaStreamQuery(ctx->stream);
  if (e == cudaErrorNotReady) {
    *done = 0;
    return KIVI_OK;
  }
  if ((st = kv_cuda(ctx, e, op, "work enqueued on the context"))) return st;
  *done = 1;
  return KIVI_OK;
}

/* ---------------------------------------------------------------- memory ----------------- */

KIVI_API kivi_status kivi_mem_alloc(kivi_ctx_t ctx, uint64_t bytes, void **out) {
  static const char *op = "kivi_mem_alloc";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!out) return kv_fail(ctx, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  if (bytes == 0) return kv_fail(ctx, KIVI_ERR_ARG, "%s: bytes must be > 0, got 0", op);
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, (size_t)bytes);
  if (e != cudaSuccess) {
    char what[96];
    snprintf(what, sizeof what, "cudaMalloc of %llu bytes", (unsigned long long)bytes);
    return kv_cuda(ctx, e, op, what);
  }
  *out = p;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_mem_free(kivi_ctx_t ctx, void *data) {
  static const char *op = "kivi_mem_free";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!data) return KIVI_OK;
  return kv_cuda(ctx, cudaFree(data), op, "cudaFree");
}

static kivi_status mem_move(kivi_ctx_t ctx, const char *op, const char *dst_name, void *dst, const char *src_name,
                            const void *src, uint64_t bytes, cudaMemcpyKind kind, bool wait) {
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!dst) return kv_fail(ctx, KIVI_ERR_ARG, "%s: %s must not be NULL", op, dst_name);
  if (!src) return kv_fail(ctx, KIVI_ERR_ARG, "%s: %s must not be NULL", op, src_name);
  if (bytes == 0) return KIVI_OK;
  if ((st = kv_cuda(ctx, cudaMemcpyAsync(dst, src, (size_t)bytes, kind, ctx->stream), op, "cudaMemcpyAsync")))
    return st;
  if (wait) return kv_cuda(ctx, cudaStreamSynchronize(ctx->stream), op, "cudaStreamSynchronize");
  return KIVI_OK;
}

KIVI_API kivi_status kivi_mem_upload(kivi_ctx_t ctx, void *dst_data, const void *src_host, uint64_t bytes) {
  return mem_move(ctx, "kivi_mem_upload", "dst_data", dst_data, "src_host", src_host, bytes, cudaMemcpyHostToDevice,
                  true);
}
KIVI_API kivi_status kivi_mem_download(kivi_ctx_t ctx, void *dst_host, const void *src_data, uint64_t bytes) {
  return mem_move(ctx, "kivi_mem_download", "dst_host", dst_host, "src_data", src_data, bytes, cudaMemcpyDeviceToHost,
                  true);
}
KIVI_API kivi_status kivi_mem_copy(kivi_ctx_t ctx, void *dst_data, const void *src_data, uint64_t bytes) {
  return mem_move(ctx, "kivi_mem_copy", "dst_data", dst_data, "src_data", src_data, bytes, cudaMemcpyDeviceToDevice,
                  false);
}

KIVI_API kivi_status kivi_mem_info(kivi_ctx_t ctx, uint64_t *free_bytes, uint64_t *total_bytes) {
  static const char *op = "kivi_mem_info";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!free_bytes) return kv_fail(ctx, KIVI_ERR_ARG, "%s: free_bytes must not be NULL", op);
  if (!total_bytes) return kv_fail(ctx, KIVI_ERR_ARG, "%s: total_bytes must not be NULL", op);
  size_t f = 0, t = 0;
  if ((st = kv_cuda(ctx, cudaMemGetInfo(&f, &t), op, "cudaMemGetInfo"))) return st;
  *free_bytes = f;
  *total_bytes = t;
  return KIVI_OK;
}

/* ---------------------------------------------------------------- timing ----------------- */

KIVI_API kivi_status kivi_timer_start(kivi_ctx_t ctx) {
  static const char *op = "kivi_timer_start";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if ((st = kv_cuda(ctx, cudaEventRecord(ctx->ev_start, ctx->stream), op, "cudaEventRecord"))) return st;
  ctx->timer_started = 1;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_timer_stop(kivi_ctx_t ctx, float *ms) {
  static const char *op = "kivi_timer_stop";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!ms) return kv_fail(ctx, KIVI_ERR_ARG, "%s: ms must not be NULL", op);
  if (!ctx->timer_started) return kv_fail(ctx, KIVI_ERR_STATE, "%s: call kivi_timer_start first", op);
  if ((st = kv_cuda(ctx, cudaEventRecord(ctx->ev_stop, ctx->stream), op, "cudaEventRecord"))) return st;
  if ((st = kv_cuda(ctx, cudaEventSynchronize(ctx->ev_stop), op, "cudaEventSynchronize"))) return st;
  float t = 0.0f;
  if ((st = kv_cuda(ctx, cudaEventElapsedTime(&t, ctx->ev_start, ctx->ev_stop), op, "cudaEventElapsedTime"))) return st;
  *ms = t;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_bench_copy(kivi_ctx_t ctx, uint64_t bytes, int32_t iters, double *gbps) {
  static const char *op = "kivi_bench_copy";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!gbps) return kv_fail(ctx, KIVI_ERR_ARG, "%s: gbps must not be NULL", op);
  if (bytes == 0) return kv_fail(ctx, KIVI_ERR_ARG, "%s: bytes must be > 0, got 0", op);
  if (iters < 1) return kv_fail(ctx, KIVI_ERR_ARG, "%s: iters must be >= 1, got %d", op, (int)iters);
  void *src = NULL, *dst = NULL;
  cudaEvent_t e0 = NULL, e1 = NULL;
  float ms = 0.0f;
  if ((st = kv_cuda(ctx, cudaMalloc(&src, (size_t)bytes), op, "cudaMalloc (source)")) ||
      (st = kv_cuda(ctx, cudaMalloc(&dst, (size_t)bytes), op, "cudaMalloc (destination)")) ||
      (st = kv_cuda(ctx, cudaEventCreate(&e0), op, "cudaEventCreate")) ||
      (st = kv_cuda(ctx, cudaEventCreate(&e1), op, "cudaEventCreate")) ||
      (st = kv_cuda(ctx, cudaMemsetAsync(src, 1, (size_t)bytes, ctx->stream), op, "cudaMemsetAsync")) ||
      (st = kv_cuda(ctx, cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDeviceToDevice, ctx->stream), op,
                    "cudaMemcpyAsync (warm-up)")) ||
      (st = kv_cuda(ctx, cudaEventRecord(e0, ctx->stream), op, "cudaEventRecord")))
    goto done;
  for (int32_t i = 0; i < iters; i++)
    if ((st = kv_cuda(ctx, cudaMemcpyAsync(dst, src, (size_t)bytes, cudaMemcpyDeviceToDevice, ctx->stream), op,
                      "cudaMemcpyAsync")))
      goto done;
  if ((st = kv_cuda(ctx, cudaEventRecord(e1, ctx->stream), op, "cudaEventRecord")) ||
      (st = kv_cuda(ctx, cudaEventSynchronize(e1), op, "cudaEventSynchronize")) ||
      (st = kv_cuda(ctx, cudaEventElapsedTime(&ms, e0, e1), op, "cudaEventElapsedTime")))
    goto done;
  {
    double s = (double)ms * 1e-3;
    if (s <= 0) s = 1e-9;
    *gbps = 2.0 * (double)bytes * (double)iters / s / 1e9;
  }
done:
  if (!ctx->sticky) (void)cudaStreamSynchronize(ctx->stream);
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  if (src) cudaFree(src);
  if (dst) cudaFree(dst);
  if (!ctx->sticky) (void)cudaGetLastError();
  return st;
}

} /* extern "C" */
