/*
 * cache.cu — the paged 2-bit / 4-bit KV cache of the CUDA build: kivi_cache_create / _destroy,
 * sequence slots, kivi_cache_append (NaN scan, host plan, one flush launch that quantizes every
 * flushed group of every layer into its page, one launch that writes the rest into the fp16
 * residual windows), kivi_cache_read and kivi_cache_memory. Attention is in attention.cu.
 *
 * Flush (k_cache_flush): one block per (flushed group of F tokens, layer, kv head). The block
 * gathers the group's F x D keys (from the window slot when the token was already held, else from
 * the input row), rounds them to fp16 into shared memory, quantizes keys per channel (one thread per
 * channel, the CPU build's formulas from kivi_format.h, IEEE division: codes bit-identical), then
 * does the same for the values (one thread per token x value group).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cache.cuh"

#define KV_FLUSH_MAXL 128 /* layers per flush / window launch (more: several launches) */

/* ---------------------------------------------------------------- NaN / Inf scan --------- */

/* NaN / Inf, or with f16range also a finite f32 / bf16 that fp16 rounds to Inf (|x| >= 65520) */
template <int DT> __device__ __forceinline__ bool kv_c_bad(uint32_t u, bool f16range) {
  const uint32_t lim = f16range ? 0x477ff000u : 0x7f800000u;
  if constexpr (DT == KIVI_F32) return (u & 0x7fffffffu) >= lim;
  else if constexpr (DT == KIVI_F16) return (u & 0x7c00u) == 0x7c00u;
  else return ((u << 16) & 0x7fffffffu) >= lim;
}

/* Grid-stride over x [n]; the lowest bad index goes to *first by atomicMin (only finders touch it). */
template <int DT>
static __global__ void k_cache_scan(const void *__restrict__ x, int64_t n, bool f16range,
                                    unsigned long long *__restrict__ first) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t bad = INT64_MAX;
  const bool vec = ((uintptr_t)x & 15u) == 0;
  constexpr int V = 16 / kv_dt<DT>::size;
  int64_t from = 0;
  if (vec) {
    const uint4 *xv = (const uint4 *)x;
    const int64_t nv = n / V;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += stride) {
      const uint4 u = xv[i];
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int e = 0; e < V; e++) {
        const uint32_t b = DT == KIVI_F32 ? w[e] : ((w[e / 2] >> (16 * (e & 1))) & 0xffffu);
        if (kv_c_bad<DT>(b, f16range) && i * V + e < bad) bad = i * V + e;
      }
    }
    from = nv * V;
  }
  for (int64_t i = from + (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
    const uint32_t b = DT == KIVI_F32 ? ((const uint32_t *)x)[i] : (uint32_t)((const uint16_t *)x)[i];
    if (kv_c_bad<DT>(b, f16range) && i < bad) bad = i;
  }
  if (bad != INT64_MAX) atomicMin(first, (unsigned long long)bad);
}

kivi_status kv_cache_scan(kivi_ctx_t ctx, const char *op, const void *x, kivi_dtype dtype, int64_t n, bool f16range,
                          int slot, int64_t *first) {
  *first = -1;
  kivi_status st = kv_scratch_reset(ctx, op);
  if (st) return st;
  const int64_t bytes = n * (dtype == KIVI_F32 ? 4 : 2);
  const unsigned grid = kv_grid(ctx, (bytes + 256 * 64 - 1) / (256 * 64), 8);
  unsigned long long *s = ctx->d_scratch + slot;
#define KV_SCAN(DT) k_cache_scan<DT><<<grid, 256, 0, ctx->stream>>>(x, n, f16range, s)
  KV_DISPATCH_DT(dtype, KV_SCAN)
#undef KV_SCAN
  if ((st = kv_launched(ctx, op, "k_cache_scan"))) return st;
  if ((st = kv_scratch_read(ctx, op))) return st;
  const unsigned long long b = ctx->h_scratch[slot];
  if (b != ~0ull) *first = (int64_t)b;
  return KIVI_OK;
}

const char *kv_cache_bad_name(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t i, char (&buf)[32]) {
  uint32_t bits = 0;
  const size_t es = dtype == KIVI_F32 ? 4 : 2;
  if (cudaMemcpy(&bits, (const char *)x + (size_t)i * es, es, cudaMemcpyDeviceToHost) != cudaSuccess) {
    (void)cudaGetLastError();
    return "a non-finite value";
  }
  (void)ctx;
  const float v = dtype == KIVI_F32 ? kivi_bits_f32(bits)
                                    : (dtype == KIVI_F16 ? kivi_f16_to_f32((uint16_t)bits)
                                                         : kivi_bf16_to_f32((uint16_t)bits));
  if (v == v && v != INFINITY && v != -INFINITY) {
    snprintf(buf, sizeof buf, "%g (beyond fp16)", (double)v);
    return buf;
  }
  return v != v ? "NaN" : (v > 0 ? "+Inf" : "-Inf");
}

/* ---------------------------------------------------------------- device helpers --------- */

__device__ __forceinline__ float kv_hf(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t kv_fh(float f) { return __half_as_ushort(__float2half_rn(f)); }

/* Element i of x (runtime dtype) rounded to fp16 (f32: one RNE rounding; bf16: exact to f32 first). */
__device__ __forceinline__ uint16_t kv_in_half(const void *__restrict__ x, kivi_dtype dt, int64_t i) {
  if (dt == KIVI_F16) return ((const uint16_t *)x)[i];
  if (dt == KIVI_F32) return kv_fh(((const float *)x)[i]);
  return kv_fh(__uint_as_float((uint32_t)((const uint16_t *)x)[i] << 16));
}

/*
 * kivi_codebook_fit for one group (the CPU build's fit_group, operation for operation, without FMA
 * contraction): uniform grid, nearest assignment, updates c += sum(x - c) / count over the values
 * assigned under the current centroids, stop after `iters` updates or when no assignment changed.
 * Assignments are recomputed from the old and new centroids instead of stored. x[i * stride], G values.
 * Writes the fp16 centroids sorted ascending (stable, as the CPU's insertion sort).
 */
template <int NC>
__device__ void kv_cb_fit(const uint16_t *x, int stride, int G, int fit, int iters, uint16_t (&h)[NC]) {
  float mn = kv_hf(x[0]), mx = mn;
  for (int i = 1; i < G; i++) {
    const float v = kv_hf(x[i * stride]);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  float c[NC];
#pragma unroll
  for (int i = 0; i < NC; i++)
    c[i] = __fadd_rn(mn, __fdiv_rn(__fmul_rn((float)i, __fsub_rn(mx, mn)), (float)(NC - 1)));
  c[NC - 1] = mx;
  const bool pinned = fit == KIVI_FIT_PINNED;
  for (int it = 0; it < iters; it++) {
    float mid[NC - 1], sum[NC];
    int cnt[NC];
#pragma unroll
    for (int k = 0; k < NC - 1; k++) mid[k] = __fmul_rn(0.5f, __fadd_rn(c[k], c[k + 1]));
#pragma unroll
    for (int k = 0; k < NC; k++) {
      sum[k] = 0.0f;
      cnt[k] = 0;
    }
    for (int i = 0; i < G; i++) {
      const float v = kv_hf(x[i * stride]);
      int q = 0;
#pragma unroll
      for (int k = 0; k < NC - 1; k++) q += v >= mid[k] ? 1 : 0;
#pragma unroll
      for (int k = 0; k < NC; k++)
        if (q == k) {
          sum[k] = __fadd_rn(sum[k], __fsub_rn(v, c[k]));
          cnt[k]++;
        }
    }
    float cn[NC];
#pragma unroll
    for (int k = 0; k < NC; k++) {
      const bool moves = !pinned || (k > 0 && k < NC - 1);
      cn[k] = (moves && cnt[k]) ? __fadd_rn(c[k], __fdiv_rn(sum[k], (float)cnt[k])) : c[k];
    }
    float midn[NC - 1];
#pragma unroll
    for (int k = 0; k < NC - 1; k++) midn[k] = __fmul_rn(0.5f, __fadd_rn(cn[k], cn[k + 1]));
    bool changed = false;
    for (int i = 0; i < G && !changed; i++) {
      const float v = kv_hf(x[i * stride]);
      int q0 = 0, q1 = 0;
#pragma unroll
      for (int k = 0; k < NC - 1; k++) {
        q0 += v >= mid[k] ? 1 : 0;
        q1 += v >= midn[k] ? 1 : 0;
      }
      changed = q0 != q1;
    }
#pragma unroll
    for (int k = 0; k < NC; k++) c[k] = cn[k];
    if (!changed) break;
  }
  kv_centroids_f16_sorted<NC>(c, h);
}

/* Fit + codes of one group x[i * stride] (G values, G % cpw == 0); centroids to cent[NC], codes to words. */
template <int NC>
__device__ void kv_cb_group(const uint16_t *x, int stride, int G, int fit, int iters, uint16_t *cent,
                            uint32_t *words) {
  constexpr int BITS = NC == 4 ? 2 : 4, CPW = 32 / BITS;
  uint16_t h[NC];
  kv_cb_fit<NC>(x, stride, G, fit, iters, h);
  float cf[NC];
#pragma unroll
  for (int k = 0; k < NC; k++) {
    cent[k] = h[k];
    cf[k] = kivi_f16_to_f32(h[k]);
  }
  for (int w = 0; w < G / CPW; w++) {
    uint32_t word = 0;
    for (int j = 0; j < CPW; j++)
      word |= kivi_nearest_code(kv_hf(x[(w * CPW + j) * stride]), cf, NC) << (BITS * j);
    words[w] = word;
  }
}

/* Uniform params of one group x[i * stride] (G values): the CPU build's formulas and order (8 running
   lanes, then across them), so results are identical even for +-0. */
__device__ void kv_un_params(const uint16_t *x, int stride, int G, int bits, uint16_t *sh, uint16_t *zh) {
  float lo[8], hi[8];
#pragma unroll
  for (int l = 0; l < 8; l++) lo[l] = hi[l] = kv_hf(x[l * stride]);
  for (int i = 8; i < G; i += 8)
#pragma unroll
    for (int l = 0; l < 8; l++) {
      const float v = kv_hf(x[(i + l) * stride]);
      lo[l] = v < lo[l] ? v : lo[l];
      hi[l] = v > hi[l] ? v : hi[l];
    }
  float mn = lo[0], mx = hi[0];
#pragma unroll
  for (int l = 1; l < 8; l++) {
    mn = lo[l] < mn ? lo[l] : mn;
    mx = hi[l] > mx ? hi[l] : mx;
  }
  kivi_uniform_params(mn, mx, bits, sh, zh);
}

/* Uniform params + codes of one group x[i * stride] (G values): the CPU build's formulas. */
__device__ void kv_un_group(const uint16_t *x, int stride, int G, int bits, uint32_t *param, uint32_t *words) {
  uint16_t sh, zh;
  kv_un_params(x, stride, G, bits, &sh, &zh);
  *param = (uint32_t)sh | ((uint32_t)zh << 16); /* half2 (scale, zero) */
  const float s = kivi_f16_to_f32(sh), z = kivi_f16_to_f32(zh);
  const int cpw = 32 / bits;
  for (int w = 0; w < G / cpw; w++) {
    uint32_t word = 0;
    for (int j = 0; j < cpw; j++) word |= kivi_uniform_code(kv_hf(x[(w * cpw + j) * stride]), z, s, bits) << (bits * j);
    words[w] = word;
  }
}

struct kv_part_dev {
  uint64_t codes, head, page; /* bytes: params offset in a head block, head block, page (all heads) */
  int32_t bits, kind, group, fit, iters;
};

/*
 * The tensor-core layout (kivi_format.h), 2-bit: params of every group first (one thread a group; uniform
 * params also kept as floats in sp/zp, codebook codes written over the group's own values in the tile),
 * then every code word (one thread a word) from them. tile [F][D] holds the F tokens flushed at page
 * offset o.
 */
__device__ void kv_flush_mma(int part, uint8_t *base, uint64_t pbytes, uint16_t *tile, int o, int D, int F, int P,
                             const kv_part_dev &vp, float *sp, float *zp) {
  const int Gv = vp.group;
  uint32_t *words = (uint32_t *)base;
  if (part == 0) { /* keys: group = channel over the F tokens; codes [P][D / 16], params [P / F][D] */
    uint32_t *par = (uint32_t *)(base + pbytes) + (int64_t)(o / F) * D;
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      uint16_t sh, zh;
      kv_un_params(tile + d, D, F, 2, &sh, &zh);
      par[d] = (uint32_t)sh | ((uint32_t)zh << 16);
      sp[d] = kv_hf(sh);
      zp[d] = kv_hf(zh);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < F * (D / 16); idx += blockDim.x) {
      const int i = idx / (D / 16), w = idx % (D / 16);
      uint32_t word = 0;
      for (int j = 0; j < 16; j++) {
        const int d = 16 * w + j;
        word |= kivi_uniform_code(kv_hf(tile[i * D + d]), zp[d], sp[d], 2) << (2 * kivi_mma_key_slot(j));
      }
      words[(int64_t)(o + i) * (D / 16) + w] = word;
    }
  } else if (vp.kind == KIVI_KIND_CODEBOOK) { /* values: centroid planes c0..c3 [D / Gv][P], pair order */
    const int gpr = D / Gv;
    uint16_t *cp = (uint16_t *)(base + pbytes);
    for (int g = threadIdx.x; g < F * gpr; g += blockDim.x) {
      const int i = g / gpr, k = g % gpr;
      uint16_t *x = tile + i * D + k * Gv;
      uint16_t h[4];
      kv_cb_fit<4>(x, 1, Gv, vp.fit, vp.iters, h);
      float cf[4];
#pragma unroll
      for (int j = 0; j < 4; j++) {
        cp[((int64_t)j * gpr + k) * P + kivi_pair_pos(o + i)] = h[j];
        cf[j] = kivi_f16_to_f32(h[j]);
      }
      for (int e = 0; e < Gv; e++) x[e] = (uint16_t)kivi_nearest_code(kv_hf(x[e]), cf, 4); /* own values only */
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < (F / 16) * D; idx += blockDim.x) {
      const int b = idx / D, w = idx % D;
      uint32_t word = 0;
      for (int j = 0; j < 16; j++) {
        int32_t u, d;
        kivi_mma_value_slot(D, w, j, &u, &d);
        word |= (uint32_t)tile[(16 * b + u) * D + d] << (2 * j);
      }
      words[(int64_t)(o / 16 + b) * D + w] = word;
    }
  } else { /* values: group = token x Gv channels; codes [P / 16][D] (fragment order), params scale/zero [D / Gv][P] */
    const int gpr = D / Gv;
    uint16_t *sc = (uint16_t *)(base + pbytes), *ze = sc + (int64_t)gpr * P;
    for (int g = threadIdx.x; g < F * gpr; g += blockDim.x) {
      const int i = g / gpr, k = g % gpr;
      uint16_t sh, zh;
      kv_un_params(tile + i * D + k * Gv, 1, Gv, 2, &sh, &zh);
      const int64_t at = (int64_t)k * P + kivi_pair_pos(o + i);
      sc[at] = sh;
      ze[at] = zh;
      sp[g] = kv_hf(sh);
      zp[g] = kv_hf(zh);
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < (F / 16) * D; idx += blockDim.x) {
      const int b = idx / D, w = idx % D; /* word w of run b: the codes of kivi_mma_value_slot */
      uint32_t word = 0;
      for (int j = 0; j < 16; j++) {
        int32_t u, d;
        kivi_mma_value_slot(D, w, j, &u, &d);
        const int i = 16 * b + u, g = i * gpr + d / Gv;
        word |= kivi_uniform_code(kv_hf(tile[i * D + d]), zp[g], sp[g], 2) << (2 * j);
      }
      words[(int64_t)(o / 16 + b) * D + w] = word;
    }
  }
}

/* ---------------------------------------------------------------- flush kernel ----------- */

struct kv_flush_layer {
  int64_t qlen, len; /* before the append */
  int32_t nflush;    /* groups of F tokens flushed by this append */
  int32_t layer, in_index;
};

struct kv_flush_params {
  uint8_t *kpool, *vpool;
  const uint16_t *kwin, *vwin; /* this sequence's windows: [layers][W][kv_heads][D] */
  const void *k, *v;           /* [in layers][n][kv_heads][D] */
  const int32_t *table;        /* device row of the sequence */
  uint64_t layer_stride_k, layer_stride_v; /* max_pages * page bytes */
  kv_part_dev kp, vp;
  int64_t n;
  int32_t kvh, D, P, F, W, dtype;
  int32_t mma, nparam; /* tensor-core layout; floats of each of the two param arrays in shared memory */
  kv_flush_layer L[KV_FLUSH_MAXL];
};

static __global__ void __launch_bounds__(256) k_cache_flush(const __grid_constant__ kv_flush_params p) {
  extern __shared__ uint16_t tile[]; /* [F][D] fp16 bits */
  const kv_flush_layer L = p.L[blockIdx.y];
  const int j = blockIdx.x, h = blockIdx.z;
  if (j >= L.nflush) return;
  const int D = p.D, F = p.F, P = p.P;
  const int64_t pos = L.qlen + (int64_t)j * F;
  const int64_t page = p.table[pos / P];
  const int o = (int)(pos % P);
  for (int part = 0; part < 2; part++) {
    const kv_part_dev &pt = part ? p.vp : p.kp;
    const uint16_t *win = (part ? p.vwin : p.kwin) + (int64_t)L.layer * p.W * p.kvh * D;
    const void *in = part ? p.v : p.k;
    for (int idx = threadIdx.x; idx < F * D; idx += blockDim.x) {
      const int i = idx / D, d = idx % D;
      const int64_t pp = pos + i;
      uint16_t hv;
      if (pp < L.len) {
        hv = win[((pp % p.W) * p.kvh + h) * (int64_t)D + d];
      } else {
        const int64_t r = pp - L.len;
        hv = kv_in_half(in, p.dtype, (((int64_t)L.in_index * p.n + r) * p.kvh + h) * D + d);
      }
      tile[idx] = hv;
    }
    __syncthreads();
    uint8_t *base = (part ? p.vpool : p.kpool) + (uint64_t)L.layer * (part ? p.layer_stride_v : p.layer_stride_k) +
                    (uint64_t)page * pt.page + (uint64_t)h * pt.head;
    if (pt.bits == 16) {
      uint16_t *dst = (uint16_t *)base + (int64_t)o * D;
      for (int idx = threadIdx.x; idx < F * D; idx += blockDim.x) dst[idx] = tile[idx];
    } else if (p.mma) {
      float *sp = (float *)(tile + F * D), *zp = sp + p.nparam;
      kv_flush_mma(part, base, pt.codes, tile, o, D, F, P, p.vp, sp, zp);
    } else if (part == 0) {
      /* keys: one group per channel over the F tokens; codes [D][P / cpw], params [D][P / F] */
      const int cpw = 32 / pt.bits;
      for (int d = threadIdx.x; d < D; d += blockDim.x) {
        uint32_t *words = (uint32_t *)base + (int64_t)d * (P / cpw) + o / cpw;
        const int gi = d * (P / F) + o / F;
        if (pt.kind == KIVI_KIND_UNIFORM) {
          kv_un_group(tile + d, D, F, pt.bits, (uint32_t *)(base + pt.codes) + gi, words);
        } else if (pt.bits == 2) {
          kv_cb_group<4>(tile + d, D, F, pt.fit, pt.iters, (uint16_t *)(base + pt.codes) + gi * 4, words);
        } else {
          kv_cb_group<16>(tile + d, D, F, pt.fit, pt.iters, (uint16_t *)(base + pt.codes) + gi * 16, words);
        }
      }
    } else {
      /* values: one group per token and v_group channels; codes [P][D / cpw], params [P][D / Gv] */
      const int cpw = 32 / pt.bits, G = pt.group, gpr = D / G;
      for (int g = threadIdx.x; g < F * gpr; g += blockDim.x) {
        const int i = g / gpr, gg = g % gpr;
        const uint16_t *x = tile + i * D + gg * G;
        uint32_t *words = (uint32_t *)base + (int64_t)(o + i) * (D / cpw) + gg * (G / cpw);
        const int gi = (o + i) * gpr + gg;
        if (pt.kind == KIVI_KIND_UNIFORM) {
          kv_un_group(x, 1, G, pt.bits, (uint32_t *)(base + pt.codes) + gi, words);
        } else if (pt.bits == 2) {
          kv_cb_group<4>(x, 1, G, pt.fit, pt.iters, (uint16_t *)(base + pt.codes) + gi * 4, words);
        } else {
          kv_cb_group<16>(x, 1, G, pt.fit, pt.iters, (uint16_t *)(base + pt.codes) + gi * 16, words);
        }
      }
    }
    __syncthreads();
  }
}

/* ---------------------------------------------------------------- window write ----------- */

struct kv_winw_layer {
  int64_t len; /* before the append */
  int64_t r0;  /* first input row that stays in the window */
  int32_t layer, in_index;
};

struct kv_winw_params {
  uint16_t *kwin, *vwin; /* this sequence's windows */
  const void *k, *v;
  int64_t n;
  int32_t kvh, D, W, dtype;
  kv_winw_layer L[KV_FLUSH_MAXL];
};

static __global__ void __launch_bounds__(256) k_cache_window(const __grid_constant__ kv_winw_params p) {
  const kv_winw_layer L = p.L[blockIdx.y];
  const int64_t row = (int64_t)p.kvh * p.D;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t r = L.r0 + idx / row, e = idx % row;
  if (r >= p.n) return;
  const int64_t slot = (L.len + r) % p.W;
  const int64_t src = ((int64_t)L.in_index * p.n + r) * row + e;
  const int64_t dst = ((int64_t)L.layer * p.W + slot) * row + e;
  p.kwin[dst] = kv_in_half(p.k, p.dtype, src);
  p.vwin[dst] = kv_in_half(p.v, p.dtype, src);
}

/* ---------------------------------------------------------------- read kernel ------------ */

struct kv_read_params {
  const uint8_t *kpool, *vpool;  /* layer bases */
  const uint16_t *kwin, *vwin;   /* this sequence's window of the layer: [W][kv_heads][D] */
  const int32_t *table;
  void *k, *v;
  kv_part_dev kp, vp;
  kivi_cache_config cfg;
  int64_t len, qlen;
  int32_t kvh, D, P, W, dtype;
};

__device__ __forceinline__ void kv_store_any(void *out, kivi_dtype dt, int64_t i, float v) {
  if (dt == KIVI_F32) kv_st<KIVI_F32>(out, i, v);
  else if (dt == KIVI_F16) kv_st<KIVI_F16>(out, i, v);
  else kv_st<KIVI_BF16>(out, i, v);
}

static __global__ void __launch_bounds__(256) k_cache_read(const __grid_constant__ kv_read_params p) {
  const int part = blockIdx.y;
  const int64_t row = (int64_t)p.kvh * p.D;
  const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= p.len * row) return;
  const int64_t t = idx / row;
  const int h = (int)((idx % row) / p.D), d = (int)(idx % p.D);
  const kv_part_dev &pt = part ? p.vp : p.kp;
  float val;
  if (t < p.qlen) {
    const int64_t page = p.table[t / p.P];
    const int o = (int)(t % p.P);
    const uint8_t *base = (part ? p.vpool : p.kpool) + (uint64_t)page * pt.page + (uint64_t)h * pt.head;
    if (pt.bits == 16) {
      val = kv_hf(((const uint16_t *)base)[(int64_t)o * p.D + d]);
    } else {
      int32_t slot;
      const int64_t wi = kivi_page_code_at(&p.cfg, part, o, d, &slot);
      const uint32_t q = kivi_word_get(((const uint32_t *)base)[wi], slot, pt.bits);
      const uint16_t *par = (const uint16_t *)(base + pt.codes);
      if (pt.kind == KIVI_KIND_UNIFORM) {
        int64_t si, zi;
        kivi_page_uniform_at(&p.cfg, part, o, d, &si, &zi);
        val = kivi_uniform_value(q, kv_hf(par[zi]), kv_hf(par[si]));
      } else {
        val = kv_hf(par[kivi_page_centroid_at(&p.cfg, part, o, d, (int32_t)q)]);
      }
    }
  } else {
    const uint16_t *win = part ? p.vwin : p.kwin;
    val = kv_hf(win[((t % p.W) * p.kvh + h) * (int64_t)p.D + d]);
  }
  kv_store_any(part ? p.v : p.k, p.dtype, idx, val);
}

/* ---------------------------------------------------------------- host helpers ----------- */

static kv_part_dev part_dev(const kivi_cache_config *c, const kivi_part_layout &l, int is_value) {
  kv_part_dev d;
  d.codes = l.codes;
  d.head = l.head;
  d.page = l.page;
  d.bits = is_value ? c->v_bits : c->k_bits;
  d.kind = is_value ? c->v_kind : c->k_kind;
  d.group = is_value ? c->v_group : c->k_group;
  d.fit = is_value ? c->v_fit : c->k_fit;
  d.iters = is_value ? c->v_iters : c->k_iters;
  return d;
}

static kivi_status cache_enter(kivi_cache_t c, const char *op) {
  if (!c) return kv_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  return kv_enter(c->ctx, op);
}

static kivi_status check_seq(kivi_cache_t c, const char *op, int32_t seq) {
  if (seq < 0 || seq >= c->cfg.max_seqs)
    return kv_fail(c->ctx, KIVI_ERR_ARG, "%s: seq must be in 0..%d, got %d", op, (int)c->cfg.max_seqs - 1, (int)seq);
  if (!c->live[seq])
    return kv_fail(c->ctx, KIVI_ERR_STATE, "%s: sequence %d is not live (create it with kivi_cache_seq_create)", op,
                   (int)seq);
  return KIVI_OK;
}

static void cache_release(kivi_cache_t c) {
  if (c->kpool) cudaFree(c->kpool);
  if (c->vpool) cudaFree(c->vpool);
  if (c->kwin) cudaFree(c->kwin);
  if (c->vwin) cudaFree(c->vwin);
  if (c->d_table) cudaFree(c->d_table);
  if (c->ws) cudaFree(c->ws);
  (void)cudaGetLastError();
  free(c->live);
  free(c->gen);
  free(c->table);
  free(c->npages);
  free(c->len);
  free(c->qlen);
  free(c->free_pages);
  free(c);
}

static const char *cfg_name(int i) {
  static const char *names[KIVI_CFG_FIELDS] = {
      "KIVI_CFG_LAYERS (layers)",       "KIVI_CFG_KV_HEADS (kv_heads)",   "KIVI_CFG_Q_HEADS (q_heads)",
      "KIVI_CFG_HEAD_DIM (head_dim)",   "KIVI_CFG_PAGE_TOKENS (page_tokens)", "KIVI_CFG_RESIDUAL (residual)",
      "KIVI_CFG_MAX_PAGES (max_pages)", "KIVI_CFG_MAX_SEQS (max_seqs)",   "KIVI_CFG_K_KIND (k_kind)",
      "KIVI_CFG_K_BITS (k_bits)",       "KIVI_CFG_K_GROUP (k_group)",     "KIVI_CFG_K_FIT (k_fit)",
      "KIVI_CFG_K_ITERS (k_iters)",     "KIVI_CFG_V_KIND (v_kind)",       "KIVI_CFG_V_BITS (v_bits)",
      "KIVI_CFG_V_GROUP (v_group)",     "KIVI_CFG_V_FIT (v_fit)",         "KIVI_CFG_V_ITERS (v_iters)"};
  return names[i];
}

/* config[i] has a bad value: "kivi_cache_create: config[KIVI_CFG_X] (x) must be <what>, got <v>" */
static kivi_status cfg_fail(kivi_ctx_t ctx, int i, const char *what, int32_t v) {
  char name[64];
  snprintf(name, sizeof name, "%s", cfg_name(i));
  char *sp = strchr(name, ' ');
  if (sp) *sp = '\0';
  return kv_fail(ctx, KIVI_ERR_ARG, "kivi_cache_create: config[%s] %s must be %s, got %d", name,
                 strchr(cfg_name(i), '('), what, (int)v);
}

static kivi_status validate_config(kivi_ctx_t ctx, const int32_t *a) {
  /* the CPU build's checks, in its order */
  const int32_t KVH = a[KIVI_CFG_KV_HEADS], QH = a[KIVI_CFG_Q_HEADS];
  const int32_t D = a[KIVI_CFG_HEAD_DIM], P = a[KIVI_CFG_PAGE_TOKENS], KG = a[KIVI_CFG_K_GROUP];
  char w[96];
  if (a[KIVI_CFG_LAYERS] < 1) return cfg_fail(ctx, KIVI_CFG_LAYERS, ">= 1", a[KIVI_CFG_LAYERS]);
  if (KVH < 1) return cfg_fail(ctx, KIVI_CFG_KV_HEADS, ">= 1", KVH);
  if (QH < KVH || QH % KVH || QH / KVH > 32) {
    snprintf(w, sizeof w, "a multiple of kv_heads (%d) at most 32 times it", (int)KVH);
    return cfg_fail(ctx, KIVI_CFG_Q_HEADS, w, QH);
  }
  if (D != 64 && D != 128 && D != 256) return cfg_fail(ctx, KIVI_CFG_HEAD_DIM, "64, 128 or 256", D);
  if (!kivi_valid_group(KG)) return cfg_fail(ctx, KIVI_CFG_K_GROUP, "32, 64 or 128", KG);
  if (P != 32 && P != 64 && P != 128 && P != 256) return cfg_fail(ctx, KIVI_CFG_PAGE_TOKENS, "32, 64, 128 or 256", P);
  if (P % KG) {
    snprintf(w, sizeof w, "a multiple of k_group (%d)", (int)KG);
    return cfg_fail(ctx, KIVI_CFG_PAGE_TOKENS, w, P);
  }
  if (a[KIVI_CFG_RESIDUAL] < 0 || a[KIVI_CFG_RESIDUAL] % KG) {
    snprintf(w, sizeof w, ">= 0 and a multiple of k_group (%d)", (int)KG);
    return cfg_fail(ctx, KIVI_CFG_RESIDUAL, w, a[KIVI_CFG_RESIDUAL]);
  }
  if (a[KIVI_CFG_MAX_PAGES] < 1) return cfg_fail(ctx, KIVI_CFG_MAX_PAGES, ">= 1", a[KIVI_CFG_MAX_PAGES]);
  if (a[KIVI_CFG_MAX_SEQS] < 1) return cfg_fail(ctx, KIVI_CFG_MAX_SEQS, ">= 1", a[KIVI_CFG_MAX_SEQS]);
  for (int part = 0; part < 2; part++) {
    const int o = part ? KIVI_CFG_V_KIND - KIVI_CFG_K_KIND : 0;
    const int32_t kind = a[KIVI_CFG_K_KIND + o], bits = a[KIVI_CFG_K_BITS + o];
    if (kind != KIVI_KIND_UNIFORM && kind != KIVI_KIND_CODEBOOK)
      return cfg_fail(ctx, KIVI_CFG_K_KIND + o, "KIVI_KIND_UNIFORM (0) or KIVI_KIND_CODEBOOK (1)", kind);
    if (bits != 2 && bits != 4 && bits != 16) return cfg_fail(ctx, KIVI_CFG_K_BITS + o, "2, 4 or 16", bits);
    if (part && !kivi_valid_group(a[KIVI_CFG_V_GROUP]))
      return cfg_fail(ctx, KIVI_CFG_V_GROUP, "32, 64 or 128", a[KIVI_CFG_V_GROUP]);
    if (part && D % a[KIVI_CFG_V_GROUP]) {
      snprintf(w, sizeof w, "a divisor of head_dim (%d)", (int)D);
      return cfg_fail(ctx, KIVI_CFG_V_GROUP, w, a[KIVI_CFG_V_GROUP]);
    }
    if (a[KIVI_CFG_K_FIT + o] != KIVI_FIT_FREE && a[KIVI_CFG_K_FIT + o] != KIVI_FIT_PINNED)
      return cfg_fail(ctx, KIVI_CFG_K_FIT + o, "KIVI_FIT_FREE (0) or KIVI_FIT_PINNED (1)", a[KIVI_CFG_K_FIT + o]);
    if (a[KIVI_CFG_K_ITERS + o] < 1 || a[KIVI_CFG_K_ITERS + o] > KIVI_MAX_ITERS)
      return cfg_fail(ctx, KIVI_CFG_K_ITERS + o, "in 1..256", a[KIVI_CFG_K_ITERS + o]);
  }
  return KIVI_OK;
}

/* ---------------------------------------------------------------- exports ---------------- */

extern "C" {

KIVI_API kivi_status kivi_cache_create(kivi_ctx_t ctx, const int32_t *config, int32_t n_fields, kivi_cache_t *out) {
  static const char *op = "kivi_cache_create";
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (!config) return kv_fail(ctx, KIVI_ERR_ARG, "%s: config must not be NULL", op);
  if (!out) return kv_fail(ctx, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  if (n_fields != KIVI_CFG_FIELDS)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: n_fields must be KIVI_CFG_FIELDS (%d), got %d", op, (int)KIVI_CFG_FIELDS,
                   (int)n_fields);
  if ((st = validate_config(ctx, config))) return st;

  kivi_cache_t c = (kivi_cache_t)calloc(1, sizeof *c);
  if (!c) return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate %zu bytes", op, sizeof *c);
  c->ctx = ctx;
  memcpy(&c->cfg, config, sizeof c->cfg);
  const kivi_cache_config &g = c->cfg;
  c->kp = kivi_page_part(&g, 0);
  c->vp = kivi_page_part(&g, 1);
  c->F = kivi_flush_tokens(&g);
  c->W = kivi_window_tokens(&g);
  c->P = g.page_tokens;
  c->D = g.head_dim;
  const size_t S = (size_t)g.max_seqs, L = (size_t)g.layers, MP = (size_t)g.max_pages;
  c->live = (uint8_t *)calloc(S, 1);
  c->gen = (uint32_t *)calloc(S, sizeof(uint32_t));
  c->table = (int32_t *)calloc(S * MP, sizeof(int32_t));
  c->npages = (int32_t *)calloc(S, sizeof(int32_t));
  c->len = (int64_t *)calloc(S * L, sizeof(int64_t));
  c->qlen = (int64_t *)calloc(S * L, sizeof(int64_t));
  c->free_pages = (int32_t *)malloc(MP * sizeof(int32_t));
  if (!c->live || !c->gen || !c->table || !c->npages || !c->len || !c->qlen || !c->free_pages) {
    cache_release(c);
    return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the host metadata (%zu sequences x %zu pages)", op, S,
                   MP);
  }
  /* pops hand out page 0, 1, 2, ... on a fresh cache */
  for (size_t i = 0; i < MP; i++) c->free_pages[i] = (int32_t)(MP - 1 - i);
  c->nfree = (int32_t)MP;

  const uint64_t kbytes = (uint64_t)L * MP * c->kp.page, vbytes = (uint64_t)L * MP * c->vp.page;
  const uint64_t wbytes = (uint64_t)S * L * (uint64_t)c->W * (uint64_t)g.kv_heads * (uint64_t)g.head_dim * 2u;
  const uint64_t tbytes = (uint64_t)S * MP * 4u;
  struct {
    void **p;
    uint64_t bytes;
    const char *what;
  } allocs[5] = {{(void **)&c->kpool, kbytes, "the K page pool"},
                 {(void **)&c->vpool, vbytes, "the V page pool"},
                 {(void **)&c->kwin, wbytes, "the K residual windows"},
                 {(void **)&c->vwin, wbytes, "the V residual windows"},
                 {(void **)&c->d_table, tbytes, "the block tables"}};
  for (int i = 0; i < 5; i++) {
    cudaError_t e = cudaMalloc(allocs[i].p, (size_t)(allocs[i].bytes ? allocs[i].bytes : 16));
    if (e != cudaSuccess) {
      char what[160];
      snprintf(what, sizeof what, "cudaMalloc of %llu bytes for %s", (unsigned long long)allocs[i].bytes,
               allocs[i].what);
      st = kv_cuda(ctx, e, op, what);
      cache_release(c);
      return st;
    }
    /* zeroed once: pages never written hold finite params, so masked tokens cannot poison a sum */
    if ((st = kv_cuda(ctx, cudaMemsetAsync(*allocs[i].p, 0, (size_t)allocs[i].bytes, ctx->stream), op,
                      "cudaMemsetAsync"))) {
      cache_release(c);
      return st;
    }
  }
  c->pool_bytes = kbytes + vbytes + 2 * wbytes;
  if ((st = kv_cuda(ctx, cudaStreamSynchronize(ctx->stream), op, "cudaStreamSynchronize"))) {
    cache_release(c);
    return st;
  }
  *out = c;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_destroy(kivi_cache_t cache) {
  if (!cache) return KIVI_OK;
  kivi_ctx_t ctx = cache->ctx;
  if (ctx && cudaSetDevice(ctx->device) == cudaSuccess && !ctx->sticky) (void)cudaStreamSynchronize(ctx->stream);
  cache_release(cache);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_create(kivi_cache_t cache, int32_t *seq) {
  static const char *op = "kivi_cache_seq_create";
  kivi_status st = cache_enter(cache, op);
  if (st) return st;
  if (!seq) return kv_fail(cache->ctx, KIVI_ERR_ARG, "%s: seq must not be NULL", op);
  for (int32_t s = 0; s < cache->cfg.max_seqs; s++) {
    if (cache->live[s]) continue;
    cache->live[s] = 1;
    cache->npages[s] = 0;
    for (int32_t l = 0; l < cache->cfg.layers; l++) {
      cache->len[(int64_t)s * cache->cfg.layers + l] = 0;
      cache->qlen[(int64_t)s * cache->cfg.layers + l] = 0;
    }
    *seq = s;
    return KIVI_OK;
  }
  return kv_fail(cache->ctx, KIVI_ERR_CAPACITY, "%s: all %d sequence slots are taken (free one with kivi_cache_seq_free)",
                 op, (int)cache->cfg.max_seqs);
}

KIVI_API kivi_status kivi_cache_seq_free(kivi_cache_t cache, int32_t seq) {
  static const char *op = "kivi_cache_seq_free";
  kivi_status st = cache_enter(cache, op);
  if (st) return st;
  if ((st = check_seq(cache, op, seq))) return st;
  const int32_t *row = cache->table + (int64_t)seq * cache->cfg.max_pages;
  /* last page first, so the next pops return the pages in their old order (as the CPU build) */
  for (int32_t i = cache->npages[seq] - 1; i >= 0; i--) cache->free_pages[cache->nfree++] = row[i];
  cache->npages[seq] = 0;
  cache->live[seq] = 0;
  cache->gen[seq]++;
  for (int32_t l = 0; l < cache->cfg.layers; l++) {
    cache->len[(int64_t)seq * cache->cfg.layers + l] = 0;
    cache->qlen[(int64_t)seq * cache->cfg.layers + l] = 0;
  }
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_length(kivi_cache_t cache, int32_t seq, int32_t layer, int64_t *length,
                                           int64_t *quantized) {
  static const char *op = "kivi_cache_seq_length";
  kivi_status st = cache_enter(cache, op);
  if (st) return st;
  if (!length) return kv_fail(cache->ctx, KIVI_ERR_ARG, "%s: length must not be NULL", op);
  if (!quantized) return kv_fail(cache->ctx, KIVI_ERR_ARG, "%s: quantized must not be NULL", op);
  if ((st = check_seq(cache, op, seq))) return st;
  if (layer < 0 || layer >= cache->cfg.layers)
    return kv_fail(cache->ctx, KIVI_ERR_ARG, "%s: layer must be in 0..%d, got %d", op, (int)cache->cfg.layers - 1,
                   (int)layer);
  *length = cache->len[(int64_t)seq * cache->cfg.layers + layer];
  *quantized = cache->qlen[(int64_t)seq * cache->cfg.layers + layer];
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_seq_pages(kivi_cache_t cache, int32_t seq, int32_t *pages, int32_t cap,
                                          int32_t *count) {
  static const char *op = "kivi_cache_seq_pages";
  kivi_status st = cache_enter(cache, op);
  if (st) return st;
  if (!count) return kv_fail(cache->ctx, KIVI_ERR_ARG, "%s: count must not be NULL", op);
  if (cap < 0) return kv_fail(cache->ctx, KIVI_ERR_ARG, "%s: cap must be >= 0, got %d", op, (int)cap);
  if (cap > 0 && !pages) return kv_fail(cache->ctx, KIVI_ERR_ARG, "%s: pages must not be NULL when cap > 0", op);
  if ((st = check_seq(cache, op, seq))) return st;
  const int32_t n = cache->npages[seq];
  const int32_t m = n < cap ? n : cap;
  if (m > 0) memcpy(pages, cache->table + (int64_t)seq * cache->cfg.max_pages, (size_t)m * sizeof(int32_t));
  *count = n;
  return KIVI_OK;
}

KIVI_API kivi_status kivi_cache_append(kivi_cache_t cache, int32_t seq, int32_t layer, const void *k, const void *v,
                                       kivi_dtype dtype, int32_t n_tokens, int32_t flags) {
  static const char *op = "kivi_cache_append";
  kivi_status st = cache_enter(cache, op);
  if (st) return st;
  kivi_cache_t c = cache;
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  if ((st = check_seq(c, op, seq))) return st;
  if (layer < -1 || layer >= g.layers)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: layer must be -1 (all) or in 0..%d, got %d", op, (int)g.layers - 1,
                   (int)layer);
  if (n_tokens < 1) return kv_fail(ctx, KIVI_ERR_ARG, "%s: n_tokens must be >= 1, got %d", op, (int)n_tokens);
  if (!k) return kv_fail(ctx, KIVI_ERR_ARG, "%s: k must not be NULL", op);
  if (!v) return kv_fail(ctx, KIVI_ERR_ARG, "%s: v must not be NULL", op);
  if (dtype != KIVI_F32 && dtype != KIVI_F16 && dtype != KIVI_BF16)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                   (int)dtype);
  if (flags & ~(int32_t)KIVI_FLAG_TRUSTED)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: flags must be 0 or KIVI_FLAG_TRUSTED (1), got %d", op, (int)flags);

  const int32_t l0 = layer < 0 ? 0 : layer, nl = layer < 0 ? g.layers : 1;
  const int64_t n = n_tokens, row = (int64_t)g.kv_heads * g.head_dim, total = (int64_t)nl * n * row;

  if (!(flags & KIVI_FLAG_TRUSTED)) {
    for (int part = 0; part < 2; part++) {
      const void *x = part ? v : k;
      int64_t bad;
      if ((st = kv_cache_scan(ctx, op, x, dtype, total, true, KV_SLOT_NONFINITE, &bad))) return st;
      if (bad >= 0) {
        const int64_t li = bad / (n * row), r = (bad / row) % n, e = bad % row;
        char buf[32];
        return kv_fail(ctx, KIVI_ERR_NONFINITE,
                       "%s: %s must be finite and within the fp16 range (|x| < 65520) that the cache stores, got %s "
                       "at layer %d, token %lld, head %d, channel %d; pass KIVI_FLAG_TRUSTED only for data known to "
                       "be finite",
                       op, part ? "v" : "k", kv_cache_bad_name(ctx, x, dtype, bad, buf), (int)(l0 + li), (long long)r,
                       (int)(e / g.head_dim), (int)(e % g.head_dim));
      }
    }
  }

  const int64_t extra = kv_append_extra(c, seq, l0, nl, n);
  if (extra > c->nfree)
    return kv_fail(ctx, KIVI_ERR_CAPACITY,
                   "%s: the page pool is full: sequence %d needs %lld more pages of %d tokens, %d of %d are free", op,
                   (int)seq, (long long)extra, (int)g.page_tokens, (int)c->nfree, (int)g.max_pages);

  /* pages (uploaded from the host table), then the flush and window launches, then the host state */
  const int32_t have = c->npages[seq];
  kv_append_pages(c, seq, extra, 0);
  int32_t *trow = c->table + (int64_t)seq * g.max_pages;
  int32_t *d_row = c->d_table + (int64_t)seq * g.max_pages;
  if (extra > 0 && (st = kv_cuda(ctx,
                                 cudaMemcpyAsync((void *)(d_row + have), trow + have, (size_t)extra * sizeof(int32_t),
                                                 cudaMemcpyHostToDevice, ctx->stream),
                                 op, "cudaMemcpyAsync (block table)")))
    return st;
  if ((st = kv_append_flush(c, op, seq, l0, nl, k, v, dtype, n)) || (st = kv_append_window(c, op, seq, l0, nl, k, v, dtype, n)))
    return st;
  kv_append_commit(c, seq, l0, nl, n, extra);
  return KIVI_OK;
}

} /* extern "C" */

int64_t kv_append_extra(const kivi_cache *c, int32_t seq, int32_t l0, int32_t nl, int64_t n) {
  const kivi_cache_config &g = c->cfg;
  const int64_t *lens = c->len + (int64_t)seq * g.layers, *qlens = c->qlen + (int64_t)seq * g.layers;
  int64_t need_tokens = 0;
  for (int32_t i = 0; i < nl; i++) {
    const int64_t f = kivi_flush_count(&g, lens[l0 + i], qlens[l0 + i], n);
    need_tokens = qlens[l0 + i] + f > need_tokens ? qlens[l0 + i] + f : need_tokens;
  }
  const int64_t need_pages = (need_tokens + c->P - 1) / c->P;
  return need_pages > c->npages[seq] ? need_pages - c->npages[seq] : 0;
}

void kv_append_pages(kivi_cache *c, int32_t seq, int64_t extra, int64_t skip) {
  int32_t *trow = c->table + (int64_t)seq * c->cfg.max_pages;
  const int32_t have = c->npages[seq];
  for (int64_t i = 0; i < extra; i++) trow[have + i] = c->free_pages[c->nfree - 1 - skip - i];
}

kivi_status kv_append_flush(kivi_cache *c, const char *op, int32_t seq, int32_t l0, int32_t nl, const void *k,
                            const void *v, kivi_dtype dtype, int64_t n) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  const int64_t F = c->F, W = c->W, row = (int64_t)g.kv_heads * g.head_dim;
  const int64_t *lens = c->len + (int64_t)seq * g.layers, *qlens = c->qlen + (int64_t)seq * g.layers;
  int64_t max_groups = 0;
  for (int32_t i = 0; i < nl; i++) {
    const int64_t f = kivi_flush_count(&g, lens[l0 + i], qlens[l0 + i], n);
    max_groups = f / F > max_groups ? f / F : max_groups;
  }
  if (max_groups == 0) return KIVI_OK;
  kivi_status st = KIVI_OK;
  const uint64_t seq_win = (uint64_t)seq * g.layers * (uint64_t)W * (uint64_t)row;
  const int mma = kivi_cache_mma_layout(&g);
  const int64_t vgroups = F * (g.head_dim / g.v_group);
  const int32_t nparam = mma ? (int32_t)(vgroups > g.head_dim ? vgroups : g.head_dim) : 0;
  const size_t smem = (size_t)F * g.head_dim * 2 + (size_t)nparam * 2 * sizeof(float);
  if (smem > 48 * 1024 &&
      (st = kv_cuda(ctx, cudaFuncSetAttribute(k_cache_flush, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                    op, "cudaFuncSetAttribute (k_cache_flush)")))
    return st;
  kv_flush_params *fp = (kv_flush_params *)calloc(1, sizeof(kv_flush_params));
  if (!fp) return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the launch parameters", op);
  fp->kpool = c->kpool;
  fp->vpool = c->vpool;
  fp->kwin = c->kwin + seq_win;
  fp->vwin = c->vwin + seq_win;
  fp->k = k;
  fp->v = v;
  fp->table = c->d_table + (int64_t)seq * g.max_pages;
  fp->layer_stride_k = (uint64_t)g.max_pages * c->kp.page;
  fp->layer_stride_v = (uint64_t)g.max_pages * c->vp.page;
  fp->kp = part_dev(&g, c->kp, 0);
  fp->vp = part_dev(&g, c->vp, 1);
  fp->n = n;
  fp->kvh = g.kv_heads;
  fp->D = g.head_dim;
  fp->P = g.page_tokens;
  fp->F = (int32_t)F;
  fp->W = (int32_t)W;
  fp->dtype = dtype;
  fp->mma = mma;
  fp->nparam = nparam;
  for (int32_t b0 = 0; b0 < nl && !st; b0 += KV_FLUSH_MAXL) {
    const int32_t cnt = nl - b0 < KV_FLUSH_MAXL ? nl - b0 : KV_FLUSH_MAXL;
    int64_t mg = 0;
    for (int32_t i = 0; i < cnt; i++) {
      const int32_t li = b0 + i;
      const int64_t len = lens[l0 + li], ql = qlens[l0 + li];
      const int64_t f = kivi_flush_count(&g, len, ql, n);
      fp->L[i].qlen = ql;
      fp->L[i].len = len;
      fp->L[i].nflush = (int32_t)(f / F);
      fp->L[i].layer = l0 + li;
      fp->L[i].in_index = li;
      mg = f / F > mg ? f / F : mg;
    }
    if (mg == 0) continue;
    dim3 grid((unsigned)mg, (unsigned)cnt, (unsigned)g.kv_heads);
    k_cache_flush<<<grid, 256, smem, ctx->stream>>>(*fp);
    st = kv_launched(ctx, op, "k_cache_flush");
  }
  free(fp);
  return st;
}

kivi_status kv_append_window(kivi_cache *c, const char *op, int32_t seq, int32_t l0, int32_t nl, const void *k,
                             const void *v, kivi_dtype dtype, int64_t n) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  const int64_t W = c->W, row = (int64_t)g.kv_heads * g.head_dim;
  const int64_t *lens = c->len + (int64_t)seq * g.layers, *qlens = c->qlen + (int64_t)seq * g.layers;
  const uint64_t seq_win = (uint64_t)seq * g.layers * (uint64_t)W * (uint64_t)row;
  kivi_status st = KIVI_OK;
  kv_winw_params *wp = (kv_winw_params *)calloc(1, sizeof(kv_winw_params));
  if (!wp) return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the launch parameters", op);
  wp->kwin = c->kwin + seq_win;
  wp->vwin = c->vwin + seq_win;
  wp->k = k;
  wp->v = v;
  wp->n = n;
  wp->kvh = g.kv_heads;
  wp->D = g.head_dim;
  wp->W = (int32_t)W;
  wp->dtype = dtype;
  for (int32_t b0 = 0; b0 < nl && !st; b0 += KV_FLUSH_MAXL) {
    const int32_t cnt = nl - b0 < KV_FLUSH_MAXL ? nl - b0 : KV_FLUSH_MAXL;
    int64_t maxrows = 0;
    for (int32_t i = 0; i < cnt; i++) {
      const int32_t li = b0 + i;
      const int64_t len = lens[l0 + li], ql = qlens[l0 + li];
      const int64_t f = kivi_flush_count(&g, len, ql, n);
      const int64_t r0 = ql + f - len > 0 ? ql + f - len : 0;
      wp->L[i].len = len;
      wp->L[i].r0 = r0;
      wp->L[i].layer = l0 + li;
      wp->L[i].in_index = li;
      maxrows = n - r0 > maxrows ? n - r0 : maxrows;
    }
    if (maxrows == 0) continue;
    const int64_t work = maxrows * row;
    dim3 grid((unsigned)((work + 255) / 256), (unsigned)cnt);
    k_cache_window<<<grid, 256, 0, ctx->stream>>>(*wp);
    st = kv_launched(ctx, op, "k_cache_window");
  }
  free(wp);
  return st;
}

void kv_append_commit(kivi_cache *c, int32_t seq, int32_t l0, int32_t nl, int64_t n, int64_t extra) {
  const kivi_cache_config &g = c->cfg;
  int64_t *lens = c->len + (int64_t)seq * g.layers, *qlens = c->qlen + (int64_t)seq * g.layers;
  c->nfree -= (int32_t)extra;
  c->npages[seq] += (int32_t)extra;
  for (int32_t i = 0; i < nl; i++) {
    const int64_t len = lens[l0 + i], ql = qlens[l0 + i];
    const int64_t f = kivi_flush_count(&g, len, ql, n);
    lens[l0 + i] = len + n;
    qlens[l0 + i] = ql + f;
  }
}

extern "C" {

KIVI_API kivi_status kivi_cache_read(kivi_cache_t cache, int32_t seq, int32_t layer, void *k, void *v,
                                     kivi_dtype dtype) {
  static const char *op = "kivi_cache_read";
  kivi_status st = cache_enter(cache, op);
  if (st) return st;
  kivi_cache_t c = cache;
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  if ((st = check_seq(c, op, seq))) return st;
  if (layer < 0 || layer >= g.layers)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: layer must be in 0..%d, got %d", op, (int)g.layers - 1, (int)layer);
  if (!k) return kv_fail(ctx, KIVI_ERR_ARG, "%s: k must not be NULL", op);
  if (!v) return kv_fail(ctx, KIVI_ERR_ARG, "%s: v must not be NULL", op);
  if (dtype != KIVI_F32 && dtype != KIVI_F16 && dtype != KIVI_BF16)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                   (int)dtype);
  const int64_t len = c->len[(int64_t)seq * g.layers + layer];
  if (len == 0) return KIVI_OK;
  kv_read_params p;
  memset(&p, 0, sizeof p);
  p.kpool = c->kpool + (uint64_t)layer * g.max_pages * c->kp.page;
  p.vpool = c->vpool + (uint64_t)layer * g.max_pages * c->vp.page;
  const uint64_t row = (uint64_t)g.kv_heads * g.head_dim;
  const uint64_t wofs = ((uint64_t)seq * g.layers + layer) * (uint64_t)c->W * row;
  p.kwin = c->kwin + wofs;
  p.vwin = c->vwin + wofs;
  p.table = c->d_table + (int64_t)seq * g.max_pages;
  p.k = k;
  p.v = v;
  p.kp = part_dev(&g, c->kp, 0);
  p.vp = part_dev(&g, c->vp, 1);
  p.cfg = g;
  p.len = len;
  p.qlen = c->qlen[(int64_t)seq * g.layers + layer];
  p.kvh = g.kv_heads;
  p.D = g.head_dim;
  p.P = g.page_tokens;
  p.W = c->W;
  p.dtype = dtype;
  const int64_t work = len * (int64_t)row;
  dim3 grid((unsigned)((work + 255) / 256), 2);
  k_cache_read<<<grid, 256, 0, ctx->stream>>>(p);
  return kv_launched(ctx, op, "k_cache_read");
}

KIVI_API kivi_status kivi_cache_memory(kivi_cache_t cache, uint64_t *report, int32_t n_fields) {
  static const char *op = "kivi_cache_memory";
  kivi_status st = cache_enter(cache, op);
  if (st) return st;
  kivi_cache_t c = cache;
  const kivi_cache_config &g = c->cfg;
  if (!report) return kv_fail(c->ctx, KIVI_ERR_ARG, "%s: report must not be NULL", op);
  if (n_fields < 1) return kv_fail(c->ctx, KIVI_ERR_ARG, "%s: n_fields must be >= 1, got %d", op, (int)n_fields);
  const uint64_t used = (uint64_t)(g.max_pages - c->nfree);
  const uint64_t blocks = used * (uint64_t)g.layers * (uint64_t)g.kv_heads;
  uint64_t resid = 0, tokens = 0, qtok = 0;
  for (int32_t s = 0; s < g.max_seqs; s++) {
    if (!c->live[s]) continue;
    for (int32_t l = 0; l < g.layers; l++) {
      const int64_t len = c->len[(int64_t)s * g.layers + l], ql = c->qlen[(int64_t)s * g.layers + l];
      resid += (uint64_t)(len - ql) * (uint64_t)g.kv_heads * (uint64_t)g.head_dim * 4u;
      tokens += (uint64_t)len;
      qtok += (uint64_t)ql;
    }
  }
  uint64_t r[KIVI_MEM_FIELDS];
  r[KIVI_MEM_CODE_BYTES] = blocks * (c->kp.codes + c->vp.codes);
  r[KIVI_MEM_PARAM_BYTES] = blocks * (c->kp.params + c->vp.params);
  r[KIVI_MEM_RESIDUAL_BYTES] = resid;
  r[KIVI_MEM_TABLE_BYTES] = (uint64_t)g.max_seqs * ((uint64_t)g.max_pages * 4u + (uint64_t)g.layers * 16u + 8u);
  r[KIVI_MEM_POOL_BYTES] = c->pool_bytes;
  r[KIVI_MEM_PAGES_USED] = used;
  r[KIVI_MEM_PAGES_TOTAL] = (uint64_t)g.max_pages;
  r[KIVI_MEM_TOKENS] = tokens;
  r[KIVI_MEM_QUANTIZED_TOKENS] = qtok;
  const int32_t m = n_fields < KIVI_MEM_FIELDS ? n_fields : KIVI_MEM_FIELDS;
  memcpy(report, r, sizeof(uint64_t) * (size_t)m);
  return KIVI_OK;
}

} /* extern "C" */
