/**
 * No leaks: many create/dispose cycles of tensors and caches leave host RSS flat (and device memory
 * flat on CUDA, from kivi_mem_info = cudaMemGetInfo), and the backend holds no native reference
 * afterwards. The finalizers (objects dropped without dispose) are tested in backend_test.ts.
 *
 * Tolerances, from what a leak would cost: every cycle allocates at least a native handle plus its
 * buffer (a 4 KiB tensor; a cache's pool, windows and tables, over 40 KiB), so leaking even the
 * smallest native struct (about 200 bytes) in each of N cycles grows RSS by N x 200 bytes: 20 MB
 * over 10^5 cycles. RSS may move by a few MiB for reasons of its own (allocator arenas, JIT code,
 * the JS heap between collections), so the bound is 12 MiB for 10^5 cycles, measured once RSS
 * has stopped rising (warmUp) and after a forced collection where the runtime allows one. Caches get the same
 * 10^5 cycles and bound (a leaked cache is over 40 KiB: 4 GB). Device memory has no such noise: cudaMalloc works in 2 MiB
 * granules, so it must come back within 4 MiB.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { type Backend, openBackend, Rng } from "../src/mod.ts";
import { gpuDescribe } from "./_gpu.ts";

const MiB = 2 ** 20;
const isDeno = (globalThis as { Deno?: unknown }).Deno !== undefined;
/** Deno's RSS keeps rising for the first few 10^5 FFI-heavy cycles before it settles (measured with
 * 10^6 tensor cycles: 95 -> 139.2 MiB over the first 4 x 10^5, then 139.2 -> 139.4 MiB over the
 * next 4 x 10^5, its JS heap flat at 8 MiB throughout), and a warm-up cannot tell where it settles,
 * so under Deno the bound is 8x looser: it still catches a leaked buffer (4 KiB a tensor: 400 MB over
 * 10^5 cycles; over 40 KiB a cache), while Bun's bound, over the same library and TS code, catches
 * a leaked handle. */
const runtimeSlack = isDeno ? 8 : 1;

function collect(): void {
  const g = globalThis as { Bun?: { gc(force: boolean): void }; gc?: () => void };
  if (g.Bun) g.Bun.gc(true);
  else g.gc?.();
}

/** Yields to the event loop: V8 keeps the target of every WeakRef created in a job (the backend
 * tracks its children by WeakRef) alive until the job ends, so a synchronous loop of 10^5 cycles
 * would hold 10^5 disposed JS wrappers (about 230 bytes each, no native memory) until it yields. */
const tick = () => new Promise((r) => setTimeout(r, 0));

async function rss(): Promise<number> {
  await tick();
  collect();
  return process.memoryUsage().rss;
}

/** Cycles [from, from + n) in chunks of 1000, yielding between chunks as a server would. */
async function runCycles(kivi: Backend, c: Cycle, from: number, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    c.run(kivi, from + i);
    if (i % 1000 === 999) await tick();
  }
}

interface Cycle {
  name: string;
  cycles: number;
  rssBound: number;
  run: (kivi: Backend, i: number) => void;
}

const data = new Rng(20261129).normals(2048); // seeded values, never zeros

const CYCLES: Cycle[] = [
  {
    name: "tensors (upload 4 KiB, read one back now and then, dispose)",
    cycles: 100_000,
    rssBound: 12 * MiB,
    run: (kivi, i) => {
      const t = kivi.upload(data.subarray(0, 1024), { shape: [32, 32] });
      if (i % 1000 === 0) assert.equal(t.readSync()[i % 1024], data[i % 1024]);
      t.dispose();
    },
  },
  {
    name: "caches (create, every 100th with a sequence of 16 tokens, dispose)",
    cycles: 100_000,
    rssBound: 12 * MiB,
    run: (kivi, i) => {
      const cache = kivi.createCache({ layers: 1, kvHeads: 1, queryHeads: 1, headDim: 64, pageTokens: 32, residual: 32, maxPages: 2, maxSequences: 1 });
      if (i % 100 === 0) {
        const seq = cache.createSequence();
        const [k, v] = [data.subarray(0, 16 * 64), data.subarray(16 * 64, 32 * 64)];
        if (kivi.kind === "cpu") seq.append(k, v);
        else {
          using kd = kivi.upload(k, { shape: [16, 1, 64] }), vd = kivi.upload(v, { shape: [16, 1, 64] });
          seq.append(kd, vd);
        }
        assert.equal(seq.length(0), 16);
      }
      cache.dispose();
    },
  },
];

/** Runs chunks of cycles until RSS stops rising (two chunks in a row under 1 MiB) or 3 x cycles:
 * the runtime's own pools grow for a while (Deno's RSS rises by some 50 MiB over the first 10^5 cycles,
 * then stays put), a leak never stops rising. */
async function warmUp(kivi: Backend, c: Cycle): Promise<number> {
  const chunk = c.cycles / 10;
  let done = 0, calm = 0, prev = await rss();
  while (done < 3 * c.cycles && calm < 2) {
    await runCycles(kivi, c, done, chunk);
    done += chunk;
    const now = await rss();
    calm = now - prev < MiB ? calm + 1 : 0;
    prev = now;
  }
  return done;
}

async function measure(kivi: Backend, c: Cycle, device: boolean) {
  const warm = await warmUp(kivi, c);
  const r0 = await rss(), d0 = device ? kivi.memInfo().free : 0;
  const t0 = performance.now();
  await runCycles(kivi, c, 0, c.cycles);
  const ms = performance.now() - t0;
  const r1 = await rss(), d1 = device ? kivi.memInfo().free : 0;
  return { rssGrowth: r1 - r0, deviceGrowth: d0 - d1, ms, r0, r1, warm };
}

function leakSuite(name: string, open: () => Promise<Backend>, device: boolean) {
  for (const c of CYCLES) {
    it(`${name}: ${c.cycles} cycles of ${c.name} keep RSS flat (< ${(c.rssBound * runtimeSlack) / MiB} MiB)${device ? " and device memory flat" : ""}`, { timeout: 600_000 }, async () => {
      const kivi = await open();
      try {
        const m = await measure(kivi, c, device);
        const fig = `after ${m.warm} warm-up cycles RSS ${(m.r0 / MiB).toFixed(1)} -> ${(m.r1 / MiB).toFixed(1)} MiB (${(m.rssGrowth / MiB).toFixed(2)} MiB), ${(m.ms * 1000 / c.cycles).toFixed(1)} µs a cycle`;
        console.log(`leaks: ${name}, ${c.cycles} x ${c.name}: ${fig}${device ? `, device free memory -${(m.deviceGrowth / MiB).toFixed(1)} MiB` : ""}`);
        assert.ok(m.rssGrowth < c.rssBound * runtimeSlack, `host RSS grew: ${fig} (bound ${(c.rssBound * runtimeSlack) / MiB} MiB)`);
        if (device) assert.ok(m.deviceGrowth < 4 * MiB, `device memory not returned: ${(m.deviceGrowth / MiB).toFixed(1)} MiB`);
        assert.equal(kivi.liveTensors, 0, "no tensor left alive");
        assert.equal(kivi._nativeRefs, 1, "the backend holds no native reference but its own");
      } finally {
        kivi.dispose();
      }
    });
  }
}

describe("no leaks on the CPU backend", () => {
  leakSuite("cpu", () => openBackend({ prefer: "cpu" }), false);
});

gpuDescribe("no leaks on the CUDA backend", () => {
  leakSuite("cuda", () => openBackend({ prefer: "cuda" }), true);
});
