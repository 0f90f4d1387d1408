/**
 * The model card's perplexity protocol for every cache of the results table at residual 128 and 32:
 * bits per byte of byte-llama-9m on the held-out text, and the KL divergence and top-1 agreement of
 * each decode step's next-byte distribution against the bits-16 run of the same residual. Writes
 * bench/results/<device>-perplexity.json and .md.
 *
 *   bun bench/perplexity.ts [--backend auto|cpu|cuda] [--windows 24] [--steps 1792] [--residuals 128,32]
 *                           [--caches "bits 16"] (names containing it) [--model DIR] [--text FILE] [--out DIR]
 *
 * The windows run as one decode batch (one set of launches a step for all of them); tokens/s counts
 * the decoded bytes of the whole batch over the decode loop's time (prefill excluded).
 *
 * @module
 */
import process from "node:process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { openBackend } from "../src/mod.ts";
import { compareCaches, protocol, PROTOCOL_CACHES } from "../src/model/perplexity.ts";
import { deviceSlug, hostName, parseArgs } from "./_report.ts";

const args = parseArgs(process.argv.slice(2), [
  "backend",
  "windows",
  "steps",
  "residuals",
  "caches",
  "model",
  "text",
  "out",
]);
const root = fileURLToPath(new URL("../", import.meta.url));
const modelDir = args.get("model") ?? `${root}../shared/models/byte-llama-9m`;
const textFile = args.get("text") ?? `${root}../shared/text/heldout.txt`;
const outDir = args.get("out") ?? `${root}bench/results`;
const num = (k: string) => (args.has(k) ? Number(args.get(k)) : undefined);
const residuals = (args.get("residuals") ?? "128,32").split(",").map(Number);
const caches = PROTOCOL_CACHES.filter((c) => c.name.includes(args.get("caches") ?? ""));

using kivi = await openBackend({
  prefer: (args.get("backend") ?? "auto") as "auto" | "cpu" | "cuda",
});
using model = kivi.loadModel(modelDir);
const text = readFileSync(textFile);
const p = protocol(text.length, { windows: num("windows"), steps: num("steps") });
console.log(
  `${kivi.kind} (${kivi.deviceName}) under ${kivi.runtime}: ${p.windows} windows of ${p.window} bytes, ${p.prefill} prefilled, ${p.steps} decoded`,
);
const t0 = performance.now();
let lastRun = "";
const rows = compareCaches(model, text, {
  windows: p.windows,
  steps: p.steps,
  residuals,
  caches,
  onProgress: (run, done, total) => {
    if (run !== lastRun) {
      process.stderr.write(
        `${((performance.now() - t0) / 1000).toFixed(1)} s: ${(lastRun = run)}\n`,
      );
    }
    if (done === total) {
      process.stderr.write(`  done at ${((performance.now() - t0) / 1000).toFixed(1)} s\n`);
    }
  },
});
const seconds = (performance.now() - t0) / 1000;
const result = {
  device: kivi.deviceName,
  backend: kivi.kind,
  runtime: kivi.runtime,
  host: hostName(),
  date: new Date().toISOString().slice(0, 10),
  model: "byte-llama-9m",
  protocol: {
    text: "heldout.txt",
    windows: p.windows,
    window: p.window,
    prefill: p.prefill,
    steps: p.steps,
    starts: "floor(i * (n - 2049) / (windows - 1))",
    bpb: "mean over decoded positions of -log2 p(next byte)",
    klVsBits16:
      "mean over decode steps of KL(bits 16 || cache) of the next-byte distribution, nats",
    top1VsBits16: "share of decode steps whose most likely next byte is the bits-16 run's",
    tokensPerSecond:
      `decoded bytes a second over the whole batch of ${p.windows} windows (decode loop only)`,
    pageTokens: 64,
  },
  seconds: Number(seconds.toFixed(1)),
  rows,
};
const full = p.windows === 24 && p.steps === 1792;
const slug = `${deviceSlug(kivi.deviceName)}-perplexity${full ? "" : `-${p.windows}x${p.steps}`}`;
mkdirSync(outDir, { recursive: true });
writeFileSync(`${outDir}/${slug}.json`, JSON.stringify(result, null, 2) + "\n");
const md = [
  `# Perplexity of byte-llama-9m over each cache: ${kivi.deviceName}`,
  "",
  `${result.date}, ${kivi.kind} build under ${kivi.runtime}; ${p.windows} windows of ${p.window} bytes of heldout.txt, ` +
  `${p.prefill} prefilled with exact attention, ${p.steps} decoded one at a time over the cache (all windows in one decode batch), ` +
  `${result.seconds} s in all. KL (nats) and top-1 compare each step's next-byte distribution with the bits-16 run's; ` +
  `tokens/s counts decoded bytes over the whole batch.`,
  "",
  "| cache | residual | bits/byte | KL vs bits 16 | top-1 vs bits 16 | tokens/s |",
  "| --- | --- | --- | --- | --- | --- |",
  ...rows.map((r) =>
    `| ${r.cache} | ${r.residual} | ${r.bpb.toFixed(4)} | ${r.klVsBits16.toExponential(2)} | ${
      (100 * r.top1VsBits16).toFixed(2)
    } % | ${r.tokensPerSecond.toFixed(0)} |`
  ),
  "",
].join("\n");
writeFileSync(`${outDir}/${slug}.md`, md);
console.log(md);
console.log(`wrote ${outDir}/${slug}.json and .md`);
