/**
 * A real model over kivi's 2-bit cache, under Bun: byte-llama-9m (a trained 6-layer byte-level
 * Llama) generates greedily from a prompt over a 2-bit cache and over a bits-16 cache, step by step
 * side by side (the loop in _byte_llama.ts). Only the public API is used (`import ... from "kivi"`).
 *
 *   bun src/examples/bun_decode.ts [--model DIR] [--prompt TEXT] [--steps 32] [--backend auto|cpu|cuda]
 *
 * Runs on the CPU build in about a second.
 *
 * @module
 */
import { openBackend } from "../mod.ts";
import { decodeExample, DEFAULT_MODEL, DEFAULT_PROMPT } from "./_byte_llama.ts";

// Bun's own globals, declared here so that `deno check` (which has no Bun types) accepts this file.
declare const Bun: { nanoseconds(): number; argv: string[]; version: string };

function option(name: string, fallback: number): number {
  const i = Bun.argv.indexOf(`--${name}`);
  const v = i >= 0 ? Number(Bun.argv[i + 1]) : fallback;
  if (!Number.isInteger(v) || v < 0) {
    throw new RangeError(`--${name} must be a non-negative integer, got ${Bun.argv[i + 1]}`);
  }
  return v;
}
const backend = Bun.argv.includes("--backend")
  ? Bun.argv[Bun.argv.indexOf("--backend") + 1]
  : "auto";
if (backend !== "auto" && backend !== "cpu" && backend !== "cuda") {
  throw new RangeError(`--backend must be auto, cpu or cuda, got ${backend}`);
}

using kivi = await openBackend({ prefer: backend });
const text = (
  name: string,
  fallback: string,
) => (Bun.argv.includes(`--${name}`) ? Bun.argv[Bun.argv.indexOf(`--${name}`) + 1] : fallback);
const cfg = {
  model: text("model", DEFAULT_MODEL),
  prompt: text("prompt", DEFAULT_PROMPT),
  steps: option("steps", 32),
};
await decodeExample(kivi, cfg, () => Bun.nanoseconds() / 1e6, `Bun ${Bun.version}`);
