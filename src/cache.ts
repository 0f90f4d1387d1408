/**
 * The paged KV cache: quantized pages shared by all layers through one block table per sequence,
 * an fp16 residual window of the newest tokens, and fused decode attention over both.
 *
 * @module
 */
import type { Pointer } from "./ffi/_native.ts";
import type { Backend, DeviceTensor, NativeState } from "./backend.ts";
import { checkInt, checkOneOf, isTensor, show } from "./_checks.ts";
import { type DType, dtypeCode, dtypeOfHost, type HostArray, hostArray } from "./_dtype.ts";
import { KiviError, Status } from "./errors.ts";
import { Staging } from "./_staging.ts";
import type { Buf, Fit, GroupSize, Input, Mem, MemOf } from "./quant.ts";

/** How keys or values are stored: a quantized format, or `{ bits: 16 }` for plain fp16. */
export type CacheFormat =
  | { kind: "uniform"; bits: 2 | 4; group?: GroupSize }
  | { kind: "codebook"; bits: 2 | 4; group?: GroupSize; fit?: Fit; iterations?: number }
  | { bits: 16; group?: GroupSize };

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
  keys: Required<Pick<CacheFormat & { kind?: string }, "bits" | "group">> & { kind: "uniform" | "codebook"; fit: Fit; iterations: number };
  values: CacheConfig["keys"];
}

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
  /** Bits per stored K/V value of the data actually held (codes + params + residual) / values. */
  bitsPerValue: number;
  /** (codes + params + residual + tables) / the same tokens in fp16. */
  ratioToFp16: number;
}

const KIND = { uniform: 0, codebook: 1 } as const;
const FIT = { free: 0, pinned: 1 } as const;

function resolveCacheFormat(name: string, f: CacheFormat | undefined, dflt: CacheFormat): CacheConfig["keys"] {
  const g = f === undefined ? dflt : f;
  if (g === null || typeof g !== "object") throw new TypeError(`${name} must be a format object, got ${show(g)}`);
  const bits = checkOneOf(`${name}.bits`, g.bits, [2, 4, 16] as const);
  const group = checkOneOf(`${name}.group`, g.group ?? 32, [32, 64, 128] as const);
  if (bits === 16) return { kind: "uniform", bits, group, fit: "free", iterations: 1 };
  const q = g as Exclude<CacheFormat, { bits: 16 }>;
  const kind = checkOneOf(`${name}.kind`, q.kind, ["uniform", "codebook"] as const);
  if (kind === "uniform") return { kind, bits, group, fit: "free", iterations: 1 };
  const c = q as Extract<CacheFormat, { kind: "codebook" }>;
  return {
    kind,
    bits,
    group,
    fit: checkOneOf(`${name}.fit`, c.fit ?? "free", ["free", "pinned"] as const),
    iterations: checkInt(`${name}.iterations`, c.iterations ?? 16, 1, 256),
  };
}

/** Bytes of one head's K or V block of one page (kivi_format.h kivi_page_part, kept in step by a test). */
export function headBlockBytes(f: CacheConfig["keys"], pageTokens: number, headDim: number): number {
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
  return c.layers * c.kvHeads *
    (headBlockBytes(c.keys, c.pageTokens, c.headDim) + headBlockBytes(c.values, c.pageTokens, c.headDim));
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
export function resolveCacheOptions(o: CacheOptions): CacheConfig {
  if (o === null || typeof o !== "object") throw new TypeError(`options must be an object, got ${show(o)}`);
  const layers = checkInt("layers", o.layers, 1, 4096);
  const kvHeads = checkInt("kvHeads", o.kvHeads, 1, 4096);
  const queryHeads = checkInt("queryHeads", o.queryHeads ?? kvHeads, 1, 4096 * 32);
  if (queryHeads % kvHeads !== 0 || queryHeads / kvHeads > 32) {
    throw new RangeError(
      `queryHeads must be a multiple of kvHeads (${kvHeads}) at most 32 times it, got ${queryHeads}`,
    );
  }
  const headDim = checkOneOf("headDim", o.headDim, [64, 128, 256] as const);
  const keys = resolveCacheFormat("keys", o.keys, { kind: "uniform", bits: 2, group: 32 });
  const values = resolveCacheFormat("values", o.values, { kind: "codebook", bits: 2, group: 64 });
  if (headDim % values.group !== 0) {
    throw new RangeError(`values.group must divide headDim (${headDim}), got ${values.group}`);
  }
  const pageTokens = checkOneOf("pageTokens", o.pageTokens ?? 64, [32, 64, 128, 256] as const);
  if (pageTokens % keys.group !== 0) {
    throw new RangeError(`pageTokens must be a multiple of keys.group (${keys.group}), got ${pageTokens}`);
  }
  const residual = checkInt("residual", o.residual ?? 128, 0, 1 << 20);
  if (residual % keys.group !== 0) {
    throw new RangeError(`residual must be a multiple of keys.group (${keys.group}), got ${residual}`);
  }
  const maxSequences = checkInt("maxSequences", o.maxSequences ?? 64, 1, 1 << 16);
  const partial = { layers, kvHeads, queryHeads, headDim, pageTokens, residual, maxSequences, keys, values };
  let maxPages: number;
  if (o.maxPages !== undefined) {
    if (o.budgetBytes !== undefined) throw new TypeError(`give maxPages or budgetBytes, not both`);
    maxPages = checkInt("maxPages", o.maxPages, 1, 1 << 30);
  } else if (o.budgetBytes !== undefined) {
    const per = pageBytes(partial);
    const budget = checkInt("budgetBytes", o.budgetBytes, 1);
    maxPages = Math.floor(budget / per);
    if (maxPages < 1) throw new RangeError(`budgetBytes must hold at least one page (${per} bytes), got ${budget}`);
  } else {
    throw new TypeError(`give maxPages or budgetBytes to size the page pool`);
  }
  return { ...partial, maxPages };
}

function configArray(c: CacheConfig): Int32Array {
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
  ]);
}

interface CacheHeld {
  state: NativeState;
  handle: Pointer;
}
const cacheRegistry = new FinalizationRegistry<CacheHeld>((held) => {
  held.state.lib.call("kivi_cache_destroy", held.handle);
  held.state.release();
});


/** fp16's largest finite value rounds up from 65520 on: the cache stores fp16, so such a value would
 * become Inf in the window or the pages. */
const F16_LIMIT = 65520;

/**
 * Rejects a finite value that fp16 cannot hold (NaN and Inf are left to the library's scan, which
 * reports them as KIVI_ERR_NONFINITE). Host arrays and the CPU backend's tensors (host memory) are
 * scanned; CUDA tensors are not (that scan belongs in the library's append).
 */
function checkFp16Range(name: string, x: unknown, dtype: DType, c: CacheConfig, n: number, layer: number): void {
  if (dtype === "f16" || (isTensor(x) && x.backend.kind !== "cpu")) return;
  const a = (isTensor(x) ? x.readSync() : x) as Float32Array | Uint16Array;
  let at = -1;
  if (dtype === "f32") {
    for (let i = 0; i < a.length; i++) {
      const m = Math.abs(a[i]);
      if (m >= F16_LIMIT && m !== Infinity) {
        at = i;
        break;
      }
    }
  } else {
    // bf16 bits: finite magnitudes from 65536 (0x4780) up to the largest finite (0x7f7f).
    for (let i = 0; i < a.length; i++) {
      const m = a[i] & 0x7fff;
      if (m >= 0x4780 && m < 0x7f80) {
        at = i;
        break;
      }
    }
  }
  if (at < 0) return;
  const row = c.kvHeads * c.headDim;
  const where = `layer ${layer === -1 ? Math.floor(at / (n * row)) : layer}, token ${Math.floor(at / row) % n}, ` +
    `head ${Math.floor((at % row) / c.headDim)}, channel ${at % c.headDim}`;
  const value = dtype === "f32" ? a[at] : new Float32Array(new Uint32Array([a[at] << 16]).buffer)[0];
  throw new RangeError(
    `${name} must hold values below ${F16_LIMIT} in magnitude (the cache stores fp16), got ${value} at index ${at} (${where}); scale it down`,
  );
}

/** Options of {@link Sequence.append}. */
export interface AppendOptions {
  /** One layer, or every layer when omitted (then k and v hold [layers][tokens][kvHeads][headDim]). */
  layer?: number;
  /** For a Uint16Array of bf16 bits. */
  dtype?: DType;
  /** Skip the NaN/Inf scan and the fp16 range check (the caller promises data that fp16 holds). */
  trusted?: boolean;
}

/**
 * One sequence of a {@link KVCache}. Free it (or `using`) to return its pages to the pool.
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend({ prefer: "cpu" });
 * using cache = kivi.createCache({ layers: 1, kvHeads: 2, headDim: 64, maxPages: 16 });
 * using seq = cache.createSequence();
 * seq.append(new Float32Array(3 * 2 * 64).fill(0.5), new Float32Array(3 * 2 * 64).fill(1), { layer: 0 });
 * console.log(seq.length(0)); // 3
 * ```
 */
export class Sequence {
  #cache: KVCache;
  #id: number | undefined;

  /** @internal use KVCache.createSequence */
  constructor(cache: KVCache, id: number) {
    this.#cache = cache;
    this.#id = id;
  }

  /** The slot id inside the cache. */
  get id(): number {
    return this.#live("id");
  }

  /** The cache this sequence belongs to. */
  get cache(): KVCache {
    return this.#cache;
  }

  /** True once freed. */
  get freed(): boolean {
    return this.#id === undefined;
  }

  #live(op: string): number {
    if (this.#id === undefined) {
      throw new KiviError(Status.KIVI_ERR_STATE, op, `${op}: the sequence was freed; create a new one`);
    }
    return this.#id;
  }

  /** @internal */
  _id(op: string): number {
    return this.#live(op);
  }

  /** Appends tokens of keys and values ([tokens][kvHeads][headDim] for one layer). All or nothing.
   * Host arrays work on either backend; on CUDA each is copied to the device first and the call
   * waits for it, so a decode loop on the GPU passes `DeviceTensor`s. */
  append(k: Input, v: Input, opts: AppendOptions = {}): void {
    if (opts === null || typeof opts !== "object") throw new TypeError(`opts must be an object, got ${show(opts)}`);
    this.#cache._append(this.#live("append"), k, v, opts);
  }

  /** Tokens held in `layer` (pages + residual). */
  length(layer = 0): number {
    return this.#cache._lengths(this.#live("length"), layer)[0];
  }

  /** Tokens of `layer` that are in quantized pages. */
  quantizedLength(layer = 0): number {
    return this.#cache._lengths(this.#live("quantizedLength"), layer)[1];
  }

  /** The block table: page ids in order. */
  pages(): Int32Array {
    return this.#cache._pages(this.#live("pages"));
  }

  /** Frees the sequence and returns its pages. Idempotent. */
  free(): void {
    const id = this.#id;
    if (id === undefined) return;
    this.#id = undefined;
    this.#cache._free(id, this);
  }

  [Symbol.dispose](): void {
    this.free();
  }
}

/**
 * A paged KV cache on a backend. Create it with `backend.createCache(options)`.
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend({ prefer: "cpu" });
 * using cache = kivi.createCache({ layers: 2, kvHeads: 2, queryHeads: 8, headDim: 64, maxPages: 64 });
 * using seq = cache.createSequence();
 * const n = 200, row = 2 * 64;
 * const k = Float32Array.from({ length: 2 * n * row }, (_, i) => Math.sin(i));
 * seq.append(k, k.map((x) => x / 2)); // both layers at once
 * const out = cache.attend(0, [seq], Float32Array.from({ length: 8 * 64 }, (_, i) => Math.cos(i)));
 * console.log(out.length, cache.memory().bitsPerValue);
 * ```
 */
export class KVCache {
  readonly config: CacheConfig;
  #backend: Backend;
  #held: CacheHeld | undefined;
  #seqs = new Set<Sequence>();

  /** @internal use Backend.createCache */
  constructor(backend: Backend, options: CacheOptions) {
    this.config = resolveCacheOptions(options);
    const state = backend._retainState("createCache");
    const out = new BigUint64Array(1);
    const cfg = configArray(this.config);
    const st = state.lib.call("kivi_cache_create", state.ctx, state.lib.ptr(cfg), cfg.length, state.lib.ptr(out));
    if (st !== 0) {
      const msg = state.lib.call("kivi_ctx_last_error", state.ctx);
      state.release();
      throw new KiviError(st, "kivi_cache_create", msg);
    }
    this.#backend = backend;
    this.#held = { state, handle: state.lib.pointerAt(out, 0) };
    cacheRegistry.register(this, this.#held, this);
    backend._adopt(this);
  }

  /** The backend that owns the cache. */
  get backend(): Backend {
    return this.#backend;
  }

  /** True once disposed. */
  get disposed(): boolean {
    return this.#held === undefined;
  }

  /** Live sequences. */
  get sequences(): readonly Sequence[] {
    return [...this.#seqs];
  }

  #live(op: string): CacheHeld {
    const h = this.#held;
    if (h === undefined) throw new KiviError(Status.KIVI_ERR_STATE, op, `${op}: the cache was disposed; create a new one`);
    this.#backend._native(op); // throws if the backend is disposed or broken
    return h;
  }

  #check(op: string, status: number): void {
    if (status !== 0) this.#backend._check(op, status);
  }

  /** Claims a sequence slot (KiviError KIVI_ERR_CAPACITY when all are taken). */
  createSequence(): Sequence {
    const { state, handle } = this.#live("createSequence");
    const out = new Int32Array(1);
    this.#check("kivi_cache_seq_create", state.lib.call("kivi_cache_seq_create", handle, state.lib.ptr(out)));
    const s = new Sequence(this, out[0]);
    this.#seqs.add(s);
    return s;
  }

  /** @internal */
  _free(id: number, s: Sequence): void {
    this.#seqs.delete(s);
    const h = this.#held;
    if (h === undefined) return;
    this.#check("kivi_cache_seq_free", h.state.lib.call("kivi_cache_seq_free", h.handle, id));
  }

  /** @internal */
  _lengths(id: number, layer: number): [number, number] {
    const { state, handle } = this.#live("length");
    checkInt("layer", layer, 0, this.config.layers - 1);
    const len = new BigInt64Array(1), q = new BigInt64Array(1);
    this.#check(
      "kivi_cache_seq_length",
      state.lib.call("kivi_cache_seq_length", handle, id, layer, state.lib.ptr(len), state.lib.ptr(q)),
    );
    return [Number(len[0]), Number(q[0])];
  }

  /** @internal */
  _pages(id: number): Int32Array {
    const { state, handle } = this.#live("pages");
    const pages = new Int32Array(this.config.maxPages);
    const n = new Int32Array(1);
    this.#check(
      "kivi_cache_seq_pages",
      state.lib.call("kivi_cache_seq_pages", handle, id, state.lib.ptr(pages), pages.length, state.lib.ptr(n)),
    );
    return pages.slice(0, n[0]);
  }

  #data(name: string, x: unknown, dtypeHint: DType | undefined, op: string, stage: Staging): { p: Pointer; dtype: DType; length: number } {
    this.#live(op);
    if (isTensor(x)) {
      if (x.backend !== this.#backend) throw new TypeError(`${name} belongs to another backend; upload it to this one first`);
      const dtype = checkOneOf(`${name}.dtype`, x.dtype, ["f32", "f16", "bf16"] as const);
      return { p: x.pointer(op), dtype, length: x.length };
    }
    if (!ArrayBuffer.isView(x)) throw new TypeError(`${name} must be a typed array or DeviceTensor, got ${show(x)}`);
    const dtype = dtypeOfHost(x, dtypeHint);
    if (dtype !== "f32" && dtype !== "f16" && dtype !== "bf16") {
      throw new TypeError(`${name} must be a Float32Array, Float16Array or Uint16Array, got ${show(x)}`);
    }
    return { p: stage.input(x as HostArray, dtype), dtype, length: (x as HostArray).length };
  }

  /** @internal */
  _append(id: number, k: Input, v: Input, opts: AppendOptions): void {
    const { state, handle } = this.#live("append");
    const c = this.config;
    const layer = opts.layer === undefined ? -1 : checkInt("layer", opts.layer, 0, c.layers - 1);
    using stage = new Staging(this.#backend, "append");
    const kd = this.#data("k", k, opts.dtype, "append", stage);
    const vd = this.#data("v", v, opts.dtype, "append", stage);
    if (kd.dtype !== vd.dtype) throw new TypeError(`k and v must have the same dtype, got ${kd.dtype} and ${vd.dtype}`);
    const row = c.kvHeads * c.headDim * (layer === -1 ? c.layers : 1);
    const what = layer === -1 ? `layers (${c.layers}) x kvHeads (${c.kvHeads}) x headDim (${c.headDim})` : `kvHeads (${c.kvHeads}) x headDim (${c.headDim})`;
    if (kd.length === 0 || kd.length % row !== 0) {
      throw new TypeError(`k.length must be a positive multiple of ${what} = ${row}, got ${kd.length}`);
    }
    if (vd.length !== kd.length) throw new TypeError(`v.length must equal k.length (${kd.length}), got ${vd.length}`);
    const n = kd.length / row;
    if (!opts.trusted) {
      checkFp16Range("k", k, kd.dtype, c, n, layer);
      checkFp16Range("v", v, vd.dtype, c, n, layer);
    }
    this.#check(
      "kivi_cache_append",
      state.lib.call("kivi_cache_append", handle, id, layer, kd.p, vd.p, dtypeCode[kd.dtype], n, opts.trusted ? 1 : 0),
    );
  }

  /** Checks attention arguments and resolves them to native ones (the output allocated where q lives). */
  #attendArgs(
    op: string,
    layer: number,
    seqs: readonly Sequence[],
    q: Input,
    opts: { scale?: number; dtype?: DType; qDtype?: DType; out?: Buf<Mem, DType> },
    stage: Staging,
  ) {
    this.#live(op);
    const c = this.config;
    checkInt("layer", layer, 0, c.layers - 1);
    if (!Array.isArray(seqs) || seqs.length === 0) throw new TypeError(`seqs must be a non-empty array of Sequences, got ${show(seqs)}`);
    const ids = Int32Array.from(seqs, (s, i) => {
      if (!(s instanceof Sequence) || s.cache !== this) throw new TypeError(`seqs[${i}] must be a Sequence of this cache, got ${show(s)}`);
      return s._id(op);
    });
    const qDtype = opts.qDtype === undefined ? undefined : checkOneOf("qDtype", opts.qDtype, ["f32", "f16", "bf16"] as const);
    const qd = this.#data("q", q, qDtype, op, stage);
    const n = ids.length * c.queryHeads * c.headDim;
    if (qd.length !== n) {
      throw new TypeError(`q must hold batch (${ids.length}) x queryHeads (${c.queryHeads}) x headDim (${c.headDim}) = ${n} values, got ${qd.length}`);
    }
    const scale = opts.scale ?? 1 / Math.sqrt(c.headDim);
    if (typeof scale !== "number" || !Number.isFinite(Math.fround(scale))) {
      throw new RangeError(`scale must be a number finite in fp32 (below 3.4e38 in magnitude), got ${show(scale)}`);
    }
    const dtype = checkOneOf("dtype", opts.dtype ?? "f32", ["f32", "f16", "bf16"] as const);
    let out: Buf<Mem, DType>;
    let made: DeviceTensor | undefined;
    if (opts.out !== undefined) {
      const od = isTensor(opts.out) ? opts.out.dtype : dtypeOfHost(opts.out as HostArray, dtype);
      const len = isTensor(opts.out) ? opts.out.length : (opts.out as HostArray).length;
      if (od !== dtype || len !== n || isTensor(opts.out) !== isTensor(q)) {
        throw new TypeError(`out must be a ${dtype} ${isTensor(q) ? "DeviceTensor" : "array"} of ${n} values like q`);
      }
      out = opts.out;
    } else if (isTensor(q)) {
      out = made = this.#backend.alloc([ids.length, c.queryHeads, c.headDim], dtype);
    } else {
      out = hostArray(dtype, n);
    }
    const po = isTensor(out) ? out.writePointer(op, "out") : stage.output(out as HostArray, dtype);
    return { ids, qd, scale, dtype, out, po, made };
  }

  /**
   * Decode attention of one layer for a batch of sequences: `softmax(q K^T * scale) V` over each
   * sequence's pages and residual, with q [batch][queryHeads][headDim] and scale 1/sqrt(headDim)
   * unless given. The result lives where q lives (f32 unless `dtype` says otherwise); a host
   * Uint16Array q holds f16 unless `qDtype: "bf16"` says it holds bf16 bits. On CUDA a host q is
   * copied to the device and the result back into a host array, and the call waits for the device.
   */
  attend<X extends Input>(
    layer: number,
    seqs: readonly Sequence[],
    q: X,
    opts: { scale?: number; dtype?: DType; qDtype?: DType; out?: Buf<MemOf<X>, DType>; trusted?: boolean } = {},
  ): Buf<MemOf<X>, DType> {
    const { state, handle } = this.#live("attend");
    using stage = new Staging(this.#backend, "attend");
    const a = this.#attendArgs("attend", layer, seqs, q, opts, stage);
    const st = state.lib.call(
      "kivi_cache_attend",
      handle,
      layer,
      state.lib.ptr(a.ids),
      a.ids.length,
      a.qd.p,
      dtypeCode[a.qd.dtype],
      a.scale,
      opts.trusted ? 1 : 0,
      a.po,
      dtypeCode[a.dtype],
    );
    if (st !== 0) {
      a.made?.dispose();
      this.#check("kivi_cache_attend", st);
    }
    stage.finish();
    return a.out as Buf<MemOf<X>, DType>;
  }

  /** Milliseconds per `attend` call, timed inside the library over `iters` back-to-back calls after
   * a warm-up (CUDA events on the GPU), so FFI and argument checks are not in the figure. */
  benchAttend(layer: number, seqs: readonly Sequence[], q: Input, opts: { iters?: number; scale?: number } = {}): number {
    const { state, handle } = this.#live("benchAttend");
    const iters = checkInt("iters", opts.iters ?? 20, 1, 1 << 20);
    using stage = new Staging(this.#backend, "benchAttend");
    const a = this.#attendArgs("benchAttend", layer, seqs, q, opts, stage);
    const ms = new Float32Array(1);
    const st = state.lib.call(
      "kivi_cache_bench_attend",
      handle,
      layer,
      state.lib.ptr(a.ids),
      a.ids.length,
      a.qd.p,
      dtypeCode[a.qd.dtype],
      a.scale,
      a.po,
      dtypeCode[a.dtype],
      iters,
      state.lib.ptr(ms),
    );
    a.made?.dispose();
    this.#check("kivi_cache_bench_attend", st);
    return ms[0];
  }

  /** The dequantized keys and values of a sequence in one layer, [length][kvHeads][headDim], as the
   * attention kernel sees them (host arrays on the CPU backend, tensors on CUDA). */
  read(seq: Sequence, layer: number, dtype: DType = "f32"): { keys: HostArray | DeviceTensor; values: HostArray | DeviceTensor } {
    const { state, handle } = this.#live("read");
    if (!(seq instanceof Sequence) || seq.cache !== this) throw new TypeError(`seq must be a Sequence of this cache, got ${show(seq)}`);
    checkOneOf("dtype", dtype, ["f32", "f16", "bf16"] as const);
    const id = seq._id("read");
    const len = this._lengths(id, layer)[0];
    const n = len * this.config.kvHeads * this.config.headDim;
    if (n === 0) return { keys: hostArray(dtype, 0), values: hostArray(dtype, 0) };
    const onHost = this.#backend.kind === "cpu";
    const k = onHost ? hostArray(dtype, n) : this.#backend.alloc([len, this.config.kvHeads, this.config.headDim], dtype);
    const v = onHost ? hostArray(dtype, n) : this.#backend.alloc([len, this.config.kvHeads, this.config.headDim], dtype);
    const ptr = (x: HostArray | DeviceTensor) => (isTensor(x) ? x.pointer("read") : state.lib.ptr(x));
    const st = state.lib.call("kivi_cache_read", handle, id, layer, ptr(k), ptr(v), dtypeCode[dtype]);
    if (st !== 0) {
      if (isTensor(k)) k.dispose();
      if (isTensor(v)) v.dispose();
      this.#check("kivi_cache_read", st);
    }
    return { keys: k, values: v };
  }

  /** Bytes of codes, params, residual and tables; bits per value stored; ratio to fp16. */
  memory(): CacheMemory {
    const { state, handle } = this.#live("memory");
    const r = new BigUint64Array(9);
    this.#check("kivi_cache_memory", state.lib.call("kivi_cache_memory", handle, state.lib.ptr(r), r.length));
    const [codeBytes, paramBytes, residualBytes, tableBytes, poolBytes, pagesUsed, pagesTotal, tokens, quantizedTokens] =
      Array.from(r, Number);
    const values = tokens * this.config.kvHeads * this.config.headDim * 2; // K and V
    const stored = codeBytes + paramBytes + residualBytes;
    return {
      codeBytes,
      paramBytes,
      residualBytes,
      tableBytes,
      poolBytes,
      pagesUsed,
      pagesTotal,
      tokens,
      quantizedTokens,
      bitsPerValue: values === 0 ? 0 : (stored * 8) / values,
      ratioToFp16: values === 0 ? 0 : (stored + tableBytes) / (values * 2),
    };
  }

  /** Frees every sequence and the cache. Idempotent. */
  dispose(): void {
    const h = this.#held;
    if (h === undefined) return;
    for (const s of [...this.#seqs]) {
      try {
        s.free();
      } catch {
        // A broken context (sticky CUDA fault) refuses seq_free; destroying the cache frees it anyway.
      }
    }
    this.#held = undefined;
    cacheRegistry.unregister(this);
    this.#backend._forget(this);
    h.state.lib.call("kivi_cache_destroy", h.handle);
    h.state.release();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
