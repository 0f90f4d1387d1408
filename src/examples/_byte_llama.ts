/**
 * The loop shared by the two examples (bun_decode.ts, deno_decode.ts): a real trained model,
 * byte-llama-9m (a 6-layer byte-level Llama in the Hugging Face layout), generates greedily from a
 * prompt twice, once over a 2-bit cache (uniform keys G32, codebook values G64, a 32-token fp16
 * window) and once over a bits-16 cache, and prints each step of both side by side with how often
 * they agree. Only the public API is used.
 *
 * @module
 */
import { fileURLToPath } from "node:url";
import { type Backend, bitsPerValue, type CacheFormat, type GeneratedToken } from "../mod.ts";

/** What the example runs. */
export interface ExampleConfig {
  /** The checkpoint folder. */
  model: string;
  prompt: string;
  steps: number;
}

/** The default checkpoint: ../shared/models/byte-llama-9m beside the repository. */
export const DEFAULT_MODEL = fileURLToPath(
  new URL("../../../shared/models/byte-llama-9m", import.meta.url),
);

/** The default prompt: long enough that the 2-bit cache quantizes most of it at prefill. */
export const DEFAULT_PROMPT =
  "I am pleased to report to the Congress that the state of the Union is strong, and that our " +
  "people are at work. The President said that the";

/** The examples' command line: `--model DIR`, `--prompt TEXT`, `--steps N` (32) and `--backend
 * auto|cpu|cuda` (auto), read from `args` (the runtime's arguments). */
export function exampleOptions(
  args: readonly string[],
): { backend: "auto" | "cpu" | "cuda"; cfg: ExampleConfig } {
  const text = (name: string, fallback: string) =>
    args.includes(`--${name}`) ? args[args.indexOf(`--${name}`) + 1] : fallback;
  const option = (name: string, fallback: number): number => {
    const i = args.indexOf(`--${name}`);
    const v = i >= 0 ? Number(args[i + 1]) : fallback;
    if (!Number.isInteger(v) || v < 0) {
      throw new RangeError(`--${name} must be a non-negative integer, got ${args[i + 1]}`);
    }
    return v;
  };
  const backend = text("backend", "auto");
  if (backend !== "auto" && backend !== "cpu" && backend !== "cuda") {
    throw new RangeError(`--backend must be auto, cpu or cuda, got ${backend}`);
  }
  return {
    backend,
    cfg: {
      model: text("model", DEFAULT_MODEL),
      prompt: text("prompt", DEFAULT_PROMPT),
      steps: option("steps", 32),
    },
  };
}

const KEYS = { kind: "uniform", bits: 2, group: 32 } as const;
const VALUES = { kind: "codebook", bits: 2, group: 64 } as const;

async function run(
  kivi: Backend,
  cfg: ExampleConfig,
  keys: CacheFormat,
  values: CacheFormat,
  clock: () => number,
) {
  using model = kivi.loadModel(cfg.model);
  const out: GeneratedToken[] = [];
  const t0 = clock();
  for await (
    const t of model.generate(cfg.prompt, {
      maxTokens: cfg.steps,
      cache: { keys, values, residual: 32 },
    })
  ) out.push(t);
  return { tokens: out, ms: clock() - t0, config: model.config };
}

/** Runs the example and prints it. `clock` is the runtime's millisecond clock; `runtime` names it. */
export async function decodeExample(
  kivi: Backend,
  cfg: ExampleConfig,
  clock: () => number,
  runtime: string,
): Promise<void> {
  console.log(`kivi ${kivi.kind} backend under ${runtime}: ${kivi.reason}`);
  const q = await run(kivi, cfg, KEYS, VALUES, clock);
  const b = await run(kivi, cfg, { bits: 16 }, { bits: 16 }, clock);
  const c = q.config;
  console.log(
    `model: ${cfg.model} (${c.layers} layers, ${c.heads} query heads / ${c.kvHeads} KV heads x ${c.headDim} dims); ` +
      `prompt ${new TextEncoder().encode(cfg.prompt).length} bytes, ${cfg.steps} decode steps`,
  );
  const show = (t: GeneratedToken) => JSON.stringify(String.fromCharCode(t.token));
  let agree = 0;
  q.tokens.forEach((t, i) => {
    const r = b.tokens[i];
    if (t.token === r.token) agree++;
    console.log(
      `step ${String(i + 1).padStart(3)}: ${show(t)} log p ${t.logprob.toFixed(3)} (bits 16: ${
        show(r)
      } ${r.logprob.toFixed(3)})`,
    );
  });
  console.log(`2-bit cache: ${JSON.stringify(cfg.prompt + q.tokens.map((t) => t.text).join(""))}`);
  console.log(
    `bits-16 cache: ${JSON.stringify(cfg.prompt + b.tokens.map((t) => t.text).join(""))}`,
  );
  console.log(
    `keys ${bitsPerValue(KEYS)} and values ${bitsPerValue(VALUES)} bits per value ` +
      `outside the 32-token fp16 window; ${(q.ms / cfg.steps).toFixed(2)} ms a token (bits 16: ${
        (b.ms / cfg.steps).toFixed(2)
      })`,
  );
  console.log(`agreement with bits 16: ${agree} of ${cfg.steps} tokens`);
}
