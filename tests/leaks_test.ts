/**
 * No leaks: many create/dispose cycles of tensors, caches and decode batches leave host memory flat (and device
 * memory flat on CUDA, from kivi_mem_info = cudaMemGetInfo), and the backend holds no native
 * reference afterwards. The finalizers (objects dropped without dispose) are tested in
 * backend_test.ts, under both runtimes.
 *
 * What is measured, after forced collections: host RSS, split into the JS engine's heap (its
 * reserved size, `heapTotal`, and what live objects use of it, `heapUsed`) and the rest (RSS minus
 * heapTotal: native memory, where a C allocation the library forgot would stay).
 *
 * Tolerances, from what a leak would cost: every cycle allocates a native handle plus its buffer (a
 * 4 KiB tensor; a cache's pool, windows and tables, over 40 KiB) and a JS wrapper, so leaking even
 * the smallest native struct or wrapper (about 200 bytes) in each of 10^5 cycles adds 20 MB. Memory
 * moves by a few MiB for reasons of its own (allocator arenas, JIT code), so RSS, native memory
 * and the JS heap in use must each grow by less than 12 MiB over 10^5 cycles, measured once native
 * memory has settled (warmUp: about 2 x 10^4 cycles under Bun, 5 x 10^5 under Deno, whose V8 takes
 * that long). Device memory has no such noise: cudaMalloc works in 2 MiB granules, so it must come
 * back within 4 MiB.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import type { Backend, DeviceTensor, KVCache, Sequence } from "../src/mod.ts";
import { openBackend, Rng } from "../src/mod.ts";
import { gpuDescribe } from "./_gpu.ts";

const MiB = 2 ** 20;
const isDeno = (globalThis as { Deno?: unknown }).Deno !== undefined;
const BOUND = 12 * MiB;

function collect(): void {
  const g = globalThis as { Bun?: { gc(force: boolean): void }; gc?: () => void };
  if (g.Bun) g.Bun.gc(true);
  else g.gc?.();
}

/** Yields to the event loop: V8 keeps the target of every WeakRef created in a job (the backend
 * tracks its children by WeakRef) alive until the job ends, so a synchronous loop of 10^5 cycles
 * would hold 10^5 disposed JS wrappers (about 230 bytes each, no native memory) until it yields. */
const tick = () => new Promise((r) => setTimeout(r, 0));

interface Mem {
  rss: number;
  native: number; // rss - heapTotal
  heapUsed: number;
}

async function mem(): Promise<Mem> {
  for (let i = 0; i < 2; i++) {
    await tick();
    collect();
  }
  const m = process.memoryUsage();
  return { rss: m.rss, native: m.rss - m.heapTotal, heapUsed: m.heapUsed };
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
  run: (kivi: Backend, i: number) => void;
  /** Frees what the cycles share (before the backend's references are counted). */
  done?: (kivi: Backend) => void;
}

/** The cache, sequence and step buffers the batch cycles share, per backend. */
const batchWorlds = new WeakMap<
  Backend,
  { cache: KVCache; seq: Sequence; bufs: Record<string, DeviceTensor> }
>();
function batchWorld(kivi: Backend) {
  let w = batchWorlds.get(kivi);
  if (w === undefined) {
    const cache = kivi.createCache({
      layers: 1,
      kvHeads: 1,
      queryHeads: 2,
      headDim: 64,
      pageTokens: 32,
      residual: 32,
      maxPages: 64,
      maxSequences: 1,
    });
    const seq = cache.createSequence();
    const [k, v] = [data.subarray(0, 4 * 64), data.subarray(4 * 64, 8 * 64)];
    if (kivi.kind === "cpu") seq.append(k, v);
    else {
      using kd = kivi.upload(k), vd = kivi.upload(v);
      seq.append(kd, vd);
    }
    const bufs = {
      q: kivi.upload(data.subarray(0, 128)),
      out: kivi.alloc([1, 2, 64], "f32"),
      k: kivi.upload(data.subarray(128, 192)),
      v: kivi.upload(data.subarray(192, 256)),
    };
    w = { cache, seq, bufs };
    batchWorlds.set(kivi, w);
  }
  return w;
}

const data = new Rng(20261129).normals(2048); // seeded values, never zeros

const CYCLES: Cycle[] = [
  {
    name: "tensors (upload 4 KiB, read one back now and then, dispose)",
    cycles: 100_000,
    run: (kivi, i) => {
      const t = kivi.upload(data.subarray(0, 1024), { shape: [32, 32] });
      if (i % 1000 === 0) assert.equal(t.readSync()[i % 1024], data[i % 1024]);
      t.dispose();
    },
  },
  {
    name: "caches (create, every 100th with a sequence of 16 tokens, dispose)",
    cycles: 100_000,
    run: (kivi, i) => {
      const cache = kivi.createCache({
        layers: 1,
        kvHeads: 1,
        queryHeads: 1,
        headDim: 64,
        pageTokens: 32,
        residual: 32,
        maxPages: 2,
        maxSequences: 1,
      });
      if (i % 100 === 0) {
        const seq = cache.createSequence();
        const [k, v] = [data.subarray(0, 16 * 64), data.subarray(16 * 64, 32 * 64)];
        if (kivi.kind === "cpu") seq.append(k, v);
        else {
          using kd = kivi.upload(k, { shape: [16, 1, 64] }),
            vd = kivi.upload(v, { shape: [16, 1, 64] });
          seq.append(kd, vd);
        }
        assert.equal(seq.length(0), 16);
      }
      cache.dispose();
    },
  },
  {
    name:
      "decode batches (made over a sequence with q, out, k and v; every 1000th appends and attends; disposed)",
    cycles: 100_000,
    run: (kivi, i) => {
      const w = batchWorld(kivi);
      using b = w.cache.batch([w.seq], w.bufs);
      if (i % 1000 === 0) {
        b.append(0);
        b.attend(0);
        b.synchronizeSync();
      }
    },
    done: (kivi) => {
      const w = batchWorlds.get(kivi);
      if (!w) return;
      for (const t of Object.values(w.bufs)) t.dispose();
      w.cache.dispose();
      batchWorlds.delete(kivi);
    },
  },
];

/** Runs chunks of cycles until native memory stops rising (two chunks in a row under 1 MiB), at
 * most 8 x cycles: allocator arenas and JIT code grow for a while, a leak never stops rising. Under
 * Deno in chunks of a whole `cycles`: V8's memory outside its heap grows for the first 3-4 x 10^5
 * FFI-heavy cycles, and forcing a collection every few 10^4 cycles makes it shrink and grow again
 * instead of settling (measured in `deno test`, 10^5 tensor cycles a chunk: RSS - heapTotal 66.5,
 * 71.4, 73.1, 73.7, 74.4, 74.3, 74.5, then within 0.3 MiB for 5 x 10^5 more). */
async function warmUp(kivi: Backend, c: Cycle): Promise<number> {
  const chunk = isDeno ? c.cycles : c.cycles / 10;
  let done = 0, calm = 0, prev = (await mem()).native;
  while (done < 8 * c.cycles && calm < 2) {
    await runCycles(kivi, c, done, chunk);
    done += chunk;
    const now = (await mem()).native;
    calm = now - prev < MiB ? calm + 1 : 0;
    prev = now;
  }
  return done;
}

async function measure(kivi: Backend, c: Cycle, device: boolean) {
  const warm = await warmUp(kivi, c);
  const m0 = await mem(), d0 = device ? kivi.memInfo().free : 0;
  const t0 = performance.now();
  await runCycles(kivi, c, 0, c.cycles);
  const ms = performance.now() - t0;
  const m1 = await mem(), d1 = device ? kivi.memInfo().free : 0;
  return { m0, m1, deviceGrowth: d0 - d1, ms, warm };
}

const mib = (x: number) => (x / MiB).toFixed(1);
const grew = (a: number, b: number) => `${mib(a)} -> ${mib(b)} MiB`;

function leakSuite(name: string, open: () => Promise<Backend>, device: boolean) {
  for (const c of CYCLES) {
    it(
      `${name}: ${c.cycles} cycles of ${c.name} keep host memory flat${
        device ? " and device memory flat" : ""
      }`,
      { timeout: 600_000 },
      async () => {
        const kivi = await open();
        try {
          let r = await measure(kivi, c, device);
          // A leak grows in every window; a window that grew past the bound under a loaded machine
          // (the allocator or the collector catching up once) is measured once more, and the second
          // window decides.
          if (
            r.m1.native - r.m0.native >= BOUND || r.m1.heapUsed - r.m0.heapUsed >= BOUND ||
            r.m1.rss - r.m0.rss >= BOUND
          ) {
            console.log(
              `leaks: ${name}, ${c.cycles} x ${c.name}: grew in the first window, measured again`,
            );
            r = await measure(kivi, c, device);
          }
          const { m0, m1, ms, warm, deviceGrowth } = r;
          const fig =
            `after ${warm} warm-up cycles: RSS ${grew(m0.rss, m1.rss)}, native (RSS - heapTotal) ${
              grew(m0.native, m1.native)
            }, ` +
            `JS heap used ${grew(m0.heapUsed, m1.heapUsed)}; ${
              (ms * 1000 / c.cycles).toFixed(1)
            } µs a cycle` +
            (device ? `; device free memory -${mib(deviceGrowth)} MiB` : "");
          console.log(`leaks: ${name}, ${c.cycles} x ${c.name}: ${fig}`);
          assert.ok(
            m1.native - m0.native < BOUND,
            `native memory grew by ${mib(BOUND)} MiB or more: ${fig}`,
          );
          assert.ok(
            m1.heapUsed - m0.heapUsed < BOUND,
            `the JS heap in use grew by ${mib(BOUND)} MiB or more: ${fig}`,
          );
          assert.ok(m1.rss - m0.rss < BOUND, `host RSS grew by ${mib(BOUND)} MiB or more: ${fig}`);
          if (device) assert.ok(deviceGrowth < 4 * MiB, `device memory not returned: ${fig}`);
          c.done?.(kivi);
          assert.equal(kivi.liveTensors, 0, "no tensor left alive");
          assert.equal(kivi._nativeRefs, 1, "the backend holds no native reference but its own");
        } finally {
          kivi.dispose();
        }
      },
    );
  }
}

describe("no leaks on the CPU backend", () => {
  leakSuite("cpu", () => openBackend({ prefer: "cpu" }), false);
});

gpuDescribe("no leaks on the CUDA backend", () => {
  leakSuite("cuda", () => openBackend({ prefer: "cuda" }), true);
});
