/**
 * A Llama-family causal LM on kivi's cache: the checkpoint's weights held in fp16 on the backend,
 * the forward pass as kivi.h model ops (cuBLAS SGEMMs and kernels of ours on CUDA, C on the CPU
 * build), the cache holding each layer's post-RoPE keys and its values. A prompt is prefilled with
 * exact causal attention and appended to the cache; each decode step appends its K/V and attends over
 * the cache (one decode batch for all sequences).
 *
 * @module
 */
import { closeSync, existsSync, openSync } from "node:fs";
import { basename, join } from "node:path";
import type { BackendCore as Backend, DeviceTensor } from "../tensor.ts";
import { KVCache, type Sequence } from "../cache.ts";
import type { DecodeBatch } from "../batch.ts";
import { Rng } from "../random.ts";
import { ModelOps } from "./_ops.ts";
import { expectedTensors, type LlamaConfig, readConfig } from "./config.ts";
import { checkpointTensors, ModelError, readTensorF16 } from "./safetensors.ts";
import { perplexity, type PerplexityOptions, type PerplexityResult } from "./perplexity.ts";
import type { DecodeOptions, Decoder, ModelCacheOptions } from "./types.ts";

export type { ModelCacheOptions } from "./types.ts";

/**
 * The precision of the linear layers: `"f32"` widens the fp16 weights to f32 and multiplies in f32
 * (cuBLAS SGEMM; the figures of the perplexity bench were made so), `"f16"` rounds the activations to
 * fp16 and multiplies on the tensor cores with f32 sums (cublasGemmEx), reading the weights once at
 * their fp16 size.
 */
export type Matmul = "f32" | "f16";

/** Options of {@link Backend.loadModel}. */
export interface LoadModelOptions {
  /** The linear layers' precision (default `"f32"`). */
  matmul?: Matmul;
}

/** The sizes of a model with seeded random weights (see {@link Backend.randomModel}): those of
 * {@link LlamaConfig}, with `eps` (RMSNorm epsilon, default 1e-5) and `ropeTheta` (RoPE base,
 * default 500000, Llama 3's) optional. */
export type RandomModelConfig =
  & Pick<
    LlamaConfig,
    "vocab" | "hidden" | "layers" | "heads" | "kvHeads" | "headDim" | "intermediate" | "context"
  >
  & Partial<Pick<LlamaConfig, "eps" | "ropeTheta">>;

/** Options of {@link Backend.randomModel}. */
export interface RandomModelOptions {
  /** Seed of the weights (default 0): a seed gives the same weights on every backend. */
  seed?: number;
  /** The linear layers' precision (default `"f16"`). */
  matmul?: Matmul;
}

/** Where a LlamaModel's weights come from: a checkpoint folder, or a config and a seed. */
type ModelSource = string | { config: RandomModelConfig; seed: number };

const MAX_DIM = 65536, MAX_ROWS = 1048576;

/** The LlamaConfig of a random model's sizes, checked (TypeError / RangeError naming the field). */
export function randomConfig(c: RandomModelConfig): LlamaConfig {
  if (c === null || typeof c !== "object") {
    throw new TypeError(
      `config must be an object of model sizes, got ${c === null ? "null" : typeof c}`,
    );
  }
  const int = (key: keyof RandomModelConfig, hi: number): number => {
    const v = c[key];
    if (!Number.isSafeInteger(v) || (v as number) < 1 || (v as number) > hi) {
      throw new RangeError(
        `config.${key} must be an integer between 1 and ${hi}, got ${String(v)}`,
      );
    }
    return v as number;
  };
  const num = (key: "eps" | "ropeTheta", fallback: number): number => {
    const v = c[key] ?? fallback;
    if (typeof v !== "number" || !(v > 0 && v < Infinity)) {
      throw new RangeError(`config.${key} must be a finite number > 0, got ${String(v)}`);
    }
    return v;
  };
  const heads = int("heads", 1024), kvHeads = int("kvHeads", 1024), headDim = int("headDim", 1024);
  const cfg: LlamaConfig = {
    architecture: "LlamaForCausalLM",
    modelType: "llama",
    vocab: int("vocab", MAX_ROWS),
    hidden: int("hidden", MAX_DIM),
    layers: int("layers", 1024),
    heads,
    kvHeads,
    headDim,
    intermediate: int("intermediate", MAX_DIM),
    eps: num("eps", 1e-5),
    ropeTheta: num("ropeTheta", 500000),
    context: int("context", MAX_ROWS),
    tied: false,
  };
  if (heads % kvHeads !== 0) {
    throw new RangeError(
      `config.heads must be a multiple of config.kvHeads (${kvHeads}), got ${heads}`,
    );
  }
  if (headDim % 2 !== 0) throw new RangeError(`config.headDim must be even, got ${headDim}`);
  if (heads * headDim > MAX_DIM) {
    throw new RangeError(
      `config.heads * config.headDim must be at most ${MAX_DIM}, got ${heads} * ${headDim}`,
    );
  }
  return cfg;
}

/** The mean and std of each random tensor, in load order: projections and embeddings N(0, 0.02)
 * (Llama's initializer_range), norms N(1, 0.02). Weights of this scale keep the activations of a
 * 32-layer stack finite and of a trained model's order, which is all a timing needs. */
function randomStats(name: string): [number, number] {
  return name.endsWith("norm.weight") ? [1, 0.02] : [0, 0.02];
}

/** Options of {@link LlamaModel.generate}. */
export interface GenerateOptions {
  /** Tokens to generate (default 64). */
  maxTokens?: number;
  /** 0 (the default) decodes greedily; above 0 samples from softmax(logits / temperature). */
  temperature?: number;
  /** Sample among the k most likely tokens only (default 0: all). */
  topK?: number;
  /** Seed of the sampler (default 0): a seed gives the same tokens every run. */
  seed?: number;
  /** The cache to decode over. */
  cache?: ModelCacheOptions;
}

/** One generated token. */
export interface GeneratedToken {
  token: number;
  /** The text it completes (byte models: "" while a UTF-8 character is still open). */
  text: string;
  /** Its log-probability under the model (natural log). */
  logprob: number;
}

interface LayerWeights {
  ln1: DeviceTensor;
  wq: DeviceTensor;
  wk: DeviceTensor;
  wv: DeviceTensor;
  wo: DeviceTensor;
  ln2: DeviceTensor;
  gate: DeviceTensor;
  up: DeviceTensor;
  down: DeviceTensor;
}

/** The f32 buffers of a forward pass over `rows` rows. */
class Activations {
  readonly all: DeviceTensor[] = [];
  readonly x: DeviceTensor;
  readonly h: DeviceTensor;
  readonly q: DeviceTensor;
  readonly k: DeviceTensor;
  readonly v: DeviceTensor;
  readonly att: DeviceTensor;
  readonly g: DeviceTensor;
  readonly u: DeviceTensor;
  readonly logits: DeviceTensor<"f32">;
  readonly tokens: DeviceTensor<"i32">;
  readonly pos: DeviceTensor<"i32">;

  constructor(backend: Backend, c: LlamaConfig, readonly rows: number) {
    const f = (cols: number) => {
      const t = backend.alloc([rows, cols], "f32");
      this.all.push(t);
      return t;
    };
    try {
      this.x = f(c.hidden);
      this.h = f(c.hidden);
      this.q = f(c.heads * c.headDim);
      this.k = f(c.kvHeads * c.headDim);
      this.v = f(c.kvHeads * c.headDim);
      this.att = f(c.heads * c.headDim);
      this.g = f(c.intermediate);
      this.u = f(c.intermediate);
      this.logits = f(c.vocab) as DeviceTensor<"f32">;
      this.tokens = backend.alloc([rows], "i32");
      this.all.push(this.tokens);
      this.pos = backend.alloc([rows], "i32");
      this.all.push(this.pos);
    } catch (e) {
      this.dispose();
      throw e;
    }
  }

  dispose(): void {
    for (const t of this.all) t.dispose();
  }
}

/** RoPE's cos and sin as Hugging Face computes them in f32: [positions][headDim], cos then sin. */
function ropeTable(c: LlamaConfig): Float32Array {
  const half = c.headDim / 2, f = Math.fround;
  const inv = Float64Array.from(
    { length: half },
    (_, i) => f(1 / f(c.ropeTheta ** f((2 * i) / c.headDim))),
  );
  const out = new Float32Array(c.context * c.headDim);
  for (let p = 0; p < c.context; p++) {
    for (let i = 0; i < half; i++) {
      const a = f(p * inv[i]);
      out[p * c.headDim + i] = Math.cos(a);
      out[p * c.headDim + half + i] = Math.sin(a);
    }
  }
  return out;
}

/**
 * A Llama-family causal LM loaded on a backend (see {@link Backend.loadModel}). Dispose it (or
 * `using`) to free its weights; disposing its backend frees them too.
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend({ prefer: "cpu" });
 * using model = kivi.loadModel("../shared/models/byte-llama-9m");
 * let text = "";
 * for await (const t of model.generate("The President said that the", { maxTokens: 16 })) text += t.text;
 * console.log(text);
 * ```
 */
export class LlamaModel {
  /** The sizes read from config.json. */
  readonly config: LlamaConfig;
  /** The checkpoint folder (a random model: "(random weights, seed N)"). */
  readonly dir: string;
  readonly backend: Backend;
  #ops: ModelOps;
  #tensors: DeviceTensor[];
  #embed: DeviceTensor;
  #layers: LayerWeights[];
  #norm: DeviceTensor;
  #head: DeviceTensor;
  #rope: DeviceTensor;
  #bytes: boolean;

  /** The linear layers' precision. */
  readonly matmul: Matmul;

  /** @internal use Backend.loadModel or Backend.randomModel */
  constructor(backend: Backend, source: ModelSource, matmul?: Matmul) {
    const random = typeof source !== "string";
    const config = random ? randomConfig(source.config) : readConfig(source);
    const dir = random ? `(random weights, seed ${source.seed})` : source;
    const want = expectedTensors(config);
    const tensors: DeviceTensor[] = [];
    try {
      if (random) {
        this.#ops = new ModelOps(backend);
        // Seeds of the tensors: the model's seed times 2^16 plus the index (the fill hashes the seed).
        want.forEach((w, i) => {
          const t = backend.alloc(w.shape, "f16");
          tensors.push(t);
          const [mean, std] = randomStats(w.name);
          this.#ops.fillNormal(
            t,
            w.shape.reduce((a, b) => a * b, 1),
            source.seed * 65536 + i,
            mean,
            std,
          );
        });
        tensors.push(
          backend.upload(ropeTable(config), { shape: [config.context, config.headDim] }),
        );
      } else {
        this.#loadCheckpoint(backend, source, config, want, tensors);
        this.#ops = new ModelOps(backend);
      }
    } catch (e) {
      for (const t of tensors) t.dispose();
      throw e;
    }
    this.config = config;
    this.dir = dir;
    this.backend = backend;
    this.matmul = matmul ?? (random ? "f16" : "f32");
    this.#tensors = tensors;
    let i = 0;
    this.#embed = tensors[i++];
    this.#layers = Array.from({ length: config.layers }, () => {
      const [ln1, wq, wk, wv, wo, ln2, gate, up, down] = tensors.slice(i, i += 9);
      return { ln1, wq, wk, wv, wo, ln2, gate, up, down };
    });
    this.#norm = tensors[i++];
    this.#head = config.tied ? this.#embed : tensors[i++];
    this.#rope = tensors[i++];
    this.#bytes = !random && config.vocab === 256 && !existsSync(join(dir, "tokenizer.json"));
    backend._adopt(this);
  }

  /** Checks the checkpoint's names and shapes against `want` (nothing allocated on a mismatch), then
   * uploads its tensors and the RoPE table into `tensors`. */
  #loadCheckpoint(
    backend: Backend,
    dir: string,
    config: LlamaConfig,
    want: { name: string; shape: number[] }[],
    tensors: DeviceTensor[],
  ): void {
    const entries = checkpointTensors(dir);
    const sizes =
      `hidden_size ${config.hidden}, intermediate_size ${config.intermediate}, vocab_size ${config.vocab}, ` +
      `${config.heads} heads and ${config.kvHeads} KV heads of head_dim ${config.headDim}`;
    for (const w of want) {
      const t = entries.get(w.name);
      if (t === undefined) {
        throw new ModelError(
          `missing tensor ${w.name} (shape [${w.shape.join(", ")}]) in ${dir}`,
          dir,
          w.name,
        );
      }
      if (t.shape.length !== w.shape.length || t.shape.some((d, i) => d !== w.shape[i])) {
        throw new ModelError(
          `${basename(t.file)}: tensor ${w.name} has shape [${
            t.shape.join(", ")
          }]; config.json (${sizes}) implies [${w.shape.join(", ")}]`,
          t.file,
          w.name,
        );
      }
    }
    const fds = new Map<string, number>();
    try {
      for (const w of want) {
        const t = entries.get(w.name)!;
        let fd = fds.get(t.file);
        if (fd === undefined) fds.set(t.file, fd = openSync(t.file, "r"));
        tensors.push(backend.upload(readTensorF16(t, fd), { shape: w.shape }));
      }
      tensors.push(backend.upload(ropeTable(config), { shape: [config.context, config.headDim] }));
    } finally {
      for (const fd of fds.values()) closeSync(fd);
    }
  }

  /** True once disposed. */
  get disposed(): boolean {
    return this.#tensors.length === 0;
  }

  /** Bytes the model holds on the backend: the fp16 weights and the f32 RoPE table. */
  get weightBytes(): number {
    return this.#tensors.reduce((n, t) => n + (t.disposed ? 0 : t.bytes), 0);
  }

  /** Token ids of a text (byte models: its UTF-8 bytes), or the ids given as an Int32Array. */
  encode(text: string | Uint8Array | Int32Array): Int32Array {
    if (text instanceof Int32Array) {
      for (let i = 0; i < text.length; i++) {
        if (!(text[i] >= 0 && text[i] < this.config.vocab)) {
          throw new RangeError(
            `token ${i} must be between 0 and ${this.config.vocab - 1}, got ${text[i]}`,
          );
        }
      }
      return text;
    }
    if (!this.#bytes) {
      throw new ModelError(
        `${this.dir}: text needs a tokenizer, and kivi reads byte-level checkpoints only (vocab_size 256, no tokenizer.json); pass token ids as an Int32Array`,
        join(this.dir, "tokenizer.json"),
      );
    }
    return Int32Array.from(typeof text === "string" ? new TextEncoder().encode(text) : text);
  }

  /** The cache for `sequences` sequences of up to `tokens` tokens each. */
  _createCache(o: ModelCacheOptions, sequences: number, tokens: number): KVCache {
    const c = this.config, pageTokens = o.pageTokens ?? 64;
    const need = sequences * Math.ceil(tokens / pageTokens);
    const maxPages = o.maxPages ?? need;
    if (maxPages < need) {
      throw new RangeError(
        `cache.maxPages must hold the run: ${sequences} sequence(s) of up to ${tokens} tokens need ${need} pages of ${pageTokens} tokens, got ${maxPages}`,
      );
    }
    this.backend._native("createCache");
    return new KVCache(this.backend, {
      layers: c.layers,
      kvHeads: c.kvHeads,
      queryHeads: c.heads,
      headDim: c.headDim,
      pageTokens,
      residual: o.residual,
      keys: o.keys,
      values: o.values,
      perLayer: o.perLayer,
      maxPages,
      maxSequences: sequences,
    });
  }

  /** The stack over `rows` rows embedded in a.x (a.pos holding their positions); `attend(layer)` fills
   * a.att from a.q, a.k, a.v; leaves log-probabilities in a.logits. `skipGemm` leaves every linear
   * layer out (the decode bench's timing of the rest). */
  #forward(a: Activations, attend: (layer: number) => void, skipGemm = false): void {
    const c = this.config, o = this.#ops, rows = a.rows;
    const qd = c.heads * c.headDim, kvd = c.kvHeads * c.headDim;
    const lin = skipGemm
      ? () => {}
      : this.matmul === "f16"
      ? o.linearF16.bind(o)
      : o.linear.bind(o);
    o.embed(a.tokens, rows, this.#embed, c.vocab, c.hidden, a.x);
    for (let l = 0; l < c.layers; l++) {
      const w = this.#layers[l];
      o.rmsnorm(a.x, w.ln1, rows, c.hidden, c.eps, a.h);
      lin(a.h, w.wq, rows, qd, c.hidden, a.q);
      lin(a.h, w.wk, rows, kvd, c.hidden, a.k);
      lin(a.h, w.wv, rows, kvd, c.hidden, a.v);
      o.rope(a.q, rows, c.heads, c.headDim, a.pos, this.#rope, c.context);
      o.rope(a.k, rows, c.kvHeads, c.headDim, a.pos, this.#rope, c.context);
      attend(l);
      lin(a.att, w.wo, rows, c.hidden, qd, a.x, true);
      o.rmsnorm(a.x, w.ln2, rows, c.hidden, c.eps, a.h);
      lin(a.h, w.gate, rows, c.intermediate, c.hidden, a.g);
      lin(a.h, w.up, rows, c.intermediate, c.hidden, a.u);
      o.swiglu(a.g, a.u, rows * c.intermediate, a.g);
      lin(a.g, w.down, rows, c.hidden, c.intermediate, a.x, true);
    }
    o.rmsnorm(a.x, this.#norm, rows, c.hidden, c.eps, a.h);
    lin(a.h, this.#head, rows, c.vocab, c.hidden, a.logits);
    o.logSoftmax(a.logits, rows, c.vocab);
  }

  #shape(batch: number, tokens: number) {
    const c = this.config;
    return { batch, tokens, qHeads: c.heads, kvHeads: c.kvHeads, headDim: c.headDim };
  }

  #live(op: string): void {
    if (this.disposed) throw new RangeError(`${op}: the model was disposed; load it again`);
  }

  #checkLength(n: number, what: string): void {
    if (n < 1) throw new RangeError(`${what} must hold at least one token, got 0`);
    if (n > this.config.context) {
      throw new RangeError(
        `${what} holds ${n} tokens, longer than the model's context of ${this.config.context} (max_position_embeddings)`,
      );
    }
  }

  /**
   * The teacher-forced forward over whole sequences of equal length, with exact causal attention in
   * f32 and no cache: log-probabilities [batch][tokens][vocab] of each next token. The oracle of the
   * cached decode.
   */
  teacherForced(seqs: readonly Int32Array[]): Float32Array {
    this.#live("teacherForced");
    const b = seqs.length, t = seqs[0]?.length ?? 0;
    this.#checkLength(t, "each sequence");
    if (seqs.some((s) => s.length !== t)) {
      throw new TypeError(`every sequence must hold ${t} tokens like the first`);
    }
    const a = new Activations(this.backend, this.config, b * t);
    try {
      a.tokens.write(Int32Array.from(seqs.flatMap((s) => [...this.encode(s)])));
      a.pos.write(Int32Array.from({ length: b * t }, (_, i) => i % t));
      this.#forward(a, () => this.#ops.attention(a.q, a.k, a.v, this.#shape(b, t), a.att));
      return a.logits.readSync();
    } finally {
      a.dispose();
    }
  }

  /** Prefills `seq` with `ids` (exact causal attention; each layer's K/V appended to the cache) and
   * returns the log-probabilities of the token after the last [vocab]. */
  _prefill(seq: Sequence, ids: Int32Array): Float32Array {
    this.#live("prefill");
    this.#checkLength(ids.length, "the prompt");
    const a = new Activations(this.backend, this.config, ids.length);
    try {
      a.tokens.write(ids);
      a.pos.write(Int32Array.from(ids, (_, i) => i));
      this.#forward(a, (l) => {
        this.#ops.attention(a.q, a.k, a.v, this.#shape(1, ids.length), a.att);
        seq.append(a.k, a.v, { layer: l });
      });
      return a.logits.readSync().slice((ids.length - 1) * this.config.vocab);
    } finally {
      a.dispose();
    }
  }

  /** A decode loop over `seqs` of `cache`: one decode batch, its buffers made once. With `logits:
   * false` a step neither reads the log-probabilities nor checks the batch (no wait for the device:
   * the caller synchronizes), and tokens / positions are written only when given. */
  _decoder(cache: KVCache, seqs: Sequence[], opts: DecodeOptions = {}): Decoder {
    const logits = opts.logits ?? true, skip = opts.skip;
    const a = new Activations(this.backend, this.config, seqs.length);
    let batch: DecodeBatch;
    try {
      batch = cache.batch(seqs, { q: a.q, out: a.att, k: a.k, v: a.v });
    } catch (e) {
      a.dispose();
      throw e;
    }
    const attend = (l: number) => {
      batch.append(l);
      batch.attend(l);
    };
    // The first step runs whole, so that the buffers a skipped part writes hold a real step's values.
    let first = true;
    return {
      step: (tokens, pos) => {
        if (tokens !== undefined) a.tokens.write(tokens);
        if (pos !== undefined) a.pos.write(pos);
        const whole = first || skip === undefined;
        first = false;
        this.#forward(
          a,
          whole || skip !== "attention" ? attend : () => {},
          !whole && skip === "gemm",
        );
        if (!logits) return new Float32Array(0);
        const out = a.logits.readSync();
        batch.check();
        return out;
      },
      finish: () => batch.synchronizeSync(),
      dispose: () => {
        batch.dispose();
        a.dispose();
      },
    };
  }

  /**
   * Generates up to `maxTokens` tokens after `prompt` (a string, its bytes, or token ids), one at a
   * time as they are decoded: prefill with exact attention, then one decode step a token over the
   * cache. The prompt plus `maxTokens` must fit the model's context and the cache's pool.
   */
  async *generate(
    prompt: string | Uint8Array | Int32Array,
    opts: GenerateOptions = {},
  ): AsyncGenerator<GeneratedToken> {
    this.#live("generate");
    const ids = this.encode(prompt);
    const maxTokens = opts.maxTokens ?? 64,
      temperature = opts.temperature ?? 0,
      topK = opts.topK ?? 0,
      seed = opts.seed ?? 0;
    if (!Number.isInteger(maxTokens) || maxTokens < 1) {
      throw new RangeError(`maxTokens must be a positive integer, got ${maxTokens}`);
    }
    if (!(temperature >= 0 && temperature < Infinity)) {
      throw new RangeError(`temperature must be a finite number >= 0, got ${temperature}`);
    }
    if (!Number.isInteger(topK) || topK < 0) {
      throw new RangeError(`topK must be an integer >= 0, got ${topK}`);
    }
    if (!Number.isInteger(seed)) throw new RangeError(`seed must be an integer, got ${seed}`);
    this.#checkLength(ids.length, "the prompt");
    if (ids.length + maxTokens > this.config.context) {
      throw new RangeError(
        `the prompt (${ids.length} tokens) plus maxTokens (${maxTokens}) must fit the model's context of ${this.config.context}; ask for at most ${
          this.config.context - ids.length
        } tokens`,
      );
    }
    const cache = this._createCache(opts.cache ?? {}, 1, ids.length + maxTokens);
    let decoder: Decoder | undefined;
    try {
      const seq = cache.createSequence();
      let lp = this._prefill(seq, ids);
      decoder = this._decoder(cache, [seq]);
      const rng = new Rng(seed), text = new TextDecoder("utf-8");
      for (let i = 0; i < maxTokens; i++) {
        const token = sample(lp, temperature, topK, rng);
        const piece = this.#bytes
          ? text.decode(new Uint8Array([token]), { stream: i + 1 < maxTokens })
          : "";
        yield { token, text: piece, logprob: lp[token] };
        if (i + 1 < maxTokens) {
          lp = decoder.step(new Int32Array([token]), new Int32Array([ids.length + i]));
        }
      }
    } finally {
      decoder?.dispose();
      cache.dispose();
    }
  }

  /**
   * The model card's perplexity protocol over `text` with the cache of `opts.cache` (by default 24
   * windows of 2048 tokens, 256 prefilled, the rest decoded; every window in one decode batch): bits
   * per token, decode tokens/s, and against `opts.reference` (a bits-16 run's `distributions`, kept
   * with `keep: true`) the KL divergence and top-1 agreement of each step.
   */
  perplexity(text: string | Uint8Array, opts: PerplexityOptions = {}): PerplexityResult {
    this.#live("perplexity");
    return perplexity(this, text, opts);
  }

  /** Frees the weights. Idempotent. */
  dispose(): void {
    if (this.disposed) return;
    for (const t of this.#tensors) t.dispose();
    this.#tensors = [];
    this.backend._forget(this);
  }

  [Symbol.dispose](): void {
    this.dispose();
  }
}

/** The next token from log-probabilities `lp`: the most likely at temperature 0 (the lowest id of a
 * tie), else drawn from softmax(lp / temperature) over the topK most likely (all when 0). */
export function sample(lp: Float32Array, temperature: number, topK: number, rng: Rng): number {
  if (temperature === 0) {
    let best = 0;
    for (let i = 1; i < lp.length; i++) if (lp[i] > lp[best]) best = i;
    return best;
  }
  let ids = Array.from(lp.keys());
  if (topK > 0 && topK < lp.length) ids = ids.sort((a, b) => lp[b] - lp[a] || a - b).slice(0, topK);
  const max = Math.max(...ids.map((i) => lp[i]));
  const w = ids.map((i) => Math.exp((lp[i] - max) / temperature));
  let r = rng.next() * w.reduce((s, x) => s + x, 0);
  for (let j = 0; j < ids.length; j++) {
    r -= w[j];
    if (r < 0) return ids[j];
  }
  return ids[ids.length - 1];
}
