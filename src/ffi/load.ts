/**
 * Loads the library with the adapter of the runtime we are on (imported on demand, so Deno never
 * loads `bun:ffi`). Apart from `_native.ts`, which the adapters import, so there is no import circle.
 *
 * @module
 */
import type { NativeLib } from "./_native.ts";

/** Loads `path` with the adapter of the runtime we are on. */
export async function loadNative(path: string): Promise<NativeLib> {
  const g = globalThis as { Bun?: unknown; Deno?: unknown };
  if (g.Bun !== undefined) {
    const { loadBun } = await import("./bun.ts");
    return loadBun(path);
  }
  if (g.Deno !== undefined) {
    const { loadDeno } = await import("./deno.ts");
    return loadDeno(path);
  }
  throw new Error("kivi runs on Bun or Deno: neither `Bun` nor `Deno` is defined in this runtime");
}
