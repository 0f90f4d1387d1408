/**
 * `npm start`: a Llama-shaped KV cache filled by the seeded synthetic generator (key outlier
 * channels and RoPE, heavy-tailed values, peaked attention), then N decode steps of append +
 * attention in every layer, side by side for three caches of the same shape: bits 16 (fp16, the
 * baseline), uniform 2-bit (KIVI) and kivi's default (uniform 2-bit keys, codebook 2-bit values).
 * Prints memory, attention error against bits 16, and time per step.
 *
 *   bun demo.ts [--layers N] [--heads N] [--kv-heads N] [--prompt N] [--steps N] [--seed N] [--backend auto|cpu|cuda] [--json]
 *
 * Progress goes to stderr; with --json the result table is printed to stdout as one JSON object.
 *
 * On CUDA the defaults are 32 layers x 32 heads x 128 dims; on the CPU a smaller shape that
 * finishes in well under a minute on two cores.
 *
 * @module
 */
import process from "node:process";
import {
  type CacheFormat,
  type DeviceTensor,
  KiviError,
  openBackend,
  Rng,
  synthKV,
} from "./src/mod.ts";
import { demoShape, parseDemoOptions, UsageError } from "./src/cli.ts";
import { parseArgs } from "./bench/_report.ts";

const USAGE =
  "usage: bun demo.ts [--layers N] [--heads N] [--kv-heads N] [--prompt N] [--steps N] [--seed N] [--backend auto|cpu|cuda] [--json]";
const argv = process.argv.slice(2);
let args = new Map<string, string>();
/** A bad command line: the message and the usage, exit 2; any other failure: one line (a KiviError's
 * code, op and message), exit 1. */
function fail(e: unknown): never {
  if (e instanceof UsageError) {
    console.error(`demo: ${e.message}\n\n${USAGE}`);
    process.exit(2);
  }
  console.error(
    `demo: ${
      e instanceof KiviError
        ? `${e.code} in ${e.op}: ${e.message}`
        : e instanceof Error
        ? e.message
        : String(e)
    }`,
  );
  process.exit(1);
}

let given;
try {
  given = parseDemoOptions(argv); // a bad command line is a UsageError before parseArgs sees it
  args = parseArgs(argv, ["layers", "heads", "kv-heads", "prompt", "steps", "seed", "backend"], [
    "json",
  ]);
  if (!["auto", "cpu", "cuda"].includes(args.get("backend") ?? "auto")) {
    throw new UsageError(`--backend must be auto, cpu or cuda, got "${args.get("backend")}"`);
  }
  await demo(); // shapes that do not fit the backend's defaults are UsageErrors too
} catch (e) {
  fail(e);
}

async function demo(): Promise<void> {
  using kivi = await openBackend({
    prefer: (args.get("backend") ?? "auto") as "auto" | "cpu" | "cuda",
  });
  const gpu = kivi.kind === "cuda";
  const { layers, heads, kvHeads, prompt, steps, seed } = demoShape(given!, gpu);
  const headDim = 128;
  const json = args.has("json");
  /** Human-readable lines: stdout normally, stderr with --json (stdout then carries only the JSON). */
  const say = (line: string) => (json ? console.error(line) : console.log(line));
  const progress = (line: string) => process.stderr.write(line);

  say(`kivi demo on ${kivi.deviceName} (${kivi.kind}, ${kivi.runtime}): ${kivi.reason}`);
  say(
    `model: ${layers} layers x ${heads} query heads / ${kvHeads} KV heads x ${headDim} dims; prompt ${prompt} tokens, ${steps} decode steps, seed ${seed}\n`,
  );

  const CB2_G64 = { kind: "codebook", bits: 2, group: 64 } as const;
  const U2_G32 = { kind: "uniform", bits: 2, group: 32 } as const;
  const caches: { name: string; keys: CacheFormat; values: CacheFormat }[] = [
    { name: "bits 16 (fp16 baseline)", keys: { bits: 16 }, values: { bits: 16 } },
    { name: "uniform 2-bit (KIVI)", keys: U2_G32, values: U2_G32 },
    { name: "codebook 2-bit (kivi default)", keys: U2_G32, values: CB2_G64 },
  ];

  type Data = Float32Array | Float16Array | DeviceTensor;
  /** Host fp32 on the CPU; fp16 uploaded to the device on CUDA. */
  function put(x: Float32Array, shape: number[]): Data {
    return gpu ? kivi.upload(Float16Array.from(x), { shape }) : x;
  }
  function drop(x: Data): void {
    if (!ArrayBuffer.isView(x)) x.dispose();
  }

  const totalPages = Math.ceil((prompt + steps) / 64) + 2;
  const runs = caches.map((c) => {
    const cache = kivi.createCache({
      layers,
      kvHeads,
      queryHeads: heads,
      headDim,
      pageTokens: 64,
      residual: 128,
      keys: c.keys,
      values: c.values,
      maxPages: totalPages,
      maxSequences: 1,
    });
    return { ...c, cache, seq: cache.createSequence(), ms: 0, err: 0, errN: 0 };
  });

  // Prefill: one synthetic block per layer (layers differ by seed), appended to every cache.
  const t0 = performance.now();
  for (let l = 0; l < layers; l++) {
    const { keys, values } = synthKV({ seed: seed * 1000 + l, tokens: prompt, kvHeads, headDim });
    const k = put(keys, [prompt, kvHeads, headDim]), v = put(values, [prompt, kvHeads, headDim]);
    for (const r of runs) r.seq.append(k, v, { layer: l, trusted: true });
    drop(k);
    drop(v);
    progress(`\rprefill: layer ${l + 1}/${layers}`);
  }
  progress(`\r`);
  say(
    `prefill: ${layers} layers x ${prompt} tokens in ${
      ((performance.now() - t0) / 1e3).toFixed(1)
    } s`,
  );

  // Decode: each step appends one token per layer and attends with a query that leans on a few past
  // keys (peaked attention, as in real models), in every cache.
  const rng = new Rng(seed);
  const lastKeys: Float32Array[] = [];
  for (let step = 0; step < steps; step++) {
    for (let l = 0; l < layers; l++) {
      const { keys, values } = synthKV({
        seed: seed * 7777 + step * layers + l,
        tokens: 1,
        kvHeads,
        headDim,
        position: prompt + step,
      });
      lastKeys[l] = keys;
      const qh = new Float32Array(heads * headDim);
      for (let h = 0; h < heads; h++) {
        const kh = Math.floor(h / (heads / kvHeads));
        for (let d = 0; d < headDim; d++) {
          qh[h * headDim + d] = 0.5 * keys[kh * headDim + d] + rng.normal();
        }
      }
      const k = put(keys, [1, kvHeads, headDim]),
        v = put(values, [1, kvHeads, headDim]),
        q = put(qh, [1, heads, headDim]);
      let ref: Float32Array | undefined;
      for (const r of runs) {
        const s = performance.now();
        r.seq.append(k, v, { layer: l, trusted: true });
        const out = r.cache.attend(l, [r.seq], q, { trusted: true });
        const o = (ArrayBuffer.isView(out) ? out : out.readSync()) as Float32Array;
        r.ms += performance.now() - s;
        if (!ArrayBuffer.isView(out)) out.dispose();
        if (ref === undefined) ref = o;
        else {
          let num = 0, den = 0;
          for (let i = 0; i < o.length; i++) {
            num += (o[i] - ref[i]) ** 2;
            den += ref[i] ** 2;
          }
          r.err += Math.sqrt(num / den);
          r.errN++;
        }
      }
      drop(k);
      drop(v);
      drop(q);
    }
    progress(`\rdecode: step ${step + 1}/${steps}`);
  }
  progress("\r");

  const fp16 = runs[0].cache.memory();
  const table = runs.map((r) => {
    const m = r.cache.memory();
    const bytes = m.codeBytes + m.paramBytes + m.residualBytes;
    return {
      cache: r.name,
      kvBytes: bytes,
      bitsPerValue: m.bitsPerValue,
      ofFp16: bytes / (fp16.codeBytes + fp16.residualBytes),
      attentionError: r.errN ? r.err / r.errN : null,
      msPerStep: r.ms / steps,
    };
  });
  if (json) {
    console.log(JSON.stringify({
      device: kivi.deviceName,
      backend: kivi.kind,
      runtime: kivi.runtime,
      model: { layers, heads, kvHeads, headDim, prompt, steps, seed },
      rows: table,
    }));
  } else {
    console.log(
      "cache".padEnd(32) + "KV bytes".padStart(12) + "bits/value".padStart(12) +
        "vs fp16".padStart(9) +
        "attn error vs fp16".padStart(20) + "ms/step (all layers)".padStart(22),
    );
    for (const t of table) {
      console.log(
        t.cache.padEnd(32) + `${(t.kvBytes / 1e6).toFixed(1)} MB`.padStart(12) +
          t.bitsPerValue.toFixed(2).padStart(12) +
          `${(t.ofFp16 * 100).toFixed(1)}%`.padStart(9) +
          (t.attentionError === null ? "-" : t.attentionError.toExponential(2)).padStart(20) +
          t.msPerStep.toFixed(2).padStart(22),
      );
    }
    console.log(
      `\nattn error: relative L2 error of each layer's attention output against the bits-16 cache, averaged over layers and steps.` +
        `\nms/step: append + attend of one token in all ${layers} layers, from TypeScript (argument checks and FFI included).`,
    );
  }
  for (const r of runs) r.cache.dispose();
}
