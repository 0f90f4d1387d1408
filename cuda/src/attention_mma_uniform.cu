/*
 * attention_mma_uniform.cu — the tensor-core decode attention (attention_mma.cuh) instantiated for
 * uniform 2-bit values. A file of its own so that the instantiations compile in parallel with the
 * codebook ones (attention_mma_codebook.cu).
 */
#include "attention_mma_pick.cuh"

kv_attn_kernel kv_mma_kernel_uniform(int D, int VG, int keys, bool many) { return kv_mma_pick<0>(D, VG, keys, many); }
