/**
 * Seeded synthetic KV blocks with the traits published for Llama-family caches (KIVI, KVQuant):
 * keys with a few fixed outlier channels and rotary position embedding, values roughly Gaussian per
 * token with heavy tails and no channel outliers. i.i.d. Gaussian data is one case among several:
 * it makes every format look worse than it is in a model.
 *
 * @module
 */
import { Rng } from "./random.ts";

/** Options of {@link synthKV}. */
export interface SynthOptions {
  /** Seed of the generator (printed by demos so runs reproduce). */
  seed: number;
  /** Tokens (rows). */
  tokens: number;
  /** KV heads; the columns are kvHeads * headDim, head-major. */
  kvHeads: number;
  /** Channels per head (even, for the rotary pairs). */
  headDim: number;
  /** Outlier channels per head (default 4), fixed across tokens. */
  outliers?: number;
  /** Magnitude of outlier channels relative to the rest (default 12). */
  outlierScale?: number;
  /** First token position, for the rotary angles (default 0). */
  position?: number;
  /** Degrees of freedom of the value tails (default 4; Infinity for Gaussian). */
  valueTailNu?: number;
}

/** Keys and values [tokens][kvHeads * headDim] in fp32. */
export interface SynthKV {
  keys: Float32Array;
  values: Float32Array;
}

/** The per-channel traits of one generator seed: which channels are outliers and their offsets. */
function channelTraits(
  rng: Rng,
  heads: number,
  dim: number,
  outliers: number,
  outlierScale: number,
) {
  const scale = new Float32Array(heads * dim);
  const offset = new Float32Array(heads * dim);
  for (let h = 0; h < heads; h++) {
    for (let d = 0; d < dim; d++) {
      scale[h * dim + d] = 0.5 + rng.next();
      offset[h * dim + d] = 0.3 * rng.normal();
    }
    for (let o = 0; o < outliers; o++) {
      const d = rng.int(dim);
      scale[h * dim + d] *= outlierScale * (0.5 + rng.next());
      offset[h * dim + d] = outlierScale * 0.5 * rng.normal();
    }
  }
  return { scale, offset };
}

/**
 * A seeded synthetic KV block.
 *
 * @example
 * ```ts
 * import { synthKV } from "./mod.ts";
 * const { keys, values } = synthKV({ seed: 7, tokens: 256, kvHeads: 2, headDim: 128 });
 * console.log(keys.length, values.length); // 65536 65536
 * ```
 */
export function synthKV(opts: SynthOptions): SynthKV {
  const { tokens, kvHeads: heads, headDim: dim } = opts;
  if (dim % 2 !== 0) throw new RangeError(`headDim must be even (rotary pairs), got ${dim}`);
  const rng = new Rng(opts.seed);
  const { scale, offset } = channelTraits(
    rng,
    heads,
    dim,
    opts.outliers ?? 4,
    opts.outlierScale ?? 12,
  );
  const nu = opts.valueTailNu ?? 4;
  const cols = heads * dim;
  const keys = new Float32Array(tokens * cols);
  const values = new Float32Array(tokens * cols);
  const half = dim / 2;
  const pos0 = opts.position ?? 0;
  for (let t = 0; t < tokens; t++) {
    for (let h = 0; h < heads; h++) {
      const base = t * cols + h * dim;
      for (let i = 0; i < half; i++) {
        const a = offset[h * dim + i] + scale[h * dim + i] * rng.normal();
        const b = offset[h * dim + i + half] + scale[h * dim + i + half] * rng.normal();
        const theta = (pos0 + t) * Math.pow(10000, (-2 * i) / dim);
        const c = Math.cos(theta), s = Math.sin(theta);
        keys[base + i] = a * c - b * s;
        keys[base + i + half] = a * s + b * c;
      }
      const tokenScale = 0.5 + rng.next();
      for (let d = 0; d < dim; d++) {
        values[base + d] = tokenScale *
          (Number.isFinite(nu) ? rng.studentT(nu) * 0.7 : rng.normal());
      }
    }
  }
  return { keys, values };
}
