/**
 * kivi: a KV cache in 2 bits, quantized the KIVI way (uniform, keys per channel, values per token)
 * or with per-group k-means centroids, on CUDA or the CPU reference build, from Bun or Deno.
 *
 * @example
 * ```ts
 * import { openBackend } from "./mod.ts";
 * using kivi = await openBackend(); // CUDA where a device is present, else the CPU build
 * // a tensor of the backend works on both (the CPU backend also takes host arrays directly)
 * using k = kivi.upload(Float32Array.from({ length: 64 * 128 }, (_, i) => Math.sin(i)), { shape: [64, 128] });
 * const q = kivi.quantize(k, { shape: [64, 128], axis: "token", format: { kind: "uniform", bits: 2 } });
 * ```
 *
 * @module
 */
export {
  ABI_VERSION,
  Backend,
  type BackendCore,
  type BackendKind,
  defaultLibraryPath,
  DeviceTensor,
  openBackend,
  type OpenOptions,
} from "./backend.ts";
export type { DType, HostArray, HostOf, TensorDType } from "./_dtype.ts";
export { KiviError, Status, type StatusName } from "./errors.ts";
export {
  type Assign,
  type Axis,
  type Bits,
  bitsPerValue,
  type BlockStats,
  type Buf,
  type CodebookOptions,
  type CodebookQuantized,
  type Fit,
  type FitOptions,
  type FitResult,
  type Format,
  groupCount,
  type GroupSize,
  type Input,
  type Mem,
  type MemOf,
  type Quantized,
  type QuantizeOptions,
  type ResolvedFormat,
  resolveFormat,
  type StatsOptions,
  type UniformQuantized,
  wordCount,
} from "./quant.ts";
export { type SynthKV, synthKV, type SynthOptions } from "./synth.ts";
export { Rng } from "./random.ts";
export {
  type AppendOptions,
  type AttendOptions,
  cacheBitsPerValue,
  type CacheConfig,
  type CacheFormat,
  type CacheMemory,
  type CacheOptions,
  formatBitsPerValue,
  KVCache,
  type LayerFormat,
  pageBytes,
  resolveCacheOptions,
  type ResolvedCacheFormat,
  Sequence,
} from "./cache.ts";
export { BATCH_MAX, type BatchOptions, DecodeBatch } from "./batch.ts";
export {
  type GeneratedToken,
  type GenerateOptions,
  LlamaModel,
  type LoadModelOptions,
  type Matmul,
  type ModelCacheOptions,
  type RandomModelConfig,
  type RandomModelOptions,
} from "./model/llama.ts";
export { type LlamaConfig } from "./model/config.ts";
export {
  calibrate,
  type CalibrateOptions,
  CALIBRATION_BYTES,
  measureSensitivity,
  type Plan,
  planCache,
  planFromSensitivity,
  readPlan,
  type Sensitivity,
  type SensitivityEntry,
  splitHeldout,
} from "./model/calibrate.ts";
export { ModelError } from "./model/safetensors.ts";
export {
  type CacheSpec,
  compareCaches,
  type CompareOptions,
  type PerplexityOptions,
  type PerplexityResult,
  PROTOCOL_CACHES,
  type ProtocolRow,
  teacherForcedBpb,
} from "./model/perplexity.ts";
