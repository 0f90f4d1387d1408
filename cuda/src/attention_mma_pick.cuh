/*
 * attention_mma_pick.cuh — the table of tensor-core kernel instantiations for one value format VK:
 * head_dim 128 (value groups 32, 64, 128; one or several query heads a KV head; 4 or 3 CTAs a SM) and
 * head_dim 64 (value groups 32, 64; 4 CTAs a SM). Included once by each attention_mma_<format>.cu.
 */
#ifndef KIVI_ATTENTION_MMA_PICK_CUH
#define KIVI_ATTENTION_MMA_PICK_CUH

#include "attention_mma.cuh"

#ifdef KV_FAST_BUILD /* development: head_dim 128 only */
#define KV_MMA_D64 0
#else
#define KV_MMA_D64 1
#endif

template <int D, int VG, int VK, int KM>
static kv_attn_kernel kv_mma_pick_ctas(bool many) {
  constexpr int N = KV_MMA_NST;
  if constexpr (D == 128) return many ? k_attend_mma<D, VG, VK, 4, N, KM> : k_attend_mma<D, VG, VK, 3, N, KM>;
  (void)many;
  return k_attend_mma<D, VG, VK, 4, N, KM>;
}

template <int D, int VG, int VK>
static kv_attn_kernel kv_mma_pick_vg(int keys, bool many) {
  switch (keys) {
    case KV_KEYS_T1: return kv_mma_pick_ctas<D, VG, VK, KV_KEYS_T1>(many);
    case KV_KEYS_QF: return kv_mma_pick_ctas<D, VG, VK, KV_KEYS_QF>(many);
    default: return kv_mma_pick_ctas<D, VG, VK, KV_KEYS_PLANES>(many);
  }
}

template <int VK>
static kv_attn_kernel kv_mma_pick(int D, int VG, int keys, bool many) {
  if (D == 128) {
    switch (VG) {
      case 32: return kv_mma_pick_vg<128, 32, VK>(keys, many);
      case 64: return kv_mma_pick_vg<128, 64, VK>(keys, many);
      case 128: return kv_mma_pick_vg<128, 128, VK>(keys, many);
      default: return NULL;
    }
  }
#if KV_MMA_D64
  if (D == 64) {
    switch (VG) {
      case 32: return kv_mma_pick_vg<64, 32, VK>(keys, many);
      case 64: return kv_mma_pick_vg<64, 64, VK>(keys, many);
      default: return NULL;
    }
  }
#endif
  return NULL;
}

#endif /* KIVI_ATTENTION_MMA_PICK_CUH */
