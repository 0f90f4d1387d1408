/**
 * The runtime-neutral face of the loaded library: both adapters (bun.ts, deno.ts) implement
 * `NativeLib`, so nothing above src/ffi/ knows which runtime it is on. load.ts picks the adapter;
 * this module imports neither, so the adapters can import it.
 *
 * @module
 */
import type { FfiType, SymbolName } from "./symbols.ts";
import { symbols } from "./symbols.ts";

declare const pointerBrand: unique symbol;
/** An opaque address (a host buffer, device memory or a handle). Never do arithmetic on it. */
export type Pointer = { readonly [pointerBrand]: true } | null;

type JsOf<T extends FfiType> = T extends "ptr" ? Pointer
  : T extends "i64" | "u64" ? number | bigint
  : T extends "cstring" ? string
  : number;

type Spec<K extends SymbolName> = (typeof symbols)[K];
type MapArgs<A extends readonly FfiType[]> = { -readonly [I in keyof A]: JsOf<A[I]> };
/** The JS argument tuple of export K, derived from the symbol table. */
export type ArgsOf<K extends SymbolName> = MapArgs<Spec<K>["args"]>;
/** The JS result of export K. */
export type ResultOf<K extends SymbolName> = JsOf<Spec<K>["returns"]>;
/** Exports returning a number (every export but the `cstring` ones). */
export type NumericName = {
  [K in SymbolName]: Spec<K>["returns"] extends "cstring" ? never : K;
}[SymbolName];
/** Exports that block until device work is done, and so get an async variant. */
export type BlockingName = {
  [K in SymbolName]: Spec<K> extends { blocking: true } ? K : never;
}[SymbolName];

/** A loaded kivi library, as both runtime adapters present it. */
export interface NativeLib {
  /** Absolute path of the loaded shared library. */
  readonly path: string;
  /** "bun" or "deno". */
  readonly runtime: "bun" | "deno";
  /** True where `callAsync` runs the call on another thread (Deno `nonblocking`). */
  readonly offThread: boolean;
  /** Calls an export synchronously. */
  call<K extends SymbolName>(name: K, ...args: ArgsOf<K>): ResultOf<K>;
  /** The export itself, for hot paths (one call a layer): no name lookup or argument spreading per call.
   * Exports returning a C string go through `call`. */
  fn<K extends NumericName>(name: K): (...args: ArgsOf<K>) => ResultOf<K>;
  /** Calls a blocking export off the main thread where the runtime can; else like `call`. */
  callAsync<K extends BlockingName>(name: K, ...args: ArgsOf<K>): Promise<ResultOf<K>>;
  /** Address of a host typed array's first element (valid while the array is alive). */
  ptr(view: ArrayBufferView): Pointer;
  /** The address stored at `out[index]` (an out-parameter such as `void **out`). */
  pointerAt(out: BigUint64Array, index: number): Pointer;
  /** The numeric address, for identity checks and messages only. */
  address(p: Pointer): bigint;
  /** Unloads the library. */
  close(): void;
}

/**
 * A typed array whose address stays put, for scratch arrays whose address is taken once and kept: a
 * view of its own ArrayBuffer. (Bun moves the storage of a small typed array made directly the first
 * time a view of it is made or its buffer read, so an address taken before that goes stale.)
 */
export function scratchArray<T extends ArrayBufferView>(
  Ctor: { new (b: ArrayBuffer): T; BYTES_PER_ELEMENT: number },
  n: number,
): T {
  return new Ctor(new ArrayBuffer(n * Ctor.BYTES_PER_ELEMENT));
}

/** Names of every export, for adapters that build their tables from the spec. */
export const symbolNames = Object.keys(symbols) as SymbolName[];
