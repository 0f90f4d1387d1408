/*
 * attention_multi.cu — several query tokens a sequence (kivi_cache_attend_multi) and the merge of
 * partial attention results (kivi_attention_merge) in the CUDA build.
 *
 * Two paths. Where the layer is in the tensor-core layout, one launch takes every query (fused_launch): a
 * sequence's qmax queries become qmax x ratio query rows of each of its KV heads, so the tensor-core kernel
 * reads each page once for all of them (kv_attend_launch_rows: k_attend_rows from 16 rows a KV head) and
 * masks pages and window per row; with equal qlens q and the outputs stay in the caller's order.
 * Otherwise (the CUDA-core formats) the decode kernels run once a token position i, over the sequences
 * that have a query there, each with its prefix len - qlen + i + 1 as its length
 * (kv_attend_launch_lse): the queries of the position are gathered into a contiguous f32 block, and the
 * outputs and log-sum-exps scattered back. (A prefix that ends inside a page tile of a cache in the
 * tensor-core layout, where more queries than one launch's scratch would take are run a position at a
 * time, goes to k_attend_ref: the sequence read once as kivi_cache_read gives it (f32), then a plain
 * block-per-(query, head) online softmax.)
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "attention.cuh"
#include "kivi_seq.h"

/* The most bytes of gathered q and outputs (f32) that one launch takes (fused_launch); more go a position
   at a time. */
#define KV_MULTI_SCRATCH_MAX (1ll << 30)

/* Rows of E elements: dst row dix[j] (j when dix is NULL) = src row six[j] (j when NULL; zeros where it is
   negative), converted from sdt to ddt. One block a row. */
static __global__ void k_rows_copy(const void *src, int sdt, const int32_t *six, void *dst, int ddt, const int32_t *dix,
                                   int64_t E) {
  const int64_t j = blockIdx.x, sr = six ? six[j] : j, dr = dix ? dix[j] : j;
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x)
    kv_store_out(dst, ddt, dr * E + e, sr < 0 ? 0.0f : kv_bits_float(kv_bits_any(src, sdt, sr * E + e), sdt));
}

/* Exact attention of query rows rows[j] (their prefixes see[j]) over one sequence read into k, v f32
   [len][kvh][D]: block (j, head h) of D threads, an online softmax in f32 over the prefix, the output and
   the natural log-sum-exp. */
template <int D>
static __global__ void __launch_bounds__(D)
    k_attend_ref(const void *q, int q_dtype, const int32_t *rows, const int32_t *see, const float *k, const float *v,
                 int kvh, int qh, float scale, void *out, int out_dtype, float *lse) {
  __shared__ float part[D / 32];
  const int j = blockIdx.x, h = blockIdx.y, d = threadIdx.x, kh = h / (qh / kvh);
  const int64_t row = rows[j], qo = (row * qh + h) * D;
  const float qd = kv_bits_float(kv_bits_any(q, q_dtype, qo + d), q_dtype) * scale;
  float m = -INFINITY, l = 0.0f, o = 0.0f;
  for (int t = 0; t < see[j]; t++) {
    const int64_t kvo = ((int64_t)t * kvh + kh) * D + d;
    float s = qd * k[kvo];
#pragma unroll
    for (int w = 16; w > 0; w >>= 1) s += __shfl_xor_sync(KV_FULL, s, w);
    if ((d & 31) == 0) part[d >> 5] = s;
    __syncthreads();
    s = 0.0f;
#pragma unroll
    for (int w = 0; w < D / 32; w++) s += part[w];
    __syncthreads();
    const float mn = fmaxf(m, s), corr = expf(m - mn), p = expf(s - mn);
    l = l * corr + p;
    o = o * corr + p * v[kvo];
    m = mn;
  }
  kv_store_out(out, out_dtype, qo + d, o / l);
  if (lse && d == 0) lse[row * qh + h] = m + logf(l);
}

/* Merges `parts` results of each row: block a row, threads over the channels. */
static __global__ void k_merge(int parts, int64_t rows, int D, const float *outs, const float *lses, float *out,
                               float *lse_out) {
  const int64_t r = blockIdx.x;
  float m = -INFINITY;
  for (int p = 0; p < parts; p++) m = fmaxf(m, lses[p * rows + r]);
  float sum = 0.0f;
  if (m != -INFINITY)
    for (int p = 0; p < parts; p++) sum += expf(lses[p * rows + r] - m);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    if (sum > 0.0f)
      for (int p = 0; p < parts; p++) acc = fmaf(expf(lses[p * rows + r] - m), outs[(p * rows + r) * D + d], acc);
    out[r * D + d] = sum > 0.0f ? acc / sum : 0.0f;
  }
  __syncthreads(); /* lse_out may be lses (part 0): every thread has read it */
  if (lse_out && threadIdx.x == 0) lse_out[r] = sum > 0.0f ? m + logf(sum) : -INFINITY;
}

static kivi_seq_view view_at(const void *cache, int32_t s, int32_t layer) {
  const kivi_cache *c = (const kivi_cache *)cache;
  kivi_seq_view v = {c->live[s], 0, 0};
  if (v.live) {
    v.len = c->len[(int64_t)s * c->cfg.layers + layer];
    v.qlen = c->qlen[(int64_t)s * c->cfg.layers + layer];
  }
  return v;
}

/* The reference path for the queries of batch entry b listed in rows / see (host [n]): the sequence read
   once into kbuf, vbuf, then k_attend_ref. idx: device scratch [2 n]. */
static kivi_status ref_launch(kivi_cache_t c, const char *op, int32_t layer, int32_t seq, const int32_t *rows,
                              const int32_t *see, int32_t n, int32_t *idx, float *kbuf, float *vbuf, const void *q,
                              kivi_dtype q_dtype, float scale, void *out, kivi_dtype out_dtype, float *lse) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  kivi_status st;
  if ((st = kivi_cache_read(c, seq, layer, kbuf, vbuf, KIVI_F32))) return st;
  if ((st = kv_upload(ctx, op, idx, rows, sizeof(int32_t) * (size_t)n, "cudaMemcpyAsync (reference rows)")) ||
      (st = kv_upload(ctx, op, idx + n, see, sizeof(int32_t) * (size_t)n, "cudaMemcpyAsync (reference lengths)")))
    return st;
  const dim3 grid((unsigned)n, (unsigned)g.q_heads);
  switch (g.head_dim) {
    case 64:
      k_attend_ref<64><<<grid, 64, 0, ctx->stream>>>(q, q_dtype, idx, idx + n, kbuf, vbuf, g.kv_heads, g.q_heads, scale,
                                                     out, out_dtype, lse);
      break;
    case 128:
      k_attend_ref<128><<<grid, 128, 0, ctx->stream>>>(q, q_dtype, idx, idx + n, kbuf, vbuf, g.kv_heads, g.q_heads,
                                                       scale, out, out_dtype, lse);
      break;
    default:
      k_attend_ref<256><<<grid, 256, 0, ctx->stream>>>(q, q_dtype, idx, idx + n, kbuf, vbuf, g.kv_heads, g.q_heads,
                                                       scale, out, out_dtype, lse);
      break;
  }
  return kv_launched(ctx, op, "k_attend_ref");
}

/* The lengths of seqs[b] in layer: tokens held (len) and quantized into pages (qlen), host [batch] each. */
static void seq_lens(const kivi_cache *c, const int32_t *seqs, int32_t batch, int32_t layer, int64_t *len,
                     int64_t *qlen) {
  for (int32_t b = 0; b < batch; b++) {
    len[b] = c->len[(int64_t)seqs[b] * c->cfg.layers + layer];
    qlen[b] = c->qlen[(int64_t)seqs[b] * c->cfg.layers + layer];
  }
}

/* One launch for every query of the call (a layer in the tensor-core layout): a sequence's queries become
   qmax x ratio query rows of each of its KV heads (kv_attend_launch_rows), right-aligned so that row i of
   qmax sees the first len - qmax + i + 1 tokens (the kernel masks pages and window per row), and the
   tensor-core kernel reads each page once for all of them. Where every sequence has qmax queries the kernel
   reads q and writes the outputs and log-sum-exps in the caller's order (kv_row_at); otherwise q is
   gathered into the rows' order ([batch][kv head][qmax][ratio] rows, zeros where a sequence has fewer
   queries) and the outputs and log-sum-exps scattered back. */
static kivi_status fused_launch(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *seqs,
                                const int32_t *qlens, int32_t qmax, const void *q, kivi_dtype q_dtype, float scale,
                                void *out, kivi_dtype out_dtype, float *lse, int64_t tokens) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  const int32_t qh = g.q_heads, ratio = g.q_heads / g.kv_heads, D = g.head_dim;
  const int64_t vrows = (int64_t)batch * qmax * qh, real = tokens * qh;
  if (tokens == (int64_t)batch * qmax) { /* every sequence with qmax queries: no gather, no scatter */
    int64_t blen[KV_ATTN_MAX_BATCH], bq[KV_ATTN_MAX_BATCH];
    seq_lens(c, seqs, batch, layer, blen, bq);
    return kv_attend_launch_rows(c, op, layer, batch, seqs, blen, bq, q, q_dtype, scale, out, out_dtype, lse, qmax,
                                 true);
  }
  /* host, one block: int64 len, qlen [batch]; int32 gather index [vrows] (source row of q, -1 for padding),
     then scatter pairs (virtual, real) */
  int64_t *blen = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)batch + sizeof(int32_t) * (size_t)(vrows + 2 * real));
  if (!blen)
    return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the row plan of %lld tokens", op, (long long)tokens);
  int64_t *bq = blen + batch;
  seq_lens(c, seqs, batch, layer, blen, bq);
  int32_t *ix = (int32_t *)(bq + batch), *sv = ix + vrows, *sr = sv + real;
  int64_t at = 0, n = 0;
  for (int32_t b = 0; b < batch; b++) {
    const int32_t pad = qmax - qlens[b];
    for (int32_t hk = 0; hk < g.kv_heads; hk++)
      for (int32_t i = 0; i < qmax; i++)
        for (int32_t r = 0; r < ratio; r++) {
          const int64_t v = ((int64_t)b * g.kv_heads + hk) * qmax * ratio + (int64_t)i * ratio + r;
          const int64_t src = i < pad ? -1 : (at + i - pad) * qh + hk * ratio + r;
          ix[v] = (int32_t)src;
          if (src >= 0) {
            sv[n] = (int32_t)v;
            sr[n++] = (int32_t)src;
          }
        }
    at += qlens[b];
  }
  const size_t qbytes = (size_t)vrows * D * 4u, lbytes = (size_t)vrows * 4u;
  const size_t ibytes = ((size_t)(vrows + 2 * real) * 4u + 255u) & ~(size_t)255u;
  uint8_t *scratch = NULL;
  kivi_status st = kv_cuda(ctx, cudaMallocAsync((void **)&scratch, 2 * qbytes + lbytes + ibytes + 512, ctx->stream), op,
                           "cudaMallocAsync (scratch)");
  if (st) {
    free(blen);
    return st;
  }
  float *qv = (float *)scratch, *ov = (float *)(scratch + qbytes), *lv = (float *)(scratch + 2 * qbytes);
  int32_t *dix = (int32_t *)(scratch + ((2 * qbytes + lbytes + 255) & ~(size_t)255));
  st = kv_upload(ctx, op, dix, ix, (size_t)(vrows + 2 * real) * 4u, "cudaMemcpyAsync (rows)");
  if (!st) {
    k_rows_copy<<<(unsigned)vrows, 128, 0, ctx->stream>>>(q, q_dtype, dix, qv, KIVI_F32, NULL, D);
    st = kv_launched(ctx, op, "k_rows_copy");
  }
  if (!st)
    st = kv_attend_launch_rows(c, op, layer, batch, seqs, blen, bq, qv, KIVI_F32, scale, ov, KIVI_F32, lse ? lv : NULL,
                               qmax, false);
  const int32_t *dsv = dix + vrows, *dsr = dsv + real;
  if (!st) {
    k_rows_copy<<<(unsigned)real, 128, 0, ctx->stream>>>(ov, KIVI_F32, dsv, out, out_dtype, dsr, D);
    st = kv_launched(ctx, op, "k_rows_copy");
  }
  if (!st && lse) {
    k_rows_copy<<<(unsigned)real, 32, 0, ctx->stream>>>(lv, KIVI_F32, dsv, lse, KIVI_F32, dsr, 1);
    st = kv_launched(ctx, op, "k_rows_copy");
  }
  free(blen);
  const kivi_status fst = kv_cuda(ctx, cudaFreeAsync(scratch, ctx->stream), op, "cudaFreeAsync (scratch)");
  return st ? st : fst;
}

extern "C" {

KIVI_API kivi_status kivi_cache_attend_multi(kivi_cache_t c, int32_t layer, const int32_t *seqs, const int32_t *qlens,
                                             int32_t batch, int64_t tokens, const void *q, kivi_dtype q_dtype,
                                             float scale, int32_t flags, void *out, kivi_dtype out_dtype, float *lse) {
  static const char *op = "kivi_cache_attend_multi";
  kivi_status st = kv_cache_enter(c, op);
  if (st) return st;
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  int32_t max_q = 0;
  KIVI_HOST_REFUSE(kv_fail, ctx, st,
                   kivi_multi_check(&g, c, view_at, layer, seqs, qlens, batch, tokens, q, q_dtype, scale, flags, out,
                                    out_dtype, &max_q, msg, sizeof msg));
  const int64_t row = (int64_t)g.q_heads * g.head_dim;
  if (!(flags & KIVI_FLAG_TRUSTED)) {
    int64_t bad;
    if ((st = kv_cache_scan(ctx, op, q, q_dtype, tokens * row, false, KV_SLOT_NONFINITE, &bad))) return st;
    if (bad >= 0) {
      char buf[32];
      return kv_fail(ctx, KIVI_ERR_NONFINITE,
                     "%s: q must be finite, got %s at token %lld, head %d, channel %d; pass KIVI_FLAG_TRUSTED only "
                     "for data known to be finite",
                     op, kv_cache_bad_name(ctx, q, q_dtype, bad, buf), (long long)(bad / row),
                     (int)((bad % row) / g.head_dim), (int)(bad % g.head_dim));
    }
  }
  const bool mma = kivi_cache_mma_layout(&c->lay[layer].cfg); /* the layer's formats pick the kernel */
  /* every query on the tensor-core kernel in one launch: the layer in that layout, no more sequences than a
     decode batch, and the gathered rows within KV_MULTI_SCRATCH_MAX; KIVI_MULTI_FUSED=0 keeps the launch a
     position (development) */
  static const bool no_fused = getenv("KIVI_MULTI_FUSED") && !strcmp(getenv("KIVI_MULTI_FUSED"), "0");
  if (mma && !no_fused && batch <= KV_ATTN_MAX_BATCH &&
      (int64_t)batch * max_q * row * 8 <= (int64_t)KV_MULTI_SCRATCH_MAX)
    return fused_launch(c, op, layer, batch, seqs, qlens, max_q, q, q_dtype, scale, out, out_dtype, lse, tokens);
  /* the plan, on the host: per position, the decode kernel's entries; per batch entry, its reference
     queries (host lengths read once: nothing below changes them) */
  /* host plan arrays, one block: int32 t0, slot [batch], roff [batch + 1], pos_off [max_q + 1], krow, kslot,
     rrow, rsee [tokens]; int64 blen, bq [batch], klen, kql [tokens] */
  const size_t n32 = 3 * (size_t)batch + 2 + (size_t)max_q + 4 * (size_t)tokens,
               n64 = 2 * (size_t)batch + 2 * (size_t)tokens;
  int64_t *plan64 = (int64_t *)malloc(n64 * sizeof(int64_t) + n32 * sizeof(int32_t));
  if (!plan64)
    return kv_fail(ctx, KIVI_ERR_NOMEM, "%s: could not allocate the plan of %lld tokens", op, (long long)tokens);
  int64_t *blen = plan64, *bq = blen + batch, *klen = bq + batch, *kql = klen + tokens;
  int32_t *t0 = (int32_t *)(kql + tokens), *slot = t0 + batch, *roff = slot + batch, *pos_off = roff + batch + 1;
  int32_t *krow = pos_off + max_q + 1, *kslot = krow + tokens, *rrow = kslot + tokens, *rsee = rrow + tokens;
  int64_t maxlen = 0, at = 0;
  seq_lens(c, seqs, batch, layer, blen, bq);
  for (int32_t b = 0; b < batch; b++) {
    t0[b] = (int32_t)at;
    at += qlens[b];
    slot[b] = seqs[b];
    maxlen = blen[b] > maxlen ? blen[b] : maxlen;
  }
  /* query i of entry b sees `see` tokens, `ql` of them in pages; the tensor-core kernel cannot stop inside a
     32-token page tile: those queries take the reference path */
#define KV_SEE(b, i) (blen[b] - qlens[b] + (i) + 1)
#define KV_QL(b, i) (bq[b] < KV_SEE(b, i) ? bq[b] : KV_SEE(b, i))
#define KV_REF(b, i) (mma && KV_QL(b, i) % 32)
  int32_t nref = 0;
  for (int32_t b = 0; b < batch; b++) {
    roff[b] = nref;
    for (int32_t i = 0; i < qlens[b]; i++)
      if (KV_REF(b, i)) {
        rrow[nref] = t0[b] + i;
        rsee[nref++] = (int32_t)KV_SEE(b, i);
      }
  }
  roff[batch] = nref;
  int32_t nk = 0; /* by position: rows (token index) of the kernel's entries, their (slot, len, qlen) */
  pos_off[0] = 0;
  for (int32_t i = 0; i < max_q; i++) {
    for (int32_t b = 0; b < batch; b++) {
      if (qlens[b] <= i || KV_REF(b, i)) continue;
      krow[nk] = t0[b] + i;
      kslot[nk] = slot[b];
      klen[nk] = KV_SEE(b, i);
      kql[nk++] = KV_QL(b, i);
    }
    pos_off[i + 1] = nk;
  }
#undef KV_REF
#undef KV_QL
#undef KV_SEE

  /* device scratch, stream ordered: the gathered q and the outputs of one position (f32), the rows of
     every position, and (for the reference path) one sequence's keys and values */
  const size_t mb = (size_t)(batch < KV_ATTN_MAX_BATCH ? batch : KV_ATTN_MAX_BATCH);
  const size_t qbytes = mb * (size_t)row * 4u, lbytes = mb * (size_t)g.q_heads * 4u;
  const size_t ibytes = (((size_t)nk + 2u * (size_t)nref) * 4u + 255u) & ~(size_t)255u;
  const size_t kvbytes = nref > 0 ? (size_t)maxlen * g.kv_heads * g.head_dim * 4u : 0;
  const size_t total = 2 * qbytes + lbytes + ibytes + 2 * kvbytes + 1024;
  uint8_t *scratch = NULL;
  if ((st = kv_cuda(ctx, cudaMallocAsync((void **)&scratch, total, ctx->stream), op, "cudaMallocAsync (scratch)"))) {
    free(plan64);
    return st;
  }
  float *qtmp = (float *)scratch, *otmp = (float *)(scratch + qbytes), *ltmp = (float *)(scratch + 2 * qbytes);
  int32_t *didx = (int32_t *)(scratch + ((2 * qbytes + lbytes + 255) & ~(size_t)255));
  float *kbuf = (float *)((uint8_t *)didx + ibytes), *vbuf = (float *)((uint8_t *)kbuf + kvbytes);
  if (nk > 0) st = kv_upload(ctx, op, didx, krow, (size_t)nk * 4u, "cudaMemcpyAsync (rows)");
  for (int32_t i = 0; i < max_q && !st; i++) {
    for (int32_t s0 = pos_off[i]; s0 < pos_off[i + 1] && !st; s0 += KV_ATTN_MAX_BATCH) {
      const int32_t n = pos_off[i + 1] - s0 < KV_ATTN_MAX_BATCH ? pos_off[i + 1] - s0 : KV_ATTN_MAX_BATCH;
      k_rows_copy<<<n, 128, 0, ctx->stream>>>(q, q_dtype, didx + s0, qtmp, KIVI_F32, NULL, row);
      if ((st = kv_launched(ctx, op, "k_rows_copy"))) break;
      if ((st = kv_attend_launch_lse(c, op, layer, n, kslot + s0, klen + s0, kql + s0, qtmp, KIVI_F32, scale, otmp,
                                     KIVI_F32, lse ? ltmp : NULL)))
        break;
      k_rows_copy<<<n, 128, 0, ctx->stream>>>(otmp, KIVI_F32, NULL, out, out_dtype, didx + s0, row);
      if ((st = kv_launched(ctx, op, "k_rows_copy"))) break;
      if (lse) {
        k_rows_copy<<<n, 32, 0, ctx->stream>>>(ltmp, KIVI_F32, NULL, lse, KIVI_F32, didx + s0, g.q_heads);
        st = kv_launched(ctx, op, "k_rows_copy");
      }
    }
  }
  int32_t *ridx = didx + nk;
  for (int32_t b = 0; b < batch && !st; b++) {
    const int32_t n = roff[b + 1] - roff[b];
    if (n == 0) continue;
    st = ref_launch(c, op, layer, slot[b], rrow + roff[b], rsee + roff[b], n, ridx, kbuf, vbuf, q, q_dtype, scale, out,
                    out_dtype, lse);
    ridx += 2 * n;
  }
  free(plan64);
  const kivi_status fst = kv_cuda(ctx, cudaFreeAsync(scratch, ctx->stream), op, "cudaFreeAsync (scratch)");
  return st ? st : fst;
}

KIVI_API kivi_status kivi_attention_merge(kivi_ctx_t ctx, int32_t parts, int64_t rows, int32_t head_dim,
                                          const float *outs, const float *lses, float *out, float *lse_out) {
  static const char *op = "kivi_attention_merge";
  KIVI_HOST_ENTER(kv_enter, kv_fail, ctx, op,
                  kivi_merge_check(parts, rows, head_dim, outs, lses, out, msg, sizeof msg));
  const unsigned grid = (unsigned)rows, threads = head_dim < 256 ? 64u : 256u;
  k_merge<<<grid, threads, 0, ctx->stream>>>(parts, rows, head_dim, outs, lses, out, lse_out);
  return kv_launched(ctx, op, "k_merge");
}

} /* extern "C" */
