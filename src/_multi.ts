/**
 * Private helpers of multi-token attention (KVCache.attendMulti, the `lse` option of attend).
 *
 * @module
 */
import type { BackendCore as Backend, DeviceTensor, NativeHeld } from "./tensor.ts";
import type { Pointer } from "./ffi/_native.ts";
import type { CacheConfig, CacheOptions } from "./cache_config.ts";
import { attendScale, checkInt, checkOneOf, hostView, readOptions, show } from "./_checks.ts";
import { dtypeCode, hostArray } from "./_dtype.ts";
import { Staging } from "./_staging.ts";
import { attendCommon, dataPtr, describeData, describeOutput } from "./_input.ts";

/**
 * Exact causal attention of a chunk over itself at fp16 (what the cache stores), with the log-sum-exp:
 * the chunk's k and v appended to a bits-16 scratch cache (its pages hold fp16 exactly) and its n
 * queries through one attendMulti (float64 on the CPU build, fp32 on the device on CUDA).
 */
function chunkAttention<S extends MultiSeq>(
  h: MultiHost<S>,
  q: Float32Array,
  k: Float32Array,
  v: Float32Array,
  n: number,
  c: { readonly kvHeads: number; readonly queryHeads: number; readonly headDim: number },
  scale: number,
): { out: Float32Array; lse: Float32Array } {
  using tmp = h.scratchCache({
    layers: 1,
    kvHeads: c.kvHeads,
    queryHeads: c.queryHeads,
    headDim: c.headDim,
    keys: { bits: 16 },
    values: { bits: 16 },
    pageTokens: 64,
    residual: 64,
    maxPages: Math.ceil(n / 64) + 2,
    maxSequences: 1,
  });
  const s = tmp.createSequence();
  s.append(k, v, { layer: 0 });
  const lse = new Float32Array(n * c.queryHeads);
  const out = tmp.attendMulti(0, [s], [n], q, { scale, lse }) as Float32Array;
  return { out, lse };
}

/** `x` as a host Float32Array: itself, or an f32 DeviceTensor of `backend` read back. */
function f32OnHost(backend: Backend, name: string, x: unknown): Float32Array {
  if (hostView(name, x)?.kind === "Float32Array") return x as Float32Array;
  const t = backend._tensor(x);
  if (t !== undefined && t.dtype === "f32") return (x as DeviceTensor).readSync() as Float32Array;
  throw new TypeError(`${name} must be a Float32Array or an f32 DeviceTensor, got ${show(x)}`);
}

/** What the multi-token functions use of their cache (KVCache passes its private parts). */
export interface MultiHost<S extends MultiSeq> {
  readonly config: CacheConfig;
  readonly backend: Backend;
  live(op: string): NativeHeld;
  check(op: string, status: number): void;
  own(name: string, x: unknown): S;
  usableId(s: S, op: string): number;
  attendMulti: HostAttendMulti<S, Float32Array>;
  mergeAttention(
    outs: readonly (Float32Array | DeviceTensor)[],
    lses: readonly (Float32Array | DeviceTensor)[],
  ): { out: Float32Array; lse: Float32Array };
  /** A new cache on the same backend (the prefill's bits-16 scratch of a chunk). */
  scratchCache(options: CacheOptions): ScratchCache<S>;
}

/** What a chunked prefill uses of its scratch cache. */
export interface ScratchCache<S extends MultiSeq> extends Disposable {
  createSequence(): S;
  attendMulti: HostAttendMulti<S, unknown>;
}

/** attendMulti with a host q and lse, as the prefill calls it (R: what it returns). */
type HostAttendMulti<S, R> = (
  layer: number,
  seqs: readonly S[],
  qlens: readonly number[],
  q: Float32Array,
  o: { scale: number; lse: Float32Array },
) => R;

/** The parts of a Sequence that a chunked prefill uses. */
export interface MultiSeq {
  length(layer: number): number;
  append(k: Float32Array, v: Float32Array, opts: { layer: number }): void;
}

/** KVCache.attendMulti: checks every argument, then one kivi_cache_attend_multi call. */
export function attendMultiImpl<S extends MultiSeq>(
  h: MultiHost<S>,
  op: string,
  layerArg: unknown,
  seqsArg: unknown,
  qlensArg: unknown,
  q: unknown,
  o: {
    scale?: unknown;
    dtype?: unknown;
    qDtype?: unknown;
    out?: unknown;
    lse?: unknown;
    trusted?: unknown;
  },
): unknown {
  const c = h.config;
  const layer = checkInt("layer", layerArg, 0, c.layers - 1);
  const count = Array.isArray(seqsArg) ? seqsArg.length : 0;
  if (count === 0 || count > 512) {
    throw new TypeError(`seqs must be an array of 1 to 512 Sequences, got ${show(seqsArg)}`);
  }
  if (!Array.isArray(qlensArg) || qlensArg.length !== count) {
    throw new TypeError(
      `qlens must be an array of ${count} numbers (one per sequence), got ${show(qlensArg)}`,
    );
  }
  const qlens = new Int32Array(count);
  let tokens = 0;
  for (let i = 0; i < count; i++) {
    qlens[i] = checkInt(`qlens[${i}]`, (qlensArg as unknown[])[i], 1, 2 ** 31 - 1);
    tokens += qlens[i];
  }
  const qHint = o.qDtype === undefined
    ? undefined
    : checkOneOf("qDtype", o.qDtype, ["f32", "f16", "bf16"] as const);
  const qd = describeData(h.backend, "q", q, "qDtype", qHint);
  const n = tokens * c.queryHeads * c.headDim;
  if (qd.length !== n) {
    throw new TypeError(
      `q must hold tokens (${tokens}, the sum of qlens) x queryHeads (${c.queryHeads}) x headDim (${c.headDim}) = ${n} values, got ${qd.length}`,
    );
  }
  const { seqs, scale, dtype, trusted, out } = attendCommon(
    h.backend,
    c,
    h.own,
    seqsArg,
    count,
    o,
    n,
    qd,
  );
  // the caller's lse: f32 like q (a Float32Array for a host q, an f32 DeviceTensor for a tensor q)
  const lse = o.lse === undefined ? undefined : describeOutput(
    h.backend,
    "lse",
    o.lse,
    "f32",
    tokens * c.queryHeads,
    qd,
    () =>
      `${qd.tensor ? "an f32 DeviceTensor" : "a Float32Array"} of ${
        tokens * c.queryHeads
      } values (tokens x queryHeads) like q, got ${show(o.lse)}`,
  );
  const { state, handle } = h.live(op);
  using stage = new Staging(h.backend, op);
  const ids = new Int32Array(count);
  for (let i = 0; i < count; i++) ids[i] = h.usableId(seqs[i], op);
  const pq = dataPtr(qd, op, stage);
  let made: DeviceTensor | undefined, po: Pointer, result: unknown;
  if (out !== undefined) {
    po = dataPtr(out, op, stage, "out");
    result = out.buf;
  } else if (qd.tensor) {
    made = h.backend.alloc([tokens, c.queryHeads, c.headDim], dtype);
    po = h.backend._tensor(made)!.pointer(op);
    result = made;
  } else {
    const h = hostArray(dtype, n);
    po = stage.output(h, dtype);
    result = h;
  }
  const pl = lse === undefined ? null : dataPtr(lse, op, stage, "lse");
  const st = state.lib.call(
    "kivi_cache_attend_multi",
    handle,
    layer,
    state.lib.ptr(ids),
    state.lib.ptr(qlens),
    count,
    tokens,
    pq,
    dtypeCode[qd.dtype],
    scale,
    trusted ? 1 : 0,
    po,
    dtypeCode[dtype],
    pl,
  );
  if (st !== 0) {
    made?.dispose();
    h.check("kivi_cache_attend_multi", st);
  }
  stage.finish();
  return result;
}

/** KVCache.mergeAttention: the parts read to the host, merged by kivi_attention_merge. */
export function mergeAttentionImpl<S extends MultiSeq>(
  h: MultiHost<S>,
  outs: readonly (Float32Array | DeviceTensor)[],
  lses: readonly (Float32Array | DeviceTensor)[],
): { out: Float32Array; lse: Float32Array } {
  const D = h.config.headDim;
  const parts = Array.isArray(outs) ? outs.length : 0;
  if (parts === 0 || parts > 1024) {
    throw new TypeError(`outs must be an array of 1 to 1024 f32 arrays, got ${show(outs)}`);
  }
  if (!Array.isArray(lses) || lses.length !== parts) {
    throw new TypeError(
      `lses must be an array of ${parts} f32 arrays (one per part of outs), got ${show(lses)}`,
    );
  }
  const host = (name: string, x: unknown) => f32OnHost(h.backend, name, x);
  const o0 = host("outs[0]", outs[0]);
  if (o0.length === 0 || o0.length % D !== 0) {
    throw new TypeError(
      `outs[0].length must be a positive multiple of headDim (${D}), got ${o0.length}`,
    );
  }
  const rows = o0.length / D;
  const o = new Float32Array(parts * rows * D), l = new Float32Array(parts * rows);
  for (let p = 0; p < parts; p++) {
    const op = p === 0 ? o0 : host(`outs[${p}]`, outs[p]);
    const lp = host(`lses[${p}]`, lses[p]);
    if (op.length !== rows * D) {
      throw new TypeError(
        `outs[${p}].length must equal outs[0].length (${rows * D}), got ${op.length}`,
      );
    }
    if (lp.length !== rows) {
      throw new TypeError(
        `lses[${p}].length must be rows (${rows}, outs[0].length / headDim), got ${lp.length}`,
      );
    }
    o.set(op, p * rows * D);
    l.set(lp, p * rows);
  }
  const { state } = h.live("mergeAttention");
  const out = new Float32Array(rows * D), lse = new Float32Array(rows);
  using stage = new Staging(h.backend, "mergeAttention");
  const ctx = h.backend._native("mergeAttention").ctx;
  h.check(
    "kivi_attention_merge",
    state.lib.call(
      "kivi_attention_merge",
      ctx,
      parts,
      rows,
      D,
      stage.input(o, "f32"),
      stage.input(l, "f32"),
      stage.output(out, "f32"),
      stage.output(lse, "f32"),
    ),
  );
  stage.finish();
  return { out, lse };
}

/** KVCache.prefill: the chunk over the cache and over itself, merged, then appended. */
export function prefillImpl<S extends MultiSeq>(
  h: MultiHost<S>,
  layer: number,
  seq: S,
  q: Float32Array | DeviceTensor,
  k: Float32Array | DeviceTensor,
  v: Float32Array | DeviceTensor,
  opts: { scale?: number },
): Float32Array {
  const c = h.config;
  const o = readOptions("options", opts, ["scale"]);
  const l = checkInt("layer", layer, 0, c.layers - 1);
  const s = h.own("seq", seq);
  const host = (name: string, x: unknown) => f32OnHost(h.backend, name, x);
  const kh = host("k", k), vh = host("v", v), qh = host("q", q);
  const row = c.kvHeads * c.headDim;
  if (kh.length === 0 || kh.length % row !== 0) {
    throw new TypeError(
      `k.length must be a positive multiple of kvHeads (${c.kvHeads}) x headDim (${c.headDim}) = ${row}, got ${kh.length}`,
    );
  }
  const n = kh.length / row;
  if (vh.length !== kh.length) {
    throw new TypeError(`v.length must equal k.length (${kh.length}), got ${vh.length}`);
  }
  if (qh.length !== n * c.queryHeads * c.headDim) {
    throw new TypeError(
      `q must hold the chunk's tokens (${n}) x queryHeads (${c.queryHeads}) x headDim (${c.headDim}) = ${
        n * c.queryHeads * c.headDim
      } values, got ${qh.length}`,
    );
  }
  const scale = attendScale(o.scale, c.headDim);
  const f = Math.fround(scale);
  const own = chunkAttention(h, qh, kh, vh, n, c, f);
  let out = own.out;
  if (s.length(l) > 0) {
    // every query sees the whole cache: the sequence repeated, one query each
    const qrow = c.queryHeads * c.headDim, prior = new Float32Array(n * qrow);
    const plse = new Float32Array(n * c.queryHeads);
    for (let a = 0; a < n; a += 512) {
      const m = Math.min(512, n - a);
      const lse = new Float32Array(m * c.queryHeads);
      const part = h.attendMulti(
        l,
        new Array<S>(m).fill(s),
        new Array<number>(m).fill(1),
        qh.slice(a * qrow, (a + m) * qrow),
        {
          scale: f,
          lse,
        },
      ) as Float32Array;
      prior.set(part, a * qrow);
      plse.set(lse, a * c.queryHeads);
    }
    out = h.mergeAttention([prior, own.out], [plse, own.lse]).out;
  }
  s.append(kh, vh, { layer: l });
  return out;
}
