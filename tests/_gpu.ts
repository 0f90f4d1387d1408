/**
 * GPU suites: opens the CUDA backend if a device is present and gives `gpuDescribe`, which on a
 * machine without one registers a single visibly skipped test "skipped: no CUDA device" (the text
 * both `bun test` and `deno test` print for a skipped `it`).
 *
 * @module
 */
import { describe, it } from "node:test";
import { type Backend, openBackend } from "../src/mod.ts";

async function tryGpu(): Promise<{ gpu?: Backend; why: string }> {
  try {
    const b = await openBackend({ prefer: "auto" });
    if (b.kind === "cuda") return { gpu: b, why: b.reason };
    const why = b.reason;
    b.dispose();
    return { why };
  } catch (e) {
    return { why: (e as Error).message };
  }
}

const found = await tryGpu();
/** The CUDA backend, or undefined without a device. */
export const gpu: Backend | undefined = found.gpu;
/** The CPU reference backend, the oracle of every GPU result. */
export const cpu: Backend = await openBackend({ prefer: "cpu" });

/** describe() that runs `fn` with the CUDA backend, or shows one skipped test without a device. */
export function gpuDescribe(name: string, fn: (gpu: Backend) => void): void {
  describe(name, () => {
    if (gpu === undefined) {
      it("skipped: no CUDA device", { skip: true }, () => {});
      return;
    }
    fn(gpu);
  });
}
