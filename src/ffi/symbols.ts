/**
 * The FFI symbol table of kivi.h, written once. Each runtime adapter (bun.ts, deno.ts) translates
 * these exact-width types into its own; nothing is widened to make it fit. A test parses kivi.h and
 * checks that every export is here with the same number of parameters.
 *
 * @module
 */

/** Exact-width FFI types used by the table. `ptr` is an address (host or device), `cstring` a
 * returned `const char *`. */
export type FfiType = "i32" | "i64" | "u64" | "f32" | "f64" | "ptr" | "cstring";

/** One export: its parameter types in order, its result, and whether a runtime that can run it off
 * the main thread (Deno `nonblocking`) should also expose an async variant. */
export interface SymbolSpec {
  readonly args: readonly FfiType[];
  readonly returns: FfiType;
  readonly blocking?: boolean;
}

// Runs of parameters several quantizer exports share, spread into their lists below.
/** A matrix x [rows][cols] of dtype, in groups of `group` along `axis`. */
const X_GROUPED = [
  "ptr", // const void *x            [rows][cols]
  "i32", // kivi_dtype dtype
  "i64", // int64_t rows
  "i64", // int64_t cols
  "i32", // kivi_axis axis
  "i32", // int32_t group
] as const;
/** X_GROUPED and the code width: what a quantizer takes after ctx. */
const X_CODED = [
  ...X_GROUPED,
  "i32", // int32_t bits
] as const;
/** What a dequantizer takes after its codes and params: their shape and where to write. */
const DEQUANTIZE_TO = [
  "i64", // int64_t rows
  "i64", // int64_t cols
  "i32", // kivi_axis axis
  "i32", // int32_t group
  "i32", // int32_t bits
  "ptr", // void *out                [rows][cols]
  "i32", // kivi_dtype out_dtype
] as const;

/** What attention takes first: the cache, the layer, the batch's sequences and its queries. */
const ATTEND_QUERY = [
  "ptr", // kivi_cache_t cache
  "i32", // int32_t layer
  "ptr", // const int32_t *seqs      host [batch]
  "i32", // int32_t batch
  "ptr", // const void *q            [batch][q_heads][head_dim]
  "i32", // kivi_dtype q_dtype
  "f32", // float scale
] as const;

/** The parameters of both linear exports (f32 and fp16 products): y = x W^T, or y += x W^T. */
const LINEAR = [
  "ptr", // kivi_ctx_t ctx
  "ptr", // const float *x           [rows][k]
  "ptr", // const uint16_t *w        fp16 [n][k]
  "i32", // int32_t rows
  "i32", // int32_t n
  "i32", // int32_t k
  "i32", // int32_t accumulate
  "ptr", // float *y                 [rows][n]
] as const;

export const symbols = {
  kivi_abi_version: { args: [], returns: "i32" },
  kivi_backend_kind: { args: [], returns: "i32" },
  kivi_status_str: { args: ["i32"], returns: "cstring" }, // kivi_status code
  kivi_last_error: { args: [], returns: "cstring" },
  kivi_device_count: { args: ["ptr"], returns: "i32" }, // int32_t *count
  kivi_ctx_create: {
    args: [
      "i32", // int32_t device
      "ptr", // kivi_ctx_t *out
    ],
    returns: "i32",
  },
  kivi_ctx_destroy: { args: ["ptr"], returns: "i32" }, // kivi_ctx_t ctx
  kivi_ctx_last_error: { args: ["ptr"], returns: "cstring" }, // kivi_ctx_t ctx
  kivi_ctx_device_name: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // char *name
      "i32", // int32_t len
    ],
    returns: "i32",
  },
  kivi_ctx_synchronize: { args: ["ptr"], returns: "i32", blocking: true }, // kivi_ctx_t ctx
  kivi_ctx_query: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // int32_t *done
    ],
    returns: "i32",
  },
  kivi_mem_alloc: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "u64", // uint64_t bytes
      "ptr", // void **out
    ],
    returns: "i32",
  },
  kivi_mem_free: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // void *data
    ],
    returns: "i32",
  },
  kivi_mem_upload: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // void *dst_data
      "ptr", // const void *src_host
      "u64", // uint64_t bytes
    ],
    returns: "i32",
  },
  kivi_mem_download: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // void *dst_host
      "ptr", // const void *src_data
      "u64", // uint64_t bytes
    ],
    returns: "i32",
    blocking: true,
  },
  kivi_mem_copy: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // void *dst_data
      "ptr", // const void *src_data
      "u64", // uint64_t bytes
    ],
    returns: "i32",
  },
  kivi_debug_fault: { args: ["ptr"], returns: "i32" }, // kivi_ctx_t ctx (test only: provokes a sticky CUDA fault)
  kivi_mem_info: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // uint64_t *free_bytes
      "ptr", // uint64_t *total_bytes
    ],
    returns: "i32",
  },
  kivi_timer_start: { args: ["ptr"], returns: "i32" }, // kivi_ctx_t ctx
  kivi_timer_stop: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // float *ms
    ],
    returns: "i32",
  },
  kivi_bench_copy: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "u64", // uint64_t bytes
      "i32", // int32_t iters
      "ptr", // double *gbps
    ],
    returns: "i32",
  },
  kivi_stats_block: {
    args: [
      "ptr", // kivi_ctx_t ctx
      ...X_GROUPED, // const void *x, kivi_dtype dtype, int64_t rows, int64_t cols, kivi_axis axis, int32_t group
      "ptr", // float *stats             [groups][4]
      "ptr", // int32_t *nonfinite       [groups]
    ],
    returns: "i32",
  },
  kivi_uniform_quantize: {
    args: [
      "ptr", // kivi_ctx_t ctx
      ...X_CODED, // const void *x, kivi_dtype dtype, int64_t rows, int64_t cols, kivi_axis axis, int32_t group, bits
      "i32", // int32_t flags
      "ptr", // uint32_t *codes          packed
      "ptr", // uint16_t *scale          fp16 [groups]
      "ptr", // uint16_t *zero           fp16 [groups]
    ],
    returns: "i32",
  },
  kivi_uniform_dequantize: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const uint32_t *codes    packed
      "ptr", // const uint16_t *scale    fp16 [groups]
      "ptr", // const uint16_t *zero     fp16 [groups]
      ...DEQUANTIZE_TO, // rows, cols, axis, group, bits, void *out [rows][cols], kivi_dtype out_dtype
    ],
    returns: "i32",
  },
  kivi_codebook_fit: {
    args: [
      "ptr", // kivi_ctx_t ctx
      ...X_CODED, // const void *x, kivi_dtype dtype, int64_t rows, int64_t cols, kivi_axis axis, int32_t group, bits
      "i32", // kivi_fit fit
      "i32", // int32_t max_iters
      "i32", // int32_t flags
      "ptr", // uint16_t *centroids      fp16 [groups][2^bits]
      "ptr", // int32_t *iters           [groups] or NULL
      "ptr", // float *inertia           [groups][max_iters + 1] or NULL
    ],
    returns: "i32",
  },
  kivi_codebook_quantize: {
    args: [
      "ptr", // kivi_ctx_t ctx
      ...X_CODED, // const void *x, kivi_dtype dtype, int64_t rows, int64_t cols, kivi_axis axis, int32_t group, bits
      "ptr", // const uint16_t *centroids fp16 [groups][2^bits]
      "i32", // kivi_assign assign
      "i32", // int32_t flags
      "ptr", // uint32_t *codes          packed
    ],
    returns: "i32",
  },
  kivi_codebook_encode: {
    args: [
      "ptr", // kivi_ctx_t ctx
      ...X_CODED, // const void *x, kivi_dtype dtype, int64_t rows, int64_t cols, kivi_axis axis, int32_t group, bits
      "i32", // kivi_fit fit
      "i32", // int32_t max_iters
      "i32", // kivi_assign assign
      "i32", // int32_t flags
      "ptr", // uint16_t *centroids      fp16 [groups][2^bits]
      "ptr", // uint32_t *codes          packed
    ],
    returns: "i32",
  },
  kivi_codebook_dequantize: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const uint32_t *codes    packed
      "ptr", // const uint16_t *centroids fp16 [groups][2^bits]
      ...DEQUANTIZE_TO, // rows, cols, axis, group, bits, void *out [rows][cols], kivi_dtype out_dtype
    ],
    returns: "i32",
  },
  kivi_codes_pack: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const uint8_t *codes     [n]
      "i64", // int64_t n
      "i32", // int32_t bits
      "ptr", // uint32_t *words          [n / cpw]
    ],
    returns: "i32",
  },
  kivi_codes_unpack: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const uint32_t *words    [n / cpw]
      "i64", // int64_t n
      "i32", // int32_t bits
      "ptr", // uint8_t *codes           [n]
    ],
    returns: "i32",
  },
  kivi_cache_create: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const int32_t *config    [n_fields]
      "i32", // int32_t n_fields
      "ptr", // kivi_cache_t *out
    ],
    returns: "i32",
  },
  kivi_cache_destroy: { args: ["ptr"], returns: "i32" }, // kivi_cache_t cache
  kivi_cache_seq_create: {
    args: [
      "ptr", // kivi_cache_t cache
      "ptr", // int32_t *seq
    ],
    returns: "i32",
  },
  kivi_cache_seq_free: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t seq
    ],
    returns: "i32",
  },
  kivi_cache_seq_copy: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t src
      "ptr", // int32_t *dst
    ],
    returns: "i32",
  },
  kivi_cache_seq_length: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t seq
      "i32", // int32_t layer
      "ptr", // int64_t *length
      "ptr", // int64_t *quantized
    ],
    returns: "i32",
  },
  kivi_cache_seq_pages: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t seq
      "ptr", // int32_t *pages           [cap]
      "i32", // int32_t cap
      "ptr", // int32_t *count
    ],
    returns: "i32",
  },
  kivi_cache_append: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t seq
      "i32", // int32_t layer            (-1: every layer)
      "ptr", // const void *k            [n_tokens][kv_heads][head_dim]
      "ptr", // const void *v            [n_tokens][kv_heads][head_dim]
      "i32", // kivi_dtype dtype
      "i32", // int32_t n_tokens
      "i32", // int32_t flags
    ],
    returns: "i32",
  },
  kivi_cache_attend: {
    args: [
      ...ATTEND_QUERY, // kivi_cache_t cache, int32_t layer, const int32_t *seqs, int32_t batch, q, q_dtype, scale
      "i32", // int32_t flags
      "ptr", // void *out                [batch][q_heads][head_dim]
      "i32", // kivi_dtype out_dtype
    ],
    returns: "i32",
  },
  kivi_cache_read: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t seq
      "i32", // int32_t layer
      "ptr", // void *k                  [length][kv_heads][head_dim]
      "ptr", // void *v                  [length][kv_heads][head_dim]
      "i32", // kivi_dtype dtype
    ],
    returns: "i32",
  },
  kivi_cache_bench_attend: {
    args: [
      ...ATTEND_QUERY, // kivi_cache_t cache, int32_t layer, const int32_t *seqs, int32_t batch, q, q_dtype, scale
      "ptr", // void *out                [batch][q_heads][head_dim]
      "i32", // kivi_dtype out_dtype
      "i32", // int32_t iters
      "ptr", // float *ms
    ],
    returns: "i32",
  },
  kivi_cache_memory: {
    args: [
      "ptr", // kivi_cache_t cache
      "ptr", // uint64_t *report         [n_fields]
      "i32", // int32_t n_fields
    ],
    returns: "i32",
  },
  kivi_batch_set_lse: {
    args: [
      "ptr", // kivi_batch_t batch
      "ptr", // float *lse               [batch][q_heads] or NULL
    ],
    returns: "i32",
  },
  kivi_cache_seq_truncate: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t seq
      "i64", // int64_t length
    ],
    returns: "i32",
  },
  kivi_cache_seq_fork: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t seq
      "ptr", // int32_t *child           host [1]
    ],
    returns: "i32",
  },
  kivi_cache_attend_multi: {
    args: [
      "ptr", // kivi_cache_t cache
      "i32", // int32_t layer
      "ptr", // const int32_t *seqs      host [batch]
      "ptr", // const int32_t *qlens     host [batch]
      "i32", // int32_t batch
      "i64", // int64_t tokens
      "ptr", // const void *q            [tokens][q_heads][head_dim]
      "i32", // kivi_dtype q_dtype
      "f32", // float scale
      "i32", // int32_t flags
      "ptr", // void *out                [tokens][q_heads][head_dim]
      "i32", // kivi_dtype out_dtype
      "ptr", // float *lse               [tokens][q_heads] or NULL
    ],
    returns: "i32",
  },
  kivi_attention_merge: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "i32", // int32_t parts
      "i64", // int64_t rows
      "i32", // int32_t head_dim
      "ptr", // const float *outs        [parts][rows][head_dim]
      "ptr", // const float *lses        [parts][rows]
      "ptr", // float *out               [rows][head_dim]
      "ptr", // float *lse_out           [rows] or NULL
    ],
    returns: "i32",
  },
  kivi_batch_create: {
    args: [
      "ptr", // kivi_cache_t cache
      "ptr", // const int32_t *seqs      host [batch]
      "i32", // int32_t batch
      "ptr", // const void *q            [batch][q_heads][head_dim] or NULL
      "i32", // kivi_dtype q_dtype
      "ptr", // void *out                [batch][q_heads][head_dim] or NULL
      "i32", // kivi_dtype out_dtype
      "f32", // float scale
      "ptr", // const void *k            [batch][kv_heads][head_dim] or NULL
      "ptr", // const void *v            [batch][kv_heads][head_dim] or NULL
      "i32", // kivi_dtype kv_dtype
      "i32", // int32_t flags
      "ptr", // kivi_batch_t *out_batch
    ],
    returns: "i32",
  },
  kivi_batch_destroy: { args: ["ptr"], returns: "i32" }, // kivi_batch_t batch
  kivi_batch_attend: {
    args: [
      "ptr", // kivi_batch_t batch
      "i32", // int32_t layer
    ],
    returns: "i32",
  },
  kivi_batch_append: {
    args: [
      "ptr", // kivi_batch_t batch
      "i32", // int32_t layer
    ],
    returns: "i32",
  },
  kivi_batch_status: {
    args: [
      "ptr", // kivi_batch_t batch
      "i32", // int32_t wait
      "ptr", // int64_t *report          host [n]
      "i32", // int32_t n
      "ptr", // uint8_t *bad             host [batch] or NULL
    ],
    returns: "i32",
  },
  kivi_model_embed: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const int32_t *tokens    [rows]
      "i32", // int32_t rows
      "ptr", // const uint16_t *table    fp16 [vocab][dim]
      "i32", // int32_t vocab
      "i32", // int32_t dim
      "ptr", // float *out               [rows][dim]
    ],
    returns: "i32",
  },
  kivi_model_rmsnorm: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const float *x           [rows][dim]
      "ptr", // const uint16_t *w        fp16 [dim]
      "i32", // int32_t rows
      "i32", // int32_t dim
      "f32", // float eps
      "ptr", // float *out               [rows][dim]
    ],
    returns: "i32",
  },
  kivi_model_linear: { args: LINEAR, returns: "i32" },
  kivi_model_linear_f16: { args: LINEAR, returns: "i32" }, // kivi_model_linear's parameters
  kivi_model_fill_normal: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // uint16_t *out            fp16 [n]
      "i64", // int64_t n
      "u64", // uint64_t seed
      "f32", // float mean
      "f32", // float std
    ],
    returns: "i32",
  },
  kivi_model_rope: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // float *x                 [rows][heads][dim]
      "i32", // int32_t rows
      "i32", // int32_t heads
      "i32", // int32_t dim
      "ptr", // const int32_t *pos       [rows]
      "ptr", // const float *cs          [max_pos][dim]
      "i32", // int32_t max_pos
    ],
    returns: "i32",
  },
  kivi_model_swiglu: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const float *gate        [n]
      "ptr", // const float *up          [n]
      "i32", // int32_t n
      "ptr", // float *out               [n]
    ],
    returns: "i32",
  },
  kivi_model_attention: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // const float *q           [batch][tokens][q_heads][head_dim]
      "ptr", // const float *k           [batch][tokens][kv_heads][head_dim]
      "ptr", // const float *v           [batch][tokens][kv_heads][head_dim]
      "i32", // int32_t batch
      "i32", // int32_t tokens
      "i32", // int32_t q_heads
      "i32", // int32_t kv_heads
      "i32", // int32_t head_dim
      "f32", // float scale
      "ptr", // float *out               [batch][tokens][q_heads][head_dim]
    ],
    returns: "i32",
  },
  kivi_model_log_softmax: {
    args: [
      "ptr", // kivi_ctx_t ctx
      "ptr", // float *x                 [rows][n]
      "i32", // int32_t rows
      "i32", // int32_t n
    ],
    returns: "i32",
  },
} as const satisfies Record<string, SymbolSpec>;

/** The export names of kivi.h. */
export type SymbolName = keyof typeof symbols;
