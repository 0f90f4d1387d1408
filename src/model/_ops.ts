/**
 * The model ops of kivi.h (kivi_model_*) on tensors of one backend: each call takes the tensors'
 * addresses (a disposed tensor is KIVI_ERR_STATE) and turns a failed status into a KiviError. The
 * sizes are the caller's (the runner's own buffers); the library checks them against its limits.
 *
 * @module
 */
import type { BackendCore as Backend, DeviceTensor } from "../tensor.ts";
import type { Pointer } from "../ffi/_native.ts";

/** Bound model ops of a backend. */
export class ModelOps {
  #backend: Backend;
  #ctx: Pointer;
  #embed;
  #rmsnorm;
  #linear;
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
    this.#rope = lib.fn("kivi_model_rope");
    this.#swiglu = lib.fn("kivi_model_swiglu");
    this.#attention = lib.fn("kivi_model_attention");
    this.#logSoftmax = lib.fn("kivi_model_log_softmax");
  }

  #ok(op: string, st: number): void {
    if (st !== 0) this.#backend._check(op, st);
  }

  #ptr(t: DeviceTensor, op: string): Pointer {
    return t.pointer(op);
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
    this.#ok(
      op,
      this.#embed(
        this.#ctx,
        this.#ptr(tokens, op),
        rows,
        this.#ptr(table, op),
        vocab,
        dim,
        this.#ptr(out, op),
      ),
    );
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
    this.#ok(
      op,
      this.#rmsnorm(
        this.#ctx,
        this.#ptr(x, op),
        this.#ptr(w, op),
        rows,
        dim,
        eps,
        this.#ptr(out, op),
      ),
    );
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
    const op = "kivi_model_linear";
    this.#ok(
      op,
      this.#linear(
        this.#ctx,
        this.#ptr(x, op),
        this.#ptr(w, op),
        rows,
        n,
        k,
        accumulate ? 1 : 0,
        this.#ptr(y, op),
      ),
    );
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
    this.#ok(
      op,
      this.#rope(
        this.#ctx,
        this.#ptr(x, op),
        rows,
        heads,
        dim,
        this.#ptr(pos, op),
        this.#ptr(cs, op),
        maxPos,
      ),
    );
  }

  swiglu(gate: DeviceTensor, up: DeviceTensor, n: number, out: DeviceTensor): void {
    const op = "kivi_model_swiglu";
    this.#ok(
      op,
      this.#swiglu(this.#ctx, this.#ptr(gate, op), this.#ptr(up, op), n, this.#ptr(out, op)),
    );
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
    const st = this.#attention(
      this.#ctx,
      this.#ptr(q, op),
      this.#ptr(k, op),
      this.#ptr(v, op),
      batch,
      tokens,
      qHeads,
      kvHeads,
      headDim,
      1 / Math.sqrt(headDim),
      this.#ptr(out, op),
    );
    this.#ok(op, st);
  }

  logSoftmax(x: DeviceTensor, rows: number, n: number): void {
    const op = "kivi_model_log_softmax";
    this.#ok(op, this.#logSoftmax(this.#ctx, this.#ptr(x, op), rows, n));
  }
}
