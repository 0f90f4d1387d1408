/**
 * The types the model runner's modules share (llama.ts, perplexity.ts), apart from both so that
 * neither imports the other's types: the cache options of a run, the decode loop, and what the
 * perplexity protocol needs of a model.
 *
 * @module
 */
import type { CacheFormat, KVCache, LayerFormat, Sequence } from "../cache.ts";
import type { LlamaConfig } from "./config.ts";

/** The cache a model run uses (the model gives layers, heads and head_dim). */
export interface ModelCacheOptions {
  /** Key format (the cache's default: uniform 2-bit G32). */
  keys?: CacheFormat;
  /** Value format (the cache's default: codebook 2-bit G64). */
  values?: CacheFormat;
  /** Tokens kept in fp16 (default 128). */
  residual?: number;
  /** Tokens per page (default 64). */
  pageTokens?: number;
  /** Pool size in pages (default: what the run needs). */
  maxPages?: number;
  /** Per-layer formats (a calibration plan's `perLayer`); see CacheOptions.perLayer. */
  perLayer?: readonly LayerFormat[];
}

/** Options of a decode loop (LlamaModel._decoder). */
export interface DecodeOptions {
  /** Read the log-probabilities and check the batch after each step (default true). */
  logits?: boolean;
  /** Leave a part of each step after the first out, for the decode bench's shares of step time: the
   * cache's append and attention, or every linear layer (the first step runs whole, so the buffers
   * the part writes hold a real step's values). */
  skip?: "attention" | "gemm";
}

/** The decode loop state of a batch of sequences: its buffers and its decode batch. */
export interface Decoder {
  /** One step: token b at position pos[b] into sequence b (either left as the last step's when
   * undefined); the next-token log-probabilities [batch][vocab] (empty with `logits: false`). */
  step(tokens?: Int32Array, pos?: Int32Array): Float32Array;
  /** Waits for the device, then throws a deferred error of the batch, if any. */
  finish(): void;
  dispose(): void;
}

/** What the perplexity protocol needs of a model (LlamaModel has it). */
export interface ProtocolModel {
  readonly config: LlamaConfig;
  encode(text: string | Uint8Array | Int32Array): Int32Array;
  teacherForced(seqs: readonly Int32Array[]): Float32Array;
  _createCache(o: ModelCacheOptions, sequences: number, tokens: number): KVCache;
  _prefill(seq: Sequence, ids: Int32Array): Float32Array;
  _decoder(cache: KVCache, seqs: Sequence[]): Decoder;
}
