/**
 * Device memory and the native context: `DeviceTensor` and `BackendCore`, the part of a backend that
 * every operation needs (the context, allocation, copies, status checks, synchronisation). The
 * operations themselves (quantizers, caches) build on this module; `Backend` (backend.ts) adds them.
 * Nothing here imports a module above it.
 *
 * @module
 */
import { KiviError, Status } from "./errors.ts";
import { type NativeLib, type Pointer, scratchArray } from "./ffi/_native.ts";
import type { SymbolName } from "./ffi/symbols.ts";
import {
  checkElems,
  checkInt,
  checkOneOf,
  hostView,
  plainView,
  readOptions,
  show,
} from "./_checks.ts";
import {
  checkHint,
  dtypeBytes,
  dtypeOfKind,
  type HostArray,
  hostArray,
  type HostOf,
  type TensorDType,
} from "./_dtype.ts";

export type { Pointer } from "./ffi/_native.ts";

/** Where a backend runs. */
export type BackendKind = "cpu" | "cuda";

/** Something a backend owns and frees before itself. */
interface Child {
  dispose(): void;
}

/**
 * The native context and library shared by a backend and its tensors; destroyed when the last of
 * them lets go, so a tensor freed by its finalizer after the backend never uses a dead context.
 */
export class NativeState {
  refs = 1;
  broken: string | undefined;
  constructor(readonly lib: NativeLib, readonly ctx: Pointer) {}
  retain(): void {
    this.refs++;
  }
  release(): void {
    if (--this.refs > 0) return;
    this.lib.call("kivi_ctx_destroy", this.ctx);
    this.lib.close();
  }
}

/** A native handle a class owns (a cache, a decode batch) and the shared state it keeps alive. */
export interface NativeHeld {
  state: NativeState;
  handle: Pointer;
}

/** The safety net of a class owning one native handle: a finalizer that destroys the handle with
 * `destroy`, then releases the state. Explicit disposal unregisters. */
export function handleRegistry(
  destroy: "kivi_cache_destroy" | "kivi_batch_destroy",
): FinalizationRegistry<NativeHeld> {
  return new FinalizationRegistry<NativeHeld>((held) => {
    held.state.lib.call(destroy, held.handle);
    held.state.release();
  });
}

interface TensorHeld {
  state: NativeState;
  ptr: Pointer;
}

function freeTensor(held: TensorHeld): void {
  held.state.lib.call("kivi_mem_free", held.state.ctx, held.ptr);
  held.state.release();
}
const tensorRegistry = new FinalizationRegistry<TensorHeld>(freeTensor);
const backendRegistry = new FinalizationRegistry<NativeState>((state) => state.release());

/** @internal What the library reads of a tensor: its private fields, never its (overridable) getters. */
export interface TensorFacts {
  readonly tensor: DeviceTensor;
  readonly backend: BackendCore;
  readonly dtype: TensorDType;
  readonly shape: readonly number[];
  readonly length: number;
  readonly bytes: number;
  /** The address (KIVI_ERR_STATE once disposed). */
  pointer(op: string): Pointer;
  /** The address of a tensor about to be written (KIVI_ERR_STATE while a read() is in flight). */
  writePointer(op: string, name?: string): Pointer;
}

/**
 * Memory owned by a backend: device memory on the `cuda` backend, host memory from the same
 * allocator on the `cpu` backend, so code written for tensors runs on both.
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend({ prefer: "cpu" });
 * using t = kivi.upload(new Float32Array([1, 2, 3, 4]), { shape: [2, 2] });
 * console.log(await t.read()); // Float32Array [1, 2, 3, 4]
 * ```
 */
export class DeviceTensor<D extends TensorDType = TensorDType> {
  #backend: BackendCore;
  #ptr: Pointer;
  #held: TensorHeld | undefined;
  #reads = 0;
  #shape: readonly number[];
  #dtype: D;
  #length: number;
  #bytes: number;

  /** @internal use Backend.alloc / Backend.upload */
  constructor(
    backend: BackendCore,
    state: NativeState,
    ptr: Pointer,
    shape: readonly number[],
    dtype: D,
  ) {
    this.#backend = backend;
    this.#ptr = ptr;
    this.#shape = Object.freeze([...shape]);
    this.#dtype = dtype;
    this.#length = shape.reduce((a, b) => a * b, 1);
    this.#bytes = this.#length * dtypeBytes[dtype];
    state.retain();
    this.#held = { state, ptr };
    tensorRegistry.register(this, this.#held, this);
  }

  /** Dimensions, as allocated. */
  get shape(): readonly number[] {
    return this.#shape;
  }

  /** Element type. */
  get dtype(): D {
    return this.#dtype;
  }

  /** Number of elements. */
  get length(): number {
    return this.#length;
  }

  /** Size in bytes. */
  get bytes(): number {
    return this.#bytes;
  }

  /** The backend that owns this tensor. */
  get backend(): BackendCore {
    return this.#backend;
  }

  /** True once disposed. */
  get disposed(): boolean {
    return this.#held === undefined;
  }

  /** @internal A tensor's facts read from its private fields (a brand check: a duck-typed object, a
   * Proxy, or a tensor whose prototype was swapped for lying getters cannot fake them), or undefined
   * for anything that is not a DeviceTensor. */
  static _facts(x: unknown): TensorFacts | undefined {
    if (x === null || typeof x !== "object" || !(#ptr in x)) return undefined;
    const t = x as DeviceTensor;
    return {
      tensor: t,
      backend: t.#backend,
      dtype: t.#dtype,
      shape: t.#shape,
      length: t.#length,
      bytes: t.#bytes,
      pointer: (op) => t.#pointer(op),
      writePointer: (op, name) => t.#writePointer(op, name),
    };
  }

  /** @internal the address, for the backend's native calls. */
  pointer(op: string): Pointer {
    return this.#pointer(op);
  }

  #pointer(op: string): Pointer {
    if (this.#held === undefined) {
      throw new KiviError(
        Status.KIVI_ERR_STATE,
        op,
        `${op}: the tensor was disposed; allocate a new one`,
      );
    }
    return this.#ptr;
  }

  /** @internal the address of a tensor about to be written: refused while a read() of it is in
   * flight, which would otherwise copy out a mix of old and new data. */
  writePointer(op: string, name = "the tensor"): Pointer {
    return this.#writePointer(op, name);
  }

  #writePointer(op: string, name = "the tensor"): Pointer {
    const p = this.#pointer(op);
    if (this.#reads > 0) {
      throw new KiviError(
        Status.KIVI_ERR_STATE,
        op,
        `${op}: ${name} has a read() in flight; await it before writing into the tensor`,
      );
    }
    return p;
  }

  /** True while a `read()` of this tensor has not settled. */
  get reading(): boolean {
    return this.#reads > 0;
  }

  /** Copies the tensor to a new host array once pending device work is done, without blocking the
   * event loop while the device works. While it is in flight, writing into the tensor is refused
   * (KIVI_ERR_STATE) and disposing it frees the memory only once the copy is done. */
  async read(): Promise<HostOf[D]> {
    const p = this.#pointer("read");
    const out = hostArray(this.#dtype, this.#length);
    const held = this.#held!;
    this.#reads++;
    try {
      await this.#backend._download(out, p, this.#bytes, true);
    } finally {
      if (--this.#reads === 0 && this.#held === undefined) freeTensor(held);
    }
    return out;
  }

  /** Like `read`, but blocks until the device is done. */
  readSync(): HostOf[D] {
    const p = this.#pointer("readSync");
    const out = hostArray(this.#dtype, this.#length);
    this.#backend._download(out, p, this.#bytes, false);
    return out;
  }

  /** Overwrites the tensor with a host array of the same dtype and length (KIVI_ERR_STATE while a
   * `read()` of it is in flight). */
  write(data: HostOf[D]): void {
    this.#backend._upload(DeviceTensor._facts(this)!, data, "write");
  }

  /** Frees the memory now. Idempotent. */
  dispose(): void {
    const held = this.#held;
    if (held === undefined) return;
    this.#held = undefined;
    tensorRegistry.unregister(this);
    this.#backend._forget(this as DeviceTensor);
    if (this.#reads === 0) freeTensor(held); // else the last read() in flight frees it
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/**
 * The native context of a backend and the memory it owns: what every operation needs. Open one with
 * `openBackend()`, which returns a {@link Backend} (this class plus the quantizers and caches).
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend({ prefer: "cpu" });
 * using t = kivi.alloc([4], "f32");
 * console.log(kivi.kind, t.backend === kivi); // cpu true
 * ```
 */
export class BackendCore {
  #kind: BackendKind;
  /** Why this backend was chosen (e.g. why CUDA was not). */
  readonly reason: string;
  /** Device name as the library reports it. */
  readonly deviceName: string;
  /** Device index of the context. */
  readonly device: number;
  #state: NativeState | undefined;
  // Children (tensors, caches) held weakly, so the finalizers of forgotten ones can still run.
  #children = new Set<WeakRef<Child>>();
  #refOf = new WeakMap<Child, WeakRef<Child>>();
  /** alloc's out-parameter, its address taken once (Deno: a typed array made and an address taken
   * cost about 1 µs a call together). */
  #made = scratchArray(BigUint64Array, 1);
  #madePtr: Pointer;

  /** @internal use openBackend */
  constructor(lib: NativeLib, ctx: Pointer, kind: BackendKind, device: number, reason: string) {
    this.#state = new NativeState(lib, ctx);
    this.#kind = kind;
    this.device = device;
    this.reason = reason;
    const name = new Uint8Array(256);
    this._check(
      "kivi_ctx_device_name",
      lib.call("kivi_ctx_device_name", ctx, lib.ptr(name), name.length),
    );
    this.deviceName = new TextDecoder().decode(name.subarray(0, name.indexOf(0)));
    this.#madePtr = lib.ptr(this.#made);
    backendRegistry.register(this, this.#state, this);
  }

  /** "cpu" or "cuda" (a getter: the argument checks rely on it). */
  get kind(): BackendKind {
    return this.#kind;
  }

  /** Path of the loaded shared library. */
  get libraryPath(): string {
    return this.#live("libraryPath").lib.path;
  }

  /** The runtime adapter in use ("bun" or "deno"). */
  get runtime(): "bun" | "deno" {
    return this.#live("runtime").lib.runtime;
  }

  /** True once disposed. */
  get disposed(): boolean {
    return this.#state === undefined;
  }

  /** @internal native references held on the context: 1 for the backend plus one per live tensor
   * or cache (finalized ones included once their finalizer has run). For leak tests. */
  get _nativeRefs(): number {
    return this.#state?.refs ?? 0;
  }

  /** Number of live tensors owned by this backend. */
  get liveTensors(): number {
    let n = 0;
    for (const r of this.#children) if (r.deref() instanceof DeviceTensor) n++;
    return n;
  }

  #live(op: string): NativeState {
    const s = this.#state;
    if (s === undefined) {
      throw new KiviError(
        Status.KIVI_ERR_STATE,
        op,
        `${op}: the backend was disposed; open a new one with openBackend()`,
      );
    }
    if (s.broken !== undefined) {
      throw new KiviError(Status.KIVI_ERR_CUDA_STICKY, op, `${op}: ${s.broken}`);
    }
    return s;
  }

  /** @internal the loaded library and context of a live backend. */
  _native(op: string): { lib: NativeLib; ctx: Pointer } {
    const s = this.#live(op);
    return { lib: s.lib, ctx: s.ctx };
  }

  /** @internal throws a KiviError for a failed status, with the context's message. */
  _check(op: SymbolName | string, status: number): void {
    if (status === 0) return;
    const s = this.#state;
    if (s === undefined) {
      throw new KiviError(status, op, `${op} failed while the backend was being disposed`);
    }
    const msg = s.lib.call("kivi_ctx_last_error", s.ctx) || s.lib.call("kivi_last_error");
    if (status === Status.KIVI_ERR_CUDA_STICKY) {
      s.broken =
        `the device context hit a sticky CUDA fault and is unusable (${msg}); start a new process`;
    }
    throw new KiviError(status, op, msg);
  }

  /** @internal the facts of a tensor (see DeviceTensor._facts), or undefined for anything else. */
  _tensor(x: unknown): TensorFacts | undefined {
    return DeviceTensor._facts(x);
  }

  /** Allocates an uninitialised tensor. */
  alloc<D extends TensorDType>(shape: readonly number[], dtype: D): DeviceTensor<D> {
    checkOneOf("dtype", dtype, Object.keys(dtypeBytes) as TensorDType[]);
    const n = Array.isArray(shape) ? shape.length : 0; // read once, then each element once
    if (n === 0) {
      throw new TypeError(`shape must be a non-empty array of sizes, got ${show(shape)}`);
    }
    const dims: number[] = [];
    for (let i = 0; i < n; i++) dims.push(checkInt(`shape[${i}]`, shape[i], 1, 2 ** 40));
    const bytes = checkElems("shape", dims) * dtypeBytes[dtype];
    const { lib, ctx } = this._native("alloc");
    this._check("kivi_mem_alloc", lib.call("kivi_mem_alloc", ctx, bytes, this.#madePtr));
    const t = new DeviceTensor(this, this.#state!, lib.pointerAt(this.#made, 0), dims, dtype);
    this._adopt(t);
    return t;
  }

  /** Copies a host array into a new tensor. `shape` defaults to [length]; `dtype` to the array's
   * (pass "bf16" for a Uint16Array of bf16 bits; a hint that does not fit the array is a TypeError). */
  upload(data: Float32Array, opts?: { shape?: readonly number[] }): DeviceTensor<"f32">;
  upload(data: Float16Array, opts?: { shape?: readonly number[] }): DeviceTensor<"f16">;
  upload(data: Uint32Array, opts?: { shape?: readonly number[] }): DeviceTensor<"u32">;
  upload(data: Uint8Array, opts?: { shape?: readonly number[] }): DeviceTensor<"u8">;
  upload(data: Int32Array, opts?: { shape?: readonly number[] }): DeviceTensor<"i32">;
  upload(data: HostArray, opts?: { shape?: readonly number[]; dtype?: TensorDType }): DeviceTensor;
  upload(
    data: HostArray,
    opts: { shape?: readonly number[]; dtype?: TensorDType } = {},
  ): DeviceTensor {
    const o = readOptions("options", opts, ["shape", "dtype"]);
    const hint = o.dtype === undefined
      ? undefined
      : checkOneOf("dtype", o.dtype, Object.keys(dtypeBytes) as TensorDType[]);
    const v = hostView("data", data);
    const dtype = v && dtypeOfKind(v.kind, hint);
    if (v === undefined || dtype === undefined) {
      throw new TypeError(`data must be a typed array of a kivi dtype, got ${show(data)}`);
    }
    checkHint("dtype", hint, "data", v.kind);
    const t = this.alloc((o.shape ?? [v.length]) as readonly number[], dtype);
    try {
      this._upload(DeviceTensor._facts(t)!, data, "upload");
    } catch (e) {
      t.dispose();
      throw e;
    }
    return t;
  }

  /** @internal copies host `data` (its dtype and length read from its internal slots) into t. */
  _upload(t: TensorFacts, data: unknown, op: string): void {
    const v = hostView("data", data);
    if (v === undefined || dtypeOfKind(v.kind, t.dtype) !== t.dtype || v.length !== t.length) {
      throw new TypeError(
        `data must be a ${t.dtype} array of ${t.length} elements, got ${show(data)}${
          v ? ` of ${v.length}` : ""
        }`,
      );
    }
    const { lib, ctx } = this._native(op);
    // The plain view: Deno's UnsafePointer.of reads a subclass's (overridable) getters.
    this._check(
      "kivi_mem_upload",
      lib.call("kivi_mem_upload", ctx, t.writePointer(op), lib.ptr(plainView(v)), v.byteLength),
    );
  }

  /** @internal */
  _download(out: ArrayBufferView, src: Pointer, bytes: number, async: true): Promise<void>;
  _download(out: ArrayBufferView, src: Pointer, bytes: number, async: false): void;
  _download(
    out: ArrayBufferView,
    src: Pointer,
    bytes: number,
    async: boolean,
  ): Promise<void> | void {
    const { lib, ctx } = this._native("read");
    if (!async) {
      this._check(
        "kivi_mem_download",
        lib.call("kivi_mem_download", ctx, lib.ptr(out), src, bytes),
      );
      return;
    }
    return (async () => {
      await this.synchronize();
      const st = await lib.callAsync("kivi_mem_download", ctx, lib.ptr(out), src, bytes);
      this._check("kivi_mem_download", st);
    })();
  }

  /** @internal tracks a child so that dispose() frees it first. */
  _adopt(child: Child): void {
    const ref = new WeakRef(child);
    this.#children.add(ref);
    this.#refOf.set(child, ref);
  }

  /** @internal */
  _forget(child: Child): void {
    const ref = this.#refOf.get(child);
    if (ref) this.#children.delete(ref);
  }

  /** @internal the shared native state, for children that hold a native handle of their own. */
  _retainState(op: string): NativeState {
    const s = this.#live(op);
    s.retain();
    return s;
  }

  /** Waits for all enqueued work without blocking the event loop: Deno waits on its FFI thread,
   * Bun polls the context between event-loop turns. */
  async synchronize(): Promise<void> {
    const { lib, ctx } = this._native("synchronize");
    // The context must outlive the wait (on the FFI thread, or between Bun's polls, while other code
    // runs and may dispose the backend).
    const s = this._retainState("synchronize");
    try {
      if (lib.offThread) {
        this._check("kivi_ctx_synchronize", await lib.callAsync("kivi_ctx_synchronize", ctx));
        return;
      }
      const done = new Int32Array(1);
      for (;;) {
        this._check("kivi_ctx_query", lib.call("kivi_ctx_query", ctx, lib.ptr(done)));
        if (done[0] === 1) break;
        await new Promise((r) => setTimeout(r, 0));
      }
      this._check("kivi_ctx_synchronize", lib.call("kivi_ctx_synchronize", ctx));
    } finally {
      s.release();
    }
  }

  /** Blocks until all enqueued work is done. */
  synchronizeSync(): void {
    const { lib, ctx } = this._native("synchronizeSync");
    this._check("kivi_ctx_synchronize", lib.call("kivi_ctx_synchronize", ctx));
  }

  /** @internal TEST ONLY (kivi_debug_fault): provokes a sticky CUDA fault, after which this backend
   * refuses every call and CUDA is unusable in the whole process; run it in a child process. Always
   * throws: KIVI_ERR_CUDA_STICKY on the CUDA backend, KIVI_ERR_NO_DEVICE on the CPU backend (which
   * keeps working). */
  _debugFault(): never {
    const { lib, ctx } = this._native("debugFault");
    this._check("kivi_debug_fault", lib.call("kivi_debug_fault", ctx));
    throw new KiviError(
      Status.KIVI_ERR_STATE,
      "kivi_debug_fault",
      "kivi_debug_fault: returned without a fault",
    );
  }

  /** Free and total bytes of the device (the CPU build: physical memory). */
  memInfo(): { free: number; total: number } {
    const { lib, ctx } = this._native("memInfo");
    const f = new BigUint64Array(1), t = new BigUint64Array(1);
    this._check("kivi_mem_info", lib.call("kivi_mem_info", ctx, lib.ptr(f), lib.ptr(t)));
    return { free: Number(f[0]), total: Number(t[0]) };
  }

  /** Milliseconds of device time taken by the work `fn` enqueues (CUDA events around it; wall clock
   * on the CPU). FFI cost between launches is included only where it stalls the device. */
  time(fn: () => void): number {
    if (typeof fn !== "function") throw new TypeError(`fn must be a function, got ${show(fn)}`);
    const { lib, ctx } = this._native("time");
    // fn is user code: it may dispose this backend. The retained state keeps the context alive until
    // the timer is stopped, and a backend disposed meanwhile is an error, not a call on a freed context.
    const s = this._retainState("time");
    try {
      this._check("kivi_timer_start", lib.call("kivi_timer_start", ctx));
      fn();
      if (this.#state === undefined) {
        throw new KiviError(
          Status.KIVI_ERR_STATE,
          "time",
          "time: the backend was disposed while fn ran; open a new one with openBackend()",
        );
      }
      const ms = new Float32Array(1);
      this._check("kivi_timer_stop", lib.call("kivi_timer_stop", ctx, lib.ptr(ms)));
      return ms[0];
    } finally {
      s.release();
    }
  }

  /** Copy bandwidth of the device in GB/s (1e9 bytes, read + written), measured now. */
  copyBandwidth(bytes = 256 * 2 ** 20, iters = 20): number {
    checkInt("iters", iters, 1, 1 << 20);
    // Two buffers of `bytes` are allocated and written: at most a quarter of the memory each.
    const limit = Math.floor(this.memInfo().total / 4);
    checkInt("bytes", bytes, 1, limit);
    const { lib, ctx } = this._native("copyBandwidth");
    const out = new Float64Array(1);
    this._check("kivi_bench_copy", lib.call("kivi_bench_copy", ctx, bytes, iters, lib.ptr(out)));
    return out[0];
  }

  /** Frees every tensor of this backend, then the context and the library. Idempotent. */
  dispose(): void {
    const s = this.#state;
    if (s === undefined) return;
    // Caches first (they may hold tensors' data in flight), then tensors.
    const live = [...this.#children].map((r) => r.deref()).filter((c) => c !== undefined);
    for (const c of live) if (!(c instanceof DeviceTensor)) c.dispose();
    for (const c of live) if (c instanceof DeviceTensor) c.dispose();
    this.#children.clear();
    this.#state = undefined;
    backendRegistry.unregister(this);
    s.release();
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}
