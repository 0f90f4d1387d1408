/**
 * Private bodies of KVCache.benchAttend and KVCache.read, apart from cache.ts so that it stays a
 * file one can read; the cache passes what they use of it (IoHost).
 *
 * @module
 */
import type { BackendCore as Backend, DeviceTensor } from "./tensor.ts";
import { checkBool, checkInt, checkOneOf, readOptions, show } from "./_checks.ts";
import { type DType, dtypeCode, type HostArray, hostArray } from "./_dtype.ts";
import { Staging } from "./_staging.ts";
import type { Input } from "./quant.ts";
import type { Pointer } from "./ffi/_native.ts";
import { attendCommon, type Data, describeData } from "./_input.ts";
import type { CacheConfig } from "./cache_config.ts";
import type { MultiHost, MultiSeq } from "./_multi.ts";

/** Attention arguments, read and checked once (see KVCache.#attendArgs). */
export interface AttendArgs<S> {
  seqs: S[];
  q: Data;
  scale: number;
  dtype: DType;
  trusted: boolean;
  out?: Data & { buf: unknown };
  n: number;
}

/** What benchAttend and read use of their cache. */
export interface IoHost<S extends MultiSeq> extends MultiHost<S> {
  lengths(s: S, layer: unknown, op: string): [number, number];
  attendArgs(
    layer: unknown,
    seqs: unknown,
    q: unknown,
    o: { scale?: unknown; qDtype?: unknown },
  ): AttendArgs<S> & { layer: number };
  attendBind(
    op: string,
    a: AttendArgs<S>,
    stage: Staging,
  ): { ids: Pointer; pq: Pointer; out: unknown; po: Pointer; made: DeviceTensor | undefined };
}

/** KVCache.benchAttend. */
export function benchAttendImpl<S extends MultiSeq>(
  h: IoHost<S>,
  layer: number,
  seqs: readonly S[],
  q: Input,
  opts: { iters?: number; scale?: number; qDtype?: DType },
): number {
  const o = readOptions("options", opts, ["iters", "scale", "qDtype"]);
  const iters = checkInt("iters", o.iters ?? 20, 1, 1 << 20);
  const a = h.attendArgs(layer, seqs, q, o);
  const { state, handle } = h.live("benchAttend");
  using stage = new Staging(h.backend, "benchAttend");
  const b = h.attendBind("benchAttend", a, stage);
  const args = [
    handle,
    a.layer,
    b.ids,
    a.seqs.length,
    b.pq,
    dtypeCode[a.q.dtype],
    a.scale,
  ] as const;
  try {
    // The library's own warm-up trusts q; this call validates it (and everything else) first.
    h.check(
      "kivi_cache_attend",
      state.lib.call("kivi_cache_attend", ...args, 0, b.po, dtypeCode[a.dtype]),
    );
    const ms = new Float32Array(1);
    h.check(
      "kivi_cache_bench_attend",
      state.lib.call(
        "kivi_cache_bench_attend",
        ...args,
        b.po,
        dtypeCode[a.dtype],
        iters,
        state.lib.ptr(ms),
      ),
    );
    return ms[0];
  } finally {
    b.made?.dispose();
  }
}

/** KVCache.read. */
export function readImpl<S extends MultiSeq>(
  h: IoHost<S>,
  seq: S,
  layer: number,
  dtype: DType,
): { keys: HostArray | DeviceTensor; values: HostArray | DeviceTensor } {
  const s = h.own("seq", seq);
  checkOneOf("dtype", dtype, ["f32", "f16", "bf16"] as const);
  const l = checkInt("layer", layer, 0, h.config.layers - 1);
  const [len] = h.lengths(s, l, "read");
  const { state, handle } = h.live("read");
  const id = h.usableId(s, "read");
  const c = h.config;
  const n = len * c.kvHeads * c.headDim;
  if (n === 0) return { keys: hostArray(dtype, 0), values: hostArray(dtype, 0) };
  const onHost = h.backend.kind === "cpu";
  const k = onHost ? hostArray(dtype, n) : h.backend.alloc([len, c.kvHeads, c.headDim], dtype);
  const v = onHost ? hostArray(dtype, n) : h.backend.alloc([len, c.kvHeads, c.headDim], dtype);
  const ptr = (
    x: HostArray | DeviceTensor,
  ) => (onHost ? state.lib.ptr(x as HostArray) : h.backend._tensor(x)!.pointer("read"));
  const st = state.lib.call("kivi_cache_read", handle, id, l, ptr(k), ptr(v), dtypeCode[dtype]);
  if (st !== 0) {
    if (!onHost) (k as DeviceTensor).dispose();
    if (!onHost) (v as DeviceTensor).dispose();
    h.check("kivi_cache_read", st);
  }
  return { keys: k, values: v };
}

/** The arguments of Sequence.append, read and checked once: the layer (-1: every layer), the
 * data of k and v and the tokens they hold. */
export function appendArgs(
  c: CacheConfig,
  backend: Backend,
  k: unknown,
  v: unknown,
  opts: unknown,
): { layer: number; trusted: boolean; kd: Data; vd: Data; n: number } {
  const o = readOptions("options", opts, ["layer", "dtype", "trusted"]);
  const layer = o.layer === undefined ? -1 : checkInt("layer", o.layer, 0, c.layers - 1);
  const hint = o.dtype === undefined
    ? undefined
    : checkOneOf("dtype", o.dtype, ["f32", "f16", "bf16"] as const);
  const trusted = checkBool("trusted", o.trusted);
  const kd = describeData(backend, "k", k, "dtype", hint);
  const vd = describeData(backend, "v", v, "dtype", hint);
  if (kd.dtype !== vd.dtype) {
    throw new TypeError(`k and v must have the same dtype, got ${kd.dtype} and ${vd.dtype}`);
  }
  const row = c.kvHeads * c.headDim * (layer === -1 ? c.layers : 1);
  const what = layer === -1
    ? `layers (${c.layers}) x kvHeads (${c.kvHeads}) x headDim (${c.headDim})`
    : `kvHeads (${c.kvHeads}) x headDim (${c.headDim})`;
  if (kd.length === 0 || kd.length % row !== 0) {
    throw new TypeError(
      `k.length must be a positive multiple of ${what} = ${row}, got ${kd.length}`,
    );
  }
  if (vd.length !== kd.length) {
    throw new TypeError(`v.length must equal k.length (${kd.length}), got ${vd.length}`);
  }
  const n = kd.length / row;
  if (n > 2 ** 31 - 1) throw new RangeError(`k must hold fewer than 2^31 tokens, got ${n}`);
  return { layer, trusted, kd, vd, n };
}

/** The arguments of attend, read and checked once (each sequence through `own`). */
export function attendArgs<S>(
  config: CacheConfig,
  backend: Backend,
  own: (name: string, x: unknown) => S,
  layerArg: unknown,
  seqsArg: unknown,
  q: unknown,
  o: { scale?: unknown; dtype?: unknown; qDtype?: unknown; out?: unknown; trusted?: unknown },
): AttendArgs<S> & { layer: number } {
  const c = config;
  const layer = checkInt("layer", layerArg, 0, c.layers - 1);
  const count = Array.isArray(seqsArg) ? seqsArg.length : 0; // read once, then each element once (after q's length agrees)
  if (count === 0) {
    throw new TypeError(`seqs must be a non-empty array of Sequences, got ${show(seqsArg)}`);
  }
  const qHint = o.qDtype === undefined
    ? undefined
    : checkOneOf("qDtype", o.qDtype, ["f32", "f16", "bf16"] as const);
  const qd = describeData(backend, "q", q, "qDtype", qHint);
  const n = count * c.queryHeads * c.headDim;
  if (qd.length !== n) {
    throw new TypeError(
      `q must hold batch (${count}) x queryHeads (${c.queryHeads}) x headDim (${c.headDim}) = ${n} values, got ${qd.length}`,
    );
  }
  const { seqs, scale, dtype, trusted, out } = attendCommon(
    backend,
    c,
    own,
    seqsArg,
    count,
    o,
    n,
    qd,
  );
  return { layer, seqs, q: qd, scale, dtype, trusted, out, n };
}
