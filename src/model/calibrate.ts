/**
 * Mixed precision across layers, chosen by a calibration pass. For every layer and every candidate
 * format of its keys (or of its values), the perplexity protocol runs over a calibration text with
 * only that part of that layer quantized (every other part at bits 16) and measures the mean KL of
 * each decode step's next-token distribution against the bits-16 run: the part's sensitivity to
 * that format. The plan then picks one format a part to minimise the sum of those KL increments
 * under a budget of bits per value (the mean over layers of each layer's K and V page bits, the fp16
 * window excluded): a multiple-choice knapsack over the parts, solved exactly by dynamic
 * programming over the bits spent (1/64-bit steps). Summing the increments is the first-order model
 * of small perturbations: each part's quantization error adds its own KL. The plan is JSON that
 * `createCache` (its `perLayer`), `kivi generate` and `kivi perplexity` (`--plan`) take.
 *
 * The calibration text must not be the evaluation text: {@link splitHeldout} cuts the held-out file
 * into its first {@link CALIBRATION_BYTES} bytes (calibration) and the rest (evaluation).
 *
 * @module
 */
import {
  type CacheFormat,
  formatBitsPerValue,
  type LayerFormat,
  resolveCacheOptions,
  type ResolvedCacheFormat,
} from "../cache.ts";
import { show } from "../_checks.ts";
import { perplexity, type PerplexityOptions } from "./perplexity.ts";
import type { ProtocolModel } from "./types.ts";

/** Bytes at the start of the held-out text that calibrate; the evaluation uses the rest. */
export const CALIBRATION_BYTES = 32768;

/** The held-out text cut into its calibration part (bytes [0, CALIBRATION_BYTES)) and its
 * evaluation part (the rest). */
export function splitHeldout(
  text: Uint8Array,
): { calibration: Uint8Array; evaluation: Uint8Array } {
  if (text.length <= 2 * CALIBRATION_BYTES) {
    throw new RangeError(
      `text must hold more than ${
        2 * CALIBRATION_BYTES
      } bytes to split into calibration and evaluation parts, got ${text.length}`,
    );
  }
  return {
    calibration: text.subarray(0, CALIBRATION_BYTES),
    evaluation: text.subarray(CALIBRATION_BYTES),
  };
}

const U = (bits: 2 | 4, group: 32 | 64 | 128) => ({ kind: "uniform", bits, group }) as const;
const CB = (bits: 2 | 4, group: 32 | 64 | 128) => ({ kind: "codebook", bits, group }) as const;

/** Key formats tried a layer (by default those whose group divides the residual window and the
 * page). All layers of a plan share one key group (the flush unit), so the plan is solved once a key
 * group and the best kept. Bits 16 is a candidate too, with KL 0 and no run. */
export const KEY_CANDIDATES: readonly CacheFormat[] = [U(2, 32), U(4, 32), U(2, 64), U(4, 64)];
/** Value formats tried a layer (by default those whose group divides the model's head_dim). */
export const VALUE_CANDIDATES: readonly CacheFormat[] = [
  U(2, 128),
  U(2, 64),
  U(2, 32),
  CB(2, 64),
  U(4, 128),
  U(4, 64),
  U(4, 32),
];

/** The calibration protocol's defaults: 4 windows of 1024 tokens, 512 prefilled, 256 decoded. */
export const CALIBRATION_PROTOCOL = { windows: 4, window: 1024, prefill: 512, steps: 256 } as const;

/** `16` or `KIND:BITS:GROUP`, the CLI's name of a format. */
export function formatName(f: CacheFormat): string {
  return f.bits === 16 ? "16" : `${f.kind}:${f.bits}:${f.group ?? 32}`;
}

/** One measured sensitivity: the KL (nats) of the next-token distribution against bits 16 when only
 * `part` of `layer` is stored in `format`. */
export interface SensitivityEntry {
  layer: number;
  part: "keys" | "values";
  format: CacheFormat;
  /** Bits per value of the part in that format (codes and params of a page, over its values). */
  bits: number;
  kl: number;
}

/** What {@link measureSensitivity} measured. */
export interface Sensitivity {
  layers: number;
  residual: number;
  pageTokens: number;
  headDim: number;
  /** The protocol it ran (over the calibration text). */
  protocol: { windows: number; window: number; prefill: number; steps: number };
  entries: SensitivityEntry[];
}

/** Options of {@link measureSensitivity} and {@link calibrate}. */
export interface CalibrateOptions
  extends Pick<PerplexityOptions, "windows" | "window" | "prefill" | "steps"> {
  /** Residual window of the cache the plan is for (default 128). */
  residual?: number;
  keyCandidates?: readonly CacheFormat[];
  valueCandidates?: readonly CacheFormat[];
  /** Called as each run starts (`run` names it) and after each of its steps. */
  onProgress?: (run: string, done: number, total: number) => void;
}

/** A calibrated plan: per-layer formats chosen under a bits-per-value budget. */
export interface Plan {
  kivi: "plan";
  version: 1;
  /** The budget asked for, bits per value (mean over layers, window excluded). */
  budget: number;
  /** The plan's own bits per value (at most the budget). */
  bitsPerValue: number;
  /** The residual window calibrated at. */
  residual: number;
  /** Sum of the chosen parts' measured KL increments (nats): the additive model's prediction. */
  predictedKl: number;
  layers: number;
  /** The cache's own formats (every layer is named in perLayer; these are the fallback). */
  keys: CacheFormat;
  values: CacheFormat;
  /** One entry a layer: what `createCache({ perLayer })` takes. */
  perLayer: { layer: number; keys: CacheFormat; values: CacheFormat }[];
  calibration: Sensitivity["protocol"];
  sensitivity: SensitivityEntry[];
}

function resolved(f: CacheFormat, headDim: number): ResolvedCacheFormat {
  return resolveCacheOptions({ layers: 1, kvHeads: 1, headDim, keys: f, values: f, maxPages: 1 })
    .keys;
}

/** Bits per value of one part (K or V) in format f. */
function partBits(f: CacheFormat, pageTokens: number, headDim: number): number {
  const r = resolved(f, headDim);
  return formatBitsPerValue(r, r, pageTokens, headDim);
}

function checkBudget(budget: unknown): number {
  if (typeof budget !== "number") {
    throw new TypeError(`budget must be a number of bits per value, got ${show(budget)}`);
  }
  if (!(budget >= 2 && budget <= 16)) {
    throw new RangeError(`budget must be in 2..16 bits per value, got ${show(budget)}`);
  }
  return budget;
}

/**
 * Measures each layer's sensitivity: the protocol over `text` once at bits 16 (the reference), then
 * once for each layer, part and candidate format with only that part quantized.
 *
 * @example
 * ```ts ignore
 * const s = measureSensitivity(model, splitHeldout(heldout).calibration, { residual: 32 });
 * const plan = planFromSensitivity(s, 3.3);
 * ```
 */
export function measureSensitivity(
  model: ProtocolModel,
  text: Uint8Array | string,
  o: CalibrateOptions = {},
): Sensitivity {
  const m = model.config;
  const p = {
    windows: o.windows ?? CALIBRATION_PROTOCOL.windows,
    window: o.window ?? CALIBRATION_PROTOCOL.window,
    prefill: o.prefill ?? CALIBRATION_PROTOCOL.prefill,
    steps: o.steps ?? CALIBRATION_PROTOCOL.steps,
  };
  const n = model.encode(text).length;
  if (n < p.window + 1) {
    throw new RangeError(
      `text must hold at least one calibration window + 1 (${p.window + 1} tokens), got ${n}`,
    );
  }
  const residual = o.residual ?? 128;
  const pageTokens = 64;
  const F16 = { bits: 16 } as const;
  const base = { keys: F16, values: F16, residual, pageTokens };
  // checks the candidates (and the residual) before the runs
  const kc = o.keyCandidates ??
    KEY_CANDIDATES.filter((f) =>
      residual % (f.group ?? 32) === 0 && pageTokens % (f.group ?? 32) === 0
    );
  const vc = o.valueCandidates ??
    VALUE_CANDIDATES.filter((f) => f.bits === 16 || m.headDim % (f.group ?? 32) === 0);
  /** The cache of a run with only `part` of `layer` in format f (keys: the cache's key group f's). */
  const runCache = (layer: number, part: "keys" | "values", f: CacheFormat) => ({
    ...base,
    keys: part === "keys" ? { bits: 16, group: f.group } as CacheFormat : F16,
    perLayer: [{ layer, [part]: f }],
  });
  for (const [part, cands] of [["keys", kc], ["values", vc]] as const) {
    for (const f of cands) {
      resolveCacheOptions({
        layers: m.layers,
        kvHeads: m.kvHeads,
        headDim: m.headDim,
        ...runCache(0, part, f),
        maxPages: 1,
      });
    }
  }
  const progress = (run: string) => (done: number, total: number) =>
    o.onProgress?.(run, done, total);
  const ref = perplexity(model, text, {
    ...p,
    keep: true,
    cache: base,
    onProgress: progress("bits 16 (reference)"),
  });
  const entries: SensitivityEntry[] = [];
  for (let layer = 0; layer < m.layers; layer++) {
    for (const [part, cands] of [["keys", kc], ["values", vc]] as const) {
      entries.push({ layer, part, format: F16, bits: 16, kl: 0 });
      for (const f of cands) {
        const r = perplexity(model, text, {
          ...p,
          reference: ref.distributions,
          cache: runCache(layer, part, f),
          onProgress: progress(`layer ${layer} ${part} ${formatName(f)}`),
        });
        entries.push({
          layer,
          part,
          format: f,
          bits: partBits(f, pageTokens, m.headDim),
          kl: Math.max(0, r.klVsReference!),
        });
      }
    }
  }
  return {
    layers: m.layers,
    residual,
    pageTokens,
    headDim: m.headDim,
    protocol: p,
    entries,
  };
}

/**
 * The plan of least predicted KL (the sum of the chosen parts' measured increments) whose bits per
 * value (the mean over layers of (K bits + V bits) / 2) is at most `budget`: an exact multiple-choice
 * knapsack over the 2 x layers parts, by dynamic programming over the bits spent in 1/64-bit steps,
 * solved once for each key group measured (all layers share the cache's key group) and the best kept.
 *
 * @example
 * ```ts ignore
 * const plan = planFromSensitivity(measureSensitivity(model, text), 3.0);
 * console.log(plan.bitsPerValue, plan.perLayer);
 * ```
 */
export function planFromSensitivity(s: Sensitivity, budgetArg: number): Plan {
  const budget = checkBudget(budgetArg);
  const groupOf = (e: SensitivityEntry) => e.format.group ?? 32;
  const groups = [
    ...new Set(
      s.entries.filter((e) => e.part === "keys" && e.format.bits !== 16).map(groupOf),
    ),
  ];
  let best: Plan | undefined, cheapest = Infinity;
  for (const g of groups.length > 0 ? groups : [32]) {
    const entries = s.entries.filter((e) =>
      e.part !== "keys" || e.format.bits === 16 || groupOf(e) === g
    );
    const r = solve(s, entries, budget, g);
    if (typeof r === "number") cheapest = Math.min(cheapest, r);
    else if (best === undefined || r.predictedKl < best.predictedKl) best = r;
  }
  if (best === undefined) {
    throw new RangeError(
      `budget must be at least the cheapest plan's ${
        cheapest.toFixed(3)
      } bits per value, got ${budget}`,
    );
  }
  return best;
}

/** The knapsack of planFromSensitivity for one key group g: the plan, or (none fits) the cheapest
 * plan's bits per value. */
function solve(
  s: Sensitivity,
  entries: SensitivityEntry[],
  budget: number,
  g: number,
): Plan | number {
  const STEP = 64;
  const parts: SensitivityEntry[][] = [];
  for (let l = 0; l < s.layers; l++) {
    for (const part of ["keys", "values"] as const) {
      parts.push(entries.filter((e) => e.layer === l && e.part === part));
    }
  }
  const cost = (e: SensitivityEntry) => Math.ceil(e.bits * STEP - 1e-9);
  const cap = Math.floor(budget * 2 * s.layers * STEP + 1e-9);
  const cheapest = parts.reduce((sum, c) => sum + Math.min(...c.map(cost)), 0);
  if (cheapest > cap) return cheapest / (2 * s.layers * STEP);
  // best[b]: least KL of the parts so far spending exactly b steps; pick[i][b]: part i's choice there
  let best = new Float64Array(cap + 1).fill(Infinity);
  best[0] = 0;
  const pick: Int16Array[] = [];
  for (const cands of parts) {
    const next = new Float64Array(cap + 1).fill(Infinity),
      choice = new Int16Array(cap + 1).fill(-1);
    for (let b = 0; b <= cap; b++) {
      if (best[b] === Infinity) continue;
      cands.forEach((e, j) => {
        const nb = b + cost(e);
        if (nb <= cap && best[b] + e.kl < next[nb]) {
          next[nb] = best[b] + e.kl;
          choice[nb] = j;
        }
      });
    }
    pick.push(choice);
    best = next;
  }
  let end = 0;
  for (let b = 0; b <= cap; b++) if (best[b] < best[end]) end = b;
  const predictedKl = best[end];
  const chosen: SensitivityEntry[] = new Array(parts.length);
  for (let i = parts.length - 1; i >= 0; i--) {
    chosen[i] = parts[i][pick[i][end]];
    end -= cost(chosen[i]);
  }
  // bits-16 keys in the plan's key group (the cache's, which every layer shares)
  const key = (f: CacheFormat): CacheFormat => f.bits === 16 ? { bits: 16, group: g as 32 } : f;
  const perLayer = Array.from({ length: s.layers }, (_, l) => ({
    layer: l,
    keys: key(chosen[2 * l].format),
    values: chosen[2 * l + 1].format,
  }));
  const bitsPerValue = chosen.reduce((a, e) => a + e.bits, 0) / (2 * s.layers);
  return {
    kivi: "plan",
    version: 1,
    budget,
    bitsPerValue,
    residual: s.residual,
    predictedKl,
    layers: s.layers,
    keys: perLayer.find((l) => l.keys.bits !== 16)?.keys ?? key({ bits: 16 }),
    values: perLayer[0].values,
    perLayer,
    calibration: s.protocol,
    sensitivity: s.entries,
  };
}

/**
 * Calibrates a plan for `model` under `budget` bits per value: {@link measureSensitivity} over
 * `text` (a calibration text, never the evaluation text), then {@link planFromSensitivity}.
 *
 * @example
 * ```ts ignore
 * import { calibrate, openBackend, splitHeldout } from "kivi";
 * using kivi = await openBackend();
 * using model = kivi.loadModel("./byte-llama-9m");
 * const plan = calibrate(model, splitHeldout(heldout).calibration, { budget: 3.3, residual: 128 });
 * using cache = model.backend.createCache({ ...dims, ...planCache(plan), maxPages: 64 });
 * ```
 */
export function calibrate(
  model: ProtocolModel,
  text: Uint8Array | string,
  o: CalibrateOptions & { budget: number },
): Plan {
  if (o === null || typeof o !== "object") {
    throw new TypeError(`options must be an object with a budget, got ${show(o)}`);
  }
  checkBudget(o.budget);
  return planFromSensitivity(measureSensitivity(model, text, o), o.budget);
}

/** The cache options of a plan: `{ keys, values, perLayer, residual }` for `createCache` or a model run. */
export function planCache(
  plan: Plan,
): { keys: CacheFormat; values: CacheFormat; perLayer: readonly LayerFormat[]; residual: number } {
  return { keys: plan.keys, values: plan.values, perLayer: plan.perLayer, residual: plan.residual };
}

/**
 * A plan from its JSON (a string, or the parsed object): a TypeError when it is not a kivi plan.
 * Its formats and layers are checked where a cache is made of it (createCache names the entry).
 */
export function readPlan(json: string | unknown): Plan {
  let p: unknown = json;
  if (typeof json === "string") {
    try {
      p = JSON.parse(json);
    } catch (e) {
      throw new TypeError(`plan must be JSON: ${(e as Error).message}`);
    }
  }
  if (p === null || typeof p !== "object" || (p as Plan).kivi !== "plan") {
    throw new TypeError(`plan must be an object with kivi: "plan" (see calibrate), got ${show(p)}`);
  }
  const q = p as Plan;
  if (q.version !== 1) throw new TypeError(`plan.version must be 1, got ${show(q.version)}`);
  if (!Array.isArray(q.perLayer)) {
    throw new TypeError(`plan.perLayer must be an array, got ${show(q.perLayer)}`);
  }
  if (!Number.isInteger(q.residual) || q.residual < 0) {
    throw new TypeError(`plan.residual must be an integer >= 0, got ${show(q.residual)}`);
  }
  for (const k of ["keys", "values"] as const) {
    if (q[k] === null || typeof q[k] !== "object") {
      throw new TypeError(`plan.${k} must be a format object, got ${show(q[k])}`);
    }
  }
  return q;
}
