/**
 * The model ops of kivi.h (kivi_model_*) on tensors of one backend: each call takes the tensors'
 * addresses (a disposed tensor is KIVI_ERR_STATE) and turns a failed status into a KiviError. The
 * sizes are the caller's (the runner's own buffers); the library checks them against its limits.
 *
 * @module
 */
import type { BackendCore as Backend, DeviceTensor } from "../tensor.ts";
import type { ArgsOf, Pointer } from "../ffi/_native.ts";

/** Bound model ops of a backend. */
export class ModelOps {
  #backend: Backend;
  #ctx: Pointer;
  #embed;
  #rmsnorm;
  #linear;
  #linearF16;
  #fillNormal;
  #rope;
  #swiglu;
  #attention;
  #logSoftmax;

  constructor(backend: Backend) {
    const { lib, ctx } = backend._native("loadModel");
    this.#backend = backend;
    this.#ctx = ctx;
    this.#embed = lib.fn("kivi_model_embed");
    this.#rmsnorm = lib.fn("kivi_model_rmsnorm");
    this.#linear = lib.fn("kivi_model_linear");
    this.#linearF16 = lib.fn("kivi_model_linear_f16");
    this.#fillNormal = lib.fn("kivi_model_fill_normal");
    this.#rope = lib.fn("kivi_model_rope");
    this.#swiglu = lib.fn("kivi_model_swiglu");
    this.#attention = lib.fn("kivi_model_attention");
    this.#logSoftmax = lib.fn("kivi_model_log_softmax");
  }

  #ok(op: string, st: number): void {
    if (st !== 0) this.#backend._check(op, st);
  }

  /** The addresses of `ts` for `op`, in order (a disposed tensor is KIVI_ERR_STATE). */
  #ptrs(op: string, ...ts: DeviceTensor[]): Pointer[] {
    return ts.map((t) => t.pointer(op));
  }

  /** out [rows][dim] = table[tokens] */
  embed(
    tokens: DeviceTensor,
    rows: number,
    table: DeviceTensor,
    vocab: number,
    dim: number,
    out: DeviceTensor,
  ): void {
    const op = "kivi_model_embed";
    const [pTokens, pTable, pOut] = this.#ptrs(op, tokens, table, out);
    this.#ok(op, this.#embed(this.#ctx, pTokens, rows, pTable, vocab, dim, pOut));
  }

  rmsnorm(
    x: DeviceTensor,
    w: DeviceTensor,
    rows: number,
    dim: number,
    eps: number,
    out: DeviceTensor,
  ): void {
    const op = "kivi_model_rmsnorm";
    const [px, pw, pOut] = this.#ptrs(op, x, w, out);
    this.#ok(op, this.#rmsnorm(this.#ctx, px, pw, rows, dim, eps, pOut));
  }

  /** y [rows][n] (+)= x [rows][k] W^T, W fp16 [n][k]. */
  linear(
    x: DeviceTensor,
    w: DeviceTensor,
    rows: number,
    n: number,
    k: number,
    y: DeviceTensor,
    accumulate = false,
  ): void {
    this.#gemm("kivi_model_linear", this.#linear, x, w, rows, n, k, y, accumulate);
  }

  /** As {@link linear}, with x rounded to fp16 and fp16 products summed in f32 (tensor cores on CUDA). */
  linearF16(
    x: DeviceTensor,
    w: DeviceTensor,
    rows: number,
    n: number,
    k: number,
    y: DeviceTensor,
    accumulate = false,
  ): void {
    this.#gemm("kivi_model_linear_f16", this.#linearF16, x, w, rows, n, k, y, accumulate);
  }

  /** One of the two linear exports (same arguments) on tensors. */
  #gemm(
    op: string,
    fn: (...a: ArgsOf<"kivi_model_linear">) => number,
    x: DeviceTensor,
    w: DeviceTensor,
    rows: number,
    n: number,
    k: number,
    y: DeviceTensor,
    accumulate: boolean,
  ): void {
    const [px, pw, py] = this.#ptrs(op, x, w, y);
    this.#ok(op, fn(this.#ctx, px, pw, rows, n, k, accumulate ? 1 : 0, py));
  }

  /** out fp16 [n] = mean + std * (a normal-like draw of (seed, i)), the same bits in both builds. */
  fillNormal(out: DeviceTensor, n: number, seed: number, mean: number, std: number): void {
    const op = "kivi_model_fill_normal";
    const [pOut] = this.#ptrs(op, out);
    this.#ok(op, this.#fillNormal(this.#ctx, pOut, n, seed, mean, std));
  }

  rope(
    x: DeviceTensor,
    rows: number,
    heads: number,
    dim: number,
    pos: DeviceTensor,
    cs: DeviceTensor,
    maxPos: number,
  ): void {
    const op = "kivi_model_rope";
    const [px, pPos, pCs] = this.#ptrs(op, x, pos, cs);
    this.#ok(op, this.#rope(this.#ctx, px, rows, heads, dim, pPos, pCs, maxPos));
  }

  swiglu(gate: DeviceTensor, up: DeviceTensor, n: number, out: DeviceTensor): void {
    const op = "kivi_model_swiglu";
    const [pGate, pUp, pOut] = this.#ptrs(op, gate, up, out);
    this.#ok(op, this.#swiglu(this.#ctx, pGate, pUp, n, pOut));
  }

  /** Exact causal attention over `batch` sequences of `tokens` tokens. */
  attention(
    q: DeviceTensor,
    k: DeviceTensor,
    v: DeviceTensor,
    shape: { batch: number; tokens: number; qHeads: number; kvHeads: number; headDim: number },
    out: DeviceTensor,
  ): void {
    const op = "kivi_model_attention";
    const { batch, tokens, qHeads, kvHeads, headDim } = shape;
    const [pq, pk, pv, pOut] = this.#ptrs(op, q, k, v, out);
    const scale = 1 / Math.sqrt(headDim);
    const st = this.#attention(
      this.#ctx,
      pq,
      pk,
      pv,
      batch,
      tokens,
      qHeads,
      kvHeads,
      headDim,
      scale,
      pOut,
    );
    this.#ok(op, st);
  }

  logSoftmax(x: DeviceTensor, rows: number, n: number): void {
    const op = "kivi_model_log_softmax";
    const [px] = this.#ptrs(op, x);
    this.#ok(op, this.#logSoftmax(this.#ctx, px, rows, n));
  }
}
