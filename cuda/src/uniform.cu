/*
 * uniform.cu — KIVI's asymmetric min/max format on the device: kivi_uniform_quantize (one fused
 * pass: read x once, min/max in registers, fp16 params, codes packed, no intermediate buffer; the
 * kernels of each axis are in uniform_token.cu and uniform_channel.cu) and kivi_uniform_dequantize.
 *
 * 2-bit codes of fp16/bf16 values come from packed comparisons against three exact per-group
 * thresholds (kv_threshold*, kv_u2_pair); 4-bit codes and fp32 inputs from a division-free
 * quotient with the reference formula near a rounding tie (kv_ucode). Both are bit-identical to the
 * CPU build. The shared device helpers are in uniform.cuh.
 */
#include "uniform.cuh"

/* ---------------------------------------------------------------- dequantize ------------- */

/* Token axis: task = (column block, strip of groups); a thread reads its column's words of the
   strip (contiguous) and writes one value per row (coalesced across the warp's columns). */
template <int ODT, int G, int BITS>
static __global__ void __launch_bounds__(128)
    k_uniform_dequantize_token(const uint32_t *__restrict__ codes, const uint16_t *__restrict__ scale,
                               const uint16_t *__restrict__ zero, int64_t rows, int64_t cols, int64_t ncolblk,
                               int64_t ntasks, void *__restrict__ out) {
  constexpr int CPW = 32 / BITS, WPG = G / CPW, GPS = G >= 128 ? 1 : 128 / G;
  const int64_t gpc = rows / G, wpc = rows / CPW;
  for (int64_t t = blockIdx.x; t < ntasks; t += gridDim.x) {
    const int64_t c = (t % ncolblk) * blockDim.x + threadIdx.x;
    const int64_t strip = t / ncolblk;
    if (c >= cols) continue;
    const int64_t g_begin = strip * GPS;
    const int64_t g_end = g_begin + GPS < gpc ? g_begin + GPS : gpc;
    for (int64_t gr = g_begin; gr < g_end; gr++) {
      const float s = kivi_f16_to_f32(scale[c * gpc + gr]), z = kivi_f16_to_f32(zero[c * gpc + gr]);
      const uint32_t *wp = codes + c * wpc + gr * WPG;
#pragma unroll
      for (int w = 0; w < WPG; w++) {
        const uint32_t word = wp[w];
#pragma unroll
        for (int j = 0; j < CPW; j++) {
          const int64_t r = gr * G + w * CPW + j;
          kv_st<ODT>(out, r * cols + c, kivi_uniform_value(kivi_word_get(word, j, BITS), z, s));
        }
      }
    }
  }
}

/** Stores n (a multiple of 16 bytes' worth) values at element e of out: 16-byte stores when aligned. */
template <int ODT, int N>
__device__ __forceinline__ void kv_st_run(void *__restrict__ out, int64_t e, bool aligned, const float (&o)[N]) {
  constexpr int ES = kv_dt<ODT>::size;
  static_assert((N * ES) % 16 == 0, "whole 16-byte vectors");
  if (aligned) {
    uint4 *dst = (uint4 *)((char *)out + e * ES);
#pragma unroll
    for (int q = 0; q < N * ES / 16; q++) {
      uint32_t w[4];
#pragma unroll
      for (int k = 0; k < 4; k++) {
        if constexpr (ES == 4)
          w[k] = __float_as_uint(o[q * 4 + k]);
        else
          w[k] = (uint32_t)kv_f2h<ODT>(o[q * 8 + 2 * k]) | ((uint32_t)kv_f2h<ODT>(o[q * 8 + 2 * k + 1]) << 16);
      }
      dst[q] = make_uint4(w[0], w[1], w[2], w[3]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; j++) kv_st<ODT>(out, e + j, o[j]);
  }
}

/* Channel axis: flat; thread per word (a word never straddles a group). */
template <int ODT, int G, int BITS>
static __global__ void __launch_bounds__(256)
    k_uniform_dequantize_channel(const uint32_t *__restrict__ codes, const uint16_t *__restrict__ scale,
                                 const uint16_t *__restrict__ zero, int64_t nwords, bool aligned,
                                 void *__restrict__ out) {
  constexpr int CPW = 32 / BITS;
  const int64_t stride = (int64_t)gridDim.x * blockDim.x;
  for (int64_t w = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; w < nwords; w += stride) {
    const uint32_t word = codes[w];
    const int64_t e0 = w * CPW, g = e0 / G;
    const float s = kivi_f16_to_f32(scale[g]), z = kivi_f16_to_f32(zero[g]);
    float o[CPW];
#pragma unroll
    for (int j = 0; j < CPW; j++) o[j] = kivi_uniform_value(kivi_word_get(word, j, BITS), z, s);
    kv_st_run<ODT, CPW>(out, e0, aligned, o);
  }
}

/* ---------------------------------------------------------------- launch ----------------- */

template <int ODT>
static void launch_dequantize(kivi_ctx_t ctx, const uint32_t *codes, const uint16_t *scale, const uint16_t *zero,
                              const kv_shape &sh, void *out) {
  if (sh.axis == KIVI_AXIS_TOKEN) {
    const int64_t ncolblk = (sh.cols + 127) / 128;
    const int64_t gps = sh.group >= 128 ? 1 : 128 / sh.group;
    const int64_t ntasks = ncolblk * ((sh.row_groups + gps - 1) / gps);
    const unsigned grid = kv_grid(ctx, ntasks, 16);
#define KV_D_TOKEN(G, B)                \
  k_uniform_dequantize_token<ODT, G, B> \
      <<<grid, 128, 0, ctx->stream>>>(codes, scale, zero, sh.rows, sh.cols, ncolblk, ntasks, out);
    KV_DISPATCH_GB(sh.group, sh.bits, KV_D_TOKEN)
#undef KV_D_TOKEN
  } else {
    const int64_t nwords = sh.rows * sh.cols / sh.cpw;
    const bool aligned = ((uintptr_t)out & 15u) == 0;
    const unsigned grid = kv_grid(ctx, (nwords + 255) / 256, 8);
#define KV_D_CHANNEL(G, B) \
  k_uniform_dequantize_channel<ODT, G, B><<<grid, 256, 0, ctx->stream>>>(codes, scale, zero, nwords, aligned, out);
    KV_DISPATCH_GB(sh.group, sh.bits, KV_D_CHANNEL)
#undef KV_D_CHANNEL
  }
}

extern "C" {

KIVI_API kivi_status kivi_uniform_quantize(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                           kivi_axis axis, int32_t group, int32_t bits, int32_t flags, uint32_t *codes,
                                           uint16_t *scale, uint16_t *zero) {
  KIVI_SPEC_ENTER(kivi_spec_uniform_quantize(x, dtype, rows, cols, axis, group, bits, flags, codes, scale, zero),
                  kv_validate_input(ctx, &spec, &sh, x));
  if (sh.axis == KIVI_AXIS_TOKEN)
    kv_uniform_quantize_token(ctx, x, dtype, sh, codes, scale, zero);
  else
    kv_uniform_quantize_channel(ctx, x, dtype, sh, codes, scale, zero);
  return kv_launched(ctx, spec.op, "k_uniform_quantize");
}

KIVI_API kivi_status kivi_uniform_dequantize(kivi_ctx_t ctx, const uint32_t *codes, const uint16_t *scale,
                                             const uint16_t *zero, int64_t rows, int64_t cols, kivi_axis axis,
                                             int32_t group, int32_t bits, void *out, kivi_dtype out_dtype) {
  KIVI_SPEC_ENTER(kivi_spec_uniform_dequantize(codes, scale, zero, rows, cols, axis, group, bits, out, out_dtype),
                  kv_validate(ctx, &spec, &sh));
#define KV_D(DT) launch_dequantize<DT>(ctx, codes, scale, zero, sh, out)
  KV_DISPATCH_DT(out_dtype, KV_D)
#undef KV_D
  return kv_launched(ctx, spec.op, "k_uniform_dequantize");
}

} /* extern "C" */
