/**
 * The model and loop shared by the two examples (bun_decode.ts, deno_decode.ts): a tiny random
 * Llama-shaped attention stack (RMSNorm, Wq/Wk/Wv/Wo per layer, a residual stream, GQA) that
 * prefills a short random prompt and decodes N steps over kivi's paged cache, each step's input
 * being the normalised output of the step before. Only the public API is used.
 *
 * @module
 */
import { type Backend, type CacheFormat, type CacheMemory, type DeviceTensor, Rng, type Sequence } from "../mod.ts";

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

function makeModel(cfg: DecodeConfig): { layers: Layer[]; prompt: Float32Array[] } {
  const { seed } = cfg;
  const rng = new Rng(seed);
  const s = 1 / Math.sqrt(HIDDEN);
  const layers = Array.from({ length: cfg.layers }, () => ({
    wq: rng.normals(HIDDEN * HIDDEN, s),
    wk: rng.normals(KV_DIM * HIDDEN, s),
    wv: rng.normals(KV_DIM * HIDDEN, s),
    wo: rng.normals(HIDDEN * HIDDEN, s),
  }));
  const prompt = Array.from({ length: cfg.prompt }, () => rng.normals(HIDDEN));
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
  stepMs: number[];
  hidden: Float32Array; // the final hidden state (normalised)
  memory: CacheMemory;
}

async function run(
  kivi: Backend,
  cfg: DecodeConfig,
  clock: () => number,
  model: ReturnType<typeof makeModel>,
  keys: CacheFormat,
  values: CacheFormat,
): Promise<RunResult> {
  const LAYERS = cfg.layers, STEPS = cfg.steps;
  using cache = kivi.createCache({
    layers: LAYERS,
    kvHeads: KV_HEADS,
    queryHeads: Q_HEADS,
    headDim: HEAD_DIM,
    pageTokens: 32,
    residual: 32, // small, so that a short prompt already fills quantized pages
    keys,
    values,
    maxPages: Math.ceil((cfg.prompt + STEPS) / 32) + 2,
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
  const attnNorms: number[] = [], stepMs: number[] = [];
  for (let step = 0; step < STEPS; step++) {
    const t0 = clock();
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
    stepMs.push(clock() - t0);
    attnNorms.push(lastAttn);
  }
  return { attnNorms, stepMs, hidden: x, memory: cache.memory() };
}

/** Size of the example run. */
/** The examples' command line (`--layers --prompt --steps --seed` as non-negative integers,
 * `--backend auto|cpu|cuda`), read from the runtime's arguments. */
export function exampleOptions(argv: readonly string[]): { backend: "auto" | "cpu" | "cuda"; cfg: DecodeConfig } {
  const option = (name: string, fallback: number): number => {
    const i = argv.indexOf(`--${name}`);
    const v = i >= 0 ? Number(argv[i + 1]) : fallback;
    if (!Number.isInteger(v) || v < 0) throw new RangeError(`--${name} must be a non-negative integer, got ${argv[i + 1]}`);
    return v;
  };
  const backend = argv.includes("--backend") ? argv[argv.indexOf("--backend") + 1] : "auto";
  if (backend !== "auto" && backend !== "cpu" && backend !== "cuda") {
    throw new RangeError(`--backend must be auto, cpu or cuda, got ${backend}`);
  }
  const cfg = { layers: option("layers", 4), prompt: option("prompt", 96), steps: option("steps", 16), seed: option("seed", 7) };
  return { backend, cfg };
}

export interface DecodeConfig {
  layers: number;
  prompt: number;
  steps: number;
  seed: number;
}

/**
 * Runs the decoding loop over a 2-bit cache (uniform keys, codebook values) and over a bits-16
 * cache, and prints each step, the memory report and the final hidden states' difference.
 * `clock` is the runtime's millisecond clock; `runtime` names it in the header.
 */
export async function decodeExample(kivi: Backend, cfg: DecodeConfig, clock: () => number, runtime: string): Promise<void> {
  const { layers: LAYERS, prompt: PROMPT, steps: STEPS, seed: SEED } = cfg;
  console.log(`kivi ${kivi.kind} backend under ${runtime}: ${kivi.reason}`);
  console.log(
    `model: ${LAYERS} layers, ${Q_HEADS} query heads / ${KV_HEADS} KV heads x ${HEAD_DIM} dims; prompt ${PROMPT} tokens, ${STEPS} decode steps, seed ${SEED}`,
  );
  const model = makeModel(cfg);
  const quantized = await run(kivi, cfg, clock, model, { kind: "uniform", bits: 2, group: 32 }, { kind: "codebook", bits: 2, group: 64 });
  const baseline = await run(kivi, cfg, clock, model, { bits: 16 }, { bits: 16 });
  for (let i = 0; i < STEPS; i++) {
    console.log(
      `step ${String(i + 1).padStart(3)}: attention output norm ${quantized.attnNorms[i]!.toFixed(4)} ` +
        `(bits 16: ${baseline.attnNorms[i]!.toFixed(4)}), ${quantized.stepMs[i]!.toFixed(2)} ms`,
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
}
