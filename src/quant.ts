/**
 * The quantizers: block statistics, uniform (KIVI) and codebook formats, pack and unpack. Every
 * function takes host typed arrays or `DeviceTensor`s, on either backend, with the same signature;
 * results live where the input lives. On the CUDA backend host arrays are copied to the device and
 * the results back, and the call waits for the device (see src/_staging.ts).
 *
 * @module
 */
import type { BackendCore as Backend, DeviceTensor } from "./tensor.ts";
import { codebookFit, refuseCodebookKeys, RULES } from "./_rules.ts";
import { checkBool, checkOneOf, checkShape, hostView, readOptions, show } from "./_checks.ts";
import { type DType, dtypeCode, type HostArray, type HostOf, type TensorDType } from "./_dtype.ts";
import { Call } from "./_call.ts";
import { checkParamRange, describeInput } from "./_input.ts";

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
  | {
    kind: "codebook";
    bits: Bits;
    group?: GroupSize;
    fit?: Fit;
    iterations?: number;
    assign?: Assign;
  };

/** A format with every default filled in. */
export type ResolvedFormat =
  | { kind: "uniform"; bits: Bits; group: GroupSize }
  | {
    kind: "codebook";
    bits: Bits;
    group: GroupSize;
    fit: Fit;
    iterations: number;
    assign: Assign;
  };

/** Where data lives: host typed arrays or backend tensors. */
export type Mem = "host" | "device";
/** The buffer type of dtype D in memory M. */
export type Buf<M extends Mem, D extends TensorDType> = M extends "host" ? HostOf[D]
  : DeviceTensor<D>;
/** Inputs accepted by the quantizers. */
export type Input = HostArray | DeviceTensor;
/** The memory an input lives in. */
export type MemOf<X> = X extends DeviceTensor ? "device" : "host";

/** What codes of either format carry: the format, the grouping and the packed words. */
interface QuantizedCodes<M extends Mem, K extends ResolvedFormat["kind"]> {
  readonly format: Extract<ResolvedFormat, { kind: K }>;
  readonly axis: Axis;
  readonly shape: readonly [number, number];
  readonly groups: number;
  readonly codes: Buf<M, "u32">;
}

/** Uniform (KIVI) codes: packed words plus fp16 scale and zero (the group minimum) per group. */
export interface UniformQuantized<M extends Mem> extends QuantizedCodes<M, "uniform"> {
  readonly scale: Buf<M, "f16">;
  readonly zero: Buf<M, "f16">;
}

/** Codebook codes: packed words plus 2^bits sorted fp16 centroids per group. */
export interface CodebookQuantized<M extends Mem> extends QuantizedCodes<M, "codebook"> {
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
  out?: {
    codes?: Buf<M, "u32">;
    scale?: Buf<M, "f16">;
    zero?: Buf<M, "f16">;
    centroids?: Buf<M, "f16">;
  };
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
const GROUPS = RULES.groups;
const BITS = RULES.bits;

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
    throw new TypeError(
      `${name} must be an object such as { kind: "uniform", bits: 2 }, got ${show(format)}`,
    );
  }
  const f = readOptions(name, format, ["kind", "bits", "group", "fit", "iterations", "assign"]);
  const kind = checkOneOf(`${name}.kind`, f.kind, RULES.kinds);
  const bits = checkOneOf(`${name}.bits`, f.bits, BITS);
  const group = checkOneOf(`${name}.group`, f.group ?? 32, GROUPS);
  if (kind === "uniform") {
    refuseCodebookKeys(name, f, ["fit", "iterations", "assign"]);
    return { kind, bits, group };
  }
  const { fit, iterations } = codebookFit(name, f);
  return {
    kind,
    bits,
    group,
    fit,
    iterations,
    assign: checkOneOf(`${name}.assign`, f.assign ?? "nearest", RULES.assigns),
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

function checkGrouping(shape: readonly [number, number], axis: Axis, group: number): void {
  const [dim, label] = axis === "token"
    ? [shape[0], "shape[0] (rows)"]
    : [shape[1], "shape[1] (cols)"];
  if (dim % group !== 0) {
    throw new RangeError(
      `${label} must be a multiple of group (${group}) for axis "${axis}", got ${dim}`,
    );
  }
}

function flags(trusted: boolean): number {
  return trusted ? 1 : 0;
}

const AXES = ["token", "channel"] as const;

/** x described once (describeInput), its axis read and its grouping checked: what every quantizer
 * reads of its input before it takes native handles. */
function groupedInput(
  kivi: Backend,
  x: unknown,
  o: Record<string, unknown>,
  groupOf: GroupSize | (() => GroupSize),
) {
  const d = describeInput(kivi, x, o.shape, o.dtype);
  const axis = checkOneOf("axis", o.axis, AXES);
  const group = typeof groupOf === "function" ? groupOf() : groupOf; // read after the axis, in that order
  checkGrouping(d.shape, axis, group);
  return {
    d,
    dtype: d.dtype,
    shape: d.shape,
    axis,
    group,
    groups: groupCount(d.shape, axis, group),
  };
}

/** The matrix arguments of the quantizer exports after x: dtype, rows, cols, axis, group, bits. */
function matrixArgs(
  dtype: TensorDType,
  shape: readonly number[],
  axis: Axis,
  group: number,
  bits: number,
) {
  return [dtypeCode[dtype as "f32"], shape[0], shape[1], axisCode[axis], group, bits] as const;
}

/** Block statistics per group (see {@link BlockStats}). */
export function stats<X extends Input>(
  kivi: Backend,
  x: X,
  opts: StatsOptions<MemOf<X>>,
): BlockStats<MemOf<X>> {
  const o = readOptions("options", opts, ["shape", "dtype", "axis", "group", "out"], true);
  const out = readOptions("out", o.out, ["stats", "nonfinite"]);
  const { d, dtype, shape, axis, group, groups } = groupedInput(
    kivi,
    x,
    o,
    () => checkOneOf("group", o.group ?? 32, GROUPS),
  );
  using c = new Call(kivi, d.mem as MemOf<X>, "stats");
  const ix = c.input("x", x, dtype, shape[0] * shape[1]);
  const ist = c.output("stats", "f32", groups * 4, out.stats);
  const inf = c.output("nonfinite", "i32", groups, out.nonfinite);
  c.bind();
  c.run(
    "kivi_stats_block",
    c.lib.call(
      "kivi_stats_block",
      c.ctx,
      c.ptr(ix),
      dtypeCode[dtype],
      shape[0],
      shape[1],
      axisCode[axis],
      group,
      c.ptr(ist),
      c.ptr(inf),
    ),
  );
  return { groups, stats: c.buf(ist), nonfinite: c.buf(inf) };
}

/** The options quantize reads. */
const QUANTIZE_KEYS = ["shape", "dtype", "axis", "format", "trusted", "out"] as const;

/** Quantizes and packs x in one pass (codebook: fit, then quantize against the fp16 centroids). */
export function quantize<X extends Input>(
  kivi: Backend,
  x: X,
  opts: QuantizeOptions<MemOf<X>>,
): Quantized<MemOf<X>> {
  const o = readOptions("options", opts, QUANTIZE_KEYS, true);
  const format = resolveFormat(o.format as Format);
  const out = readOptions("out", o.out, ["codes", "scale", "zero", "centroids"]);
  for (const k of format.kind === "uniform" ? ["centroids"] as const : ["scale", "zero"] as const) {
    if (out[k] !== undefined) {
      throw new TypeError(`out.${k} is not an output of the ${format.kind} format`);
    }
  }
  const trusted = checkBool("trusted", o.trusted);
  const { d, dtype, shape, axis, groups } = groupedInput(kivi, x, o, format.group);
  using c = new Call(kivi, d.mem as MemOf<X>, "quantize");
  const ix = c.input("x", x, dtype, shape[0] * shape[1]);
  const icodes = c.output("codes", "u32", wordCount(shape, format.bits), out.codes);
  const dims = matrixArgs(dtype, shape, axis, format.group, format.bits);
  if (format.kind === "uniform") {
    const is = c.output("scale", "f16", groups, out.scale);
    const iz = c.output("zero", "f16", groups, out.zero);
    if (!trusted) checkParamRange(kivi, "quantize", d);
    c.bind();
    c.run(
      "kivi_uniform_quantize",
      c.lib.call(
        "kivi_uniform_quantize",
        c.ctx,
        c.ptr(ix),
        ...dims,
        flags(trusted),
        c.ptr(icodes),
        c.ptr(is),
        c.ptr(iz),
      ),
    );
    return { format, axis, shape, groups, codes: c.buf(icodes), scale: c.buf(is), zero: c.buf(iz) };
  }
  const ik = c.output("centroids", "f16", groups * 2 ** format.bits, out.centroids);
  if (!trusted) checkParamRange(kivi, "quantize", d);
  c.bind();
  c.run(
    "kivi_codebook_encode",
    c.lib.call(
      "kivi_codebook_encode",
      c.ctx,
      c.ptr(ix),
      ...dims,
      fitCode[format.fit],
      format.iterations,
      assignCode[format.assign],
      flags(trusted),
      c.ptr(ik),
      c.ptr(icodes),
    ),
  );
  return { format, axis, shape, groups, codes: c.buf(icodes), centroids: c.buf(ik) };
}

/** Unpacks and dequantizes codes into `dtype` (default f32), where the codes live. */
export function dequantize<M extends Mem>(
  kivi: Backend,
  q: Quantized<M>,
  opts: { dtype?: DType; out?: Buf<M, DType> } = {},
): Buf<M, DType> {
  if (q === null || typeof q !== "object") {
    throw new TypeError(`q must be the result of quantize(), got ${show(q)}`);
  }
  // q is the caller's object: each field read once.
  const qf = q as unknown as Partial<
    Record<"format" | "axis" | "shape" | "codes" | "scale" | "zero" | "centroids", unknown>
  >;
  const [qFormat, qAxis, qShape, qCodes] = [qf.format, qf.axis, qf.shape, qf.codes];
  if (qCodes === undefined) {
    throw new TypeError(`q must be the result of quantize(), got ${show(q)}`);
  }
  const o = readOptions("options", opts, ["dtype", "out"]);
  const dtype = checkOneOf("dtype", o.dtype ?? "f32", ["f32", "f16", "bf16"] as const);
  const format = resolveFormat(qFormat as unknown as Format, "q.format");
  const [qScale, qZero, qCentroids] = format.kind === "uniform"
    ? [qf.scale, qf.zero, undefined]
    : [undefined, undefined, qf.centroids];
  const axis = checkOneOf("q.axis", qAxis, AXES);
  const shape = checkShape("q.shape", qShape);
  checkGrouping(shape, axis, format.group);
  const groups = groupCount(shape, axis, format.group);
  const mem: Mem = kivi._tensor(qCodes) === undefined ? "host" : "device";
  using c = new Call(kivi, mem as M, "dequantize");
  const n = shape[0] * shape[1];
  const ic = c.input("q.codes", qCodes, "u32", wordCount(shape, format.bits));
  const dims = [shape[0], shape[1], axisCode[axis], format.group, format.bits] as const;
  if (format.kind === "uniform") {
    const is = c.input("q.scale", qScale, "f16", groups);
    const iz = c.input("q.zero", qZero, "f16", groups);
    const io = c.output("out", dtype, n, o.out);
    c.bind();
    c.run(
      "kivi_uniform_dequantize",
      c.lib.call(
        "kivi_uniform_dequantize",
        c.ctx,
        c.ptr(ic),
        c.ptr(is),
        c.ptr(iz),
        ...dims,
        c.ptr(io),
        dtypeCode[dtype],
      ),
    );
    return c.buf(io);
  }
  const ik = c.input("q.centroids", qCentroids, "f16", groups * 2 ** format.bits);
  const io = c.output("out", dtype, n, o.out);
  c.bind();
  c.run(
    "kivi_codebook_dequantize",
    c.lib.call(
      "kivi_codebook_dequantize",
      c.ctx,
      c.ptr(ic),
      c.ptr(ik),
      ...dims,
      c.ptr(io),
      dtypeCode[dtype],
    ),
  );
  return c.buf(io);
}

/** The options both codebook calls read first. */
const CODEBOOK_KEYS = ["shape", "dtype", "axis", "bits", "group"] as const;
/** The options fitCodebook reads. */
const FIT_KEYS = [...CODEBOOK_KEYS, "fit", "iterations", "trace", "trusted", "out"] as const;

/** Fits 2^bits centroids per group by 1-D k-means (Lloyd-Max), starting from the uniform grid. */
export function fitCodebook<X extends Input>(
  kivi: Backend,
  x: X,
  opts: FitOptions<MemOf<X>>,
): FitResult<MemOf<X>> {
  const o = readOptions("options", opts, FIT_KEYS, true);
  const out = readOptions("out", o.out, ["centroids"]);
  const f = resolveFormat(
    {
      kind: "codebook",
      bits: o.bits,
      group: o.group,
      fit: o.fit,
      iterations: o.iterations,
    } as Format,
  );
  if (f.kind !== "codebook") throw new Error("unreachable");
  const trace = checkBool("trace", o.trace);
  const trusted = checkBool("trusted", o.trusted);
  const { d, dtype, shape, axis, groups } = groupedInput(kivi, x, o, f.group);
  using c = new Call(kivi, d.mem as MemOf<X>, "fitCodebook");
  const ix = c.input("x", x, dtype, shape[0] * shape[1]);
  const ik = c.output("centroids", "f16", groups * 2 ** f.bits, out.centroids);
  const ii = trace ? c.output("iters", "i32", groups) : -1;
  const ine = trace ? c.output("inertia", "f32", groups * (f.iterations + 1)) : -1;
  if (!trusted) checkParamRange(kivi, "fitCodebook", d);
  c.bind();
  c.run(
    "kivi_codebook_fit",
    c.lib.call(
      "kivi_codebook_fit",
      c.ctx,
      c.ptr(ix),
      ...matrixArgs(dtype, shape, axis, f.group, f.bits),
      fitCode[f.fit],
      f.iterations,
      flags(trusted),
      c.ptr(ik),
      trace ? c.ptr(ii) : null,
      trace ? c.ptr(ine) : null,
    ),
  );
  return {
    groups,
    centroids: c.buf(ik),
    iters: trace ? c.buf(ii) : undefined,
    inertia: trace ? c.buf(ine) : undefined,
  };
}

/** Codes of x against given centroids ([groups][2^bits] fp16, ascending per group). */
export function quantizeWithCodebook<X extends Input>(
  kivi: Backend,
  x: X,
  centroids: Buf<MemOf<X>, "f16">,
  opts: CodebookOptions<MemOf<X>>,
): CodebookQuantized<MemOf<X>> {
  const o = readOptions("options", opts, [...CODEBOOK_KEYS, "assign", "trusted", "out"], true);
  const out = readOptions("out", o.out, ["codes"]);
  const format = resolveFormat(
    { kind: "codebook", bits: o.bits, group: o.group, assign: o.assign } as Format,
  );
  if (format.kind !== "codebook") throw new Error("unreachable");
  const trusted = checkBool("trusted", o.trusted);
  const { d, dtype, shape, axis, groups } = groupedInput(kivi, x, o, format.group);
  using c = new Call(kivi, d.mem as MemOf<X>, "quantizeWithCodebook");
  const ix = c.input("x", x, dtype, shape[0] * shape[1]);
  const ik = c.input("centroids", centroids, "f16", groups * 2 ** format.bits);
  const icodes = c.output("codes", "u32", wordCount(shape, format.bits), out.codes);
  if (!trusted) checkParamRange(kivi, "quantizeWithCodebook", d);
  c.bind();
  c.run(
    "kivi_codebook_quantize",
    c.lib.call(
      "kivi_codebook_quantize",
      c.ctx,
      c.ptr(ix),
      ...matrixArgs(dtype, shape, axis, format.group, format.bits),
      c.ptr(ik),
      assignCode[format.assign],
      flags(trusted),
      c.ptr(icodes),
    ),
  );
  return { format, axis, shape, groups, codes: c.buf(icodes), centroids: c.buf(ik) };
}

/** Where a pack/unpack input lives and how many elements it holds, read once. */
function codesInput(kivi: Backend, name: string, x: unknown): { mem: Mem; n: number } {
  const t = kivi._tensor(x);
  if (t !== undefined) return { mem: "device", n: t.length };
  const v = hostView(name, x);
  if (v !== undefined) return { mem: "host", n: v.length };
  throw new TypeError(`${name} must be a typed array or DeviceTensor, got ${show(x)}`);
}

/** The options of pack and unpack (bits checked), then where their input lives. */
function codesArgs(kivi: Backend, opts: unknown, name: string, x: unknown) {
  const o = readOptions("options", opts, ["bits", "out"], true);
  const bits = checkOneOf("bits", o.bits, BITS);
  return { o, bits, ...codesInput(kivi, name, x) };
}

/** Packs codes (one per byte, each < 2^bits) into uint32 words, LSB first. */
export function pack<M extends Mem>(
  kivi: Backend,
  codes: Buf<M, "u8">,
  opts: { bits: Bits; out?: Buf<M, "u32"> },
): Buf<M, "u32"> {
  const { o, bits, mem, n } = codesArgs(kivi, opts, "codes", codes);
  const cpw = 32 / bits;
  if (n === 0 || n % cpw !== 0) {
    throw new RangeError(
      `codes.length must be a positive multiple of ${cpw} (codes per word at ${bits} bits), got ${n}`,
    );
  }
  using c = new Call(kivi, mem as M, "pack");
  const ic = c.input("codes", codes, "u8", n);
  const iw = c.output("words", "u32", n / cpw, o.out);
  c.bind();
  c.run("kivi_codes_pack", c.lib.call("kivi_codes_pack", c.ctx, c.ptr(ic), n, bits, c.ptr(iw)));
  return c.buf(iw);
}

/** Unpacks uint32 words into codes, one per byte (32 / bits codes a word). */
export function unpack<M extends Mem>(
  kivi: Backend,
  words: Buf<M, "u32">,
  opts: { bits: Bits; out?: Buf<M, "u8"> },
): Buf<M, "u8"> {
  const { o, bits, mem, n: nw } = codesArgs(kivi, opts, "words", words);
  if (nw === 0) throw new RangeError(`words must hold at least one word, got 0`);
  const n = nw * (32 / bits);
  using c = new Call(kivi, mem as M, "unpack");
  const iw = c.input("words", words, "u32", nw);
  const ic = c.output("codes", "u8", n, o.out);
  c.bind();
  c.run("kivi_codes_unpack", c.lib.call("kivi_codes_unpack", c.ctx, c.ptr(iw), n, bits, c.ptr(ic)));
  return c.buf(ic);
}
