/**
 * A decoding loop over kivi's quantized paged KV cache, under Deno: a tiny random Llama-shaped
 * attention stack prefills a short random prompt and decodes N steps, once over a 2-bit cache and
 * once over a bits-16 (fp16) cache, and compares the final hidden states (model and loop in
 * _tiny_llama.ts). Only the public API is used (`import ... from "kivi"`).
 *
 *   deno run -A src/examples/deno_decode.ts [--layers 4] [--prompt 96] [--steps 16] [--seed 7] [--backend auto|cpu|cuda]
 *
 * Runs on the CPU build in about a second; on CUDA the inputs are uploaded and results read back.
 *
 * @module
 */
import { openBackend } from "../mod.ts";
import { decodeExample, exampleOptions } from "./_tiny_llama.ts";

const { backend, cfg } = exampleOptions(Deno.args);
using kivi = await openBackend({ prefer: backend });
await decodeExample(kivi, cfg, () => performance.now(), `Deno ${Deno.version.deno}`);
