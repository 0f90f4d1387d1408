/*
 * cache_read.cu — kivi_cache_read: a sequence's keys and values of one layer, dequantized as
 * attention sees them (pages, then the fp16 window), in the dtype asked for.
 */
#include "cache_page.cuh"

/* ---------------------------------------------------------------- read kernel ------------ */

struct kv_read_params {
  const uint8_t *kpool, *vpool; /* layer bases */
  const uint16_t *kwin, *vwin;  /* this sequence's window of the layer: [W][kv_heads][D] */
  const int32_t *table;
  void *k, *v;
  kv_part_dev kp, vp;
  kivi_cache_config cfg;
  int64_t len, qlen;
  int32_t kvh, D, P, W, dtype;
};

__device__ __forceinline__ void kv_store_any(void *out, kivi_dtype dt, int64_t i, float v) {
  if (dt == KIVI_F32)
    kv_st<KIVI_F32>(out, i, v);
  else if (dt == KIVI_F16)
    kv_st<KIVI_F16>(out, i, v);
  else
    kv_st<KIVI_BF16>(out, i, v);
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

extern "C" {

KIVI_API kivi_status kivi_cache_read(kivi_cache_t c, int32_t seq, int32_t layer, void *k, void *v, kivi_dtype dtype) {
  static const char *op = "kivi_cache_read";
  kivi_status st = kv_cache_io_enter(c, op, seq, 0, layer, 1, k, v, dtype, 0);
  if (st) return st;
  kivi_ctx_t ctx = c->ctx;
  const kivi_layer_layout &ly = c->lay[layer];
  const kivi_cache_config &g = ly.cfg; /* the layer's formats */
  const int64_t len = c->len[(int64_t)seq * g.layers + layer];
  if (len == 0) return KIVI_OK;
  kv_read_params p;
  memset(&p, 0, sizeof p);
  p.kpool = c->kpool + ly.kbase;
  p.vpool = c->vpool + ly.vbase;
  const uint64_t row = (uint64_t)g.kv_heads * g.head_dim;
  const uint64_t wofs = ((uint64_t)seq * g.layers + layer) * (uint64_t)c->W * row;
  p.kwin = c->kwin + wofs;
  p.vwin = c->vwin + wofs;
  p.table = c->d_table + (int64_t)seq * g.max_pages;
  p.k = k;
  p.v = v;
  p.kp = kv_part_dev_of(&g, ly.kp, 0);
  p.vp = kv_part_dev_of(&g, ly.vp, 1);
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

} /* extern "C" */
