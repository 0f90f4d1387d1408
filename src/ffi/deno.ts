/**
 * Deno adapter: the symbol table through `Deno.dlopen`. Exports marked `blocking` in the table are
 * also bound a second time with `nonblocking: true`, so waiting for the device runs on Deno's FFI
 * thread and the event loop stays free.
 *
 * @module
 */
import type { FfiType, SymbolName } from "./symbols.ts";
import { symbols } from "./symbols.ts";
import type { NativeLib, Pointer } from "./_native.ts";
import { symbolNames } from "./_native.ts";

const typeMap: Record<FfiType, Deno.NativeType> = {
  i32: "i32",
  i64: "i64",
  u64: "u64",
  f32: "f32",
  f64: "f64",
  ptr: "pointer",
  cstring: "pointer",
};

type Fn = (...args: unknown[]) => unknown;
const asyncSuffix = "__async";

/** Opens `path` with Deno.dlopen (needs --allow-ffi). */
export function loadDeno(path: string): NativeLib {
  const defs: Record<string, Deno.ForeignFunction> = {};
  for (const name of symbolNames) {
    const spec = symbols[name];
    const def = {
      parameters: spec.args.map((t) => typeMap[t]),
      result: typeMap[spec.returns] as Deno.NativeResultType,
    };
    defs[name] = def;
    if ("blocking" in spec && spec.blocking) {
      defs[name + asyncSuffix] = { ...def, name, nonblocking: true };
    }
  }
  const lib = Deno.dlopen(path, defs);
  const fns = lib.symbols as unknown as Record<string, Fn>;
  const finish = (name: SymbolName, r: unknown): unknown => {
    if (symbols[name].returns !== "cstring") return r;
    const p = r as Deno.PointerValue;
    return p === null ? "" : Deno.UnsafePointerView.getCString(p);
  };
  const native: NativeLib = {
    path,
    runtime: "deno",
    offThread: true,
    call: ((name: SymbolName, ...args: unknown[]) => finish(name, fns[name](...args))) as NativeLib[
      "call"
    ],
    fn: ((name: SymbolName) => fns[name]) as NativeLib["fn"],
    callAsync:
      (async (name: SymbolName, ...args: unknown[]) =>
        finish(name, await (fns[name + asyncSuffix](...args) as Promise<unknown>))) as NativeLib[
          "callAsync"
        ],
    ptr: (view) => Deno.UnsafePointer.of(view as unknown as BufferSource) as unknown as Pointer,
    pointerAt: (out, index) => Deno.UnsafePointer.create(out[index]) as unknown as Pointer,
    address: (
      p,
    ) => (p === null ? 0n : BigInt(Deno.UnsafePointer.value(p as unknown as Deno.PointerObject))),
    close: () => lib.close(),
  };
  return native;
}
