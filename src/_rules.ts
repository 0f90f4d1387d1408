/**
 * The rules of kivi.h as the TypeScript checks read them, written once: the C side is
 * cuda/include/kivi_host.h (kivi_spec_check, kivi_cache_config_check), which the checks here run
 * ahead of to give typed errors (TypeError, RangeError) first. quant.ts and cache_config.ts take
 * their sets and ranges from this table.
 *
 * @module
 */
import { checkInt, checkOneOf } from "./_checks.ts";

/** Sets and ranges of the quantizer and cache arguments (kivi.h). */
export const RULES = {
  /** Code widths of the quantizers. */
  bits: [2, 4] as const,
  /** Widths a cache stores (16: plain fp16). */
  cacheBits: [2, 4, 16] as const,
  /** Values per group. */
  groups: [32, 64, 128] as const,
  kinds: ["uniform", "codebook"] as const,
  fits: ["free", "pinned"] as const,
  assigns: ["nearest", "interval"] as const,
  /** Lloyd iterations of a codebook fit (KIVI_MAX_ITERS) and the default. */
  iterations: { min: 1, max: 256, default: 16 },
  headDims: [64, 128, 256] as const,
  pageTokens: [32, 64, 128, 256] as const,
  /** Query heads a KV head at most (GQA). */
  maxQueryRatio: 32,
} as const;

/** The codebook options of a format object `f` named `name`: fit and iterations, defaults filled. */
export function codebookFit(
  name: string,
  f: Record<string, unknown>,
): { fit: "free" | "pinned"; iterations: number } {
  const { min, max } = RULES.iterations;
  return {
    fit: checkOneOf(`${name}.fit`, f.fit ?? "free", RULES.fits),
    iterations: checkInt(`${name}.iterations`, f.iterations ?? RULES.iterations.default, min, max),
  };
}

/** A TypeError for a codebook option given to a uniform format. */
export function refuseCodebookKeys(
  name: string,
  f: Record<string, unknown>,
  keys: readonly string[],
): void {
  for (const k of keys) {
    if (f[k] !== undefined) {
      throw new TypeError(`${name}.${k} is an option of the codebook format, not of "uniform"`);
    }
  }
}
