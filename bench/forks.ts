/**
 * Memory of shared prefixes (issue 17): one sequence of a 32768-token prompt, then 64 forks of it,
 * `cache.memory()` before and after. Pages (codes and params) are shared by reference; each fork's
 * fp16 residual window is its own.
 *
 *   bun bench/forks.ts [--backend cpu|cuda]
 *
 * @module
 */
import { openBackend } from "../src/mod.ts";
import { parseArgs } from "node:util";

const { values } = parseArgs({ options: { backend: { type: "string", default: "cpu" } } });
using kivi = await openBackend({ prefer: values.backend as "cpu" | "cuda" });
const T = 32768, chunk = 4096, layers = 2, kvHeads = 2, headDim = 64;
using cache = kivi.createCache({
  layers,
  kvHeads,
  queryHeads: 8,
  headDim,
  maxPages: layers * (T / 64) + 200,
  maxSequences: 80,
});
const seq = cache.createSequence();
const k = Float32Array.from(
  { length: layers * chunk * kvHeads * headDim },
  (_, i) => Math.sin(i * 0.01),
);
for (let t = 0; t < T; t += chunk) seq.append(k, k);
const one = cache.memory();
for (let i = 0; i < 64; i++) seq.fork();
const all = cache.memory();
const pages = (m: typeof one) => m.codeBytes + m.paramBytes;
const held = (m: typeof one) => pages(m) + m.residualBytes + m.tableBytes;
console.log(`${kivi.deviceName}: one sequence of ${T} tokens, then 64 forks of it`);
console.log(`pages in use: ${one.pagesUsed} -> ${all.pagesUsed}`);
console.log(
  `codes + params: ${pages(one)} -> ${pages(all)} bytes (${(pages(all) / pages(one)).toFixed(3)}x)`,
);
console.log(`fp16 windows: ${one.residualBytes} -> ${all.residualBytes} bytes (one a sequence)`);
console.log(
  `all held: ${held(one)} -> ${held(all)} bytes (${(held(all) / held(one)).toFixed(3)}x)`,
);
