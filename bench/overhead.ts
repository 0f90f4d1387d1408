/**
 * What a cache call costs from TypeScript above the library's own time: the argument checks, the
 * handles, the FFI crossing and any allocation, per call, under the runtime it runs in.
 *
 *   bun bench/overhead.ts [--backend auto|cpu|cuda] [--repeats 9] [--ms 25] [--out bench/results]
 *   deno run -A bench/overhead.ts ...
 *
 * attend: the library's time is `kivi_cache_bench_attend` (the same call in a C loop, trusted q);
 * append: a raw FFI loop of `kivi_cache_append` on a twin cache built with the same config (the
 * FFI crossing itself is then inside the "library" figure, about 10 ns under Bun and 0.1-0.2 µs under
 * Deno). Each repeat times the library loop and the TypeScript loop back to back; the overhead is the
 * median over repeats of their difference. Small caches keep the library's own time (and its noise)
 * small next to the overhead. On CUDA each loop ends with a synchronize, so a call that blocks the
 * host shows as the time the device needs.
 *
 * @module
 */
import process from "node:process";
import { type DeviceTensor, type KVCache, openBackend, Rng, type Sequence } from "../src/mod.ts";
import { configArray } from "../src/cache.ts";
import { median, parseArgs, type Row, section, writeSection } from "./_report.ts";

const args = parseArgs(process.argv.slice(2), ["backend", "repeats", "ms", "out"], ["write"]);
using kivi = await openBackend({
  prefer: (args.get("backend") ?? "auto") as "auto" | "cpu" | "cuda",
});
const onGpu = kivi.kind === "cuda";
const repeats = Number(args.get("repeats") ?? 9);
const budgetMs = Number(args.get("ms") ?? 25);
const { lib, ctx } = kivi._native("bench");
const dt = onGpu ? "f16" : "f32";

interface Case {
  name: string;
  batch: number;
  kvHeads: number;
  queryHeads: number;
  headDim: 64 | 128;
  context: number;
}
const cases: Case[] = [
  {
    name: "1 seq x 16, 8/2 heads, D64",
    batch: 1,
    kvHeads: 2,
    queryHeads: 8,
    headDim: 64,
    context: 16,
  },
  {
    name: "8 seqs x 16, 8/2 heads, D64",
    batch: 8,
    kvHeads: 2,
    queryHeads: 8,
    headDim: 64,
    context: 16,
  },
  {
    name: "1 seq x 16, 32/8 heads, D128",
    batch: 1,
    kvHeads: 8,
    queryHeads: 32,
    headDim: 128,
    context: 16,
  },
];

const sync = () => {
  if (onGpu) kivi.synchronizeSync();
};

/** µs per call of `n` calls of fn (then a synchronize on CUDA). */
function perCall(n: number, fn: () => void): number {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) fn();
  sync();
  return ((performance.now() - t0) / n) * 1e3;
}

/** Calls per repeat so that one TS loop takes about budgetMs. */
function calls(fn: () => void): number {
  const us = perCall(50, fn);
  return Math.max(50, Math.min(50000, Math.round((budgetMs * 1e3) / Math.max(us, 0.05))));
}

function tensor(rng: Rng, n: number): DeviceTensor {
  const host = onGpu ? new Float16Array(n) : new Float32Array(n);
  for (let i = 0; i < n; i++) host[i] = rng.normal();
  return kivi.upload(host);
}

const rows: Row[] = [];
function record(c: Case, call: string, lib: number[], ts: number[]) {
  const diff = ts.map((t, i) => t - lib[i]);
  const row: Row = {
    case: c.name,
    call,
    "library us": median(lib),
    "TS us": median(ts),
    "overhead us": median(diff),
  };
  rows.push(row);
  console.log(
    `${c.name.padEnd(30)} ${call.padEnd(50)} library ${median(lib).toFixed(2).padStart(8)} us  TS ${
      median(ts).toFixed(2).padStart(8)
    } us  overhead ${median(diff).toFixed(2).padStart(6)} us`,
  );
}

function newCache(c: Case, maxPages: number): KVCache {
  return kivi.createCache({
    layers: 2,
    kvHeads: c.kvHeads,
    queryHeads: c.queryHeads,
    headDim: c.headDim,
    pageTokens: 64,
    residual: 128,
    keys: { kind: "uniform", bits: 2, group: 32 }, // cheap flushes: the library's own time (and noise) stays small
    values: { kind: "uniform", bits: 2, group: 32 },
    maxPages,
    maxSequences: c.batch + 1,
  });
}

console.log(
  `kivi bench/overhead: ${kivi.deviceName} (${kivi.kind}, ${kivi.runtime}), ${repeats} repeats of ~${budgetMs} ms`,
);
for (const c of cases) {
  const rng = new Rng(c.batch * 131 + c.queryHeads * 7 + c.headDim);
  const row = c.kvHeads * c.headDim, qn = c.batch * c.queryHeads * c.headDim;
  // ---------------------------------------------------------------- attend
  {
    using cache = newCache(c, c.batch * 4);
    const prefill = tensor(rng, c.context * row);
    const seqs: Sequence[] = [];
    for (let b = 0; b < c.batch; b++) {
      const s = cache.createSequence();
      s.append(prefill, prefill, { layer: 0, trusted: true });
      seqs.push(s);
    }
    const q = tensor(rng, qn), out = kivi.alloc([qn], dt);
    const qHost = onGpu
      ? new Float16Array(q.readSync() as Float16Array)
      : new Float32Array(q.readSync() as Float32Array);
    const outHost = onGpu ? new Float16Array(qn) : new Float32Array(qn);
    const variants: [string, () => void][] = [
      [
        "attend: host q, host out, trusted",
        () => void cache.attend(0, seqs, qHost, { out: outHost, dtype: dt, trusted: true }),
      ],
      [
        "attend: tensor q, tensor out, trusted",
        () => void cache.attend(0, seqs, q, { out, dtype: dt, trusted: true }),
      ],
      [
        "attend: tensor q, out allocated per call, trusted",
        () => (cache.attend(0, seqs, q, { dtype: dt, trusted: true }) as DeviceTensor).dispose(),
      ],
      [
        "attend: tensor q, tensor out, q scanned",
        () => void cache.attend(0, seqs, q, { out, dtype: dt }),
      ],
    ];
    const batchOf = (cache as unknown as {
      batch?: (s: Sequence[], o: object) => { attend(l: number): void; dispose(): void };
    }).batch;
    const batches: { dispose(): void }[] = [];
    if (typeof batchOf === "function") {
      const trusted = batchOf.call(cache, seqs, { q, out, trusted: true });
      const checked = batchOf.call(cache, seqs, { q, out });
      batches.push(trusted, checked);
      variants.push(["batch.attend(layer), trusted", () => trusted.attend(0)]);
      variants.push(["batch.attend(layer), q checked on the device", () => checked.attend(0)]);
    }
    const n = variants.map(([, f]) => calls(f));
    const nLib = calls(() => cache.benchAttend(0, seqs, q, { iters: 1 }));
    const lib: number[][] = variants.map(() => []), ts: number[][] = variants.map(() => []);
    for (let r = 0; r < repeats; r++) {
      variants.forEach(([, f], i) => {
        lib[i].push(cache.benchAttend(0, seqs, q, { iters: Math.max(n[i], nLib) }) * 1e3);
        ts[i].push(perCall(n[i], f));
      });
    }
    variants.forEach(([name], i) => record(c, name, lib[i], ts[i]));
    for (const b of batches) b.dispose();
    for (const t of [prefill, q, out]) t.dispose();
  }
  // ---------------------------------------------------------------- append (one token, one layer)
  {
    const n = 2000, maxPages = c.batch * (Math.ceil((n + c.context) / 64) + 2);
    using cache = newCache(c, maxPages);
    const prefill = tensor(rng, c.context * row);
    const k1 = tensor(rng, row), v1 = tensor(rng, row);
    const kb = tensor(rng, c.batch * row), vb = tensor(rng, c.batch * row);
    const k1Host = onGpu
      ? new Float16Array(k1.readSync() as Float16Array)
      : new Float32Array(k1.readSync() as Float32Array);
    // The twin: a native cache of the same config, driven by raw FFI calls with prepared pointers.
    const cfg = configArray(cache.config);
    const h = new BigUint64Array(1);
    kivi._check(
      "kivi_cache_create",
      lib.call("kivi_cache_create", ctx, lib.ptr(cfg), cfg.length, lib.ptr(h)),
    );
    const twin = lib.pointerAt(h, 0);
    const id = new Int32Array(1);
    const pk = k1.pointer("bench"), pv = v1.pointer("bench"), pp = prefill.pointer("bench");
    const code = onGpu ? 1 : 0;
    const fresh = () => {
      for (const s of [...cache.sequences]) s.free();
      const s = cache.createSequence();
      s.append(prefill, prefill, { layer: 0, trusted: true });
      return s;
    };
    // The twin holds as many sequences as the batch (ids[b]); `raw` appends to the first one.
    const ids = new Int32Array(c.batch).fill(-1);
    const freshTwin = () => {
      for (let b = 0; b < c.batch; b++) {
        if (ids[b] >= 0) lib.call("kivi_cache_seq_free", twin, ids[b]);
        kivi._check("kivi_cache_seq_create", lib.call("kivi_cache_seq_create", twin, lib.ptr(id)));
        ids[b] = id[0];
        kivi._check(
          "kivi_cache_append",
          lib.call("kivi_cache_append", twin, ids[b], 0, pp, pp, code, c.context, 1),
        );
      }
    };
    const raw = () => void lib.call("kivi_cache_append", twin, ids[0], 0, pk, pv, code, 1, 1);
    const variants: [string, (s: Sequence) => () => void][] = [
      [
        "seq.append: tensors, one layer, trusted",
        (s) => () => s.append(k1, v1, { layer: 0, trusted: true }),
      ],
      ["seq.append: tensors, one layer, scanned", (s) => () => s.append(k1, v1, { layer: 0 })],
      [
        "seq.append: host arrays, one layer, scanned",
        (s) => () => s.append(k1Host, k1Host, { layer: 0 }),
      ],
    ];
    const lib1: number[][] = variants.map(() => []), ts1: number[][] = variants.map(() => []);
    for (let r = 0; r < repeats; r++) {
      variants.forEach(([, make], i) => {
        freshTwin();
        lib1[i].push(perCall(n, raw));
        const f = make(fresh());
        ts1[i].push(perCall(n, f));
      });
    }
    if (c.batch === 1) variants.forEach(([name], i) => record(c, name, lib1[i], ts1[i]));
    const batchOf = (cache as unknown as {
      batch?: (s: Sequence[], o: object) => { append(l: number): void; dispose(): void };
    }).batch;
    if (typeof batchOf === "function") {
      // One call appends a token to each of the batch's sequences; the library figure is the raw
      // per-sequence append loop of the twin (one kivi_cache_append a sequence: batch FFI crossings).
      const modes: [string, boolean][] = [["batch.append(layer), trusted", true], [
        "batch.append(layer), k/v checked on the device",
        false,
      ]];
      for (const [name, trusted] of modes) {
        const lib2: number[] = [], ts2: number[] = [];
        for (let r = 0; r < repeats; r++) {
          for (const s of [...cache.sequences]) s.free();
          const seqs = Array.from({ length: c.batch }, () => {
            const s = cache.createSequence();
            s.append(prefill, prefill, { layer: 0, trusted: true });
            return s;
          });
          freshTwin();
          const m = Math.floor(n / c.batch);
          lib2.push(perCall(m, () => {
            for (let b = 0; b < c.batch; b++) {
              lib.call("kivi_cache_append", twin, ids[b], 0, pk, pv, code, 1, 1);
            }
          }));
          const batch = batchOf.call(cache, seqs, { k: kb, v: vb, trusted });
          ts2.push(perCall(m, () => batch.append(0)));
          batch.dispose();
        }
        record(c, name, lib2, ts2);
      }
    }
    lib.call("kivi_cache_destroy", twin);
    for (const t of [prefill, k1, v1, kb, vb]) t.dispose();
  }
}

const notes =
  `cost of a cache call from TypeScript (${kivi.runtime}) above the library's own time, µs per call, median over ` +
  `${repeats} repeats of the paired difference; attend's library time is kivi_cache_bench_attend (a C loop of the same ` +
  `call, trusted), append's a raw FFI loop of kivi_cache_append on a twin cache (FFI crossing included; for a batch, ` +
  `one call a sequence of the batch). The checked batch rows include the library's own scan of q or k/v.`;
const result = section(
  kivi,
  kivi.copyBandwidth(onGpu ? 1 << 30 : 64 << 20, onGpu ? 20 : 5),
  notes,
  rows,
);
if (args.has("out") || args.has("write")) {
  const path = writeSection(`overhead-${kivi.runtime}`, result, args.get("out"));
  console.log(`wrote ${path}`);
}
