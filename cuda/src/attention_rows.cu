/*
 * attention_rows.cu — the instantiations of k_attend_rows (attention_rows.cuh): head_dim 128 (value groups
 * 32, 64, 128) and 64 (32, 64), uniform and codebook 2-bit values.
 */
#include "attention_rows.cuh"

template <int D, int VG>
static kv_attn_kernel kv_rows_pick_vk(int vk) {
  return vk ? k_attend_rows<D, VG, 1, KV_MMA_NST> : k_attend_rows<D, VG, 0, KV_MMA_NST>;
}

kv_attn_kernel kv_rows_kernel(int D, int VG, int vk) {
  if (D == 128) {
    switch (VG) {
      case 32: return kv_rows_pick_vk<128, 32>(vk);
      case 64: return kv_rows_pick_vk<128, 64>(vk);
      case 128: return kv_rows_pick_vk<128, 128>(vk);
      default: return NULL;
    }
  }
#ifndef KV_FAST_BUILD /* development: head_dim 128 only */
  if (D == 64) {
    switch (VG) {
      case 32: return kv_rows_pick_vk<64, 32>(vk);
      case 64: return kv_rows_pick_vk<64, 64>(vk);
      default: return NULL;
    }
  }
#endif
  return NULL;
}
