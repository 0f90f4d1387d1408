/**
 * A real model over kivi's 2-bit cache, under Deno: byte-llama-9m (a trained 6-layer byte-level
 * Llama) generates greedily from a prompt over a 2-bit cache and over a bits-16 cache, step by step
 * side by side (the loop in _byte_llama.ts). Only the public API is used (`import ... from "kivi"`).
 *
 *   deno run -A src/examples/deno_decode.ts [--model DIR] [--prompt TEXT] [--steps 32] [--backend auto|cpu|cuda]
 *
 * Runs on the CPU build in about a second.
 *
 * @module
 */
import { openBackend } from "../mod.ts";
import { decodeExample, DEFAULT_MODEL, DEFAULT_PROMPT } from "./_byte_llama.ts";

function option(name: string, fallback: number): number {
  const i = Deno.args.indexOf(`--${name}`);
  const v = i >= 0 ? Number(Deno.args[i + 1]) : fallback;
  if (!Number.isInteger(v) || v < 0) {
    throw new RangeError(`--${name} must be a non-negative integer, got ${Deno.args[i + 1]}`);
  }
  return v;
}
const backend = Deno.args.includes("--backend")
  ? Deno.args[Deno.args.indexOf("--backend") + 1]
  : "auto";
if (backend !== "auto" && backend !== "cpu" && backend !== "cuda") {
  throw new RangeError(`--backend must be auto, cpu or cuda, got ${backend}`);
}

using kivi = await openBackend({ prefer: backend });
const text = (
  name: string,
  fallback: string,
) => (Deno.args.includes(`--${name}`) ? Deno.args[Deno.args.indexOf(`--${name}`) + 1] : fallback);
const cfg = {
  model: text("model", DEFAULT_MODEL),
  prompt: text("prompt", DEFAULT_PROMPT),
  steps: option("steps", 32),
};
await decodeExample(kivi, cfg, () => performance.now(), `Deno ${Deno.version.deno}`);
