/*
 * kivi.h — the public C ABI of kivi: 2-bit / 4-bit KV-cache quantization.
 *
 * One header for both builds: build/libkivi_cpu.so (plain C11, host memory) and
 * build/libkivi_cuda.so (CUDA, device memory). Both export exactly the symbols below
 * with the same semantics; every pointer argument named "data" below is host memory
 * in the CPU build and device memory (from kivi_mem_alloc) in the CUDA build.
 * Pointers named "host" are always host memory.
 *
 * Conventions
 *  - Every export returns kivi_status (0 ok, negative error) unless it returns a plain value.
 *    Nothing aborts, nothing throws across the boundary. On error, kivi_last_error() (thread
 *    local) and kivi_ctx_last_error(ctx) hold a message naming the op, the argument and the
 *    expected value, or CUDA's error text.
 *  - A failed call changes no output buffer (inputs are validated before anything is written).
 *  - Work on a context is ordered on that context's stream. In the CUDA build the quantizer
 *    ops are asynchronous: they return once the work is enqueued; kivi_mem_download and
 *    kivi_ctx_synchronize wait for it. In the CPU build every op completes before returning.
 *
 * Matrices
 *  - An input matrix x is [rows][cols] row-major of kivi_dtype elements: rows are tokens,
 *    cols are channels (for a KV head block, rows = tokens, cols = head_dim, or heads*head_dim
 *    as long as `group` divides head_dim).
 *  - KIVI_AXIS_TOKEN (keys): a group is `group` consecutive rows of one column (per-channel).
 *      rows % group == 0. groups = cols * (rows / group); group g = c * (rows / group) + r / group.
 *      packed codes: uint32 [cols][rows / cpw]   (packed along tokens)
 *  - KIVI_AXIS_CHANNEL (values): a group is `group` consecutive columns of one row (per-token).
 *      cols % group == 0. groups = rows * (cols / group); group g = r * (cols / group) + c / group.
 *      packed codes: uint32 [rows][cols / cpw]   (packed along channels)
 *    cpw (codes per word) = 32 / bits: 16 at 2 bits, 8 at 4 bits. Code j of a word sits at bit
 *    bits*j (LSB first), KIVI's layout.
 *  - Per-group parameters are indexed by g: uniform scale/zero fp16 [groups], codebook
 *    centroids fp16 [groups][2^bits] sorted ascending, statistics float [groups][4].
 *  - fp16 values cross the ABI as uint16_t bit patterns (IEEE binary16), bf16 likewise.
 */
#ifndef KIVI_H
#define KIVI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define KIVI_API __declspec(dllexport)
#else
#define KIVI_API __attribute__((visibility("default")))
#endif

/** Bumped whenever an export's signature or a format changes; checked by the TS loader. */
#define KIVI_ABI_VERSION 1

typedef int32_t kivi_status;
enum {
  KIVI_OK = 0,
  KIVI_ERR_ARG = -1,          /* a null pointer or an argument out of its documented range */
  KIVI_ERR_SHAPE = -2,        /* sizes that do not fit together (group does not divide the axis, ...) */
  KIVI_ERR_NONFINITE = -3,    /* NaN or Inf in the input data */
  KIVI_ERR_NOMEM = -4,        /* host or device allocation failed */
  KIVI_ERR_CUDA = -5,         /* a CUDA runtime error; the context stays usable */
  KIVI_ERR_CUDA_STICKY = -6,  /* a sticky CUDA fault (illegal address, ...): the context is unusable */
  KIVI_ERR_NO_DEVICE = -7,    /* no CUDA device, or the device index does not exist */
  KIVI_ERR_STATE = -8,        /* an object used in a state that does not allow it */
  KIVI_ERR_UNSUPPORTED = -9   /* a valid request this build does not implement */
};

typedef int32_t kivi_dtype;
enum { KIVI_F32 = 0, KIVI_F16 = 1, KIVI_BF16 = 2 };

typedef int32_t kivi_axis;
enum { KIVI_AXIS_TOKEN = 0, KIVI_AXIS_CHANNEL = 1 };

typedef int32_t kivi_fit;
enum {
  KIVI_FIT_FREE = 0,   /* every centroid moves (Lloyd-Max, MSE-optimal from the uniform grid) */
  KIVI_FIT_PINNED = 1  /* the outer two stay at the group's min and max; error never above uniform */
};

typedef int32_t kivi_assign;
enum {
  KIVI_ASSIGN_NEAREST = 0,  /* code of the nearest centroid; a tie goes to the upper one */
  KIVI_ASSIGN_INTERVAL = 1  /* the seed's table: x < c1 -> 0, c_i <= x < c_(i+1) -> i (1 <= i <= n-3),
                               c_(n-2) <= x <= c_(n-1) -> n-2, x > c_(n-1) -> n-1 */
};

/* Flags for quantizer ops. */
enum {
  KIVI_FLAG_NONE = 0,
  /* Skip the NaN/Inf scan of the input (the caller guarantees finite data). Without this flag a
     non-finite input gives KIVI_ERR_NONFINITE and nothing is written; with it the codes of a
     group holding a NaN or Inf are unspecified (but the call never faults). */
  KIVI_FLAG_TRUSTED = 1
};

/** Opaque context: one device (or the CPU), one stream, an error slot, a timer. */
typedef struct kivi_ctx *kivi_ctx_t;

/* ---------------------------------------------------------------- library ---------------- */

/** KIVI_ABI_VERSION of the loaded library. */
KIVI_API int32_t kivi_abi_version(void);
/** 0 for the CPU reference build, 1 for the CUDA build. */
KIVI_API int32_t kivi_backend_kind(void);
/** Static name of a status code ("KIVI_ERR_SHAPE"), "KIVI_ERR_UNKNOWN" for others. */
KIVI_API const char *kivi_status_str(kivi_status code);
/** Thread-local message of the last failed call on this thread ("" if none). */
KIVI_API const char *kivi_last_error(void);
/** Number of usable devices: 1 for the CPU build, cudaGetDeviceCount for CUDA (0 if no driver). */
KIVI_API kivi_status kivi_device_count(int32_t *count /* host [1] out */);

/* ---------------------------------------------------------------- context ---------------- */

/** Creates a context on `device` (0-based; the CPU build has device 0 only). */
KIVI_API kivi_status kivi_ctx_create(int32_t device, kivi_ctx_t *out /* host [1] out */);
/** Waits for pending work, frees the context. NULL is a no-op. */
KIVI_API kivi_status kivi_ctx_destroy(kivi_ctx_t ctx);
/** Message of the last failed call made with this context, from any thread ("" if none). */
KIVI_API const char *kivi_ctx_last_error(kivi_ctx_t ctx);
/** Device name into `name` (NUL-terminated, truncated to len - 1 bytes). */
KIVI_API kivi_status kivi_ctx_device_name(kivi_ctx_t ctx, char *name /* host [len] out */, int32_t len);
/** Blocks until all work enqueued on the context is done; returns the first deferred error. */
KIVI_API kivi_status kivi_ctx_synchronize(kivi_ctx_t ctx);
/** Non-blocking: *done = 1 when all enqueued work has finished, else 0. */
KIVI_API kivi_status kivi_ctx_query(kivi_ctx_t ctx, int32_t *done /* host [1] out */);

/* ---------------------------------------------------------------- memory ----------------- */

/** Allocates `bytes` (> 0) of data memory (device memory in the CUDA build, 256-byte aligned). */
KIVI_API kivi_status kivi_mem_alloc(kivi_ctx_t ctx, uint64_t bytes, void **out /* host [1] out */);
/** Frees memory from kivi_mem_alloc. NULL is a no-op. */
KIVI_API kivi_status kivi_mem_free(kivi_ctx_t ctx, void *data);
/** Copies `bytes` from host to data memory; the host buffer may be reused when it returns. */
KIVI_API kivi_status kivi_mem_upload(kivi_ctx_t ctx, void *dst_data, const void *src_host, uint64_t bytes);
/** Waits for the context's pending work, then copies `bytes` from data memory to host. */
KIVI_API kivi_status kivi_mem_download(kivi_ctx_t ctx, void *dst_host, const void *src_data, uint64_t bytes);
/** Copies `bytes` between two data buffers (ordered on the context's stream). */
KIVI_API kivi_status kivi_mem_copy(kivi_ctx_t ctx, void *dst_data, const void *src_data, uint64_t bytes);
/** Free and total bytes of the device (CPU build: physical memory). */
KIVI_API kivi_status kivi_mem_info(kivi_ctx_t ctx, uint64_t *free_bytes /* host [1] out */,
                                   uint64_t *total_bytes /* host [1] out */);

/* ---------------------------------------------------------------- timing ----------------- */

/** Marks the start of a timed region on the context's stream (CUDA event; CPU: wall clock). */
KIVI_API kivi_status kivi_timer_start(kivi_ctx_t ctx);
/** Marks the end, waits for it, and writes the elapsed milliseconds since kivi_timer_start. */
KIVI_API kivi_status kivi_timer_stop(kivi_ctx_t ctx, float *ms /* host [1] out */);
/** Measures copy bandwidth: `iters` copies of a `bytes` buffer (after one warm-up), timed on the
    stream; *gbps = 2 * bytes * iters / seconds / 1e9 (bytes read plus bytes written). */
KIVI_API kivi_status kivi_bench_copy(kivi_ctx_t ctx, uint64_t bytes, int32_t iters, double *gbps /* host [1] out */);

/* ---------------------------------------------------------------- quantizers ------------- */
/*
 * Shared argument rules: rows >= 1, cols >= 1, rows * cols < 2^40; group in {32, 64, 128};
 * bits in {2, 4}; the grouped axis a multiple of group (KIVI_ERR_SHAPE otherwise); dtype a
 * kivi_dtype (KIVI_ERR_ARG otherwise).
 */

/** Block statistics per group: stats [groups][4] = {min, max, mean, variance (population)} over
    the group's finite values (all four are 0 for a group with none), nonfinite [groups] = count
    of NaN and Inf values. Never fails on non-finite input: counting them is its job. */
KIVI_API kivi_status kivi_stats_block(kivi_ctx_t ctx, const void *x /* data [rows][cols] */, kivi_dtype dtype,
                                      int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                      float *stats /* data [groups][4] out */,
                                      int32_t *nonfinite /* data [groups] out */);

/** KIVI uniform quantize and pack in one pass: per group mn = min, mx = max,
    scale = half((mx - mn) / (2^bits - 1)), zero = half(mn), and (with s = float(scale),
    z = float(zero)) q = s > 0 ? clamp(rint((x - z) / s), 0, 2^bits - 1) : 0, all in fp32
    with IEEE division (kivi_format.h: kivi_uniform_code), so both builds give identical codes. */
KIVI_API kivi_status kivi_uniform_quantize(kivi_ctx_t ctx, const void *x /* data [rows][cols] */, kivi_dtype dtype,
                                           int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                           int32_t bits, int32_t flags,
                                           uint32_t *codes /* data packed, see Matrices, out */,
                                           uint16_t *scale /* data fp16 [groups] out */,
                                           uint16_t *zero /* data fp16 [groups] out */);

/** Unpack and dequantize: out = fmaf(q, float(scale), float(zero)), written as out_dtype. */
KIVI_API kivi_status kivi_uniform_dequantize(kivi_ctx_t ctx, const uint32_t *codes /* data packed */,
                                             const uint16_t *scale /* data fp16 [groups] */,
                                             const uint16_t *zero /* data fp16 [groups] */,
                                             int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                             int32_t bits, void *out /* data [rows][cols] out */,
                                             kivi_dtype out_dtype);

/** Fits 2^bits centroids per group by 1-D k-means (Lloyd-Max) in fp32: start from the uniform
    grid min + i * (max - min) / (n - 1); each iteration assigns every value to its nearest
    centroid, then moves each centroid to the mean of its values (KIVI_FIT_PINNED: the inner ones
    only; an empty cluster keeps its centroid); stops after max_iters (1..256) updates or when no
    assignment changed. Centroids are written as fp16, sorted ascending.
    iters [groups] (may be NULL): updates done. inertia [groups][max_iters + 1] (may be NULL): the
    fp32 sum of squared errors at the start and after each update (repeated after an early stop),
    never increasing. */
KIVI_API kivi_status kivi_codebook_fit(kivi_ctx_t ctx, const void *x /* data [rows][cols] */, kivi_dtype dtype,
                                       int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                       int32_t bits, kivi_fit fit, int32_t max_iters, int32_t flags,
                                       uint16_t *centroids /* data fp16 [groups][2^bits] out */,
                                       int32_t *iters /* data [groups] out, or NULL */,
                                       float *inertia /* data [groups][max_iters + 1] out, or NULL */);

/** Codes for given centroids (fp16 [groups][2^bits], ascending; KIVI_ERR_ARG if a group's are not
    sorted or not finite) under `assign`, packed. */
KIVI_API kivi_status kivi_codebook_quantize(kivi_ctx_t ctx, const void *x /* data [rows][cols] */, kivi_dtype dtype,
                                            int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                            int32_t bits, const uint16_t *centroids /* data fp16 [groups][2^bits] */,
                                            kivi_assign assign, int32_t flags,
                                            uint32_t *codes /* data packed out */);

/** Fused fit + quantize + pack (one read of x): the centroids of kivi_codebook_fit, then the codes
    of kivi_codebook_quantize against those fp16 centroids. */
KIVI_API kivi_status kivi_codebook_encode(kivi_ctx_t ctx, const void *x /* data [rows][cols] */, kivi_dtype dtype,
                                          int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                          int32_t bits, kivi_fit fit, int32_t max_iters, kivi_assign assign,
                                          int32_t flags,
                                          uint16_t *centroids /* data fp16 [groups][2^bits] out */,
                                          uint32_t *codes /* data packed out */);

/** Unpack and look up: out = float(centroids[g][q]) as out_dtype. */
KIVI_API kivi_status kivi_codebook_dequantize(kivi_ctx_t ctx, const uint32_t *codes /* data packed */,
                                              const uint16_t *centroids /* data fp16 [groups][2^bits] */,
                                              int64_t rows, int64_t cols, kivi_axis axis, int32_t group,
                                              int32_t bits, void *out /* data [rows][cols] out */,
                                              kivi_dtype out_dtype);

/** Packs n codes (one per byte, each < 2^bits, else KIVI_ERR_ARG and nothing written) into
    n / cpw words, LSB first. n % cpw == 0 (KIVI_ERR_SHAPE otherwise). */
KIVI_API kivi_status kivi_codes_pack(kivi_ctx_t ctx, const uint8_t *codes /* data [n] */, int64_t n,
                                     int32_t bits, uint32_t *words /* data [n / cpw] out */);

/** Unpacks n / cpw words into n codes, one per byte. n % cpw == 0. */
KIVI_API kivi_status kivi_codes_unpack(kivi_ctx_t ctx, const uint32_t *words /* data [n / cpw] */, int64_t n,
                                       int32_t bits, uint8_t *codes /* data [n] out */);

#ifdef __cplusplus
}
#endif
#endif /* KIVI_H */
