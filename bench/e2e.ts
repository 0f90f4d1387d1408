/**
 * End-to-end decode throughput of a Llama-3-8B-shaped model (32 layers, hidden 4096, 32 query heads
 * and 8 KV heads of 128, MLP 14336, vocab 128256, fp16 weights) over kivi's cache at a long context:
 * decode tokens/s for three caches (bits 16, uniform 2-bit K+V G32 = KIVI-2, and the default uniform
 * K G32 + codebook V G64) at batch 8, then at each cache's largest batch that fits in device memory
 * next to the weights.
 *
 *   bun bench/e2e.ts [--backend auto|cpu|cuda] [--layers 32] [--context 32768] [--batch 8]
 *                    [--steps 20] [--max-batch N] [--seed 0] [--quick] [--out bench/results]
 *
 * Timing only: the weights are seeded random (`backend.randomModel`, drawn on the device by
 * kivi_model_fill_normal, N(0, 0.02) projections, N(1, 0.02) norms) and the linear layers run in
 * fp16 on the tensor cores (`matmul: "f16"`). The context's K/V is not a prefill: one sequence is
 * filled by appending synthetic K/V through the cache's normal append path, in chunks made on the
 * device by the fill op (keys N(0, 1) with two outlier channels per head at 8x, values N(0, 1)),
 * and every other sequence of the batch is a deep copy of it (kivi_cache_seq_copy). The fill is not
 * timed.
 *
 * A step is the model's decode loop (LlamaModel._decoder) with nothing read back and no wait: the
 * tokens and positions are written once (a step's cost does not depend on them), and `steps`
 * back-to-back steps are timed with device timers (kivi_timer_start/stop, CUDA events) after two
 * warm-up steps, three times on a GPU (the median is reported). The shares of step time come from
 * timing the same steps with parts left out: the cache's append and attention ("attention"), and
 * every linear layer ("gemm"); the rest (norms, RoPE, SwiGLU, embedding, log-softmax, launch gaps)
 * is what remains. The bytes a step reads are the
 * linear weights plus the batch's cache (codes, params and fp16 residual of `cache.memory()`), as a
 * fraction of the copy bandwidth measured in the same run.
 *
 * The largest batch: free device memory after the weights (`kivi_mem_info`), less a headroom for
 * activations, scratch and fragmentation (2 GiB or 3% of the device, whichever is more), divided by
 * one sequence's pool bytes (its pages at context + 1024 tokens, from `cache.memory()` of a one-page
 * cache, plus its residual windows).
 *
 * Output: bench/results/<device>-e2e.json and .md (`--out` another folder). Progress on stderr.
 * `--quick` is a tiny config for the CPU build (2 layers, hidden 128, context 256, batch 2, largest
 * batch at most 4) that runs in seconds.
 *
 * @module
 */
import process from "node:process";
import { mkdirSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import {
  type Backend,
  type CacheFormat,
  type KVCache,
  type LlamaModel,
  openBackend,
  type RandomModelConfig,
  type Sequence,
} from "../src/mod.ts";
import { ModelOps } from "../src/model/_ops.ts";
import type { Decoder } from "../src/model/types.ts";
import { deviceSlug, hostName, median, parseArgs } from "./_report.ts";

/** Llama-3-8B's sizes (the RoPE table sized to the bench's context). */
export const LLAMA3_8B: Omit<RandomModelConfig, "context"> = {
  vocab: 128256,
  hidden: 4096,
  layers: 32,
  heads: 32,
  kvHeads: 8,
  headDim: 128,
  intermediate: 14336,
  eps: 1e-5,
  ropeTheta: 500000,
};

/** The --quick config: every part of the 8B step, at a size the CPU build runs in seconds. */
const QUICK: Omit<RandomModelConfig, "context"> = {
  vocab: 512,
  hidden: 128,
  layers: 2,
  heads: 4,
  kvHeads: 2,
  headDim: 64,
  intermediate: 256,
};

/** One row of the results. */
export interface E2eRow {
  cache: string;
  batch: number;
  context: number;
  /** True on the row at the cache's largest batch. */
  maxBatch: boolean;
  tokensPerSecond: number;
  msPerStep: number;
  attentionShare: number;
  gemmShare: number;
  otherShare: number;
  /** The batch's cache, GB (1e9 bytes). */
  cacheGB: number;
  /** Weights plus cache read per step. */
  bytesPerStep: number;
  /** bytesPerStep / step time as a fraction of the copy bandwidth. */
  ofCopy: number;
}

/** The results file. */
export interface E2eReport {
  device: string;
  date: string;
  config: Record<string, unknown>;
  weights: string;
  kvFill: string;
  copyGBps: number;
  rows: E2eRow[];
}

const uniform2: CacheFormat = { kind: "uniform", bits: 2, group: 32 };
const CACHES: { name: string; keys: CacheFormat; values: CacheFormat }[] = [
  { name: "bits 16", keys: { bits: 16 }, values: { bits: 16 } },
  { name: "uniform 2-bit K+V G32", keys: uniform2, values: uniform2 },
  {
    name: "uniform K G32 + codebook V G64 (default)",
    keys: uniform2,
    values: { kind: "codebook", bits: 2, group: 64 },
  },
];

/** Tokens each sequence can take beyond the context: the warm-up and timed steps of two rows (three
 * decoders a row, each 2 + REPEATS x steps, steps up to 40). */
const SPARE = 1024;
/** Key channels of each head scaled 8x (a trained model's keys have a few such outliers). */
const OUTLIERS = [7, 70];

const log = (s: string) => process.stderr.write(`e2e: ${s}\n`);

const args = parseArgs(process.argv.slice(2), [
  "backend",
  "layers",
  "context",
  "batch",
  "steps",
  "max-batch",
  "seed",
  "out",
], ["quick"]);
const quick = args.has("quick");
const int = (name: string, dflt: number, min = 1): number => {
  const v = args.get(name);
  if (v === undefined) return dflt;
  const n = Number(v);
  if (!/^[0-9]+$/.test(v) || n < min) {
    throw new RangeError(`--${name} must be an integer >= ${min}, got "${v}"`);
  }
  return n;
};
const base = quick ? QUICK : LLAMA3_8B;
const layers = int("layers", base.layers);
const context = int("context", quick ? 256 : 32768, 64);
const batch = int("batch", quick ? 2 : 8);
const steps = int("steps", quick ? 2 : 20);
if (steps > 40) {
  throw new RangeError(`--steps must be at most 40 (the sequences' spare room), got ${steps}`);
}
const maxBatchCap = int("max-batch", quick ? 4 : 512);
const seed = int("seed", 0, 0);
const outDir = args.get("out") ?? fileURLToPath(new URL("./results/", import.meta.url));

using kivi = await openBackend({
  prefer: (args.get("backend") ?? (quick ? "cpu" : "auto")) as "auto" | "cpu" | "cuda",
});
const onGpu = kivi.kind === "cuda";
/** Timed runs of `steps` steps per figure: the median is reported. */
const repeats = onGpu ? 3 : 1;
log(`${kivi.deviceName} (${kivi.kind}, ${kivi.runtime}); ${layers} layers, context ${context}`);
const copyGBps = kivi.copyBandwidth(onGpu ? 1 << 30 : 64 << 20, onGpu ? 20 : 3);
log(`copy bandwidth ${copyGBps.toFixed(1)} GB/s`);

const config: RandomModelConfig = { ...base, layers, context: context + SPARE };
log(`making the seeded random weights on the device`);
using model = kivi.randomModel(config, { seed, matmul: "f16" });
const ops = new ModelOps(kivi);
const c = model.config;
const weightsRead = 2 * (
  layers * (
      c.hidden * c.heads * c.headDim * 2 + c.hidden * c.kvHeads * c.headDim * 2 +
      c.hidden * c.intermediate * 3 + c.hidden * 2
    ) + c.vocab * c.hidden + c.hidden
);
log(
  `weights: ${(model.weightBytes / 1e9).toFixed(2)} GB held, ${
    (weightsRead / 1e9).toFixed(2)
  } GB read a step`,
);

/** Appends `context` tokens of synthetic K/V to `seq` in chunks made on the device: fp16 normal
 * draws widened to f32 (embed with ids 0..n-1), keys scaled per channel by an RMSNorm whose weight
 * holds the outlier scales. */
function fillByAppends(k: Backend, seq: Sequence, fillSeed: number): void {
  const row = c.kvHeads * c.headDim;
  const chunk = [1024, 512, 256, 128, 64].find((n) => context % n === 0) ?? 1;
  const rows = layers * chunk;
  const t = {
    kh: k.alloc([rows, row], "f16"),
    vh: k.alloc([rows, row], "f16"),
    kf: k.alloc([rows, row], "f32"),
    vf: k.alloc([rows, row], "f32"),
    ids: k.upload(Int32Array.from({ length: rows }, (_, i) => i)),
    scale: k.upload(
      Float16Array.from({ length: row }, (_, i) => OUTLIERS.includes(i % c.headDim) ? 8 : 1),
    ),
  };
  try {
    for (let i = 0; i < context / chunk; i++) {
      ops.fillNormal(t.kh, rows * row, fillSeed * 65536 + 2 * i, 0, 1);
      ops.fillNormal(t.vh, rows * row, fillSeed * 65536 + 2 * i + 1, 0, 1);
      ops.embed(t.ids, rows, t.kh, rows, row, t.kf);
      ops.rmsnorm(t.kf, t.scale, rows, row, 0, t.kf);
      ops.embed(t.ids, rows, t.vh, rows, row, t.vf);
      seq.append(t.kf, t.vf, { trusted: true });
    }
    kivi.synchronizeSync();
  } finally {
    for (const x of Object.values(t)) x.dispose();
  }
}

/** Milliseconds per step of `steps` back-to-back steps (device timers), after two warm-up steps;
 * the first step, whole, writes the tokens and positions. */
function msPerStep(m: LlamaModel, cache: KVCache, seqs: Sequence[], skip?: "attention" | "gemm") {
  const dec: Decoder = m._decoder(cache, seqs, { logits: false, skip });
  try {
    const b = seqs.length;
    dec.step(
      Int32Array.from({ length: b }, (_, i) => (i * 7919 + 13) % c.vocab),
      new Int32Array(b).fill(context),
    );
    dec.step();
    dec.finish();
    const runs: number[] = [];
    for (let r = 0; r < repeats; r++) {
      runs.push(kivi.time(() => {
        for (let i = 0; i < steps; i++) dec.step();
      }));
      dec.finish();
    }
    return median(runs) / steps;
  } finally {
    dec.dispose();
  }
}

function measure(name: string, cache: KVCache, seqs: Sequence[], isMax: boolean): E2eRow {
  const b = seqs.length;
  log(
    `${name}: batch ${b}${
      isMax ? " (largest)" : ""
    }: timing ${steps} steps, whole and with parts left out`,
  );
  const full = msPerStep(model, cache, seqs);
  const noAttention = msPerStep(model, cache, seqs, "attention");
  const noGemm = msPerStep(model, cache, seqs, "gemm");
  const mem = cache.memory();
  const live = cache.sequences.length;
  const cacheBytes = (mem.codeBytes + mem.paramBytes + mem.residualBytes) / live * b;
  const bytesPerStep = weightsRead + cacheBytes;
  const share = (ms: number) => Math.max(0, (full - ms) / full);
  const attentionShare = share(noAttention), gemmShare = share(noGemm);
  const row: E2eRow = {
    cache: name,
    batch: b,
    context,
    maxBatch: isMax,
    tokensPerSecond: b / (full / 1e3),
    msPerStep: full,
    attentionShare,
    gemmShare,
    otherShare: Math.max(0, 1 - attentionShare - gemmShare),
    cacheGB: cacheBytes / 1e9,
    bytesPerStep,
    ofCopy: bytesPerStep / (full * 1e-3) / 1e9 / copyGBps,
  };
  log(
    `${name}: batch ${b}: ${row.tokensPerSecond.toFixed(1)} tokens/s, ${full.toFixed(2)} ms/step ` +
      `(attention ${(attentionShare * 100).toFixed(0)}%, GEMMs ${
        (gemmShare * 100).toFixed(0)
      }%), ` +
      `${(row.ofCopy * 100).toFixed(0)}% of copy bandwidth`,
  );
  return row;
}

const rows: E2eRow[] = [];
const pageTokens = 64;
const pagesPerSeq = Math.ceil((context + SPARE) / pageTokens);
for (const [ci, fmt] of CACHES.entries()) {
  const opts = { keys: fmt.keys, values: fmt.values, pageTokens };
  // One sequence's pool bytes: a one-page and a two-page cache's reports give a page and the windows.
  const poolOf = (pages: number) => {
    const probe = model._createCache({ ...opts, maxPages: pages }, 1, 1);
    try {
      return probe.memory().poolBytes;
    } finally {
      probe.dispose();
    }
  };
  const one = poolOf(1), page = poolOf(2) - one;
  const perSeq = one + (pagesPerSeq - 1) * page;
  const { free, total } = kivi.memInfo();
  const headroom = Math.max(2 * 2 ** 30, 0.03 * total);
  let maxBatch = Math.min(maxBatchCap, Math.floor((free - headroom) / perSeq), 512);
  log(
    `${fmt.name}: ${(perSeq / 2 ** 30).toFixed(3)} GiB a sequence of ${context + SPARE} tokens; ` +
      `${(free / 2 ** 30).toFixed(1)} GiB free: largest batch ${maxBatch}`,
  );
  if (maxBatch < 1) {
    log(`${fmt.name}: not one sequence fits; skipped`);
    continue;
  }
  let cache: KVCache | undefined;
  while (cache === undefined) {
    try {
      cache = model._createCache(
        { ...opts, maxPages: maxBatch * pagesPerSeq },
        maxBatch,
        context + SPARE,
      );
    } catch (e) {
      if (maxBatch <= 1) throw e;
      maxBatch = Math.floor(maxBatch * 0.95);
      log(`${fmt.name}: the pool did not fit (${(e as Error).message}); largest batch ${maxBatch}`);
    }
  }
  try {
    const t0 = performance.now();
    const first = cache.createSequence();
    fillByAppends(kivi, first, seed * 16 + ci);
    const seqs = [first];
    while (seqs.length < maxBatch) seqs.push(cache._copySequence(first));
    kivi.synchronizeSync();
    log(
      `${fmt.name}: 1 sequence filled by appends, ${maxBatch - 1} by copies, in ${
        ((performance.now() - t0) / 1e3).toFixed(1)
      } s (not timed)`,
    );
    if (batch <= maxBatch) {
      rows.push(measure(fmt.name, cache, seqs.slice(0, batch), batch === maxBatch));
    } else {log(
        `${fmt.name}: batch ${batch} does not fit; only the largest batch (${maxBatch}) is timed`,
      );}
    if (maxBatch !== batch) rows.push(measure(fmt.name, cache, seqs, true));
  } finally {
    cache.dispose();
  }
}

const report: E2eReport = {
  device: kivi.deviceName,
  date: new Date().toISOString().slice(0, 10),
  config: {
    shape: quick ? "the --quick shape (a tiny model for the CPU build)" : "Llama-3-8B's shape",
    ...config,
    context,
    steps,
    pageTokens,
    matmul: model.matmul,
    backend: kivi.kind,
    runtime: kivi.runtime,
    host: hostName(),
  },
  weights: "seeded random (timing only)",
  kvFill:
    `synthetic K/V appended through the cache's append path in chunks made on the device by kivi_model_fill_normal (keys N(0, 1) with channels ${
      OUTLIERS.join(" and ")
    } of each head at 8x, values N(0, 1)); one sequence filled by appends, the others deep copies of it (kivi_cache_seq_copy); not a prefill`,
  copyGBps,
  rows,
};
mkdirSync(outDir, { recursive: true });
const slug = `${deviceSlug(kivi.deviceName)}-e2e`;
writeFileSync(`${outDir}/${slug}.json`, JSON.stringify(report, null, 2) + "\n");
writeFileSync(`${outDir}/${slug}.md`, markdown(report));
for (const x of rows) {
  log(
    `${x.cache}, batch ${x.batch}${x.maxBatch ? " (largest)" : ""}: ${
      x.tokensPerSecond.toFixed(1)
    } tokens/s, ${vsBits16(report, x) || "?"} bits 16's`,
  );
}
log(`wrote ${outDir}/${slug}.json and .md`);

/** tokens/s against bits 16's row of the same kind (batch `--batch`, or each cache's largest). */
function vsBits16(r: E2eReport, x: E2eRow): string {
  const base = r.rows.find((b) =>
    b.cache === CACHES[0].name && (x.maxBatch ? b.maxBatch : b.batch === x.batch)
  );
  return base === undefined ? "" : `${(x.tokensPerSecond / base.tokensPerSecond).toFixed(2)}x`;
}

function markdown(r: E2eReport): string {
  const pct = (x: number) => `${(x * 100).toFixed(0)}%`;
  const lines = [
    `# End-to-end decode: ${r.device}`,
    "",
    `${r.date}; ${String(r.config.layers)} layers of ${String(r.config.shape)} (hidden ${
      String(r.config.hidden)
    }, ${String(r.config.heads)}/${String(r.config.kvHeads)} heads of ${
      String(r.config.headDim)
    }, MLP ${String(r.config.intermediate)}, vocab ${String(r.config.vocab)}), fp16 weights, ${
      String(r.config.matmul)
    } matmul; copy bandwidth ${r.copyGBps.toFixed(1)} GB/s measured in the same run.`,
    "",
    `**Timing only**: the weights are ${r.weights}. K/V of the context: ${r.kvFill}.`,
    "",
    `Shares of step time: the same ${
      String(r.config.steps)
    } steps timed with the cache's append + attention left out, and with every linear layer left out; "other" is the remainder. Bytes per step: the linear weights plus the batch's cache (codes, params, fp16 residual).`,
    "",
    "| cache | batch | context | largest | tokens/s | vs bits 16 | ms/step | attention | GEMMs | other | cache GB | GB/step | of copy |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ...r.rows.map((x) =>
      `| ${x.cache} | ${x.batch} | ${x.context} | ${x.maxBatch ? "yes" : ""} | ${
        x.tokensPerSecond.toFixed(1)
      } | ${vsBits16(r, x)} | ${x.msPerStep.toFixed(2)} | ${pct(x.attentionShare)} | ${
        pct(x.gemmShare)
      } | ${pct(x.otherShare)} | ${x.cacheGB.toFixed(2)} | ${(x.bytesPerStep / 1e9).toFixed(2)} | ${
        pct(x.ofCopy)
      } |`
    ),
    "",
  ];
  return lines.join("\n");
}
