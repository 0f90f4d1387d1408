/*
 * common.cuh — private to the CUDA build: the context, the error slots, the shared argument
 * validator (the CPU build's rules and messages), the NaN/Inf pre-scan, and the device helpers
 * (element loads/stores per dtype) that every op's kernels use.
 */
#ifndef KIVI_CUDA_COMMON_CUH
#define KIVI_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kivi.h"
#include "kivi_format.h"
#include "kivi_host.h"

#define KV_ERR_LEN 512

/* Slots of the device scratch buffer (uint64 each, reset to ~0 before a check). */
enum { KV_SLOT_NONFINITE = 0, KV_SLOT_CENTROIDS = 1, KV_SLOT_CODES = 2, KV_SLOTS = 4 };

struct kivi_ctx {
  int32_t device;
  int32_t sm_count;
  cudaStream_t stream; /* non-blocking: never serialises with the legacy default stream */
  cudaEvent_t ev_start, ev_stop;
  int timer_started;
  int sticky; /* a sticky fault happened: every later call fails */
  char sticky_msg[KV_ERR_LEN];
  char error[KV_ERR_LEN];
  unsigned long long *d_scratch; /* device [KV_SLOTS]: validation results */
  unsigned long long *h_scratch; /* pinned host mirror [KV_SLOTS] */
  struct kv_blas *blas;          /* the model ops' cuBLAS handle and scratch (model.cu), made on first use */
  struct kv_up_ring *up;         /* pinned staging of small uploads (kv_upload), made on first use */
};

/** Copies `bytes` of host memory at src to the device at dst, in stream order, without the stream
    synchronisation that a copy from pageable memory costs: through a pinned staging ring of the context
    (src may be reused as soon as this returns). Copies larger than a part of the ring go from src
    directly (pageable: the driver may wait for the stream). what names the copy in errors. */
kivi_status kv_upload(kivi_ctx_t ctx, const char *op, void *dst, const void *src, size_t bytes, const char *what);
/** Frees ctx->up; a no-op when nothing was uploaded through it. */
void kv_upload_release(kivi_ctx_t ctx);

/** Frees ctx->blas (model.cu); a no-op when no model op ran. */
void kv_blas_release(kivi_ctx_t ctx);

/* ---------------------------------------------------------------- errors ----------------- */

/** Formats the message into the thread-local slot and (if ctx) the context's; returns st. */
kivi_status kv_fail(kivi_ctx_t ctx, kivi_status st, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/** Maps a CUDA error to KIVI_ERR_CUDA / KIVI_ERR_NOMEM / KIVI_ERR_CUDA_STICKY (marking ctx sticky),
    with "op: what failed: <CUDA's text> (<name>)"; clears a non-sticky error. OK for cudaSuccess. */
kivi_status kv_cuda(kivi_ctx_t ctx, cudaError_t e, const char *op, const char *what);
/** ctx non-null, not sticky, cudaSetDevice(ctx->device). Every export taking a ctx starts here. */
kivi_status kv_enter(kivi_ctx_t ctx, const char *op);
/** cudaGetLastError after a launch. */
kivi_status kv_launched(kivi_ctx_t ctx, const char *op, const char *kernel);
/** Blocks, at most ~sm_count * per_sm, at least 1, for a grid-stride loop over `work` blocks. */
unsigned kv_grid(kivi_ctx_t ctx, int64_t work, int per_sm);

/* ---------------------------------------------------------------- validation ------------- */

/* The argument rules and each export's spec are kivi_host.h's, shared with the CPU build. */
typedef kivi_spec kv_spec;
typedef kivi_shape kv_shape;

/** kv_enter (ctx checks + cudaSetDevice), then kivi_spec_check (the argument rules of kivi.h, as the
    CPU build); fills *sh. */
kivi_status kv_validate(kivi_ctx_t ctx, const kv_spec *s, kv_shape *sh);
/** The quantizers' scan of x [n] on the device (NaN, Inf, or a finite f32 / bf16 value beyond fp16's
    range: the params are fp16); waits for it. KIVI_ERR_NONFINITE naming the first bad element (row,
    col, group from sh) and nothing else happens. */
kivi_status kv_check_finite(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, const kv_shape *sh);
/** kv_validate, then, unless the spec's flags say KIVI_FLAG_TRUSTED, the device scan of the input x
    (kv_check_finite). */
kivi_status kv_validate_input(kivi_ctx_t ctx, const kv_spec *s, kv_shape *sh, const void *x);
/** Resets the scratch slots (async, on the stream). */
kivi_status kv_scratch_reset(kivi_ctx_t ctx, const char *op);
/** Copies the scratch slots to ctx->h_scratch and waits. */
kivi_status kv_scratch_read(kivi_ctx_t ctx, const char *op);

/* ---------------------------------------------------------------- device helpers --------- */
/** This thread's first index of a grid-stride loop, and the loop's stride. */
__device__ __forceinline__ int64_t kv_grid_first() { return (int64_t)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t kv_grid_stride() { return (int64_t)gridDim.x * blockDim.x; }

template <int DT>
struct kv_dt;
template <>
struct kv_dt<KIVI_F32> {
  static constexpr int size = 4;
};
template <>
struct kv_dt<KIVI_F16> {
  static constexpr int size = 2;
};
template <>
struct kv_dt<KIVI_BF16> {
  static constexpr int size = 2;
};

/** 16-bit pattern -> float (exact), per dtype. */
template <int DT>
__device__ __forceinline__ float kv_h2f(uint32_t h) {
  if constexpr (DT == KIVI_F16)
    return __half2float(__ushort_as_half((unsigned short)h));
  else
    return __uint_as_float(h << 16);
}

/** Element i of x as float. */
template <int DT>
__device__ __forceinline__ float kv_ld(const void *__restrict__ x, int64_t i) {
  if constexpr (DT == KIVI_F32)
    return ((const float *)x)[i];
  else
    return kv_h2f<DT>(((const uint16_t *)x)[i]);
}

/** Element e (0 or 1) of a 32-bit word holding two 16-bit elements (or one f32). */
template <int DT>
__device__ __forceinline__ float kv_word_elem(uint32_t w, int e) {
  if constexpr (DT == KIVI_F32)
    return __uint_as_float(w);
  else
    return kv_h2f<DT>(e ? (w >> 16) : (w & 0xffffu));
}

/** float -> stored pattern of a 16-bit dtype (f16 by the hardware's RNE conversion, which is
    kivi_f32_to_f16 for every input; bf16 by kivi_format.h). */
template <int DT>
__device__ __forceinline__ uint16_t kv_f2h(float v) {
  if constexpr (DT == KIVI_F16)
    return __half_as_ushort(__float2half_rn(v));
  else
    return kivi_f32_to_bf16(v);
}

/** Stores v as element i of out. */
template <int DT>
__device__ __forceinline__ void kv_st(void *__restrict__ out, int64_t i, float v) {
  if constexpr (DT == KIVI_F32)
    ((float *)out)[i] = v;
  else
    ((uint16_t *)out)[i] = kv_f2h<DT>(v);
}

/** cp.async of N bytes (16: L2 only; 4 or 8: through L1) from global g to shared address saddr. */
template <int N>
__device__ __forceinline__ void kv_cpa(uint32_t saddr, const void *g) {
  if constexpr (N == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(saddr), "l"(g));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(saddr), "l"(g), "n"(N));
}
__device__ __forceinline__ void kv_commit() { asm volatile("cp.async.commit_group;\n" ::); }
/** Waits until at most `pending` (0..3) of this thread's cp.async groups are still in flight. */
__device__ __forceinline__ void kv_wait(int pending) {
  if (pending <= 0)
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  else if (pending == 1)
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  else if (pending == 2)
    asm volatile("cp.async.wait_group 2;\n" ::: "memory");
  else
    asm volatile("cp.async.wait_group 3;\n" ::: "memory");
}

/** Values per 16-byte chunk. */
template <int DT>
struct kv_vec {
  static constexpr int n = 16 / kv_dt<DT>::size;
};

/** The 16-byte chunk of x starting at element e (a multiple of kv_vec<DT>::n) as floats; one
    vector load when x is 16-byte aligned, element loads otherwise. */
template <int DT>
__device__ __forceinline__ void kv_ld_chunk(const void *__restrict__ x, int64_t e, bool aligned,
                                            float (&v)[kv_vec<DT>::n]) {
  constexpr int N = kv_vec<DT>::n;
  if (aligned) {
    const uint4 u = ((const uint4 *)x)[e / N];
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < N; i++) {
      if constexpr (DT == KIVI_F32)
        v[i] = __uint_as_float(w[i]);
      else
        v[i] = kv_word_elem<DT>(w[i / 2], i & 1);
    }
  } else {
#pragma unroll
    for (int i = 0; i < N; i++) v[i] = kv_ld<DT>(x, e + i);
  }
}

/** Launch dispatch over the runtime dtype (f(std::integral_constant)). */
#define KV_DISPATCH_DT(dt, F)          \
  switch (dt) {                        \
    case KIVI_F32: F(KIVI_F32); break; \
    case KIVI_F16: F(KIVI_F16); break; \
    default: F(KIVI_BF16); break;      \
  }

/** F(G, BITS) for the six supported (group, bits) pairs. */
#define KV_DISPATCH_GB(group, bits, F)  \
  switch ((group)*8 + (bits)) {         \
    case 32 * 8 + 2: F(32, 2); break;   \
    case 32 * 8 + 4: F(32, 4); break;   \
    case 64 * 8 + 2: F(64, 2); break;   \
    case 64 * 8 + 4: F(64, 4); break;   \
    case 128 * 8 + 2: F(128, 2); break; \
    default: F(128, 4); break;          \
  }

/** F(G, BITS) with `DT` a constexpr of the runtime dtype in scope: one dispatch over all three. */
#define KV_DISPATCH_DT_GB(dt, group, bits, F) \
  switch (dt) {                               \
    case KIVI_F32: {                          \
      constexpr int DT = KIVI_F32;            \
      KV_DISPATCH_GB(group, bits, F) break;   \
    }                                         \
    case KIVI_F16: {                          \
      constexpr int DT = KIVI_F16;            \
      KV_DISPATCH_GB(group, bits, F) break;   \
    }                                         \
    default: {                                \
      constexpr int DT = KIVI_BF16;           \
      KV_DISPATCH_GB(group, bits, F) break;   \
    }                                         \
  }

/** Fitted fp32 centroids to the stored fp16 ones, sorted ascending by a stable sort (adjacent swaps
    of strictly greater pairs: the CPU build's insertion sort gives the same order). Shared by the
    standalone codebook fit and the cache's flush. */
template <int NC>
__device__ __forceinline__ void kv_centroids_f16_sorted(const float (&c)[NC], uint16_t (&h)[NC]) {
  float cf[NC];
#pragma unroll
  for (int k = 0; k < NC; k++) {
    h[k] = kivi_f32_to_f16(c[k]);
    cf[k] = kivi_f16_to_f32(h[k]);
  }
#pragma unroll
  for (int p = 0; p < NC - 1; p++) {
#pragma unroll
    for (int j = 0; j < NC - 1 - p; j++) {
      if (cf[j] > cf[j + 1]) {
        const float tf = cf[j];
        cf[j] = cf[j + 1];
        cf[j + 1] = tf;
        const uint16_t th = h[j];
        h[j] = h[j + 1];
        h[j + 1] = th;
      }
    }
  }
}

#endif /* KIVI_CUDA_COMMON_CUH */
