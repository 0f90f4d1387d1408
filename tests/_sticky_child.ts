/**
 * The child process of tests/sticky_gpu_test.ts: a sticky CUDA fault ruins CUDA for the whole
 * process, so it happens here, never in the test runner. Opens the backend, does a successful
 * round of work, then (mode "fault") provokes the fault through the test-only export and tries
 * every kind of call again; prints one JSON line with what each step gave.
 *
 *   bun tests/_sticky_child.ts <cpu|cuda> <fault|clean> [seed]
 *   deno run -A tests/_sticky_child.ts <cpu|cuda> <fault|clean> [seed]
 *
 * @module
 */
import process from "node:process";
import { type Backend, type DeviceTensor, KiviError, openBackend, Rng } from "../src/mod.ts";

/** What one step gave: ok, or the error's code and message. */
export interface Step {
  op: string;
  ok: boolean;
  code?: string;
  message?: string;
}

/** The JSON line the child prints. */
export interface ChildReport {
  kind: string;
  before: Step[];
  fault?: Step;
  after: Step[];
  disposed: Step;
}

async function step(op: string, fn: () => unknown): Promise<Step> {
  try {
    await fn();
    return { op, ok: true };
  } catch (e) {
    return e instanceof KiviError
      ? { op, ok: false, code: e.code, message: e.message }
      : { op, ok: false, code: (e as Error).name, message: (e as Error).message };
  }
}

const CACHE = {
  layers: 1,
  kvHeads: 2,
  queryHeads: 4,
  headDim: 64,
  pageTokens: 32,
  residual: 32,
  maxPages: 8,
} as const;

/** One of each kind of call: upload, quantize, read, cache create / append / attend. */
async function work(
  kivi: Backend,
  rng: Rng,
  cache: ReturnType<Backend["createCache"]> | undefined,
): Promise<Step[]> {
  const steps: Step[] = [];
  const tokens = 96, row = CACHE.kvHeads * CACHE.headDim;
  let t: DeviceTensor<"f32"> | undefined;
  steps.push(
    await step(
      "upload",
      () => (t = kivi.upload(rng.normals(tokens * row), { shape: [tokens, row] })),
    ),
  );
  steps.push(
    await step("quantize", () => {
      const x = t ?? kivi.upload(rng.normals(tokens * row), { shape: [tokens, row] });
      return kivi.quantize(x, { axis: "token", format: { kind: "uniform", bits: 2, group: 32 } });
    }),
  );
  steps.push(await step("read", () => (t ?? kivi.alloc([4], "f32")).read()));
  steps.push(await step("synchronize", () => kivi.synchronize()));
  steps.push(await step("createCache", () => kivi.createCache(CACHE).dispose()));
  if (cache) {
    steps.push(
      await step("append", () => {
        const seq = cache.sequences[0];
        const k = kivi.upload(rng.normals(8 * row), { shape: [8, CACHE.kvHeads, CACHE.headDim] });
        seq.append(k, k);
      }),
    );
    steps.push(
      await step("attend", async () => {
        const q = kivi.upload(rng.normals(CACHE.queryHeads * CACHE.headDim), {
          shape: [1, CACHE.queryHeads, CACHE.headDim],
        });
        const out = cache.attend(0, [cache.sequences[0]], q) as DeviceTensor;
        const o = (await out.read()) as Float32Array;
        if (!o.every(Number.isFinite)) throw new Error("attention gave a non-finite value");
      }),
    );
  }
  return steps;
}

async function main(kind: "cpu" | "cuda", mode: string, seed: number): Promise<ChildReport> {
  const rng = new Rng(seed);
  const kivi = await openBackend({ prefer: kind });
  const cache = kivi.createCache(CACHE);
  const seq = cache.createSequence();
  const pre = kivi.upload(rng.normals(40 * CACHE.kvHeads * CACHE.headDim), {
    shape: [40, CACHE.kvHeads, CACHE.headDim],
  });
  seq.append(pre, pre);
  const report: ChildReport = {
    kind: kivi.kind,
    before: await work(kivi, rng, cache),
    after: [],
    disposed: { op: "dispose", ok: true },
  };
  if (mode === "fault") {
    report.fault = await step("debugFault", () => kivi._debugFault());
    report.after = await work(kivi, rng, cache);
  }
  report.disposed = await step("dispose", () => kivi.dispose());
  return report;
}

if (import.meta.main) {
  const [kind, mode, seed] = process.argv.slice(2);
  if ((kind !== "cpu" && kind !== "cuda") || (mode !== "fault" && mode !== "clean")) {
    console.error("usage: _sticky_child.ts <cpu|cuda> <fault|clean> [seed]");
    process.exit(2);
  }
  const report = await main(kind, mode, Number(seed ?? 1));
  console.log(JSON.stringify(report));
  process.exit(0);
}
