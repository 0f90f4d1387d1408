/**
 * The cache's configuration: its options, the rules they must follow (resolveCacheOptions, the
 * TypeScript face of kivi_cache_config_check in cuda/host/config.c: it throws the typed errors
 * first) and the int32 array kivi_cache_create takes.
 *
 * @module
 */
import { checkInt, checkOneOf, readOptions, show } from "./_checks.ts";
import { bitsPerValue, type Fit, type GroupSize } from "./quant.ts";
import { codebookFit, refuseCodebookKeys, RULES } from "./_rules.ts";

/** How keys or values are stored: a quantized format, or `{ bits: 16 }` for plain fp16. */
export type CacheFormat =
  | { kind: "uniform"; bits: 2 | 4; group?: GroupSize }
  | { kind: "codebook"; bits: 2 | 4; group?: GroupSize; fit?: Fit; iterations?: number }
  | { bits: 16; group?: GroupSize };

/** One entry of {@link CacheOptions.perLayer}: the formats of one layer or of an inclusive range of
 * layers; a part left out keeps the cache's `keys` / `values`. */
export interface LayerFormat {
  /** A layer, or `[from, to]` (inclusive). */
  layer: number | readonly [number, number];
  /** Key format; its group must be the cache's `keys.group` (the flush unit all layers share). */
  keys?: CacheFormat;
  values?: CacheFormat;
}

/** Options of {@link KVCache} creation (`backend.createCache`). */
export interface CacheOptions {
  layers: number;
  kvHeads: number;
  /** Query heads (default kvHeads); a multiple of kvHeads for GQA/MQA. */
  queryHeads?: number;
  /** 64, 128 or 256. */
  headDim: number;
  /** Tokens per page: 32, 64, 128 or 256, a multiple of the key group (default 64). */
  pageTokens?: number;
  /** Tokens kept in fp16 (R), a multiple of the key group (default 128). */
  residual?: number;
  /** Key format (default uniform 2-bit G32: per-channel groups keep the extremes exact). */
  keys?: CacheFormat;
  /** Value format (default codebook 2-bit G64: same 3.0 bits per value, lower error). */
  values?: CacheFormat;
  /** Pool size in pages; or give `budgetBytes`. */
  maxPages?: number;
  /** Pool size as a byte budget for the pages (all layers, K and V). */
  budgetBytes?: number;
  /** Sequence slots (default 64). */
  maxSequences?: number;
  /** Per-layer formats (mixed precision): each layer named at most once; the rest keep `keys` and
   * `values`. A calibration plan's `perLayer` (see `calibrate`) goes here as it is. */
  perLayer?: readonly LayerFormat[];
}

/** Resolved numeric config, in kivi.h KIVI_CFG_* order. */
export interface CacheConfig {
  layers: number;
  kvHeads: number;
  queryHeads: number;
  headDim: number;
  pageTokens: number;
  residual: number;
  maxPages: number;
  maxSequences: number;
  keys: ResolvedCacheFormat;
  values: ResolvedCacheFormat;
  /** Each layer's formats, layer 0 first, when `perLayer` gave any (else undefined: every layer
   * uses `keys` and `values`). */
  perLayer?: readonly { keys: ResolvedCacheFormat; values: ResolvedCacheFormat }[];
}

/** A resolved format of a cache part. */
export type ResolvedCacheFormat =
  & Required<Pick<CacheFormat & { kind?: string }, "bits" | "group">>
  & {
    kind: "uniform" | "codebook";
    fit: Fit;
    iterations: number;
  };

/** The memory report of a cache. */
export interface CacheMemory {
  /** Packed codes (or fp16 at 16 bits) of the pages in use, all layers. */
  codeBytes: number;
  /** Scale/zero or centroids of the pages in use. */
  paramBytes: number;
  /** fp16 tokens in the residual windows. */
  residualBytes: number;
  /** Block tables and per-sequence state. */
  tableBytes: number;
  /** Bytes allocated at creation for the pool and windows. */
  poolBytes: number;
  pagesUsed: number;
  pagesTotal: number;
  /** Tokens held, summed over sequences and layers. */
  tokens: number;
  /** Of which in pages. */
  quantizedTokens: number;
  /** Bits per K/V value held, counting the page storage in use: (codes + params + residual) x 8 /
   * values. Pages are shared by all layers, so a page in use counts in every layer, filled or not:
   * a layer (or a sequence's last page) holding fewer tokens than its pages raises this figure. */
  bitsPerValue: number;
  /** Bits per K/V value of the tokens held, each at its format's rate (code bits plus the params
   * spread over the group; 16 in the fp16 window and at bits 16), whatever page storage they sit in. */
  heldBitsPerValue: number;
  /** (codes + params + residual + tables) / the same tokens in fp16. */
  ratioToFp16: number;
  /** Bits per K/V value of each layer's page format (codes and params of a page, K and V, over its
   * values; the fp16 window excluded), layer 0 first. */
  layerBitsPerValue: number[];
  /** Their mean: the bits per value of the cache's quantized tokens, window excluded (what a
   * calibration budget counts). */
  formatBitsPerValue: number;
}

const KIND = { uniform: 0, codebook: 1 } as const;
const FIT = { free: 0, pinned: 1 } as const;

function resolveCacheFormat(name: string, f: unknown, dflt: CacheFormat): CacheConfig["keys"] {
  if (f === null || (f !== undefined && typeof f !== "object")) {
    throw new TypeError(`${name} must be a format object, got ${show(f)}`);
  }
  const g = readOptions(name, f === undefined ? dflt : f, [
    "kind",
    "bits",
    "group",
    "fit",
    "iterations",
  ], true);
  const bits = checkOneOf(`${name}.bits`, g.bits, RULES.cacheBits);
  const group = checkOneOf(`${name}.group`, g.group ?? 32, RULES.groups);
  if (bits === 16) return { kind: "uniform", bits, group, fit: "free", iterations: 1 };
  const kind = checkOneOf(`${name}.kind`, g.kind, RULES.kinds);
  if (kind === "uniform") {
    refuseCodebookKeys(name, g, ["fit", "iterations"]);
    return { kind, bits, group, fit: "free", iterations: 1 };
  }
  return { kind, bits, group, ...codebookFit(name, g) };
}

/** Bytes of one head's K or V block of one page (kivi_format.h kivi_page_part, kept in step by a test). */
export function headBlockBytes(
  f: ResolvedCacheFormat,
  pageTokens: number,
  headDim: number,
): number {
  const values = pageTokens * headDim;
  const raw = f.bits === 16
    ? values * 2
    : (values * f.bits) / 8 + (values / f.group) * (f.kind === "uniform" ? 4 : 2 * (1 << f.bits));
  return Math.ceil(raw / 16) * 16;
}

/**
 * Bytes of one page across all layers, K and V.
 *
 * @example
 * ```ts
 * import { pageBytes, resolveCacheOptions } from "./mod.ts";
 * const cfg = resolveCacheOptions({ layers: 32, kvHeads: 8, headDim: 128, maxPages: 1 });
 * console.log(pageBytes(cfg)); // bytes one 64-token page takes in all 32 layers, K and V
 * ```
 */
export function pageBytes(c: Omit<CacheConfig, "maxPages">): number {
  return layerFormats(c).reduce(
    (sum, f) =>
      sum + c.kvHeads *
        (headBlockBytes(f.keys, c.pageTokens, c.headDim) +
          headBlockBytes(f.values, c.pageTokens, c.headDim)),
    0,
  );
}

/** Each layer's formats, layer 0 first (the cache's own where it has no per-layer formats). */
export function layerFormats(
  c: Pick<CacheConfig, "layers" | "keys" | "values" | "perLayer">,
): readonly { keys: ResolvedCacheFormat; values: ResolvedCacheFormat }[] {
  return c.perLayer ?? Array.from({ length: c.layers }, () => ({ keys: c.keys, values: c.values }));
}

/**
 * Bits per value of a layer's page format, K and V together (codes and params of a page over its
 * values, page padding included; the fp16 window excluded).
 *
 * @example
 * ```ts
 * import { formatBitsPerValue } from "./mod.ts";
 * const u2 = { kind: "uniform", bits: 2, group: 32, fit: "free", iterations: 1 } as const;
 * console.log(formatBitsPerValue(u2, u2, 64, 64)); // 3: KIVI-2 (2-bit codes, fp16 scale and zero a group of 32)
 * ```
 */
export function formatBitsPerValue(
  keys: ResolvedCacheFormat,
  values: ResolvedCacheFormat,
  pageTokens: number,
  headDim: number,
): number {
  return ((headBlockBytes(keys, pageTokens, headDim) +
    headBlockBytes(values, pageTokens, headDim)) *
    8) / (2 * pageTokens * headDim);
}

/**
 * Bits per value of a cache's quantized tokens: the mean over layers of each layer's
 * {@link formatBitsPerValue} (the fp16 window excluded).
 *
 * @example
 * ```ts
 * import { cacheBitsPerValue, resolveCacheOptions } from "./mod.ts";
 * const u = (bits: 2 | 4) => ({ kind: "uniform", bits, group: 32 }) as const;
 * const c = resolveCacheOptions({
 *   layers: 2, kvHeads: 2, headDim: 64, maxPages: 1, keys: u(2), values: u(2),
 *   perLayer: [{ layer: 1, keys: u(4) }],
 * });
 * console.log(cacheBitsPerValue(c)); // 3.5: layer 0 at 3 bits, layer 1 at (5 + 3) / 2
 * ```
 */
export function cacheBitsPerValue(
  c: Pick<CacheConfig, "layers" | "keys" | "values" | "perLayer" | "pageTokens" | "headDim">,
): number {
  const f = layerFormats(c);
  return f.reduce((s, l) => s + formatBitsPerValue(l.keys, l.values, c.pageTokens, c.headDim), 0) /
    f.length;
}

/** The per-layer formats of `perLayer` (an array of {@link LayerFormat}), each layer named at most
 * once, the rest `keys` / `values`; undefined when not given. */
function resolvePerLayer(
  perLayer: unknown,
  layers: number,
  headDim: number,
  keys: ResolvedCacheFormat,
  values: ResolvedCacheFormat,
): CacheConfig["perLayer"] {
  if (perLayer === undefined) return undefined;
  if (!Array.isArray(perLayer)) {
    throw new TypeError(
      `perLayer must be an array of { layer, keys?, values? }, got ${show(perLayer)}`,
    );
  }
  const n = perLayer.length; // read once
  const out = Array.from({ length: layers }, () => ({ keys, values }));
  const by = new Array<number | undefined>(layers);
  for (let i = 0; i < n; i++) {
    const name = `perLayer[${i}]`;
    const e = perLayer[i];
    if (e === null || typeof e !== "object") {
      throw new TypeError(`${name} must be an object { layer, keys?, values? }, got ${show(e)}`);
    }
    const o = readOptions(name, e, ["layer", "keys", "values"], true);
    let from: number, to: number;
    if (Array.isArray(o.layer)) {
      if (o.layer.length !== 2) {
        throw new TypeError(`${name}.layer must be a layer or [from, to], got ${show(o.layer)}`);
      }
      from = checkInt(`${name}.layer[0]`, o.layer[0], 0, layers - 1);
      to = checkInt(`${name}.layer[1]`, o.layer[1], from, layers - 1);
    } else {
      from = to = checkInt(`${name}.layer`, o.layer, 0, layers - 1);
    }
    const k = o.keys === undefined
      ? keys
      : resolveCacheFormat(`${name}.keys`, o.keys, { bits: 16 });
    const v = o.values === undefined
      ? values
      : resolveCacheFormat(`${name}.values`, o.values, { bits: 16 });
    if (k.group !== keys.group) {
      throw new RangeError(
        `${name}.keys.group must be the cache's keys.group (${keys.group}), the flush unit all layers share, got ${k.group}`,
      );
    }
    if (headDim % v.group !== 0) {
      throw new RangeError(`${name}.values.group must divide headDim (${headDim}), got ${v.group}`);
    }
    for (let l = from; l <= to; l++) {
      if (by[l] !== undefined) {
        throw new RangeError(
          `${name}.layer names layer ${l}, which perLayer[${by[l]}] already names`,
        );
      }
      by[l] = i;
      out[l] = { keys: k, values: v };
    }
  }
  return out;
}

/**
 * Checks cache options and fills in defaults.
 *
 * @example
 * ```ts
 * import { resolveCacheOptions } from "./mod.ts";
 * const c = resolveCacheOptions({ layers: 2, kvHeads: 2, headDim: 64, budgetBytes: 1 << 20 });
 * console.log(c.maxPages, c.keys, c.values); // pages that fit in 1 MiB; uniform 2-bit G32 keys, codebook 2-bit G64 values
 * ```
 */
export function resolveCacheOptions(options: CacheOptions): CacheConfig {
  if (options === null || typeof options !== "object") {
    throw new TypeError(`options must be an object, got ${show(options)}`);
  }
  const o = readOptions("options", options, [
    "layers",
    "kvHeads",
    "queryHeads",
    "headDim",
    "pageTokens",
    "residual",
    "keys",
    "values",
    "maxPages",
    "budgetBytes",
    "maxSequences",
    "perLayer",
  ], true);
  const layers = checkInt("layers", o.layers, 1, 4096);
  const kvHeads = checkInt("kvHeads", o.kvHeads, 1, 4096);
  const queryHeads = checkInt("queryHeads", o.queryHeads ?? kvHeads, 1, 4096 * 32);
  if (queryHeads % kvHeads !== 0 || queryHeads / kvHeads > RULES.maxQueryRatio) {
    throw new RangeError(
      `queryHeads must be a multiple of kvHeads (${kvHeads}) at most ${RULES.maxQueryRatio} times it, got ${queryHeads}`,
    );
  }
  const headDim = checkOneOf("headDim", o.headDim, RULES.headDims);
  const keys = resolveCacheFormat("keys", o.keys, { kind: "uniform", bits: 2, group: 32 });
  const values = resolveCacheFormat("values", o.values, { kind: "codebook", bits: 2, group: 64 });
  if (headDim % values.group !== 0) {
    throw new RangeError(`values.group must divide headDim (${headDim}), got ${values.group}`);
  }
  const pageTokens = checkOneOf("pageTokens", o.pageTokens ?? 64, RULES.pageTokens);
  if (pageTokens % keys.group !== 0) {
    throw new RangeError(
      `pageTokens must be a multiple of keys.group (${keys.group}), got ${pageTokens}`,
    );
  }
  const residual = checkInt("residual", o.residual ?? 128, 0, 1 << 20);
  if (residual % keys.group !== 0) {
    throw new RangeError(
      `residual must be a multiple of keys.group (${keys.group}), got ${residual}`,
    );
  }
  const maxSequences = checkInt("maxSequences", o.maxSequences ?? 64, 1, 1 << 16);
  const perLayer = resolvePerLayer(o.perLayer, layers, headDim, keys, values);
  const partial = {
    layers,
    kvHeads,
    queryHeads,
    headDim,
    pageTokens,
    residual,
    maxSequences,
    keys,
    values,
    ...(perLayer === undefined ? {} : { perLayer }),
  };
  let maxPages: number;
  if (o.maxPages !== undefined) {
    if (o.budgetBytes !== undefined) throw new TypeError(`give maxPages or budgetBytes, not both`);
    maxPages = checkInt("maxPages", o.maxPages, 1, 1 << 30);
  } else if (o.budgetBytes !== undefined) {
    const per = pageBytes(partial);
    const budget = checkInt("budgetBytes", o.budgetBytes, 1);
    maxPages = Math.floor(budget / per);
    if (maxPages < 1) {
      throw new RangeError(`budgetBytes must hold at least one page (${per} bytes), got ${budget}`);
    }
  } else {
    throw new TypeError(`give maxPages or budgetBytes to size the page pool`);
  }
  return { ...partial, maxPages };
}

/** A resolved config frozen to the last level (formats and per-layer formats too), for a cache to
 * hand out as it is. */
export function frozenConfig(config: CacheConfig): CacheConfig {
  return Object.freeze({
    ...config,
    keys: Object.freeze({ ...config.keys }),
    values: Object.freeze({ ...config.values }),
    ...(config.perLayer === undefined ? {} : {
      perLayer: Object.freeze(config.perLayer.map((l) =>
        Object.freeze({
          keys: Object.freeze({ ...l.keys }),
          values: Object.freeze({ ...l.values }),
        })
      )),
    }),
  });
}

/** @internal The int32 config array of kivi_cache_create (kivi.h KIVI_CFG_* order); benchmarks build a
 * twin native cache with it to time raw FFI calls. */
export function configArray(c: CacheConfig): Int32Array {
  const part = (
    f: ResolvedCacheFormat,
  ) => [KIND[f.kind], f.bits, f.group, FIT[f.fit], f.iterations];
  const layers = c.perLayer?.flatMap((l) => [...part(l.keys), ...part(l.values)]) ?? [];
  return Int32Array.from([
    c.layers,
    c.kvHeads,
    c.queryHeads,
    c.headDim,
    c.pageTokens,
    c.residual,
    c.maxPages,
    c.maxSequences,
    KIND[c.keys.kind],
    c.keys.bits,
    c.keys.group,
    FIT[c.keys.fit],
    c.keys.iterations,
    KIND[c.values.kind],
    c.values.bits,
    c.values.group,
    FIT[c.values.fit],
    c.values.iterations,
    ...layers, // kivi.h KIVI_LAYER_FIELDS a layer
  ]);
}

/** The counters kivi_cache_memory fills, in its order. */
const MEMORY_FIELDS = [
  "codeBytes",
  "paramBytes",
  "residualBytes",
  "tableBytes",
  "poolBytes",
  "pagesUsed",
  "pagesTotal",
  "tokens",
  "quantizedTokens",
] as const;

/** The figures of {@link CacheMemory} from the nine counters kivi_cache_memory fills. */
export function memoryOf(r: BigUint64Array, c: CacheConfig): CacheMemory {
  const m = Object.fromEntries(MEMORY_FIELDS.map((k, i) => [k, Number(r[i])])) as Record<
    (typeof MEMORY_FIELDS)[number],
    number
  >;
  const { codeBytes, paramBytes, residualBytes, tableBytes, tokens, quantizedTokens } = m;
  const perToken = c.kvHeads * c.headDim; // values of K (and of V) per token and layer
  const values = tokens * perToken * 2; // K and V
  const stored = codeBytes + paramBytes + residualBytes;
  const rate = (
    f: ResolvedCacheFormat,
  ) => (f.bits === 16 ? 16 : bitsPerValue(
    f.kind === "uniform"
      ? { kind: "uniform", bits: f.bits, group: f.group }
      : { kind: "codebook", bits: f.bits, group: f.group },
  ));
  // a mixed cache: each layer's rate, as if every layer held the same tokens (appends to all layers do)
  const formats = layerFormats(c);
  const pair = formats.reduce((s, f) => s + rate(f.keys) + rate(f.values), 0) / formats.length;
  const held = quantizedTokens * perToken * pair + (tokens - quantizedTokens) * perToken * 32;
  const layerBitsPerValue = formats.map((f) =>
    formatBitsPerValue(f.keys, f.values, c.pageTokens, c.headDim)
  );
  return {
    ...m,
    bitsPerValue: values === 0 ? 0 : (stored * 8) / values,
    heldBitsPerValue: values === 0 ? 0 : held / values,
    ratioToFp16: values === 0 ? 0 : (stored + tableBytes) / (values * 2),
    layerBitsPerValue,
    formatBitsPerValue: layerBitsPerValue.reduce((a, b) => a + b, 0) / layerBitsPerValue.length,
  };
}
