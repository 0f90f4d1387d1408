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
import { decodeExample, exampleOptions } from "./_byte_llama.ts";

const { backend, cfg } = exampleOptions(Deno.args);
using kivi = await openBackend({ prefer: backend });
await decodeExample(kivi, cfg, () => performance.now(), `Deno ${Deno.version.deno}`);
