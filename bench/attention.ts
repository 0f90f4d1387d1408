/**
 * Fused decode attention over the paged cache: time per layer-step of 2-bit caches and of the
 * bits-16 baseline of the same cache and kernels, in the same run.
 *
 *   bun bench/attention.ts [--backend auto|cpu|cuda] [--iters 50] [--out bench/results]
 *                          [--case 8x32768] [--mode 2-bit]   (only cases / modes containing these: profiling)
 *                          [--torch sdpa.json]   (bench/sdpa_reference.py's figures of the same run)
 *                          [--multi]   (also the multiToken section; slow: see below; with
 *                          --case none, that section alone)
 *
 * CUDA: head_dim 128, page 64, R 128; 32 query heads at batch x context in {1x4096, 1x32768, 8x8192,
 * 8x32768, 32x4096}, then 8x32768 with GQA 32/8, 32/4 and 28/4, and 14/2 at head_dim 64 (Llama-3,
 * Mistral, Qwen-style head layouts). Each figure is the median over repeats of `iters` back-to-back
 * launches timed with CUDA events inside the library (kivi_cache_bench_attend), so FFI cost is out of
 * it. The cost of one call from TypeScript is reported on its own, per path, as the time of `iters`
 * calls in a loop ending with a synchronize: `cache.attend` allocating its out (the general path),
 * and a decode batch (`cache.batch`, q and out made once) with q trusted and with q checked on the
 * device; "over step" columns subtract us/step. The one-token append is timed the same way into a
 * second layer: `seq.append` of one sequence (trusted) and `batch.append` of the whole batch
 * (trusted, checked). Sections are named by runtime (`attention` under Bun, `attention-deno`
 * under Deno) so that both land in the results file. GB/s counts the bytes the kernel
 * reads (codes + params + fp16 residual), as a fraction of the copy bandwidth measured in the same
 * run. With --torch, PyTorch fp16 SDPA on the same shapes (timed the same way, same device call) is
 * the outside reference column. CPU: 1x4096 only.
 *
 * --multi adds the `multiToken` section (`attention-multitoken`): cache.attendMulti with qlen query
 * tokens a sequence (speculative decoding's verification: qlen 1 and 8; a 512-token prompt chunk,
 * causal) over 8 x 32768 GQA 32/8 in the default cache format (CPU: 1 x 1024, qlen 1, 8, 64), timed
 * from TypeScript over a loop ending with a synchronize. "of copy" counts the cache's bytes once a
 * step, the ideal of a kernel that reads each page once for all the queries of a sequence (the
 * tensor-core layout does: one launch, rows = query x head, 16 rows a warp from 16 rows a KV head
 * (k_attend_rows), else 8 a CTA). With --torch,
 * PyTorch fp16 SDPA with the same causal mask (bench/sdpa_reference.py) is the reference column.
 *
 * @module
 */
import process from "node:process";
import { readFileSync, writeFileSync } from "node:fs";
import {
  type Backend,
  type CacheFormat,
  type DeviceTensor,
  type KVCache,
  openBackend,
  Rng,
} from "../src/mod.ts";
import { gbps, median, parseArgs, type Row, section, writeSection } from "./_report.ts";

const args = parseArgs(process.argv.slice(2), [
  "backend",
  "iters",
  "page",
  "torch",
  "case",
  "mode",
  "out",
  "json",
], ["multi"]);
using kivi = await openBackend({
  prefer: (args.get("backend") ?? "auto") as "auto" | "cpu" | "cuda",
});
const onGpu = kivi.kind === "cuda";
const iters = Number(args.get("iters") ?? (onGpu ? 50 : 3));
const repeats = onGpu ? 5 : 3;
const pageTokens = Number(args.get("page") ?? 64);

interface Case {
  batch: number;
  context: number;
  qHeads: number;
  kvHeads: number;
  headDim: number;
}
const mha = (batch: number, context: number): Case => ({
  batch,
  context,
  qHeads: 32,
  kvHeads: 32,
  headDim: 128,
});
const cases: Case[] = onGpu
  ? [
    mha(1, 4096),
    mha(1, 32768),
    mha(8, 8192),
    mha(8, 32768),
    mha(32, 4096),
    { batch: 8, context: 32768, qHeads: 32, kvHeads: 8, headDim: 128 },
    { batch: 8, context: 32768, qHeads: 32, kvHeads: 4, headDim: 128 },
    { batch: 8, context: 32768, qHeads: 28, kvHeads: 4, headDim: 128 },
    { batch: 8, context: 32768, qHeads: 14, kvHeads: 2, headDim: 64 },
  ]
  : [mha(1, 4096)];
/** The row label of a case: `8x32768`, `8x32768 GQA 32/8`, `8x32768 GQA 14/2 D64`. */
const label = (c: Case) =>
  `${c.batch}x${c.context}${c.kvHeads !== c.qHeads ? ` GQA ${c.qHeads}/${c.kvHeads}` : ""}${
    c.headDim !== 128 ? ` D${c.headDim}` : ""
  }`;

const uniform = (bits: 2 | 4, group: 32 | 64 | 128 = 32): CacheFormat => ({
  kind: "uniform",
  bits,
  group,
});
const modes: { name: string; keys: CacheFormat; values: CacheFormat }[] = [
  { name: "bits 16 (baseline)", keys: { bits: 16 }, values: { bits: 16 } },
  { name: "uniform 2-bit K+V G32", keys: uniform(2), values: uniform(2) },
  {
    name: "uniform K G32 + codebook V G64",
    keys: uniform(2),
    values: { kind: "codebook", bits: 2, group: 64 },
  },
  { name: "uniform 4-bit K + 2-bit V G32", keys: uniform(4), values: uniform(2) },
];

/** PyTorch fp16 SDPA per case label, from bench/sdpa_reference.py run in the same device call. */
const torch = new Map<string, number>();
if (args.has("torch")) {
  const ref = JSON.parse(readFileSync(args.get("torch")!, "utf8")) as {
    rows: { case: string; us: number }[];
  };
  for (const r of ref.rows) torch.set(r.case, r.us);
}

console.log(
  `kivi bench/attention: ${kivi.deviceName} (${kivi.kind}, ${kivi.runtime}), page ${pageTokens} tokens`,
);
const copy = kivi.copyBandwidth(onGpu ? 1 << 30 : 64 << 20, onGpu ? 20 : 5);
console.log(`copy bandwidth: ${copy.toFixed(1)} GB/s`);

/** Seeded fp16 (GPU) or fp32 (CPU) rows, [tokens][kvHeads][headDim], on the backend. */
function chunk(
  k: Backend,
  rng: Rng,
  tokens: number,
  kvHeads: number,
  headDim: number,
): HostOrTensor {
  const n = tokens * kvHeads * headDim;
  const host = onGpu ? new Float16Array(n) : new Float32Array(n);
  for (let i = 0; i < n; i++) host[i] = rng.normal() * (i % headDim === 7 ? 8 : 1);
  return onGpu ? k.upload(host, { shape: [tokens, kvHeads, headDim] }) : host;
}
type HostOrTensor = Float16Array | Float32Array | DeviceTensor;

function fill(cache: KVCache, c: Case, data: HostOrTensor, step: number) {
  const { batch, context, kvHeads, headDim } = c;
  const seqs = [];
  for (let b = 0; b < batch; b++) {
    const s = cache.createSequence();
    for (let t = 0; t < context; t += step) {
      // The last append may be shorter; appends of the fixed chunk keep generation out of the timing.
      if (context - t >= step) s.append(data, data, { layer: 0, trusted: true });
      else {
        const rest = chunkOf(data, (context - t) * kvHeads * headDim);
        s.append(rest, rest, { layer: 0, trusted: true });
        if (!ArrayBuffer.isView(rest)) (rest as DeviceTensor).dispose();
      }
    }
    seqs.push(s);
  }
  return seqs;
}

function chunkOf(data: HostOrTensor, n: number): HostOrTensor {
  if (ArrayBuffer.isView(data)) return data.subarray(0, n);
  // A fresh tensor holding the first n values (tensors have no views: JS does no pointer arithmetic).
  const host = (data as DeviceTensor<"f16">).readSync().subarray(0, n);
  return kivi.upload(host, { shape: [n] });
}

/** ms per call of `n` calls of fn in a loop, then a synchronize (the device's time where it is the
 * longer one; on the CPU build each call is done when it returns). */
function loopMs(fn: () => void, n = iters): number {
  fn(); // warm-up (JIT, first-launch attributes)
  kivi.synchronizeSync();
  const t0 = performance.now();
  for (let i = 0; i < n; i++) fn();
  kivi.synchronizeSync();
  return (performance.now() - t0) / n;
}

const rows: Row[] = [];
const only = { case: args.get("case"), mode: args.get("mode") };
for (const c of cases) {
  if (only.case && !label(c).includes(only.case)) continue;
  const { batch, context, qHeads, kvHeads, headDim } = c;
  const rng = new Rng(batch * 7919 + context + kvHeads + qHeads * 31 + headDim);
  const step = Math.min(context, 4096);
  const data = chunk(kivi, rng, step, kvHeads, headDim);
  const qHost = onGpu
    ? new Float16Array(batch * qHeads * headDim)
    : new Float32Array(batch * qHeads * headDim);
  for (let i = 0; i < qHost.length; i++) qHost[i] = rng.normal();
  const q = onGpu ? kivi.upload(qHost, { shape: [batch, qHeads, headDim] }) : qHost;
  const base: Record<string, number> = {};
  for (const m of modes) {
    if (only.mode && !m.name.includes(only.mode) && !m.name.startsWith("bits 16")) continue;
    const pagesPerSeq = Math.ceil(context / pageTokens) + 1;
    using cache = kivi.createCache({
      layers: 2, // layer 0 is timed; one-token appends go to layer 1 (empty: pages of layer 0 hold them)
      kvHeads,
      queryHeads: qHeads,
      headDim,
      pageTokens,
      residual: 128,
      keys: m.keys,
      values: m.values,
      maxPages: batch * pagesPerSeq,
      maxSequences: batch,
    });
    const seqs = fill(cache, c, data, step);
    const mem = cache.memory();
    // Bytes layer 0's attention reads: the report counts page storage in every layer (2 here).
    const bytes = (mem.codeBytes + mem.paramBytes) / 2 + mem.residualBytes;
    const times: number[] = [];
    for (let r = 0; r < repeats; r++) times.push(cache.benchAttend(0, seqs, q, { iters }));
    const ms = median(times);
    // One call from TypeScript, argument checks and FFI included, averaged over a loop.
    const tsMs = loopMs(() => {
      const out = cache.attend(0, seqs, q, { trusted: true });
      if (!ArrayBuffer.isView(out)) (out as DeviceTensor).dispose();
    });
    // The steady-state path: a decode batch with q and out made once.
    const qt = onGpu ? (q as DeviceTensor) : kivi.upload(qHost as Float32Array);
    const outT = kivi.alloc([batch, qHeads, headDim], "f32");
    const trusted = cache.batch(seqs, { q: qt, out: outT, trusted: true });
    const checked = cache.batch(seqs, { q: qt, out: outT });
    const batchMs = loopMs(() => trusted.attend(0));
    const checkedMs = loopMs(() => checked.attend(0));
    checked.synchronizeSync();
    // One-token appends into layer 1 (its tokens sit in the pages layer 0 already took).
    const k1 = chunk(kivi, rng, 1, kvHeads, headDim),
      kb = chunk(kivi, rng, batch, kvHeads, headDim);
    const k1t = ArrayBuffer.isView(k1) ? kivi.upload(k1 as Float32Array) : k1;
    const kbt = ArrayBuffer.isView(kb) ? kivi.upload(kb as Float32Array) : kb;
    const appendIters = Math.min(iters, Math.floor(context / 4));
    const seqAppendMs = loopMs(
      () => seqs[0].append(k1t, k1t, { layer: 1, trusted: true }),
      appendIters,
    );
    const appendTrusted = cache.batch(seqs, { k: kbt, v: kbt, trusted: true });
    const appendChecked = cache.batch(seqs, { k: kbt, v: kbt });
    const batchAppendMs = loopMs(() => appendTrusted.append(1), appendIters);
    const batchCheckedMs = loopMs(() => appendChecked.append(1), appendIters);
    appendChecked.synchronizeSync();
    for (const b of [trusted, checked, appendTrusted, appendChecked]) b.dispose();
    for (const t of [k1t, kbt, outT, ...(onGpu ? [] : [qt])]) t.dispose();
    if (m.keys.bits === 16) base.ms = ms;
    const row: Row = {
      case: label(c),
      cache: m.name,
      "us/step": ms * 1e3,
      "us/call from TS": tsMs * 1e3,
      "us/call batch": batchMs * 1e3,
      "batch over step": (batchMs - ms) * 1e3,
      "us/call batch checked": checkedMs * 1e3,
      "checked over step": (checkedMs - ms) * 1e3,
      "append us/call seq": seqAppendMs * 1e3,
      "append us/call batch": batchAppendMs * 1e3,
      "append us/call batch checked": batchCheckedMs * 1e3,
      "MB read": bytes / 1e6,
      "GB/s": gbps(bytes, ms),
      "of copy": gbps(bytes, ms) / copy,
      "speedup vs bits 16": base.ms / ms,
    };
    const ref = torch.get(label(c));
    if (ref !== undefined) {
      row["torch fp16 SDPA us"] = ref;
      row["speedup vs torch"] = ref / (ms * 1e3);
    }
    rows.push(row);
    console.log(
      `${String(row.case).padEnd(24)} ${m.name.padEnd(32)} ${
        (ms * 1e3).toFixed(1).padStart(9)
      } us  ${(tsMs * 1e3).toFixed(1).padStart(8)} us/call(TS)  batch ${
        (batchMs * 1e3).toFixed(1)
      } (+${((batchMs - ms) * 1e3).toFixed(1)}) checked ${(checkedMs * 1e3).toFixed(1)} (+${
        ((checkedMs - ms) * 1e3).toFixed(1)
      })  append seq ${(seqAppendMs * 1e3).toFixed(1)} batch ${
        (batchAppendMs * 1e3).toFixed(1)
      } checked ${(batchCheckedMs * 1e3).toFixed(1)} us  ${
        (bytes / 1e6).toFixed(1).padStart(8)
      } MB  ${(row["GB/s"] as number).toFixed(0).padStart(6)} GB/s  ${
        ((row["of copy"] as number) * 100).toFixed(1).padStart(5)
      }% of copy  ${(base.ms / ms).toFixed(2)}x vs bits 16`,
    );
    for (const s of seqs) s.free();
  }
  if (!ArrayBuffer.isView(data)) (data as DeviceTensor).dispose();
  if (!ArrayBuffer.isView(q)) (q as DeviceTensor).dispose();
}

const notes =
  `decode attention per layer-step, one query token a sequence, 32 query heads and headDim 128 unless the case ` +
  `says GQA q/kv or D, page ${pageTokens}, R 128; us/step = median of ${repeats} x ${iters} back-to-back launches ` +
  `timed inside the library; "of copy" = bytes read (codes + params + residual) / time / copy bandwidth of the ` +
  `same run; us/call = ${iters} calls from TypeScript (${kivi.runtime}) in a loop ending with a synchronize: ` +
  `"from TS" cache.attend allocating its out, "batch" a decode batch (q, out made once, q trusted), "batch checked" ` +
  `the same with q checked on the device, "over step" = us/call - us/step; one-token appends into an empty second ` +
  `layer: "seq" seq.append of one sequence (tensors, trusted), "batch" batch.append of every sequence of the case ` +
  `(trusted, checked)` +
  (torch.size
    ? `; torch fp16 SDPA = PyTorch scaled_dot_product_attention (enable_gqa) on the same ` +
      `shapes in fp16, timed the same way in the same device call (bench/sdpa_reference.py)`
    : "") +
  ".";
if (args.has("multi")) multiToken();

/** The multiToken section: several query tokens a sequence (see the module doc). */
function multiToken(): void {
  const c: Case = onGpu
    ? { batch: 8, context: 32768, qHeads: 32, kvHeads: 8, headDim: 128 }
    : { batch: 1, context: 1024, qHeads: 32, kvHeads: 8, headDim: 128 };
  const { batch, context, qHeads, kvHeads, headDim } = c;
  const rng = new Rng(4242);
  const step = Math.min(context, 4096);
  const data = chunk(kivi, rng, step, kvHeads, headDim);
  using cache = kivi.createCache({
    layers: 1,
    kvHeads,
    queryHeads: qHeads,
    headDim,
    pageTokens,
    residual: 128,
    maxPages: batch * (Math.ceil(context / pageTokens) + 1),
    maxSequences: batch,
  });
  const seqs = fill(cache, c, data, step);
  const mem = cache.memory();
  const bytes = mem.codeBytes + mem.paramBytes + mem.residualBytes;
  const multiRows: Row[] = [];
  for (const qlen of onGpu ? [1, 8, 512] : [1, 8, 64]) {
    const n = batch * qlen * qHeads * headDim;
    const qHost = onGpu ? new Float16Array(n) : new Float32Array(n);
    for (let i = 0; i < n; i++) qHost[i] = rng.normal();
    const q = onGpu ? kivi.upload(qHost, { shape: [batch * qlen, qHeads, headDim] }) : qHost;
    const qlens = new Array<number>(batch).fill(qlen);
    const reps = qlen >= 64 ? 3 : iters;
    const ms = loopMs(() => {
      const out = cache.attendMulti(0, seqs, qlens, q, { trusted: true });
      if (!ArrayBuffer.isView(out)) (out as DeviceTensor).dispose();
    }, reps);
    const name = `${label(c)}${qlen >= 64 ? ` chunk ${qlen}` : ` qlen ${qlen}`}`;
    const row: Row = {
      case: name,
      cache: "default (uniform K 2 G32, codebook V 2 G64)",
      qlen,
      "us/step": ms * 1e3,
      "of copy": gbps(bytes, ms) / copy,
    };
    const ref = torch.get(name);
    if (ref !== undefined) {
      row["torch fp16 SDPA us"] = ref;
      row["speedup vs torch"] = ref / (ms * 1e3);
    }
    multiRows.push(row);
    console.log(
      `${name.padEnd(32)} ${(ms * 1e3).toFixed(1).padStart(10)} us/step  ${
        ((row["of copy"] as number) * 100).toFixed(1).padStart(6)
      }% of copy`,
    );
    if (!ArrayBuffer.isView(q)) (q as DeviceTensor).dispose();
  }
  for (const s of seqs) s.free();
  if (!ArrayBuffer.isView(data)) (data as DeviceTensor).dispose();
  const multiNotes =
    `multi-token attention (cache.attendMulti, causal) of qlen query tokens a sequence over ` +
    `${
      label(c)
    }, page ${pageTokens}, R 128, the default cache format; us/step = ms per call from TypeScript ` +
    `(${kivi.runtime}) over a loop ending with a synchronize; "of copy" = the cache's bytes once / time / copy ` +
    `bandwidth (on tensor cores one launch takes every query: rows = query x head, masked per row)` +
    (torch.size
      ? `; torch = PyTorch fp16 SDPA with the same bottom-right causal mask (bench/sdpa_reference.py)`
      : "") +
    ".";
  const path = writeSection(
    kivi.runtime === "bun" ? "attention-multitoken" : `attention-multitoken-${kivi.runtime}`,
    section(kivi, copy, multiNotes, multiRows),
    args.get("out"),
  );
  console.log(`wrote ${path}`);
}

// With --case matching no case (say --multi --case none: the multiToken section alone) the decode section
// is left as it is in the results file.
if (rows.length > 0) {
  const result = section(kivi, copy, notes, rows);
  const path = writeSection(
    kivi.runtime === "bun" ? "attention" : `attention-${kivi.runtime}`,
    result,
    args.get("out"),
  );
  if (args.has("json")) writeFileSync(args.get("json")!, JSON.stringify(result, null, 2));
  console.log(`wrote ${path}`);
}
