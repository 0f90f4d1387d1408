/**
 * Argument checks run before any native call: a wrong type or shape is a TypeError, a value out of
 * range a RangeError. Messages name the argument, quote the value and say what is expected.
 *
 * Hostile callers: every public call reads its options, getters and lengths once, up front, through
 * these helpers (strict option objects, intrinsic typed-array getters that a subclass or a Proxy
 * cannot change), and only then takes native handles, with no user code in between.
 *
 * @module
 */

/** The largest element count of one array the library takes (kivi_format.h KIVI_MAX_ELEMS is 2^40,
 * exclusive). */
export const MAX_ELEMS = 2 ** 40 - 1;

// %TypedArray%.prototype's own getters, taken once at load: they read a typed array's internal slots,
// so an overridden `length` (a subclass, a swapped prototype) does not change what they return, and a
// Proxy or any other object is not a typed array to them.
const typedArrayProto = Object.getPrototypeOf(Uint8Array.prototype) as object;
const intrinsic = (key: PropertyKey) => Object.getOwnPropertyDescriptor(typedArrayProto, key)!.get!;
const taTag = intrinsic(Symbol.toStringTag);
const taLength = intrinsic("length");
const taByteOffset = intrinsic("byteOffset");
const taByteLength = intrinsic("byteLength");
const taBuffer = intrinsic("buffer");
const abDetached = Object.getOwnPropertyDescriptor(ArrayBuffer.prototype, "detached")?.get;
const apply = Reflect.apply;

/** A host typed array as its internal slots describe it. */
export interface HostView {
  /** The typed array itself. */
  readonly view: ArrayBufferView;
  /** Its class, e.g. "Float32Array" (the intrinsic tag, not the constructor's name). */
  readonly kind: string;
  readonly length: number;
  readonly byteOffset: number;
  readonly byteLength: number;
  readonly buffer: ArrayBufferLike;
}

/** The typed array x as its internal slots describe it, or undefined for anything else (a Proxy,
 * a DataView, a plain object). Throws a TypeError naming `name` when its buffer is detached. */
export function hostView(name: string, x: unknown): HostView | undefined {
  if (x === null || typeof x !== "object") return undefined;
  const kind = apply(taTag, x, []) as string | undefined;
  if (kind === undefined) return undefined;
  const buffer = apply(taBuffer, x, []) as ArrayBufferLike;
  if (
    abDetached !== undefined && !(buffer instanceof SharedArrayBuffer) &&
    apply(abDetached, buffer, [])
  ) {
    throw new TypeError(
      `${name}'s buffer is detached (transferred); pass an array that owns its memory`,
    );
  }
  return {
    view: x as ArrayBufferView,
    kind,
    length: apply(taLength, x, []) as number,
    byteOffset: apply(taByteOffset, x, []) as number,
    byteLength: apply(taByteLength, x, []) as number,
    buffer,
  };
}

type ViewCtor = new (b: ArrayBufferLike, o: number, n: number) => ArrayBufferView;
const viewCtors: Record<string, ViewCtor> = {
  Float32Array,
  Float16Array,
  Uint16Array,
  Uint32Array,
  Uint8Array,
  Int32Array,
} as unknown as Record<string, ViewCtor>;

/** The plain typed array of a host view: the same memory, without a subclass's overrides. */
export function plainView(v: HostView): ArrayBufferView {
  return new viewCtors[v.kind](v.buffer, v.byteOffset, v.length);
}

/** True when two host views share bytes of one buffer. */
export function overlaps(a: HostView, b: HostView): boolean {
  return a.buffer === b.buffer && a.byteLength > 0 && b.byteLength > 0 &&
    a.byteOffset < b.byteOffset + b.byteLength && b.byteOffset < a.byteOffset + a.byteLength;
}

/** Quotes a value for an error message. */
export function show(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v);
  if (typeof v === "bigint") return `${v}n`;
  if (typeof v === "number") return Object.is(v, -0) ? "-0" : String(v);
  if (Array.isArray(v)) return `[${v.map(show).join(", ")}]`;
  if (v !== null && typeof v === "object") {
    const tag = apply(taTag, v, []) as string | undefined;
    if (tag !== undefined) return tag;
    try {
      return (v as { constructor?: { name?: string } }).constructor?.name ?? "object";
    } catch {
      return "object";
    }
  }
  return String(v);
}

/** An integer in [min, max] (-0 is 0: Deno's FFI refuses -0 as an integer). */
export function checkInt(
  name: string,
  v: unknown,
  min: number,
  max = Number.MAX_SAFE_INTEGER,
): number {
  if (typeof v !== "number") throw new TypeError(`${name} must be a number, got ${show(v)}`);
  if (!Number.isInteger(v)) throw new RangeError(`${name} must be an integer, got ${show(v)}`);
  if (v < min || v > max) {
    throw new RangeError(`${name} must be between ${min} and ${max}, got ${show(v)}`);
  }
  return v === 0 ? 0 : v;
}

/** A boolean, or `dflt` when undefined. */
export function checkBool(name: string, v: unknown, dflt = false): boolean {
  if (v === undefined) return dflt;
  if (typeof v !== "boolean") throw new TypeError(`${name} must be a boolean, got ${show(v)}`);
  return v;
}

/** One of a fixed set of values. */
export function checkOneOf<T extends string | number>(
  name: string,
  v: unknown,
  allowed: readonly T[],
): T {
  if (!allowed.includes(v as T)) {
    const list = allowed.map(show).join(", ");
    const err = typeof v === typeof allowed[0] ? RangeError : TypeError;
    throw new err(`${name} must be one of ${list}, got ${show(v)}`);
  }
  return (v === 0 ? 0 : v) as T;
}

/** A [rows, cols] shape of positive integers holding fewer than 2^40 elements. */
export function checkShape(name: string, v: unknown): [number, number] {
  if (!Array.isArray(v) || v.length !== 2) {
    throw new TypeError(`${name} must be [rows, cols], got ${show(v)}`);
  }
  const a = v[0], b = v[1]; // each read once
  const s: [number, number] = [
    checkInt(`${name}[0] (rows)`, a, 1, 2 ** 40),
    checkInt(`${name}[1] (cols)`, b, 1, 2 ** 40),
  ];
  checkElems(name, s);
  return s;
}

/** Dimensions whose product is at most MAX_ELEMS (each already a positive integer). */
export function checkElems(name: string, dims: readonly number[]): number {
  let n = 1;
  for (const d of dims) n *= d; // exact while below 2^53; compared before it can lose precision
  if (n > MAX_ELEMS) {
    throw new RangeError(`${name} must hold at most 2^40 elements, got ${dims.join(" x ")}`);
  }
  return n;
}

/** Levenshtein distance of two short strings. */
function distance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length];
}

/** The TypeError for an unknown option key: names it and the closest known key. */
function unknownKey(name: string, key: string, known: readonly string[]): TypeError {
  let best = "", bestD = Infinity;
  for (const k of known) {
    const d = distance(key.toLowerCase(), k.toLowerCase());
    if (d < bestD) [best, bestD] = [k, d];
  }
  const hint = bestD <= Math.max(2, Math.floor(key.length / 3))
    ? `did you mean ${JSON.stringify(best)}?`
    : `expected one of ${known.map((k) => JSON.stringify(k)).join(", ")}`;
  return new TypeError(`${name} has an unknown key ${JSON.stringify(key)}; ${hint}`);
}

/**
 * Reads an options object once: an unknown own key is a TypeError naming it and the closest known
 * key; then each known key is read exactly once (getters run here, before any native handle is
 * taken). `undefined` reads as `{}` unless `required`.
 */
export function readOptions<K extends string>(
  name: string,
  o: unknown,
  known: readonly K[],
  required = false,
): { [P in K]?: unknown } {
  if (o === undefined && !required) return {};
  if (o === null || typeof o !== "object" || Array.isArray(o)) {
    throw new TypeError(`${name} must be an object, got ${show(o)}`);
  }
  for (const key of Object.keys(o)) {
    if (!(known as readonly string[]).includes(key)) throw unknownKey(name, key, known);
  }
  const out: { [P in K]?: unknown } = {};
  for (const k of known) out[k] = (o as Record<string, unknown>)[k];
  return out;
}

/** An attention call's softmax scale: `given`, a number finite in fp32, or 1/sqrt(headDim) when
 * undefined. */
export function attendScale(given: unknown, headDim: number): number {
  const scale = given ?? 1 / Math.sqrt(headDim);
  if (typeof scale !== "number" || !Number.isFinite(Math.fround(scale))) {
    throw new RangeError(
      `scale must be a number finite in fp32 (below 3.4e38 in magnitude), got ${show(scale)}`,
    );
  }
  return scale;
}
