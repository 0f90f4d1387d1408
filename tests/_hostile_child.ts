/**
 * One batch of tests/hostile_fuzz_test.ts, in its own process (a crash is the parent's failure, not
 * the test runner's): seeded calls of every public function with hostile arguments (getters that
 * dispose, Proxies, lying subclasses, detached and shared buffers, duck-typed tensors and sequences,
 * -0, huge and fractional sizes, unknown keys, non-boolean flags, mismatched dtype hints, overlapping
 * buffers), mixed with valid ones. Each call must either succeed with the result of the same call
 * made with plain arguments, or throw a TypeError, RangeError or KiviError and change nothing (the
 * caller's out buffers, the cache's sequences and memory report, the backend's live tensors).
 * Prints one JSON line: the calls made, by operation and outcome, and the first failures.
 *
 *   bun tests/_hostile_child.ts <seed> <calls> <cpu|cuda>
 *   deno run -A tests/_hostile_child.ts <seed> <calls> <cpu|cuda>
 *
 * @module
 */
import process from "node:process";
import type { Backend, DeviceTensor, KVCache, Sequence } from "../src/mod.ts";
import { KiviError, openBackend } from "../src/mod.ts";
import { cacheOptions } from "./_helpers.ts";

const [seedArg = "1", callsArg = "1000", preferArg = "cpu"] = process.argv.slice(2);
const SEED = Number(seedArg) >>> 0;
const CALLS = Number(callsArg);
const PREFER = preferArg === "cuda" ? "cuda" : "cpu";

/* ------------------------------------------------------------------ random --------------- */

let state = SEED || 1;
/** mulberry32 in [0, 1). */
function next(): number {
  let t = (state = (state + 0x6d2b79f5) >>> 0);
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const int = (n: number) => Math.floor(next() * n);
const chance = (p: number) => next() < p;
const pick = <T>(a: readonly T[]): T => a[int(a.length)];
/** Seeded data, never zero: roughly Gaussian with a per-call scale. */
function data(n: number): Float32Array {
  const s = 0.1 + 4 * next();
  return Float32Array.from({ length: n }, () => (next() + next() + next() - 1.5) * s + 0.01);
}

/* ------------------------------------------------------------------ outcomes ------------- */

/** How a mutated call must come out: as the plain call ("same"), with a typed error ("fail"), or either. */
type Expect = "same" | "fail" | "either";
const join = (
  a: Expect,
  b: Expect,
): Expect => (a === "fail" || b === "fail"
  ? "fail"
  : a === "either" || b === "either"
  ? "either"
  : "same");

class Failure extends Error {}
const counts: Record<string, number> = {};
const failures: string[] = [];
let where = "";
function check(ok: unknown, msg: string): void {
  if (!ok) throw new Failure(`${where}: ${msg}`);
}

/* ------------------------------------------------------------------ the world ------------ */

const L = 2, H = 2, QH = 4, D = 64, ROW = H * D;
const CACHE = cacheOptions(L, H, QH, D, 24, 4);

interface World {
  kivi: Backend;
  host: boolean;
  cache: KVCache;
  /** A cache that receives the plain form of every append that succeeded: the expected state. */
  twin: KVCache;
  seqs: [Sequence, Sequence][];
  spare: DeviceTensor;
}

async function fresh(old?: World): Promise<World> {
  if (old) {
    for (const c of [old.cache, old.twin]) c.dispose();
    old.kivi.dispose();
  }
  const kivi = await openBackend({ prefer: PREFER });
  const cache = kivi.createCache(CACHE), twin = kivi.createCache(CACHE);
  const w: World = {
    kivi,
    host: kivi.kind === "cpu",
    cache,
    twin,
    seqs: [],
    spare: kivi.upload(data(64)),
  };
  for (let i = 0; i < 2; i++) {
    const pair: [Sequence, Sequence] = [cache.createSequence(), twin.createSequence()];
    const n = 1 + int(80), k = put(w, data(n * L * ROW)), v = put(w, data(n * L * ROW));
    for (const s of pair) s.append(k, v);
    drop(k), drop(v);
    w.seqs.push(pair);
  }
  return w;
}

type Buf =
  | Float32Array
  | Float16Array
  | Uint16Array
  | Uint32Array
  | Uint8Array
  | Int32Array
  | DeviceTensor;
const isTensor = (x: unknown): x is DeviceTensor =>
  x !== null && typeof x === "object" && !ArrayBuffer.isView(x) && "readSync" in x;
/** Host data as a host array on the CPU backend, else uploaded. */
function put(
  w: World,
  a: Float32Array | Float16Array | Uint16Array,
  dtype?: "bf16",
): Float32Array | Float16Array | Uint16Array | DeviceTensor {
  return w.host && chance(0.7) ? a : w.kivi.upload(a, dtype ? { dtype } : {});
}
function drop(x: unknown): void {
  if (isTensor(x)) x.dispose();
}
/** The bytes of a result (a tensor read back), for comparing. */
function bytes(x: unknown): Uint8Array {
  if (isTensor(x)) x = x.readSync();
  const v = x as ArrayBufferView;
  return new Uint8Array(v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
}
function same(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** FNV-1a of bytes, as a short string. */
function hash(b: Uint8Array): string {
  let h = 0x811c9dc5;
  for (let i = 0; i < b.length; i++) h = Math.imul(h ^ b[i], 0x01000193);
  return `${b.length}:${(h >>> 0).toString(16)}`;
}

/** What must not change when a call fails: the caller's out buffers, every sequence, the tensors. */
function snapshot(w: World, outs: unknown[]): string {
  const parts: string[] = [String(w.kivi.liveTensors)];
  for (const o of outs) parts.push(isTensor(o) && o.disposed ? "disposed" : hash(bytes(o)));
  if (!w.cache.disposed) {
    parts.push(JSON.stringify(w.cache.memory()));
    for (const [s] of w.seqs) {
      if (s.freed) continue;
      for (let l = 0; l < L; l++) {
        const r = w.cache.read(s, l);
        parts.push(
          `${s.length(l)}/${s.quantizedLength(l)}/${hash(bytes(r.keys))}/${hash(bytes(r.values))}`,
        );
        drop(r.keys), drop(r.values);
      }
    }
  }
  return parts.join("|");
}

/* ------------------------------------------------------------------ mutations ------------ */

/** A value made hostile, and how the call must then come out. */
interface Mut<T> {
  value: T;
  expect: Expect;
  what: string;
}
const plain = <T>(value: T): Mut<T> => ({ value, expect: "same", what: "" });

/** Set when a victim was disposed: the caller's own code changed the world, so a failed call is only
 * checked for its error type. */
let userDisposed = false;

/** Something a getter can dispose; `needed` when the call cannot go on without it. */
interface Victim {
  name: string;
  dispose(): void;
  needed: boolean;
}

/** An options object made hostile: a transparent Proxy, a getter that disposes a victim, an unknown
 * key, a Proxy that answers differently on a second read (read once: the first answer counts). */
function mutOptions<T extends object>(o: T, victims: Victim[]): Mut<T> {
  const keys = Object.keys(o);
  switch (int(6)) {
    case 0:
      return { value: new Proxy(o, {}), expect: "same", what: "Proxy options" };
    case 1: {
      if (keys.length === 0 || victims.length === 0) return plain(o);
      const v = pick(victims),
        k = pick(keys),
        copy = { ...o } as Record<string, unknown>,
        val = copy[k];
      Object.defineProperty(copy, k, { enumerable: true, get: () => (v.dispose(), val) });
      return {
        value: copy as T,
        expect: v.needed ? "fail" : "either",
        what: `getter of ${k} disposes ${v.name}`,
      };
    }
    case 2: {
      const k = keys.length ? pick(keys) : "trusted";
      const typo = k.length > 2 ? k.slice(0, -1) + (k.endsWith("x") ? "y" : "x") : `${k}_`;
      return { value: { ...o, [typo]: 1 }, expect: "fail", what: `unknown key ${typo}` };
    }
    case 3: {
      const reads = new Map<PropertyKey, number>();
      const p = new Proxy(o, {
        get(t, k, r) {
          const n = (reads.get(k) ?? 0) + 1;
          reads.set(k, n);
          return n === 1 ? Reflect.get(t, k, r) : { evil: true };
        },
      });
      return { value: p, expect: "same", what: "Proxy whose second read lies" };
    }
    default:
      return plain(o);
  }
}

/** A host typed array made hostile: a subclass with lying getters, shared or offset memory (same
 * data), a Proxy, a DataView or a detached buffer (refused). */
function mutArray<T extends ArrayBufferView & { length: number }>(a: T, victims: Victim[]): Mut<T> {
  const Ctor = a.constructor as unknown as new (b: ArrayBufferLike, o?: number, n?: number) => T;
  const bpe = (Ctor as unknown as { BYTES_PER_ELEMENT: number }).BYTES_PER_ELEMENT;
  const copyInto = (buf: ArrayBufferLike, off: number) => {
    const c = new Ctor(buf, off, a.length);
    new Uint8Array(c.buffer, c.byteOffset, c.byteLength).set(
      new Uint8Array(a.buffer, a.byteOffset, a.byteLength),
    );
    return c;
  };
  switch (int(8)) {
    case 0: {
      const v = victims.length ? pick(victims) : undefined;
      const Liar = class extends (Ctor as unknown as new (n: number) => Float32Array) {
        override get length(): number {
          v?.dispose();
          return 4096 * 64;
        }
        override get byteLength(): number {
          return 1 << 30;
        }
        override get byteOffset(): number {
          return 12345;
        }
      };
      const l = new Liar(a.length) as unknown as T;
      new Uint8Array(l.buffer).set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
      return {
        value: l,
        expect: "same",
        what: `lying subclass${v ? ` (its length getter disposes ${v.name})` : ""}`,
      };
    }
    case 1:
      return {
        value: copyInto(new SharedArrayBuffer(a.byteLength), 0),
        expect: "same",
        what: "shared buffer",
      };
    case 2:
      return {
        value: copyInto(new ArrayBuffer(a.byteLength + 8 * bpe), 4 * bpe),
        expect: "same",
        what: "offset view",
      };
    case 3:
      return { value: new Proxy(a, {}), expect: "fail", what: "Proxy of a typed array" };
    case 4: {
      const c = copyInto(new ArrayBuffer(a.byteLength), 0);
      (c.buffer as ArrayBuffer & { transfer(): ArrayBuffer }).transfer();
      return { value: c, expect: "fail", what: "detached buffer" };
    }
    case 5:
      return {
        value: new DataView(a.buffer, a.byteOffset, a.byteLength) as unknown as T,
        expect: "fail",
        what: "DataView",
      };
    default:
      return plain(a);
  }
}

/** A tensor made hostile: a duck-typed look-alike or a Proxy (refused), or the real tensor with a
 * prototype of lying getters (read by its own fields: same). */
function mutTensor(t: DeviceTensor): Mut<DeviceTensor> {
  switch (int(4)) {
    case 0: {
      const duck = {
        pointer: () => 16,
        writePointer: () => 16,
        backend: t.backend,
        dtype: t.dtype,
        length: t.length,
        shape: t.shape,
        bytes: t.bytes,
        disposed: false,
        readSync: () => new Uint8Array(0),
      };
      return { value: duck as unknown as DeviceTensor, expect: "fail", what: "duck-typed tensor" };
    }
    case 1:
      return { value: new Proxy(t, {}), expect: "fail", what: "Proxy of a tensor" };
    case 2: {
      const proto = Object.getPrototypeOf(t);
      Object.setPrototypeOf(
        t,
        Object.create(proto, {
          length: { get: () => 2 ** 40 },
          dtype: { get: () => "u8" },
          shape: { get: () => [1] },
        }),
      );
      return { value: t, expect: "same", what: "tensor with a lying prototype" };
    }
    default:
      return plain(t);
  }
}

/** Any buffer argument made hostile. */
function mutBuf<T>(x: T, victims: Victim[]): Mut<T> {
  return (isTensor(x)
    ? mutTensor(x)
    : mutArray(x as unknown as Float32Array, victims)) as unknown as Mut<T>;
}

/** An integer argument made hostile: -0 (same), or huge, fractional, NaN, a string, negative (refused). */
function mutInt(n: number, sizes = false): Mut<number> {
  if (chance(0.4) && n === 0) return { value: -0, expect: "same", what: "-0" };
  // 2^31 and 2^33 are refused as layers, cache sizes and shapes that do not match; as alloc sizes they
  // are valid (and huge), so `sizes` leaves them out.
  const bad = [
    2 ** 53,
    1e300,
    Infinity,
    n + 0.5,
    NaN,
    String(n) as unknown as number,
    -1 - n,
    ...(sizes ? [] : [2 ** 33, 2 ** 31]),
  ];
  const v = pick(bad);
  return { value: v, expect: "fail", what: `int ${String(v)}` };
}

type Slot = (() => Expect | undefined) & { order?: number };
/** Marks a slot that wraps a whole options object: it runs after the slots that replace its fields
 * (a field set after the wrap would read the wrapper, which may count its reads). */
const wrapping = (f: () => Expect | undefined): Slot => Object.assign(f, { order: 2 });
/** Marks a slot that makes an out buffer overlap an input: it runs after the input's own mutation
 * (and skips itself when that replaced the input, whose copy no longer overlaps). */
const overlapping = (f: () => Expect | undefined): Slot => Object.assign(f, { order: 1 });

/** A slot that makes one argument hostile with `mut`, hands the value to `set` and records what it
 * did (after `label`) in `what`. */
function mutSlot<T>(what: string[], label: string, mut: () => Mut<T>, set: (v: T) => void): Slot {
  return () => {
    const m = mut();
    set(m.value);
    what.push(label + m.what);
    return m.expect;
  };
}

/** The sequences behind a Proxy: the call must come out the same. */
const proxySeqs = (hs: unknown): Mut<unknown> => ({
  value: new Proxy(hs as Sequence[], {}),
  expect: "same",
  what: "Proxy seqs",
});

/** Applies up to two mutations chosen from `slots` (each a function making one argument hostile). */
function mutate(slots: Slot[]): Expect {
  let e: Expect = "same";
  const chosen: Slot[] = [];
  for (let k = 1 + int(2); k > 0 && slots.length; k--) {
    chosen.push(slots.splice(int(slots.length), 1)[0]);
  }
  for (const f of chosen.sort((a, b) => (a.order ?? 0) - (b.order ?? 0))) {
    const r = f();
    if (r) e = join(e, r);
  }
  return e;
}

/* ------------------------------------------------------------------ one call ------------- */

/**
 * Runs `hostile` (the call with mutated arguments) and judges it against `expected` (the plain
 * call's result bytes, computed first): success must give the same bytes, failure a typed error and
 * an unchanged snapshot.
 */
function judge(
  w: World,
  op: string,
  expect: Expect,
  what: string[],
  hostile: () => unknown,
  expected: Uint8Array | undefined,
  outs: unknown[],
  cleanup: (r: unknown) => void,
): void {
  const before = snapshot(w, outs);
  if (process.env.KIVI_FUZZ_TRACE) {
    console.error(`${where}: ${op}: ${what.filter(Boolean).join("; ") || "plain"}`);
  }
  userDisposed = false;
  let result: unknown, error: unknown;
  try {
    result = hostile();
  } catch (e) {
    error = e;
  }
  const how = `${what.filter(Boolean).join("; ") || "plain"}`;
  if (error === undefined) {
    counts[`${op} ok`] = (counts[`${op} ok`] ?? 0) + 1;
    check(expect !== "fail", `${how}: accepted (expected a typed error)`);
    if (expected !== undefined) {
      check(same(bytes(result), expected), `${how}: a result other than the plain call's`);
    }
    cleanup(result);
    return;
  }
  if (error instanceof Failure) throw error;
  const name = error instanceof KiviError
    ? error.code
    : (error as Error)?.constructor?.name ?? typeof error;
  counts[`${op} ${name}`] = (counts[`${op} ${name}`] ?? 0) + 1;
  check(
    error instanceof TypeError || error instanceof RangeError || error instanceof KiviError,
    `${how}: threw ${String(error)}, not a TypeError, RangeError or KiviError`,
  );
  check(expect !== "same", `${how}: threw ${String(error)} (expected the plain call's result)`);
  if (userDisposed) return; // the caller's getter disposed something: the world is not the one snapshotted
  check(
    snapshot(w, outs) === before,
    `${how}: a failed call (${String(error)}) changed the cache, an out buffer or the live tensors`,
  );
}

/** The live victims of a call: the backend, the cache, a sequence, the spare tensor, `extra` tensors. */
function victims(
  w: World,
  needed: { kivi?: boolean; cache?: boolean; seqs?: Sequence[] },
  extra: [string, DeviceTensor, boolean][] = [],
): Victim[] {
  const v: Victim[] = [
    { name: "the backend", dispose: () => w.kivi.dispose(), needed: needed.kivi ?? true },
    { name: "the cache", dispose: () => w.cache.dispose(), needed: needed.cache ?? false },
    { name: "a spare tensor", dispose: () => w.spare.dispose(), needed: false },
  ];
  const s = pick(w.seqs)[0];
  v.push({
    name: "a sequence",
    dispose: () => s.free(),
    needed: needed.seqs?.includes(s) ?? false,
  });
  for (const [name, t, need] of extra) v.push({ name, dispose: () => t.dispose(), needed: need });
  return v.map((x) => ({ ...x, dispose: () => (userDisposed = true, x.dispose()) }));
}

/* ------------------------------------------------------------------ operations ----------- */

type Op = (w: World) => void;

const quantizerOp: Op = (w) => {
  const kind = pick(["quantize", "stats", "fit", "withCodebook"] as const);
  const axis = pick(["token", "channel"] as const),
    bits = pick([2, 4] as const),
    group = pick([32, 64] as const);
  const rows = axis === "token" ? group * (1 + int(2)) : 1 + int(5),
    cols = axis === "channel" ? group * (1 + int(2)) : 1 + int(40);
  const dtype = pick(["f32", "f16", "bf16"] as const);
  const raw = data(rows * cols);
  const hostX = dtype === "f32"
    ? raw
    : dtype === "f16"
    ? Float16Array.from(raw)
    : Uint16Array.from(raw, (v) => new Uint32Array(new Float32Array([v]).buffer)[0] >>> 16);
  const x = w.host && chance(0.6)
    ? hostX
    : w.kivi.upload(hostX, { shape: [rows, cols], ...(dtype === "bf16" ? { dtype } : {}) });
  const shape: [number, number] = [rows, cols];
  const base: Record<string, unknown> = {
    shape,
    axis,
    ...(dtype === "bf16" && !isTensor(x) ? { dtype } : {}),
  };
  const trusted = chance(0.3);
  let call: (x: unknown, o: unknown) => unknown;
  let opts: Record<string, unknown>;
  let normalize: (r: unknown) => unknown[];
  const cent = kind === "withCodebook"
    ? w.kivi.fitCodebook(x, { ...base, bits, group } as never).centroids
    : undefined;
  switch (kind) {
    case "quantize": {
      const format = chance(0.5)
        ? { kind: "uniform", bits, group }
        : { kind: "codebook", bits, group, fit: pick(["free", "pinned"]), iterations: 1 + int(4) };
      opts = { ...base, format, ...(trusted ? { trusted } : {}) };
      call = (x, o) => w.kivi.quantize(x as never, o as never);
      normalize = (r) => {
        const q = r as Record<string, unknown>;
        return [q.codes, q.scale ?? q.centroids, q.zero ?? q.codes];
      };
      break;
    }
    case "stats":
      opts = { ...base, group };
      call = (x, o) => w.kivi.stats(x as never, o as never);
      normalize = (r) => {
        const s = r as Record<string, unknown>;
        return [s.stats, s.nonfinite];
      };
      break;
    case "fit":
      opts = {
        ...base,
        bits,
        group,
        fit: pick(["free", "pinned"]),
        iterations: 1 + int(4),
        ...(chance(0.3) ? { trace: true } : {}),
        ...(trusted ? { trusted } : {}),
      };
      call = (x, o) => w.kivi.fitCodebook(x as never, o as never);
      normalize = (r) => {
        const f = r as Record<string, unknown>;
        return [f.centroids, f.iters ?? f.centroids, f.inertia ?? f.centroids];
      };
      break;
    default:
      opts = {
        ...base,
        bits,
        group,
        assign: pick(["nearest", "interval"]),
        ...(trusted ? { trusted } : {}),
      };
      call = (x, o) => w.kivi.quantizeWithCodebook(x as never, cent as never, o as never);
      normalize = (r) => [(r as Record<string, unknown>).codes];
  }
  if (isTensor(x)) delete opts.shape;
  const resultBytes = (r: unknown) => {
    const parts = normalize(r).map(bytes);
    const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
    let o = 0;
    for (const p of parts) out.set(p, o), o += p.length;
    return out;
  };
  const drops = (r: unknown) => {
    for (const t of new Set(normalize(r))) if (t !== cent) drop(t);
  };
  const plainResult = call(x, opts);
  const expected = resultBytes(plainResult);
  drops(plainResult);
  // Hostile variants of x, the options, the format, the shape, an out buffer overlapping x, trusted.
  let hx: unknown = x, ho: Record<string, unknown> = { ...opts };
  const what: string[] = [];
  const xt = isTensor(x) ? [["x", x, true] as [string, DeviceTensor, boolean]] : [];
  const vs = victims(w, { kivi: true }, xt);
  const slots: Slot[] = [
    mutSlot(what, "", () => mutBuf(hx, vs), (v) => (hx = v)),
    wrapping(
      mutSlot(what, "", () => mutOptions(ho, vs), (v) => (ho = v as Record<string, unknown>)),
    ),
    () => {
      if (!ho.format) return;
      const m = mutOptions(ho.format as object, vs);
      ho = { ...ho, format: m.value };
      what.push(`format: ${m.what}`);
      return m.expect;
    },
    () => {
      if (!ho.shape) return;
      const i = int(2);
      const m = mutInt(shape[i]);
      const s = [...shape];
      s[i] = m.value;
      ho = { ...ho, shape: s };
      what.push(`shape[${i}] ${m.what}`);
      return m.expect === "same" ? "same" : "fail";
    },
    () => {
      ho = { ...ho, trusted: pick(["false", 1, null, "yes"]) };
      what.push("trusted not a boolean");
      return "fail";
    },
    overlapping(() => {
      if (isTensor(x) || kind !== "stats" || hx !== x) return;
      const groups = axis === "token" ? cols * (rows / group) : rows * (cols / group);
      ho = {
        ...ho,
        out: {
          stats: new Float32Array(
            (x as Float32Array).buffer,
            (x as Float32Array).byteOffset,
            groups * 4,
          ),
        },
      };
      what.push("out.stats over x");
      return "fail";
    }),
  ];
  const expect = mutate(slots);
  judge(
    w,
    kind,
    expect,
    what,
    () => {
      const r = call(hx, ho);
      const b = resultBytes(r);
      drops(r);
      return b;
    },
    expected,
    [],
    () => {},
  );
  if (cent !== undefined) drop(cent);
  drop(x);
};

const dequantOp: Op = (w) => {
  const axis = pick(["token", "channel"] as const), bits = pick([2, 4] as const);
  const shape: [number, number] = axis === "token"
    ? [32 * (1 + int(2)), 1 + int(20)]
    : [1 + int(4), 32 * (1 + int(3))];
  const raw = data(shape[0] * shape[1]);
  const x = w.host ? raw : w.kivi.upload(raw, { shape });
  const format = chance(0.5)
    ? { kind: "uniform", bits, group: 32 }
    : { kind: "codebook", bits, group: 32, iterations: 2 };
  const q = w.kivi.quantize(
    x as never,
    { ...(w.host ? { shape } : {}), axis, format } as never,
  ) as unknown as Record<string, unknown>;
  const dtype = pick(["f32", "f16", "bf16"] as const);
  const plainR = w.kivi.dequantize(q as never, { dtype });
  const expected = bytes(plainR);
  drop(plainR);
  let hq: Record<string, unknown> = q, ho: Record<string, unknown> = { dtype };
  const what: string[] = [];
  const vs = victims(w, {}, isTensor(q.codes) ? [["q.codes", q.codes as DeviceTensor, true]] : []);
  const slots: Slot[] = [
    wrapping(
      mutSlot(what, "", () => mutOptions(ho, vs), (v) => (ho = v as Record<string, unknown>)),
    ),
    () => {
      const m = mutBuf(q.codes, vs);
      hq = { ...hq, codes: m.value };
      what.push(`q.codes: ${m.what}`);
      return m.expect;
    },
    () => {
      const i = int(2);
      const m = mutInt(shape[i]);
      const s = [...shape];
      s[i] = m.value;
      hq = { ...hq, shape: s };
      what.push(`q.shape[${i}] ${m.what}`);
      return m.expect === "same" ? "same" : "fail";
    },
    () => {
      hq = new Proxy(hq, {});
      what.push("Proxy q");
      return "same";
    },
    overlapping(() => {
      if (isTensor(q.codes) || (hq as Record<string, unknown>).codes !== q.codes) return;
      const c = q.codes as Uint32Array,
        n = shape[0] * shape[1],
        big = new ArrayBuffer(4 * Math.max(c.length, n));
      const codes = new Uint32Array(big, 0, c.length);
      codes.set(c);
      hq = { ...hq, codes };
      ho = { ...ho, dtype: "f32", out: new Float32Array(big, 0, n) };
      what.push("out over q.codes");
      return "fail";
    }),
  ];
  const expect = mutate(slots);
  judge(
    w,
    "dequantize",
    expect,
    what,
    () => w.kivi.dequantize(hq as never, ho as never),
    expected,
    [],
    drop,
  );
  for (const t of new Set([q.codes, q.scale, q.zero, q.centroids])) drop(t);
  drop(x);
};

const memoryOp: Op = (w) => {
  const kind = pick(["alloc", "upload", "write", "pack", "unpack", "time"] as const);
  const what: string[] = [];
  if (kind === "alloc") {
    const shape = [1 + int(8), 1 + int(8)];
    let hs: unknown = shape;
    const m = chance(0.5) ? mutInt(shape[int(2)], true) : undefined;
    if (m) hs = [m.value, shape[1]], what.push(`shape ${m.what}`);
    if (chance(0.2)) hs = new Proxy(hs as number[], {}), what.push("Proxy shape");
    if (chance(0.1)) hs = [2 ** 32, 2 ** 32 + 1], what.push("shape past 2^40 elements");
    const expect: Expect = what.some((s) => s.includes("past") || (m && m.expect === "fail"))
      ? "fail"
      : "same";
    judge(
      w,
      "alloc",
      expect,
      what,
      () => {
        const t = w.kivi.alloc(hs as number[], "f32");
        const dims = Int32Array.from(t.shape);
        t.dispose();
        return dims;
      },
      bytes(new Int32Array(shape)),
      [],
      () => {},
    );
    return;
  }
  if (kind === "time") {
    const t = w.kivi.upload(data(4));
    const fns: [string, unknown, Expect][] = [
      ["dispose the backend", () => (userDisposed = true, w.kivi.dispose()), "fail"],
      ["dispose a tensor", () => t.dispose(), "same"],
      ["not a function", "fn", "fail"],
      ["nothing", () => {}, "same"],
    ];
    const [name, fn, expect] = pick(fns);
    judge(
      w,
      "time",
      expect,
      [name],
      () => (w.kivi.time(fn as () => void), new Uint8Array(0)),
      new Uint8Array(0),
      [],
      () => {},
    );
    drop(t);
    return;
  }
  if (kind === "upload" || kind === "write") {
    const a = data(8 + int(56));
    const t = w.kivi.alloc([a.length], "f32");
    let ha: unknown = a, ho: Record<string, unknown> = { shape: [a.length] };
    const vs = victims(w, {}, [["the tensor written", t, kind === "write"]]);
    const slots: Slot[] = [
      mutSlot(what, "", () => mutArray(a, vs), (v) => (ha = v)),
      wrapping(() => {
        if (kind !== "upload") return;
        const m = mutOptions(ho, vs);
        ho = m.value as Record<string, unknown>;
        what.push(m.what);
        return m.expect;
      }),
      () => {
        if (kind !== "upload") return;
        ho = { ...ho, dtype: pick(["bf16", "f16", "u32", "int8"]) };
        what.push("dtype hint");
        return "fail";
      },
    ];
    const expect = mutate(slots);
    if (kind === "write") t.write(data(a.length)); // what a failed write must leave
    judge(
      w,
      kind,
      expect,
      what,
      () => {
        if (kind === "upload") return w.kivi.upload(ha as Float32Array, ho);
        t.write(ha as Float32Array);
        return t.readSync();
      },
      bytes(a),
      kind === "write" ? [t] : [],
      (r) => drop(r),
    );
    drop(t);
    return;
  }
  const bits = pick([2, 4] as const), n = (32 / bits) * (1 + int(8));
  const codes = Uint8Array.from({ length: n }, () => int(1 << bits));
  const input = kind === "pack" ? codes : w.kivi.pack(codes, { bits }) as Uint32Array;
  const x = w.host ? input : w.kivi.upload(input);
  const call = (
    xx: unknown,
    o: unknown,
  ) => (kind === "pack"
    ? w.kivi.pack(xx as never, o as never)
    : w.kivi.unpack(xx as never, o as never));
  const r0 = call(x, { bits });
  const expected = bytes(r0);
  drop(r0);
  let hx: unknown = x, ho: Record<string, unknown> = { bits };
  const vs = victims(w, {}, isTensor(x) ? [["codes", x, true]] : []);
  const slots: Slot[] = [
    mutSlot(what, "", () => mutBuf(hx, vs), (v) => (hx = v)),
    wrapping(
      mutSlot(what, "", () => mutOptions(ho, vs), (v) => (ho = v as Record<string, unknown>)),
    ),
    overlapping(() => {
      if (isTensor(x) || hx !== x) return;
      const a = x as Uint8Array | Uint32Array;
      ho = {
        ...ho,
        out: kind === "pack"
          ? new Uint32Array(a.buffer, a.byteOffset, n / (32 / bits))
          : new Uint8Array(a.buffer, a.byteOffset, Math.min(a.byteLength, n)),
      };
      what.push("out over the input");
      return "fail";
    }),
  ];
  const expect = mutate(slots);
  judge(w, kind, expect, what, () => call(hx, ho), expected, [], drop);
  drop(x);
};

const cacheOp: Op = (w) => {
  const kind = pick(
    ["append", "append", "attend", "attend", "read", "length", "createCache", "bench"] as const,
  );
  const pair = pick(w.seqs);
  const [s, t] = pair;
  const what: string[] = [];
  const layer = int(L);
  if (kind === "append") {
    const one = chance(0.7), n = 1 + int(40), len = n * ROW * (one ? 1 : L);
    const dtype = pick(["f32", "f16"] as const);
    const mk = () => {
      const a = data(len);
      return dtype === "f16" ? Float16Array.from(a) : a;
    };
    const k = put(w, mk()), v = put(w, mk());
    let hk: unknown = k, hv: unknown = v, ho: Record<string, unknown> = one ? { layer } : {};
    const vs = victims(w, { cache: true, seqs: [s] }, [
      ...(isTensor(k) ? [["k", k, true] as [string, DeviceTensor, boolean]] : []),
    ]);
    const slots: Slot[] = [
      mutSlot(what, "k: ", () => mutBuf(hk, vs), (v) => (hk = v)),
      mutSlot(what, "v: ", () => mutBuf(hv, vs), (v) => (hv = v)),
      wrapping(
        mutSlot(what, "", () => mutOptions(ho, vs), (v) => (ho = v as Record<string, unknown>)),
      ),
      () => {
        if (!one) return;
        const m = mutInt(layer);
        ho = { ...ho, layer: m.value };
        what.push(`layer ${m.what}`);
        return m.expect;
      },
      () => {
        ho = { ...ho, trusted: "false" };
        what.push('trusted "false"');
        return "fail";
      },
      () => {
        if (isTensor(k)) return;
        ho = { ...ho, dtype: dtype === "f32" ? "bf16" : "f32" };
        what.push("dtype hint");
        return "fail";
      },
    ];
    const expect = mutate(slots);
    let ok = false;
    judge(
      w,
      "append",
      expect,
      what,
      () => (s.append(hk as never, hv as never, ho), ok = true, new Uint8Array(0)),
      new Uint8Array(0),
      [],
      () => {},
    );
    if (ok) {
      t.append(k, v, one ? { layer } : {}); // the twin gets the plain form
      for (let l = 0; l < L; l++) {
        const a = w.cache.read(s, l), b = w.twin.read(t, l);
        check(
          s.length(l) === t.length(l) && same(bytes(a.keys), bytes(b.keys)) &&
            same(bytes(a.values), bytes(b.values)),
          `${what.join("; ")}: the append stored other data than the plain append`,
        );
        drop(a.keys), drop(a.values), drop(b.keys), drop(b.values);
      }
    }
    drop(k), drop(v);
    return;
  }
  if (kind === "read" || kind === "length") {
    let hs: unknown = s, hl: unknown = layer;
    const slots: Slot[] = [
      () => {
        hs = pick([new Proxy(s, {}), { cache: w.cache, id: 0, _id: () => 0 }]);
        what.push("duck or Proxy sequence");
        return kind === "read" ? "fail" : undefined;
      },
      mutSlot(what, "layer ", () => mutInt(layer), (v) => (hl = v)),
    ];
    const expect = mutate(slots);
    if (kind === "length" && hs !== s) hs = s;
    const expected = kind === "read"
      ? (() => {
        const r = w.cache.read(s, layer);
        const b = new Uint8Array([...bytes(r.keys), ...bytes(r.values)]);
        drop(r.keys), drop(r.values);
        return b;
      })()
      : new Uint8Array(new Float64Array([s.length(layer)]).buffer);
    judge(
      w,
      kind,
      expect,
      what,
      () => {
        if (kind === "length") return new Float64Array([(hs as Sequence).length(hl as number)]);
        const r = w.cache.read(hs as Sequence, hl as number);
        const b = new Uint8Array([...bytes(r.keys), ...bytes(r.values)]);
        drop(r.keys), drop(r.values);
        return b;
      },
      expected,
      [],
      () => {},
    );
    return;
  }
  if (kind === "createCache") {
    let ho: Record<string, unknown> = { ...CACHE, maxPages: 2 };
    const made = (o: unknown) => {
      const c = w.kivi.createCache(o as never);
      const b = new TextEncoder().encode(JSON.stringify(c.config));
      c.dispose();
      return b;
    };
    const expected = made(ho);
    const vs = victims(w, {});
    const slots: Slot[] = [
      wrapping(
        mutSlot(what, "", () => mutOptions(ho, vs), (v) => (ho = v as Record<string, unknown>)),
      ),
      () => {
        const m = mutOptions(CACHE.keys as object, vs);
        ho = { ...ho, keys: m.value };
        what.push(`keys: ${m.what}`);
        return m.expect;
      },
      () => {
        const k = pick(["layers", "kvHeads", "maxPages", "residual"]);
        const m = mutInt(ho[k] as number);
        ho = { ...ho, [k]: m.value };
        what.push(`${k} ${m.what}`);
        return m.expect === "same" ? "same" : "fail";
      },
    ];
    const expect = mutate(slots);
    judge(w, "createCache", expect, what, () => made(ho), expected, [], () => {});
    return;
  }
  // attend and bench: q for the whole batch
  const batch = [s, ...(chance(0.5) ? [pick(w.seqs)[0]] : [])];
  const hostQ = data(batch.length * QH * D);
  const q = put(w, hostQ);
  const dtype = pick(["f32", "f16", "bf16"] as const);
  const base: Record<string, unknown> = kind === "bench"
    ? { iters: 1 }
    : { dtype, ...(chance(0.3) ? { scale: 0.1 + next() } : {}) };
  let expected: Uint8Array | undefined;
  if (kind === "attend") {
    const r = w.cache.attend(layer, batch, q as never, base as never);
    expected = bytes(r);
    drop(r);
  }
  let hq: unknown = q, hs: unknown = batch, hl: unknown = layer, ho = { ...base };
  const vs = victims(w, { cache: true, seqs: batch }, isTensor(q) ? [["q", q, true]] : []);
  const slots: Slot[] = [
    mutSlot(what, "q: ", () => mutBuf(hq, vs), (v) => (hq = v)),
    wrapping(mutSlot(what, "", () => mutOptions(ho, vs), (v) => (ho = v))),
    mutSlot(what, "layer ", () => mutInt(layer), (v) => (hl = v)),
    wrapping(mutSlot(what, "", () => proxySeqs(hs), (v) => (hs = v))),
    () => {
      hs = [...batch.slice(1), { cache: w.cache, id: 0, _id: () => 0 }];
      what.push("duck sequence");
      return "fail";
    },
    overlapping(() => {
      if (isTensor(q) || kind !== "attend" || hq !== q) return;
      ho = { ...ho, dtype: "f32", out: q };
      what.push("out = q");
      return "fail";
    }),
    () => {
      ho = { ...ho, trusted: 1 };
      what.push("trusted 1");
      return "fail";
    },
  ];
  const expect = mutate(slots);
  if (kind === "attend") {
    judge(
      w,
      "attend",
      expect,
      what,
      () => w.cache.attend(hl as number, hs as Sequence[], hq as never, ho as never),
      expected,
      [],
      drop,
    );
  } else {
    judge(
      w,
      "benchAttend",
      expect,
      what,
      () => (w.cache.benchAttend(hl as number, hs as Sequence[], hq as never, ho as never),
        new Uint8Array(0)),
      new Uint8Array(0),
      [],
      () => {},
    );
  }
  drop(q);
};

/** Decode batches: cache.batch with hostile options, sequences and tensors, then one attend (the
 * general path's bytes) or one append (the twin gets the plain per-sequence appends), with a hostile
 * layer. */
const batchOp: Op = (w) => {
  const kind = pick(["attend", "append"] as const);
  const pairs = chance(0.5) ? [w.seqs[0], w.seqs[1]] : [pick(w.seqs)];
  const seqs = pairs.map((p) => p[0]), n = seqs.length;
  const layer = int(L);
  const what: string[] = [];
  const q = w.kivi.upload(data(n * QH * D)), out = w.kivi.alloc([n, QH, D], "f32");
  const k = w.kivi.upload(data(n * ROW)), v = w.kivi.upload(data(n * ROW));
  let expected: Uint8Array | undefined;
  if (kind === "attend") {
    const r = w.cache.attend(layer, seqs, q);
    expected = bytes(r);
    drop(r);
  }
  let hs: unknown = seqs, hl: unknown = layer;
  let ho: Record<string, unknown> = kind === "attend"
    ? { q, out, ...(chance(0.3) ? { trusted: true } : {}) }
    : { k, v, ...(chance(0.5) ? { q, out } : {}) };
  const vs = victims(
    w,
    { cache: true, seqs },
    kind === "attend" ? [["q", q, true], ["out", out, true]] : [["k", k, true], ["v", v, true]],
  );
  const slots: Slot[] = [
    wrapping(
      mutSlot(what, "", () => mutOptions(ho, vs), (v) => (ho = v as Record<string, unknown>)),
    ),
    () => {
      const key = kind === "attend" ? pick(["q", "out"]) : pick(["k", "v"]);
      const m = mutTensor(ho[key] as DeviceTensor);
      ho = { ...ho, [key]: m.value };
      what.push(`${key}: ${m.what}`);
      return m.expect;
    },
    mutSlot(what, "layer ", () => mutInt(layer), (v) => (hl = v)),
    wrapping(mutSlot(what, "", () => proxySeqs(hs), (v) => (hs = v))),
    () => {
      hs = pick([[...seqs, seqs[0]], [{ cache: w.cache, id: 0 }], [new Proxy(seqs[0], {})]]);
      what.push("repeated, duck or Proxy sequence");
      return "fail";
    },
    () => {
      ho = { ...ho, out: ho.q ?? q };
      what.push("out = q");
      return "fail";
    },
    () => {
      ho = { ...ho, trusted: pick(["false", 1, null]) };
      what.push("trusted not a boolean");
      return "fail";
    },
    () => {
      ho = { ...ho, [pick(["q", "k"])]: data(n * ROW) };
      what.push("a host array");
      return "fail";
    },
  ];
  const expect = mutate(slots);
  let ok = false;
  judge(
    w,
    `batch.${kind}`,
    expect,
    what,
    () => {
      const b = w.cache.batch(hs as Sequence[], ho as never);
      try {
        if (kind === "attend") b.attend(hl as number);
        else b.append(hl as number);
        b.synchronizeSync();
        ok = true;
        return kind === "attend" ? bytes(out) : new Uint8Array(0);
      } finally {
        b.dispose();
      }
    },
    expected ?? new Uint8Array(0),
    [out],
    () => {},
  );
  if (ok && kind === "append") {
    const kh = k.readSync() as Float32Array, vh = v.readSync() as Float32Array;
    pairs.forEach(([s, t], i) => {
      t.append(kh.subarray(i * ROW, (i + 1) * ROW), vh.subarray(i * ROW, (i + 1) * ROW), { layer });
      const a = w.cache.read(s, layer), b = w.twin.read(t, layer);
      check(
        s.length(layer) === t.length(layer) && same(bytes(a.keys), bytes(b.keys)) &&
          same(bytes(a.values), bytes(b.values)),
        `${what.join("; ")}: the batch append stored other data than the plain append`,
      );
      drop(a.keys), drop(a.values), drop(b.keys), drop(b.values);
    });
  }
  for (const t of [q, out, k, v]) drop(t);
};

/** The rest of the surface: copyBandwidth with hostile sizes, memInfo, memory(), a sequence created
 * and freed, a read back, and methods called on a Proxy of their object (a brand check refuses it). */
const miscOp: Op = (w) => {
  const kind = pick(["copyBandwidth", "memory", "sequence", "readSync", "proxyThis"] as const);
  if (kind === "copyBandwidth") {
    const m = chance(0.5) ? mutInt(1 + int(4096), true) : plain(1 + int(4096));
    judge(
      w,
      kind,
      m.expect,
      [m.what],
      () => (w.kivi.copyBandwidth(m.value, 1) > 0 ? new Uint8Array(1) : new Uint8Array(0)),
      new Uint8Array(1),
      [],
      () => {},
    );
  } else if (kind === "memory") {
    const expected = new TextEncoder().encode(
      JSON.stringify([w.cache.memory(), w.kivi.memInfo().total]),
    );
    judge(
      w,
      kind,
      "same",
      [],
      () => new TextEncoder().encode(JSON.stringify([w.cache.memory(), w.kivi.memInfo().total])),
      expected,
      [],
      () => {},
    );
  } else if (kind === "sequence") {
    judge(
      w,
      kind,
      "either",
      [],
      () => {
        const s = w.cache.createSequence();
        const b = new Float64Array([s.length(0), s.pages().length]);
        s.free();
        s.free();
        return b;
      },
      bytes(new Float64Array([0, 0])),
      [],
      () => {},
    );
  } else if (kind === "readSync") {
    const a = data(16), t = w.kivi.upload(a);
    judge(w, kind, "same", [], () => t.readSync(), bytes(a), [], () => {});
    drop(t);
  } else {
    const calls: [string, () => unknown][] = [
      [
        "Backend.quantize",
        () =>
          w.kivi.quantize.call(
            new Proxy(w.kivi, {}),
            w.spare as never,
            { axis: "channel", format: { kind: "uniform", bits: 2 } } as never,
          ),
      ],
      [
        "KVCache.attend",
        () => w.cache.attend.call(new Proxy(w.cache, {}), 0, [w.seqs[0][0]], data(QH * D) as never),
      ],
      [
        "Sequence.append",
        () =>
          w.seqs[0][0].append.call(
            new Proxy(w.seqs[0][0], {}),
            data(ROW) as never,
            data(ROW) as never,
            { layer: 0 },
          ),
      ],
      ["DeviceTensor.readSync", () => w.spare.readSync.call(new Proxy(w.spare, {}))],
    ];
    const [name, fn] = pick(calls);
    judge(w, kind, "fail", [name], fn, undefined, [], drop);
  }
};

const OPS: Op[] = [
  quantizerOp,
  quantizerOp,
  dequantOp,
  memoryOp,
  cacheOp,
  cacheOp,
  batchOp,
  miscOp,
];

/* ------------------------------------------------------------------ main ----------------- */

let w = await fresh();
let done = 0;
for (let i = 0; i < CALLS; i++) {
  // A getter disposed part of the world (a sequence freed in one cache only would leave the twin out
  // of step), or the pool is nearly full: start again.
  if (
    w.kivi.disposed || w.cache.disposed || w.twin.disposed || w.spare.disposed ||
    w.seqs.some(([a, b]) => a.freed || b.freed) ||
    i % 300 === 299 || w.cache.memory().pagesUsed > CACHE.maxPages - 6
  ) w = await fresh(w);
  where = `call ${i} (seed ${SEED}, ${PREFER})`;
  if (process.env.KIVI_FUZZ_TRACE) console.error(where);
  const op = pick(OPS);
  try {
    op(w);
    done++;
  } catch (e) {
    failures.push(
      e instanceof Failure
        ? e.message
        : `${where}: the fuzzer itself threw ${(e as Error)?.stack ?? e}`,
    );
    if (failures.length >= 5) break;
    w = await fresh(w);
  }
}
w.kivi.dispose();
console.log(JSON.stringify({ seed: SEED, backend: PREFER, calls: done, counts, failures }));
process.exit(failures.length ? 1 : 0);
