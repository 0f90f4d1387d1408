/*
 * kivi_format.h — the bit layout and the per-value formulas, defined once for the CPU build (C11)
 * and the CUDA build (nvcc). Neither build re-derives an offset or a formula: both call these.
 * Compile without fast-math: the uniform code formula relies on IEEE division and rintf.
 */
#ifndef KIVI_FORMAT_H
#define KIVI_FORMAT_H

#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#if defined(__CUDACC__)
#define KIVI_HD __host__ __device__ __forceinline__
#else
#define KIVI_HD static inline
#endif

#if defined(__cplusplus)
#define KIVI_STATIC_ASSERT(c, m) static_assert(c, m)
#else
#define KIVI_STATIC_ASSERT(c, m) _Static_assert(c, m)
#endif

KIVI_STATIC_ASSERT(sizeof(uint32_t) == 4, "packed words are 32 bits");
KIVI_STATIC_ASSERT(sizeof(uint16_t) == 2, "fp16 params are 16 bits");
KIVI_STATIC_ASSERT(sizeof(float) == 4, "fp32 math");

#define KIVI_WORD_BITS 32
#define KIVI_MAX_BITS 4
#define KIVI_MAX_CENTROIDS 16
#define KIVI_MAX_ITERS 256
#define KIVI_MAX_ELEMS (((int64_t)1) << 40)

/** Codes per uint32 word: 16 at 2 bits, 8 at 4 bits. */
/* Running min, max and sum of a group's finite values, with the count of its non-finite ones
 * (kivi_stats_block in both builds): the sum in double, one addition per value. */
typedef struct kivi_minmax {
  double sum;
  float mn, mx;
  int32_t cnt, bad;
} kivi_minmax;

KIVI_HD void kivi_minmax_add(kivi_minmax *s, float x) {
  if (!isfinite(x)) {
    s->bad++;
    return;
  }
  if (s->cnt == 0 || x < s->mn) s->mn = x;
  if (s->cnt == 0 || x > s->mx) s->mx = x;
  s->sum += (double)x;
  s->cnt++;
}

KIVI_HD int32_t kivi_codes_per_word(int32_t bits) { return KIVI_WORD_BITS / bits; }
/** Number of levels (centroids) of a b-bit code. */
KIVI_HD int32_t kivi_levels(int32_t bits) { return 1 << bits; }
KIVI_HD int kivi_valid_bits(int32_t bits) { return bits == 2 || bits == 4; }
KIVI_HD int kivi_valid_group(int32_t g) { return g == 32 || g == 64 || g == 128; }

/** Code j (0-based) of a packed word. */
KIVI_HD uint32_t kivi_word_get(uint32_t word, int32_t j, int32_t bits) {
  return (word >> (bits * j)) & ((1u << bits) - 1u);
}
/** Word with code q placed at slot j (OR it into the word being built). */
KIVI_HD uint32_t kivi_word_put(uint32_t q, int32_t j, int32_t bits) { return q << (bits * j); }

/* ------------------------------------------------------------------ fp16 / bf16 ---------- */

KIVI_HD uint32_t kivi_f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
KIVI_HD float kivi_bits_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

/** float -> IEEE binary16, round to nearest even (same result as CUDA's __float2half_rn). */
KIVI_HD uint16_t kivi_f32_to_f16(float f) {
  uint32_t x = kivi_f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t absx = x & 0x7fffffffu;
  if (absx >= 0x7f800000u) { /* Inf or NaN */
    return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0u));
  }
  if (absx >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to >= 65520: Inf */
  if (absx < 0x38800000u) {                                   /* below 2^-14: subnormal or zero */
    if (absx < 0x33000000u) return (uint16_t)sign;            /* below 2^-25: rounds to 0 */
    uint32_t e = absx >> 23;
    uint32_t m = (absx & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e; /* 14..24 */
    uint32_t h = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) h++;
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((absx >> 13) - (112u << 10));
  uint32_t rem = absx & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}

/** IEEE binary16 -> float (exact). */
KIVI_HD float kivi_f16_to_f32(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t e = ((uint32_t)h >> 10) & 0x1fu;
  uint32_t m = (uint32_t)h & 0x3ffu;
  if (e == 0x1fu) return kivi_bits_f32(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    if (m == 0) return kivi_bits_f32(sign);
    float v = (float)m * 5.9604644775390625e-08f; /* m * 2^-24, exact */
    return sign ? -v : v;
  }
  return kivi_bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

/** float -> bfloat16, round to nearest even (NaN stays NaN). */
KIVI_HD uint16_t kivi_f32_to_bf16(float f) {
  uint32_t x = kivi_f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}
KIVI_HD float kivi_bf16_to_f32(uint16_t b) { return kivi_bits_f32((uint32_t)b << 16); }

/* ------------------------------------------------------------------ quantizer input ------ */

/** True for an element the quantizers refuse (their params are fp16): NaN, Inf, or a finite f32 or
    bf16 value that fp16 rounds to Inf (|x| >= 65520, as kivi_f32_to_f16; bf16 from 65536 up). `u`
    holds the element's bits (a 16-bit dtype in the low half); dtype is kivi_dtype (0 f32, 1 f16, 2 bf16). */
KIVI_HD int kivi_unquantizable(uint32_t u, int32_t dtype) {
  return dtype == 0   ? (u & 0x7fffffffu) >= 0x477ff000u
         : dtype == 1 ? (u & 0x7c00u) == 0x7c00u
                      : (u & 0x7fffu) >= 0x4780u;
}

/** The message both builds give for the first element x[i] (value v, at row r, col c, group g) that
    kivi_unquantizable refuses. Host only. */
static inline void kivi_unquantizable_message(char *buf, size_t len, const char *op, float v, int64_t i, int64_t r,
                                              int64_t c, int64_t g) {
  const int finite = isfinite(v);
  char got[32];
  if (finite)
    snprintf(got, sizeof got, "%g", (double)v);
  else
    snprintf(got, sizeof got, "%s", v != v ? "NaN" : (v > 0 ? "+Inf" : "-Inf"));
  snprintf(buf, len,
           "%s: x must be %s, got %s at index %lld (row %lld, col %lld, group %lld); pass KIVI_FLAG_TRUSTED %s", op,
           finite ? "within fp16's range (|x| < 65520) that the params are stored in" : "finite", got, (long long)i,
           (long long)r, (long long)c, (long long)g,
           finite ? "to have such values saturate" : "only for data known to be finite");
}

/* ------------------------------------------------------------------ uniform (KIVI) ------- */

/** fp16's largest finite value: the params keep every dequantized value within it. */
#define KIVI_F16_MAX 65504.0f

/** v clamped to fp16's finite range [-65504, 65504] (NaN stays NaN). The params are computed from the
    clamped min and max, so values beyond it (trusted input, or f32 in (65504, 65520)) saturate. */
KIVI_HD float kivi_f16_clamp(float v) {
  return v < -KIVI_F16_MAX ? -KIVI_F16_MAX : (v > KIVI_F16_MAX ? KIVI_F16_MAX : v);
}

/** The smallest fp16 >= f, for finite f >= 0 below 65504 (RN, then one step up where RN went below). */
KIVI_HD uint16_t kivi_f32_to_f16_up(float f) {
  uint16_t h = kivi_f32_to_f16(f);
  if (kivi_f16_to_f32(h) < f) h++;
  return h;
}
/** The largest fp16 <= f, for f in [-65504, 65504]. */
KIVI_HD uint16_t kivi_f32_to_f16_down(float f) {
  uint16_t h = kivi_f32_to_f16(f);
  if (kivi_f16_to_f32(h) > f)
    h = (h & 0x8000u) ? (uint16_t)(h + 1u) : (h == 0u ? (uint16_t)0x8001u : (uint16_t)(h - 1u));
  return h;
}

/** True when the stored params (s, z as floats) cover the clamped group [mn, mx]: every value within
    s / 2 of the grid z + q s (q = 0..top), and the top code's value finite in fp16. KIVI's params
    (z = half(mn), s = half((mx - mn) / top)) do, except where z's rounding is large against the range
    (a narrow group far from 0: 1000.3 + [0, 0.093]), s is a coarse fp16 subnormal, or z + top s passes
    65504 (a group spanning [0, 65504]: 3 x 21840 = 65520 becomes Inf in fp16). NaN: true (nothing to do). */
KIVI_HD int kivi_uniform_covers(float mn, float mx, int32_t bits, float s, float z) {
  const float top = (float)((1 << bits) - 1);
  if (!(mn <= mx)) return 1;
  return z - mn <= 0.5f * s && fmaf(top + 0.5f, s, z) >= mx && fmaf(top, s, z) <= KIVI_F16_MAX;
}

/** Params for a group that kivi_uniform_covers refused: zero = the largest fp16 <= mn, scale = the
    smallest fp16 that brings mx within scale / 2 of the top code, one step less while the top code's
    value would pass 65504. Both builds call this (never re-derived), so codes stay bit-identical. */
KIVI_HD void kivi_uniform_widen(float mn, float mx, int32_t bits, uint16_t *scale_h, uint16_t *zero_h) {
  const float top = (float)((1 << bits) - 1);
  const uint16_t zh = kivi_f32_to_f16_down(mn);
  const float z = kivi_f16_to_f32(zh);
  uint16_t sh = kivi_f32_to_f16_up((mx - z) / (top + 0.5f));
  while (sh > 0u && fmaf(top, kivi_f16_to_f32(sh), z) > KIVI_F16_MAX) sh--;
  *scale_h = sh;
  *zero_h = zh;
}

/** Group params from the group's min and max, as stored (fp16): KIVI's scale = half((mx - mn) / top),
    zero = half(mn) of the clamped min and max, widened (kivi_uniform_widen) where they would leave a
    value more than scale / 2 from its code's value or the top code's value past fp16's range. So every
    value within [-65504, 65504] dequantizes to within scale / 2 of itself (up to fp32 rounding), and
    every dequantized value of finite input is finite in fp16. */
KIVI_HD void kivi_uniform_params(float mn, float mx, int32_t bits, uint16_t *scale_h, uint16_t *zero_h) {
  mn = kivi_f16_clamp(mn);
  mx = kivi_f16_clamp(mx);
  *scale_h = kivi_f32_to_f16((mx - mn) / (float)((1 << bits) - 1));
  *zero_h = kivi_f32_to_f16(mn);
  if (!kivi_uniform_covers(mn, mx, bits, kivi_f16_to_f32(*scale_h), kivi_f16_to_f32(*zero_h)))
    kivi_uniform_widen(mn, mx, bits, scale_h, zero_h);
}

/** The uniform code of x for stored params (s = float(scale_h), z = float(zero_h)). A constant
    group (s == 0) gives code 0 without dividing. Identical on host and device. */
KIVI_HD uint32_t kivi_uniform_code(float x, float z, float s, int32_t bits) {
  if (!(s > 0.0f)) return 0u;
  float q = rintf((x - z) / s);
  float top = (float)((1 << bits) - 1);
  q = !(q >= 0.0f) ? 0.0f : (q > top ? top : q); /* NaN (trusted input) gives code 0 */
  return (uint32_t)q;
}

/** The dequantized value of code q. */
KIVI_HD float kivi_uniform_value(uint32_t q, float z, float s) { return fmaf((float)q, s, z); }

/* ------------------------------------------------------------------ codebook ------------- */

/** Nearest centroid of x among n sorted centroids c[0..n-1]: the count of midpoints <= x (a value on a
    midpoint goes up; of equal centroids the first is used). */
KIVI_HD uint32_t kivi_nearest_code(float x, const float *c, int32_t n) {
  uint32_t q = 0;
  for (int32_t i = 0; i + 1 < n; i++) q += (x >= 0.5f * (c[i] + c[i + 1])) ? 1u : 0u;
  return q;
}

/** The seed's interval table over n sorted centroids (see kivi.h KIVI_ASSIGN_INTERVAL). */
KIVI_HD uint32_t kivi_interval_code(float x, const float *c, int32_t n) {
  if (x > c[n - 1]) return (uint32_t)(n - 1);
  uint32_t q = 0;
  for (int32_t i = 1; i + 1 < n; i++) q += (x >= c[i]) ? 1u : 0u;
  return q;
}

/* ------------------------------------------------------------------ matrix layout -------- */

/** Number of groups of an [rows][cols] matrix grouped along `axis` (0 token, 1 channel). */
KIVI_HD int64_t kivi_group_count(int64_t rows, int64_t cols, int32_t axis, int32_t group) {
  return axis == 0 ? cols * (rows / group) : rows * (cols / group);
}
/** Number of packed words of the whole matrix. */
KIVI_HD int64_t kivi_word_count(int64_t rows, int64_t cols, int32_t bits) {
  return rows * cols / kivi_codes_per_word(bits);
}
/** Group index of element (r, c). */
KIVI_HD int64_t kivi_group_of(int64_t r, int64_t c, int64_t rows, int64_t cols, int32_t axis, int32_t group) {
  return axis == 0 ? c * (rows / group) + r / group : r * (cols / group) + c / group;
}
/** Index of the packed word that holds element (r, c), and (via *slot) its slot in the word. */
KIVI_HD int64_t kivi_word_of(int64_t r, int64_t c, int64_t rows, int64_t cols, int32_t axis, int32_t bits,
                             int32_t *slot) {
  int32_t cpw = kivi_codes_per_word(bits);
  if (axis == 0) {
    *slot = (int32_t)(r % cpw);
    return c * (rows / cpw) + r / cpw;
  }
  *slot = (int32_t)(c % cpw);
  return r * (cols / cpw) + c / cpw;
}

/* ------------------------------------------------------------------ paged cache layout --- */
/*
 * Pool layout. Each layer has its own storage for every page id; a page holds page_tokens (P)
 * tokens of every KV head. Page (layer, page) starts at layer_base + page * page_bytes, where the
 * K pool and the V pool are separate allocations, the layers one after the other, each with the page
 * bytes of its own format (kivi_layer_layout: a cache may give each layer its own key and value
 * format; one format: layer_base = layer * max_pages * page_bytes). Inside a page the heads follow each other, each
 * head block 16-byte aligned:
 *   keys   quantized: codes  uint32 [D][P / cpw]            (per channel, packed along tokens)
 *                     params uniform: half2 (scale, zero) [D][P / Gk]
 *                            codebook: half [D][P / Gk][2^b]
 *          16 bits:   half [P][D]
 *   values quantized: codes  uint32 [P][D / cpw]            (per token, packed along channels)
 *                     params uniform: half2 (scale, zero) [P][D / Gv]
 *                            codebook: half [P][D / Gv][2^b]
 *          16 bits:   half [P][D]
 * Residual windows: half [max_seqs][layers][R + F][kv_heads][D] for K and for V; absolute token
 * position p of a sequence sits in slot p % (R + F) while it is in the window.
 *
 * The tensor-core layout. When the keys are uniform 2-bit (any group), the values are uniform or
 * codebook 2-bit (any group) and head_dim is 64 or 128 (kivi_cache_mma_layout), the fused attention
 * multiplies codes on tensor cores, which need the contracted axis packed together: channels for q.k,
 * tokens for p.v. Those pages are laid out instead (byte sizes unchanged):
 *   keys   codes  uint32 [P][D / 16]                  (per token, packed along channels; channel
 *                                                     16 w + e in slot kivi_mma_key_slot(e))
 *          params half2 (scale, zero) [P / Gk][D]     (a group's D channels side by side)
 *   values codes  uint32 [P / 16][D]                  (16 tokens x D channels a run, in the order of
 *                                                     the fragments: kivi_mma_value_code below)
 *          params planes of half [D / Gv][P], tokens of each run of 16 in pair order (t, t + 8) for
 *                 t = 0..7 (the pairs the kernel multiplies together): uniform: the scale plane, then
 *                 the zero plane; codebook: one plane per centroid, c0 first (kivi_page_centroid_at).
 */

/** The cache config as a struct; kivi_cache_create copies the int32 config array into it. */
typedef struct kivi_cache_config {
  int32_t layers, kv_heads, q_heads, head_dim, page_tokens, residual, max_pages, max_seqs;
  int32_t k_kind, k_bits, k_group, k_fit, k_iters;
  int32_t v_kind, v_bits, v_group, v_fit, v_iters;
} kivi_cache_config;
KIVI_STATIC_ASSERT(sizeof(kivi_cache_config) == 18 * sizeof(int32_t), "config is the int32 array of kivi.h");

/** Byte sizes of one head's block of one page, for K or for V. */
typedef struct kivi_part_layout {
  uint64_t codes;  /* bytes of codes (or fp16 values at 16 bits) */
  uint64_t params; /* bytes of params (0 at 16 bits) */
  uint64_t head;   /* codes + params, rounded up to 16 */
  uint64_t page;   /* head * kv_heads */
} kivi_part_layout;

KIVI_HD uint64_t kivi_round16(uint64_t x) { return (x + 15u) & ~(uint64_t)15u; }

/** Params bytes per group: 4 (half2 scale, zero) for uniform, 2 * 2^bits for codebook. */
KIVI_HD uint64_t kivi_param_bytes(int32_t kind, int32_t bits) { return kind == 0 ? 4u : 2u * (uint64_t)(1 << bits); }

/** Layout of the key part (is_value = 0) or the value part (is_value = 1) of a page. */
KIVI_HD kivi_part_layout kivi_page_part(const kivi_cache_config *c, int is_value) {
  kivi_part_layout l;
  int32_t bits = is_value ? c->v_bits : c->k_bits;
  int32_t kind = is_value ? c->v_kind : c->k_kind;
  int32_t group = is_value ? c->v_group : c->k_group;
  uint64_t values = (uint64_t)c->page_tokens * (uint64_t)c->head_dim;
  if (bits == 16) {
    l.codes = values * 2u;
    l.params = 0;
  } else {
    l.codes = values * (uint64_t)bits / 8u;
    l.params = (values / (uint64_t)group) * kivi_param_bytes(kind, bits);
  }
  l.head = kivi_round16(l.codes + l.params);
  l.page = l.head * (uint64_t)c->kv_heads;
  return l;
}

/** One layer's view of a cache: the cache's config with the layer's key and value formats, the
    byte sizes of its page parts, and where its storage starts in the K and V pools (layer l's page p
    is at base + p * part.page). A single-format cache's layer l has base l * max_pages * part.page. */
typedef struct kivi_layer_layout {
  kivi_cache_config cfg;
  kivi_part_layout kp, vp;
  uint64_t kbase, vbase;
} kivi_layer_layout;

/** 1 when the cache's pages use the tensor-core layout (see above): uniform 2-bit keys, uniform or
    codebook 2-bit values, groups of 32, 64 or 128 each, head_dim 64 or 128, any number of query heads a
    KV head. */
KIVI_HD int kivi_cache_mma_layout(const kivi_cache_config *c) {
  return c->k_kind == 0 && c->k_bits == 2 && c->v_bits == 2 && (c->v_kind == 0 || c->v_kind == 1) &&
         (c->head_dim == 64 || c->head_dim == 128);
}

/** Position of page token t in a value-params run of the tensor-core layout (pair order). */
KIVI_HD int32_t kivi_pair_pos(int32_t t) { return (t & ~15) | ((t & 7) << 1) | ((t >> 3) & 1); }

/**
 * Value codes of the tensor-core layout: a run of 16 tokens is D words, D / 32 for each lane of the
 * warp that multiplies them, and each word holds exactly the codes of that lane's A fragments for two
 * m-tiles of 16 channels, so that a mask alone (or a shift by 8 and a mask) puts a code pair in the
 * bits of an fp16 subnormal. Word w = lane (D / 32) + q of a run, lane = 4 g + tg, slot s (bits 2s, 2s+1):
 *   token u = 8 (s >> 3) + 2 tg + ((s >> 2) & 1), channel d = 32 q + 16 ((s >> 1) & 1) + 2 g + (s & 1).
 * In a word, slots 0-3 and 8-11 (a mask each) are fragment registers a0, a1 of m-tile 2q and of 2q + 1;
 * slots 4-7 and 12-15 (after the shift) are a2, a3: the two tokens of a register are u and u + 8.
 * This maps (u, d) to (word, slot); kivi_mma_value_slot below is its inverse.
 */
KIVI_HD int32_t kivi_mma_value_code(int32_t D, int32_t u, int32_t d, int32_t *slot) {
  *slot = 8 * (u >> 3) + 4 * (u & 1) + 2 * ((d >> 4) & 1) + (d & 1);
  return (4 * ((d & 15) >> 1) + ((u & 7) >> 1)) * (D / 32) + (d >> 5);
}
/** Token u (of the run) and channel d of slot s of word w of a run: the inverse of kivi_mma_value_code. */
KIVI_HD void kivi_mma_value_slot(int32_t D, int32_t w, int32_t s, int32_t *u, int32_t *d) {
  const int32_t lane = w / (D / 32), q = w % (D / 32);
  *u = 8 * (s >> 3) + 2 * (lane & 3) + ((s >> 2) & 1);
  *d = 32 * q + 16 * ((s >> 1) & 1) + 2 * (lane >> 2) + (s & 1);
}

/** Slot of channel d in its key word of the tensor-core layout: 4 (d % 4) + (d % 16) / 4, so that one
    shift and mask ((w >> 2i) & 0x03030303) gives four consecutive channels, 4i .. 4i + 3, one a byte. */
KIVI_HD int32_t kivi_mma_key_slot(int32_t d) { return 4 * (d & 3) + ((d >> 2) & 3); }

/** Word index of element (page token t, channel d) in a head block's codes, and (via *slot) its slot. */
KIVI_HD int64_t kivi_page_code_at(const kivi_cache_config *c, int is_value, int32_t t, int32_t d, int32_t *slot) {
  const int32_t bits = is_value ? c->v_bits : c->k_bits, cpw = kivi_codes_per_word(bits);
  const int64_t P = c->page_tokens, D = c->head_dim;
  if (kivi_cache_mma_layout(c)) {
    if (is_value) return (int64_t)(t / 16) * D + kivi_mma_value_code((int32_t)D, t % 16, d, slot);
    *slot = kivi_mma_key_slot(d);
    return (int64_t)t * (D / cpw) + d / cpw;
  }
  *slot = is_value ? d % cpw : t % cpw;
  return is_value ? (int64_t)t * (D / cpw) + d / cpw : (int64_t)d * (P / cpw) + t / cpw;
}

/** Group index of element (t, d) in a head block (codebook centroids start at group * 2^bits halves). */
KIVI_HD int64_t kivi_page_group_at(const kivi_cache_config *c, int is_value, int32_t t, int32_t d) {
  const int64_t P = c->page_tokens, D = c->head_dim;
  const int32_t G = is_value ? c->v_group : c->k_group;
  if (kivi_cache_mma_layout(c)) return is_value ? (int64_t)(d / G) * P + t : (int64_t)(t / G) * D + d;
  return is_value ? (int64_t)t * (D / G) + d / G : (int64_t)d * (P / G) + t / G;
}

/** Half indices (in the params area of a head block) of the uniform scale and zero of element (t, d). */
KIVI_HD void kivi_page_uniform_at(const kivi_cache_config *c, int is_value, int32_t t, int32_t d, int64_t *scale,
                                  int64_t *zero) {
  if (kivi_cache_mma_layout(c) && is_value) {
    const int64_t P = c->page_tokens, runs = c->head_dim / c->v_group;
    *scale = (int64_t)(d / c->v_group) * P + kivi_pair_pos(t);
    *zero = *scale + runs * P;
    return;
  }
  const int64_t g = kivi_page_group_at(c, is_value, t, d);
  *scale = 2 * g;
  *zero = 2 * g + 1;
}

/** Half index (in the params area of a head block) of codebook centroid j of element (t, d)'s group. */
KIVI_HD int64_t kivi_page_centroid_at(const kivi_cache_config *c, int is_value, int32_t t, int32_t d, int32_t j) {
  if (kivi_cache_mma_layout(c) && is_value) {
    const int64_t P = c->page_tokens, runs = c->head_dim / c->v_group;
    return ((int64_t)j * runs + d / c->v_group) * P + kivi_pair_pos(t);
  }
  return kivi_page_group_at(c, is_value, t, d) * (1 << (is_value ? c->v_bits : c->k_bits)) + j;
}

/** Flush unit F: the key group size (tokens quantized together). */
KIVI_HD int32_t kivi_flush_tokens(const kivi_cache_config *c) { return c->k_group; }
/** Tokens flushed into pages when n tokens join a layer holding len tokens, qlen of them in pages:
    the oldest whole flush units beyond the residual window (the window rule of kivi.h). */
KIVI_HD int64_t kivi_flush_count(const kivi_cache_config *c, int64_t len, int64_t qlen, int64_t n) {
  const int64_t over = len + n - qlen - c->residual, F = kivi_flush_tokens(c);
  return over >= F ? over / F * F : 0;
}
/** Residual window capacity R + F in tokens. */
KIVI_HD int32_t kivi_window_tokens(const kivi_cache_config *c) { return c->residual + c->k_group; }

#endif /* KIVI_FORMAT_H */
