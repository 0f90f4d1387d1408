/**
 * The quantizers: block statistics, uniform (KIVI) and codebook formats, pack and unpack. Every
 * function takes host typed arrays or `DeviceTensor`s, on either backend, with the same signature;
 * results live where the input lives. On the CUDA backend host arrays are copied to the device and
 * the results back, and the call waits for the device (see src/_staging.ts).
 *
 * @module
 */
import type { Pointer } from "./ffi/_native.ts";
import type { SymbolName } from "./ffi/symbols.ts";
import type { Backend, DeviceTensor } from "./backend.ts";
import { checkInt, checkOneOf, checkShape, isTensor, show } from "./_checks.ts";
import { type DType, dtypeCode, dtypeOfHost, type HostArray, hostArray, type HostOf, type TensorDType } from "./_dtype.ts";
import { Staging } from "./_staging.ts";

/** Grouping axis: "token" groups G consecutive tokens of one channel (keys, KIVI's per-channel
 * quantization); "channel" groups G consecutive channels of one token (values, per-token). */
export type Axis = "token" | "channel";
/** Code width. */
export type Bits = 2 | 4;
/** Group size G. */
export type GroupSize = 32 | 64 | 128;
/** Codebook fit: "free" moves every centroid; "pinned" keeps the outer two at the group's min/max. */
export type Fit = "free" | "pinned";
/** Codebook assignment: the nearest centroid, or the seed's interval table. */
export type Assign = "nearest" | "interval";

/** A quantization format. */
export type Format =
  | { kind: "uniform"; bits: Bits; group?: GroupSize }
  | { kind: "codebook"; bits: Bits; group?: GroupSize; fit?: Fit; iterations?: number; assign?: Assign };

/** A format with every default filled in. */
export type ResolvedFormat =
  | { kind: "uniform"; bits: Bits; group: GroupSize }
  | { kind: "codebook"; bits: Bits; group: GroupSize; fit: Fit; iterations: number; assign: Assign };

/** Where data lives: host typed arrays or backend tensors. */
export type Mem = "host" | "device";
/** The buffer type of dtype D in memory M. */
export type Buf<M extends Mem, D extends TensorDType> = M extends "host" ? HostOf[D] : DeviceTensor<D>;
/** Inputs accepted by the quantizers. */
export type Input = HostArray | DeviceTensor;
/** The memory an input lives in. */
export type MemOf<X> = X extends DeviceTensor ? "device" : "host";

/** Uniform (KIVI) codes: packed words plus fp16 scale and zero (the group minimum) per group. */
export interface UniformQuantized<M extends Mem> {
  readonly format: Extract<ResolvedFormat, { kind: "uniform" }>;
  readonly axis: Axis;
  readonly shape: readonly [number, number];
  readonly groups: number;
  readonly codes: Buf<M, "u32">;
  readonly scale: Buf<M, "f16">;
  readonly zero: Buf<M, "f16">;
}

/** Codebook codes: packed words plus 2^bits sorted fp16 centroids per group. */
export interface CodebookQuantized<M extends Mem> {
  readonly format: Extract<ResolvedFormat, { kind: "codebook" }>;
  readonly axis: Axis;
  readonly shape: readonly [number, number];
  readonly groups: number;
  readonly codes: Buf<M, "u32">;
  readonly centroids: Buf<M, "f16">;
}

/** Either format's codes. */
export type Quantized<M extends Mem> = UniformQuantized<M> | CodebookQuantized<M>;

/** Shape and dtype of an input; required for host arrays, checked against a tensor's. */
export interface InputOptions {
  /** [rows, cols] (tokens, channels). A tensor of higher rank is read as [prod(leading), last]. */
  shape?: readonly [number, number];
  /** Element type; only needed for a Uint16Array of bf16 bits (default f16). */
  dtype?: DType;
}

/** Options of {@link stats}. */
export interface StatsOptions<M extends Mem> extends InputOptions {
  axis: Axis;
  group?: GroupSize;
  out?: { stats?: Buf<M, "f32">; nonfinite?: Buf<M, "i32"> };
}

/** Per-group statistics: `stats` is [groups][4] = min, max, mean, variance of the finite values. */
export interface BlockStats<M extends Mem> {
  readonly groups: number;
  readonly stats: Buf<M, "f32">;
  readonly nonfinite: Buf<M, "i32">;
}

/** Options of {@link quantize}. */
export interface QuantizeOptions<M extends Mem> extends InputOptions {
  axis: Axis;
  format: Format;
  /** Skip the NaN/Inf scan (the caller promises finite data). Default false. */
  trusted?: boolean;
  out?: { codes?: Buf<M, "u32">; scale?: Buf<M, "f16">; zero?: Buf<M, "f16">; centroids?: Buf<M, "f16"> };
}

/** Options of {@link fitCodebook}. */
export interface FitOptions<M extends Mem> extends InputOptions {
  axis: Axis;
  bits: Bits;
  group?: GroupSize;
  fit?: Fit;
  /** Iteration cap, 1..256 (default 16); the fit stops early when no assignment changes. */
  iterations?: number;
  /** Also return iterations done and the inertia (sum of squared errors) after each. */
  trace?: boolean;
  trusted?: boolean;
  out?: { centroids?: Buf<M, "f16"> };
}

/** Fitted centroids, and with `trace` the iteration count and inertia trace per group. */
export interface FitResult<M extends Mem> {
  readonly groups: number;
  /** [groups][2^bits] fp16, ascending. */
  readonly centroids: Buf<M, "f16">;
  /** [groups] updates done (with `trace`). */
  readonly iters?: Buf<M, "i32">;
  /** [groups][iterations + 1] inertia at the start and after each update (with `trace`). */
  readonly inertia?: Buf<M, "f32">;
}

/** Options of {@link quantizeWithCodebook}. */
export interface CodebookOptions<M extends Mem> extends InputOptions {
  axis: Axis;
  bits: Bits;
  group?: GroupSize;
  assign?: Assign;
  trusted?: boolean;
  out?: { codes?: Buf<M, "u32"> };
}

const axisCode: Record<Axis, number> = { token: 0, channel: 1 };
const fitCode: Record<Fit, number> = { free: 0, pinned: 1 };
const assignCode: Record<Assign, number> = { nearest: 0, interval: 1 };
const GROUPS = [32, 64, 128] as const;
const BITS = [2, 4] as const;

/**
 * Fills in a format's defaults and checks it.
 *
 * @example
 * ```ts
 * import { resolveFormat } from "./mod.ts";
 * console.log(resolveFormat({ kind: "codebook", bits: 2 }));
 * // { kind: "codebook", bits: 2, group: 32, fit: "free", iterations: 16, assign: "nearest" }
 * ```
 */
export function resolveFormat(format: Format, name = "format"): ResolvedFormat {
  if (format === null || typeof format !== "object") {
    throw new TypeError(`${name} must be an object such as { kind: "uniform", bits: 2 }, got ${show(format)}`);
  }
  const kind = checkOneOf(`${name}.kind`, format.kind, ["uniform", "codebook"] as const);
  const bits = checkOneOf(`${name}.bits`, format.bits, BITS);
  const group = checkOneOf(`${name}.group`, format.group ?? 32, GROUPS);
  if (kind === "uniform") return { kind, bits, group };
  const f = format as Extract<Format, { kind: "codebook" }>;
  return {
    kind,
    bits,
    group,
    fit: checkOneOf(`${name}.fit`, f.fit ?? "free", ["free", "pinned"] as const),
    iterations: checkInt(`${name}.iterations`, f.iterations ?? 16, 1, 256),
    assign: checkOneOf(`${name}.assign`, f.assign ?? "nearest", ["nearest", "interval"] as const),
  };
}

/**
 * Number of groups of a [rows, cols] matrix.
 *
 * @example
 * ```ts
 * import { groupCount } from "./mod.ts";
 * console.log(groupCount([64, 128], "token", 32)); // 256: 2 groups of 32 tokens in each of 128 channels
 * ```
 */
export function groupCount(shape: readonly [number, number], axis: Axis, group: number): number {
  return axis === "token" ? shape[1] * (shape[0] / group) : shape[0] * (shape[1] / group);
}

/**
 * Number of packed uint32 words of a [rows, cols] matrix.
 *
 * @example
 * ```ts
 * import { wordCount } from "./mod.ts";
 * console.log(wordCount([64, 128], 2)); // 512 uint32 words of 16 codes
 * ```
 */
export function wordCount(shape: readonly [number, number], bits: Bits): number {
  return (shape[0] * shape[1]) / (32 / bits);
}

/**
 * Bits stored per value: code bits plus the fp16 params spread over the group.
 *
 * @example
 * ```ts
 * import { bitsPerValue } from "./mod.ts";
 * console.log(bitsPerValue({ kind: "uniform", bits: 2, group: 32 })); // 3
 * console.log(bitsPerValue({ kind: "codebook", bits: 2, group: 64 })); // 3
 * ```
 */
export function bitsPerValue(format: Format): number {
  const f = resolveFormat(format);
  const paramBits = f.kind === "uniform" ? 2 * 16 : (1 << f.bits) * 16;
  return f.bits + paramBits / f.group;
}

/**
 * One native call: resolves inputs to addresses, allocates (or checks) outputs where the input
 * lives, and disposes what it allocated if the call fails, so a failed call leaves nothing behind.
 * Host arrays are staged through device memory where the backend needs it (`using` frees that).
 */
class Call<M extends Mem> {
  readonly lib;
  readonly ctx;
  #made: DeviceTensor[] = [];
  #stage: Staging;

  constructor(readonly kivi: Backend, readonly mem: M, readonly op: string) {
    const n = kivi._native(op);
    this.lib = n.lib;
    this.ctx = n.ctx;
    this.#stage = new Staging(kivi, op);
  }

  /** Address of an input buffer (host array or tensor) of `length` elements of `dtype`. */
  input(name: string, x: unknown, dtype: TensorDType, length: number): Pointer {
    this.#checkBuf(name, x, dtype, length);
    return isTensor(x) ? x.pointer(this.op) : this.#stage.input(x as HostArray, dtype);
  }

  /** Address of an output: the caller's buffer (checked) or a new one. */
  output<D extends TensorDType>(name: string, dtype: D, length: number, given?: Buf<M, D>): [Buf<M, D>, Pointer] {
    if (given !== undefined) {
      this.#checkBuf(`out.${name}`, given, dtype, length);
      return [given, isTensor(given) ? given.writePointer(this.op, `out.${name}`) : this.#stage.output(given as HostArray, dtype)];
    }
    if (this.mem === "host") {
      const a = hostArray(dtype, length);
      return [a as Buf<M, D>, this.#stage.output(a, dtype)];
    }
    const t = this.kivi.alloc([length], dtype);
    this.#made.push(t as DeviceTensor);
    return [t as Buf<M, D>, t.pointer(this.op)];
  }

  /** Runs the export; on failure frees what this call allocated and throws. */
  run<K extends SymbolName>(name: K, status: number): void {
    if (status === 0) return this.#stage.finish();
    for (const t of this.#made) t.dispose();
    this.kivi._check(name, status);
  }

  /** Frees the staging tensors of host arrays (the results stay). */
  [Symbol.dispose](): void {
    this.#stage[Symbol.dispose]();
  }

  #checkBuf(name: string, x: unknown, dtype: TensorDType, length: number): void {
    if (this.mem === "device") {
      if (!isTensor(x)) throw new TypeError(`${name} must be a DeviceTensor like the input, got ${show(x)}`);
      if (x.backend !== this.kivi) {
        throw new TypeError(`${name} belongs to another backend; upload it to this one first`);
      }
      if (x.dtype !== dtype && !(dtype === "f16" && x.dtype === "u16")) {
        throw new TypeError(`${name} must have dtype ${show(dtype)}, got ${show(x.dtype)}`);
      }
      if (x.length !== length) throw new TypeError(`${name} must have ${length} elements, got ${x.length}`);
      return;
    }
    if (isTensor(x) || !ArrayBuffer.isView(x)) {
      throw new TypeError(`${name} must be a host typed array like the input, got ${show(x)}`);
    }
    const d = dtypeOfHost(x, dtype);
    if (d !== dtype) throw new TypeError(`${name} must be a ${dtype} array, got ${show(x)}`);
    if ((x as HostArray).length !== length) {
      throw new TypeError(`${name} must have ${length} elements, got ${(x as HostArray).length}`);
    }
  }
}

/** Resolves where x lives, its dtype and its [rows, cols], checking them against the backend. */
function describeInput(kivi: Backend, x: unknown, opts: InputOptions, name = "x") {
  if (isTensor(x)) {
    const t = x;
    if (t.backend !== kivi) throw new TypeError(`${name} belongs to another backend; upload it to this one first`);
    const dtype = checkOneOf(`${name}.dtype`, t.dtype, ["f32", "f16", "bf16"] as const);
    const cols = t.shape[t.shape.length - 1];
    const shape: [number, number] = t.shape.length === 1 ? [1, cols] : [t.length / cols, cols];
    if (opts.shape !== undefined) {
      const s = checkShape("shape", opts.shape);
      if (s[0] * s[1] !== t.length) {
        throw new TypeError(`shape ${show(s)} must hold the tensor's ${t.length} elements`);
      }
      return { mem: "device" as const, dtype, shape: s };
    }
    return { mem: "device" as const, dtype, shape };
  }
  if (!ArrayBuffer.isView(x)) throw new TypeError(`${name} must be a Float32Array, Float16Array, Uint16Array or DeviceTensor, got ${show(x)}`);
  const dtype = dtypeOfHost(x, opts.dtype);
  if (dtype !== "f32" && dtype !== "f16" && dtype !== "bf16") {
    throw new TypeError(`${name} must be a Float32Array, Float16Array or Uint16Array, got ${show(x)}`);
  }
  if (opts.shape === undefined) throw new TypeError(`shape must be given as [rows, cols] for a host array`);
  const shape = checkShape("shape", opts.shape);
  if (shape[0] * shape[1] !== (x as HostArray).length) {
    throw new TypeError(`shape ${show(shape)} must hold ${name}'s ${(x as HostArray).length} elements`);
  }
  return { mem: "host" as const, dtype, shape };
}

function checkGrouping(shape: readonly [number, number], axis: Axis, group: number): void {
  const [dim, label] = axis === "token" ? [shape[0], "shape[0] (rows)"] : [shape[1], "shape[1] (cols)"];
  if (dim % group !== 0) {
    throw new RangeError(`${label} must be a multiple of group (${group}) for axis "${axis}", got ${dim}`);
  }
}

function flags(trusted: boolean | undefined): number {
  return trusted ? 1 : 0;
}

/** Block statistics per group (see {@link BlockStats}). */
export function stats<X extends Input>(kivi: Backend, x: X, opts: StatsOptions<MemOf<X>>): BlockStats<MemOf<X>> {
  const { mem, dtype, shape } = describeInput(kivi, x, opts);
  const axis = checkOneOf("axis", opts.axis, ["token", "channel"] as const);
  const group = checkOneOf("group", opts.group ?? 32, GROUPS);
  checkGrouping(shape, axis, group);
  const groups = groupCount(shape, axis, group);
  using c = new Call(kivi, mem as MemOf<X>, "stats");
  const px = c.input("x", x, dtype, shape[0] * shape[1]);
  const [st, pst] = c.output("stats", "f32", groups * 4, opts.out?.stats);
  const [nf, pnf] = c.output("nonfinite", "i32", groups, opts.out?.nonfinite);
  c.run(
    "kivi_stats_block",
    c.lib.call("kivi_stats_block", c.ctx, px, dtypeCode[dtype], shape[0], shape[1], axisCode[axis], group, pst, pnf),
  );
  return { groups, stats: st, nonfinite: nf };
}

/** Quantizes and packs x in one pass (codebook: fit, then quantize against the fp16 centroids). */
export function quantize<X extends Input>(kivi: Backend, x: X, opts: QuantizeOptions<MemOf<X>>): Quantized<MemOf<X>> {
  const { mem, dtype, shape } = describeInput(kivi, x, opts);
  const axis = checkOneOf("axis", opts.axis, ["token", "channel"] as const);
  const format = resolveFormat(opts.format);
  checkGrouping(shape, axis, format.group);
  const groups = groupCount(shape, axis, format.group);
  using c = new Call(kivi, mem as MemOf<X>, "quantize");
  const px = c.input("x", x, dtype, shape[0] * shape[1]);
  const [codes, pc] = c.output("codes", "u32", wordCount(shape, format.bits), opts.out?.codes);
  const common = [c.ctx, px, dtypeCode[dtype], shape[0], shape[1], axisCode[axis], format.group, format.bits] as const;
  if (format.kind === "uniform") {
    const [scale, ps] = c.output("scale", "f16", groups, opts.out?.scale);
    const [zero, pz] = c.output("zero", "f16", groups, opts.out?.zero);
    c.run("kivi_uniform_quantize", c.lib.call("kivi_uniform_quantize", ...common, flags(opts.trusted), pc, ps, pz));
    return { format, axis, shape, groups, codes, scale, zero };
  }
  const [centroids, pk] = c.output("centroids", "f16", groups << format.bits, opts.out?.centroids);
  c.run(
    "kivi_codebook_encode",
    c.lib.call(
      "kivi_codebook_encode",
      ...common,
      fitCode[format.fit],
      format.iterations,
      assignCode[format.assign],
      flags(opts.trusted),
      pk,
      pc,
    ),
  );
  return { format, axis, shape, groups, codes, centroids };
}

/** Unpacks and dequantizes codes into `dtype` (default f32), where the codes live. */
export function dequantize<M extends Mem>(
  kivi: Backend,
  q: Quantized<M>,
  opts: { dtype?: DType; out?: Buf<M, DType> } = {},
): Buf<M, DType> {
  if (q === null || typeof q !== "object" || !("codes" in q)) {
    throw new TypeError(`q must be the result of quantize(), got ${show(q)}`);
  }
  const dtype = checkOneOf("dtype", opts.dtype ?? "f32", ["f32", "f16", "bf16"] as const);
  const format = resolveFormat(q.format, "q.format");
  const axis = checkOneOf("q.axis", q.axis, ["token", "channel"] as const);
  const shape = checkShape("q.shape", q.shape);
  checkGrouping(shape, axis, format.group);
  const groups = groupCount(shape, axis, format.group);
  const mem = (ArrayBuffer.isView(q.codes) ? "host" : "device") as M;
  using c = new Call(kivi, mem, "dequantize");
  const n = shape[0] * shape[1];
  const pc = c.input("q.codes", q.codes, "u32", wordCount(shape, format.bits));
  const dims = [shape[0], shape[1], axisCode[axis], format.group, format.bits] as const;
  if (format.kind === "uniform") {
    const u = q as UniformQuantized<M>;
    const ps = c.input("q.scale", u.scale, "f16", groups);
    const pz = c.input("q.zero", u.zero, "f16", groups);
    const [out, po] = c.output("out", dtype, n, opts.out as Buf<M, typeof dtype> | undefined);
    c.run("kivi_uniform_dequantize", c.lib.call("kivi_uniform_dequantize", c.ctx, pc, ps, pz, ...dims, po, dtypeCode[dtype]));
    return out;
  }
  const k = q as CodebookQuantized<M>;
  const pk = c.input("q.centroids", k.centroids, "f16", groups << format.bits);
  const [out, po] = c.output("out", dtype, n, opts.out as Buf<M, typeof dtype> | undefined);
  c.run("kivi_codebook_dequantize", c.lib.call("kivi_codebook_dequantize", c.ctx, pc, pk, ...dims, po, dtypeCode[dtype]));
  return out;
}

/** Fits 2^bits centroids per group by 1-D k-means (Lloyd-Max), starting from the uniform grid. */
export function fitCodebook<X extends Input>(kivi: Backend, x: X, opts: FitOptions<MemOf<X>>): FitResult<MemOf<X>> {
  const { mem, dtype, shape } = describeInput(kivi, x, opts);
  const axis = checkOneOf("axis", opts.axis, ["token", "channel"] as const);
  const f = resolveFormat({ kind: "codebook", bits: opts.bits, group: opts.group, fit: opts.fit, iterations: opts.iterations });
  if (f.kind !== "codebook") throw new Error("unreachable");
  checkGrouping(shape, axis, f.group);
  const groups = groupCount(shape, axis, f.group);
  using c = new Call(kivi, mem as MemOf<X>, "fitCodebook");
  const px = c.input("x", x, dtype, shape[0] * shape[1]);
  const [centroids, pk] = c.output("centroids", "f16", groups << f.bits, opts.out?.centroids);
  const [iters, pi] = opts.trace ? c.output("iters", "i32", groups) : [undefined, null];
  const [inertia, pn] = opts.trace ? c.output("inertia", "f32", groups * (f.iterations + 1)) : [undefined, null];
  c.run(
    "kivi_codebook_fit",
    c.lib.call(
      "kivi_codebook_fit",
      c.ctx,
      px,
      dtypeCode[dtype],
      shape[0],
      shape[1],
      axisCode[axis],
      f.group,
      f.bits,
      fitCode[f.fit],
      f.iterations,
      flags(opts.trusted),
      pk,
      pi,
      pn,
    ),
  );
  return { groups, centroids, iters, inertia };
}

/** Codes of x against given centroids ([groups][2^bits] fp16, ascending per group). */
export function quantizeWithCodebook<X extends Input>(
  kivi: Backend,
  x: X,
  centroids: Buf<MemOf<X>, "f16">,
  opts: CodebookOptions<MemOf<X>>,
): CodebookQuantized<MemOf<X>> {
  const { mem, dtype, shape } = describeInput(kivi, x, opts);
  const axis = checkOneOf("axis", opts.axis, ["token", "channel"] as const);
  const format = resolveFormat({ kind: "codebook", bits: opts.bits, group: opts.group, assign: opts.assign });
  if (format.kind !== "codebook") throw new Error("unreachable");
  checkGrouping(shape, axis, format.group);
  const groups = groupCount(shape, axis, format.group);
  using c = new Call(kivi, mem as MemOf<X>, "quantizeWithCodebook");
  const px = c.input("x", x, dtype, shape[0] * shape[1]);
  const pk = c.input("centroids", centroids, "f16", groups << format.bits);
  const [codes, pc] = c.output("codes", "u32", wordCount(shape, format.bits), opts.out?.codes);
  c.run(
    "kivi_codebook_quantize",
    c.lib.call(
      "kivi_codebook_quantize",
      c.ctx,
      px,
      dtypeCode[dtype],
      shape[0],
      shape[1],
      axisCode[axis],
      format.group,
      format.bits,
      pk,
      assignCode[format.assign],
      flags(opts.trusted),
      pc,
    ),
  );
  return { format, axis, shape, groups, codes, centroids };
}

function codesLength(name: string, x: unknown): number {
  if (ArrayBuffer.isView(x)) return (x as HostArray).length;
  if (isTensor(x)) return x.length;
  throw new TypeError(`${name} must be a typed array or DeviceTensor, got ${show(x)}`);
}

/** Packs codes (one per byte, each < 2^bits) into uint32 words, LSB first. */
export function pack<M extends Mem>(
  kivi: Backend,
  codes: Buf<M, "u8">,
  opts: { bits: Bits; out?: Buf<M, "u32"> },
): Buf<M, "u32"> {
  const bits = checkOneOf("bits", opts?.bits, BITS);
  const n = codesLength("codes", codes);
  const cpw = 32 / bits;
  if (n === 0 || n % cpw !== 0) {
    throw new RangeError(`codes.length must be a positive multiple of ${cpw} (codes per word at ${bits} bits), got ${n}`);
  }
  const mem = (ArrayBuffer.isView(codes) ? "host" : "device") as M;
  using c = new Call(kivi, mem, "pack");
  const pc = c.input("codes", codes, "u8", n);
  const [words, pw] = c.output("words", "u32", n / cpw, opts.out);
  c.run("kivi_codes_pack", c.lib.call("kivi_codes_pack", c.ctx, pc, n, bits, pw));
  return words;
}

/** Unpacks uint32 words into codes, one per byte (32 / bits codes a word). */
export function unpack<M extends Mem>(
  kivi: Backend,
  words: Buf<M, "u32">,
  opts: { bits: Bits; out?: Buf<M, "u8"> },
): Buf<M, "u8"> {
  const bits = checkOneOf("bits", opts?.bits, BITS);
  const nw = codesLength("words", words);
  if (nw === 0) throw new RangeError(`words must hold at least one word, got 0`);
  const n = nw * (32 / bits);
  const mem = (ArrayBuffer.isView(words) ? "host" : "device") as M;
  using c = new Call(kivi, mem, "unpack");
  const pw = c.input("words", words, "u32", nw);
  const [codes, pc] = c.output("codes", "u8", n, opts.out);
  c.run("kivi_codes_unpack", c.lib.call("kivi_codes_unpack", c.ctx, pw, n, bits, pc));
  return codes;
}
