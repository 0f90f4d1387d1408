/*
 * attention_mma_parts.cuh — what the tensor-core decode attention (attention_mma.cuh) is built from: the
 * MMA instructions and the bit casts around them, the online-softmax step of a warp's fragments, and the
 * cp.async ring that streams a warp's page tiles. Included by attention_mma.cuh.
 */
#ifndef KIVI_ATTENTION_MMA_PARTS_CUH
#define KIVI_ATTENTION_MMA_PARTS_CUH

#include "attention.cuh"

__device__ __forceinline__ void kv_mma_s8u8(int (&c)[4], const uint4 a, uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.u8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
               : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void kv_mma_u8s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void kv_mma_f16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                           uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
/** 2^x by the hardware's approximation (as exp2f, whose extra steps only keep subnormal results:
    probabilities below 2^-126 are 0 here) */
__device__ __forceinline__ float kv_ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
/** x, opaque to the optimizer: computed once (before a loop) and kept in a register, where NVVM would
    otherwise derive lane-dependent offsets from %tid.x again inside every iteration */
__device__ __forceinline__ uint32_t kv_keep(uint32_t x) {
  asm volatile("" : "+r"(x));
  return x;
}
__device__ __forceinline__ uint32_t kv_h2u(__half2 h) { return *reinterpret_cast<uint32_t *>(&h); }
__device__ __forceinline__ __half2 kv_u2h(uint32_t u) { return *reinterpret_cast<__half2 *>(&u); }
/* two floats to half2 (lo, hi), round to nearest */
__device__ __forceinline__ uint32_t kv_pack_h2(float lo, float hi) { return kv_h2u(__floats2half2_rn(lo, hi)); }

/* O^T and Z columns (heads 2 tig, 2 tig + 1 of this lane's fragments) times c0, c1. */
template <int NMT>
__device__ __forceinline__ void kv_mma_rescale(float (&o)[NMT][4], float (&zacc)[4], float c0, float c1) {
#pragma unroll
  for (int i = 0; i < NMT; i++) {
    o[i][0] *= c0;
    o[i][1] *= c1;
    o[i][2] *= c0;
    o[i][3] *= c1;
  }
  zacc[0] *= c0;
  zacc[1] *= c1;
}
/* One online-softmax step (max m, sum l of head gid) over this lane's scores s[4][2] (the first 2 nb rows),
   then p (in place). */
template <int NMT>
__device__ __forceinline__ void kv_mma_softmax(float &m, float &l, float (&o)[NMT][4], float (&zacc)[4],
                                               float (&s)[4][2], int nb, int tig) {
  float tm = -INFINITY;
#pragma unroll
  for (int j = 0; j < 4; j++)
    if (j < 2 * nb) tm = fmaxf(tm, fmaxf(s[j][0], s[j][1]));
  tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, 1));
  tm = fmaxf(tm, __shfl_xor_sync(KV_FULL, tm, 2));
  const float mn = fmaxf(m, tm);
  /* a row that has seen no token yet (several queries a sequence: later ones see more) keeps max -inf and
     sum 0: 0 stands in for the max in the exponents */
  const float mb = mn == -INFINITY ? 0.0f : mn;
  const float corr = kv_ex2(m - mb);
  m = mn;
  float ls = 0.0f;
#pragma unroll
  for (int j = 0; j < 4; j++)
#pragma unroll
    for (int e = 0; e < 2; e++) {
      s[j][e] = j < 2 * nb ? kv_ex2(s[j][e] - mb) : 0.0f;
      ls += s[j][e];
    }
  l = fmaf(l, corr, ls);
  if (__any_sync(KV_FULL, corr != 1.0f)) {
    /* columns of this lane's O^T / Z fragments are heads 2 tig, 2 tig + 1 */
    kv_mma_rescale(o, zacc, __shfl_sync(KV_FULL, corr, 8 * tig), __shfl_sync(KV_FULL, corr, 8 * tig + 4));
  }
}

/* The online-softmax step of a page tile's scores (rows = heads; this lane's row sees the tile's first rem
   tokens, all of them from 32), then p as fp16 pairs (s[2 r][0], s[2 r + 1][0]: run r), as the value
   MMAs take them. */
template <int NMT>
__device__ __forceinline__ void kv_mma_softmax_p(float &m, float &l, float (&o)[NMT][4], float (&zacc)[4],
                                                 float (&s)[4][2], int tig, int rem) {
  if (rem < 32) /* several queries a sequence: this lane's row sees the tile's first rem tokens */
#pragma unroll
    for (int j = 0; j < 4; j++)
#pragma unroll
      for (int e = 0; e < 2; e++)
        if (16 * (j >> 1) + (j & 1) + 2 * tig + 8 * e >= rem) s[j][e] = -INFINITY;
  kv_mma_softmax(m, l, o, zacc, s, 2, tig);
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const uint32_t ph0 = kv_pack_h2(s[2 * r][0], s[2 * r][1]), ph1 = kv_pack_h2(s[2 * r + 1][0], s[2 * r + 1][1]);
    s[2 * r][0] = __uint_as_float(ph0);
    s[2 * r + 1][0] = __uint_as_float(ph1);
  }
}

/* This lane's roles and the byte offsets of what it reads and writes in every tile, computed once and kept
   in registers (kv_keep): in a stage its key params, key words and value words, scales and zeros; its q
   channels; its fragment words in the warp's slice (written) and its own fragments (read). */
struct kv_mma_lane {
  int warp, lane, gid, tig;
  uint32_t o_kpar, o_q, o_kw, o_vs, o_vw, o_vz, o_aw, o_ar;
};

/* The key words of a page tile's 4 n-tiles of 8 tokens (n-tile j, column gid: token 16 (j / 2) + (j % 2) +
   2 (gid / 2) + 8 (gid % 2), at o_kw): D / 64 words of each, this lane's channels. */
template <int D>
__device__ __forceinline__ void kv_mma_key_words(const uint8_t *stg, uint32_t o_kw, uint32_t (&kw)[4][2]) {
#pragma unroll
  for (int j = 0; j < 4; j++) {
    const uint8_t *kr = stg + o_kw + (16 * (j >> 1) + (j & 1)) * (D / 4);
    if constexpr (D == 128) {
      const uint2 u = *(const uint2 *)kr;
      kw[j][0] = u.x;
      kw[j][1] = u.y;
    } else {
      kw[j][0] = *(const uint32_t *)kr;
      kw[j][1] = 0u;
    }
  }
}

/* This lane's D / 32 value words of run r of a page tile (word q holds m-tiles 2q and 2q + 1 of V^T,
   kivi_mma_value_code; at o_vw). */
template <int D>
__device__ __forceinline__ void kv_mma_value_words(const uint8_t *stg, uint32_t o_vw, int r, uint32_t (&vw)[D / 32]) {
  if constexpr (D == 128) {
    const uint4 u = *(const uint4 *)(stg + o_vw + 4 * r * D);
    vw[0] = u.x, vw[1] = u.y, vw[2] = u.z, vw[3] = u.w;
  } else {
    const uint2 u = *(const uint2 *)(stg + o_vw + 4 * r * D);
    vw[0] = u.x, vw[1] = u.y;
  }
}

/* What the copy of a warp's page tiles needs, tile-independent: this head's bases and each lane's offsets
   within a page and a stage (32-bit: a page is far below 4 GB), kept (kv_keep). */
struct kv_mma_ring {
  const int32_t *trow;
  const uint8_t *kh, *vh;
  int my_pt, tok0, lgP, lgK;
  int tstride; /* tokens from one of the warp's tiles to the next */
  uint32_t kpage, vpage, tmask, l16, kp_l, vp_l, vp_row8, st_l;
  bool kp_all;
};

/* The page of the warp's page tile i (0 past its tiles). */
__device__ __forceinline__ uint32_t kv_mma_tile_page(const kv_mma_ring &r, int i) {
  return i < r.my_pt ? (uint32_t)r.trow[(r.tok0 + i * r.tstride) >> r.lgP] : 0u;
}
/* Starts the copy of the warp's page tile i (in page `page`) into its ring stage i % NST, then commits the
   group (an empty one past the warp's tiles). */
template <int D, int VG, int NPL, int NST>
__device__ __forceinline__ void kv_mma_issue_tile(const kv_mma_ring &r, int lane, int i, uint32_t page) {
  constexpr int KCB = 32 * D / 4, KPB = D * 4, VCB = 2 * D * 4, NVP = NPL * (D / VG) * 64 / 16;
  constexpr int stage = kv_mma_stage_bytes(D, VG, NPL);
  const int my_pt = r.my_pt, tok0 = r.tok0, lgK = r.lgK;
  const uint8_t *kh = r.kh, *vh = r.vh;
  const uint32_t kpage = r.kpage, vpage = r.vpage, tmask = r.tmask, l16 = r.l16, kp_l = r.kp_l, vp_l = r.vp_l;
  const uint32_t vp_row8 = r.vp_row8, st_l = r.st_l;
  const bool kp_all = r.kp_all;
  if (i < my_pt) {
    /* the tile's index in its page: every offset is linear in it (key codes and value codes both
       take 8 D bytes a tile, key params D * 4 a group, value scales 64 bytes) */
    const uint32_t ti = ((uint32_t)(tok0 + i * r.tstride) >> 5) & tmask, co = l16 + ti * (8 * D);
    const uint8_t *kb = kh + (uint64_t)page * kpage, *vb = vh + (uint64_t)page * vpage;
    const uint32_t st = st_l + (uint32_t)((i % NST) * stage);
    const uint8_t *kc = kb + co, *kp = kb + (kp_l + ((ti * 32) >> lgK) * (D * 4));
    const uint8_t *vc = vb + co, *vp = vb + (vp_l + ti * 64);
#pragma unroll
    for (int k = 0; k < KCB; k += 512) kv_cpa<16>(st + k, kc + k);
#pragma unroll
    for (int k = 0; k < KPB; k += 512)
      if (k + 512 <= KPB || kp_all) kv_cpa<16>(st + KCB + k, kp + k);
#pragma unroll
    for (int k = 0; k < VCB; k += 512) kv_cpa<16>(st + KCB + KPB + k, vc + k);
#pragma unroll
    for (int j = 0; j < (NVP + 31) / 32; j++)
      if (NVP % 32 == 0 || lane + 32 * j < NVP) kv_cpa<16>(st + (KCB + KPB + VCB + 512 * j), vp + j * vp_row8);
  }
  kv_commit();
}

/* The ring of a warp whose page tiles are i = 0 .. my_pt - 1 at tokens tok0 + i tstride of KV head hkv (block
   table row trow), streamed into `ring` (shared, NST stages of kv_mma_stage_bytes): what does not depend on
   the tile, this head's bases and each lane's offsets within a page and a stage (32-bit: a page is far below
   4 GB), computed once and kept (kv_keep). The copies of the first NST - 1 tiles are started; the page of
   tile NST - 1 is returned for kv_mma_ring_next. */
template <int D, int VG, int NPL, int NST>
__device__ __forceinline__ uint32_t kv_mma_ring_start(kv_mma_ring &r, const kv_attn_params &p, const int32_t *trow,
                                                      int hkv, int lane, uint8_t *ring, int tok0, int my_pt,
                                                      int tstride) {
  constexpr int KPB = D * 4;
  r.trow = trow, r.lgP = __ffs(p.P) - 1, r.lgK = __ffs(p.kg) - 1, r.my_pt = my_pt, r.tok0 = tok0;
  r.tstride = tstride;
  r.kh = p.kpool + (uint64_t)hkv * p.khead, r.vh = p.vpool + (uint64_t)hkv * p.vhead;
  r.kpage = (uint32_t)p.kpage, r.vpage = (uint32_t)p.vpage, r.tmask = (uint32_t)(p.P / 32 - 1);
  /* value params: copy c = lane + 32 j of a tile is row c / 4 (plane x group) of the params area, 16 bytes
     (c % 4) in; rows are P halves apart in the page (8 rows: vp_row8), 64 bytes in the stage */
  r.l16 = kv_keep(16u * lane), r.kp_l = kv_keep((uint32_t)p.kcodes + 16u * lane);
  r.vp_l = kv_keep((uint32_t)p.vcodes + (uint32_t)((lane / 4) * p.P * 2 + 16 * (lane % 4)));
  r.vp_row8 = (uint32_t)(16 * p.P);
  r.st_l = kv_keep((uint32_t)__cvta_generic_to_shared(ring) + 16u * lane);
  r.kp_all = KPB % 512 == 0 || 16 * lane < KPB % 512;
#pragma unroll
  for (int i = 0; i < NST - 1; i++) kv_mma_issue_tile<D, VG, NPL, NST>(r, lane, i, kv_mma_tile_page(r, i));
  return kv_mma_tile_page(r, NST - 1);
}
/* Tile i of the warp's ring: starts the copy of tile i + NST - 1 (its page in next_page, which becomes tile
   i + NST's), waits for tile i, and returns its stage's offset in the ring. */
template <int D, int VG, int NPL, int NST>
__device__ __forceinline__ uint32_t kv_mma_ring_next(const kv_mma_ring &r, int lane, int i, uint32_t &next_page) {
  const uint32_t pg = next_page;
  next_page = kv_mma_tile_page(r, i + NST);
  kv_mma_issue_tile<D, VG, NPL, NST>(r, lane, i + NST - 1, pg);
  kv_wait(NST - 1);
  __syncwarp();
  return (uint32_t)((i % NST) * kv_mma_stage_bytes(D, VG, NPL));
}

#endif /* KIVI_ATTENTION_MMA_PARTS_CUH */
