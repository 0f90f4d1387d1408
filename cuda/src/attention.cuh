/*
 * attention.cuh — what the fused decode attention kernels share (attention.cu: the CUDA-core kernel,
 * the selection and the launch; attention_mma.cuh: the tensor-core kernel): the launch parameters, the
 * CTA's share of the grid (one (batch entry, kv head, split, chunk of query heads) a CTA), the merge of
 * the warps' softmax states, and the q / out element access of every dtype.
 */
#ifndef KIVI_ATTENTION_CUH
#define KIVI_ATTENTION_CUH

#include <math.h>

#include "batch.cuh"
#include "cache.cuh"

#define KV_WARPS 4
#define KV_THREADS (32 * KV_WARPS)
#define KV_TT_MAX 64 /* page tile cap */
#define KV_FULL 0xffffffffu
/* sequences whose (slot, len, qlen) ride in the launch parameters; a larger batch's go to the workspace
   (kernel parameters are copied at every launch: 512 entries made them 6 KB) */
#define KV_SEQ_INLINE 16

struct kv_seq_info {
  int32_t slot, len, qlen;
};

struct kv_attn_params {
  const uint8_t *kpool, *vpool; /* this layer's pools */
  const uint16_t *kwin, *vwin;  /* all windows */
  const int32_t *table;         /* device [max_seqs][max_pages] */
  const void *q;
  void *out;
  float *ws;               /* [batch][q_heads][nsplit][D + 2] */
  float *lse;              /* [batch][q_heads] natural log-sum-exp where the output is written, or NULL */
  const kv_seq_info *dseq; /* [batch], where batch > KV_SEQ_INLINE */
  kv_batch_dev *cdev;      /* a checked decode batch: q is checked on the device (NULL: not checked) */
  kivi_batch_record *crec;
  int32_t cop;
  uint64_t kpage, vpage;
  uint32_t khead, vhead, kcodes, vcodes;
  int32_t max_pages, layers, layer, kvh, qh, ratio, nhc, W, P;
  int32_t kbits, vbits, kkind, vkind, kg, vg;
  int32_t q_dtype, out_dtype;
  float qscale;
  int32_t nsplit, chunk, batch;
  int32_t qrows;   /* queries a sequence (1: decode): row i of qrows of a head sees len - qrows + i + 1 tokens */
  int32_t rb;      /* k_attend_rows: blocks of 16 query rows a CTA (1, 2, 4); 0 for the other kernels */
  int32_t qdirect; /* q, out and lse in the caller's order [batch][qrows][heads] (kv_row_at), not the rows' */
  int32_t TT, TTW, nst, stage_bytes;
  /* bit patterns kept out of the immediates, so that (x & mask) | 1.0f is one LOP3 */
  uint32_t one, m19, m21, m4;
  kv_seq_info seq[KV_SEQ_INLINE];
};

typedef void (*kv_attn_kernel)(const kv_attn_params);

__device__ __forceinline__ float kv_h2f(uint32_t h16) { return __half2float(__ushort_as_half((unsigned short)h16)); }

/* element i of x as its bits (a 16-bit dtype in the low half), and those bits as a float */
__device__ __forceinline__ uint32_t kv_bits_any(const void *x, int dt, int64_t i) {
  return dt == KIVI_F32 ? ((const uint32_t *)x)[i] : ((const uint16_t *)x)[i];
}
__device__ __forceinline__ float kv_bits_float(uint32_t u, int dt) {
  return dt == KIVI_F32 ? __uint_as_float(u) : dt == KIVI_F16 ? kv_h2f(u) : __uint_as_float(u << 16);
}
__device__ __forceinline__ void kv_store_out(void *x, int dt, int64_t i, float v) {
  if (dt == KIVI_F32)
    ((float *)x)[i] = v;
  else if (dt == KIVI_F16)
    ((uint16_t *)x)[i] = __half_as_ushort(__float2half_rn(v));
  else
    ((uint16_t *)x)[i] = kivi_f32_to_bf16(v);
}

/* The row of q, out and lse that holds row oh (batch entry x p.qh + row of the entry) of the launch: itself,
   or with p.qdirect (several queries a sequence, every sequence with p.qrows of them) the caller's row of
   the entry's query i, head hk ratio + r for the launch's row (hk, i, r) of the entry. */
__device__ __forceinline__ int64_t kv_row_at(const kv_attn_params &p, int64_t oh) {
  if (!p.qdirect) return oh;
  const int64_t b = oh / p.qh;
  const int v = (int)(oh - b * p.qh), rh = p.ratio / p.qrows; /* rh: query heads a KV head */
  const int hk = v / p.ratio, w = v - hk * p.ratio, i = w / rh;
  return (b * p.qrows + i) * (p.qh / p.qrows) + hk * rh + (w - i * rh);
}

__device__ __forceinline__ kv_seq_info kv_seq_of(const kv_attn_params &p, int b) {
  return p.batch <= KV_SEQ_INLINE ? p.seq[b] : p.dseq[b];
}

/* The work of one CTA: chunk hc of the query heads of kv head hkv of batch entry b, split `split`,
   which covers tokens [a0, e0) of the sequence: pages up to pend, the fp16 window from ws0. A CTA
   with a0 >= si.len has nothing to do. */
struct kv_cta {
  int hc, split, hkv, b;
  kv_seq_info si;
  int a0, e0, pend, ws0;
};
__device__ __forceinline__ kv_cta kv_cta_at(const kv_attn_params &p, int bid) {
  kv_cta c;
  c.hc = bid % p.nhc;
  bid /= p.nhc;
  c.split = bid % p.nsplit;
  bid /= p.nsplit;
  c.hkv = bid % p.kvh;
  c.b = bid / p.kvh;
  c.si = kv_seq_of(p, c.b);
  c.a0 = c.split * p.chunk;
  c.e0 = min(c.a0 + p.chunk, c.si.len);
  c.pend = min(c.e0, c.si.qlen);
  c.ws0 = max(c.a0, c.si.qlen);
  return c;
}
__device__ __forceinline__ kv_cta kv_cta_of(const kv_attn_params &p) { return kv_cta_at(p, blockIdx.x); }
/** The CTA's work again, from a fresh read of %ctaid.x that the compiler cannot merge with the first:
    what the merge needs is recomputed at the end rather than held in registers through the loops. */
__device__ __forceinline__ kv_cta kv_cta_again(const kv_attn_params &p) {
  int bid;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(bid));
  return kv_cta_at(p, bid);
}

/* q element gi (its bits u), element elem of batch entry b's row, scaled to log2 units; with a checked
   batch (p.cdev, check) a NaN or Inf joins the call's first bad element (rare: straight to the device
   word). */
__device__ __forceinline__ float kv_q_at(const kv_attn_params &p, int b, int64_t elem, int64_t gi, bool check) {
  const uint32_t u = kv_bits_any(p.q, p.q_dtype, gi);
  if (check) {
    const int32_t kind = kivi_bad_kind(u, p.q_dtype, 0);
    if (kind >= 0) atomicMin(&p.cdev->first, (unsigned long long)kivi_check_key(b, 0, elem, kind));
  }
  return kv_bits_float(u, p.q_dtype) * p.qscale;
}
/* The last thing every thread of every CTA of the launch that writes the outs does (a CTA with no
   tokens too): with a checked batch the CTA counts itself done, and the launch's last CTA publishes a
   bad q to the batch's record and, when this call or an unread earlier one met one, fills every out
   with NaN (kv_batch_finish). k_attend_combine calls it when the sequence is split, else the attention
   kernel (kv_attn_cta_done). */
template <int D>
__device__ __forceinline__ void kv_attn_finish(const kv_attn_params &p) {
  if (!p.cdev) return;
  __threadfence(); /* this thread's outs and atomicMin come before the CTA's count */
  if (!kv_batch_finish(KIVI_CHECK_NONE, p.cdev, p.crec, p.cop, p.layer)) return;
  const int64_t n = (int64_t)p.batch * p.qh * D;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (p.out_dtype == KIVI_F32)
      ((uint32_t *)p.out)[i] = 0x7fc00000u;
    else
      ((uint16_t *)p.out)[i] = p.out_dtype == KIVI_F16 ? 0x7e00u : 0x7fc0u;
  }
}
/* The end of an attention kernel's CTA: it writes the outs (and so finishes a checked batch) only when
   the sequence is not split. */
template <int D>
__device__ __forceinline__ void kv_attn_cta_done(const kv_attn_params &p) {
  if (p.nsplit == 1) kv_attn_finish<D>(p);
}

/* Splits of the launch that hold tokens of a sequence of len tokens (the others return at once). */
__device__ __forceinline__ int kv_splits_of(const kv_attn_params &p, int len) {
  return min(p.nsplit, (len + p.chunk - 1) / p.chunk);
}
/* Output channel d of query head oh (batch entry x q_heads + head) from its ns splits' partials in the
   workspace (max, sum, unnormalised output). */
template <int D>
__device__ __forceinline__ float kv_merge_splits(const kv_attn_params &p, int64_t oh, int d, int ns) {
  const float *base = p.ws + oh * p.nsplit * (D + 2);
  float M = -INFINITY;
  for (int s = 0; s < ns; s++) M = fmaxf(M, base[s * (D + 2)]);
  float L = 0.0f, O = 0.0f;
  for (int s = 0; s < ns; s++) {
    const float *r = base + s * (D + 2);
    const float f = r[0] == -INFINITY ? 0.0f : exp2f(r[0] - M);
    L = fmaf(r[1], f, L);
    O = fmaf(r[2 + d], f, O);
  }
  return O / L;
}
/* The natural log-sum-exp of query head oh from its ns splits' partials: ln 2 (max + log2 sum), the
   scores being in log2 units. */
template <int D>
__device__ __forceinline__ float kv_merge_lse(const kv_attn_params &p, int64_t oh, int ns) {
  const float *base = p.ws + oh * p.nsplit * (D + 2);
  float M = -INFINITY;
  for (int s = 0; s < ns; s++) M = fmaxf(M, base[s * (D + 2)]);
  float L = 0.0f;
  for (int s = 0; s < ns; s++)
    L = fmaf(base[s * (D + 2) + 1], base[s * (D + 2)] == -INFINITY ? 0.0f : exp2f(base[s * (D + 2)] - M), L);
  return (M + log2f(L)) * 0.69314718055994531f;
}

/* Merges NW warps' rows (max, sum, unnormalised output [D]) at cw + (w * rows + h) * (D + 2) for heads
   h < nh (a warp that saw no token has max -inf), then writes head oh0 + h's output, or its split's
   partials to the workspace (k_attend_combine merges them). */
template <int D, int NW>
__device__ __forceinline__ void kv_merge_warps(const kv_attn_params &p, const float *cw, int rows, int nh,
                                               int64_t oh0) {
  const kv_cta cta = kv_cta_again(p);
  for (int idx = threadIdx.x; idx < nh * D; idx += blockDim.x) {
    const int h = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < NW; w++) M = fmaxf(M, cw[(w * rows + h) * (D + 2)]);
    float L = 0.0f, O = 0.0f;
#pragma unroll
    for (int w = 0; w < NW; w++) {
      const float *row = cw + (w * rows + h) * (D + 2);
      const float f = row[0] == -INFINITY ? 0.0f : exp2f(row[0] - M);
      L = fmaf(row[1], f, L);
      O = fmaf(row[2 + d], f, O);
    }
    const int64_t oh = oh0 + h;
    if (p.nsplit == 1) {
      const int64_t orow = kv_row_at(p, oh);
      kv_store_out(p.out, p.out_dtype, orow * D + d, O / L);
      if (p.lse && d == 0) p.lse[orow] = (M + log2f(L)) * 0.69314718055994531f; /* scores in log2 units */
    } else {
      float *wr = p.ws + (oh * p.nsplit + cta.split) * (D + 2);
      if (d == 0) {
        wr[0] = M;
        wr[1] = L;
      }
      wr[2 + d] = O;
    }
  }
}

/* Merges the splits of one (batch entry, query head): block of D threads. (Merging in the last CTA of
   each unit to finish, with a counter a unit, saved 0.5 us at 1x4096 but cost 8-15 % at 8x32768 on an
   H200, same run: it is not done.) */
template <int D>
static __global__ void __launch_bounds__(D) k_attend_combine(const __grid_constant__ kv_attn_params p) {
  const int oh = blockIdx.x, d = threadIdx.x;
  const int ns = kv_splits_of(p, kv_seq_of(p, oh / p.qh).len);
  const int64_t orow = kv_row_at(p, oh);
  kv_store_out(p.out, p.out_dtype, orow * D + d, kv_merge_splits<D>(p, oh, d, ns));
  if (p.lse && d == 0) p.lse[orow] = kv_merge_lse<D>(p, oh, ns);
  kv_attn_finish<D>(p);
}

#define KV_MMA_WARPS 4
#define KV_MMA_THREADS (32 * KV_MMA_WARPS)
#define KV_MMA_HEADS 8 /* query heads per CTA: the n (or m) extent of one fragment */
/* a warp's key A fragments for each head, as the owner lanes read them: per (head, quad lane) NCH x
   {hi, mid, hi, mid} (one m16n8k32 A: rows 0-7 the hi plane, rows 8-15 the mid plane) then NCH x
   {lo, 0, lo, 0} (the zeros written once: the fragments load straight into MMA operands); a head's 4
   quad lanes padded by 4 words against bank conflicts */
__host__ __device__ constexpr int kv_mma_aw(int D) { return 4 * 8 * (D / 32) + 4; }
/** Bytes of one ring stage of the tensor-core kernel (32 tokens): key codes, key params (half2 a
    channel), value codes, then the value param planes (scale and zero, or c0..c3 for a codebook: npl)
    of D / VG groups, a half a token and group. */
__host__ __device__ constexpr int kv_mma_stage_bytes(int D, int VG, int npl) {
  return 32 * D / 4 + D * 4 + 2 * D * 4 + npl * (D / VG) * 64;
}
/* The key side of the tensor-core kernel: q s as int8 planes rebuilt each key group (any ratio; kept for
   comparison, KIVI_MMA_KEYS=planes), the turned-around key MMA of one query head a KV head (T1), or q
   fixed with the scale applied per k-step in fp16 (QF, several query heads a KV head:
   attention_mma_keys16.cuh). */
enum kv_mma_keys { KV_KEYS_PLANES = 0, KV_KEYS_T1 = 1, KV_KEYS_QF = 2 };
/** Bytes of the CTA's fragment slices of the int8-plane key side: one per warp and head of the CTA (at
    most 8, the GQA ratio); none for the q-fixed key side (KV_KEYS_QF). */
__host__ __device__ constexpr size_t kv_mma_abuf_bytes(int D, int ratio, int keys) {
  return keys == KV_KEYS_QF
             ? 0
             : (size_t)KV_MMA_WARPS * (ratio < KV_MMA_HEADS ? ratio : KV_MMA_HEADS) * kv_mma_aw(D) * sizeof(uint32_t);
}

/* Tensor-core kernels (attention_mma_uniform.cu, attention_mma_codebook.cu): the instantiation for
   head_dim D, value group VG, key side `keys` (kv_mma_keys) and 4 rather than 3 CTAs a SM (many); NULL
   where none is built. */
kv_attn_kernel kv_mma_kernel_uniform(int D, int VG, int keys, bool many);
kv_attn_kernel kv_mma_kernel_codebook(int D, int VG, int keys, bool many);
/* Ring stages a warp of the tensor-core kernels (3 and 5 measured slower than 4 on an H200). */
#define KV_MMA_NST 4

/* k_attend_rows (attention_rows.cuh): 16 query rows a warp, for several queries a sequence on layers in the
   tensor-core layout with at least KV_ROWS_MIN query rows a KV head (query heads x queries a sequence). */
#define KV_ROWS_MIN 16
/** Bytes of a warp's q' fragments in k_attend_rows: D / 16 k-steps x {hi, lo} x 32 lanes x 4 words. */
__host__ __device__ constexpr int kv_rows_qfrag_bytes(int D) { return (D / 16) * 2 * 32 * 16; }
/** Dynamic shared memory of k_attend_rows: q rows [16 rb][D] f32, the warps' q' fragments, then the rings
    (stage bytes each, nst a warp) or the merge [4][16][D + 2] f32 over them, whichever is larger. */
__host__ __device__ constexpr size_t kv_rows_smem(int D, int rb, int nst, int stage) {
  return (size_t)16 * rb * D * 4 + (size_t)KV_MMA_WARPS * kv_rows_qfrag_bytes(D) +
         ((size_t)KV_MMA_WARPS * nst * stage > (size_t)KV_MMA_WARPS * 16 * (D + 2) * 4
              ? (size_t)KV_MMA_WARPS * nst * stage
              : (size_t)KV_MMA_WARPS * 16 * (D + 2) * 4);
}
/* The k_attend_rows instantiation for head_dim D, value group VG and value format vk (0 uniform, 1 codebook;
   attention_rows.cu); NULL where none is built. */
kv_attn_kernel kv_rows_kernel(int D, int VG, int vk);

#endif /* KIVI_ATTENTION_CUH */
