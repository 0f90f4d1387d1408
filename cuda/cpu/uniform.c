/*
 * uniform.c — KIVI's asymmetric min/max format: kivi_uniform_quantize (min/max, fp16 params,
 * codes, pack in one pass over each tile) and kivi_uniform_dequantize.
 *
 * The per-value formulas are kivi_format.h's (kivi_uniform_params / _code / _value), so the codes
 * are bit-identical to the CUDA build. The loops run across columns (token axis: one group per
 * column of a G-row tile) or along a contiguous group (channel axis) so that they vectorize.
 */
/* The code formula returns early for a constant group (s == 0); GCC only turns that branch into a
   vector select if it may evaluate the division speculatively. That changes no result (no
   reassociation, no contraction, IEEE division and rintf as before): only FP exception flags. */
#pragma GCC optimize("no-trapping-math")

#include <stdlib.h>

#include "cpu_internal.h"

/*
 * Token axis. A group is G rows of one column and a column's words are contiguous ([cols][rows / cpw]),
 * so the codes are produced in super-tiles of B row blocks x TOKEN_COLS columns: the words of a block
 * are built across columns (vector lanes = columns) into stage [B * wpg][TOKEN_COLS], then each column's
 * B * wpg words (64 bytes) are written out in one contiguous run instead of one scattered word at a time.
 */
#define TOKEN_COLS 128
#define STAGE_WORDS 16 /* words per column per super-tile: B * wpg <= 16 */

static int32_t token_blocks(const cpu_shape *sh) { return STAGE_WORDS / sh->wpg; }

/* One row block: p = rows [r0, r0 + G) x nc columns (row stride `stride`); words to st [wpg][TOKEN_COLS]. */
static void quantize_token_block(const cpu_shape *sh, const float *p, int64_t stride, int64_t r0, int64_t c0,
                                 int32_t nc, uint32_t *st, uint16_t *scale, uint16_t *zero) {
  float mn[TOKEN_COLS], mx[TOKEN_COLS], s[TOKEN_COLS], z[TOKEN_COLS];
  const int32_t G = sh->group, bits = sh->bits, cpw = sh->cpw;
  const uint32_t mask = (uint32_t)sh->levels - 1u;

  for (int32_t j = 0; j < nc; j++) mn[j] = mx[j] = p[j];
  for (int32_t r = 1; r < G; r++) {
    const float *row = p + r * stride;
    for (int32_t j = 0; j < nc; j++) {
      const float v = row[j];
      mn[j] = v < mn[j] ? v : mn[j];
      mx[j] = v > mx[j] ? v : mx[j];
    }
  }
  for (int32_t j = 0; j < nc; j++) {
    const int64_t g = cpu_tile_group(sh, r0, c0, j);
    kivi_uniform_params(mn[j], mx[j], bits, &scale[g], &zero[g]);
    s[j] = kivi_f16_to_f32(scale[g]);
    z[j] = kivi_f16_to_f32(zero[g]);
  }
  for (int32_t w = 0; w < sh->wpg; w++) {
    uint32_t *acc = st + w * TOKEN_COLS;
    for (int32_t j = 0; j < nc; j++) acc[j] = 0;
    for (int32_t i = 0; i < cpw; i++) {
      const float *row = p + (int64_t)(w * cpw + i) * stride;
      for (int32_t j = 0; j < nc; j++) acc[j] |= (kivi_uniform_code(row[j], z[j], s[j], bits) & mask) << (bits * i);
    }
  }
}

static void quantize_token(const cpu_shape *sh, const void *x, kivi_dtype dtype, float *tmp, uint32_t *codes,
                           uint16_t *scale, uint16_t *zero) {
  uint32_t stage[STAGE_WORDS * TOKEN_COLS];
  const int32_t G = sh->group, B = token_blocks(sh);
  const int64_t nb = sh->row_groups;
  for (int64_t b0 = 0; b0 < nb; b0 += B) {
    const int32_t nbk = (int32_t)(nb - b0 < B ? nb - b0 : B), nw = nbk * sh->wpg;
    for (int64_t c0 = 0; c0 < sh->cols; c0 += TOKEN_COLS) {
      const int32_t nc = (int32_t)(sh->cols - c0 < TOKEN_COLS ? sh->cols - c0 : TOKEN_COLS);
      for (int32_t bb = 0; bb < nbk; bb++) {
        const int64_t r0 = (b0 + bb) * G;
        int64_t stride;
        const float *p = cpu_tile_load(x, dtype, sh->cols, r0, c0, G, nc, tmp, &stride);
        quantize_token_block(sh, p, stride, r0, c0, nc, stage + bb * sh->wpg * TOKEN_COLS, scale, zero);
      }
      for (int32_t j = 0; j < nc; j++) {
        uint32_t *out = codes + cpu_tile_group(sh, b0 * G, c0, j) * sh->wpg;
        for (int32_t t = 0; t < nw; t++) out[t] = stage[t * TOKEN_COLS + j];
      }
    }
  }
}

/* Dequantize one super-tile's worth: words from codes, values per row across columns. */
static void dequantize_token(const cpu_shape *sh, const uint32_t *codes, const uint16_t *scale, const uint16_t *zero,
                             void *out, kivi_dtype out_dtype, float *tmp) {
  uint32_t stage[STAGE_WORDS * TOKEN_COLS];
  float s[TOKEN_COLS], z[TOKEN_COLS];
  const int32_t G = sh->group, B = token_blocks(sh), bits = sh->bits, cpw = sh->cpw;
  const uint32_t mask = (uint32_t)sh->levels - 1u;
  const int64_t nb = sh->row_groups, cols = sh->cols;
  for (int64_t b0 = 0; b0 < nb; b0 += B) {
    const int32_t nbk = (int32_t)(nb - b0 < B ? nb - b0 : B), nw = nbk * sh->wpg;
    for (int64_t c0 = 0; c0 < cols; c0 += TOKEN_COLS) {
      const int32_t nc = (int32_t)(cols - c0 < TOKEN_COLS ? cols - c0 : TOKEN_COLS);
      for (int32_t j = 0; j < nc; j++) {
        const uint32_t *in = codes + cpu_tile_group(sh, b0 * G, c0, j) * sh->wpg;
        for (int32_t t = 0; t < nw; t++) stage[t * TOKEN_COLS + j] = in[t];
      }
      for (int32_t bb = 0; bb < nbk; bb++) {
        const int64_t r0 = (b0 + bb) * G;
        for (int32_t j = 0; j < nc; j++) {
          const int64_t g = cpu_tile_group(sh, r0, c0, j);
          s[j] = kivi_f16_to_f32(scale[g]);
          z[j] = kivi_f16_to_f32(zero[g]);
        }
        for (int32_t r = 0; r < G; r++) {
          const uint32_t *wd = stage + (bb * sh->wpg + r / cpw) * TOKEN_COLS;
          const int32_t sft = bits * (r % cpw);
          float *dst = out_dtype == KIVI_F32 ? (float *)out + (r0 + r) * cols + c0 : tmp + (int64_t)r * nc;
          for (int32_t j = 0; j < nc; j++) dst[j] = kivi_uniform_value((wd[j] >> sft) & mask, z[j], s[j]);
        }
        if (out_dtype != KIVI_F32) cpu_tile_store(out, out_dtype, cols, r0, c0, G, nc, tmp);
      }
    }
  }
}

/* One group v [G] (G a multiple of 8): min/max, fp16 params, codes packed into G / cpw words. */
void cpu_uniform_group(const float *v, int32_t G, int32_t bits, uint16_t *scale, uint16_t *zero, uint32_t *words) {
  const int32_t cpw = kivi_codes_per_word(bits);
  const uint32_t mask = (uint32_t)kivi_levels(bits) - 1u;
  uint32_t q[CPU_MAX_GROUP];
  /* 8 running lanes, then a final pass: min/max do not depend on the order for finite data. */
  float lo[8], hi[8];
  for (int32_t l = 0; l < 8; l++) lo[l] = hi[l] = v[l];
  for (int32_t i = 8; i < G; i += 8)
    for (int32_t l = 0; l < 8; l++) {
      lo[l] = v[i + l] < lo[l] ? v[i + l] : lo[l];
      hi[l] = v[i + l] > hi[l] ? v[i + l] : hi[l];
    }
  float mn = lo[0], mx = hi[0];
  for (int32_t l = 1; l < 8; l++) {
    mn = lo[l] < mn ? lo[l] : mn;
    mx = hi[l] > mx ? hi[l] : mx;
  }
  kivi_uniform_params(mn, mx, bits, scale, zero);
  const float s = kivi_f16_to_f32(*scale), z = kivi_f16_to_f32(*zero);
  for (int32_t i = 0; i < G; i++) q[i] = kivi_uniform_code(v[i], z, s, bits) & mask;
  for (int32_t w = 0; w < G / cpw; w++) {
    uint32_t acc = 0;
    for (int32_t i = 0; i < cpw; i++) acc |= q[w * cpw + i] << (bits * i);
    words[w] = acc;
  }
}

/* Channel axis: tile p = one row of nc columns, nc / G contiguous groups. */
static void quantize_channel_tile(const cpu_shape *sh, const float *p, int64_t r0, int64_t c0, int32_t nc,
                                  uint32_t *codes, uint16_t *scale, uint16_t *zero) {
  const int32_t G = sh->group;
  for (int32_t k = 0; k < nc / G; k++) {
    const int64_t g = cpu_tile_group(sh, r0, c0, k);
    cpu_uniform_group(p + (int64_t)k * G, G, sh->bits, &scale[g], &zero[g], codes + g * sh->wpg);
  }
}

KIVI_API kivi_status kivi_uniform_quantize(kivi_ctx_t ctx, const void *x, kivi_dtype dtype, int64_t rows, int64_t cols,
                                           kivi_axis axis, int32_t group, int32_t bits, int32_t flags, uint32_t *codes,
                                           uint16_t *scale, uint16_t *zero) {
  KIVI_SPEC_ENTER(kivi_spec_uniform_quantize(x, dtype, rows, cols, axis, group, bits, flags, codes, scale, zero),
                  cpu_validate_input(ctx, &spec, &sh, x));
  float *tmp = NULL;
  if (dtype != KIVI_F32 && (st = cpu_alloc(ctx, spec.op, sizeof(float) * CPU_MAX_GROUP * CPU_TILE_COLS, (void **)&tmp)))
    return st;

  if (axis == KIVI_AXIS_TOKEN) {
    quantize_token(&sh, x, dtype, tmp, codes, scale, zero);
  } else {
    for (int64_t r0 = 0; r0 < rows; r0++) {
      for (int64_t c0 = 0; c0 < cols; c0 += CPU_TILE_COLS) {
        const int32_t nc = (int32_t)(cols - c0 < CPU_TILE_COLS ? cols - c0 : CPU_TILE_COLS);
        int64_t stride;
        const float *p = cpu_tile_load(x, dtype, cols, r0, c0, 1, nc, tmp, &stride);
        quantize_channel_tile(&sh, p, r0, c0, nc, codes, scale, zero);
      }
    }
  }
  free(tmp);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_uniform_dequantize(kivi_ctx_t ctx, const uint32_t *codes, const uint16_t *scale,
                                             const uint16_t *zero, int64_t rows, int64_t cols, kivi_axis axis,
                                             int32_t group, int32_t bits, void *out, kivi_dtype out_dtype) {
  KIVI_SPEC_ENTER(kivi_spec_uniform_dequantize(codes, scale, zero, rows, cols, axis, group, bits, out, out_dtype),
                  cpu_validate(ctx, &spec, &sh));
  float *tmp = NULL; /* f32 output is written in place */
  if (out_dtype != KIVI_F32 &&
      (st = cpu_alloc(ctx, spec.op, sizeof(float) * CPU_MAX_GROUP * CPU_TILE_COLS, (void **)&tmp)))
    return st;

  if (axis == KIVI_AXIS_TOKEN) {
    dequantize_token(&sh, codes, scale, zero, out, out_dtype, tmp);
    free(tmp);
    return KIVI_OK;
  }
  const int32_t G = group, cpw = sh.cpw;
  for (int64_t r0 = 0; r0 < rows; r0++) {
    for (int64_t c0 = 0; c0 < cols; c0 += CPU_TILE_COLS) {
      const int32_t nc = (int32_t)(cols - c0 < CPU_TILE_COLS ? cols - c0 : CPU_TILE_COLS);
      float *dst = out_dtype == KIVI_F32 ? (float *)out + r0 * cols + c0 : tmp;
      for (int32_t k = 0; k < nc / G; k++) {
        const int64_t g = cpu_tile_group(&sh, r0, c0, k);
        const float s = kivi_f16_to_f32(scale[g]), z = kivi_f16_to_f32(zero[g]);
        const uint32_t *wd = codes + g * sh.wpg;
        float *d = dst + (int64_t)k * G;
        for (int32_t w = 0; w < sh.wpg; w++) {
          const uint32_t word = wd[w];
          for (int32_t i = 0; i < cpw; i++) d[w * cpw + i] = kivi_uniform_value(kivi_word_get(word, i, bits), z, s);
        }
      }
      if (out_dtype != KIVI_F32) cpu_tile_store(out, out_dtype, cols, r0, c0, 1, nc, tmp);
    }
  }
  free(tmp);
  return KIVI_OK;
}
