/**
 * The model commands of the kivi command line (src/cli.ts dispatches here):
 *
 *   kivi generate --model DIR --prompt "..." [--max-tokens N] [--temperature T] [--top-k K] [--seed S]
 *                 [--keys F] [--values F] [--residual R] [--backend auto|cpu|cuda]
 *   kivi perplexity --model DIR --text FILE [--windows N] [--steps N] [--residual R] [--keys F --values F]
 *                   [--plan plan.json] [--bytes FROM:TO] [--backend auto|cpu|cuda] [--json]
 *   kivi calibrate --model DIR --text FILE --budget BITS [--residual R] [--out plan.json] [--bytes FROM:TO]
 *                  [--windows N] [--window N] [--prefill N] [--steps N] [--backend auto|cpu|cuda]
 *
 * generate takes --plan too: a calibrated plan's per-layer formats and residual.
 * A cache format F is `16` (fp16) or `KIND:BITS:GROUP` (`uniform:2:32`, `codebook:2:64`).
 *
 * @module
 */
import process from "node:process";
import { readFileSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { type CacheFormat, KiviError, type LayerFormat, openBackend } from "./mod.ts";
import { calibrate, formatName, type Plan, planCache, readPlan } from "./model/calibrate.ts";
import { type CacheSpec, compareCaches, PROTOCOL_CACHES } from "./model/perplexity.ts";

/** Usage of the model commands (part of the CLI's usage). */
export const MODEL_USAGE = `  generate --model DIR --prompt TEXT
                           decode a Hugging Face Llama-family checkpoint over the cache, streaming the
                           text, then tokens/s (--max-tokens N, default 64; --temperature T, default 0:
                           greedy; --top-k K; --seed S; --keys F --values F, default uniform:2:32 and
                           codebook:2:64, or 16; --residual R, default 128)
  perplexity --model DIR --text FILE
                           the model card's perplexity protocol (24 windows of 2048 tokens, 256 prefilled,
                           the rest decoded) for each cache of the results table, a progress bar each
                           (--windows N, --steps N to shorten it; --residual R, default 128; --keys F
                           --values F: that cache only, against bits 16; --plan FILE: a calibrated plan,
                           against bits 16; --bytes FROM:TO of the text, default all)
  calibrate --model DIR --text FILE --budget BITS
                           measure each layer's sensitivity (KL against bits 16 with only its keys, or its
                           values, quantized in each candidate format) over a calibration text, then pick
                           per-layer formats within BITS bits per value (2..16, window excluded); writes the
                           plan JSON to --out FILE or stdout (--residual R, default 128; --bytes FROM:TO of
                           the text, default all; --windows N, --window N, --prefill N, --steps N: the
                           calibration protocol, default 4 windows of 1024 tokens, 512 prefilled, 256
                           decoded). generate and perplexity
                           take it with --plan FILE`;

/** Thrown for a bad model command line (exit code 2). */
export class ModelUsageError extends Error {}

/** `16` or `KIND:BITS:GROUP` as a cache format. */
export function parseFormat(flag: string, s: string): CacheFormat {
  if (s === "16") return { bits: 16 };
  const m = /^(uniform|codebook):(2|4):(32|64|128)$/.exec(s);
  if (!m) {
    throw new ModelUsageError(
      `--${flag} must be 16 or KIND:BITS:GROUP (uniform or codebook, 2 or 4, 32, 64 or 128), got "${s}"`,
    );
  }
  return { kind: m[1] as "uniform", bits: Number(m[2]) as 2, group: Number(m[3]) as 32 };
}

function int(
  flag: string,
  v: string | undefined,
  min: number,
  fallback?: number,
): number | undefined {
  if (v === undefined) return fallback;
  if (!/^[0-9]+$/.test(v) || Number(v) < min || Number(v) > 2 ** 31 - 1) {
    throw new ModelUsageError(`--${flag} must be an integer >= ${min}, got "${v}"`);
  }
  return Number(v);
}

const OPTIONS = {
  model: { type: "string" },
  prompt: { type: "string" },
  text: { type: "string" },
  "max-tokens": { type: "string" },
  temperature: { type: "string" },
  "top-k": { type: "string" },
  seed: { type: "string" },
  keys: { type: "string" },
  values: { type: "string" },
  residual: { type: "string" },
  windows: { type: "string" },
  window: { type: "string" },
  prefill: { type: "string" },
  steps: { type: "string" },
  backend: { type: "string" },
  json: { type: "boolean" },
  plan: { type: "string" },
  budget: { type: "string" },
  out: { type: "string" },
  bytes: { type: "string" },
  help: { type: "boolean" },
} as const;

type Values = ReturnType<typeof parseModelArgs>;

/** Parses a model command's arguments (after the command); a UsageError for anything wrong. */
export function parseModelArgs(command: "generate" | "perplexity" | "calibrate", args: string[]) {
  let values;
  try {
    ({ values } = parseArgs({ args, options: OPTIONS, strict: true, allowPositionals: false }));
  } catch (e) {
    throw new ModelUsageError((e as Error).message);
  }
  if (values.help) return values;
  const need = command === "generate"
    ? ["model", "prompt"]
    : command === "calibrate"
    ? ["model", "text", "budget"]
    : ["model", "text"];
  for (const n of need) {
    if (values[n as "model"] === undefined) throw new ModelUsageError(`${command} needs --${n}`);
  }
  const sampling = ["prompt", "max-tokens", "temperature", "top-k", "seed"];
  const wrong = command === "generate"
    ? ["text", "windows", "window", "prefill", "steps", "json", "budget", "out", "bytes"]
    : command === "calibrate"
    ? [...sampling, "keys", "values", "json", "plan"]
    : [...sampling, "budget", "out", "window", "prefill"];
  for (const n of wrong) {
    if (values[n as "text"] !== undefined) {
      throw new ModelUsageError(`--${n} is not an option of ${command}`);
    }
  }
  if (!["auto", "cpu", "cuda", undefined].includes(values.backend)) {
    throw new ModelUsageError(`--backend must be auto, cpu or cuda, got "${values.backend}"`);
  }
  if ((values.keys === undefined) !== (values.values === undefined) && command === "perplexity") {
    throw new ModelUsageError(`--keys and --values go together for perplexity`);
  }
  if (values.plan !== undefined && (values.keys !== undefined || values.values !== undefined)) {
    throw new ModelUsageError(`--plan gives the formats: leave out --keys and --values`);
  }
  return values;
}

/** The plan of --plan FILE (a usage error naming the file when it cannot be read or is no plan). */
function planOf(file: string): Plan {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (e) {
    throw new ModelUsageError(`--plan: cannot read "${file}": ${(e as Error).message}`);
  }
  try {
    return readPlan(text);
  } catch (e) {
    throw new ModelUsageError(`--plan "${file}": ${(e as Error).message}`);
  }
}

function cacheOf(v: Values): {
  keys?: CacheFormat;
  values?: CacheFormat;
  perLayer?: readonly LayerFormat[];
  residual?: number;
} {
  const residual = int("residual", v.residual, 1);
  if (v.plan !== undefined) {
    const p = planCache(planOf(v.plan));
    return { ...p, residual: residual ?? p.residual };
  }
  return {
    keys: v.keys === undefined ? undefined : parseFormat("keys", v.keys),
    values: v.values === undefined ? undefined : parseFormat("values", v.values),
    residual,
  };
}

/** --budget as a number of bits per value in 2..16. */
function budgetOf(s: string): number {
  const b = Number(s);
  if (!/^[0-9]+(\.[0-9]+)?$/.test(s) || !(b >= 2 && b <= 16)) {
    throw new ModelUsageError(`--budget must be a number of bits per value in 2..16, got "${s}"`);
  }
  return b;
}

/** --bytes FROM:TO as a byte range of a text of n bytes (default all of it). */
function bytesOf(s: string | undefined, n: number): [number, number] {
  if (s === undefined) return [0, n];
  const m = /^([0-9]+):([0-9]+)$/.exec(s);
  const from = m ? Number(m[1]) : NaN, to = m ? Number(m[2]) : NaN;
  if (!m || from >= to || to > n) {
    throw new ModelUsageError(
      `--bytes must be FROM:TO with FROM < TO <= the text's ${n} bytes, got "${s}"`,
    );
  }
  return [from, to];
}

async function generate(
  v: Values,
  out: (s: string) => void,
  write: (s: string) => void,
): Promise<void> {
  const cache = cacheOf(v);
  const temperature = v.temperature === undefined ? 0 : Number(v.temperature);
  if (!(temperature >= 0 && temperature < Infinity)) {
    throw new ModelUsageError(`--temperature must be a number >= 0, got "${v.temperature}"`);
  }
  const opts = {
    maxTokens: int("max-tokens", v["max-tokens"], 1, 64),
    temperature,
    topK: int("top-k", v["top-k"], 0, 0),
    seed: int("seed", v.seed, 0, 0),
    cache,
  };
  using kivi = await openBackend({ prefer: (v.backend ?? "auto") as "auto" });
  using model = kivi.loadModel(v.model!);
  write(v.prompt!);
  let n = 0, t1 = 0;
  const t0 = performance.now();
  for await (const t of model.generate(v.prompt!, opts)) {
    if (n++ === 0) t1 = performance.now();
    write(t.text);
  }
  const t2 = performance.now();
  const rate = n > 1 ? ((n - 1) / ((t2 - t1) / 1000)).toFixed(1) : "-";
  write("\n");
  out(
    `${n} tokens on ${kivi.kind} (${kivi.deviceName}): prefill ${
      (t1 - t0).toFixed(1)
    } ms, decode ${rate} tokens/s (batch 1)`,
  );
}

function bar(label: string, done: number, total: number): string {
  const w = 30, f = Math.round((done / total) * w);
  return `${label.padEnd(48)} [${"#".repeat(f)}${"-".repeat(w - f)}] ${done}/${total}`;
}

async function perplexityCmd(
  v: Values,
  out: (s: string) => void,
  progress: (run: string, done: number, total: number) => void,
): Promise<void> {
  const c = cacheOf(v);
  const caches: CacheSpec[] = c.keys === undefined ? [...PROTOCOL_CACHES] : [PROTOCOL_CACHES[0], {
    name: v.plan !== undefined ? `plan ${v.plan}` : `keys ${v.keys}, values ${v.values}`,
    keys: c.keys,
    values: c.values!,
    perLayer: c.perLayer,
  }];
  const all = readFileSync(v.text!);
  const [from, to] = bytesOf(v.bytes, all.length);
  const text = all.subarray(from, to);
  using kivi = await openBackend({ prefer: (v.backend ?? "auto") as "auto" });
  using model = kivi.loadModel(v.model!);
  const rows = compareCaches(model, text, {
    caches,
    residuals: [c.residual ?? 128],
    windows: int("windows", v.windows, 1),
    steps: int("steps", v.steps, 1),
    onProgress: progress,
  });
  if (v.json) {
    out(
      JSON.stringify(
        { backend: kivi.kind, device: kivi.deviceName, model: v.model, rows },
        null,
        2,
      ),
    );
    return;
  }
  out(
    `${
      "cache".padEnd(34)
    } residual  bits/value  bits/byte  KL vs bits 16  top-1 vs bits 16  tokens/s (batch)`,
  );
  for (const r of rows) {
    out(
      `${r.cache.padEnd(34)} ${String(r.residual).padStart(8)}  ${
        r.bitsPerValue.toFixed(3).padStart(10)
      }  ${r.bpb.toFixed(4).padStart(9)}  ${r.klVsBits16.toExponential(3).padStart(13)}  ` +
        `${(100 * r.top1VsBits16).toFixed(2).padStart(15)} %  ${
          r.tokensPerSecond.toFixed(0).padStart(16)
        }`,
    );
  }
}

async function calibrateCmd(
  v: Values,
  out: (s: string) => void,
  progress: (run: string, done: number, total: number) => void,
): Promise<void> {
  const budget = budgetOf(v.budget!);
  const residual = int("residual", v.residual, 0, 128)!;
  const all = readFileSync(v.text!);
  const [from, to] = bytesOf(v.bytes, all.length);
  using kivi = await openBackend({ prefer: (v.backend ?? "auto") as "auto" });
  using model = kivi.loadModel(v.model!);
  const plan = calibrate(model, all.subarray(from, to), {
    budget,
    residual,
    windows: int("windows", v.windows, 1),
    window: int("window", v.window, 2),
    prefill: int("prefill", v.prefill, 1),
    steps: int("steps", v.steps, 1),
    onProgress: progress,
  });
  const json = JSON.stringify({ ...plan, text: { file: v.text, bytes: [from, to] } }, null, 2);
  if (v.out === undefined) {
    out(json);
    return;
  }
  writeFileSync(v.out, json + "\n");
  out(
    `plan for ${budget} bits per value at residual ${residual}: ${
      plan.bitsPerValue.toFixed(3)
    } bits per value, predicted KL ${
      plan.predictedKl.toExponential(3)
    } (bytes ${from}..${to} of ${v.text})`,
  );
  for (const l of plan.perLayer) {
    out(`  layer ${l.layer}: keys ${formatName(l.keys)}, values ${formatName(l.values)}`);
  }
  out(`wrote ${v.out}`);
}

/** Runs `kivi generate`, `kivi perplexity` or `kivi calibrate`; returns the exit code. */
export async function modelMain(
  argv: string[],
  out: (s: string) => void,
  err: (s: string) => void,
  usage: string,
  write: (s: string) => void = (s) => void process.stdout.write(s),
): Promise<number> {
  const command = argv[0] as "generate" | "perplexity" | "calibrate";
  let v: Values;
  try {
    v = parseModelArgs(command, argv.slice(1));
    if (v.help) {
      out(usage);
      return 0;
    }
    if (command === "calibrate") {
      budgetOf(v.budget!);
      int("residual", v.residual, 0);
    } else cacheOf(v);
  } catch (e) {
    if (!(e instanceof ModelUsageError)) throw e;
    err(`kivi: ${e.message}\n\n${usage}`);
    return 2;
  }
  // A bar redrawn in place on a terminal; in a log, a line at the start and each quarter of a run.
  const tty = (process.stderr as { isTTY?: boolean }).isTTY === true;
  const progress = (run: string, done: number, total: number) => {
    if (tty) {
      process.stderr.write(
        done === total ? `\r${" ".repeat(100)}\r` : `\r${bar(run, done, total)}`,
      );
    } else if (
      done === 1 || Math.floor((4 * done) / total) !== Math.floor((4 * (done - 1)) / total)
    ) process.stderr.write(`${bar(run, done, total)}\n`);
  };
  try {
    if (command === "generate") await generate(v, out, write);
    else if (command === "calibrate") await calibrateCmd(v, out, progress);
    else await perplexityCmd(v, out, progress);
    return 0;
  } catch (e) {
    if (e instanceof ModelUsageError) {
      err(`kivi: ${e.message}\n\n${usage}`);
      return 2;
    }
    const msg = e instanceof KiviError
      ? `${e.code} in ${e.op}: ${e.message}`
      : (e as Error).message;
    err(`kivi ${command}: ${msg}`);
    return 1;
  }
}
