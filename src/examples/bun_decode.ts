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
import { decodeExample, exampleOptions } from "./_byte_llama.ts";

// Bun's own globals, declared here so that `deno check` (which has no Bun types) accepts this file.
declare const Bun: { nanoseconds(): number; argv: string[]; version: string };

const { backend, cfg } = exampleOptions(Bun.argv);
using kivi = await openBackend({ prefer: backend });
await decodeExample(kivi, cfg, () => Bun.nanoseconds() / 1e6, `Bun ${Bun.version}`);
