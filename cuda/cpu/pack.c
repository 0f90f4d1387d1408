/*
 * pack.c — kivi_codes_pack / kivi_codes_unpack: one code per byte <-> LSB-first uint32 words.
 */
#include "cpu_internal.h"

KIVI_API kivi_status kivi_codes_pack(kivi_ctx_t ctx, const uint8_t *codes, int64_t n, int32_t bits, uint32_t *words) {
  const cpu_spec spec = kivi_spec_codes(1, codes, words, n, bits);
  kivi_status st = cpu_validate(ctx, &spec, NULL);
  if (st) return st;
  const uint8_t top = (uint8_t)(kivi_levels(bits) - 1);
  uint8_t worst = 0; /* branch-free scan; locate the first bad code only if there is one */
  for (int64_t i = 0; i < n; i++) worst = codes[i] > worst ? codes[i] : worst;
  if (worst > top) {
    for (int64_t i = 0; i < n; i++)
      if (codes[i] > top)
        return cpu_fail(ctx, KIVI_ERR_ARG, "%s: codes[%lld] must be below 2^bits (%d), got %u", spec.op, (long long)i,
                        (int)kivi_levels(bits), (unsigned)codes[i]);
  }
  cpu_pack(codes, n, bits, words);
  return KIVI_OK;
}

KIVI_API kivi_status kivi_codes_unpack(kivi_ctx_t ctx, const uint32_t *words, int64_t n, int32_t bits, uint8_t *codes) {
  const cpu_spec spec = kivi_spec_codes(0, codes, words, n, bits);
  kivi_status st = cpu_validate(ctx, &spec, NULL);
  if (st) return st;
  cpu_unpack(words, n, bits, codes);
  return KIVI_OK;
}
