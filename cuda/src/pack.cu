/*
 * pack.cu — kivi_codes_pack / kivi_codes_unpack: one code per byte <-> LSB-first uint32 words.
 * Thread per word (cpw bytes: one 16-byte load at 2 bits, 8 bytes at 4 bits when aligned). Pack
 * validates every code < 2^bits on the device first (a scan that only flags), so nothing is
 * written on bad input.
 */
#include "common.cuh"

template <int BITS>
struct kv_bytes;
template <>
struct kv_bytes<2> {
  typedef uint4 t;
};
template <>
struct kv_bytes<4> {
  typedef uint2 t;
};

/* First index of a byte >= 2^bits, by atomicMin; 16-byte loads when aligned. */
static __global__ void k_check_codes(const uint8_t *__restrict__ codes, int64_t n, int32_t bits, bool aligned,
                                     unsigned long long *__restrict__ first_bad) {
  const uint8_t top = (uint8_t)((1u << bits) - 1u);
  const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  int64_t bad = INT64_MAX;
  int64_t scalar_from = 0;
  if (aligned) {
    const uint32_t hi = bits == 2 ? 0xfcfcfcfcu : 0xf0f0f0f0u; /* any bit above the code */
    const int64_t nv = n / 16;
    for (int64_t i = tid; i < nv; i += stride) {
      const uint4 u = ((const uint4 *)codes)[i];
      if (((u.x | u.y | u.z | u.w) & hi) == 0) continue;
      for (int k = 0; k < 16; k++)
        if (codes[i * 16 + k] > top) {
          bad = bad < i * 16 + k ? bad : i * 16 + k;
          break;
        }
    }
    scalar_from = nv * 16;
  }
  for (int64_t i = scalar_from + tid; i < n; i += stride)
    if (codes[i] > top && i < bad) bad = i;
  if (bad != INT64_MAX) atomicMin(first_bad, (unsigned long long)bad);
}

template <int BITS>
static __global__ void k_codes_pack(const uint8_t *__restrict__ codes, int64_t nwords, bool aligned,
                                    uint32_t *__restrict__ words) {
  constexpr int CPW = 32 / BITS;
  for (int64_t w = kv_grid_first(); w < nwords; w += kv_grid_stride()) {
    uint8_t b[CPW];
    if (aligned) {
      typedef typename kv_bytes<BITS>::t vec;
      const vec u = ((const vec *)codes)[w];
      memcpy(b, &u, CPW);
    } else {
#pragma unroll
      for (int j = 0; j < CPW; j++) b[j] = codes[w * CPW + j];
    }
    uint32_t acc = 0;
#pragma unroll
    for (int j = 0; j < CPW; j++) acc |= kivi_word_put(b[j], j, BITS);
    words[w] = acc;
  }
}

template <int BITS>
static __global__ void k_codes_unpack(const uint32_t *__restrict__ words, int64_t nwords, bool aligned,
                                      uint8_t *__restrict__ codes) {
  constexpr int CPW = 32 / BITS;
  for (int64_t w = kv_grid_first(); w < nwords; w += kv_grid_stride()) {
    const uint32_t word = words[w];
    uint8_t b[CPW];
#pragma unroll
    for (int j = 0; j < CPW; j++) b[j] = (uint8_t)kivi_word_get(word, j, BITS);
    if (aligned) {
      typedef typename kv_bytes<BITS>::t vec;
      vec u;
      memcpy(&u, b, CPW);
      ((vec *)codes)[w] = u;
    } else {
#pragma unroll
      for (int j = 0; j < CPW; j++) codes[w * CPW + j] = b[j];
    }
  }
}

/* The pack (codes -> words) or unpack kernel over n codes, 256 threads a block; the byte side's
   alignment picks the vector loads. */
static kivi_status launch_codes(kivi_ctx_t ctx, const char *op, int pack, uint8_t *codes, uint32_t *words, int64_t n,
                                int32_t bits) {
  const int64_t nwords = n / kivi_codes_per_word(bits);
  const bool aligned = ((uintptr_t)codes & (bits == 2 ? 15u : 7u)) == 0;
  const unsigned grid = kv_grid(ctx, (nwords + 255) / 256, 8);
  if (pack && bits == 2) k_codes_pack<2><<<grid, 256, 0, ctx->stream>>>(codes, nwords, aligned, words);
  if (pack && bits == 4) k_codes_pack<4><<<grid, 256, 0, ctx->stream>>>(codes, nwords, aligned, words);
  if (!pack && bits == 2) k_codes_unpack<2><<<grid, 256, 0, ctx->stream>>>(words, nwords, aligned, codes);
  if (!pack && bits == 4) k_codes_unpack<4><<<grid, 256, 0, ctx->stream>>>(words, nwords, aligned, codes);
  return kv_launched(ctx, op, pack ? "k_codes_pack" : "k_codes_unpack");
}

extern "C" {

KIVI_API kivi_status kivi_codes_pack(kivi_ctx_t ctx, const uint8_t *codes, int64_t n, int32_t bits, uint32_t *words) {
  const kv_spec spec = kivi_spec_codes(1, codes, words, n, bits);
  kivi_status st = kv_validate(ctx, &spec, NULL);
  if (st) return st;
  if ((st = kv_scratch_reset(ctx, spec.op))) return st;
  const bool caligned = ((uintptr_t)codes & 15u) == 0;
  k_check_codes<<<kv_grid(ctx, (n + 4095) / 4096, 8), 256, 0, ctx->stream>>>(codes, n, bits, caligned,
                                                                             ctx->d_scratch + KV_SLOT_CODES);
  if ((st = kv_launched(ctx, spec.op, "k_check_codes"))) return st;
  if ((st = kv_scratch_read(ctx, spec.op))) return st;
  const unsigned long long bad = ctx->h_scratch[KV_SLOT_CODES];
  if (bad != ~0ull) {
    uint8_t b = 0;
    if ((st = kv_cuda(ctx, cudaMemcpy(&b, codes + bad, 1, cudaMemcpyDeviceToHost), spec.op, "cudaMemcpy (bad code)")))
      return st;
    return kv_fail(ctx, KIVI_ERR_ARG, "%s: codes[%lld] must be below 2^bits (%d), got %u", spec.op, (long long)bad,
                   (int)kivi_levels(bits), (unsigned)b);
  }
  return launch_codes(ctx, spec.op, 1, (uint8_t *)codes, words, n, bits); /* reads codes */
}

KIVI_API kivi_status kivi_codes_unpack(kivi_ctx_t ctx, const uint32_t *words, int64_t n, int32_t bits, uint8_t *codes) {
  const kv_spec spec = kivi_spec_codes(0, codes, words, n, bits);
  kivi_status st = kv_validate(ctx, &spec, NULL);
  if (st) return st;
  return launch_codes(ctx, spec.op, 0, codes, (uint32_t *)words, n, bits); /* reads words */
}

} /* extern "C" */
