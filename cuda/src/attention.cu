/*
 * attention.cu — fused decode attention over the paged cache (kivi_cache_attend) and the small
 * flash-decoding split. Caches in the tensor-core page layout (kivi_cache_mma_layout: uniform
 * 2-bit K, uniform or codebook 2-bit V, head_dim 64 or 128) run k_attend_mma (attention_mma.cuh,
 * instantiated in attention_mma_{uniform,codebook}.cu); every other format runs k_cache_attend
 * (attention_simt.cuh), on CUDA cores. This file selects the kernel, sizes its shared memory and splits,
 * launches it and the merge of the splits, and holds the exports. Both kernels share the grid, the
 * splits and the merges (attention.cuh).
 *
 * Grid: one CTA of 4 warps per (batch entry, kv head, split of the sequence, chunk of HC query
 * heads); HC = 4, 2 or 1 query heads of one GQA group share every K/V byte the CTA reads here, 8 in
 * the tensor-core kernel (larger ratios take several chunks, the last one partly empty where HC does
 * not divide the ratio; the chunks read the same pages at about the same time, mostly from L2).
 * Splits cut the sequence into chunks of whole tiles so that the grid fills the GPU; when there is
 * more than one, the CTA writes (max, sum, unnormalised output) per head to the workspace and
 * k_attend_combine merges them (2 launches); with one split the CTA writes the output itself (1).
 */
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include <mutex>

#include "attention_simt.cuh"

/* ---------------------------------------------------------------- host side -------------- */

#ifdef KV_FAST_BUILD /* development: one head_dim only */
#define KV_D_OK(D) ((D) == 128)
#else
#define KV_D_OK(D) true
#endif
template <int D>
static kv_attn_kernel pick_hc(int hc) {
  if constexpr (!KV_D_OK(D)) {
    (void)hc;
    return NULL;
  } else {
    switch (hc) {
      case 4: return k_cache_attend<D, 4>;
      case 2: return k_cache_attend<D, 2>;
      default: return k_cache_attend<D, 1>;
    }
  }
}

static kv_attn_kernel pick_kernel(int D, int hc) {
  switch (D) {
    case 64: return pick_hc<64>(hc);
    case 128: return pick_hc<128>(hc);
    default: return pick_hc<256>(hc);
  }
}

struct kv_kernel_info {
  kv_attn_kernel fn;
  int device;
  int regs;
  size_t smem_set; /* dynamic smem limit already set */
  size_t occ_smem; /* occupancy below was computed for this dynamic smem */
  int occ;
};

/* Per-process cache of register counts, smem limits and occupancy (kernels x devices is small);
   entries are never removed, so a pointer stays valid; g_kinfo_mu guards lookups and updates. */
static kv_kernel_info g_kinfo[64];
static int g_nkinfo;
static std::mutex g_kinfo_mu;

static kv_kernel_info *kernel_info(kivi_ctx_t ctx, kv_attn_kernel fn, const char *op, kivi_status *st) {
  for (int i = 0; i < g_nkinfo; i++)
    if (g_kinfo[i].fn == fn && g_kinfo[i].device == ctx->device) return &g_kinfo[i];
  cudaFuncAttributes fa;
  if ((*st = kv_cuda(ctx, cudaFuncGetAttributes(&fa, (const void *)fn), op, "cudaFuncGetAttributes"))) return NULL;
  kv_kernel_info *ki = g_nkinfo < 64 ? &g_kinfo[g_nkinfo++] : &g_kinfo[63];
  ki->fn = fn;
  ki->device = ctx->device;
  ki->regs = fa.numRegs;
  ki->smem_set = 48 * 1024;
  ki->occ_smem = 0;
  ki->occ = 0;
  return ki;
}

/* CTAs of a launch before splitting (batch x kv heads x head chunks), and the SMs they spread over */
static int64_t kv_units(const kivi_cache_t c, const kv_attn_params *p) {
  return (int64_t)p->batch * c->cfg.kv_heads * p->nhc;
}
static int64_t kv_sms(const kivi_ctx_t ctx) { return ctx->sm_count > 0 ? ctx->sm_count : 1; }

/* The workspace: the sequences of a batch larger than KV_SEQ_INLINE [KV_ATTN_MAX_BATCH], then (at
   KV_WS_HEAD bytes) the partials of the splits. */
static const uint64_t KV_WS_HEAD = ((uint64_t)KV_ATTN_MAX_BATCH * sizeof(kv_seq_info) + 255) & ~(uint64_t)255;
static kivi_status kv_ws_ensure(kivi_cache_t c, const char *op, uint64_t partial_bytes) {
  kivi_ctx_t ctx = c->ctx;
  const uint64_t head = KV_WS_HEAD, need = head + partial_bytes;
  if (need <= c->ws_bytes) return KIVI_OK;
  if (c->ws) {
    (void)cudaStreamSynchronize(ctx->stream);
    cudaFree(c->ws);
    c->ws = NULL;
    c->ws_bytes = 0;
  }
  const uint64_t want = head + partial_bytes + partial_bytes / 4;
  kivi_status st;
  if ((st = kv_cuda(ctx, cudaMalloc((void **)&c->ws, (size_t)want), op, "cudaMalloc (attention workspace)"))) return st;
  c->ws_bytes = want;
  return KIVI_OK;
}

/* Splits (minimising waves x tiles per CTA, plus a fixed cost per CTA), the workspace, the sequences of
   a large batch (seq: host [batch]), the launch of fn (grid = batch x kv heads x head chunks x splits)
   and, with more than one split, k_attend_combine. */
static kivi_status launch_split(kivi_cache_t c, const char *op, kv_attn_params *p, const kv_seq_info *seq,
                                kv_attn_kernel fn, int threads, size_t smem, int bps, int TT, int64_t maxlen,
                                const char *name) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_cache_config &g = c->cfg;
  const int D = g.head_dim, batch = p->batch;
  kivi_status st = KIVI_OK;
  const int64_t units = kv_units(c, p), slots = kv_sms(ctx) * bps;
  const int64_t max_ns = (maxlen + 4 * TT - 1) / (4 * TT);
  int64_t best_ns = 1;
  double best = 1e300;
  for (int64_t ns = 1; ns <= max_ns && ns <= 1024; ns++) {
    const int64_t chunk = ((maxlen + ns - 1) / ns + TT - 1) / TT * TT;
    const int64_t real_ns = (maxlen + chunk - 1) / chunk;
    if (real_ns != ns) continue;
    const int64_t waves = (units * ns + slots - 1) / slots;
    const double cost = (double)waves * ((double)chunk / TT + 3.0) + (ns > 1 ? 2.0 : 0.0);
    if (cost < best - 1e-9) {
      best = cost;
      best_ns = ns;
    }
  }
  /* KIVI_NSPLIT=n forces the split count (development: measure the cost model's choice against others) */
  static const int64_t forced_ns = getenv("KIVI_NSPLIT") ? atoll(getenv("KIVI_NSPLIT")) : 0;
  if (forced_ns > 0) best_ns = forced_ns < max_ns ? forced_ns : (max_ns > 0 ? max_ns : 1);
  int64_t chunk = ((maxlen + best_ns - 1) / best_ns + TT - 1) / TT * TT;
  best_ns = (maxlen + chunk - 1) / chunk;
  p->nsplit = (int32_t)best_ns;
  p->chunk = (int32_t)chunk;

  if (best_ns > 1 || batch > KV_SEQ_INLINE) {
    const uint64_t partial = best_ns > 1 ? (uint64_t)batch * p->qh * best_ns * (D + 2) * sizeof(float) : 0;
    if ((st = kv_ws_ensure(c, op, partial))) return st;
    uint8_t *w = (uint8_t *)c->ws;
    p->dseq = (const kv_seq_info *)w;
    p->ws = (float *)(w + KV_WS_HEAD);
    if (batch > KV_SEQ_INLINE && (st = kv_upload(ctx, op, (void *)p->dseq, seq, (size_t)batch * sizeof(kv_seq_info),
                                                 "cudaMemcpyAsync (attention sequences)")))
      return st;
  }

  const unsigned grid = (unsigned)(units * best_ns);
  fn<<<grid, threads, smem, ctx->stream>>>(*p);
  if ((st = kv_launched(ctx, op, name)) || best_ns == 1) return st;
  const unsigned cg = (unsigned)batch * (unsigned)p->qh;
  switch (D) {
    case 64: k_attend_combine<64><<<cg, 64, 0, ctx->stream>>>(*p); break;
    case 128: k_attend_combine<128><<<cg, 128, 0, ctx->stream>>>(*p); break;
    default: k_attend_combine<256><<<cg, 256, 0, ctx->stream>>>(*p); break;
  }
  return kv_launched(ctx, op, "k_attend_combine");
}

/* The dynamic shared memory limit of fn raised to smem where it is below (what names the call in errors),
   and the CTAs of KV_MMA_THREADS threads a SM it then fits (*bps, at least 1); cached a kernel and device. */
static kivi_status mma_occupancy(kivi_ctx_t ctx, const char *op, kv_attn_kernel fn, size_t smem, const char *what,
                                 int *bps) {
  kivi_status st = KIVI_OK;
  std::lock_guard<std::mutex> lock(g_kinfo_mu);
  kv_kernel_info *ki = kernel_info(ctx, fn, op, &st);
  if (!ki) return st;
  if (smem > ki->smem_set) {
    if ((st = kv_cuda(ctx,
                      cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                      op, what)))
      return st;
    ki->smem_set = smem;
  }
  if (ki->occ_smem != smem) {
    if ((st = kv_cuda(ctx,
                      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ki->occ, (const void *)fn, KV_MMA_THREADS, smem),
                      op, "cudaOccupancyMaxActiveBlocksPerMultiprocessor")))
      return st;
    ki->occ_smem = smem;
  }
  *bps = ki->occ < 1 ? 1 : ki->occ;
  return KIVI_OK;
}

/* Blocks of 16 query rows a CTA of k_attend_rows for `rows` query rows a KV head (query heads x qrows
   queries a sequence) of a layer in the tensor-core layout: 0 where k_attend_mma takes them (decode, fewer
   than KV_ROWS_MIN rows, head_dim other than 64 and 128; KIVI_MULTI_ROWS=0 forces k_attend_mma,
   development: compare the two in one build), else as many as the rows fill, up to 4. Measured on an H200
   (8 x 32768, same call): several queries a sequence gain (GQA 32/8 qlen 8 510 -> 457 us, a 512-token chunk
   27.7 -> 23.7 ms); decode at GQA 32/2 (16 rows) loses 5 % (55 -> 57.5 us uniform, 69.8 -> 73.3 codebook)
   and 64/4 gains 3 % (123 -> 119): decode keeps k_attend_mma. */
static int rows_blocks(int D, int rows, int qrows) {
  static const bool off = getenv("KIVI_MULTI_ROWS") && !strcmp(getenv("KIVI_MULTI_ROWS"), "0");
  if (off || qrows < 2 || rows < KV_ROWS_MIN || (D != 64 && D != 128)) return 0;
  return rows >= 64 ? 4 : rows >= 32 ? 2 : 1;
}

/* k_attend_rows (p->rb blocks of 16 rows a CTA): one ring a warp as k_attend_mma's, 2 CTAs a SM. */
static kivi_status rows_launch(kivi_cache_t c, const kivi_cache_config &g, const char *op, kv_attn_params *p,
                               const kv_seq_info *seq, int64_t maxlen) {
  kivi_ctx_t ctx = c->ctx;
  const int D = g.head_dim;
  const bool cb = g.v_kind == KIVI_KIND_CODEBOOK;
  kv_attn_kernel fn = kv_rows_kernel(D, g.v_group, cb ? 1 : 0);
  if (!fn)
    return kv_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: head_dim %d with value groups of %d is not built into this library",
                   op, D, (int)g.v_group);
  const size_t smem = kv_rows_smem(D, p->rb, KV_MMA_NST, kv_mma_stage_bytes(D, g.v_group, cb ? 4 : 2));
  int bps = 1;
  const kivi_status st = mma_occupancy(ctx, op, fn, smem, "cudaFuncSetAttribute (k_attend_rows)", &bps);
  return st ? st : launch_split(c, op, p, seq, fn, KV_MMA_THREADS, smem, bps, 32, maxlen, "k_attend_rows");
}

/* The tensor-core kernel (layers in the tensor-core page layout; g: the layer's config): 32-token tiles, up to
   8 heads a CTA. */
static kivi_status mma_launch(kivi_cache_t c, const kivi_cache_config &g, const char *op, kv_attn_params *p,
                              const kv_seq_info *seq, int64_t maxlen) {
  kivi_ctx_t ctx = c->ctx;
  const int D = g.head_dim;
  /* CTAs per SM: 4 (registers capped at 128) where the grid has at least one (sequence, kv head, head
     chunk) unit an SM, else 3. Measured on an H200, same run, 3 -> 4 CTAs (GQA kernel, T1 = false):
     8x32768 273 -> 270 us, 8x8192 85 -> 80, 32x4096 169 -> 151; but with few units (1 x 32 heads),
     where the sequence is split into many short chunks, 1x32768 46 -> 49 and 1x4096 16.7 -> 17.2. The
     T1 kernel spills 68 bytes at 128 registers and still gains where the grid is large (32x4096
     157 -> 147 us; 8x32768 the same). Four stages a warp either way (3 and 5 measured slower at
     8x32768). */
  constexpr int nst = KV_MMA_NST;
  /* KIVI_MMA_CTAS=3 or 4 forces the choice (development: compare the two in one build) */
  static const int forced = getenv("KIVI_MMA_CTAS") ? atoi(getenv("KIVI_MMA_CTAS")) : 0;
  const bool many = forced ? forced >= 4 : kv_units(c, p) >= kv_sms(ctx);
  /* the key side: one query head a KV head takes tokens as rows and the three planes as columns (T1);
     several, q fixed and the key scale applied per k-step (QF: the work a tile does not grow with the ratio).
     KIVI_MMA_KEYS=planes forces the int8 planes for several (development: compare the two in one build) */
  static const bool planes = getenv("KIVI_MMA_KEYS") && !strcmp(getenv("KIVI_MMA_KEYS"), "planes");
  const int several = planes ? KV_KEYS_PLANES : KV_KEYS_QF;
  const int keys = p->ratio == 1 ? KV_KEYS_T1 : several;
  const bool cb = g.v_kind == KIVI_KIND_CODEBOOK;
  kv_attn_kernel fn =
      cb ? kv_mma_kernel_codebook(D, g.v_group, keys, many) : kv_mma_kernel_uniform(D, g.v_group, keys, many);
  if (!fn)
    return kv_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: head_dim %d with value groups of %d is not built into this library",
                   op, D, (int)g.v_group);
  /* a ring of nst stages a warp (32 tokens: key codes + params, value codes + param planes) */
  const size_t stage = (size_t)kv_mma_stage_bytes(D, g.v_group, cb ? 4 : 2);
  const size_t ring = (size_t)KV_MMA_WARPS * nst * stage;
  const size_t merge = (size_t)KV_MMA_WARPS * KV_MMA_HEADS * (D + 2) * sizeof(float);
  const size_t abuf = kv_mma_abuf_bytes(D, p->ratio, keys);
  const size_t smem = (size_t)KV_MMA_HEADS * D * sizeof(float) + abuf + (ring > merge ? ring : merge);
  int bps = 1;
  const kivi_status st = mma_occupancy(ctx, op, fn, smem, "cudaFuncSetAttribute (k_attend_mma)", &bps);
  return st ? st : launch_split(c, op, p, seq, fn, KV_MMA_THREADS, smem, bps, 32, maxlen, "k_attend_mma");
}

kivi_status kv_attend_launch(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                             const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype, float scale,
                             void *out, kivi_dtype out_dtype, const kv_attn_check *chk) {
  return kv_attend_launch_full(c, op, layer, batch, slot, len, qlen, q, q_dtype, scale, out, out_dtype, chk, NULL, 1);
}

kivi_status kv_attend_launch_lse(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                                 const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype,
                                 float scale, void *out, kivi_dtype out_dtype, float *lse) {
  return kv_attend_launch_full(c, op, layer, batch, slot, len, qlen, q, q_dtype, scale, out, out_dtype, NULL, lse, 1);
}

kivi_status kv_attend_launch_rows(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                                  const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype,
                                  float scale, void *out, kivi_dtype out_dtype, float *lse, int32_t qrows,
                                  bool direct) {
  return kv_attend_launch_full(c, op, layer, batch, slot, len, qlen, q, q_dtype, scale, out, out_dtype, NULL, lse,
                               qrows, direct);
}

/* kv_attend_launch with the log-sum-exp output (lse: device [batch][q_heads] or NULL). */
kivi_status kv_attend_launch_full(kivi_cache_t c, const char *op, int32_t layer, int32_t batch, const int32_t *slot,
                                  const int64_t *len, const int64_t *qlen, const void *q, kivi_dtype q_dtype,
                                  float scale, void *out, kivi_dtype out_dtype, const kv_attn_check *chk, float *lse,
                                  int32_t qrows, bool direct) {
  kivi_ctx_t ctx = c->ctx;
  const kivi_layer_layout &ly = c->lay[layer];
  const kivi_cache_config &g = ly.cfg; /* the layer's formats pick the kernel */
  /* qrows queries a sequence (the tensor-core kernel only): qrows x ratio rows a KV head */
  const int D = g.head_dim, ratio = g.q_heads / g.kv_heads * qrows;
  const bool mma = kivi_cache_mma_layout(&g);
  /* measured on H200, ratio 4: HC 4 (255 regs, 2 CTAs/SM) beats HC 2 by 1.2x and HC 1 by 1.9x; ratios
     that 4 does not divide take chunks of 4 with a partly empty last one (ratio 7: 2 CTAs reading the
     pages, not 7) */
  const int rb = mma ? rows_blocks(D, ratio, qrows) : 0; /* k_attend_rows: 16 rows a warp, rb blocks of them a CTA */
  const int HC = rb ? 16 * rb : mma ? KV_MMA_HEADS : ratio >= 4 ? 4 : (ratio >= 2 ? 2 : 1);
  const int nhc = (ratio + HC - 1) / HC;
  kivi_status st = KIVI_OK;

  kv_attn_params params;
  memset(&params, 0, sizeof params);
  kv_attn_params *p = &params;
  p->kpool = c->kpool + ly.kbase;
  p->vpool = c->vpool + ly.vbase;
  p->kwin = c->kwin;
  p->vwin = c->vwin;
  p->table = c->d_table;
  p->q = q;
  p->out = out;
  p->lse = lse;
  p->kpage = ly.kp.page;
  p->vpage = ly.vp.page;
  p->khead = (uint32_t)ly.kp.head;
  p->vhead = (uint32_t)ly.vp.head;
  p->kcodes = (uint32_t)ly.kp.codes;
  p->vcodes = (uint32_t)ly.vp.codes;
  p->max_pages = g.max_pages;
  p->layers = g.layers;
  p->layer = layer;
  p->kvh = g.kv_heads;
  p->qh = g.q_heads * qrows;
  p->ratio = ratio;
  p->qrows = qrows;
  p->rb = rb;
  p->qdirect = direct && qrows > 1;
  p->nhc = nhc;
  p->W = c->W;
  p->P = g.page_tokens;
  p->kbits = g.k_bits;
  p->vbits = g.v_bits;
  p->kkind = g.k_kind;
  p->vkind = g.v_kind;
  p->kg = g.k_group;
  p->vg = g.v_group;
  p->q_dtype = q_dtype;
  p->out_dtype = out_dtype;
  p->qscale = scale * 1.4426950408889634f;
  p->batch = batch;
  if (chk) {
    p->cdev = chk->dev;
    p->crec = chk->rec;
    p->cop = chk->op;
  }
  int64_t maxlen = 0;
  kv_seq_info seq[KV_ATTN_MAX_BATCH];
  for (int32_t i = 0; i < batch; i++) {
    seq[i].slot = slot[i];
    seq[i].len = (int32_t)len[i];
    seq[i].qlen = (int32_t)qlen[i];
    if (i < KV_SEQ_INLINE) p->seq[i] = seq[i];
    maxlen = len[i] > maxlen ? len[i] : maxlen;
  }

  if (rb) return rows_launch(c, g, op, p, seq, maxlen);
  if (mma) return mma_launch(c, g, op, p, seq, maxlen);
  if (qrows != 1)
    return kv_fail(ctx, KIVI_ERR_UNSUPPORTED,
                   "%s: several queries a sequence in one launch need the tensor-core layout", op);

  /* tiles and stages */
  const bool kq = g.k_bits != 16, vq = g.v_bits != 16;
  const int TT = (kq && vq) ? (g.page_tokens < KV_TT_MAX ? g.page_tokens : KV_TT_MAX) : 16;
  const int keb = (kq && g.k_kind == KIVI_KIND_CODEBOOK) ? 2 << g.k_bits : 4;
  const int veb = (vq && g.v_kind == KIVI_KIND_CODEBOOK) ? 2 << g.v_bits : 4;
  const int ngk = TT > g.k_group ? TT / g.k_group : 1;
  const int kbytes = kq ? D * (TT * g.k_bits / 8 + ngk * keb) : TT * D * 2;
  const int vbytes = vq ? TT * D * g.v_bits / 8 + TT * (D / g.v_group) * veb : TT * D * 2;
  int stage = kbytes + vbytes;
  /* window tiles (fp16 rows): 16 tokens, or 8 where 16 would make the stage larger than a page tile */
  const int TTW = 2 * 16 * D * 2 <= stage ? 16 : 8;
  const int wstage = 2 * TTW * D * 2;
  stage = stage > wstage ? stage : wstage;
  p->TTW = TTW;
  p->one = 0x3f800000u;
  p->m19 = 3u << 19;
  p->m21 = 3u << 21;
  p->m4 = 15u << 19;
  stage = (stage + 15) & ~15;
  p->TT = TT;
  p->stage_bytes = stage;

  kv_attn_kernel fn = pick_kernel(D, HC);
  if (!fn) return kv_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: head_dim %d is not built into this library", op, D);
  std::lock_guard<std::mutex> lock(g_kinfo_mu);
  kv_kernel_info *ki = kernel_info(ctx, fn, op, &st);
  if (!ki) return st;
  /* stages: as deep as the register-limited occupancy leaves shared memory for (2..4) */
  const int per_warp_regs = ((ki->regs * 32 + 255) / 256) * 256;
  int by_regs = 65536 / (per_warp_regs * KV_WARPS);
  by_regs = by_regs < 1 ? 1 : (by_regs > 8 ? 8 : by_regs);
  const size_t extra = (size_t)KV_WARPS * KV_TT_MAX * HC * sizeof(float);
  const size_t budget = (size_t)(220 * 1024) / by_regs;
  int nst = (int)((budget > extra ? budget - extra : 0) / ((size_t)KV_WARPS * stage));
  nst = nst < 2 ? 2 : (nst > 4 ? 4 : nst);
  size_t smem = (size_t)KV_WARPS * nst * stage + extra;
  const size_t merge = (size_t)KV_WARPS * HC * (D + 2) * sizeof(float);
  if (smem < merge) smem = merge;
  p->nst = nst;
  if (smem > ki->smem_set) {
    if ((st = kv_cuda(ctx,
                      cudaFuncSetAttribute((const void *)fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                      op, "cudaFuncSetAttribute (k_cache_attend)"))) {
      return st;
    }
    ki->smem_set = smem;
  }
  int bps = 1;
  if ((st = kv_cuda(ctx, cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, (const void *)fn, KV_THREADS, smem), op,
                    "cudaOccupancyMaxActiveBlocksPerMultiprocessor"))) {
    return st;
  }
  if (bps < 1) bps = 1;

  return launch_split(c, op, p, seq, fn, KV_THREADS, smem, bps, TT, maxlen, "k_cache_attend");
}

/* ---------------------------------------------------------------- export ----------------- */

extern "C" {

KIVI_API kivi_status kivi_cache_attend(kivi_cache_t cache, int32_t layer, const int32_t *seqs, int32_t batch,
                                       const void *q, kivi_dtype q_dtype, float scale, int32_t flags, void *out,
                                       kivi_dtype out_dtype) {
  static const char *op = "kivi_cache_attend";
  if (!cache) return kv_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  kivi_ctx_t ctx = cache->ctx;
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  const kivi_cache_config &g = cache->cfg;
  if (layer < 0 || layer >= g.layers)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: layer must be in 0..%d, got %d", op, (int)g.layers - 1, (int)layer);
  if (!seqs) return kv_fail(ctx, KIVI_ERR_ARG, "%s: seqs must not be NULL", op);
  if (batch < 1) return kv_fail(ctx, KIVI_ERR_ARG, "%s: batch must be >= 1, got %d", op, (int)batch);
  if (batch > KV_ATTN_MAX_BATCH)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: batch must be at most %d in the CUDA build (split larger batches), got %d",
                   op, KV_ATTN_MAX_BATCH, (int)batch);
  if (!q) return kv_fail(ctx, KIVI_ERR_ARG, "%s: q must not be NULL", op);
  if (!out) return kv_fail(ctx, KIVI_ERR_ARG, "%s: out must not be NULL", op);
  if (q_dtype != KIVI_F32 && q_dtype != KIVI_F16 && q_dtype != KIVI_BF16)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: q_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                   (int)q_dtype);
  if (out_dtype != KIVI_F32 && out_dtype != KIVI_F16 && out_dtype != KIVI_BF16)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: out_dtype must be KIVI_F32 (0), KIVI_F16 (1) or KIVI_BF16 (2), got %d", op,
                   (int)out_dtype);
  if (!isfinite(scale)) return kv_fail(ctx, KIVI_ERR_ARG, "%s: scale must be finite, got %g", op, (double)scale);
  if (flags & ~(int32_t)KIVI_FLAG_TRUSTED)
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: flags must be 0 or KIVI_FLAG_TRUSTED (1), got %d", op, (int)flags);
  int32_t slot[KV_ATTN_MAX_BATCH];
  int64_t len[KV_ATTN_MAX_BATCH], qlen[KV_ATTN_MAX_BATCH];
  for (int32_t i = 0; i < batch; i++) {
    const int32_t s = seqs[i];
    if (s < 0 || s >= g.max_seqs)
      return kv_fail(ctx, KIVI_ERR_ARG, "%s: seqs[%d] must be in 0..%d, got %d", op, (int)i, (int)g.max_seqs - 1,
                     (int)s);
    if (!cache->live[s])
      return kv_fail(ctx, KIVI_ERR_STATE, "%s: seqs[%d] (sequence %d) is not live", op, (int)i, (int)s);
    slot[i] = s;
    len[i] = cache->len[(int64_t)s * g.layers + layer];
    qlen[i] = cache->qlen[(int64_t)s * g.layers + layer];
    if (len[i] < 1)
      return kv_fail(ctx, KIVI_ERR_STATE, "%s: seqs[%d] (sequence %d) holds no token in layer %d", op, (int)i, (int)s,
                     (int)layer);
    if (len[i] > INT32_MAX - 4096)
      return kv_fail(ctx, KIVI_ERR_UNSUPPORTED, "%s: seqs[%d] holds %lld tokens; attention supports below 2^31", op,
                     (int)i, (long long)len[i]);
  }
  if (!(flags & KIVI_FLAG_TRUSTED)) {
    const int64_t n = (int64_t)batch * g.q_heads * g.head_dim;
    int64_t bad;
    if ((st = kv_cache_scan(ctx, op, q, q_dtype, n, false, KV_SLOT_NONFINITE, &bad))) return st;
    if (bad >= 0) {
      const int64_t row = (int64_t)g.q_heads * g.head_dim;
      char buf[32];
      return kv_fail(ctx, KIVI_ERR_NONFINITE,
                     "%s: q must be finite, got %s at batch %lld, head %d, channel %d; pass KIVI_FLAG_TRUSTED only "
                     "for data known to be finite",
                     op, kv_cache_bad_name(ctx, q, q_dtype, bad, buf), (long long)(bad / row),
                     (int)((bad % row) / g.head_dim), (int)(bad % g.head_dim));
    }
  }
  return kv_attend_launch(cache, op, layer, batch, slot, len, qlen, q, q_dtype, scale, out, out_dtype, NULL);
}

KIVI_API kivi_status kivi_cache_bench_attend(kivi_cache_t cache, int32_t layer, const int32_t *seqs, int32_t batch,
                                             const void *q, kivi_dtype q_dtype, float scale, void *out,
                                             kivi_dtype out_dtype, int32_t iters, float *ms) {
  static const char *op = "kivi_cache_bench_attend";
  if (!cache) return kv_fail(NULL, KIVI_ERR_ARG, "%s: cache must not be NULL", op);
  kivi_ctx_t ctx = cache->ctx;
  kivi_status st = kv_enter(ctx, op);
  if (st) return st;
  if (iters < 1) return kv_fail(ctx, KIVI_ERR_ARG, "%s: iters must be >= 1, got %d", op, (int)iters);
  if (!ms) return kv_fail(ctx, KIVI_ERR_ARG, "%s: ms must not be NULL", op);
  /* the warm-up call validates everything (its errors name kivi_cache_attend) */
  if ((st = kivi_cache_attend(cache, layer, seqs, batch, q, q_dtype, scale, KIVI_FLAG_TRUSTED, out, out_dtype)))
    return st;
  cudaEvent_t e0 = NULL, e1 = NULL;
  float t = 0.0f;
  if ((st = kv_cuda(ctx, cudaEventCreate(&e0), op, "cudaEventCreate")) ||
      (st = kv_cuda(ctx, cudaEventCreate(&e1), op, "cudaEventCreate")) ||
      (st = kv_cuda(ctx, cudaEventRecord(e0, ctx->stream), op, "cudaEventRecord")))
    goto done;
  for (int32_t i = 0; i < iters; i++)
    if ((st = kivi_cache_attend(cache, layer, seqs, batch, q, q_dtype, scale, KIVI_FLAG_TRUSTED, out, out_dtype)))
      goto done;
  if ((st = kv_cuda(ctx, cudaEventRecord(e1, ctx->stream), op, "cudaEventRecord")) ||
      (st = kv_cuda(ctx, cudaEventSynchronize(e1), op, "cudaEventSynchronize")) ||
      (st = kv_cuda(ctx, cudaEventElapsedTime(&t, e0, e1), op, "cudaEventElapsedTime")))
    goto done;
  *ms = t / (float)iters;
done:
  if (e0) cudaEventDestroy(e0);
  if (e1) cudaEventDestroy(e1);
  return st;
}

} /* extern "C" */
