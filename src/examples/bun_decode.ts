/**
 * A decoding loop over kivi's quantized paged KV cache, under Bun: a tiny random Llama-shaped
 * attention stack (RMSNorm, Wq/Wk/Wv/Wo per layer, a residual stream, GQA) prefills a short random
 * prompt and then decodes N steps, each step's input being the normalised output of the step
 * before. The same loop runs twice, once over a 2-bit cache and once over a bits-16 (fp16) cache,
 * and the final hidden states are compared. Only the public API is used (`import ... from "kivi"`).
 *
 *   bun src/examples/bun_decode.ts [--layers 4] [--prompt 96] [--steps 16] [--seed 7] [--backend auto|cpu|cuda]
 *
 * Runs on the CPU build in about a second; on CUDA the inputs are uploaded and results read back.
 *
 * @module
 */
import { type Backend, type CacheFormat, type CacheMemory, type DeviceTensor, openBackend, Rng, type Sequence } from "../mod.ts";

// Bun's own globals, declared here so that `deno check` (which has no Bun types) accepts this file.
declare const Bun: { nanoseconds(): number; argv: string[]; version: string };

function option(name: string, fallback: number): number {
  const i = Bun.argv.indexOf(`--${name}`);
  const v = i >= 0 ? Number(Bun.argv[i + 1]) : fallback;
  if (!Number.isInteger(v) || v < 0) throw new RangeError(`--${name} must be a non-negative integer, got ${Bun.argv[i + 1]}`);
  return v;
}
const backendArg = Bun.argv.includes("--backend") ? Bun.argv[Bun.argv.indexOf("--backend") + 1] : "auto";
if (backendArg !== "auto" && backendArg !== "cpu" && backendArg !== "cuda") throw new RangeError(`--backend must be auto, cpu or cuda, got ${backendArg}`);

const LAYERS = option("layers", 4);
const PROMPT = option("prompt", 96);
const STEPS = option("steps", 16);
const SEED = option("seed", 7);
const Q_HEADS = 8, KV_HEADS = 2, HEAD_DIM = 64;
const HIDDEN = Q_HEADS * HEAD_DIM; // 512
const KV_DIM = KV_HEADS * HEAD_DIM; // 128

/** One layer's projections, row-major [out][in]. */
interface Layer {
  wq: Float32Array; // [HIDDEN][HIDDEN]
  wk: Float32Array; // [KV_DIM][HIDDEN]
  wv: Float32Array; // [KV_DIM][HIDDEN]
  wo: Float32Array; // [HIDDEN][HIDDEN]
}

/** y = W x for W [rows][cols]. */
function matvec(w: Float32Array, x: Float32Array, rows: number): Float32Array {
  const cols = x.length, y = new Float32Array(rows);
  for (let r = 0; r < rows; r++) {
    let s = 0;
    const o = r * cols;
    for (let c = 0; c < cols; c++) s += w[o + c]! * x[c]!;
    y[r] = s;
  }
  return y;
}

function rmsNorm(x: Float32Array): Float32Array {
  let ss = 0;
  for (const v of x) ss += v * v;
  const inv = 1 / Math.sqrt(ss / x.length + 1e-6);
  return x.map((v) => v * inv);
}

function norm(x: ArrayLike<number>): number {
  let ss = 0;
  for (let i = 0; i < x.length; i++) ss += x[i]! * x[i]!;
  return Math.sqrt(ss);
}

function makeModel(seed: number): { layers: Layer[]; prompt: Float32Array[] } {
  const rng = new Rng(seed);
  const s = 1 / Math.sqrt(HIDDEN);
  const layers = Array.from({ length: LAYERS }, () => ({
    wq: rng.normals(HIDDEN * HIDDEN, s),
    wk: rng.normals(KV_DIM * HIDDEN, s),
    wv: rng.normals(KV_DIM * HIDDEN, s),
    wo: rng.normals(HIDDEN * HIDDEN, s),
  }));
  const prompt = Array.from({ length: PROMPT }, () => rng.normals(HIDDEN));
  return { layers, prompt };
}

/** Exact causal attention of a prompt in fp32 ([tokens][heads][dim] rows), for the prefill. */
function causalAttention(q: Float32Array[], k: Float32Array[], v: Float32Array[]): Float32Array[] {
  const group = Q_HEADS / KV_HEADS, scale = 1 / Math.sqrt(HEAD_DIM);
  return q.map((qt, t) => {
    const out = new Float32Array(HIDDEN);
    for (let h = 0; h < Q_HEADS; h++) {
      const kh = Math.floor(h / group) * HEAD_DIM, qh = h * HEAD_DIM;
      const scores = new Float64Array(t + 1);
      let max = -Infinity;
      for (let j = 0; j <= t; j++) {
        let s = 0;
        for (let d = 0; d < HEAD_DIM; d++) s += qt[qh + d]! * k[j]![kh + d]!;
        scores[j] = s * scale;
        max = Math.max(max, scores[j]!);
      }
      let sum = 0;
      for (let j = 0; j <= t; j++) sum += scores[j] = Math.exp(scores[j]! - max);
      for (let j = 0; j <= t; j++) {
        const p = scores[j]! / sum;
        for (let d = 0; d < HEAD_DIM; d++) out[qh + d] += p * v[j]![kh + d]!;
      }
    }
    return out;
  });
}

function concat(rows: Float32Array[]): Float32Array {
  const out = new Float32Array(rows.reduce((n, r) => n + r.length, 0));
  let o = 0;
  for (const r of rows) {
    out.set(r, o);
    o += r.length;
  }
  return out;
}

/** Appends K/V of one layer; on CUDA the host arrays are uploaded first. */
function append(kivi: Backend, seq: Sequence, layer: number, k: Float32Array, v: Float32Array): void {
  if (kivi.kind !== "cuda") return seq.append(k, v, { layer });
  using kd = kivi.upload(k, { shape: [k.length / KV_DIM, KV_HEADS, HEAD_DIM] });
  using vd = kivi.upload(v, { shape: [v.length / KV_DIM, KV_HEADS, HEAD_DIM] });
  seq.append(kd, vd, { layer });
}

/** One decode step of attention in one layer; on CUDA q is uploaded and the output read back. */
async function attend(kivi: Backend, seq: Sequence, layer: number, q: Float32Array): Promise<Float32Array> {
  const cache = seq.cache;
  if (kivi.kind !== "cuda") return cache.attend(layer, [seq], q) as Float32Array;
  using qd = kivi.upload(q, { shape: [1, Q_HEADS, HEAD_DIM] });
  using out = cache.attend(layer, [seq], qd) as DeviceTensor<"f32">;
  return await out.read();
}

interface RunResult {
  attnNorms: number[]; // per decode step, the last layer's attention output norm
  stepNs: number[];
  hidden: Float32Array; // the final hidden state (normalised)
  memory: CacheMemory;
}

async function run(kivi: Backend, model: ReturnType<typeof makeModel>, keys: CacheFormat, values: CacheFormat): Promise<RunResult> {
  using cache = kivi.createCache({
    layers: LAYERS,
    kvHeads: KV_HEADS,
    queryHeads: Q_HEADS,
    headDim: HEAD_DIM,
    pageTokens: 32,
    residual: 32, // small, so that a short prompt already fills quantized pages
    keys,
    values,
    maxPages: Math.ceil((PROMPT + STEPS) / 32) + 2,
  });
  using seq = cache.createSequence();

  // Prefill: every layer over the whole prompt (exact causal attention in fp32), its K/V appended
  // in one call, so everything but the newest 32..63 tokens is quantized into pages at once.
  let xs = model.prompt.map((x) => x.slice());
  for (let l = 0; l < LAYERS; l++) {
    const w = model.layers[l]!;
    const hs = xs.map(rmsNorm);
    const q = hs.map((h) => matvec(w.wq, h, HIDDEN));
    const k = hs.map((h) => matvec(w.wk, h, KV_DIM));
    const v = hs.map((h) => matvec(w.wv, h, KV_DIM));
    append(kivi, seq, l, concat(k), concat(v));
    const att = causalAttention(q, k, v);
    xs = xs.map((x, t) => {
      const o = matvec(w.wo, att[t]!, HIDDEN);
      return x.map((xv, i) => xv + o[i]!);
    });
  }

  // Decode: the next input is the normalised output of the step before.
  let x = rmsNorm(xs[xs.length - 1]!);
  const attnNorms: number[] = [], stepNs: number[] = [];
  for (let step = 0; step < STEPS; step++) {
    const t0 = Bun.nanoseconds();
    let lastAttn = 0;
    for (let l = 0; l < LAYERS; l++) {
      const w = model.layers[l]!;
      const h = rmsNorm(x);
      append(kivi, seq, l, matvec(w.wk, h, KV_DIM), matvec(w.wv, h, KV_DIM));
      const att = await attend(kivi, seq, l, matvec(w.wq, h, HIDDEN));
      lastAttn = norm(att);
      const o = matvec(w.wo, att, HIDDEN);
      x = x.map((xv, i) => xv + o[i]!);
    }
    x = rmsNorm(x);
    stepNs.push(Bun.nanoseconds() - t0);
    attnNorms.push(lastAttn);
  }
  return { attnNorms, stepNs, hidden: x, memory: cache.memory() };
}

using kivi = await openBackend({ prefer: backendArg });
console.log(`kivi ${kivi.kind} backend under Bun ${Bun.version}: ${kivi.reason}`);
console.log(
  `model: ${LAYERS} layers, ${Q_HEADS} query heads / ${KV_HEADS} KV heads x ${HEAD_DIM} dims; prompt ${PROMPT} tokens, ${STEPS} decode steps, seed ${SEED}`,
);
const model = makeModel(SEED);
const quantized = await run(kivi, model, { kind: "uniform", bits: 2, group: 32 }, { kind: "codebook", bits: 2, group: 64 });
const baseline = await run(kivi, model, { bits: 16 }, { bits: 16 });

for (let i = 0; i < STEPS; i++) {
  console.log(
    `step ${String(i + 1).padStart(3)}: attention output norm ${quantized.attnNorms[i]!.toFixed(4)} ` +
      `(bits 16: ${baseline.attnNorms[i]!.toFixed(4)}), ${(quantized.stepNs[i]! / 1e6).toFixed(2)} ms`,
  );
}
const m = quantized.memory, mb = baseline.memory;
console.log(
  `memory: ${m.tokens} tokens over all layers (${m.quantizedTokens} in ${m.pagesUsed} pages), codes ${m.codeBytes} B, params ${m.paramBytes} B, ` +
    `residual ${m.residualBytes} B, tables ${m.tableBytes} B; ${m.bitsPerValue.toFixed(2)} bits per value, ` +
    `${m.ratioToFp16.toFixed(3)} of fp16 (bits 16 cache: ${mb.bitsPerValue.toFixed(2)} bits per value)`,
);
let maxDiff = 0, maxRef = 0;
for (let i = 0; i < HIDDEN; i++) {
  maxDiff = Math.max(maxDiff, Math.abs(quantized.hidden[i]! - baseline.hidden[i]!));
  maxRef = Math.max(maxRef, Math.abs(baseline.hidden[i]!));
}
// Relative to the largest entry of the bits-16 state, so near-zero entries do not blow it up.
console.log(`max relative difference vs bits 16: ${(maxDiff / maxRef).toExponential(3)}`);
