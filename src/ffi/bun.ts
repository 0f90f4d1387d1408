/**
 * Bun adapter: the symbol table through `bun:ffi`. Bun calls are synchronous; `callAsync` resolves
 * after a plain call, and the backend polls `kivi_ctx_query` first so the event loop keeps running
 * while the device works.
 *
 * @module
 */
import { dlopen, FFIType, ptr as bunPtr } from "bun:ffi";
import type { FfiType, SymbolName } from "./symbols.ts";
import { symbols } from "./symbols.ts";
import type { NativeLib, Pointer } from "./_native.ts";
import { symbolNames } from "./_native.ts";

const typeMap: Record<FfiType, FFIType> = {
  i32: FFIType.i32,
  i64: FFIType.i64,
  u64: FFIType.u64,
  f32: FFIType.f32,
  f64: FFIType.f64,
  ptr: FFIType.ptr,
  cstring: FFIType.cstring,
};

type Fn = (...args: unknown[]) => unknown;

/** Opens `path` with bun:ffi. */
export function loadBun(path: string): NativeLib {
  const defs: Record<string, { args: FFIType[]; returns: FFIType }> = {};
  for (const name of symbolNames) {
    const spec = symbols[name];
    defs[name] = { args: spec.args.map((t) => typeMap[t]), returns: typeMap[spec.returns] };
  }
  const lib = dlopen(path, defs);
  const fns = lib.symbols as unknown as Record<SymbolName, Fn>;
  const call = (name: SymbolName, ...args: unknown[]): unknown => {
    const r = fns[name](...args);
    // bun returns `cstring` results as CString objects: make them plain strings.
    return symbols[name].returns === "cstring" ? String(r ?? "") : r;
  };
  const native: NativeLib = {
    path,
    runtime: "bun",
    offThread: false,
    call: call as NativeLib["call"],
    fn: ((name: SymbolName) => fns[name]) as NativeLib["fn"],
    callAsync:
      ((name: SymbolName, ...args: unknown[]) => Promise.resolve(call(name, ...args))) as NativeLib[
        "callAsync"
      ],
    ptr: (view) => bunPtr(view as Uint8Array) as unknown as Pointer,
    pointerAt: (out, index) => {
      const a = out[index];
      return (a === 0n ? null : Number(a)) as unknown as Pointer;
    },
    address: (p) => (p === null ? 0n : BigInt(p as unknown as number)),
    close: () => lib.close(),
  };
  return native;
}
