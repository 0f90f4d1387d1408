/**
 * What the multi-token tests share (tests/multitoken_test.ts on the CPU build, tests/multitoken_gpu_test.ts
 * between the builds): the float64 causal oracle with its log-sum-exp, the merge oracle and the cache
 * options with a partly filled page (pages of 64 tokens, flushes of 32).
 *
 * @module
 */
import type { CacheOptions } from "../src/mod.ts";
import { cacheOptions } from "./_helpers.ts";

/** Uniform 2-bit keys, codebook 2-bit values in groups of 32, pages of 64 tokens (a quantized length
 * of 96 leaves page 1 half full), a window of 32, GQA 8 / 2: {@link cacheOptions} with pages twice
 * its window. */
export function multiOptions(layers = 2, maxPages = 64, maxSequences = 12): CacheOptions {
  return { ...cacheOptions(layers, 2, 8, 64, maxPages, maxSequences), pageTokens: 64 };
}

/**
 * float64 causal attention of `qlen` queries q [qlen][queryHeads][headDim] over a sequence's K/V
 * [len][kvHeads][headDim] (as cache.read gives them): query i sees tokens [0, len - qlen + i].
 * Returns out [qlen][queryHeads][headDim] and the natural log-sum-exp [qlen][queryHeads].
 */
export function causalOracle(
  k: ArrayLike<number>,
  v: ArrayLike<number>,
  q: ArrayLike<number>,
  len: number,
  qlen: number,
  o: { kvHeads: number; headDim: number; queryHeads: number },
  scale: number,
): { out: Float64Array; lse: Float64Array } {
  const { kvHeads, headDim: D, queryHeads: QH } = o;
  const ratio = QH / kvHeads;
  const out = new Float64Array(qlen * QH * D), lse = new Float64Array(qlen * QH);
  const s = new Float64Array(len);
  for (let i = 0; i < qlen; i++) {
    const see = len - qlen + i + 1;
    for (let h = 0; h < QH; h++) {
      const kh = Math.floor(h / ratio), qo = (i * QH + h) * D;
      let m = -Infinity;
      for (let t = 0; t < see; t++) {
        let dot = 0;
        for (let d = 0; d < D; d++) dot += q[qo + d] * k[(t * kvHeads + kh) * D + d];
        s[t] = dot * scale;
        m = Math.max(m, s[t]);
      }
      let sum = 0;
      for (let t = 0; t < see; t++) sum += s[t] = Math.exp(s[t] - m);
      for (let t = 0; t < see; t++) {
        const w = s[t] / sum;
        for (let d = 0; d < D; d++) out[qo + d] += w * v[(t * kvHeads + kh) * D + d];
      }
      lse[i * QH + h] = m + Math.log(sum);
    }
  }
  return { out, lse };
}

/** The largest |a - b| over two arrays of one length. */
export function maxDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`lengths differ: ${a.length} and ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
