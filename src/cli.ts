#!/usr/bin/env bun
/**
 * The kivi command line: `npx kivi <command>` (Bun) or `deno task kivi <command>`.
 *
 *   kivi info      backend and why, device, library, ABI version, measured copy bandwidth
 *   kivi demo      the Llama-shaped cache demo (what `npm start` runs); flags pass through
 *   kivi bench     the quantizer and attention benchmarks, results in bench/results/<device>.json
 *   kivi accuracy  attention error and bits per value of every format, bit width and group size
 *   kivi generate  decode a Llama-family checkpoint over the cache (cli_model.ts)
 *   kivi perplexity  the model card's perplexity protocol for every cache format (cli_model.ts)
 *   kivi calibrate  per-layer formats within a bits-per-value budget, from measured sensitivities
 *
 * Every command takes --backend auto|cpu|cuda and --json. Exit codes: 0 ok, 1 a failure while
 * running, 2 a bad command line.
 *
 * @module
 */
import process from "node:process";
import { spawnSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import {
  type Backend,
  bitsPerValue,
  type CacheFormat,
  type Format,
  KiviError,
  openBackend,
  Rng,
  synthKV,
} from "./mod.ts";
import { ABI_VERSION } from "./backend.ts";
import { MODEL_USAGE, modelMain } from "./cli_model.ts";

/** A command-line mistake: printed with the usage, exit code 2. */
export class UsageError extends Error {}

const USAGE = `usage: kivi <command> [options]

commands:
  info                     backend, device, library path, ABI version, copy bandwidth
  demo [demo options]      Llama-shaped cache demo (--layers --heads --kv-heads --prompt --steps --seed)
  bench                    quantizer and attention benchmarks -> bench/results/<device>.json and .md
  bench --e2e [options]    decode tokens/s of a Llama-3-8B-shaped model with seeded random weights
                           (timing only) at a long context, per cache -> bench/results/<device>-e2e.*
                           (--layers --context --batch --steps --max-batch --seed --quick --out)
  accuracy                 attention error and bits per value for every format, bits and group size
                           (--tokens N, default 1024; --seed N)
${MODEL_USAGE}

options for every command:
  --backend auto|cpu|cuda  which build to use (default auto: CUDA when a device is present)
  --json                   machine-readable output on stdout
  --help                   this text`;

interface Parsed {
  command: string;
  flags: Map<string, string>;
  rest: string[];
}

const FLAGS: Record<string, "value" | "switch"> = {
  backend: "value",
  json: "switch",
  help: "switch",
  tokens: "value",
  seed: "value",
  e2e: "switch",
};
const COMMANDS = ["info", "demo", "bench", "accuracy", "help"];

/** The demo's own options: each a decimal integer in its range. */
const DEMO_FLAGS: Record<string, [min: number, max: number]> = {
  layers: [1, 4096],
  heads: [1, 4096],
  "kv-heads": [1, 4096],
  prompt: [1, 1 << 20],
  steps: [1, 1 << 20],
  seed: [0, 2 ** 32 - 1],
};

/** The demo's shape; a field left undefined takes the backend's default (see {@link demoShape}). */
export interface DemoOptions {
  layers?: number;
  heads?: number;
  kvHeads?: number;
  prompt?: number;
  steps?: number;
  seed?: number;
}

/** Reads the demo's options (`--layers N` ...; `--backend` and `--json` are left to the caller);
 * anything else, a value that is not a decimal integer in range, or query heads that are not a
 * multiple of the KV heads (at most 32 times them) is a UsageError. */
export function parseDemoOptions(argv: readonly string[]): DemoOptions {
  const o: DemoOptions = {};
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const name = a.startsWith("--") ? a.slice(2) : undefined;
    if (name === "json") continue;
    if (name === "backend") {
      i++;
      continue;
    }
    const range = name === undefined ? undefined : DEMO_FLAGS[name];
    if (range === undefined) {
      throw new UsageError(
        `unknown demo option "${a}"; expected one of ${
          Object.keys(DEMO_FLAGS).map((f) => `--${f}`).join(", ")
        }`,
      );
    }
    const v = argv[++i];
    if (v === undefined || v.startsWith("--")) throw new UsageError(`option ${a} needs a value`);
    const n = Number(v);
    if (!/^[0-9]+$/.test(v) || n < range[0] || n > range[1]) {
      throw new UsageError(`${a} must be an integer from ${range[0]} to ${range[1]}, got "${v}"`);
    }
    const key = name === "kv-heads" ? "kvHeads" : name as keyof DemoOptions;
    o[key] = n;
  }
  if (o.heads !== undefined && o.kvHeads !== undefined) checkHeads(o.heads, o.kvHeads);
  return o;
}

function checkHeads(heads: number, kvHeads: number): void {
  if (heads % kvHeads !== 0 || heads / kvHeads > 32) {
    throw new UsageError(
      `--heads (${heads}) must be a multiple of --kv-heads (${kvHeads}), at most 32 times it`,
    );
  }
}

/** The demo's shape on a backend: on CUDA 32 layers x 32 heads (as many KV heads), prompt 1024, 64
 * steps; on the CPU 4 layers x 16 query / 4 KV heads (as many KV heads as query heads when those are
 * not a multiple of 4), prompt 512, 32 steps. A UsageError when the heads given and the defaults do
 * not fit together. */
export function demoShape(o: DemoOptions, gpu: boolean): Required<DemoOptions> {
  const heads = o.heads ?? (gpu ? 32 : 16);
  const kvHeads = o.kvHeads ?? (gpu || heads % 4 !== 0 ? heads : 4);
  checkHeads(heads, kvHeads);
  return {
    layers: o.layers ?? (gpu ? 32 : 4),
    heads,
    kvHeads,
    prompt: o.prompt ?? (gpu ? 1024 : 512),
    steps: o.steps ?? (gpu ? 64 : 32),
    seed: o.seed ?? 42,
  };
}

/** Parses argv (without the runtime and script). Demo options pass through untouched. */
export function parseCli(argv: string[]): Parsed {
  const [command = "help", ...args] = argv;
  if (command === "--help" || command === "-h") {
    return { command: "help", flags: new Map(), rest: [] };
  }
  if (!COMMANDS.includes(command)) {
    throw new UsageError(`unknown command "${command}"; expected one of ${COMMANDS.join(", ")}`);
  }
  const flags = new Map<string, string>();
  const rest: string[] = [];
  for (let i = 0; i < args.length; i++) {
    const a = args[i];
    if (!a.startsWith("--")) {
      throw new UsageError(`unexpected argument "${a}"; options start with --`);
    }
    const name = a.slice(2);
    // --tokens and --seed are accuracy's; the demo reads its own options (--seed among them).
    const kind = ((name === "tokens" || name === "seed") && command !== "accuracy") ||
        (name === "e2e" && command !== "bench")
      ? undefined
      : FLAGS[name];
    if (kind === undefined) {
      // The demo and the end-to-end bench read their own options.
      if (command !== "demo" && !(command === "bench" && args.includes("--e2e"))) {
        throw new UsageError(`unknown option "${a}" for ${command}`);
      }
      rest.push(a);
      if (args[i + 1] !== undefined && !args[i + 1].startsWith("--")) rest.push(args[++i]);
      continue;
    }
    if (kind === "switch") flags.set(name, "true");
    else {
      const v = args[++i];
      if (v === undefined || v.startsWith("--")) throw new UsageError(`option ${a} needs a value`);
      flags.set(name, v);
    }
  }
  const backend = flags.get("backend") ?? "auto";
  if (!["auto", "cpu", "cuda"].includes(backend)) {
    throw new UsageError(`--backend must be auto, cpu or cuda, got "${backend}"`);
  }
  for (const n of ["tokens", "seed"]) {
    const v = flags.get(n);
    if (v !== undefined && !(/^[0-9]+$/.test(v) && Number(v) > 0 && Number(v) <= 2 ** 20)) {
      throw new UsageError(`--${n} must be a positive integer, got "${v}" (at most ${2 ** 20})`);
    }
  }
  if (command === "demo") parseDemoOptions(rest);
  return { command, flags, rest };
}

function open(p: Parsed): Promise<Backend> {
  return openBackend({ prefer: (p.flags.get("backend") ?? "auto") as "auto" | "cpu" | "cuda" });
}

async function info(p: Parsed, out: (s: string) => void): Promise<void> {
  using kivi = await open(p);
  const copy = kivi.copyBandwidth(
    kivi.kind === "cuda" ? 1 << 30 : 64 << 20,
    kivi.kind === "cuda" ? 20 : 5,
  );
  const mem = kivi.memInfo();
  const r = {
    backend: kivi.kind,
    reason: kivi.reason,
    device: kivi.deviceName,
    runtime: kivi.runtime,
    library: kivi.libraryPath,
    abiVersion: ABI_VERSION,
    copyGBps: Number(copy.toFixed(1)),
    memoryTotalBytes: mem.total,
    memoryFreeBytes: mem.free,
  };
  if (p.flags.has("json")) return out(JSON.stringify(r));
  out(`backend:   ${r.backend} (${r.reason})`);
  out(`device:    ${r.device}`);
  out(`runtime:   ${r.runtime}`);
  out(`library:   ${r.library} (ABI ${r.abiVersion})`);
  out(
    `memory:    ${(r.memoryFreeBytes / 2 ** 30).toFixed(1)} GiB free of ${
      (r.memoryTotalBytes / 2 ** 30).toFixed(1)
    } GiB`,
  );
  out(`copy:      ${r.copyGBps} GB/s (read + write, measured now)`);
}

/** Relative L2 error of attention through `format` caches against a bits-16 cache of the same tokens. */
function attentionError(
  kivi: Backend,
  data: { keys: Float32Array; values: Float32Array },
  q: Float32Array,
  shape: { tokens: number; kvHeads: number; queryHeads: number; headDim: number },
  keys: CacheFormat,
  values: CacheFormat,
): number {
  const run = (k: CacheFormat, v: CacheFormat) => {
    using cache = kivi.createCache({
      layers: 1,
      kvHeads: shape.kvHeads,
      queryHeads: shape.queryHeads,
      headDim: shape.headDim,
      pageTokens: 128,
      residual: 0,
      keys: k,
      values: v,
      maxPages: Math.ceil(shape.tokens / 128) + 1,
      maxSequences: 1,
    });
    using s = cache.createSequence();
    const up = (x: Float32Array) => (kivi.kind === "cpu" ? x : kivi.upload(x));
    const kk = up(data.keys), vv = up(data.values), qq = up(q);
    s.append(kk, vv, { layer: 0 });
    const o = cache.attend(0, [s], qq);
    const host = (ArrayBuffer.isView(o) ? o : o.readSync()) as Float32Array;
    for (const t of [kk, vv, qq, o]) if (!ArrayBuffer.isView(t)) t.dispose();
    return host;
  };
  const ref = run({ bits: 16 }, { bits: 16 });
  const got = run(keys, values);
  let num = 0, den = 0;
  for (let i = 0; i < ref.length; i++) {
    num += (got[i] - ref[i]) ** 2;
    den += ref[i] ** 2;
  }
  return Math.sqrt(num / den);
}

async function accuracy(
  p: Parsed,
  out: (s: string) => void,
  progress: (s: string) => void,
): Promise<void> {
  using kivi = await open(p);
  const tokens = Number(p.flags.get("tokens") ?? 1024);
  const seed = Number(p.flags.get("seed") ?? 7);
  const shape = { tokens: Math.ceil(tokens / 128) * 128, kvHeads: 4, queryHeads: 16, headDim: 128 };
  const cases = [
    { name: "llama-like", opts: {} },
    { name: "gaussian", opts: { outliers: 0, valueTailNu: Infinity } },
  ];
  const formats: { label: string; f: CacheFormat }[] = [];
  for (const bits of [2, 4] as const) {
    for (const group of [32, 64, 128] as const) {
      formats.push({ label: `uniform ${bits}-bit G${group}`, f: { kind: "uniform", bits, group } });
      formats.push({
        label: `codebook ${bits}-bit G${group}`,
        f: { kind: "codebook", bits, group },
      });
    }
  }
  const rows: Record<string, string | number>[] = [];
  let done = 0;
  const total = cases.length * (formats.length * 2 + 2);
  for (const c of cases) {
    const data = synthKV({
      seed,
      tokens: shape.tokens,
      kvHeads: shape.kvHeads,
      headDim: shape.headDim,
      ...c.opts,
    });
    const rng = new Rng(seed + 1);
    // Queries that lean on past keys: attention is peaked in real models.
    const q = new Float32Array(shape.queryHeads * shape.headDim);
    const t0 = rng.int(shape.tokens);
    for (let h = 0; h < shape.queryHeads; h++) {
      const kh = Math.floor(h / (shape.queryHeads / shape.kvHeads));
      for (let d = 0; d < shape.headDim; d++) {
        q[h * shape.headDim + d] = 0.5 * data.keys[(t0 * shape.kvHeads + kh) * shape.headDim + d] +
          rng.normal();
      }
    }
    const measure = (what: string, label: string, k: CacheFormat, v: CacheFormat, bits: number) => {
      const err = attentionError(kivi, data, q, shape, k, v);
      rows.push({
        case: c.name,
        quantized: what,
        format: label,
        "bits/value": bits,
        "attention rel. error": Number(err.toExponential(3)),
      });
      progress(`accuracy: ${++done}/${total}`);
    };
    // Bits per value of the quantized tensor: code bits plus its fp16 params spread over the group.
    for (const { label, f } of formats) {
      const bits = bitsPerValue(f as Format);
      measure("keys", label, f, { bits: 16 }, bits);
      measure("values", label, { bits: 16 }, f, bits);
    }
    measure(
      "both",
      "KIVI: uniform K G32 + uniform V G32",
      { kind: "uniform", bits: 2, group: 32 },
      { kind: "uniform", bits: 2, group: 32 },
      3,
    );
    measure(
      "both",
      "kivi: uniform K G32 + codebook V G64",
      { kind: "uniform", bits: 2, group: 32 },
      { kind: "codebook", bits: 2, group: 64 },
      3,
    );
  }
  progress("");
  if (p.flags.has("json")) {
    return out(
      JSON.stringify({
        device: kivi.deviceName,
        backend: kivi.kind,
        tokens: shape.tokens,
        seed,
        rows,
      }),
    );
  }
  out(
    `attention error against a bits-16 cache; ${shape.tokens} tokens, ${shape.kvHeads} KV / ${shape.queryHeads} query heads x ${shape.headDim}, residual 0, seed ${seed}, ${kivi.deviceName}`,
  );
  out(
    "case        quantized  format                                  bits/value  attention rel. error",
  );
  for (const r of rows) {
    out(
      `${String(r.case).padEnd(12)}${String(r.quantized).padEnd(11)}${String(r.format).padEnd(40)}${
        String(r["bits/value"]).padStart(10)
      }  ${r["attention rel. error"]}`,
    );
  }
}

/** Runs a script of the package with this runtime; `quiet` sends its stdout to our stderr. */
function runScript(script: string, args: string[], quiet = false): number {
  const path = fileURLToPath(new URL(`../${script}`, import.meta.url));
  const runtime = (globalThis as { Deno?: unknown }).Deno
    ? [process.execPath, "run", "-A", path]
    : [process.execPath, path];
  const r = spawnSync(runtime[0], [...runtime.slice(1), ...args], {
    stdio: ["inherit", quiet ? 2 : "inherit", "inherit"],
  });
  return r.status ?? 1;
}

/** Both benchmark suites; with `json`, their sections go to stdout as one object. */
function bench(backendArgs: string[], json: boolean, out: (s: string) => void): number {
  const dir = mkdtempSync(join(tmpdir(), "kivi-bench-"));
  try {
    const sections: Record<string, unknown> = {};
    for (
      const [name, script] of [["quant", "bench/quant.ts"], ["attention", "bench/attention.ts"]]
    ) {
      const file = join(dir, `${name}.json`);
      const rc = runScript(script, [...backendArgs, "--json", file], json);
      if (rc !== 0) return rc;
      sections[name] = JSON.parse(readFileSync(file, "utf8"));
    }
    if (json) out(JSON.stringify(sections));
    return 0;
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** Runs the CLI; returns the exit code. */
export async function main(
  argv: string[],
  out = (s: string) => console.log(s),
  err = (s: string) => console.error(s),
): Promise<number> {
  if (argv[0] === "generate" || argv[0] === "perplexity" || argv[0] === "calibrate") {
    return await modelMain(argv, out, err, USAGE);
  }
  let p: Parsed;
  try {
    p = parseCli(argv);
  } catch (e) {
    if (e instanceof UsageError) {
      err(`kivi: ${e.message}\n\n${USAGE}`);
      return 2;
    }
    throw e;
  }
  if (p.command === "help" || p.flags.has("help")) {
    out(USAGE);
    return 0;
  }
  const tty = (process.stderr as { isTTY?: boolean }).isTTY && !p.flags.has("json");
  const progress = (s: string) => {
    if (tty) process.stderr.write(`\r${s.padEnd(40)}${s ? "" : "\r"}`);
  };
  const backendArgs = p.flags.has("backend") ? ["--backend", p.flags.get("backend")!] : [];
  try {
    switch (p.command) {
      case "info":
        await info(p, out);
        return 0;
      case "accuracy":
        await accuracy(p, out, progress);
        return 0;
      case "demo":
        (await open(p)).dispose(); // a backend that cannot open is one line here, not the script's trace
        return runScript("demo.ts", [
          ...backendArgs,
          ...(p.flags.has("json") ? ["--json"] : []),
          ...p.rest,
        ]);
      case "bench":
        (await open(p)).dispose();
        if (p.flags.has("e2e")) return runScript("bench/e2e.ts", [...backendArgs, ...p.rest]);
        return bench(backendArgs, p.flags.has("json"), out);
    }
  } catch (e) {
    const msg = e instanceof KiviError
      ? `${e.code} in ${e.op}: ${e.message}`
      : (e as Error).message;
    err(`kivi ${p.command}: ${msg}`);
    return 1;
  }
  return 0;
}

if (import.meta.main) process.exit(await main(process.argv.slice(2)));
