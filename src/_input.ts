/**
 * Float inputs of the quantizers (src/quant.ts) and the cache (src/cache.ts), described once: where
 * they live, their dtype and length, and the fp16 range check both apply before a native call.
 *
 * @module
 */
import type { Pointer } from "./ffi/_native.ts";
import type { BackendCore as Backend, TensorFacts } from "./tensor.ts";
import type { Staging } from "./_staging.ts";
import {
  attendScale,
  checkBool,
  checkOneOf,
  checkShape,
  type HostView,
  hostView,
  overlaps,
  plainView,
  show,
} from "./_checks.ts";
import {
  checkHint,
  type DType,
  dtypeOfKind,
  F16_LIMIT,
  firstBeyondFp16,
  type HostArray,
  valueAt,
} from "./_dtype.ts";

/** A float argument described once: a host typed array (by its internal slots) or a tensor. */
export interface Data {
  dtype: DType;
  length: number;
  host?: HostView;
  tensor?: TensorFacts;
}

/** Describes a float argument once: dtype and length from a tensor's private fields or a typed
 * array's internal slots; `hint` must fit a host array (f16 or bf16 for a Uint16Array). `expected`
 * names what a value of another kind should have been. */
export function describeData(
  backend: Backend,
  name: string,
  x: unknown,
  hintName: string,
  hint: DType | undefined,
  expected = "a typed array or DeviceTensor",
): Data {
  const t = backend._tensor(x);
  if (t !== undefined) {
    if (t.backend !== backend) {
      throw new TypeError(`${name} belongs to another backend; upload it to this one first`);
    }
    const dtype = checkOneOf(`${name}.dtype`, t.dtype, ["f32", "f16", "bf16"] as const);
    if (hint !== undefined && hint !== dtype) {
      throw new TypeError(`${hintName} ${show(hint)} does not match ${name}, a ${dtype} tensor`);
    }
    return { dtype, length: t.length, tensor: t };
  }
  const v = hostView(name, x);
  if (v === undefined) throw new TypeError(`${name} must be ${expected}, got ${show(x)}`);
  const dtype = dtypeOfKind(v.kind, hint);
  if (dtype !== "f32" && dtype !== "f16" && dtype !== "bf16") {
    throw new TypeError(
      `${name} must be a Float32Array, Float16Array or Uint16Array, got ${v.kind}`,
    );
  }
  checkHint(hintName, hint, name, v.kind);
  return { dtype, length: v.length, host: v };
}

/** An input of the quantizers described once: where it lives, its dtype and [rows, cols]. */
export interface Described extends Data {
  mem: "host" | "device";
  shape: [number, number];
}

/** Resolves where x lives, its dtype and its [rows, cols], checking them against the backend; the
 * dtype hint must fit (a Uint16Array holds f16 or bf16 bits; any other array or tensor its own). */
export function describeInput(
  kivi: Backend,
  x: unknown,
  shapeOpt: unknown,
  hintOpt: unknown,
  name = "x",
): Described {
  const hint = hintOpt === undefined
    ? undefined
    : checkOneOf("dtype", hintOpt, ["f32", "f16", "bf16"] as const);
  const d = describeData(
    kivi,
    name,
    x,
    "dtype",
    hint,
    "a Float32Array, Float16Array, Uint16Array or DeviceTensor",
  );
  const t = d.tensor;
  if (t !== undefined) {
    const cols = t.shape[t.shape.length - 1];
    let shape: [number, number] = t.shape.length === 1 ? [1, cols] : [t.length / cols, cols];
    if (shapeOpt !== undefined) {
      shape = checkShape("shape", shapeOpt);
      if (shape[0] * shape[1] !== t.length) {
        throw new TypeError(`shape ${show(shape)} must hold the tensor's ${t.length} elements`);
      }
    }
    return { ...d, mem: "device", shape };
  }
  if (shapeOpt === undefined) {
    throw new TypeError(`shape must be given as [rows, cols] for a host array`);
  }
  const shape = checkShape("shape", shapeOpt);
  if (shape[0] * shape[1] !== d.length) {
    throw new TypeError(`shape ${show(shape)} must hold ${name}'s ${d.length} elements`);
  }
  return { ...d, mem: "host", shape };
}

/** The first finite value of d that fp16 cannot hold (|x| >= 65520), with the values scanned, or
 * undefined. Host arrays and the CPU backend's tensors (host memory) are scanned; f16 data and CUDA
 * tensors are not (the library's own scan reports those). */
function beyondFp16(
  backend: Backend,
  op: string,
  d: Data,
): { a: Float32Array | Uint16Array; at: number; value: number } | undefined {
  if (d.dtype === "f16" || (d.tensor && backend.kind !== "cpu")) return undefined;
  let a: Float32Array | Uint16Array;
  if (d.host) a = plainView(d.host) as Float32Array | Uint16Array;
  else {
    a = d.dtype === "f32" ? new Float32Array(d.length) : new Uint16Array(d.length);
    backend._download(a, d.tensor!.pointer(op), d.tensor!.bytes, false);
  }
  const at = firstBeyondFp16(a, d.dtype);
  return at < 0 ? undefined : { a, at, value: valueAt(a, d.dtype, at) };
}

/**
 * The quantizers store fp16 params (scale and zero, centroids), so a finite f32 or bf16 value fp16
 * cannot hold (|x| >= 65520) is refused, as the cache refuses it: a RangeError here for host arrays
 * and the CPU backend's tensors (host memory); the library's own scan reports it for CUDA tensors.
 */
export function checkParamRange(kivi: Backend, op: string, d: Described, name = "x"): void {
  const b = beyondFp16(kivi, op, d);
  if (b === undefined) return;
  const cols = d.shape[1];
  throw new RangeError(
    `${name} must hold values below ${F16_LIMIT} in magnitude (fp16 params), got ${b.value} at index ${b.at} ` +
      `(row ${Math.floor(b.at / cols)}, col ${
        b.at % cols
      }); scale it down, or pass trusted: true to have it saturate`,
  );
}

/**
 * Rejects a finite value of appended K or V that fp16 cannot hold (NaN and Inf are left to the
 * library's scan, which reports them as KIVI_ERR_NONFINITE). Host arrays and the CPU backend's
 * tensors (host memory) are scanned here; the library's append scans CUDA tensors itself.
 */
export function checkCacheRange(
  backend: Backend,
  name: string,
  d: Data,
  c: { readonly kvHeads: number; readonly headDim: number },
  n: number,
  layer: number,
): void {
  const b = beyondFp16(backend, "append", d);
  if (b === undefined) return;
  const { at } = b;
  const row = c.kvHeads * c.headDim;
  const where =
    `layer ${layer === -1 ? Math.floor(at / (n * row)) : layer}, token ${
      Math.floor(at / row) % n
    }, ` +
    `head ${Math.floor((at % row) / c.headDim)}, channel ${at % c.headDim}`;
  throw new RangeError(
    `${name} must hold values below ${F16_LIMIT} in magnitude (the cache stores fp16), got ${b.value} at index ${at} (${where}); scale it down`,
  );
}

/** An output `name` of attention checked against q: `n` values of `dtype` where q lives (a tensor of
 * the same backend, or a host array), sharing no memory with q; else a TypeError "`name` must be
 * `expected()`". */
export function describeOutput(
  backend: Backend,
  name: string,
  given: unknown,
  dtype: DType,
  n: number,
  qd: Data,
  expected: () => string,
): Data & { buf: unknown } {
  const t = backend._tensor(given);
  const v = t === undefined ? hostView(name, given) : undefined;
  const od = t ? t.dtype : v ? dtypeOfKind(v.kind, dtype) : undefined;
  const len = t ? t.length : v?.length;
  if (
    (t === undefined && v === undefined) || od !== dtype || len !== n ||
    (t !== undefined) !== (qd.tensor !== undefined) || (t && t.backend !== backend)
  ) {
    throw new TypeError(`${name} must be ${expected()}`);
  }
  if ((v && qd.host && overlaps(v, qd.host)) || (t && t.tensor === qd.tensor?.tensor)) {
    throw new TypeError(`${name} must not share memory with q`);
  }
  return { dtype, length: n, host: v, tensor: t, buf: given };
}

/** The address of described data (after every argument was read); host arrays go through
 * `stage` (copied to the device and, for an output, back by `stage.finish()` where the backend
 * needs it). */
export function dataPtr(d: Data, op: string, stage: Staging, write?: string): Pointer {
  if (d.host) {
    const plain = plainView(d.host) as HostArray;
    return write === undefined ? stage.input(plain, d.dtype) : stage.output(plain, d.dtype);
  }
  return write === undefined ? d.tensor!.pointer(op) : d.tensor!.writePointer(op, write);
}

/** What attend and attendMulti read alike, after q: the `count` elements of `seqsArg` (its length
 * read once by the caller), each once, through `own`, the softmax scale, the output dtype, `trusted`, and the caller's
 * out (`n` values where q lives). */
export function attendCommon<S>(
  backend: Backend,
  c: { headDim: number },
  own: (name: string, x: unknown) => S,
  seqsArg: unknown,
  count: number,
  o: { scale?: unknown; dtype?: unknown; out?: unknown; trusted?: unknown },
  n: number,
  qd: Data,
): { seqs: S[]; scale: number; dtype: DType; trusted: boolean; out?: Data & { buf: unknown } } {
  const seqs: S[] = [];
  for (let i = 0; i < count; i++) seqs.push(own(`seqs[${i}]`, (seqsArg as unknown[])[i]));
  const scale = attendScale(o.scale, c.headDim);
  const dtype = checkOneOf("dtype", o.dtype ?? "f32", ["f32", "f16", "bf16"] as const);
  const trusted = checkBool("trusted", o.trusted);
  // the caller's out: like q (where it lives), of the result's dtype
  const out = o.out === undefined ? undefined : describeOutput(
    backend,
    "out",
    o.out,
    dtype,
    n,
    qd,
    () => `a ${dtype} ${qd.tensor ? "DeviceTensor" : "array"} of ${n} values like q`,
  );
  return { seqs, scale, dtype, trusted, out };
}
