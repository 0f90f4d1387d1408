/*
 * cache_append.cu — kivi_cache_append on the device: the NaN scan, the host plan, one flush launch
 * that quantizes every flushed group of every layer into its page, one launch that writes the rest
 * into the fp16 residual windows; the steps are shared with kivi_batch_append (batch.cu).
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

#include "cache_page.cuh"

#define KV_FLUSH_MAXL 128 /* layers per flush / window launch (more: several launches) */

/* ---------------------------------------------------------------- flush device work ------ */

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
  int32_t seq, layer, in_index;
};

/* Launch parameters of NL entries: a few for an append to one layer or a small batch (a launch copies
   its whole parameter block), KV_FLUSH_MAXL otherwise. */
template <int NL>
struct kv_flush_params {
  uint8_t *kpool, *vpool;
  const uint16_t *kwin, *vwin;             /* the cache's windows: [seqs][layers][W][kv_heads][D] */
  const void *k, *v;                       /* [in_index][n][kv_heads][D] */
  const int32_t *table;                    /* the device block tables [seqs][max_pages] */
  uint64_t layer_stride_k, layer_stride_v; /* max_pages * page bytes */
  int32_t layer0;                          /* the layer kpool / vpool start at (layers of one format) */
  kv_part_dev kp, vp;
  int64_t n;
  int32_t kvh, D, P, F, W, dtype, layers, max_pages;
  int32_t mma, nparam; /* tensor-core layout; floats of each of the two param arrays in shared memory */
  kv_flush_layer L[NL];
};

template <int NL>
static __global__ void __launch_bounds__(256) k_cache_flush(const __grid_constant__ kv_flush_params<NL> p) {
  extern __shared__ uint16_t tile[]; /* [F][D] fp16 bits */
  const kv_flush_layer L = p.L[blockIdx.y];
  const int j = blockIdx.x, h = blockIdx.z;
  if (j >= L.nflush) return;
  const int D = p.D, F = p.F, P = p.P;
  const int64_t pos = L.qlen + (int64_t)j * F;
  const int64_t page = p.table[(int64_t)L.seq * p.max_pages + pos / P];
  const int o = (int)(pos % P);
  for (int part = 0; part < 2; part++) {
    const kv_part_dev &pt = part ? p.vp : p.kp;
    const uint16_t *win = (part ? p.vwin : p.kwin) + ((int64_t)L.seq * p.layers + L.layer) * p.W * p.kvh * D;
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
    uint8_t *base = (part ? p.vpool : p.kpool) +
                    (uint64_t)(L.layer - p.layer0) * (part ? p.layer_stride_v : p.layer_stride_k) +
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

template <int NL>
struct kv_winw_params {
  uint16_t *kwin, *vwin; /* this sequence's windows */
  const void *k, *v;
  int64_t n;
  int32_t kvh, D, W, dtype;
  kv_winw_layer L[NL];
};

template <int NL>
static __global__ void __launch_bounds__(256) k_cache_window(const __grid_constant__ kv_winw_params<NL> p) {
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

/* ---------------------------------------------------------------- append ----------------- */

extern "C" {

KIVI_API kivi_status kivi_cache_append(kivi_cache_t c, int32_t seq, int32_t layer, const void *k, const void *v,
                                       kivi_dtype dtype, int32_t n_tokens, int32_t flags) {
  static const char *op = "kivi_cache_append";
  kivi_status st = kv_cache_io_enter(c, op, seq, 1, layer, n_tokens, k, v, dtype, flags);
  if (st) return st;
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;

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
  if (extra > 0 && (st = kv_upload(ctx, op, d_row + have, trow + have, (size_t)extra * sizeof(int32_t),
                                   "cudaMemcpyAsync (block table)")))
    return st;
  if ((st = kv_append_flush(c, op, seq, l0, nl, k, v, dtype, n)) ||
      (st = kv_append_window(c, op, seq, l0, nl, k, v, dtype, n)))
    return st;
  kv_append_commit(c, seq, l0, nl, n, extra);
  return KIVI_OK;
}

} /* extern "C" */

int64_t kv_append_extra(const kivi_cache *c, int32_t seq, int32_t l0, int32_t nl, int64_t n) {
  const int64_t at = (int64_t)seq * c->cfg.layers;
  return kivi_pages_needed(&c->cfg, c->npages[seq], c->len + at, c->qlen + at, 1, l0, l0 + nl, n);
}

void kv_append_pages(kivi_cache *c, int32_t seq, int64_t extra, int64_t skip) {
  int32_t *trow = c->table + (int64_t)seq * c->cfg.max_pages;
  const int32_t have = c->npages[seq];
  for (int64_t i = 0; i < extra; i++) trow[have + i] = c->free_pages[c->nfree - 1 - skip - i];
}

/* Layer l0 + li of an append of n tokens to seq: its lengths before it and the tokens it flushes. */
struct kv_layer_plan {
  int64_t len, qlen, flush;
};
static kv_layer_plan layer_plan(const kivi_cache *c, int32_t seq, int32_t l0, int32_t li, int64_t n) {
  const int64_t at = (int64_t)seq * c->cfg.layers + l0 + li;
  const int64_t len = c->len[at], ql = c->qlen[at];
  return {len, ql, kivi_flush_count(&c->cfg, len, ql, n)};
}

/* The flushes of cnt entries with a parameter block of NL entries (several launches when more flush).
   The entries' layers are of one format and laid out one after the other from e[0].layer, the lowest
   (a stretch of layers of one sequence, or one layer of several sequences). */
template <int NL>
static kivi_status flush_launch(kivi_cache *c, const char *op, const kv_flush_entry *e, int32_t cnt, const void *k,
                                const void *v, kivi_dtype dtype, int64_t n) {
  kivi_ctx_t ctx = c->ctx;
  const int32_t r0 = e[0].layer;
  const kivi_layer_layout &ly = c->lay[r0];
  const kivi_cache_config &g = ly.cfg;
  const int64_t F = c->F;
  const int mma = kivi_cache_mma_layout(&g);
  const int64_t vgroups = F * (g.head_dim / g.v_group);
  const int32_t nparam = mma ? (int32_t)(vgroups > g.head_dim ? vgroups : g.head_dim) : 0;
  const size_t smem = (size_t)F * g.head_dim * 2 + (size_t)nparam * 2 * sizeof(float);
  kivi_status st = KIVI_OK;
  if (smem > 48 * 1024 &&
      (st =
           kv_cuda(ctx, cudaFuncSetAttribute(k_cache_flush<NL>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                   op, "cudaFuncSetAttribute (k_cache_flush)")))
    return st;
  /* a small block on the stack; the large one (4 KB) from the heap */
  kv_flush_params<NL> small, *fp = NL <= 8 ? &small : (kv_flush_params<NL> *)malloc(sizeof(kv_flush_params<NL>));
  if (!fp) return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the launch parameters", op);
  memset(fp, 0, sizeof(*fp));
  fp->kpool = c->kpool + ly.kbase;
  fp->vpool = c->vpool + ly.vbase;
  fp->layer0 = r0;
  fp->kwin = c->kwin;
  fp->vwin = c->vwin;
  fp->k = k;
  fp->v = v;
  fp->table = c->d_table;
  fp->layer_stride_k = (uint64_t)g.max_pages * ly.kp.page;
  fp->layer_stride_v = (uint64_t)g.max_pages * ly.vp.page;
  fp->kp = kv_part_dev_of(&g, ly.kp, 0);
  fp->vp = kv_part_dev_of(&g, ly.vp, 1);
  fp->n = n;
  fp->kvh = g.kv_heads;
  fp->D = g.head_dim;
  fp->P = g.page_tokens;
  fp->F = (int32_t)F;
  fp->W = (int32_t)c->W;
  fp->dtype = dtype;
  fp->layers = g.layers;
  fp->max_pages = g.max_pages;
  fp->mma = mma;
  fp->nparam = nparam;
  int32_t m = 0;  /* entries in fp */
  int64_t mg = 0; /* the most groups an entry of fp flushes */
  for (int32_t i = 0; i <= cnt && !st; i++) {
    if (i < cnt) {
      const kv_layer_plan lp = layer_plan(c, e[i].seq, e[i].layer, 0, n);
      if (lp.flush == 0) continue;
      fp->L[m] = {lp.qlen, lp.len, (int32_t)(lp.flush / F), e[i].seq, e[i].layer, e[i].in_index};
      mg = lp.flush / F > mg ? lp.flush / F : mg;
      if (++m < NL) continue;
    }
    if (m == 0) continue;
    dim3 grid((unsigned)mg, (unsigned)m, (unsigned)g.kv_heads);
    k_cache_flush<NL><<<grid, 256, smem, ctx->stream>>>(*fp);
    st = kv_launched(ctx, op, "k_cache_flush");
    m = 0;
    mg = 0;
  }
  if (fp != &small) free(fp);
  return st;
}

kivi_status kv_flush_launch(kivi_cache *c, const char *op, const kv_flush_entry *e, int32_t cnt, const void *k,
                            const void *v, kivi_dtype dtype, int64_t n) {
  /* most calls flush nothing: look before building a launch */
  int32_t nf = 0;
  for (int32_t i = 0; i < cnt; i++) nf += layer_plan(c, e[i].seq, e[i].layer, 0, n).flush > 0;
  if (nf == 0) return KIVI_OK;
  return nf <= 8 ? flush_launch<8>(c, op, e, cnt, k, v, dtype, n)
                 : flush_launch<KV_FLUSH_MAXL>(c, op, e, cnt, k, v, dtype, n);
}

kivi_status kv_append_flush(kivi_cache *c, const char *op, int32_t seq, int32_t l0, int32_t nl, const void *k,
                            const void *v, kivi_dtype dtype, int64_t n) {
  /* one run of launches per stretch of layers of one format: a single-format cache makes one */
  kv_flush_entry e[KV_FLUSH_MAXL];
  kivi_status st = KIVI_OK;
  for (int32_t a = 0, b; a < nl && !st; a = b) {
    for (b = a + 1; b < nl && b - a < KV_FLUSH_MAXL &&
                    !memcmp(&c->lay[l0 + a].cfg, &c->lay[l0 + b].cfg, sizeof(kivi_cache_config));
         b++) {
    }
    for (int32_t i = a; i < b; i++) e[i - a] = {seq, l0 + i, i};
    st = kv_flush_launch(c, op, e, b - a, k, v, dtype, n);
  }
  return st;
}

/* The window writes of layers [l0, l0 + nl) with a parameter block of NL layers. */
template <int NL>
static kivi_status window_launch(kivi_cache *c, const char *op, int32_t seq, int32_t l0, int32_t nl, const void *k,
                                 const void *v, kivi_dtype dtype, int64_t n) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  const int64_t W = c->W, row = (int64_t)g.kv_heads * g.head_dim;
  const uint64_t seq_win = (uint64_t)seq * g.layers * (uint64_t)W * (uint64_t)row;
  kv_winw_params<NL> small, *wp = NL <= 8 ? &small : (kv_winw_params<NL> *)malloc(sizeof(kv_winw_params<NL>));
  if (!wp) return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the launch parameters", op);
  memset(wp, 0, sizeof(*wp));
  wp->kwin = c->kwin + seq_win;
  wp->vwin = c->vwin + seq_win;
  wp->k = k;
  wp->v = v;
  wp->n = n;
  wp->kvh = g.kv_heads;
  wp->D = g.head_dim;
  wp->W = (int32_t)W;
  wp->dtype = dtype;
  kivi_status st = KIVI_OK; /* of the launches: the first failure stops them */
  for (int32_t b0 = 0; b0 < nl && !st; b0 += NL) {
    const int32_t cnt = nl - b0 < NL ? nl - b0 : NL;
    int64_t maxrows = 0;
    for (int32_t i = 0; i < cnt; i++) {
      const kv_layer_plan lp = layer_plan(c, seq, l0, b0 + i, n);
      const int64_t r0 = lp.qlen + lp.flush - lp.len > 0 ? lp.qlen + lp.flush - lp.len : 0; /* first row kept */
      wp->L[i].len = lp.len;
      wp->L[i].r0 = r0;
      wp->L[i].layer = l0 + b0 + i;
      wp->L[i].in_index = b0 + i;
      maxrows = n - r0 > maxrows ? n - r0 : maxrows;
    }
    if (maxrows == 0) continue;
    const int64_t work = maxrows * row;
    dim3 grid((unsigned)((work + 255) / 256), (unsigned)cnt);
    k_cache_window<NL><<<grid, 256, 0, ctx->stream>>>(*wp);
    st = kv_launched(ctx, op, "k_cache_window");
  }
  if (wp != &small) free(wp);
  return st;
}

kivi_status kv_append_window(kivi_cache *c, const char *op, int32_t seq, int32_t l0, int32_t nl, const void *k,
                             const void *v, kivi_dtype dtype, int64_t n) {
  return nl <= 8 ? window_launch<8>(c, op, seq, l0, nl, k, v, dtype, n)
                 : window_launch<KV_FLUSH_MAXL>(c, op, seq, l0, nl, k, v, dtype, n);
}

void kv_append_commit(kivi_cache *c, int32_t seq, int32_t l0, int32_t nl, int64_t n, int64_t extra) {
  const kivi_cache_config &g = c->cfg;
  c->nfree -= (int32_t)extra;
  c->npages[seq] += (int32_t)extra;
  for (int32_t i = 0; i < nl; i++) {
    const kv_layer_plan lp = layer_plan(c, seq, l0, i, n);
    const int64_t at = (int64_t)seq * g.layers + l0 + i;
    c->len[at] = lp.len + n;
    c->qlen[at] = lp.qlen + lp.flush;
  }
}
