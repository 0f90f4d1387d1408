/**
 * GPU suites: opens the CUDA backend if a device is present and gives `gpuDescribe`, which on a
 * machine without one registers a single visibly skipped test "skipped: no CUDA device" (the text
 * both `bun test` and `deno test` print for a skipped `it`), and what the GPU suites of the cache
 * share: a cache on both backends, the bound of GPU attention against the CPU's, the format cases.
 *
 * @module
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  type Backend,
  type CacheFormat,
  type CacheOptions,
  type KVCache,
  openBackend,
  type Sequence,
} from "../src/mod.ts";
import { maxDiff } from "./_multitoken.ts";

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

/**
 * GPU attention (fp32 dot products and online softmax) against the CPU's double: a score of D
 * products carries |err| <= D * 2^-24 * sum|q_d k_d| (~1e-4 here), which moves each weight by about
 * that much relative, and the output inherits it. The tensor-core kernel (2-bit caches) adds q.s
 * rounded to int8 hi/lo planes (<= 2^-15 of max |q_c s_c| per term) and p, p.s (codebook: p times the
 * centroid differences, formed in fp16) rounded to fp16 (2^-11 relative per weight, twice for the
 * codebook differences, random across tokens, ~5e-4 on a row): 2e-3 of the output's scale (want's
 * largest magnitude) is still a safe bound.
 */
export function assertNearGpu(got: ArrayLike<number>, want: ArrayLike<number>, msg: string): void {
  let scale = 0;
  for (let i = 0; i < want.length; i++) scale = Math.max(scale, Math.abs(want[i]));
  const worst = maxDiff(got, want); // throws where the lengths differ
  assert.ok(worst <= 2e-3 * scale, `${msg}: max |diff| ${worst} > 2e-3 x ${scale}`);
}

/** A cache format case of the GPU suites: `exact` (pages and read() bit for bit against the CPU
 * build) unless keys or values are a codebook, whose fit on the GPU may round differently. */
export interface GpuFormat {
  name: string;
  keys: CacheFormat;
  values: CacheFormat;
  exact: boolean;
}

/** The {@link GpuFormat} named `name`. */
export function gpuFormat(name: string, keys: CacheFormat, values: CacheFormat): GpuFormat {
  const codebook = (f: CacheFormat) => "kind" in f && f.kind === "codebook";
  return { name, keys, values, exact: !codebook(keys) && !codebook(values) };
}

/** The same cache on both backends (the CPU reference and `gpu`), with sequences added in pairs:
 * `cs[i]` and `gs[i]` are sequence i on each. Disposes both caches. */
export class CachePair {
  readonly c: KVCache;
  readonly g: KVCache;
  readonly cs: Sequence[] = [];
  readonly gs: Sequence[] = [];
  constructor(readonly gpu: Backend, readonly opts: CacheOptions) {
    this.c = cpu.createCache(opts);
    this.g = gpu.createCache(opts);
  }
  add(): number {
    this.cs.push(this.c.createSequence());
    this.gs.push(this.g.createSequence());
    return this.cs.length - 1;
  }
  dispose(): void {
    this.c.dispose();
    this.g.dispose();
  }
  [Symbol.dispose](): void {
    this.dispose();
  }
}
