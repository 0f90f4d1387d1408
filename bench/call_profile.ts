/**
 * Where the time of a cache call from TypeScript goes, phase by phase: each step the call path takes
 * (reading options, brand checks, typed-array views, handles, allocations, pointers, the FFI crossing)
 * timed on its own in a loop, median of 7 runs, under the runtime it runs in. The phases are the
 * helpers the call paths use, called the way `cache.attend` / `seq.append` / `seq.length` call them
 * (their private steps are reproduced with the same helpers).
 *
 *   bun bench/call_profile.ts [--backend cpu] [--n 200000]
 *   deno run -A bench/call_profile.ts ...
 *
 * @module
 */
import process from "node:process";
import { DeviceTensor, openBackend } from "../src/mod.ts";
import { hostView, plainView, readOptions } from "../src/_checks.ts";
import { Staging } from "../src/_staging.ts";
import { parseArgs } from "./_report.ts";

const args = parseArgs(process.argv.slice(2), ["backend", "n"]);
using kivi = await openBackend({
  prefer: (args.get("backend") ?? "cpu") as "auto" | "cpu" | "cuda",
});
const n = Number(args.get("n") ?? 200000);
const { lib, ctx } = kivi._native("profile");
let sink: unknown;

/** ns per call of fn: median of 7 runs of n calls. */
function ns(fn: () => void, calls = n): number {
  const runs: number[] = [];
  for (let r = 0; r < 7; r++) {
    const t0 = performance.now();
    for (let i = 0; i < calls; i++) fn();
    runs.push(((performance.now() - t0) / calls) * 1e6);
  }
  return runs.sort((a, b) => a - b)[3];
}

const q = new Float32Array(8 * 64), out = new Float32Array(8 * 64);
const qt = kivi.upload(q), ot = kivi.alloc([q.length], "f32");
using cache = kivi.createCache({ layers: 1, kvHeads: 2, queryHeads: 8, headDim: 64, maxPages: 8 });
using seq = cache.createSequence();
seq.append(new Float32Array(2 * 64).fill(0.5), new Float32Array(2 * 64).fill(0.25));
const seqs = [seq];
const ids = new Int32Array(1);
const pq = lib.ptr(q);
const len = new BigInt64Array(1);

const phases: [string, () => void][] = [
  ["empty loop", () => {
    sink = 0;
  }],
  ["readOptions: 5 keys (attend's options)", () => {
    sink = readOptions("options", { out: ot, trusted: true }, [
      "scale",
      "dtype",
      "qDtype",
      "out",
      "trusted",
    ]);
  }],
  ["hostView(q): intrinsic %TypedArray% getters", () => {
    sink = hostView("q", q);
  }],
  ["plainView(hostView(q)): a fresh plain view", () => {
    sink = plainView(hostView("q", q)!);
  }],
  ["DeviceTensor._facts(t): brand check + facts object", () => {
    sink = DeviceTensor._facts(qt);
  }],
  ["facts.pointer(op): disposed check", () => {
    sink = qt.pointer("attend");
  }],
  ["Int32Array.from(seqs, liveId): the id array", () => {
    sink = Int32Array.from(seqs, () => 0);
  }],
  ["new BigInt64Array(1): an out-parameter", () => {
    sink = new BigInt64Array(1);
  }],
  ["lib.ptr(typed array): its address", () => {
    sink = lib.ptr(ids);
  }],
  ["new Staging + dispose (using)", () => {
    using s = new Staging(kivi, "attend");
    sink = s;
  }],
  ["backend._native(op): live check + handles object", () => {
    sink = kivi._native("attend");
  }],
  ["alloc + dispose of an out tensor (per call)", () => {
    kivi.alloc([8, 8, 64], "f32").dispose();
  }],
  ["FFI: kivi_abi_version() (no arguments)", () => {
    sink = lib.call("kivi_abi_version");
  }],
  ["FFI: kivi_ctx_query(ctx, ptr) (2 pointers)", () => {
    sink = lib.call("kivi_ctx_query", ctx, pq);
  }],
  ["FFI: kivi_mem_copy(ctx, ptr, ptr, 0) (3 pointers, u64)", () => {
    sink = lib.call("kivi_mem_copy", ctx, pq, pq, 0);
  }],
  ["Number(BigInt64Array[0])", () => {
    sink = Number(len[0]);
  }],
];
const calls: [string, () => void][] = [
  ["cache.attend(0, [seq], q tensor, { out tensor, trusted })", () => {
    sink = cache.attend(0, seqs, qt, { out: ot, trusted: true });
  }],
  ["cache.attend(0, [seq], q host, { out host, trusted })", () => {
    sink = cache.attend(0, seqs, q, { out, trusted: true });
  }],
  ["cache.attend(0, [seq], q tensor, { trusted }) (allocates out)", () => {
    (cache.attend(0, seqs, qt, { trusted: true }) as DeviceTensor).dispose();
  }],
  ["seq.length(0)", () => {
    sink = seq.length(0);
  }],
];
// The steady-state path: a decode batch over the same sequence and tensors.
const batch = cache.batch(seqs, { q: qt, out: ot, trusted: true });
calls.push(["batch.attend(0), trusted (q, out made once)", () => batch.attend(0)]);
const bound = lib.fn("kivi_abi_version");
phases.push(["FFI: kivi_abi_version() bound once (lib.fn, as the hot paths call)", () => {
  sink = bound();
}]);

console.log(
  `kivi bench/call_profile: ${kivi.kind} build, ${kivi.runtime}; ns per step (median of 7 x ${n})`,
);
console.log(`| step | ns (${kivi.runtime}) |\n| --- | --- |`);
for (const [name, fn] of phases) console.log(`| ${name} | ${ns(fn).toFixed(0)} |`);
const libNs = cache.benchAttend(0, seqs, qt, { iters: 20000 }) * 1e6;
console.log(
  `| library alone: kivi_cache_bench_attend, per call (the attend calls below include it) | ${
    libNs.toFixed(0)
  } |`,
);
for (const [name, fn] of calls) {
  console.log(`| whole call: ${name} | ${ns(fn, Math.min(n, 50000)).toFixed(0)} |`);
}
void sink;
batch.dispose();
qt.dispose();
ot.dispose();
