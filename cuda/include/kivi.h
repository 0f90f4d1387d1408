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
#define KIVI_ABI_VERSION 2

typedef int32_t kivi_status;
enum {
  KIVI_OK = 0,
  KIVI_ERR_ARG = -1,         /* a null pointer or an argument out of its documented range */
  KIVI_ERR_SHAPE = -2,       /* sizes that do not fit together (group does not divide the axis, ...) */
  KIVI_ERR_NONFINITE = -3,   /* NaN or Inf in the input data */
  KIVI_ERR_NOMEM = -4,       /* host or device allocation failed */
  KIVI_ERR_CUDA = -5,        /* a CUDA runtime error; the context stays usable */
  KIVI_ERR_CUDA_STICKY = -6, /* a sticky CUDA fault (illegal address, ...): the context is unusable */
  KIVI_ERR_NO_DEVICE = -7,   /* no CUDA device, or the device index does not exist */
  KIVI_ERR_STATE = -8,       /* an object used in a state that does not allow it */
  KIVI_ERR_UNSUPPORTED = -9, /* a valid request this build does not implement */
  KIVI_ERR_CAPACITY = -10    /* the page pool or the sequence slots are full */
};

typedef int32_t kivi_dtype;
enum { KIVI_F32 = 0, KIVI_F16 = 1, KIVI_BF16 = 2 };

typedef int32_t kivi_axis;
enum { KIVI_AXIS_TOKEN = 0, KIVI_AXIS_CHANNEL = 1 };

typedef int32_t kivi_fit;
enum {
  KIVI_FIT_FREE = 0,  /* every centroid moves (Lloyd-Max, MSE-optimal from the uniform grid) */
  KIVI_FIT_PINNED = 1 /* the outer two stay at the group's min and max; error never above uniform */
};

typedef int32_t kivi_assign;
enum {
  KIVI_ASSIGN_NEAREST = 0, /* code of the nearest centroid: the number of midpoints (c_i + c_(i+1)) / 2
                              that are <= x, so a value on a midpoint goes up and, of equal centroids,
                              the first is used */
  KIVI_ASSIGN_INTERVAL = 1 /* the seed's table: x < c1 -> 0, c_i <= x < c_(i+1) -> i (1 <= i <= n-3),
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
/** Waits for pending work, frees the context. NULL is a no-op. Destroy the caches created with it
    first: a cache keeps using its context (its error slot, its stream). */
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
                                           int64_t rows, int64_t cols, kivi_axis axis, int32_t group, int32_t bits,
                                           int32_t flags, uint32_t *codes /* data packed, see Matrices, out */,
                                           uint16_t *scale /* data fp16 [groups] out */,
                                           uint16_t *zero /* data fp16 [groups] out */);

/** Unpack and dequantize: out = fmaf(q, float(scale), float(zero)), written as out_dtype. */
KIVI_API kivi_status kivi_uniform_dequantize(kivi_ctx_t ctx, const uint32_t *codes /* data packed */,
                                             const uint16_t *scale /* data fp16 [groups] */,
                                             const uint16_t *zero /* data fp16 [groups] */, int64_t rows, int64_t cols,
                                             kivi_axis axis, int32_t group, int32_t bits,
                                             void *out /* data [rows][cols] out */, kivi_dtype out_dtype);

/** Fits 2^bits centroids per group by 1-D k-means (Lloyd-Max) in fp32: start from the uniform
    grid min + i * (max - min) / (n - 1); each iteration assigns every value to its nearest
    centroid, then moves each centroid c to the mean of its values, computed in fp32 as
    c + (sum of (x - c)) / count in group order (KIVI_FIT_PINNED: the inner ones only; an empty
    cluster keeps its centroid; the grid's top is exactly max); stops after max_iters (1..256) updates or when no
    assignment changed. Centroids are written as fp16, sorted ascending.
    iters [groups] (may be NULL): updates done. inertia [groups][max_iters + 1] (may be NULL): the
    fp32 sum of squared errors at the start and after each update (repeated after an early stop),
    never increasing. */
KIVI_API kivi_status kivi_codebook_fit(kivi_ctx_t ctx, const void *x /* data [rows][cols] */, kivi_dtype dtype,
                                       int64_t rows, int64_t cols, kivi_axis axis, int32_t group, int32_t bits,
                                       kivi_fit fit, int32_t max_iters, int32_t flags,
                                       uint16_t *centroids /* data fp16 [groups][2^bits] out */,
                                       int32_t *iters /* data [groups] out, or NULL */,
                                       float *inertia /* data [groups][max_iters + 1] out, or NULL */);

/** Codes for given centroids (fp16 [groups][2^bits], ascending; KIVI_ERR_ARG if a group's are not
    sorted or not finite) under `assign`, packed. */
KIVI_API kivi_status kivi_codebook_quantize(kivi_ctx_t ctx, const void *x /* data [rows][cols] */, kivi_dtype dtype,
                                            int64_t rows, int64_t cols, kivi_axis axis, int32_t group, int32_t bits,
                                            const uint16_t *centroids /* data fp16 [groups][2^bits] */,
                                            kivi_assign assign, int32_t flags, uint32_t *codes /* data packed out */);

/** Fused fit + quantize + pack (one read of x): the centroids of kivi_codebook_fit, then the codes
    of kivi_codebook_quantize against those fp16 centroids. */
KIVI_API kivi_status kivi_codebook_encode(kivi_ctx_t ctx, const void *x /* data [rows][cols] */, kivi_dtype dtype,
                                          int64_t rows, int64_t cols, kivi_axis axis, int32_t group, int32_t bits,
                                          kivi_fit fit, int32_t max_iters, kivi_assign assign, int32_t flags,
                                          uint16_t *centroids /* data fp16 [groups][2^bits] out */,
                                          uint32_t *codes /* data packed out */);

/** Unpack and look up: out = float(centroids[g][q]) as out_dtype. */
KIVI_API kivi_status kivi_codebook_dequantize(kivi_ctx_t ctx, const uint32_t *codes /* data packed */,
                                              const uint16_t *centroids /* data fp16 [groups][2^bits] */, int64_t rows,
                                              int64_t cols, kivi_axis axis, int32_t group, int32_t bits,
                                              void *out /* data [rows][cols] out */, kivi_dtype out_dtype);

/** Packs n codes (one per byte, each < 2^bits, else KIVI_ERR_ARG and nothing written) into
    n / cpw words, LSB first. n % cpw == 0 (KIVI_ERR_SHAPE otherwise). */
KIVI_API kivi_status kivi_codes_pack(kivi_ctx_t ctx, const uint8_t *codes /* data [n] */, int64_t n, int32_t bits,
                                     uint32_t *words /* data [n / cpw] out */);

/** Unpacks n / cpw words into n codes, one per byte. n % cpw == 0. */
KIVI_API kivi_status kivi_codes_unpack(kivi_ctx_t ctx, const uint32_t *words /* data [n / cpw] */, int64_t n,
                                       int32_t bits, uint8_t *codes /* data [n] out */);

/* ---------------------------------------------------------------- paged KV cache --------- */
/*
 * A cache holds `layers` x (keys, values) for up to `max_seqs` sequences in a pool of `max_pages`
 * pages of `page_tokens` tokens, shared by all layers through one block table per sequence (each
 * layer has its own storage for every page, so a page id is valid in every layer). Each sequence and
 * layer keeps its newest tokens in fp16 in a residual window: when the window would hold
 * residual + F tokens (F = the key group size), its oldest F tokens are quantized into pages, keys
 * and values together; a prefill quantizes all but the last residual..residual+F-1 tokens at once.
 * bits 16 stores fp16 in the pages (the unquantized baseline of the same cache and kernels).
 *
 * The page layout is in kivi_format.h (kivi_page_layout). K and V input rows are
 * [tokens][kv_heads][head_dim]; queries and outputs [batch][q_heads][head_dim], query head h reading
 * KV head h / (q_heads / kv_heads).
 */

/** Fields of the int32 config array given to kivi_cache_create, in this order. */
enum {
  KIVI_CFG_LAYERS = 0,  /* >= 1 */
  KIVI_CFG_KV_HEADS,    /* >= 1 */
  KIVI_CFG_Q_HEADS,     /* a multiple of kv_heads, q_heads / kv_heads <= 32 */
  KIVI_CFG_HEAD_DIM,    /* 64, 128 or 256 */
  KIVI_CFG_PAGE_TOKENS, /* 32, 64, 128 or 256, a multiple of the key group */
  KIVI_CFG_RESIDUAL,    /* R >= 0, a multiple of the key group */
  KIVI_CFG_MAX_PAGES,   /* pool size in pages, >= 1 */
  KIVI_CFG_MAX_SEQS,    /* sequence slots, >= 1 */
  KIVI_CFG_K_KIND,      /* KIVI_KIND_UNIFORM or KIVI_KIND_CODEBOOK (ignored at 16 bits) */
  KIVI_CFG_K_BITS,      /* 2, 4 or 16 */
  KIVI_CFG_K_GROUP,     /* 32, 64 or 128: tokens per key group, and the flush unit F */
  KIVI_CFG_K_FIT,       /* kivi_fit for codebook keys */
  KIVI_CFG_K_ITERS,     /* k-means iteration cap for codebook keys, 1..256 */
  KIVI_CFG_V_KIND,      /* as for keys */
  KIVI_CFG_V_BITS,      /* 2, 4 or 16 */
  KIVI_CFG_V_GROUP,     /* 32, 64 or 128 channels per value group, dividing head_dim */
  KIVI_CFG_V_FIT,
  KIVI_CFG_V_ITERS,
  KIVI_CFG_FIELDS /* number of fields */
};

/** Per-layer formats: a config of KIVI_CFG_FIELDS + layers * KIVI_LAYER_FIELDS fields gives each layer
    its own key and value format after the cache's fields, layer 0 first, each layer's fields in the
    order of KIVI_CFG_K_KIND .. KIVI_CFG_V_ITERS (the rules of those fields, and a key group equal to
    KIVI_CFG_K_GROUP: the flush unit is one for all layers); the cache's own format fields are then
    checked but not used. A layer's pages and its attention then use its format. */
enum { KIVI_LAYER_FIELDS = 10 };

typedef int32_t kivi_kind;
enum { KIVI_KIND_UNIFORM = 0, KIVI_KIND_CODEBOOK = 1 };

/** Fields of the uint64 report written by kivi_cache_memory, in this order. */
enum {
  KIVI_MEM_CODE_BYTES = 0, /* packed codes (or fp16 at 16 bits) of the pages in use, all layers */
  KIVI_MEM_PARAM_BYTES,    /* scale/zero or centroids of the pages in use */
  KIVI_MEM_RESIDUAL_BYTES, /* fp16 residual tokens currently held */
  KIVI_MEM_TABLE_BYTES,    /* block tables and per-sequence state */
  KIVI_MEM_POOL_BYTES,     /* bytes allocated for the whole pool and residual windows */
  KIVI_MEM_PAGES_USED,
  KIVI_MEM_PAGES_TOTAL,
  KIVI_MEM_TOKENS,           /* sum over live sequences and layers of their lengths */
  KIVI_MEM_QUANTIZED_TOKENS, /* of which in pages */
  KIVI_MEM_FIELDS
};

typedef struct kivi_cache *kivi_cache_t;

/** Creates a cache: validates the config (KIVI_ERR_ARG naming the field), allocates the pool and
    the residual windows once (KIVI_ERR_NOMEM if they do not fit). n_fields is KIVI_CFG_FIELDS, or
    KIVI_CFG_FIELDS + layers * KIVI_LAYER_FIELDS for per-layer formats. */
KIVI_API kivi_status kivi_cache_create(kivi_ctx_t ctx, const int32_t *config /* host [n_fields] */, int32_t n_fields,
                                       kivi_cache_t *out /* host [1] out */);
/** Frees the cache and everything it allocated. NULL is a no-op. */
KIVI_API kivi_status kivi_cache_destroy(kivi_cache_t cache);
/** Claims a free sequence slot (KIVI_ERR_CAPACITY when all are taken); its length is 0. */
KIVI_API kivi_status kivi_cache_seq_create(kivi_cache_t cache, int32_t *seq /* host [1] out */);
/** Frees a sequence and returns its pages to the pool (KIVI_ERR_STATE if it is not live). */
KIVI_API kivi_status kivi_cache_seq_free(kivi_cache_t cache, int32_t seq);
/** Claims a free slot and makes it a deep copy of `src` into *dst: every page of src copied into
    fresh pages of the pool, its fp16 residual windows and lengths copied, so that the copy attends
    exactly as src does and the two diverge only by what is appended afterwards. KIVI_ERR_STATE if src
    is not live; KIVI_ERR_CAPACITY when no slot is free or the pool holds fewer free pages than src
    holds (nothing changed). Ordered on the context's stream like an append. */
KIVI_API kivi_status kivi_cache_seq_copy(kivi_cache_t cache, int32_t src, int32_t *dst /* host [1] out */);
/** Tokens held by `seq` in `layer` (pages plus residual), and how many of them are in pages. */
KIVI_API kivi_status kivi_cache_seq_length(kivi_cache_t cache, int32_t seq, int32_t layer,
                                           int64_t *length /* host [1] out */, int64_t *quantized /* host [1] out */);
/** The block table of `seq`: up to `cap` page ids in order, and their number. */
KIVI_API kivi_status kivi_cache_seq_pages(kivi_cache_t cache, int32_t seq, int32_t *pages /* host [cap] out */,
                                          int32_t cap, int32_t *count /* host [1] out */);
/** Appends n_tokens >= 1 tokens of keys and values to `seq` in `layer`, or in every layer when
    layer == -1 (then k and v are [layers][n_tokens][kv_heads][head_dim]). All or nothing: a NaN or
    Inf (unless KIVI_FLAG_TRUSTED), a full pool (KIVI_ERR_CAPACITY) or a bad argument leaves every
    sequence exactly as it was. */
KIVI_API kivi_status kivi_cache_append(kivi_cache_t cache, int32_t seq, int32_t layer,
                                       const void *k /* data [n_tokens][kv_heads][head_dim] */,
                                       const void *v /* data [n_tokens][kv_heads][head_dim] */, kivi_dtype dtype,
                                       int32_t n_tokens, int32_t flags);
/** Decode attention of one layer for a batch of sequences (each with >= 1 token in the layer):
    out[b][h] = softmax(scale * q[b][h] . K_s^T) V_s over the sequence's dequantized pages and fp16
    residual; fp32 math with an online softmax in the CUDA build, double in the CPU reference (the
    oracle). seqs may repeat. A non-finite q gives KIVI_ERR_NONFINITE (unless
    KIVI_FLAG_TRUSTED) and nothing is written. */
KIVI_API kivi_status kivi_cache_attend(kivi_cache_t cache, int32_t layer, const int32_t *seqs /* host [batch] */,
                                       int32_t batch, const void *q /* data [batch][q_heads][head_dim] */,
                                       kivi_dtype q_dtype, float scale, int32_t flags,
                                       void *out /* data [batch][q_heads][head_dim] out */, kivi_dtype out_dtype);
/** The dequantized keys and values of `seq` in `layer`, as the attention kernel sees them
    ([length][kv_heads][head_dim], pages first, then the residual), for tests and inspection. */
KIVI_API kivi_status kivi_cache_read(kivi_cache_t cache, int32_t seq, int32_t layer,
                                     void *k /* data [length][kv_heads][head_dim] out */,
                                     void *v /* data [length][kv_heads][head_dim] out */, kivi_dtype dtype);
/** Benchmark of kivi_cache_attend: one warm-up call, then `iters` calls back to back (trusted q),
    timed on the stream (CUDA events; CPU: wall clock); *ms = milliseconds per call. */
KIVI_API kivi_status kivi_cache_bench_attend(kivi_cache_t cache, int32_t layer, const int32_t *seqs /* host [batch] */,
                                             int32_t batch, const void *q /* data [batch][q_heads][head_dim] */,
                                             kivi_dtype q_dtype, float scale,
                                             void *out /* data [batch][q_heads][head_dim] out */, kivi_dtype out_dtype,
                                             int32_t iters, float *ms /* host [1] out */);
/** Memory report (see KIVI_MEM_*). */
KIVI_API kivi_status kivi_cache_memory(kivi_cache_t cache, uint64_t *report /* host [n_fields] out */,
                                       int32_t n_fields);

/* ---------------------------------------------------------------- sequences: rollback, forks, several tokens */
/*
 * Speculative decoding and shared prompts (cuda/include/kivi_seq.h holds the rules both builds share).
 * A page of a sequence is full once every layer's quantized length has passed it: nothing writes it
 * again (a flush writes at the quantized length, a truncate never goes below it). kivi_cache_seq_fork
 * shares a sequence's full pages with the new one, reference counted, and copies the rest (the partly
 * filled last page of every layer, the residual windows); a page goes back to the pool when its last
 * owner frees it, and kivi_cache_memory counts a shared page once.
 *
 * Log-sum-exp: the natural log, lse = m + ln(sum_j exp(s_j - m)) with s_j = scale q . k_j, per
 * (token, query head), float [tokens][q_heads]; an empty range (none in this API) would be -inf.
 */

/** Drops the newest tokens of `seq` in every layer: each layer keeps its first `length` tokens. Only
    tokens still in the fp16 residual window can go: KIVI_ERR_ARG when length < 0, above a layer's
    length, or below a layer's quantized length (its tokens in pages), and nothing changes. Pages the
    block table no longer needs go back to the pool. */
KIVI_API kivi_status kivi_cache_seq_truncate(kivi_cache_t cache, int32_t seq, int64_t length);
/** A new sequence holding what `seq` holds in every layer, sharing its full pages (see above) and
    with copies of the rest: it costs one page or none plus the windows. KIVI_ERR_STATE for a `seq` that
    is not live, KIVI_ERR_CAPACITY when no slot or not enough free pages are left (nothing changes). */
KIVI_API kivi_status kivi_cache_seq_fork(kivi_cache_t cache, int32_t seq, int32_t *child /* host [1] out */);
/** Attention of several query tokens a sequence in one layer, causal: sequence b (seqs[b], repeats
    allowed) has qlens[b] >= 1 queries, its newest qlens[b] tokens (already appended, so qlens[b] is at
    most its length len_b), and query i (0-based) sees tokens [0, len_b - qlens[b] + i] as the cache
    holds them (pages dequantized, the window in fp16). q and out are [tokens][q_heads][head_dim] with
    the queries of seqs[0] first; tokens must equal the sum of qlens (KIVI_ERR_SHAPE). lse (may be NULL):
    the natural log-sum-exp of each query and head, float data [tokens][q_heads]. Math and checks as
    kivi_cache_attend (qlens all 1 gives its result). The CUDA build takes every query in one tensor-core
    launch (rows = query x head) where the layer is in the tensor-core layout, else runs the decode
    kernels once a token position. */
KIVI_API kivi_status kivi_cache_attend_multi(kivi_cache_t cache, int32_t layer, const int32_t *seqs /* host [batch] */,
                                             const int32_t *qlens /* host [batch] */, int32_t batch, int64_t tokens,
                                             const void *q /* data [tokens][q_heads][head_dim] */, kivi_dtype q_dtype,
                                             float scale, int32_t flags,
                                             void *out /* data [tokens][q_heads][head_dim] out */, kivi_dtype out_dtype,
                                             float *lse /* data [tokens][q_heads] out, or NULL */);
/** Merges attention results over disjoint key ranges (cascade attention): part p holds out_p [rows][head_dim]
    and its natural log-sum-exp lse_p [rows]; out = sum_p exp(lse_p - lse) out_p with lse = ln(sum_p exp(lse_p)),
    exactly the attention over the union. A part with lse -inf counts as empty (all empty: out 0, lse -inf).
    out may be outs (part 0); lse_out may be NULL. f32 math (double in the CPU build). */
KIVI_API kivi_status kivi_attention_merge(kivi_ctx_t ctx, int32_t parts, int64_t rows, int32_t head_dim,
                                          const float *outs /* data [parts][rows][head_dim] */,
                                          const float *lses /* data [parts][rows] */,
                                          float *out /* data [rows][head_dim] out */,
                                          float *lse_out /* data [rows] out, or NULL */);

/* ---------------------------------------------------------------- decode batches --------- */
/*
 * A decode batch: distinct live sequences of one cache and the buffers of one decode step, checked
 * once when the batch is made, so that each layer of each step is one call taking only the layer:
 *   q   data [batch][q_heads][head_dim] (q_dtype), read by kivi_batch_attend,
 *   out data [batch][q_heads][head_dim] (out_dtype), written by kivi_batch_attend,
 *   k,v data [batch][kv_heads][head_dim] (kv_dtype): one token per sequence, read by kivi_batch_append.
 * q and out (and k and v) are given together or both NULL; out must not overlap q, k or v. The
 * buffers and the cache must outlive the batch (destroy it first); the caller may rewrite q, k and
 * v between calls (stream-ordered in the CUDA build). A sequence freed after the batch was made (its
 * slot reused or not) makes every later call fail with KIVI_ERR_STATE. At most
 * KIVI_BATCH_MAX sequences.
 *
 * Neither call allocates or waits for the device: kivi_batch_attend is the attention launch (plus, when
 * checked, one small kernel), kivi_batch_append one window launch for the whole batch (plus the
 * flush of each sequence whose window is full).
 *
 * Checks. With KIVI_FLAG_TRUSTED at creation nothing is scanned. Otherwise q (attend) and k, v
 * (append: NaN, Inf, or a finite f32 / bf16 value that fp16 turns into Inf) are checked in the
 * stream, without a host round trip, and a bad value is reported later ("deferred"):
 *   - attend: that call's out, and every out the batch writes after it until the error is read, is
 *     filled with NaN (the cache is unchanged);
 *   - append: the token is stored as given; its sequence holds a non-finite value from then on and
 *     should be freed (kivi_batch_status says which), and the batch's later outs are NaN as above;
 *   - once the error is visible to the host (the CPU build: at once; CUDA: once the device has run
 *     the check), kivi_batch_attend and kivi_batch_append fail with KIVI_ERR_NONFINITE, doing
 *     nothing, until kivi_batch_status reads the error (and clears it).
 */
#define KIVI_BATCH_MAX 512

typedef struct kivi_batch *kivi_batch_t;

/** Fields of the int64 report written by kivi_batch_status, in this order. */
enum {
  KIVI_REPORT_OP = 0,  /* 0: no error; 1: kivi_batch_attend (q); 2: kivi_batch_append (k or v); -1: an error
                          whose details were overwritten (the fields below are -1) */
  KIVI_REPORT_LAYER,   /* the layer of the call that met it */
  KIVI_REPORT_INDEX,   /* the batch index of the first bad row */
  KIVI_REPORT_PART,    /* 0: q (attend) or k (append); 1: v */
  KIVI_REPORT_ELEMENT, /* the element within that row ([q_heads][head_dim] or [kv_heads][head_dim]) */
  KIVI_REPORT_KIND,    /* 0: NaN, 1: +Inf, 2: -Inf, 3: a finite value beyond fp16's range */
  KIVI_REPORT_FIELDS
};

/** Makes a batch (KIVI_ERR_ARG naming a bad argument, KIVI_ERR_STATE for a sequence that is not live,
    KIVI_ERR_NOMEM). flags: 0 (deferred checks) or KIVI_FLAG_TRUSTED. */
KIVI_API kivi_status kivi_batch_create(kivi_cache_t cache, const int32_t *seqs /* host [batch] */, int32_t batch,
                                       const void *q /* data [batch][q_heads][head_dim] or NULL */, kivi_dtype q_dtype,
                                       void *out /* data [batch][q_heads][head_dim] or NULL */, kivi_dtype out_dtype,
                                       float scale, const void *k /* data [batch][kv_heads][head_dim] or NULL */,
                                       const void *v /* data [batch][kv_heads][head_dim] or NULL */,
                                       kivi_dtype kv_dtype, int32_t flags, kivi_batch_t *out_batch /* host [1] out */);
/** Frees the batch (its pending error, if any, is dropped). NULL is a no-op. */
KIVI_API kivi_status kivi_batch_destroy(kivi_batch_t batch);
/** From now on every kivi_batch_attend of the batch also writes the natural log-sum-exp of each (sequence,
    query head) into lse (data float [batch][q_heads]; NULL: no longer), as kivi_cache_attend_multi does.
    KIVI_ERR_STATE for a batch made without q and out. Where a deferred check fills out with NaN, lse is
    unspecified. */
KIVI_API kivi_status kivi_batch_set_lse(kivi_batch_t batch, float *lse /* data [batch][q_heads] or NULL */);
/** Decode attention of `layer` for the batch, as kivi_cache_attend(cache, layer, seqs, batch, q, q_dtype,
    scale, flags, out, out_dtype) with the q check deferred (see above). KIVI_ERR_STATE for a batch made
    without q and out, or a sequence freed since or holding no token in the layer. */
KIVI_API kivi_status kivi_batch_attend(kivi_batch_t batch, int32_t layer);
/** Appends one token (k[b], v[b]) to each sequence b of the batch in `layer`, with the k / v check
    deferred (see above). All or nothing for everything the host can see: a full pool
    (KIVI_ERR_CAPACITY, counting the pages of every sequence), a freed sequence or a pending error
    leaves every sequence as it was. KIVI_ERR_STATE for a batch made without k and v. */
KIVI_API kivi_status kivi_batch_append(kivi_batch_t batch, int32_t layer);
/** Reads the batch's deferred error, after waiting for the stream when `wait` is non-zero: writes
    report [n] (KIVI_REPORT_*; op 0 when there is none) and, when bad is not NULL, bad[b] = 1 for each
    sequence b that took a non-finite token since the last read (0 for the others), then clears it and
    returns KIVI_ERR_NONFINITE with a message naming the call, or KIVI_OK when there was none. */
KIVI_API kivi_status kivi_batch_status(kivi_batch_t batch, int32_t wait, int64_t *report /* host [n] out */, int32_t n,
                                       uint8_t *bad /* host [batch] out, or NULL */);

/* ---------------------------------------------------------------- model ops -------------- */
/*
 * The building blocks of a Llama-family forward pass (src/model/llama.ts). Activations are f32 data
 * [rows][n] ("data" memory as above); weights are fp16 data [n][k], a Hugging Face Linear's layout.
 * Every op is ordered on the context's stream (asynchronous in the CUDA build) and computes in f32.
 * Pointers and sizes are checked (KIVI_ERR_ARG naming the argument); the data is not: a token id or
 * a position out of range gives a row of NaN, and nothing is read out of bounds. Sizes are limited
 * to KIVI_MODEL_MAX_DIM per axis (rows to KIVI_MODEL_MAX_ROWS, attention to KIVI_MODEL_MAX_TOKENS).
 */
#define KIVI_MODEL_MAX_DIM 65536
#define KIVI_MODEL_MAX_ROWS 1048576
#define KIVI_MODEL_MAX_TOKENS 8192

/** out[r] = table[tokens[r]] widened to f32. */
KIVI_API kivi_status kivi_model_embed(kivi_ctx_t ctx, const int32_t *tokens /* data [rows] */, int32_t rows,
                                      const uint16_t *table /* data fp16 [vocab][dim] */, int32_t vocab, int32_t dim,
                                      float *out /* data [rows][dim] */);
/** RMSNorm of each row: out = x / sqrt(mean(x^2) + eps) * w. out may be x. */
KIVI_API kivi_status kivi_model_rmsnorm(kivi_ctx_t ctx, const float *x /* data [rows][dim] */,
                                        const uint16_t *w /* data fp16 [dim] */, int32_t rows, int32_t dim, float eps,
                                        float *out /* data [rows][dim] */);
/** y = x W^T, or y += x W^T when accumulate is 1: f32 products and sums over the fp16 weights widened
    to f32 (the CUDA build runs cuBLAS SGEMM, loaded at run time from libcublas.so.13: without it,
    KIVI_ERR_UNSUPPORTED saying so). y must not overlap x. n may reach KIVI_MODEL_MAX_ROWS (a vocabulary). */
KIVI_API kivi_status kivi_model_linear(kivi_ctx_t ctx, const float *x /* data [rows][k] */,
                                       const uint16_t *w /* data fp16 [n][k] */, int32_t rows, int32_t n, int32_t k,
                                       int32_t accumulate, float *y /* data [rows][n] */);
/** y = x16 W^T, or y += x16 W^T when accumulate is 1, where x16 is x rounded to fp16 (round to
    nearest even): fp16 products with f32 sums (the CUDA build runs cublasGemmEx on the tensor cores,
    A and B fp16, C f32, compute 32F; the CPU build rounds x the same way and sums in f32), reading the
    weights once at their fp16 size. Otherwise as kivi_model_linear. */
KIVI_API kivi_status kivi_model_linear_f16(kivi_ctx_t ctx, const float *x /* data [rows][k] */,
                                           const uint16_t *w /* data fp16 [n][k] */, int32_t rows, int32_t n, int32_t k,
                                           int32_t accumulate, float *y /* data [rows][n] */);
/** out[i] = fp16(mean + std z_i) for i < n, where z_i is a standard-normal-like draw that depends only
    on (seed, i): the centred sum of eight 16-bit uniforms of a splitmix64 hash of (seed, i), scaled to
    unit variance (bounded at about 4.9 sigma). Integer math and one fmaf, so both builds write the
    same bits. For seeded test and benchmark data made on the device; mean and std finite, std >= 0. */
KIVI_API kivi_status kivi_model_fill_normal(kivi_ctx_t ctx, uint16_t *out /* data fp16 [n] */, int64_t n, uint64_t seed,
                                            float mean, float std);
/** Rotary position embedding in the rotate-half convention, in place: for row r, head h and
    i < dim / 2, with c = cs[pos[r]][i] and s = cs[pos[r]][dim / 2 + i], the pair (x[i], x[i + dim / 2])
    becomes (x[i] c - x[i + dim / 2] s, x[i + dim / 2] c + x[i] s). dim even. */
KIVI_API kivi_status kivi_model_rope(kivi_ctx_t ctx, float *x /* data [rows][heads][dim] */, int32_t rows,
                                     int32_t heads, int32_t dim, const int32_t *pos /* data [rows] */,
                                     const float *cs /* data [max_pos][dim]: cos, then sin */, int32_t max_pos);
/** SwiGLU: out = silu(gate) * up = gate / (1 + exp(-gate)) * up, element-wise. out may be gate or up. */
KIVI_API kivi_status kivi_model_swiglu(kivi_ctx_t ctx, const float *gate /* data [n] */, const float *up /* data [n] */,
                                       int32_t n, float *out /* data [n] */);
/** Exact causal attention in f32 over each of `batch` sequences of `tokens` tokens: query head h reads
    KV head h / (q_heads / kv_heads); out[b][t][h] = sum over j <= t of softmax_j(q[b][t][h] .
    k[b][j][kv] * scale) v[b][j][kv]. q_heads a multiple of kv_heads; out must not overlap the inputs. */
KIVI_API kivi_status kivi_model_attention(kivi_ctx_t ctx, const float *q /* data [batch][tokens][q_heads][head_dim] */,
                                          const float *k /* data [batch][tokens][kv_heads][head_dim] */,
                                          const float *v /* data [batch][tokens][kv_heads][head_dim] */, int32_t batch,
                                          int32_t tokens, int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                                          float scale, float *out /* data [batch][tokens][q_heads][head_dim] */);
/** x = log_softmax(x) of each row, in place (max subtracted, f32). */
KIVI_API kivi_status kivi_model_log_softmax(kivi_ctx_t ctx, float *x /* data [rows][n] */, int32_t rows, int32_t n);

/* ---------------------------------------------------------------- testing (not for use) -- */

/** TEST ONLY, never call it outside tests: provokes a sticky CUDA fault on the context (a kernel
    writing to an illegal address) so that tests can check what follows. Returns
    KIVI_ERR_CUDA_STICKY once the fault is seen; from then on every call on the context, and on the
    caches created with it, returns KIVI_ERR_CUDA_STICKY naming the fault, and CUDA is unusable in
    the whole process (a new process works normally). The CPU build has no device to fault: it
    returns KIVI_ERR_NO_DEVICE with a message and changes nothing. */
KIVI_API kivi_status kivi_debug_fault(kivi_ctx_t ctx);

#ifdef __cplusplus
}
#endif
#endif /* KIVI_H */
