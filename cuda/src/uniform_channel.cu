/*
 * uniform_channel.cu — kivi_uniform_quantize along the channel axis (values, a group = G consecutive
 * columns): for 16-bit values a lane owns a whole group and a warp's 32 groups stream into a per-warp
 * cp.async ring (k_uniform_quantize_channel_lane); f32 or unaligned input uses
 * k_uniform_quantize_channel, where G / chunk lanes share a group and reduce min/max with
 * __shfl_xor_sync.
 */
#include "uniform.cuh"

/* ---------------------------------------------------------------- quantize, channel axis - */

#define KV_U 4 /* chunks per lane per iteration: 4 x 16 bytes in flight */

/* Chunk i = elements [i * V, (i + 1) * V) of the flat matrix; group of chunk i = i / L. */
template <int DT, int G, int BITS>
static __global__ void __launch_bounds__(256)
    k_uniform_quantize_channel(const void *__restrict__ x, int64_t nchunks, bool aligned, uint32_t *__restrict__ codes,
                               uint16_t *__restrict__ scale, uint16_t *__restrict__ zero) {
  constexpr int V = kv_vec<DT>::n, L = G / V, CB = V * BITS, LPW = 32 / CB;
  static_assert(L >= 1 && L <= 32 && (L & (L - 1)) == 0, "lanes per group");
  static_assert(CB <= 32 && 32 % CB == 0 && L % LPW == 0, "lanes per word");
  const int lane = threadIdx.x & 31;
  const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int64_t nwarps = ((int64_t)gridDim.x * blockDim.x) >> 5;
  /* base is warp-uniform and a multiple of 32, so a group (L aligned lanes) is all in or all out */
  for (int64_t base = warp * (32 * KV_U); base < nchunks; base += nwarps * (32 * KV_U)) {
    float v[KV_U][V];
#pragma unroll
    for (int u = 0; u < KV_U; u++) {
      const int64_t i = base + u * 32 + lane;
      if (i < nchunks) {
        kv_ld_chunk<DT>(x, i * V, aligned, v[u]);
      } else {
#pragma unroll
        for (int j = 0; j < V; j++) v[u][j] = 0.0f;
      }
    }
#pragma unroll
    for (int u = 0; u < KV_U; u++) {
      const int64_t i = base + u * 32 + lane;
      const bool ok = i < nchunks;
      float mn = v[u][0], mx = v[u][0];
#pragma unroll
      for (int j = 1; j < V; j++) {
        mn = fminf(mn, v[u][j]);
        mx = fmaxf(mx, v[u][j]);
      }
#pragma unroll
      for (int off = L / 2; off >= 1; off >>= 1) {
        mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      }
      const kv_up pr = kv_uparams<BITS>(mn, mx);
      uint32_t piece = 0;
#pragma unroll
      for (int j = 0; j < V; j++) piece |= kv_ucode<BITS>(v[u][j], pr.z, pr.s, pr.rinv) << (BITS * j);
      if constexpr (LPW > 1) {
        piece <<= CB * (lane % LPW);
#pragma unroll
        for (int off = LPW / 2; off >= 1; off >>= 1) piece |= __shfl_xor_sync(0xffffffffu, piece, off);
      }
      if (ok && lane % LPW == 0) codes[i / LPW] = piece;
      if (ok && lane % L == 0) {
        scale[i / L] = pr.sh;
        zero[i / L] = pr.zh;
      }
    }
  }
}

/*
 * Channel axis, 16-bit values (the common case): a lane owns a whole group, so its params (and, at 2
 * bits, thresholds) are worked out once and not by every lane of the group. A warp takes blocks of 32
 * consecutive groups (32 * G * 2 contiguous bytes); the block streams into the warp's own ring of
 * NST shared-memory stages by cp.async (coalesced 16-byte copies, no registers held while in flight),
 * laid out with one pad chunk per group so that each lane then reads its group's chunks without bank
 * conflicts. Pairs of neighbouring values share a 32-bit lane of the compares; kv_shuffle2 puts the
 * even and odd values' codes back in order.
 */
#define KV_CL_WARPS 4

template <int G>
struct kv_cl {
  static constexpr int CPG = G / 8;            /* 16-byte chunks per group */
  static constexpr int NST = G >= 128 ? 2 : 3; /* stages per warp */
  static constexpr int SLOT = 32 * (CPG + 1);  /* chunks per stage, pads included */
  static constexpr int SMEM = KV_CL_WARPS * NST * SLOT * 16;
};

template <int DT, int G, int BITS>
static __global__ void __launch_bounds__(KV_CL_WARPS * 32)
    k_uniform_quantize_channel_lane(const void *__restrict__ x, int64_t ngroups, uint32_t *__restrict__ codes,
                                    uint16_t *__restrict__ scale, uint16_t *__restrict__ zero) {
  using C = kv_cl<G>;
  constexpr int CPG = C::CPG, NST = C::NST, SLOT = C::SLOT, WPG = G * BITS / 32;
  extern __shared__ uint4 kv_cl_ring[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const uint4 *ring = kv_cl_ring + warp * NST * SLOT;
  const uint32_t sring = (uint32_t)__cvta_generic_to_shared(ring);
  const int64_t w0 = (int64_t)blockIdx.x * KV_CL_WARPS + warp, nw = (int64_t)gridDim.x * KV_CL_WARPS;
  const int64_t nblk = (ngroups + 31) / 32;
  /* the warp's blocks are blk = w0, w0 + nw, ...; one cp.async group per block (empty past the
     end) into stage st of the ring */
  auto issue = [&](int64_t blk, int st) {
    if (blk < nblk) {
      const int64_t g0 = blk * 32, n = (ngroups - g0 < 32 ? ngroups - g0 : 32) * CPG;
      const uint4 *src = (const uint4 *)x + g0 * CPG;
      const uint32_t sa = sring + (uint32_t)(st * SLOT * 16);
#pragma unroll
      for (int q = 0; q < CPG; q++) {
        const int ci = q * 32 + lane;
        if (ci < n) kv_cpa<16>(sa + (uint32_t)(ci + ci / CPG) * 16u, src + ci);
      }
    }
    kv_commit();
  };
#pragma unroll
  for (int b = 0; b < NST - 1; b++) issue(w0 + b * nw, b);
  int st = 0; /* stage of blk; the block NST - 1 ahead goes into the stage before it */
  for (int64_t blk = w0; blk < nblk; blk += nw, st = st + 1 == NST ? 0 : st + 1) {
    issue(blk + (NST - 1) * nw, st == 0 ? NST - 1 : st - 1);
    kv_wait(NST - 1);
    __syncwarp();
    uint32_t raw[G / 2];
    const uint4 *mine = ring + st * SLOT + lane * (CPG + 1);
#pragma unroll
    for (int q = 0; q < CPG; q++) {
      const uint4 u = mine[q];
      raw[4 * q] = u.x;
      raw[4 * q + 1] = u.y;
      raw[4 * q + 2] = u.z;
      raw[4 * q + 3] = u.w;
    }
    __syncwarp(); /* every lane has read the stage before the next issue refills it */
    const int64_t g = blk * 32 + lane;
    if (g >= ngroups) continue;
    uint32_t mn2 = raw[0], mx2 = raw[0];
#pragma unroll
    for (int j = 1; j < G / 2; j++) {
      mn2 = kv_min2<DT>(mn2, raw[j]);
      mx2 = kv_max2<DT>(mx2, raw[j]);
    }
    const float mn = fminf(kv_word_elem<DT>(mn2, 0), kv_word_elem<DT>(mn2, 1));
    const float mx = fmaxf(kv_word_elem<DT>(mx2, 0), kv_word_elem<DT>(mx2, 1));
    if constexpr (BITS == 2) {
      const kv_u2 q = kv_u2_group<DT>(mn, mx);
      const uint32_t t1 = q.t1 * 0x10001u, t2 = q.t2 * 0x10001u, t3 = q.t3 * 0x10001u;
#pragma unroll
      for (int w = 0; w < WPG; w++) {
        uint32_t acc = 0; /* even values' codes in the low half, odd values' in the high half */
#pragma unroll
        for (int p = 0; p < 8; p++) acc |= kv_u2_pair<DT>(raw[8 * w + p], t1, t2, t3, p);
        codes[g * WPG + w] = kv_shuffle2(acc);
      }
      scale[g] = q.sh;
      zero[g] = q.zh;
    } else {
      const kv_up q = kv_uparams<BITS>(mn, mx);
#pragma unroll
      for (int w = 0; w < WPG; w++) {
        uint32_t word = 0;
#pragma unroll
        for (int j = 0; j < 8; j++)
          word |= kv_ucode<BITS>(kv_word_elem<DT>(raw[4 * w + j / 2], j & 1), q.z, q.s, q.rinv) << (4 * j);
        codes[g * WPG + w] = word;
      }
      scale[g] = q.sh;
      zero[g] = q.zh;
    }
  }
}

/* ---------------------------------------------------------------- launch ----------------- */

template <int DT>
static void launch_channel(kivi_ctx_t ctx, const void *x, const kv_shape &sh, uint32_t *codes, uint16_t *scale,
                           uint16_t *zero) {
  const int64_t nchunks = sh.rows * sh.cols / kv_vec<DT>::n;
  const bool aligned = ((uintptr_t)x & 15u) == 0;
  if constexpr (DT != KIVI_F32) {
    if (aligned) {
      const int64_t nblk = (sh.groups + 31) / 32;
#define KV_Q_CHANNEL_LANE(G, B)                                                                                       \
  {                                                                                                                   \
    static bool big_smem = false; /* kv_cl<G>::SMEM may pass the 48 KiB default: allow it once */                     \
    if (!big_smem)                                                                                                    \
      big_smem = cudaFuncSetAttribute((const void *)k_uniform_quantize_channel_lane<DT, G, B>,                        \
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, kv_cl<G>::SMEM) == cudaSuccess;    \
    const unsigned grid = kv_grid(ctx, (nblk + KV_CL_WARPS - 1) / KV_CL_WARPS, 228 * 1024 / (kv_cl<G>::SMEM + 1024)); \
    k_uniform_quantize_channel_lane<DT, G, B>                                                                         \
        <<<grid, KV_CL_WARPS * 32, kv_cl<G>::SMEM, ctx->stream>>>(x, sh.groups, codes, scale, zero);                  \
  }
      KV_DISPATCH_GB(sh.group, sh.bits, KV_Q_CHANNEL_LANE)
#undef KV_Q_CHANNEL_LANE
      return;
    }
  }
  const unsigned grid = kv_grid(ctx, (nchunks + 256 * KV_U - 1) / (256 * KV_U), 8);
#define KV_Q_CHANNEL(G, B) \
  k_uniform_quantize_channel<DT, G, B><<<grid, 256, 0, ctx->stream>>>(x, nchunks, aligned, codes, scale, zero);
  KV_DISPATCH_GB(sh.group, sh.bits, KV_Q_CHANNEL)
#undef KV_Q_CHANNEL
}

void kv_uniform_quantize_channel(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, const kv_shape &sh, uint32_t *codes,
                                 uint16_t *scale, uint16_t *zero) {
#define KV_Q(DT) launch_channel<DT>(ctx, x, sh, codes, scale, zero)
  KV_DISPATCH_DT(dtype, KV_Q)
#undef KV_Q
}
