/**
 * Private test helpers: a seeded RNG whose seed goes into every assertion message, fp16/bf16
 * rounding, input builders for the three data dtypes, and float64 oracles of kivi.h's formats
 * (uniform params/codes/values, nearest and interval assignment, the packed layout).
 *
 * The oracles follow the formulas written in cuda/include/kivi.h, not the C code: fp32 steps are
 * modelled with Math.fround (a double result of +, -, *, / of two fp32 values rounded once to fp32
 * is the correctly rounded fp32 result, since 53 >= 2 * 24 + 2), fp16 storage with Math.f16round.
 *
 * @module
 */
import process from "node:process";
import assert from "node:assert/strict";
import type { Axis, Backend, Bits, CodebookQuantized, DeviceTensor } from "../src/mod.ts";
import type { Quantized, StatusName, UniformQuantized } from "../src/mod.ts";
import { KiviError, openBackend } from "../src/mod.ts";
import { Rng as SeededRng } from "../src/random.ts";

/* ------------------------------------------------------------------ random --------------- */

/** Base seed of the run: KIVI_TEST_SEED overrides it to reproduce a failure. */
export const BASE_SEED: number = process.env.KIVI_TEST_SEED
  ? Number(process.env.KIVI_TEST_SEED) >>> 0
  : 0x6b697669;

/** The seed of a test's generator: `label` and `salt` hashed with BASE_SEED (FNV-1a). */
function labelSeed(label: string, salt: number): number {
  let h = (BASE_SEED ^ Math.imul(salt + 1, 0x9e3779b1)) >>> 0;
  for (let i = 0; i < label.length; i++) h = Math.imul(h ^ label.charCodeAt(i), 0x01000193) >>> 0;
  return h;
}

/** The library's seeded generator (src/random.ts), seeded from a label: `label` tells what to quote
 * on failure. */
export class Rng extends SeededRng {
  constructor(readonly label: string, salt = 0) {
    super(labelSeed(label, salt));
  }
  /** What an assertion message quotes so a failure can be replayed. */
  get tag(): string {
    return `[${this.label}; seed 0x${this.seed.toString(16)}; KIVI_TEST_SEED=${BASE_SEED}]`;
  }
}

/* ------------------------------------------------------------------ fp16 / bf16 ---------- */

export const f32: (x: number) => number = Math.fround;
export const f16: (x: number) => number = Math.f16round;
/** fp32 unit roundoff 2^-24. */
export const U32 = 2 ** -24;

const cvt = new DataView(new ArrayBuffer(4));
/** fp32 bits of x (x rounded to fp32 first). */
export function f32Bits(x: number): number {
  cvt.setFloat32(0, x);
  return cvt.getUint32(0);
}
/** float -> bfloat16 bits, round to nearest even from the fp32 value (kivi.h's bf16 is fp32's top half). */
export function bf16Bits(x: number): number {
  const u = f32Bits(x);
  if ((u & 0x7fffffff) > 0x7f800000) return ((u >>> 16) | 0x40) & 0xffff; // NaN stays NaN
  const lower = u & 0xffff, upper = u >>> 16;
  const up = lower > 0x8000 || (lower === 0x8000 && (upper & 1) === 1);
  return (upper + (up ? 1 : 0)) & 0xffff;
}
/** bfloat16 bits -> number (exact). */
export function bf16Value(b: number): number {
  cvt.setUint32(0, (b & 0xffff) << 16);
  return cvt.getFloat32(0);
}
/** fp16 bits of x (rounded to nearest even). */
export function f16Bits(x: number): number {
  cvt.setFloat16(0, x);
  return cvt.getUint16(0);
}
/** Round-half-to-even, as C's rintf in the default rounding mode (Math.round rounds half up). */
export function rintHalfEven(t: number): number {
  const f = Math.floor(t);
  const d = t - f; // exact for |t| < 2^52
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/* ------------------------------------------------------------------ inputs --------------- */

export type DataDType = "f32" | "f16" | "bf16";
export const DTYPES: readonly DataDType[] = ["f32", "f16", "bf16"];
export const BITS: readonly Bits[] = [2, 4];

/** An input matrix: the host array handed to kivi, its exact element values, and its dtype. */
export interface Input {
  x: Float32Array | Float16Array | Uint16Array;
  /** x's values as numbers (what the library reads, exactly). */
  v: Float64Array;
  dtype: DataDType;
}

/** Rounds `vals` into a host array of `dtype` (bf16: Uint16Array of bf16 bits). */
export function toInput(vals: ArrayLike<number>, dtype: DataDType): Input {
  const n = vals.length;
  const v = new Float64Array(n);
  if (dtype === "f32") {
    const x = Float32Array.from(vals);
    v.set(x);
    return { x, v, dtype };
  }
  if (dtype === "f16") {
    const x = Float16Array.from(vals);
    for (let i = 0; i < n; i++) v[i] = x[i];
    return { x, v, dtype };
  }
  const x = new Uint16Array(n);
  for (let i = 0; i < n; i++) {
    x[i] = bf16Bits(vals[i]);
    v[i] = bf16Value(x[i]);
  }
  return { x, v, dtype };
}

/**
 * Random KV-like data [rows][cols]: Gaussian with a per-column offset and scale, a few outlier
 * columns (keys' trait) and a heavy tail. Never all zeros; magnitudes well inside fp16's range.
 */
export function randomMatrix(rng: Rng, rows: number, cols: number, dtype: DataDType): Input {
  const off = Array.from({ length: cols }, () => rng.uniform(-2, 2));
  const sc = Array.from(
    { length: cols },
    () => (rng.next() < 0.1 ? rng.uniform(5, 20) : rng.uniform(0.05, 1.5)),
  );
  const vals = new Float64Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const z = rng.next() < 0.02 ? rng.normal() * 6 : rng.normal();
      vals[r * cols + c] = off[c] + sc[c] * z;
    }
  }
  return toInput(vals, dtype);
}

/** Host array of `dtype` filled with a sentinel; returns it with a byte snapshot to compare later. */
export function sentinel<T extends ArrayBufferView>(
  a: T,
  byte = 0xa5,
): { buf: T; snap: Uint8Array } {
  const bytes = new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
  bytes.fill(byte);
  return { buf: a, snap: bytes.slice() };
}
/** Asserts a buffer holds exactly its snapshot's bytes. */
export function assertUntouched(s: { buf: ArrayBufferView; snap: Uint8Array }, msg: string): void {
  const bytes = new Uint8Array(s.buf.buffer, s.buf.byteOffset, s.buf.byteLength);
  let diff = -1;
  for (let i = 0; i < bytes.length; i++) {
    if (bytes[i] !== s.snap[i]) {
      diff = i;
      break;
    }
  }
  assert.equal(diff, -1, `${msg}: output buffer changed at byte ${diff}`);
}

/* ------------------------------------------------------------------ backend -------------- */

/** The CPU reference backend (build/libkivi_cpu.so, or KIVI_LIB_PATH). */
export function openCpu(): Promise<Backend> {
  return openBackend({ prefer: "cpu" });
}

/** A host result of a generic call (pack, unpack, dequantize) whose memory TypeScript cannot infer. */
export function host<T extends ArrayBufferView>(x: T | DeviceTensor): T {
  assert.ok(ArrayBuffer.isView(x), "expected a host typed array, got a DeviceTensor");
  return x as T;
}
/** Narrows a quantize() result to the uniform format. */
export function asUniform<M extends "host" | "device">(q: Quantized<M>): UniformQuantized<M> {
  assert.equal(q.format.kind, "uniform");
  return q as UniformQuantized<M>;
}
/** Narrows a quantize() result to the codebook format. */
export function asCodebook<M extends "host" | "device">(q: Quantized<M>): CodebookQuantized<M> {
  assert.equal(q.format.kind, "codebook");
  return q as CodebookQuantized<M>;
}

/* ------------------------------------------------------------------ layout (kivi.h) ------ */

export function groupCount(rows: number, cols: number, axis: Axis, G: number): number {
  return axis === "token" ? cols * (rows / G) : rows * (cols / G);
}
/** Flat row-major indices of group g's members in group order (kivi.h "Matrices"). */
export function groupMembers(
  rows: number,
  cols: number,
  axis: Axis,
  G: number,
  g: number,
): number[] {
  const out = new Array<number>(G);
  if (axis === "token") {
    const per = rows / G, c = Math.floor(g / per), r0 = (g % per) * G;
    for (let i = 0; i < G; i++) out[i] = (r0 + i) * cols + c;
  } else {
    const per = cols / G, r = Math.floor(g / per), c0 = (g % per) * G;
    for (let i = 0; i < G; i++) out[i] = r * cols + c0 + i;
  }
  return out;
}
/** Element (r, c) of a [rows][cols] matrix packed along `axis` at `bits`. */
type Place = [r: number, c: number, rows: number, cols: number, axis: Axis, bits: number];
/** Word index and slot of element (r, c) (kivi.h: token axis packed along tokens, channel along channels). */
export function wordOf(...[r, c, rows, cols, axis, bits]: Place): [number, number] {
  const cpw = 32 / bits;
  return axis === "token"
    ? [c * (rows / cpw) + Math.floor(r / cpw), r % cpw]
    : [r * (cols / cpw) + Math.floor(c / cpw), c % cpw];
}
/** The code of element (r, c) read straight out of the packed words (code j at bit bits * j). */
export function codeAt(words: Uint32Array, ...place: Place): number {
  const [w, slot] = wordOf(...place);
  const bits = place[5];
  return (words[w] >>> (bits * slot)) & ((1 << bits) - 1);
}
/** All codes [rows][cols] row-major, read from packed words by the layout formula. */
export function codesOf(
  words: Uint32Array,
  rows: number,
  cols: number,
  axis: Axis,
  bits: number,
): Uint8Array {
  const out = new Uint8Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      out[r * cols + c] = codeAt(words, r, c, rows, cols, axis, bits);
    }
  }
  return out;
}

/* ------------------------------------------------------------------ uniform oracle ------- */

export interface UniformOracle {
  /** fp16 values of scale and zero per group. */
  scale: Float64Array;
  zero: Float64Array;
  /** per group min and max of the input. */
  mn: Float64Array;
  mx: Float64Array;
  /** code per element, row-major. */
  codes: Uint8Array;
  /** fmaf(q, s, z) per element, row-major. */
  deq: Float64Array;
}

/** fp16's value of bit pattern h. */
export function f16Value(h: number): number {
  cvt.setUint16(0, h & 0xffff);
  return cvt.getFloat16(0);
}
/** The smallest fp16 >= v (v finite, >= 0, below 65504). */
function f16Up(v: number): number {
  const h = f16(v);
  return h < v ? f16Value(f16Bits(h) + 1) : h;
}
/** The largest fp16 <= v (v in [-65504, 65504]). */
function f16Down(v: number): number {
  const h = f16(v);
  if (!(h > v)) return h;
  const b = f16Bits(h);
  return f16Value(b & 0x8000 ? b + 1 : b === 0 ? 0x8001 : b - 1);
}

/**
 * kivi_format.h kivi_uniform_params in float64, each fp32 step rounded with Math.fround (an fma of
 * fp16 values and a small constant is exact in double, so one fround is the fma): KIVI's scale =
 * half((mx - mn) / top) and zero = half(mn) of the min and max clamped to [-65504, 65504], unless they
 * leave a value more than s / 2 from the grid z + q s or its top past 65504; then zero = the largest
 * fp16 <= mn and scale = the smallest fp16 >= (mx - zero) / (top + 1/2), one step less while the
 * top's value passes 65504. Returns [scale, zero].
 */
export function uniformParams(mn: number, mx: number, bits: number): [number, number] {
  const top = (1 << bits) - 1, MAX = 65504;
  mn = Math.min(MAX, Math.max(-MAX, mn));
  mx = Math.min(MAX, Math.max(-MAX, mx));
  let s = f16(f32(f32(mx - mn) / top)), z = f16(mn);
  const covers = f32(z - mn) <= 0.5 * s && f32((top + 0.5) * s + z) >= mx &&
    f32(top * s + z) <= MAX;
  if (!covers) {
    z = f16Down(mn);
    s = f16Up(f32(f32(mx - z) / (top + 0.5)));
    while (s > 0 && f32(top * s + z) > MAX) s = f16Value(f16Bits(s) - 1);
  }
  return [s, z];
}

/**
 * kivi.h kivi_uniform_quantize: mn/mx per group, scale and zero by uniformParams (KIVI's, widened
 * where they would not cover the group), q = s > 0 ? clamp(rint((x - z) / s)) : 0 in fp32, and
 * x' = fmaf(q, s, z). The fma is exact here in double: q * s and z are fp16 values
 * (multiples of 2^-24 below 2^16 * 16), so q * s + z fits in 53 bits and one Math.fround is the fma.
 */
export function uniformOracle(
  v: Float64Array,
  rows: number,
  cols: number,
  axis: Axis,
  G: number,
  bits: number,
): UniformOracle {
  const groups = groupCount(rows, cols, axis, G);
  const top = (1 << bits) - 1;
  const o: UniformOracle = {
    scale: new Float64Array(groups),
    zero: new Float64Array(groups),
    mn: new Float64Array(groups),
    mx: new Float64Array(groups),
    codes: new Uint8Array(rows * cols),
    deq: new Float64Array(rows * cols),
  };
  for (let g = 0; g < groups; g++) {
    const m = groupMembers(rows, cols, axis, G, g);
    let mn = Infinity, mx = -Infinity;
    for (const i of m) {
      mn = Math.min(mn, v[i]);
      mx = Math.max(mx, v[i]);
    }
    const [s, z] = uniformParams(mn, mx, bits);
    o.scale[g] = s;
    o.zero[g] = z;
    o.mn[g] = mn;
    o.mx[g] = mx;
    for (const i of m) {
      let q = 0;
      if (s > 0) q = Math.min(top, Math.max(0, rintHalfEven(f32(f32(v[i] - z) / s))));
      o.codes[i] = q;
      o.deq[i] = f32(q * s + z);
    }
  }
  return o;
}

/**
 * Largest |x - x'| the uniform format allows for one element of a group, from the stored fp16
 * params s, z (top = 2^b - 1):
 *  - x inside [z, z + top * s]: the code rounds (x - z) / s, so |q s - (x - z)| <= s / 2 plus the
 *    fp32 rounding of x - z and of the division (relative 2u each, u = 2^-24, on a quotient of at
 *    most top), and the fma's own rounding (u |x'|);
 *  - x below z (z = half(mn) may sit above mn): clamped to q = 0, error z - x <= z - mn;
 *  - x above z + top * s (fp16 rounding of z and s can leave mx outside): clamped to q = top, error
 *    <= mx - (z + top * s).
 * So |x - x'| <= max(s / 2, z - mn, mx - (z + top s)) + 4u (|z| + |x| + top s).
 */
export function uniformBound(
  x: number,
  s: number,
  z: number,
  mn: number,
  mx: number,
  bits: number,
): number {
  const top = (1 << bits) - 1;
  return Math.max(s / 2, z - mn, mx - (z + top * s)) +
    4 * U32 * (Math.abs(z) + Math.abs(x) + top * s);
}

/* ------------------------------------------------------------------ codebook oracles ----- */

/** Nearest centroid in float64 as kivi.h defines it (c ascending): the number of midpoints
 * (c_k + c_(k+1)) / 2 that are <= x, so a value on a midpoint goes up and, of equal centroids,
 * the first is used. */
export function nearestOracle(x: number, c: ArrayLike<number>): number {
  let q = 0;
  for (let k = 0; k + 1 < c.length; k++) if (x >= (c[k] + c[k + 1]) / 2) q++;
  return q;
}
/**
 * True when x is so close to the midpoint of two neighbouring centroids that the fp32 midpoint
 * 0.5 * (c_i + c_(i+1)) (one rounding of the sum: error <= u |c_i + c_(i+1)| / 2) could put it on
 * either side; the float64 oracle cannot decide those. Where the sum is exact in fp32 (c are fp16
 * values, so their double sum is exact and comparable) the midpoint is exact and nothing is undecided.
 */
export function nearMidpoint(x: number, c: ArrayLike<number>): boolean {
  for (let k = 0; k + 1 < c.length; k++) {
    const sum = c[k] + c[k + 1];
    if (Math.fround(sum) === sum) continue;
    const mid = sum / 2;
    if (Math.abs(x - mid) <= U32 * (Math.abs(c[k]) + Math.abs(c[k + 1]))) return true;
  }
  return false;
}
/** kivi.h KIVI_ASSIGN_INTERVAL, written from the header's table: x < c1 -> 0; c_i <= x < c_(i+1) ->
 * i (1 <= i <= n-3); c_(n-2) <= x <= c_(n-1) -> n-2; x > c_(n-1) -> n-1. */
export function intervalOracle(x: number, c: ArrayLike<number>): number {
  const n = c.length;
  if (x < c[1]) return 0;
  for (let i = 1; i <= n - 3; i++) if (c[i] <= x && x < c[i + 1]) return i;
  if (c[n - 2] <= x && x <= c[n - 1]) return n - 2;
  return n - 1;
}

/* ------------------------------------------------------------------ errors -------------- */

/** Sum of squared errors of group g between the input values and dequantized values. */
export function groupSse(v: ArrayLike<number>, deq: ArrayLike<number>, members: number[]): number {
  let s = 0;
  for (const i of members) {
    const e = v[i] - deq[i];
    s += e * e;
  }
  return s;
}
/** Largest |value| of group g's members. */
export function groupMaxAbs(v: ArrayLike<number>, members: number[]): number {
  let m = 0;
  for (const i of members) m = Math.max(m, Math.abs(v[i]));
  return m;
}

/** Byte-exact equality of two typed arrays, reporting the first differing element. */
export function assertSameBits(
  a: ArrayBufferView & { length: number },
  b: ArrayBufferView & { length: number },
  msg: string,
): void {
  assert.equal(a.length, b.length, `${msg}: length`);
  const x = new Uint8Array(a.buffer, a.byteOffset, a.byteLength),
    y = new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
  assert.equal(x.length, y.length, `${msg}: byte length`);
  const per = x.length / a.length;
  for (let i = 0; i < x.length; i++) {
    if (x[i] !== y[i]) {
      const e = Math.floor(i / per);
      assert.fail(
        `${msg}: element ${e} differs (${(a as unknown as number[])[e]} vs ${
          (b as unknown as number[])[e]
        })`,
      );
    }
  }
}

/* ------------------------------------------------------------------ errors thrown -------- */

/** Stores a value (f32) or a raw bit pattern (f16, bf16: through a Uint16Array view) at index i. */
export function setRaw(x: Float32Array | Float16Array | Uint16Array, i: number, v: number): void {
  if (x instanceof Float32Array) x[i] = v;
  else new Uint16Array(x.buffer, x.byteOffset, x.length)[i] = v;
}

/** NaN, +Inf, -Inf per dtype: f32 values, f16 and bf16 bit patterns. */
export const NONFINITE: Record<DataDType, [string, number][]> = {
  f32: [["NaN", NaN], ["+Inf", Infinity], ["-Inf", -Infinity]],
  f16: [["NaN", 0x7e00], ["+Inf", 0x7c00], ["-Inf", 0xfc00]],
  bf16: [["NaN", 0x7fc0], ["+Inf", 0x7f80], ["-Inf", 0xff80]],
};

/** Asserts fn throws `kind` (an Error class, or a KiviError code) with a message matching `names`. */
export function throwsNaming(
  fn: () => unknown,
  kind: (new (...a: never[]) => Error) | StatusName,
  names: RegExp,
  what: string,
): void {
  assert.throws(fn, (e: unknown) => {
    if (typeof kind === "string") {
      assert.ok(e instanceof KiviError, `${what}: expected KiviError ${kind}, got ${e}`);
      assert.equal(e.code, kind, `${what}: ${e.message}`);
    } else {
      assert.ok(e instanceof kind, `${what}: expected ${kind.name}, got ${e}`);
      assert.ok(!(e instanceof KiviError), `${what}: argument mistakes are caught in TS, got ${e}`);
    }
    assert.match((e as Error).message, names, what);
    return true;
  }, what);
}

/** An error case: what it tries, the call, the error it must throw and what the message names (see
 * {@link throwsNaming}). */
export type ErrorCase = [
  what: string,
  fn: () => unknown,
  kind: Parameters<typeof throwsNaming>[1],
  names: RegExp,
];

/** Runs each case against the fixture `f`: the error it names, then `snapshot(f)` unchanged (all or
 * nothing); `f.rng.tag` ends each message. */
export function expectCases<F extends { rng: Rng }>(
  f: F,
  snapshot: (f: F) => unknown,
  cases: ErrorCase[],
): void {
  for (const [what, fn, kind, names] of cases) {
    const before = snapshot(f);
    throwsNaming(fn, kind, names, `${what} ${f.rng.tag}`);
    assert.deepEqual(snapshot(f), before, `${what} ${f.rng.tag}: the cache changed`);
  }
}

/* ------------------------------------------------------------------ cache oracle --------- */

/** Seeded K/V rows [layers][n][kvHeads][headDim]; channel 3 of every head is an outlier, as in real keys. */
export function kvRows(
  rng: Rng,
  n: number,
  kvHeads: number,
  headDim: number,
  layers = 1,
): Float32Array {
  const a = new Float32Array(layers * n * kvHeads * headDim);
  for (let i = 0; i < a.length; i++) a[i] = rng.normal() * (i % headDim === 3 ? 10 : 1);
  return a;
}

/**
 * float64 decode attention of one sequence over given K/V [len][kvHeads][headDim]:
 * out[h] = softmax(scale q[h].K^T) V with query head h reading KV head h / (queryHeads / kvHeads).
 */
export function attentionOracle(
  k: ArrayLike<number>,
  v: ArrayLike<number>,
  q: ArrayLike<number>,
  len: number,
  o: { kvHeads: number; headDim: number; queryHeads: number },
  scale: number,
): Float64Array {
  const { kvHeads, headDim: D, queryHeads } = o;
  const out = new Float64Array(queryHeads * D);
  const ratio = queryHeads / kvHeads;
  const s = new Float64Array(len);
  for (let h = 0; h < queryHeads; h++) {
    const kh = Math.floor(h / ratio);
    let m = -Infinity;
    for (let t = 0; t < len; t++) {
      let dot = 0;
      for (let d = 0; d < D; d++) dot += q[h * D + d] * k[(t * kvHeads + kh) * D + d];
      s[t] = dot * scale;
      m = Math.max(m, s[t]);
    }
    let sum = 0;
    for (let t = 0; t < len; t++) sum += s[t] = Math.exp(s[t] - m);
    for (let t = 0; t < len; t++) {
      for (let d = 0; d < D; d++) out[h * D + d] += (s[t] / sum) * v[(t * kvHeads + kh) * D + d];
    }
  }
  return out;
}

/** The cache options the cache tests share: uniform 2-bit keys and codebook 2-bit values in groups
 * of 32, pages of 32 tokens and a residual window of 32; sizes as given. */
export function cacheOptions(
  layers: number,
  kvHeads: number,
  queryHeads: number,
  headDim: number,
  maxPages: number,
  maxSequences: number,
) {
  return {
    layers,
    kvHeads,
    queryHeads,
    headDim,
    pageTokens: 32,
    residual: 32,
    maxPages,
    maxSequences,
    keys: { kind: "uniform", bits: 2, group: 32 },
    values: { kind: "codebook", bits: 2, group: 32 },
  } as const;
}

/** Cache formats by name: U (uniform) or CB (codebook), bits, G group. */
export const CB2_G64 = { kind: "codebook", bits: 2, group: 64 } as const;
export const CB2_G32 = { kind: "codebook", bits: 2, group: 32 } as const;
export const CB4_G32 = { kind: "codebook", bits: 4, group: 32 } as const;
export const CB4_G64 = { kind: "codebook", bits: 4, group: 64 } as const;
export const U2_G32 = { kind: "uniform", bits: 2, group: 32 } as const;
export const U2_G64 = { kind: "uniform", bits: 2, group: 64 } as const;
export const U4_G128 = { kind: "uniform", bits: 4, group: 128 } as const;
export const U4_G32 = { kind: "uniform", bits: 4, group: 32 } as const;
export const U4_G64 = { kind: "uniform", bits: 4, group: 64 } as const;

/** A one-layer cache of four 32-token pages, for the full-pool tests. */
export const FOUR_PAGES = {
  layers: 1,
  kvHeads: 2,
  headDim: 64,
  residual: 32,
  pageTokens: 32,
  maxPages: 4,
} as const;

/** The head size and residual window most cache tests use. */
export const D64_R32 = { headDim: 64, residual: 32 } as const;
