/**
 * Backends. `openBackend` loads the CUDA build where a device is present, else the CPU reference
 * build (with the reason), and returns a `Backend` that owns the loaded library, one native context
 * and every `DeviceTensor` allocated through it: the context and memory of tensor.ts, plus the
 * quantizers and caches.
 *
 * @module
 */
import process from "node:process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { NativeLib } from "./ffi/_native.ts";
import { loadNative } from "./ffi/load.ts";
import { KiviError, Status } from "./errors.ts";
import { checkInt, checkOneOf, readOptions, show } from "./_checks.ts";
import { BackendCore, type BackendKind, type DeviceTensor } from "./tensor.ts";
import * as quant from "./quant.ts";
import { type CacheOptions, KVCache } from "./cache.ts";
import {
  LlamaModel,
  type LoadModelOptions,
  type Matmul,
  type RandomModelConfig,
  type RandomModelOptions,
} from "./model/llama.ts";
import type {
  Bits,
  BlockStats,
  Buf,
  CodebookOptions,
  CodebookQuantized,
  FitOptions,
  FitResult,
  Input,
  Mem,
  MemOf,
  Quantized,
  QuantizeOptions,
  StatsOptions,
} from "./quant.ts";
import type { DType } from "./_dtype.ts";

export type { DType, HostArray, HostOf, TensorDType } from "./_dtype.ts";

/** Options of {@link Backend.pack} and {@link Backend.unpack}: the code width, and an out buffer. */
type PackOptions<Out> = { bits: Bits; out?: Out };

/**
 * The ABI version this TypeScript code was written against (kivi.h KIVI_ABI_VERSION).
 *
 * @example
 * ```ts
 * import { ABI_VERSION } from "./mod.ts";
 * console.log(ABI_VERSION); // 2: what kivi_abi_version() must return
 * ```
 */
export const ABI_VERSION = 2;

export {
  BackendCore,
  type BackendKind,
  DeviceTensor,
  NativeState,
  type TensorFacts,
} from "./tensor.ts";

/** Options of {@link openBackend}. */
export interface OpenOptions {
  /** "auto" (default): CUDA where a device is present, else the CPU build. */
  prefer?: "auto" | "cpu" | "cuda";
  /** CUDA device index (default 0). */
  device?: number;
  /** A library to load instead of build/libkivi_*.so (default: the KIVI_LIB_PATH variable). */
  libraryPath?: string;
}

/**
 * Default library locations: build/ beside src/.
 *
 * @example
 * ```ts
 * import { defaultLibraryPath } from "./mod.ts";
 * console.log(defaultLibraryPath("cpu")); // .../build/libkivi_cpu.so
 * ```
 */
export function defaultLibraryPath(kind: BackendKind): string {
  return fileURLToPath(new URL(`../build/libkivi_${kind}.so`, import.meta.url));
}

/**
 * A loaded kivi library with one native context. Dispose it (or `using`) to free its tensors and
 * the context; a disposed backend throws a KiviError on every call.
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend();
 * console.log(kivi.kind, kivi.reason, kivi.deviceName);
 * ```
 */
export class Backend extends BackendCore {
  /**
   * Block statistics per group: min, max, mean, variance of the finite values and the count of
   * NaN/Inf values.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * const x = Float32Array.from({ length: 64 * 8 }, (_, i) => Math.sin(i));
   * const s = kivi.stats(x, { shape: [64, 8], axis: "token", group: 32 });
   * console.log(s.groups, s.stats.slice(0, 4)); // 16 groups: min, max, mean, variance
   * ```
   */
  stats<X extends Input>(x: X, opts: StatsOptions<MemOf<X>>): BlockStats<MemOf<X>> {
    return quant.stats(this, x, opts);
  }

  /**
   * Quantizes and packs x ([tokens, channels]) in one pass: keys with `axis: "token"` (per-channel
   * groups), values with `axis: "channel"` (per-token groups).
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * const k = Float32Array.from({ length: 128 * 64 }, (_, i) => Math.cos(i * 0.37));
   * const q = kivi.quantize(k, { shape: [128, 64], axis: "token", format: { kind: "uniform", bits: 2, group: 32 } });
   * const back = kivi.dequantize(q); // Float32Array, within scale / 2 of k
   * console.log(q.codes.length, back.length); // 512 words, 8192 values
   * ```
   */
  quantize<X extends Input>(x: X, opts: QuantizeOptions<MemOf<X>>): Quantized<MemOf<X>> {
    return quant.quantize(this, x, opts);
  }

  /**
   * Unpacks and dequantizes the result of `quantize` (f32 unless `dtype` says otherwise).
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * const v = Float32Array.from({ length: 4 * 64 }, (_, i) => (i % 7) - 3);
   * const q = kivi.quantize(v, { shape: [4, 64], axis: "channel", format: { kind: "codebook", bits: 2, group: 64 } });
   * const back = kivi.dequantize(q, { dtype: "f16" }); // Float16Array
   * console.log(back.length);
   * ```
   */
  dequantize(q: Quantized<"host">, opts?: { dtype?: "f32"; out?: Float32Array }): Float32Array;
  dequantize(
    q: Quantized<"device">,
    opts?: { dtype?: "f32"; out?: DeviceTensor<"f32"> },
  ): DeviceTensor<"f32">;
  dequantize<M extends Mem>(
    q: Quantized<M>,
    opts?: { dtype?: DType; out?: Buf<M, DType> },
  ): Buf<M, DType>;
  dequantize<M extends Mem>(
    q: Quantized<M>,
    opts: { dtype?: DType; out?: Buf<M, DType> } = {},
  ): Buf<M, DType> {
    return quant.dequantize(this, q, opts);
  }

  /**
   * Fits 2^bits centroids per group by 1-D k-means; `trace: true` also returns the iterations done
   * and the inertia after each one.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * const x = Float32Array.from({ length: 2 * 32 }, (_, i) => Math.tan(i * 0.1));
   * const fit = kivi.fitCodebook(x, { shape: [2, 32], axis: "channel", bits: 2, trace: true });
   * console.log(fit.centroids, fit.iters);
   * ```
   */
  fitCodebook<X extends Input>(x: X, opts: FitOptions<MemOf<X>>): FitResult<MemOf<X>> {
    return quant.fitCodebook(this, x, opts);
  }

  /**
   * Codes of x against centroids you supply ([groups][2^bits] fp16, ascending), under the
   * `nearest` or the seed's `interval` assignment.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * const x = new Float32Array(32).fill(2.5);
   * const c = new Float16Array([0, 1, 4, 6]);
   * const q = kivi.quantizeWithCodebook(x, c, { shape: [1, 32], axis: "channel", bits: 2, assign: "interval" });
   * console.log(kivi.dequantize(q)[0]); // 1
   * ```
   */
  quantizeWithCodebook<X extends Input>(
    x: X,
    centroids: Buf<MemOf<X>, "f16">,
    opts: CodebookOptions<MemOf<X>>,
  ): CodebookQuantized<MemOf<X>> {
    return quant.quantizeWithCodebook(this, x, centroids, opts);
  }

  /**
   * Packs codes (one per byte) into uint32 words, LSB first: 16 codes a word at 2 bits, 8 at 4.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * const words = kivi.pack(new Uint8Array([1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0]), { bits: 2 });
   * console.log(words[0].toString(16)); // "39393939"
   * ```
   */
  pack(codes: Uint8Array, opts: PackOptions<Uint32Array>): Uint32Array;
  pack(codes: DeviceTensor<"u8">, opts: PackOptions<DeviceTensor<"u32">>): DeviceTensor<"u32">;
  pack<M extends Mem>(codes: Buf<M, "u8">, opts: PackOptions<Buf<M, "u32">>): Buf<M, "u32"> {
    return quant.pack(this, codes, opts);
  }

  /**
   * Unpacks uint32 words into codes, one per byte.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * console.log(kivi.unpack(new Uint32Array([0x39393939]), { bits: 2 }).slice(0, 4)); // [1, 2, 3, 0]
   * ```
   */
  unpack(words: Uint32Array, opts: PackOptions<Uint8Array>): Uint8Array;
  unpack(words: DeviceTensor<"u32">, opts: PackOptions<DeviceTensor<"u8">>): DeviceTensor<"u8">;
  unpack<M extends Mem>(words: Buf<M, "u32">, opts: PackOptions<Buf<M, "u8">>): Buf<M, "u8"> {
    return quant.unpack(this, words, opts);
  }

  /**
   * Creates a paged KV cache on this backend (see {@link KVCache}).
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * using cache = kivi.createCache({
   *   layers: 4, kvHeads: 8, queryHeads: 32, headDim: 128, maxPages: 256,
   *   keys: { kind: "uniform", bits: 2, group: 32 }, values: { kind: "codebook", bits: 2, group: 64 },
   * });
   * console.log(cache.memory().poolBytes);
   * ```
   */
  createCache(options: CacheOptions): KVCache {
    this._native("createCache");
    return new KVCache(this, options);
  }

  /**
   * Loads a Hugging Face Llama-family checkpoint (config.json and model.safetensors or a sharded
   * index; fp16, bf16 or f32 tensors, held as fp16) onto this backend. A bad checkpoint throws a
   * `ModelError` naming the file, the tensor and what was expected, with nothing allocated.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * using model = kivi.loadModel("../shared/models/byte-llama-9m");
   * console.log(model.config.layers, model.weightBytes); // 6 19605248 (fp16 weights and the RoPE table)
   * ```
   */
  loadModel(dir: string, opts?: LoadModelOptions): LlamaModel {
    if (typeof dir !== "string") throw new TypeError(`dir must be a string, got ${show(dir)}`);
    const o = readOptions("opts", opts, ["matmul"]);
    const matmul = o.matmul === undefined
      ? undefined
      : checkOneOf<Matmul>("opts.matmul", o.matmul, ["f32", "f16"]);
    this._native("loadModel");
    return new LlamaModel(this, dir, matmul);
  }

  /**
   * A Llama-family model of the given sizes with seeded random weights, made on this backend with no
   * checkpoint (for timings: its outputs mean nothing). Every weight is drawn on the device by
   * `kivi_model_fill_normal` from (seed, tensor, element), so a seed gives the same bits on the CPU
   * and CUDA builds: projections and embeddings N(0, 0.02), norms N(1, 0.02). The linear layers run in
   * fp16 (`matmul: "f16"`) unless asked otherwise. A bad size is a RangeError naming the field.
   *
   * @example
   * ```ts
   * import { openBackend } from "./mod.ts";
   * using kivi = await openBackend({ prefer: "cpu" });
   * const config = { vocab: 256, hidden: 64, layers: 2, heads: 4, kvHeads: 2, headDim: 16, intermediate: 128, context: 64 };
   * using model = kivi.randomModel(config, { seed: 1 });
   * console.log(model.config.layers, model.matmul); // 2 f16
   * ```
   */
  randomModel(config: RandomModelConfig, opts?: RandomModelOptions): LlamaModel {
    const o = readOptions("opts", opts, ["seed", "matmul"]);
    const seed = o.seed === undefined ? 0 : checkInt("opts.seed", o.seed, 0, 2 ** 32 - 1);
    const matmul = o.matmul === undefined
      ? undefined
      : checkOneOf<Matmul>("opts.matmul", o.matmul, ["f32", "f16"]);
    this._native("randomModel");
    return new LlamaModel(this, { config, seed }, matmul);
  }
}

/**
 * The CPU library's path, built first where it is missing (build.ts, a few seconds of gcc; one line
 * on stderr says so). Without build.ts, gcc or the rights to run it and write build/, the error
 * says what failed and how to build it by hand.
 */
async function cpuLibrary(): Promise<string> {
  const path = defaultLibraryPath("cpu");
  if (existsSync(path)) return path;
  process.stderr.write(
    `kivi: ${path} is missing; building it now (gcc, a few seconds; \`bun build.ts\` builds it ahead of time)\n`,
  );
  let why: string;
  try {
    const { build } = await import("../build.ts");
    await build({ cuda: false, log: () => {} });
    if (existsSync(path)) return path;
    why = "build.ts did not write it";
  } catch (e) {
    why = (e as Error).message;
  }
  throw new KiviError(
    Status.KIVI_ERR_STATE,
    "openBackend",
    `openBackend: ${path} is not built and building it failed (${why}); run \`bun build.ts\``,
  );
}

function tryLoadCuda(path: string, device: number): Promise<{ lib?: NativeLib; reason: string }> {
  return (async () => {
    if (!existsSync(path)) {
      return {
        reason:
          `no CUDA build: ${path} is not built (build.ts builds it where a CUDA device is present, or with --cuda)`,
      };
    }
    let lib: NativeLib;
    try {
      lib = await loadNative(path);
    } catch (e) {
      return { reason: `the CUDA build ${path} could not be loaded: ${(e as Error).message}` };
    }
    const n = new Int32Array(1);
    const st = lib.call("kivi_device_count", lib.ptr(n));
    if (st !== 0 || n[0] <= device) {
      lib.close();
      return {
        reason: n[0] === 0
          ? "no CUDA device found"
          : `CUDA device ${device} does not exist (${n[0]} found)`,
      };
    }
    return { lib, reason: `CUDA device ${device} found` };
  })();
}

/**
 * Loads kivi and opens a context. With `prefer: "auto"` it uses the CUDA build when a device is
 * present and otherwise the CPU reference build, saying why in `reason`. `KIVI_LIB_PATH` (or
 * `libraryPath`) loads a given library instead. A missing CPU build is built on first use (a few
 * seconds of gcc, said in one line on stderr) where build.ts and gcc are at hand.
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend({ prefer: "auto" });
 * console.log(`${kivi.kind}: ${kivi.reason}`);
 * ```
 */
export async function openBackend(opts: OpenOptions = {}): Promise<Backend> {
  const o = readOptions("options", opts, ["prefer", "device", "libraryPath"]);
  const prefer = checkOneOf("prefer", o.prefer ?? "auto", ["auto", "cpu", "cuda"] as const);
  const device = checkInt("device", o.device ?? 0, 0, 1024);
  if (o.libraryPath !== undefined && typeof o.libraryPath !== "string") {
    throw new TypeError(`libraryPath must be a string, got ${show(o.libraryPath)}`);
  }
  const override = (o.libraryPath as string | undefined) ?? process.env.KIVI_LIB_PATH;
  let lib: NativeLib | undefined;
  let reason: string;
  if (override) {
    const what = o.libraryPath ? "libraryPath" : "KIVI_LIB_PATH";
    if (!existsSync(override)) {
      throw new TypeError(`${what} must name a kivi library, got ${show(override)}: no such file`);
    }
    try {
      lib = await loadNative(override);
    } catch (e) {
      throw new TypeError(
        `${what} must name a kivi library, got ${show(override)}: ${(e as Error).message}`,
      );
    }
    reason = `loaded ${override} (${what})`;
  } else if (prefer === "cpu") {
    lib = await loadNative(await cpuLibrary());
    reason = "the CPU build was asked for";
  } else {
    const cuda = await tryLoadCuda(defaultLibraryPath("cuda"), device);
    if (cuda.lib) {
      lib = cuda.lib;
      reason = cuda.reason;
    } else if (prefer === "cuda") {
      throw new KiviError(
        Status.KIVI_ERR_NO_DEVICE,
        "openBackend",
        `openBackend: the CUDA build is unusable: ${cuda.reason}`,
      );
    } else {
      lib = await loadNative(await cpuLibrary());
      reason = `using the CPU reference build: ${cuda.reason}`;
    }
  }
  const abi = lib.call("kivi_abi_version");
  if (abi !== ABI_VERSION) {
    lib.close();
    throw new KiviError(
      Status.KIVI_ERR_STATE,
      "openBackend",
      `openBackend: ${lib.path} has ABI version ${abi}, this kivi needs ${ABI_VERSION}; rebuild with \`bun build.ts --force\``,
    );
  }
  const kind: BackendKind = lib.call("kivi_backend_kind") === 1 ? "cuda" : "cpu";
  if (prefer !== "auto" && kind !== prefer) {
    lib.close();
    throw new KiviError(
      Status.KIVI_ERR_STATE,
      "openBackend",
      `openBackend: ${lib.path} is the ${kind} build, but prefer is ${show(prefer)}`,
    );
  }
  const out = new BigUint64Array(1);
  const st = lib.call("kivi_ctx_create", device, lib.ptr(out));
  if (st !== 0) {
    const msg = lib.call("kivi_last_error");
    lib.close();
    throw new KiviError(st, "kivi_ctx_create", msg);
  }
  return new Backend(lib, lib.pointerAt(out, 0), kind, device, reason);
}
