/*
 * model.cu — the model ops of the CUDA build (kivi.h kivi_model_*): the small ops of a Llama forward
 * pass as kernels of ours, the linear layers as cuBLAS SGEMMs over the fp16 weights widened to f32
 * (one widening kernel a call into a scratch buffer of the context, so the weights stay fp16 in device
 * memory and the products and sums are those of an f32 model), or, for kivi_model_linear_f16, as a
 * cublasGemmEx on the tensor cores over the fp16 weights as they are and the activations rounded to
 * fp16 (the weights read once at 2 bytes each: at 8B scale the widening moves 5x the bytes of the
 * product). The fill op is a counter-based hash (kivi_model.h). cuBLAS is loaded at run time
 * (cublas_api.h); a machine without it gets KIVI_ERR_UNSUPPORTED from kivi_model_linear only.
 */
#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "common.cuh"
#include "cublas_api.h"
#include "kivi_model.h"

/* ---------------------------------------------------------------- cuBLAS ----------------- */

struct kv_blas {
  kv_cublas_handle handle;
  float *w;        /* device scratch: one weight matrix widened to f32 */
  size_t w_floats; /* its capacity */
  __half *x16;     /* device scratch: the activations of kivi_model_linear_f16 rounded to fp16 */
  size_t x16_n;    /* its capacity */
};

struct kv_cublas_loaded {
  kv_cublas_api api;
  char why[KV_ERR_LEN]; /* "" when loaded */
};

static kv_cublas_loaded load_cublas() {
  kv_cublas_loaded r;
  memset(&r, 0, sizeof r);
  const char *names[] = KV_CUBLAS_LIBS;
  void *lib = NULL;
  const char *err = "";
  for (const char *n : names) {
    lib = dlopen(n, RTLD_NOW | RTLD_LOCAL);
    if (lib) break;
    err = dlerror();
  }
  if (!lib) {
    snprintf(r.why, sizeof r.why,
             "cuBLAS is not available (dlopen of libcublas.so.13 failed: %s); install the CUDA 13 toolkit's cuBLAS or "
             "add its folder to LD_LIBRARY_PATH",
             err ? err : "?");
    return r;
  }
  r.api.create = (kv_cublas_create_fn)dlsym(lib, "cublasCreate_v2");
  r.api.destroy = (kv_cublas_destroy_fn)dlsym(lib, "cublasDestroy_v2");
  r.api.set_stream = (kv_cublas_set_stream_fn)dlsym(lib, "cublasSetStream_v2");
  r.api.sgemm = (kv_cublas_sgemm_fn)dlsym(lib, "cublasSgemm_v2");
  r.api.gemm_ex = (kv_cublas_gemm_ex_fn)dlsym(lib, "cublasGemmEx");
  if (!r.api.create || !r.api.destroy || !r.api.set_stream || !r.api.sgemm || !r.api.gemm_ex)
    snprintf(r.why, sizeof r.why,
             "the loaded libcublas.so.13 lacks cublasCreate_v2, cublasDestroy_v2, cublasSetStream_v2, cublasSgemm_v2 "
             "or cublasGemmEx");
  return r;
}

/** The process's cuBLAS entry points (loaded once; C++ makes the first call thread-safe). */
static const kv_cublas_loaded &cublas() {
  static const kv_cublas_loaded loaded = load_cublas();
  return loaded;
}

void kv_blas_release(kivi_ctx_t ctx) {
  kv_blas *b = ctx->blas;
  if (!b) return;
  if (b->handle) cublas().api.destroy(b->handle);
  if (b->w) cudaFree(b->w);
  if (b->x16) cudaFree(b->x16);
  free(b);
  ctx->blas = NULL;
}

/** Grows a device scratch *p of *cap elements of `size` bytes to at least n. */
static kivi_status scratch_grow(kivi_ctx_t ctx, const char *op, void **p, size_t *cap, size_t n, size_t size,
                                const char *what) {
  if (*cap >= n) return KIVI_OK;
  kivi_status st;
  if (*p) {
    /* cudaFree waits for the work in flight that may still read the old scratch */
    if ((st = kv_cuda(ctx, cudaFree(*p), op, what))) return st;
    *p = NULL;
    *cap = 0;
  }
  if ((st = kv_cuda(ctx, cudaMalloc(p, n * size), op, what))) return st;
  *cap = n;
  return KIVI_OK;
}

/** ctx's cuBLAS handle on its stream, with scratches of at least `floats` f32 (the widened weights)
    and `halves` fp16 (the rounded activations). */
static kivi_status blas_get(kivi_ctx_t ctx, const char *op, size_t floats, size_t halves, kv_blas **out) {
  const kv_cublas_loaded &cb = cublas();
  if (cb.why[0]) return kv_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: %s", op, cb.why);
  kivi_status st;
  if (!ctx->blas) {
    kv_blas *b = (kv_blas *)calloc(1, sizeof *b);
    if (!b) return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the cuBLAS state", op);
    const kv_cublas_status cs = cb.api.create(&b->handle);
    if (cs != 0) {
      free(b);
      return kv_fail(ctx, KIVI_ERR_CUDA, "%s: cublasCreate failed with cublasStatus_t %d", op, cs);
    }
    ctx->blas = b;
    const kv_cublas_status ss = cb.api.set_stream(b->handle, ctx->stream);
    if (ss != 0) return kv_fail(ctx, KIVI_ERR_CUDA, "%s: cublasSetStream failed with cublasStatus_t %d", op, ss);
  }
  kv_blas *b = ctx->blas;
  if ((st =
           scratch_grow(ctx, op, (void **)&b->w, &b->w_floats, floats, sizeof(float), "cudaMalloc (weight scratch)")) ||
      (st = scratch_grow(ctx, op, (void **)&b->x16, &b->x16_n, halves, sizeof(__half),
                         "cudaMalloc (activation scratch)")))
    return st;
  *out = b;
  return KIVI_OK;
}

/* ---------------------------------------------------------------- helpers ---------------- */

/* kv_enter, then the shared rules of kivi_model.h. */
static kivi_status check(kivi_ctx_t ctx, const char *op, const kivi_model_args *a) {
  char msg[KV_ERR_LEN];
  kivi_status st = kivi_model_check(op, a, msg, sizeof msg);
  if (st) return kv_fail(ctx, st, "%s", msg);
  return kv_enter(ctx, op);
}

/** Sum (max when MAX) over the block; every thread gets the result. blockDim.x a multiple of 32. */
template <bool MAX>
__device__ float block_reduce(float v, float *red) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = MAX ? fmaxf(v, w) : v + w;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads(); /* red is reused by the next reduction */
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int i = 1; i < warps; i++) r = MAX ? fmaxf(r, red[i]) : r + red[i];
  return r;
}

#define KV_THREADS 256

/* ---------------------------------------------------------------- kernels ---------------- */

static __global__ void k_embed(const int32_t *__restrict__ tokens, int64_t rows, const __half *__restrict__ table,
                               int32_t vocab, int32_t dim, float *__restrict__ out) {
  const int64_t n = rows * dim, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int32_t t = tokens[i / dim];
    out[i] = t < 0 || t >= vocab ? NAN : __half2float(table[(int64_t)t * dim + i % dim]);
  }
}

static __global__ void k_rmsnorm(const float *__restrict__ x, const __half *__restrict__ w, int32_t dim, float eps,
                                 float *out) {
  __shared__ float red[32];
  const float *xr = x + (int64_t)blockIdx.x * dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_reduce<false>(ss, red);
  const float inv = 1.0f / sqrtf(ss / (float)dim + eps);
  float *o = out + (int64_t)blockIdx.x * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv * __half2float(w[i]);
}

static __global__ void k_widen(const __half *__restrict__ w, int64_t n, float *__restrict__ out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = __half2float(w[i]);
}

static __global__ void k_narrow(const float *__restrict__ x, int64_t n, __half *__restrict__ out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = __float2half_rn(x[i]);
}

static __global__ void k_fill_normal(uint16_t *__restrict__ out, int64_t n, uint64_t seed, float mean, float std) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = kivi_fill_normal1(seed, i, mean, std);
}

static __global__ void k_rope(float *__restrict__ x, int64_t rows, int32_t heads, int32_t dim,
                              const int32_t *__restrict__ pos, const float *__restrict__ cs, int32_t max_pos) {
  const int32_t half = dim / 2;
  const int64_t n = rows * heads * half, stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t r = e / ((int64_t)heads * half);
    const int32_t i = (int32_t)(e % half);
    float *xh = x + (e / half) * dim;
    const int32_t p = pos[r];
    if (p < 0 || p >= max_pos) {
      xh[i] = xh[i + half] = NAN;
      continue;
    }
    const float c = cs[(int64_t)p * dim + i], s = cs[(int64_t)p * dim + half + i];
    const float x1 = xh[i], x2 = xh[i + half];
    xh[i] = x1 * c - x2 * s;
    xh[i + half] = x2 * c + x1 * s;
  }
}

static __global__ void k_swiglu(const float *gate, const float *up, int64_t n, float *out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = kivi_swiglu1(gate[i], up[i]);
}

/* One block per (sequence, token, query head): the scores of tokens 0..t in shared memory, their max
   and sum, then each thread a channel of the weighted sum. */
static __global__ void k_attention(const float *__restrict__ q, const float *__restrict__ k,
                                   const float *__restrict__ v, int32_t tokens, int32_t q_heads, int32_t kv_heads,
                                   int32_t head_dim, float scale, float *__restrict__ out) {
  extern __shared__ float sm[]; /* q [head_dim], p [tokens] */
  __shared__ float red[32];
  float *qs = sm, *p = sm + head_dim;
  const int32_t h = blockIdx.x % q_heads;
  const int64_t bt = blockIdx.x / q_heads; /* b * tokens + t */
  const int32_t t = (int32_t)(bt % tokens);
  const int64_t b = bt / tokens;
  const int64_t qrow = (int64_t)q_heads * head_dim, krow = (int64_t)kv_heads * head_dim;
  const int64_t kvo = (int64_t)(h / (q_heads / kv_heads)) * head_dim;
  const float *kb = k + b * tokens * krow + kvo, *vb = v + b * tokens * krow + kvo;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) qs[d] = q[bt * qrow + (int64_t)h * head_dim + d];
  __syncthreads();
  float m = -INFINITY;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) {
    const float *kj = kb + j * krow;
    float s = 0.0f;
    for (int d = 0; d < head_dim; d++) s += qs[d] * kj[d];
    p[j] = s * scale;
    m = fmaxf(m, p[j]);
  }
  m = block_reduce<true>(m, red);
  float sum = 0.0f;
  for (int j = threadIdx.x; j <= t; j += blockDim.x) sum += p[j] = expf(p[j] - m);
  sum = block_reduce<false>(sum, red); /* its __syncthreads also publishes p */
  float *o = out + bt * qrow + (int64_t)h * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float acc = 0.0f;
    for (int j = 0; j <= t; j++) acc += p[j] / sum * vb[j * krow + d];
    o[d] = acc;
  }
}

static __global__ void k_log_softmax(float *x, int32_t n) {
  __shared__ float red[32];
  float *xr = x + (int64_t)blockIdx.x * n;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
  m = block_reduce<true>(m, red);
  float sum = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) sum += expf(xr[i] - m);
  sum = block_reduce<false>(sum, red);
  const float lse = m + logf(sum);
  for (int i = threadIdx.x; i < n; i += blockDim.x) xr[i] -= lse;
}

/* ---------------------------------------------------------------- exports ---------------- */

KIVI_API kivi_status kivi_model_embed(kivi_ctx_t ctx, const int32_t *tokens, int32_t rows, const uint16_t *table,
                                      int32_t vocab, int32_t dim, float *out) {
  KIVI_MODEL_ENTER(kivi_model_embed, tokens, rows, table, vocab, dim, out);
  k_embed<<<kv_grid(ctx, ((int64_t)rows * dim + KV_THREADS - 1) / KV_THREADS, 8), KV_THREADS, 0, ctx->stream>>>(
      tokens, rows, (const __half *)table, vocab, dim, out);
  return kv_launched(ctx, op, "k_embed");
}

KIVI_API kivi_status kivi_model_rmsnorm(kivi_ctx_t ctx, const float *x, const uint16_t *w, int32_t rows, int32_t dim,
                                        float eps, float *out) {
  KIVI_MODEL_ENTER(kivi_model_rmsnorm, x, w, rows, dim, out);
  k_rmsnorm<<<rows, KV_THREADS, 0, ctx->stream>>>(x, (const __half *)w, dim, eps, out);
  return kv_launched(ctx, op, "k_rmsnorm");
}

KIVI_API kivi_status kivi_model_linear(kivi_ctx_t ctx, const float *x, const uint16_t *w, int32_t rows, int32_t n,
                                       int32_t k, int32_t accumulate, float *y) {
  KIVI_MODEL_ENTER(kivi_model_linear, x, w, rows, n, k, accumulate, y);
  kv_blas *b = NULL;
  const int64_t nk = (int64_t)n * k;
  if ((st = blas_get(ctx, op, (size_t)nk, 0, &b))) return st;
  k_widen<<<kv_grid(ctx, (nk + KV_THREADS - 1) / KV_THREADS, 8), KV_THREADS, 0, ctx->stream>>>((const __half *)w, nk,
                                                                                               b->w);
  if ((st = kv_launched(ctx, op, "k_widen"))) return st;
  /* Row-major y [rows][n] = x [rows][k] W^T is column-major y^T (n x rows) = W32^T (W32 column-major
     k x n) times x^T (k x rows). */
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const kv_cublas_status cs =
      cublas().api.sgemm(b->handle, KV_CUBLAS_OP_T, KV_CUBLAS_OP_N, n, rows, k, &alpha, b->w, k, x, k, &beta, y, n);
  if (cs != 0) return kv_fail(ctx, KIVI_ERR_CUDA, "%s: cublasSgemm failed with cublasStatus_t %d", op, cs);
  return kv_launched(ctx, op, "cublasSgemm");
}

KIVI_API kivi_status kivi_model_linear_f16(kivi_ctx_t ctx, const float *x, const uint16_t *w, int32_t rows, int32_t n,
                                           int32_t k, int32_t accumulate, float *y) {
  KIVI_MODEL_ENTER(kivi_model_linear_f16, x, w, rows, n, k, accumulate, y);
  kv_blas *b = NULL;
  const int64_t xk = (int64_t)rows * k;
  if ((st = blas_get(ctx, op, 0, (size_t)xk, &b))) return st;
  k_narrow<<<kv_grid(ctx, (xk + KV_THREADS - 1) / KV_THREADS, 8), KV_THREADS, 0, ctx->stream>>>(x, xk, b->x16);
  if ((st = kv_launched(ctx, op, "k_narrow"))) return st;
  /* As kivi_model_linear: column-major y^T (n x rows) = W^T (W column-major k x n) times x16^T. */
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  const kv_cublas_status cs =
      cublas().api.gemm_ex(b->handle, KV_CUBLAS_OP_T, KV_CUBLAS_OP_N, n, rows, k, &alpha, w, KV_CUDA_R_16F, k, b->x16,
                           KV_CUDA_R_16F, k, &beta, y, KV_CUDA_R_32F, n, KV_CUBLAS_COMPUTE_32F, KV_CUBLAS_GEMM_DEFAULT);
  if (cs != 0) return kv_fail(ctx, KIVI_ERR_CUDA, "%s: cublasGemmEx failed with cublasStatus_t %d", op, cs);
  return kv_launched(ctx, op, "cublasGemmEx");
}

KIVI_API kivi_status kivi_model_fill_normal(kivi_ctx_t ctx, uint16_t *out, int64_t n, uint64_t seed, float mean,
                                            float std) {
  KIVI_MODEL_ENTER(kivi_model_fill_normal, out, n);
  char msg[KV_ERR_LEN];
  if ((st = kivi_model_fill_check(op, mean, std, msg, sizeof msg))) return kv_fail(ctx, st, "%s", msg);
  k_fill_normal<<<kv_grid(ctx, (n + KV_THREADS - 1) / KV_THREADS, 8), KV_THREADS, 0, ctx->stream>>>(out, n, seed, mean,
                                                                                                    std);
  return kv_launched(ctx, op, "k_fill_normal");
}

KIVI_API kivi_status kivi_model_rope(kivi_ctx_t ctx, float *x, int32_t rows, int32_t heads, int32_t dim,
                                     const int32_t *pos, const float *cs, int32_t max_pos) {
  KIVI_MODEL_ENTER(kivi_model_rope, x, rows, heads, dim, pos, cs, max_pos);
  const int64_t n = (int64_t)rows * heads * (dim / 2);
  k_rope<<<kv_grid(ctx, (n + KV_THREADS - 1) / KV_THREADS, 8), KV_THREADS, 0, ctx->stream>>>(x, rows, heads, dim, pos,
                                                                                             cs, max_pos);
  return kv_launched(ctx, op, "k_rope");
}

KIVI_API kivi_status kivi_model_swiglu(kivi_ctx_t ctx, const float *gate, const float *up, int32_t n, float *out) {
  KIVI_MODEL_ENTER(kivi_model_swiglu, gate, up, n, out);
  k_swiglu<<<kv_grid(ctx, ((int64_t)n + KV_THREADS - 1) / KV_THREADS, 8), KV_THREADS, 0, ctx->stream>>>(gate, up, n,
                                                                                                        out);
  return kv_launched(ctx, op, "k_swiglu");
}

KIVI_API kivi_status kivi_model_attention(kivi_ctx_t ctx, const float *q, const float *k, const float *v, int32_t batch,
                                          int32_t tokens, int32_t q_heads, int32_t kv_heads, int32_t head_dim,
                                          float scale, float *out) {
  KIVI_MODEL_ENTER(kivi_model_attention, q, k, v, batch, tokens, q_heads, kv_heads, head_dim, out);
  const size_t smem = ((size_t)head_dim + (size_t)tokens) * sizeof(float); /* at most 36 KiB */
  k_attention<<<(unsigned)((int64_t)batch * tokens * q_heads), 128, smem, ctx->stream>>>(
      q, k, v, tokens, q_heads, kv_heads, head_dim, scale, out);
  return kv_launched(ctx, op, "k_attention");
}

KIVI_API kivi_status kivi_model_log_softmax(kivi_ctx_t ctx, float *x, int32_t rows, int32_t n) {
  KIVI_MODEL_ENTER(kivi_model_log_softmax, x, rows, n);
  k_log_softmax<<<rows, KV_THREADS, 0, ctx->stream>>>(x, n);
  return kv_launched(ctx, op, "k_log_softmax");
}
