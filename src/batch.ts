/**
 * Decode batches: the sequences and device buffers of one decode step, checked once by
 * `cache.batch(seqs, { q, out, k, v })`, then one call a layer (`batch.append(layer)`,
 * `batch.attend(layer)`) that allocates nothing, reads no option and waits for nothing.
 *
 * @module
 */
import { type Pointer, scratchArray } from "./ffi/_native.ts";
import {
  type BackendCore as Backend,
  type DeviceTensor,
  handleRegistry,
  type NativeHeld,
  type NativeState,
  type TensorFacts,
} from "./tensor.ts";
import type { CacheConfig } from "./cache_config.ts";
import { attendScale, checkBool, checkOneOf, readOptions, show } from "./_checks.ts";
import { dtypeCode } from "./_dtype.ts";
import { KiviError, Status } from "./errors.ts";

/**
 * The most sequences a decode batch holds (kivi.h KIVI_BATCH_MAX); split larger batches.
 *
 * @example
 * ```ts
 * import { BATCH_MAX } from "./mod.ts";
 * console.log(BATCH_MAX); // 512
 * ```
 */
export const BATCH_MAX = 512;
/** kivi.h KIVI_REPORT_FIELDS. */
const REPORT_FIELDS = 6;

/** Options of `KVCache.batch`: the device buffers of one decode step, given once. */
export interface BatchOptions {
  /** Queries, [batch][queryHeads][headDim] (f32, f16 or bf16), read by `attend`. */
  q?: DeviceTensor;
  /** Where `attend` writes, [batch][queryHeads][headDim] (f32, f16 or bf16); not q, k or v. */
  out?: DeviceTensor;
  /** One token of keys per sequence, [batch][kvHeads][headDim], read by `append`. */
  k?: DeviceTensor;
  /** One token of values per sequence, like `k` (same dtype). */
  v?: DeviceTensor;
  /** Score scale (default 1/sqrt(headDim)). */
  scale?: number;
  /** Skip the checks of q, k and v (default false: they are checked on the device, see {@link DecodeBatch}). */
  trusted?: boolean;
  /** Where `attend` also writes the natural log-sum-exp of each [batch][queryHead] (f32, with q and out;
   * see KVCache.attendMulti). */
  lse?: DeviceTensor;
}

/** @internal What a batch needs of its cache (given by KVCache.batch: batch.ts imports no module
 * that imports it). */
export interface BatchHost<S extends object> {
  readonly backend: Backend;
  readonly config: CacheConfig;
  /** The cache's handle (KIVI_ERR_STATE once the cache or its backend is disposed). */
  live(op: string): { state: NativeState; handle: Pointer };
  /** `open` turns false when the cache is disposed; `epoch` grows whenever a sequence is freed or
   * poisoned, so a batch re-checks its sequences only then. */
  readonly shared: { open: boolean; epoch: number };
  /** A Sequence of this cache (brand-checked), else a TypeError naming `name`. */
  own(name: string, s: unknown): S;
  /** The slot of a sequence that can take data (KIVI_ERR_STATE once freed, KIVI_ERR_NONFINITE once
   * poisoned). */
  usableId(s: S, op: string): number;
  /** Marks a sequence that holds a non-finite value: data calls on it fail from now on (`what`
   * follows "sequence <id> " in their message). */
  poison(s: S, what: string): void;
}

type BatchHeld = NativeHeld;
const batchRegistry = handleRegistry("kivi_batch_destroy");

/** A tensor option of a batch, read once: its facts (brand-checked), or undefined when not given. */
function tensorOption(backend: Backend, name: string, x: unknown): TensorFacts | undefined {
  if (x === undefined) return undefined;
  const t = backend._tensor(x);
  if (t === undefined) {
    throw new TypeError(
      `${name} must be a DeviceTensor, got ${
        show(x)
      }: a batch keeps its buffers where the library works ` +
        `(kivi.upload a host array once, or use cache.attend / seq.append for host arrays)`,
    );
  }
  if (t.backend !== backend) {
    throw new TypeError(`${name} belongs to another backend; upload it to this one first`);
  }
  checkOneOf(`${name}.dtype`, t.dtype, ["f32", "f16", "bf16"] as const);
  return t;
}

/** KIVI_ERR_STATE for `op` on a batch made without the tensors it needs. */
function without(op: string, what: string): KiviError {
  return new KiviError(
    Status.KIVI_ERR_STATE,
    op,
    `${op}: the batch was made without ${what}; make one with them`,
  );
}

/**
 * A decode batch: distinct sequences of one cache and the device buffers of a decode step, checked
 * once. Each layer of each step is then `batch.append(layer)` (one token per sequence from `k` and
 * `v`) and `batch.attend(layer)` (`q` -> `out`): no allocation, no option read, no wait for the
 * device; on CUDA they only enqueue work on the context's stream (write q, k and v with your own
 * kernels or `tensor.write` between calls; stream order keeps them apart).
 *
 * Each call still refuses what would be unsafe: a disposed batch, cache, backend or buffer, a
 * sequence freed since (KIVI_ERR_STATE), an `out` whose `read()` is in flight, a layer out of range.
 *
 * Checks of q, k and v (unless `trusted`) run on the device, without a host round trip, and are
 * reported later: a NaN or Inf in q makes that call's `out` NaN (and every `out` the batch writes
 * until the error is read); a NaN, Inf or a finite value fp16 cannot hold in k or v is stored as
 * given, and the sequence is refused (KIVI_ERR_NONFINITE) by every data call from the moment the
 * error is read: free it. The error is read, and thrown as KIVI_ERR_NONFINITE, by the first call of
 * the batch that finds it (on CUDA: once the device has run the check), by `check()` (which does not
 * wait) and by `synchronize()` / `synchronizeSync()` (which wait for the device first). The CPU build
 * keeps the same semantics, so a program tested there behaves the same on a GPU. For an error at
 * once, with nothing changed, use `cache.attend` and `seq.append`, which check before they run.
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend({ prefer: "cpu" });
 * using cache = kivi.createCache({ layers: 2, kvHeads: 2, queryHeads: 8, headDim: 64, maxPages: 64 });
 * const seqs = [cache.createSequence(), cache.createSequence()];
 * const row = 2 * 64, prompt = Float32Array.from({ length: 2 * 16 * row }, (_, i) => Math.sin(i));
 * for (const s of seqs) s.append(prompt, prompt); // 16 tokens in both layers
 * // the step's buffers, made once: one token of k and v per sequence, q and out
 * using k = kivi.alloc([2, 2, 64], "f32"), v = kivi.alloc([2, 2, 64], "f32");
 * using q = kivi.alloc([2, 8, 64], "f32"), out = kivi.alloc([2, 8, 64], "f32");
 * using batch = cache.batch(seqs, { q, out, k, v });
 * for (let step = 0; step < 4; step++) {
 *   for (let layer = 0; layer < 2; layer++) {
 *     k.write(Float32Array.from({ length: 2 * row }, (_, i) => Math.cos(i + step))); // your model's k, v, q
 *     v.write(Float32Array.from({ length: 2 * row }, (_, i) => Math.sin(i - step)));
 *     q.write(Float32Array.from({ length: 2 * 8 * 64 }, (_, i) => Math.cos(i * layer)));
 *     batch.append(layer);
 *     batch.attend(layer); // out: [2][8][64]
 *   }
 * }
 * batch.synchronizeSync(); // throws a deferred KIVI_ERR_NONFINITE, if any
 * console.log(seqs[0].length(0), out.readSync().length); // 20 2048
 * ```
 */
export class DecodeBatch<S extends object = object> {
  #host: BatchHost<S>;
  #held: BatchHeld | undefined;
  #gone = "the batch was disposed; make a new one with cache.batch()";
  #seqs: readonly S[];
  #q: TensorFacts | undefined;
  #out: TensorFacts | undefined;
  #lse: TensorFacts | undefined;
  #k: TensorFacts | undefined;
  #v: TensorFacts | undefined;
  #trusted: boolean;
  #epoch: number;
  #layers: number;
  #attendFn: (batch: Pointer, layer: number) => number;
  #appendFn: (batch: Pointer, layer: number) => number;
  #report = scratchArray(BigInt64Array, REPORT_FIELDS);
  #bad: Uint8Array;
  #reportPtr: Pointer;
  #badPtr: Pointer;

  /** @internal use KVCache.batch */
  constructor(host: BatchHost<S>, seqsArg: unknown, opts: unknown) {
    const o = readOptions("options", opts, ["q", "out", "k", "v", "scale", "trusted", "lse"]);
    const c = host.config;
    const count = Array.isArray(seqsArg) ? seqsArg.length : 0; // read once, then each element once
    if (count === 0) {
      throw new TypeError(`seqs must be a non-empty array of Sequences, got ${show(seqsArg)}`);
    }
    if (count > BATCH_MAX) {
      throw new RangeError(`seqs must hold at most ${BATCH_MAX} sequences, got ${count}`);
    }
    const seqs: S[] = [];
    for (let i = 0; i < count; i++) {
      const s = host.own(`seqs[${i}]`, (seqsArg as unknown[])[i]);
      const j = seqs.indexOf(s);
      if (j >= 0) {
        throw new TypeError(`seqs[${i}] repeats seqs[${j}]; a batch holds each sequence once`);
      }
      seqs.push(s);
    }
    const q = tensorOption(host.backend, "q", o.q), out = tensorOption(host.backend, "out", o.out);
    const k = tensorOption(host.backend, "k", o.k), v = tensorOption(host.backend, "v", o.v);
    const lse = tensorOption(host.backend, "lse", o.lse);
    if ((q === undefined) !== (out === undefined)) {
      throw new TypeError(`q and out must be given together, got ${q ? "q" : "out"} alone`);
    }
    if ((k === undefined) !== (v === undefined)) {
      throw new TypeError(`k and v must be given together, got ${k ? "k" : "v"} alone`);
    }
    if (q === undefined && k === undefined) {
      throw new TypeError(`a batch needs q and out (attend), k and v (append), or all four`);
    }
    const nq = count * c.queryHeads * c.headDim, nk = count * c.kvHeads * c.headDim;
    const shape = (what: string, n: number) =>
      `batch (${count}) x ${what} (${
        what === "queryHeads" ? c.queryHeads : c.kvHeads
      }) x headDim (${c.headDim}) = ${n}`;
    if (q && q.length !== nq) {
      throw new TypeError(`q must hold ${shape("queryHeads", nq)} values, got ${q.length}`);
    }
    if (out && out.length !== nq) {
      throw new TypeError(
        `out must hold ${shape("queryHeads", nq)} values like q, got ${out.length}`,
      );
    }
    if (k && k.length !== nk) {
      throw new TypeError(
        `k must hold ${shape("kvHeads", nk)} values (one token a sequence), got ${k.length}`,
      );
    }
    if (v && v.length !== nk) {
      throw new TypeError(
        `v must hold ${shape("kvHeads", nk)} values (one token a sequence), got ${v.length}`,
      );
    }
    if (k && v && k.dtype !== v.dtype) {
      throw new TypeError(`k and v must have the same dtype, got ${k.dtype} and ${v.dtype}`);
    }
    for (const [name, t] of [["q", q], ["k", k], ["v", v]] as const) {
      if (out && t && out.tensor === t.tensor) {
        throw new TypeError(`out must not share memory with ${name}`);
      }
    }
    if (lse && (q === undefined || lse.dtype !== "f32" || lse.length !== count * c.queryHeads)) {
      throw new TypeError(
        `lse must be an f32 tensor of batch (${count}) x queryHeads (${c.queryHeads}) = ${
          count * c.queryHeads
        } values, given with q and out, got ${lse.dtype} of ${lse.length}`,
      );
    }
    for (const [name, t] of [["q", q], ["out", out], ["k", k], ["v", v]] as const) {
      if (lse && t && lse.tensor === t.tensor) {
        throw new TypeError(`lse must not share memory with ${name}`);
      }
    }
    const scale = attendScale(o.scale, c.headDim);
    const trusted = checkBool("trusted", o.trusted);
    // Native handles from here on, with no user code in between.
    const { state, handle } = host.live("batch");
    const lib = state.lib;
    const ids = Int32Array.from(seqs, (s) => host.usableId(s, "batch"));
    const made = new BigUint64Array(1);
    const ptr = (t: TensorFacts | undefined, write?: string) =>
      t === undefined
        ? null
        : write === undefined
        ? t.pointer("batch")
        : t.writePointer("batch", write);
    const st = lib.call(
      "kivi_batch_create",
      handle,
      lib.ptr(ids),
      count,
      ptr(q),
      q ? dtypeCode[q.dtype as "f32"] : 0,
      ptr(out, "out"),
      out ? dtypeCode[out.dtype as "f32"] : 0,
      scale,
      ptr(k),
      ptr(v),
      k ? dtypeCode[k.dtype as "f32"] : 0,
      trusted ? 1 : 0,
      lib.ptr(made),
    );
    if (st !== 0) host.backend._check("kivi_batch_create", st);
    if (lse) {
      const ls = lib.call(
        "kivi_batch_set_lse",
        lib.pointerAt(made, 0),
        lse.writePointer("batch", "lse"),
      );
      if (ls !== 0) {
        lib.call("kivi_batch_destroy", lib.pointerAt(made, 0));
        host.backend._check("kivi_batch_set_lse", ls);
      }
    }
    state.retain();
    this.#held = { state, handle: lib.pointerAt(made, 0) };
    batchRegistry.register(this, this.#held, this);
    this.#host = host;
    this.#seqs = Object.freeze(seqs);
    [this.#q, this.#out, this.#k, this.#v, this.#lse] = [q, out, k, v, lse];
    this.#trusted = trusted;
    this.#epoch = host.shared.epoch;
    this.#layers = c.layers;
    this.#attendFn = lib.fn("kivi_batch_attend");
    this.#appendFn = lib.fn("kivi_batch_append");
    this.#bad = scratchArray(Uint8Array, count);
    this.#reportPtr = lib.ptr(this.#report);
    this.#badPtr = lib.ptr(this.#bad);
  }

  /** The sequences, in batch order. */
  get sequences(): readonly S[] {
    return this.#seqs;
  }

  /** Sequences in the batch. */
  get size(): number {
    return this.#seqs.length;
  }

  /** Whether q, k and v go unchecked. */
  get trusted(): boolean {
    return this.#trusted;
  }

  /** True once disposed (also when its cache was). */
  get disposed(): boolean {
    return this.#held === undefined;
  }

  /** The checks each call makes beyond the fast ones: throws the documented error, or refreshes the
   * sequences' epoch when they are all still usable. */
  #slow(op: string, layer: unknown): BatchHeld {
    const h = this.#held;
    if (h === undefined) throw new KiviError(Status.KIVI_ERR_STATE, op, `${op}: ${this.#gone}`);
    this.#host.live(op); // a disposed cache or backend, a sticky fault
    if (typeof layer !== "number") {
      throw new TypeError(`layer must be a number, got ${show(layer)}`);
    }
    if (!Number.isInteger(layer)) {
      throw new RangeError(`layer must be an integer, got ${show(layer)}`);
    }
    if (layer < 0 || layer >= this.#layers) {
      throw new RangeError(`layer must be between 0 and ${this.#layers - 1}, got ${show(layer)}`);
    }
    const epoch = this.#host.shared.epoch;
    for (const s of this.#seqs) this.#host.usableId(s, op);
    this.#epoch = epoch;
    return h;
  }

  /** The native handles for `op` on `layer`: taken straight when the batch is live, of this cache
   * epoch and the layer an integer in range (the per-token path), else by #slow's checks. */
  #ready(op: "append" | "attend", layer: number) {
    const h = this.#held;
    if (
      h === undefined || h.state.broken !== undefined || !this.#host.shared.open ||
      this.#epoch !== this.#host.shared.epoch || typeof layer !== "number" ||
      !(layer >= 0 && layer < this.#layers && Number.isInteger(layer))
    ) {
      return this.#slow(op, layer);
    }
    return h;
  }

  /** Appends one token to each sequence of the batch in `layer`: row b of `k` and `v` to sequence b
   * (a flush into pages where a window is full, as `seq.append`). A full pool is KIVI_ERR_CAPACITY
   * with every sequence as it was. */
  append(layer: number): void {
    const h = this.#ready("append", layer);
    if (this.#k === undefined) {
      throw without("append", "k and v");
    }
    this.#k.pointer("append"); // a disposed tensor is KIVI_ERR_STATE
    this.#v!.pointer("append");
    const st = this.#appendFn(h.handle, layer === 0 ? 0 : layer);
    if (st !== 0) this.#fail("kivi_batch_append", st);
  }

  /** Decode attention of `layer` for the batch: `out = softmax(q K^T * scale) V` per sequence and head. */
  attend(layer: number): void {
    const h = this.#ready("attend", layer);
    if (this.#q === undefined) {
      throw without("attend", "q and out");
    }
    this.#q.pointer("attend");
    this.#out!.writePointer("attend", "out"); // disposed, or a read() in flight: KIVI_ERR_STATE
    this.#lse?.writePointer("attend", "lse");
    const st = this.#attendFn(h.handle, layer === 0 ? 0 : layer);
    if (st !== 0) this.#fail("kivi_batch_attend", st);
  }

  /** Throws a deferred KIVI_ERR_NONFINITE that the device has already reported, without waiting. */
  check(): void {
    this.#status("check", false);
  }

  /** Waits for the device (blocking), then throws a deferred KIVI_ERR_NONFINITE, if any. */
  synchronizeSync(): void {
    this.#status("synchronizeSync", true);
  }

  /** Waits for the device without blocking the event loop, then throws a deferred
   * KIVI_ERR_NONFINITE, if any. */
  async synchronize(): Promise<void> {
    if (this.#held === undefined) {
      throw new KiviError(Status.KIVI_ERR_STATE, "synchronize", `synchronize: ${this.#gone}`);
    }
    await this.#host.backend.synchronize();
    this.#status("synchronize", false);
  }

  /** A failed call: a deferred error is read (and thrown); anything else is the library's error. */
  #fail(op: string, st: number): never {
    if (st === Status.KIVI_ERR_NONFINITE) this.#status(op, false);
    this.#host.backend._check(op, st);
    throw new KiviError(st, op, `${op} failed`);
  }

  /** Reads the batch's deferred error (after waiting for the stream when `wait`), poisons the
   * sequences that took a bad token, and throws it. */
  #status(op: string, wait: boolean): void {
    const h = this.#held;
    if (h === undefined) throw new KiviError(Status.KIVI_ERR_STATE, op, `${op}: ${this.#gone}`);
    this.#host.live(op);
    const st = h.state.lib.call(
      "kivi_batch_status",
      h.handle,
      wait ? 1 : 0,
      this.#reportPtr,
      REPORT_FIELDS,
      this.#badPtr,
    );
    if (st === 0) return;
    if (st === Status.KIVI_ERR_NONFINITE) {
      const msg = h.state.lib.call("kivi_ctx_last_error", h.state.ctx);
      const layer = Number(this.#report[1]);
      this.#bad.forEach((bad, b) => {
        if (bad) {
          this.#host.poison(
            this.#seqs[b],
            `holds a non-finite value that batch.append stored${
              layer >= 0 ? ` in layer ${layer}` : ""
            } (a deferred check); free it`,
          );
        }
      });
      throw new KiviError(st, "kivi_batch_status", msg);
    }
    this.#host.backend._check("kivi_batch_status", st);
  }

  /** @internal the cache (or its backend) was disposed: frees the batch. */
  _close(why: string): void {
    this.#gone = why;
    this.dispose();
  }

  /** Frees the batch (a deferred error not read yet is dropped). Idempotent. On CUDA it waits for
   * the batch's work in flight first. */
  dispose(): void {
    const h = this.#held;
    if (h === undefined) return;
    this.#held = undefined;
    batchRegistry.unregister(this);
    h.state.lib.call("kivi_batch_destroy", h.handle);
    h.state.release();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
