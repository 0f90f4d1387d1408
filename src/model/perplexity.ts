/**
 * The perplexity protocol of byte-llama-9m's model card, for any cache format: `windows` windows of
 * `window` tokens of a text, window i starting at floor(i * (n - window - 1) / (windows - 1)); each
 * window prefilled with its first `prefill` tokens (exact attention), then `steps` tokens decoded one
 * at a time over the cache, every window in one decode batch. Bits per token = the mean over decoded
 * positions of -log2 p(next token). Against a reference run's distributions (bits 16), it also gives
 * the mean KL divergence and the share of steps whose most likely token agrees.
 *
 * @module
 */
import {
  cacheBitsPerValue,
  type CacheFormat,
  type LayerFormat,
  resolveCacheOptions,
} from "../cache.ts";
import type { ModelCacheOptions, ProtocolModel } from "./types.ts";

/** Options of {@link perplexity}; the defaults are the model card's protocol. */
export interface PerplexityOptions {
  /** Windows, run as one batch (default 24). */
  windows?: number;
  /** Tokens a window spans (default 2048). */
  window?: number;
  /** Tokens prefilled with exact attention (default 256). */
  prefill?: number;
  /** Decode steps a window (default window - prefill). */
  steps?: number;
  /** The cache to decode over. */
  cache?: ModelCacheOptions;
  /** A reference run's distributions (its `distributions`), for `klVsReference` and `top1VsReference`. */
  reference?: Float32Array;
  /** Keep this run's log-probabilities in `distributions` ([steps][windows][vocab]). */
  keep?: boolean;
  /** Called after each decode step. */
  onProgress?: (done: number, total: number) => void;
}

/** What {@link perplexity} measured. */
export interface PerplexityResult {
  windows: number;
  steps: number;
  /** Bits per token (per byte for a byte model) over the decoded positions. */
  bpb: number;
  /** Mean KL(reference || this run) of each step's next-token distribution, in nats. */
  klVsReference?: number;
  /** Share of decode steps whose most likely next token is the reference's. */
  top1VsReference?: number;
  /** Decoded tokens a second over the whole batch (decode steps only, prefill excluded). */
  tokensPerSecond: number;
  /** Seconds of the decode loop. */
  decodeSeconds: number;
  /** Log-probabilities of every step, [steps][windows][vocab] (with `keep`). */
  distributions?: Float32Array;
}

/** The resolved protocol: window starts and sizes. */
export interface Protocol {
  windows: number;
  window: number;
  prefill: number;
  steps: number;
  starts: number[];
}

/** Window starts and sizes for a text of `n` tokens; RangeError when the text or the sizes do not fit. */
export function protocol(
  n: number,
  o: Pick<PerplexityOptions, "windows" | "window" | "prefill" | "steps"> = {},
): Protocol {
  const windows = o.windows ?? 24, window = o.window ?? 2048, prefill = o.prefill ?? 256;
  const steps = o.steps ?? window - prefill;
  for (const [k, v] of Object.entries({ windows, window, prefill, steps })) {
    if (!Number.isInteger(v) || v < 1) {
      throw new RangeError(`${k} must be a positive integer, got ${v}`);
    }
  }
  if (prefill + steps > window) {
    throw new RangeError(
      `prefill (${prefill}) + steps (${steps}) must fit the window of ${window} tokens`,
    );
  }
  if (n < window + 1) {
    throw new RangeError(`the text must hold at least window + 1 = ${window + 1} tokens, got ${n}`);
  }
  const starts = Array.from(
    { length: windows },
    (_, i) => windows === 1 ? 0 : Math.floor((i * (n - window - 1)) / (windows - 1)),
  );
  return { windows, window, prefill, steps, starts };
}

/** Runs the protocol over `text` with the cache of `opts.cache`. */
export function perplexity(
  model: ProtocolModel,
  text: string | Uint8Array,
  opts: PerplexityOptions = {},
): PerplexityResult {
  const ids = model.encode(text);
  const p = protocol(ids.length, opts);
  const V = model.config.vocab, W = p.windows;
  if (opts.reference !== undefined && opts.reference.length !== p.steps * W * V) {
    throw new RangeError(
      `reference must hold steps (${p.steps}) x windows (${W}) x vocab (${V}) = ${
        p.steps * W * V
      } values, got ${opts.reference.length}`,
    );
  }
  const cache = model._createCache(opts.cache ?? {}, W, p.prefill + p.steps);
  let decoder;
  try {
    const seqs = p.starts.map(() => cache.createSequence());
    p.starts.forEach((s, b) => model._prefill(seqs[b], ids.subarray(s, s + p.prefill)));
    decoder = model._decoder(cache, seqs);
    const kept = opts.keep ? new Float32Array(p.steps * W * V) : undefined;
    const tokens = new Int32Array(W), pos = new Int32Array(W);
    let nll = 0, kl = 0, agree = 0;
    const t0 = performance.now();
    for (let s = 0; s < p.steps; s++) {
      const at = p.prefill + s;
      p.starts.forEach((start, b) => tokens[b] = ids[start + at]);
      pos.fill(at);
      const lp = decoder.step(tokens, pos);
      kept?.set(lp, s * W * V);
      for (let b = 0; b < W; b++) {
        const row = lp.subarray(b * V, (b + 1) * V);
        nll -= row[ids[p.starts[b] + at + 1]];
        if (opts.reference !== undefined) {
          const ref = opts.reference.subarray((s * W + b) * V, (s * W + b + 1) * V);
          for (let i = 0; i < V; i++) kl += Math.exp(ref[i]) * (ref[i] - row[i]);
          if (argmax(ref) === argmax(row)) agree++;
        }
      }
      opts.onProgress?.(s + 1, p.steps);
    }
    const seconds = (performance.now() - t0) / 1000, n = p.steps * W;
    return {
      windows: W,
      steps: p.steps,
      bpb: nll / n / Math.LN2,
      ...(opts.reference !== undefined
        ? { klVsReference: kl / n, top1VsReference: agree / n }
        : {}),
      tokensPerSecond: n / seconds,
      decodeSeconds: seconds,
      ...(kept ? { distributions: kept } : {}),
    };
  } finally {
    decoder?.dispose();
    cache.dispose();
  }
}

/** Bits per token over the protocol's decoded positions from the teacher-forced forward (exact
 * causal attention over each whole window, no cache): what a bits-16 run must reproduce. */
export function teacherForcedBpb(
  model: ProtocolModel,
  text: string | Uint8Array,
  opts: Pick<PerplexityOptions, "windows" | "window" | "prefill" | "steps"> = {},
): number {
  const ids = model.encode(text);
  const p = protocol(ids.length, opts);
  const V = model.config.vocab, T = p.prefill + p.steps;
  const lp = model.teacherForced(p.starts.map((s) => ids.subarray(s, s + T)));
  let nll = 0;
  p.starts.forEach((start, b) => {
    for (let t = p.prefill; t < T; t++) nll -= lp[(b * T + t) * V + ids[start + t + 1]];
  });
  return nll / (p.steps * p.windows) / Math.LN2;
}

function argmax(x: Float32Array): number {
  let best = 0;
  for (let i = 1; i < x.length; i++) if (x[i] > x[best]) best = i;
  return best;
}

/** A cache of the comparison table. */
export interface CacheSpec {
  name: string;
  keys: CacheFormat;
  values: CacheFormat;
  /** Per-layer formats (a calibration plan's). */
  perLayer?: readonly LayerFormat[];
}

const CB2_G64 = { kind: "codebook", bits: 2, group: 64 } as const;
const U2_G32 = { kind: "uniform", bits: 2, group: 32 } as const;
const U4_G32 = { kind: "uniform", bits: 4, group: 32 } as const;
/** The caches of the results table, bits 16 (the reference) first. */
export const PROTOCOL_CACHES: readonly CacheSpec[] = [
  { name: "bits 16", keys: { bits: 16 }, values: { bits: 16 } },
  { name: "uniform 2-bit K+V G32", keys: U2_G32, values: U2_G32 },
  { name: "uniform K G32 + codebook V G64", keys: U2_G32, values: CB2_G64 },
  { name: "uniform 4-bit K + 2-bit V G32", keys: U4_G32, values: U2_G32 },
  { name: "uniform 4-bit K+V G32", keys: U4_G32, values: U4_G32 },
];

/** One row of the comparison. */
export interface ProtocolRow {
  cache: string;
  residual: number;
  bpb: number;
  klVsBits16: number;
  top1VsBits16: number;
  /** Bits per K/V value of the quantized tokens, the mean over layers (the fp16 window excluded). */
  bitsPerValue: number;
  /** Decoded tokens a second over the whole batch of windows. */
  tokensPerSecond: number;
}

/** Options of {@link compareCaches}. */
export interface CompareOptions
  extends Pick<PerplexityOptions, "windows" | "window" | "prefill" | "steps"> {
  /** Residual windows to run each cache at (default [128, 32]). */
  residuals?: readonly number[];
  /** Caches (default PROTOCOL_CACHES); a bits-16 run is made first as the reference either way. */
  caches?: readonly CacheSpec[];
  /** Called as each run starts, and after each of its steps. */
  onProgress?: (run: string, done: number, total: number) => void;
}

/** Bits per value of a cache of the comparison on `model` (the mean over layers, window excluded). */
export function specBitsPerValue(model: ProtocolModel, c: CacheSpec): number {
  const m = model.config;
  return cacheBitsPerValue(resolveCacheOptions({
    layers: m.layers,
    kvHeads: m.kvHeads,
    headDim: m.headDim,
    keys: c.keys,
    values: c.values,
    perLayer: c.perLayer,
    maxPages: 1,
  }));
}

/** The protocol for every cache at every residual, each against the bits-16 run of its residual. */
export function compareCaches(
  model: ProtocolModel,
  text: string | Uint8Array,
  o: CompareOptions = {},
): ProtocolRow[] {
  const rows: ProtocolRow[] = [];
  const caches = o.caches ?? PROTOCOL_CACHES;
  const sizes = { windows: o.windows, window: o.window, prefill: o.prefill, steps: o.steps };
  for (const residual of o.residuals ?? [128, 32]) {
    const label = (c: CacheSpec) => `${c.name}, residual ${residual}`;
    const ref = PROTOCOL_CACHES[0];
    const progress = (c: CacheSpec) => (done: number, total: number) =>
      o.onProgress?.(label(c), done, total);
    const base = perplexity(model, text, {
      ...sizes,
      keep: true,
      cache: { keys: ref.keys, values: ref.values, residual },
      onProgress: progress(ref),
    });
    for (const c of caches) {
      const r = c.name === ref.name
        ? { ...base, klVsReference: 0, top1VsReference: 1 }
        : perplexity(model, text, {
          ...sizes,
          reference: base.distributions,
          cache: { keys: c.keys, values: c.values, perLayer: c.perLayer, residual },
          onProgress: progress(c),
        });
      rows.push({
        cache: c.name,
        residual,
        bpb: r.bpb,
        klVsBits16: r.klVsReference!,
        top1VsBits16: r.top1VsReference!,
        bitsPerValue: specBitsPerValue(model, c),
        tokensPerSecond: r.tokensPerSecond,
      });
    }
  }
  return rows;
}
