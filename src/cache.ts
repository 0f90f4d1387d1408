/**
 * The paged KV cache: quantized pages shared by all layers through one block table per sequence,
 * an fp16 residual window of the newest tokens, and fused decode attention over both.
 *
 * @module
 */
import { type ArgsOf, type Pointer, scratchArray } from "./ffi/_native.ts";
import {
  type BackendCore as Backend,
  type DeviceTensor,
  handleRegistry,
  type NativeHeld,
} from "./tensor.ts";
import { checkInt, readOptions, show } from "./_checks.ts";
import { type DType, dtypeCode, type HostArray } from "./_dtype.ts";
import { KiviError, Status } from "./errors.ts";
import { Staging } from "./_staging.ts";
import { type Buf, type Input, type MemOf } from "./quant.ts";
import { type BatchOptions, DecodeBatch } from "./batch.ts";
import {
  type CacheConfig,
  type CacheMemory,
  type CacheOptions,
  configArray,
  frozenConfig,
  memoryOf,
  resolveCacheOptions,
} from "./cache_config.ts";
import { checkCacheRange, dataPtr } from "./_input.ts";
import { appendArgs, benchAttendImpl, type IoHost, readImpl } from "./_cache_io.ts";
import { DecodeAttend } from "./_cache_attend.ts";
import { attendMultiImpl, mergeAttentionImpl, type MultiHost, prefillImpl } from "./_multi.ts";

export {
  cacheBitsPerValue,
  type CacheConfig,
  type CacheFormat,
  type CacheMemory,
  type CacheOptions,
  configArray,
  formatBitsPerValue,
  headBlockBytes,
  type LayerFormat,
  layerFormats,
  pageBytes,
  resolveCacheOptions,
  type ResolvedCacheFormat,
} from "./cache_config.ts";

type CacheHeld = NativeHeld;
const cacheRegistry = handleRegistry("kivi_cache_destroy");

/** Options of {@link KVCache.attend} and {@link KVCache.attendMulti}. */
export interface AttendOptions<X extends Input> {
  /** Softmax scale (default 1/sqrt(headDim)). */
  scale?: number;
  /** The result's dtype (default f32). */
  dtype?: DType;
  /** For a host Uint16Array q: "f16" (the default) or "bf16". */
  qDtype?: DType;
  /** Where the result goes (where q lives). */
  out?: Buf<MemOf<X>, DType>;
  /** The natural log-sum-exp of each [token][queryHead] (see {@link KVCache.attendMulti}). */
  lse?: Float32Array | DeviceTensor;
  /** Skip the NaN/Inf scan of q. */
  trusted?: boolean;
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
  #poison: string | undefined;

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
      throw new KiviError(
        Status.KIVI_ERR_STATE,
        op,
        `${op}: the sequence was freed; create a new one`,
      );
    }
    return this.#id;
  }

  /** @internal the cache of x when x is a Sequence (a brand check: a duck-typed object or a Proxy
   * is not one), else undefined. */
  static _cacheOf(x: unknown): KVCache | undefined {
    return x !== null && typeof x === "object" && #id in x ? (x as Sequence).#cache : undefined;
  }

  /** @internal the slot id of a live sequence (KIVI_ERR_STATE once freed), read from its private
   * field right before the native call that uses it. */
  static _liveId(s: Sequence, op: string): number {
    return s.#live(op);
  }

  /** @internal the slot id of a sequence that can take part in a data call (append, attend, read, a
   * batch): live, and holding no non-finite value a batch's deferred check found (KIVI_ERR_NONFINITE). */
  static _usableId(s: Sequence, op: string): number {
    const id = s.#live(op);
    if (s.#poison !== undefined) {
      throw new KiviError(Status.KIVI_ERR_NONFINITE, op, `${op}: ${s.#poison}`);
    }
    return id;
  }

  /** @internal marks a sequence that holds a non-finite value (see DecodeBatch); `what` follows
   * "sequence <id> " in the message of every data call refused from now on. */
  static _poison(s: Sequence, what: string): void {
    if (s.#id !== undefined) s.#poison ??= `sequence ${s.#id} ${what}`;
  }

  /** Appends tokens of keys and values ([tokens][kvHeads][headDim] for one layer). All or nothing. */
  append(k: Input, v: Input, opts: AppendOptions = {}): void {
    this.#cache._append(this, k, v, opts);
  }

  /** Tokens held in `layer` (pages + residual). */
  length(layer = 0): number {
    return this.#cache._lengths(this, layer, "length")[0];
  }

  /** Tokens of `layer` that are in quantized pages. */
  quantizedLength(layer = 0): number {
    return this.#cache._lengths(this, layer, "quantizedLength")[1];
  }

  /** The block table: page ids in order. */
  pages(): Int32Array {
    return this.#cache._pages(this.#live("pages"));
  }

  /**
   * Drops the newest tokens of every layer, keeping the first `length` (speculative decoding's
   * rollback). Only tokens still in the fp16 residual window can go: `length` below a layer's
   * {@link quantizedLength} or above its {@link length} is a KiviError KIVI_ERR_ARG and changes nothing.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * using cache = kivi.createCache({ layers: 1, kvHeads: 2, headDim: 64, maxPages: 16 });
   * using seq = cache.createSequence();
   * seq.append(new Float32Array(5 * 2 * 64).fill(0.5), new Float32Array(5 * 2 * 64).fill(1));
   * seq.truncate(3); // two draft tokens rejected
   * console.log(seq.length(0)); // 3
   * ```
   */
  truncate(length: number): void {
    this.#cache._truncate(this, length);
  }

  /**
   * A new sequence holding what this one holds, sharing its full pages (reference counted: a page
   * returns to the pool when its last owner frees it) and with copies of the partly filled last page
   * and of the residual windows. Appends to either never show in the other. KiviError
   * KIVI_ERR_CAPACITY when no slot or page is left.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * using cache = kivi.createCache({ layers: 1, kvHeads: 2, headDim: 64, maxPages: 16, residual: 32 });
   * using prompt = cache.createSequence();
   * prompt.append(new Float32Array(150 * 2 * 64).fill(0.5), new Float32Array(150 * 2 * 64).fill(1));
   * using a = prompt.fork(), b = prompt.fork();
   * // 150, 4: the prompt's 2 pages (96 tokens quantized: the second half full), plus a copy of it a fork
   * console.log(a.length(0), cache.memory().pagesUsed);
   * ```
   */
  fork(): Sequence {
    return this.#cache._fork(this);
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
  #config: CacheConfig;
  #backend: Backend;
  #held: CacheHeld | undefined;
  #seqs = new Set<Sequence>();
  /** Scratch of the per-call out-parameters, with their addresses taken once (see DecodeAttend). */
  #lens = scratchArray(BigInt64Array, 2);
  #lensPtr: [Pointer, Pointer] = [null, null];
  /** The hot export, bound once (no name lookup or argument spreading a call). */
  #appendFn!: (...a: ArgsOf<"kivi_cache_append">) => number;
  /** Decode attention (attend without lse), with its own scratch and bound export. */
  #attend!: DecodeAttend<Sequence>;
  /** Read by this cache's batches on every call: see BatchHost. */
  #shared = { open: true, epoch: 0 };
  #batches = new Set<WeakRef<DecodeBatch<Sequence>>>();

  /** @internal use Backend.createCache */
  constructor(backend: Backend, options: CacheOptions) {
    this.#config = frozenConfig(resolveCacheOptions(options));
    const state = backend._retainState("createCache");
    const out = new BigUint64Array(1);
    const cfg = configArray(this.#config);
    const st = state.lib.call(
      "kivi_cache_create",
      state.ctx,
      state.lib.ptr(cfg),
      cfg.length,
      state.lib.ptr(out),
    );
    if (st !== 0) {
      const msg = state.lib.call("kivi_ctx_last_error", state.ctx);
      state.release();
      throw new KiviError(st, "kivi_cache_create", msg);
    }
    this.#backend = backend;
    this.#held = { state, handle: state.lib.pointerAt(out, 0) };
    this.#lensPtr = [state.lib.ptr(this.#lens), state.lib.ptr(this.#lens.subarray(1))];
    this.#appendFn = state.lib.fn("kivi_cache_append");
    this.#attend = new DecodeAttend(this.#multiHost(), state.lib);
    cacheRegistry.register(this, this.#held, this);
    backend._adopt(this);
  }

  /** The resolved configuration (frozen). */
  get config(): CacheConfig {
    return this.#config;
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
    if (h === undefined) {
      throw new KiviError(
        Status.KIVI_ERR_STATE,
        op,
        `${op}: the cache was disposed; create a new one`,
      );
    }
    this.#backend._native(op); // throws if the backend is disposed or broken
    return h;
  }

  #check(op: string, status: number): void {
    if (status !== 0) this.#backend._check(op, status);
  }

  /** A Sequence of this cache (brand-checked), else a TypeError naming `name`. */
  #own(name: string, s: unknown): Sequence {
    if (Sequence._cacheOf(s) !== this) {
      throw new TypeError(`${name} must be a Sequence of this cache, got ${show(s)}`);
    }
    return s as Sequence;
  }

  /** Claims a sequence slot (KiviError KIVI_ERR_CAPACITY when all are taken). */
  createSequence(): Sequence {
    const { state, handle } = this.#live("createSequence");
    const out = new Int32Array(1);
    const st = state.lib.call("kivi_cache_seq_create", handle, state.lib.ptr(out));
    return this.#claim("kivi_cache_seq_create", st, out);
  }

  /** The Sequence of the slot id that `fn` (seq_create, seq_fork or seq_copy) wrote into `out`, once
   * its status is checked (KIVI_ERR_CAPACITY when no slot or page was left). */
  #claim(fn: string, status: number, out: Int32Array): Sequence {
    this.#check(fn, status);
    const s = new Sequence(this, out[0]);
    this.#seqs.add(s);
    return s;
  }

  /** @internal A new sequence holding a deep copy of `src` (its pages copied into fresh pages of the
   * pool, its residual window and lengths copied): it attends exactly like src until either takes
   * another append. KIVI_ERR_CAPACITY, with nothing changed, when no slot or too few free pages are
   * left. For benchmarks that need many long sequences without appending each (bench/e2e.ts). */
  _copySequence(src: Sequence): Sequence {
    const { state, handle } = this.#live("copySequence");
    const id = Sequence._usableId(this.#own("src", src), "copySequence");
    const out = new Int32Array(1);
    const st = state.lib.call("kivi_cache_seq_copy", handle, id, state.lib.ptr(out));
    return this.#claim("kivi_cache_seq_copy", st, out);
  }

  /**
   * A decode batch over `seqs` (distinct sequences of this cache) with the device buffers of one
   * step, checked once: then `batch.append(layer)` and `batch.attend(layer)` are one native call
   * each, with no allocation and no wait for the device (see {@link DecodeBatch}).
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * using cache = kivi.createCache({ layers: 1, kvHeads: 2, queryHeads: 4, headDim: 64, maxPages: 8 });
   * using seq = cache.createSequence();
   * seq.append(new Float32Array(2 * 64).fill(1), new Float32Array(2 * 64).fill(2));
   * using q = kivi.upload(new Float32Array(4 * 64).fill(0.5)), out = kivi.alloc([1, 4, 64], "f32");
   * using batch = cache.batch([seq], { q, out });
   * batch.attend(0);
   * batch.synchronizeSync();
   * console.log(out.readSync()[0]); // 2: one token, so every head reads its value
   * ```
   */
  batch(seqs: readonly Sequence[], opts: BatchOptions): DecodeBatch<Sequence> {
    this.#live("batch");
    const b = new DecodeBatch<Sequence>(
      {
        backend: this.#backend,
        config: this.#config,
        live: (op) => this.#live(op),
        shared: this.#shared,
        own: (name, s) => this.#own(name, s),
        usableId: (s, op) => Sequence._usableId(s, op),
        poison: (s, why) => {
          Sequence._poison(s, why);
          this.#shared.epoch++;
        },
      },
      seqs,
      opts,
    );
    if (this.#batches.size >= 32) {
      for (const r of this.#batches) if (r.deref()?.disposed !== false) this.#batches.delete(r);
    }
    this.#batches.add(new WeakRef(b));
    return b;
  }

  /** @internal */
  _free(id: number, s: Sequence): void {
    this.#shared.epoch++;
    this.#seqs.delete(s);
    const h = this.#held;
    if (h === undefined) return;
    this.#check("kivi_cache_seq_free", h.state.lib.call("kivi_cache_seq_free", h.handle, id));
  }

  /** @internal */
  _lengths(seq: Sequence, layerArg: unknown, op: string): [number, number] {
    const layer = checkInt("layer", layerArg, 0, this.#config.layers - 1);
    const { state, handle } = this.#live(op);
    const id = Sequence._liveId(seq, op);
    const [pl, pq] = this.#lensPtr;
    this.#check(
      "kivi_cache_seq_length",
      state.lib.call("kivi_cache_seq_length", handle, id, layer, pl, pq),
    );
    return [Number(this.#lens[0]), Number(this.#lens[1])];
  }

  /** @internal */
  _pages(id: number): Int32Array {
    const { state, handle } = this.#live("pages");
    const pages = new Int32Array(this.#config.maxPages);
    const n = new Int32Array(1);
    this.#check(
      "kivi_cache_seq_pages",
      state.lib.call(
        "kivi_cache_seq_pages",
        handle,
        id,
        state.lib.ptr(pages),
        pages.length,
        state.lib.ptr(n),
      ),
    );
    return pages.slice(0, n[0]);
  }

  /** @internal */
  _append(seq: Sequence, k: Input, v: Input, opts: AppendOptions): void {
    const c = this.#config;
    const { layer, trusted, kd, vd, n } = appendArgs(c, this.#backend, k, v, opts);
    const id = Sequence._usableId(seq, "append");
    const { handle } = this.#live("append");
    if (!trusted) {
      checkCacheRange(this.#backend, "k", kd, c, n, layer);
      checkCacheRange(this.#backend, "v", vd, c, n, layer);
    }
    using stage = new Staging(this.#backend, "append");
    const pk = dataPtr(kd, "append", stage), pv = dataPtr(vd, "append", stage);
    this.#check(
      "kivi_cache_append",
      this.#appendFn(handle, id, layer, pk, pv, dtypeCode[kd.dtype], n, trusted ? 1 : 0),
    );
  }

  /**
   * Decode attention of one layer for a batch of sequences: `softmax(q K^T * scale) V` over each
   * sequence's pages and residual, with q [batch][queryHeads][headDim] and scale 1/sqrt(headDim)
   * unless given. The result lives where q lives (f32 unless `dtype` says otherwise); a host
   * Uint16Array q holds f16 unless `qDtype: "bf16"` says it holds bf16 bits.
   */
  attend<X extends Input>(
    layer: number,
    seqs: readonly Sequence[],
    q: X,
    opts: AttendOptions<X> = {},
  ): Buf<MemOf<X>, DType> {
    const o = readOptions("options", opts, ["scale", "dtype", "qDtype", "out", "lse", "trusted"]);
    if (o.lse !== undefined) {
      const ones = Array.isArray(seqs) ? new Array<number>(seqs.length).fill(1) : [];
      return attendMultiImpl(this.#multiHost(), "attend", layer, seqs, ones, q, o) as Buf<
        MemOf<X>,
        DType
      >;
    }
    return this.#attend.attend(layer, seqs, q, o) as Buf<MemOf<X>, DType>;
  }

  /** Milliseconds per `attend` call, timed inside the library over `iters` back-to-back calls after
   * a validating call (q scanned for NaN/Inf, every argument checked), so FFI and argument checks
   * are not in the figure. */
  benchAttend(
    layer: number,
    seqs: readonly Sequence[],
    q: Input,
    opts: { iters?: number; scale?: number; qDtype?: DType } = {},
  ): number {
    return benchAttendImpl(this.#ioHost(), layer, seqs, q, opts);
  }

  /** The dequantized keys and values of a sequence in one layer, [length][kvHeads][headDim], as the
   * attention kernel sees them (host arrays on the CPU backend, tensors on CUDA). */
  read(
    seq: Sequence,
    layer: number,
    dtype: DType = "f32",
  ): { keys: HostArray | DeviceTensor; values: HostArray | DeviceTensor } {
    return readImpl(this.#ioHost(), seq, layer, dtype);
  }

  /** Bytes of codes, params, residual and tables; bits per value (of the pages in use, and of the
   * tokens held); ratio to fp16. */
  memory(): CacheMemory {
    const { state, handle } = this.#live("memory");
    const r = new BigUint64Array(9);
    this.#check(
      "kivi_cache_memory",
      state.lib.call("kivi_cache_memory", handle, state.lib.ptr(r), r.length),
    );
    return memoryOf(r, this.#config);
  }

  /** @internal */
  _truncate(seq: Sequence, lengthArg: unknown): void {
    const length = checkInt("length", lengthArg, 0, 2 ** 53 - 1);
    const { state, handle } = this.#live("truncate");
    const id = Sequence._liveId(seq, "truncate");
    this.#check(
      "kivi_cache_seq_truncate",
      state.lib.call("kivi_cache_seq_truncate", handle, id, length),
    );
  }

  /** @internal */
  _fork(seq: Sequence): Sequence {
    const { state, handle } = this.#live("fork");
    const id = Sequence._usableId(seq, "fork");
    const out = new Int32Array(1);
    const st = state.lib.call("kivi_cache_seq_fork", handle, id, state.lib.ptr(out));
    return this.#claim("kivi_cache_seq_fork", st, out);
  }

  /**
   * Attention of several query tokens a sequence (speculative decoding's verification, a chunk of a
   * prompt), causal: `qlens[b]` queries for `seqs[b]`, its newest `qlens[b]` tokens (already
   * appended), and its i-th query sees the sequence up to and including its own token, as the cache
   * holds it. q and the result are [tokens][queryHeads][headDim] with the queries of `seqs[0]` first
   * (tokens = the sum of qlens). `lse` (a Float32Array where q is a host array, an f32 DeviceTensor
   * where q is one) receives the natural log-sum-exp of each [token][queryHead], for
   * {@link KVCache.mergeAttention}. On CUDA, layers in the tensor-core layout (2-bit) take one launch
   * for all the queries (rows = query x head); the other formats run the decode kernels once a token
   * position.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * using cache = kivi.createCache({ layers: 1, kvHeads: 2, queryHeads: 4, headDim: 64, maxPages: 16 });
   * using seq = cache.createSequence();
   * const k = Float32Array.from({ length: 10 * 2 * 64 }, (_, i) => Math.sin(i));
   * seq.append(k, k.map((x) => x * 2));
   * const q = Float32Array.from({ length: 3 * 4 * 64 }, (_, i) => Math.cos(i));
   * const lse = new Float32Array(3 * 4);
   * const out = cache.attendMulti(0, [seq], [3], q, { lse }); // the last 3 tokens as queries
   * console.log(out.length, lse[0]);
   * ```
   */
  attendMulti<X extends Input>(
    layer: number,
    seqs: readonly Sequence[],
    qlens: readonly number[],
    q: X,
    opts: AttendOptions<X> = {},
  ): Buf<MemOf<X>, DType> {
    const o = readOptions("options", opts, ["scale", "dtype", "qDtype", "out", "lse", "trusted"]);
    return attendMultiImpl(this.#multiHost(), "attendMulti", layer, seqs, qlens, q, o) as Buf<
      MemOf<X>,
      DType
    >;
  }

  /**
   * Merges attention results over disjoint ranges of keys (cascade attention: a shared prefix and
   * each sequence's own tokens, or the cache and a prompt chunk): each part's output
   * [rows][headDim] (f32) with its natural log-sum-exp [rows] gives exactly the attention over the
   * union, and its log-sum-exp. Parts are host Float32Arrays or f32 DeviceTensors (read to the host
   * first); the result is host arrays.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * using cache = kivi.createCache({ layers: 1, kvHeads: 1, headDim: 64, maxPages: 4 });
   * const a = new Float32Array(64).fill(1), b = new Float32Array(64).fill(3);
   * const m = cache.mergeAttention([a, b], [new Float32Array([0]), new Float32Array([0])]);
   * console.log(m.out[0], m.lse[0]); // 2, ln 2
   * ```
   */
  mergeAttention(
    outs: readonly (Float32Array | DeviceTensor)[],
    lses: readonly (Float32Array | DeviceTensor)[],
  ): { out: Float32Array; lse: Float32Array } {
    return mergeAttentionImpl(this.#multiHost(), outs, lses);
  }

  /**
   * One chunk of a chunked prefill in `layer`: the chunk's n queries attend over what the cache holds
   * of `seq` (its earlier chunks, quantized pages and window, every query seeing all of it) and,
   * causally and exactly, over the chunk's own keys and values at fp16; the two are merged by their
   * log-sum-exp ({@link KVCache.mergeAttention}); then the chunk's k and v are appended to the layer.
   * q [n][queryHeads][headDim], k and v [n][kvHeads][headDim] (Float32Arrays, or f32 DeviceTensors read
   * to the host); returns the attention output [n][queryHeads][headDim] (f32, host). The chunk's own
   * part goes through a bits-16 scratch cache of the chunk (fp32 on CUDA, float64 on the CPU build).
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * using cache = kivi.createCache({ layers: 1, kvHeads: 2, queryHeads: 4, headDim: 64, maxPages: 16 });
   * using seq = cache.createSequence();
   * const rows = (n: number, h: number) => Float32Array.from({ length: n * h * 64 }, (_, i) => Math.sin(i * 0.37));
   * for (let chunk = 0; chunk < 3; chunk++) {
   *   const out = cache.prefill(0, seq, rows(100, 4), rows(100, 2), rows(100, 2));
   *   console.log(out.length, seq.length(0)); // 25600, then 100, 200, 300
   * }
   * ```
   */
  prefill(
    layer: number,
    seq: Sequence,
    q: Float32Array | DeviceTensor,
    k: Float32Array | DeviceTensor,
    v: Float32Array | DeviceTensor,
    opts: { scale?: number } = {},
  ): Float32Array {
    return prefillImpl(this.#multiHost(), layer, seq, q, k, v, opts);
  }

  /** What benchAttend and read (_cache_io.ts) use of this cache. */
  #ioHost(): IoHost<Sequence> {
    return {
      ...this.#multiHost(),
      lengths: (x, l, op) => this._lengths(x, l, op),
      attendArgs: (l, seqs, q, o) => this.#attend.args(l, seqs, q, o),
      attendBind: (op, a, stage) => this.#attend.bind(op, a, stage),
    };
  }

  /** What the multi-token functions (_multi.ts) use of this cache. */
  #multiHost(): MultiHost<Sequence> {
    return {
      config: this.#config,
      backend: this.#backend,
      live: (op) => this.#live(op),
      check: (op, st) => this.#check(op, st),
      own: (name, x) => this.#own(name, x),
      usableId: (x, op) => Sequence._usableId(x, op),
      attendMulti: (l, seqs, qlens, q, o) => this.attendMulti(l, seqs, qlens, q, o) as Float32Array,
      mergeAttention: (outs, lses) => this.mergeAttention(outs, lses),
      scratchCache: (o) => new KVCache(this.#backend, o),
    };
  }

  /** Frees every sequence and the cache. Idempotent. */
  dispose(): void {
    const h = this.#held;
    if (h === undefined) return;
    this.#shared.open = false;
    for (const r of this.#batches) r.deref()?._close("the cache was disposed; create a new one");
    this.#batches.clear();
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
