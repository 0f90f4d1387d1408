/*
 * attention_mma_codebook.cu — the tensor-core decode attention (attention_mma.cuh) instantiated for
 * codebook 2-bit values (three bit-plane MMAs a code word instead of one).
 */
#include "attention_mma_pick.cuh"

kv_attn_kernel kv_mma_kernel_codebook(int D, int VG, int keys, bool many) { return kv_mma_pick<1>(D, VG, keys, many); }
