/**
 * One native call of the quantizers (src/quant.ts): its buffers recorded and checked first, then
 * bound to native handles, run, and on failure freed.
 *
 * @module
 */
import type { NativeLib, Pointer } from "./ffi/_native.ts";
import type { SymbolName } from "./ffi/symbols.ts";
import type { BackendCore as Backend, DeviceTensor, TensorFacts } from "./tensor.ts";
import { Staging } from "./_staging.ts";
import { type HostView, hostView, overlaps, plainView, show } from "./_checks.ts";
import { dtypeOfKind, type HostArray, hostArray, type TensorDType } from "./_dtype.ts";

/** A buffer of one call, described once: a host typed array (by its internal slots) or a tensor. */
interface Slot {
  readonly name: string;
  readonly dtype: TensorDType;
  readonly length: number;
  readonly host?: HostView;
  readonly tensor?: TensorFacts;
  /** An output the call allocates at bind(). */
  readonly make?: boolean;
  readonly out: boolean;
  p?: Pointer;
  buf?: unknown;
}

/**
 * One native call, in two phases. First every argument is recorded and checked (types, sizes,
 * overlaps) as plain values: whatever user code the arguments hold (getters, Proxies) has run by
 * then. Then bind() takes the native handles (the backend's context, tensor addresses, liveness) and
 * allocates the outputs, and the export runs with nothing of the caller's in between. A failed call
 * disposes what it allocated, so it leaves nothing behind.
 */
export class Call<M extends "host" | "device"> {
  lib!: NativeLib;
  ctx!: Pointer;
  #slots: Slot[] = [];
  #made: DeviceTensor[] = [];
  /** Host arrays staged through device memory where the backend needs it (`using` frees that). */
  readonly #stage: Staging;

  constructor(readonly kivi: Backend, readonly mem: M, readonly op: string) {
    this.#stage = new Staging(kivi, op);
  }

  /** Records an input buffer (host array or tensor) of `length` elements of `dtype`. */
  input(name: string, x: unknown, dtype: TensorDType, length: number): number {
    return this.#add({
      name,
      dtype,
      length,
      out: false,
      ...this.#describe(name, x, dtype, length),
    });
  }

  /** Records an output: the caller's buffer (checked, and not sharing memory with any buffer
   * recorded before it) or, when none is given, a new one made at bind(). */
  output(name: string, dtype: TensorDType, length: number, given?: unknown): number {
    if (given === undefined) {
      return this.#add({ name: `out.${name}`, dtype, length, out: true, make: true });
    }
    const slot: Slot = {
      name: `out.${name}`,
      dtype,
      length,
      out: true,
      ...this.#describe(`out.${name}`, given, dtype, length),
    };
    for (const o of this.#slots) {
      const shared = slot.host && o.host
        ? overlaps(slot.host, o.host)
        : slot.tensor !== undefined && slot.tensor.tensor === o.tensor?.tensor;
      if (shared) throw new TypeError(`${slot.name} must not share memory with ${o.name}`);
    }
    return this.#add(slot);
  }

  /** Takes the native handles and allocates the outputs; call it after every argument was read. */
  bind(): void {
    const n = this.kivi._native(this.op);
    this.lib = n.lib;
    this.ctx = n.ctx;
    try {
      for (const s of this.#slots) {
        if (s.host) {
          s.buf = s.host.view;
          const plain = plainView(s.host) as HostArray;
          s.p = s.out ? this.#stage.output(plain, s.dtype) : this.#stage.input(plain, s.dtype);
        } else if (s.tensor) {
          s.buf = s.tensor.tensor;
          s.p = s.out ? s.tensor.writePointer(this.op, s.name) : s.tensor.pointer(this.op);
        } else if (this.mem === "host") {
          const a = hostArray(s.dtype, s.length);
          s.buf = a;
          s.p = this.#stage.output(a, s.dtype);
        } else {
          const t = this.kivi.alloc([s.length], s.dtype);
          this.#made.push(t as DeviceTensor);
          s.buf = t;
          s.p = this.kivi._tensor(t)!.pointer(this.op);
        }
      }
    } catch (e) {
      this.#dispose();
      throw e;
    }
  }

  /** The address of slot i (after bind). */
  ptr(i: number): Pointer {
    return this.#slots[i].p!;
  }

  /** The buffer of slot i (after bind): the caller's or the one made. */
  buf<B>(i: number): B {
    return this.#slots[i].buf as B;
  }

  /** Runs the export; on failure frees what this call allocated and throws. */
  run<K extends SymbolName>(name: K, status: number): void {
    if (status === 0) return this.#stage.finish();
    this.#dispose();
    this.kivi._check(name, status);
  }

  /** Frees the staging tensors of host arrays (the results stay). */
  [Symbol.dispose](): void {
    this.#stage[Symbol.dispose]();
  }

  #dispose(): void {
    for (const t of this.#made) t.dispose();
    this.#made = [];
  }

  #add(s: Slot): number {
    this.#slots.push(s);
    return this.#slots.length - 1;
  }

  #describe(
    name: string,
    x: unknown,
    dtype: TensorDType,
    length: number,
  ): { host?: HostView; tensor?: TensorFacts } {
    if (this.mem === "device") {
      const t = this.kivi._tensor(x);
      if (t === undefined) {
        throw new TypeError(`${name} must be a DeviceTensor like the input, got ${show(x)}`);
      }
      if (t.backend !== this.kivi) {
        throw new TypeError(`${name} belongs to another backend; upload it to this one first`);
      }
      if (t.dtype !== dtype && !(dtype === "f16" && t.dtype === "u16")) {
        throw new TypeError(`${name} must have dtype ${show(dtype)}, got ${show(t.dtype)}`);
      }
      if (t.length !== length) {
        throw new TypeError(`${name} must have ${length} elements, got ${t.length}`);
      }
      return { tensor: t };
    }
    const v = this.kivi._tensor(x) === undefined ? hostView(name, x) : undefined;
    if (v === undefined) {
      throw new TypeError(`${name} must be a host typed array like the input, got ${show(x)}`);
    }
    if (dtypeOfKind(v.kind, dtype) !== dtype) {
      throw new TypeError(`${name} must be a ${dtype} array, got ${v.kind}`);
    }
    if (v.length !== length) {
      throw new TypeError(`${name} must have ${length} elements, got ${v.length}`);
    }
    return { host: v };
  }
}
