/**
 * A decoding loop over kivi's quantized paged KV cache, under Bun: a tiny random Llama-shaped
 * attention stack prefills a short random prompt and decodes N steps, once over a 2-bit cache and
 * once over a bits-16 (fp16) cache, and compares the final hidden states (model and loop in
 * _tiny_llama.ts). Only the public API is used (`import ... from "kivi"`).
 *
 *   bun src/examples/bun_decode.ts [--layers 4] [--prompt 96] [--steps 16] [--seed 7] [--backend auto|cpu|cuda]
 *
 * Runs on the CPU build in about a second; on CUDA the inputs are uploaded and results read back.
 *
 * @module
 */
import { openBackend } from "../mod.ts";
import { decodeExample, exampleOptions } from "./_tiny_llama.ts";

// Bun's own globals, declared here so that `deno check` (which has no Bun types) accepts this file.
declare const Bun: { nanoseconds(): number; argv: string[]; version: string };

const { backend, cfg } = exampleOptions(Bun.argv);
using kivi = await openBackend({ prefer: backend });
await decodeExample(kivi, cfg, () => Bun.nanoseconds() / 1e6, `Bun ${Bun.version}`);
