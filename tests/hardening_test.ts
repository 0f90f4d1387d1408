/**
 * Issue 22's reproductions, one test each: user code that runs inside a call (getters, lying
 * subclasses, Proxies), sizes past 32 bits, values past fp16's range, strict options, -0, the
 * command line, overlapping buffers; then the two accuracy claims as property tests over awkward
 * inputs (large offsets, subnormals), benchAttend's validation and the memory report. Each bad call
 * gives a typed error and changes nothing; each good one a correct, finite result. docs/errors.md
 * names these tests in its rows 48 on.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import type { Backend, DeviceTensor, KVCache, Sequence } from "../src/mod.ts";
import { KiviError } from "../src/mod.ts";
import { demoShape, main, parseDemoOptions } from "../src/cli.ts";
import { assertUntouched, cacheOptions, f16, f32, kvRows, openCpu, Rng } from "./_helpers.ts";
import { CB2_G32, sentinel, throwsNaming, toInput, U2_G32 } from "./_helpers.ts";
import { gpuDescribe } from "./_gpu.ts";

const L = 2, H = 2, QH = 4, D = 64, ROW = H * D;
const OPTS = cacheOptions(L, H, QH, D, 8, 3);

/** A backend, a cache with one sequence of 70 tokens in every layer, a query and a snapshot of it. */
async function setup(label: string) {
  const rng = new Rng(`hardening ${label}`);
  const kivi = await openCpu();
  const cache = kivi.createCache(OPTS);
  const seq = cache.createSequence();
  seq.append(kvRows(rng, 70, H, D, L), kvRows(rng, 70, H, D, L));
  const q = kvRows(rng, 1, QH, D);
  return { rng, kivi, cache, seq, q };
}

/** A uniform 2-bit quantize of x ([rows, 32], channel axis) into `out`, as a thunk. */
const quantizeInto = (kivi: Backend, x: Float32Array, rows: number, out: object) => () =>
  kivi.quantize(x, {
    shape: [rows, 32],
    axis: "channel",
    format: { kind: "uniform", bits: 2 },
    out: out as never,
  });

/** What a failed call must leave as it was: lengths, block table, contents and attention. */
function snap(cache: KVCache, seq: Sequence, q: Float32Array) {
  return {
    lens: Array.from({ length: L }, (_, l) => [seq.length(l), seq.quantizedLength(l)]),
    pages: [...seq.pages()],
    reads: Array.from({ length: L }, (_, l) => cache.read(seq, l)),
    outs: Array.from({ length: L }, (_, l) => cache.attend(l, [seq], q)),
    mem: cache.memory(),
  };
}

/** An options object whose `key` getter runs `effect` (dispose, free) and then returns `value`. */
// deno-lint-ignore no-explicit-any
function trap<T extends object>(base: T, key: string, value: unknown, effect: () => void): any {
  const o = { ...base };
  Object.defineProperty(o, key, { enumerable: true, get: () => (effect(), value) });
  return o;
}

const stateError = (e: unknown) => e instanceof KiviError && e.code === "KIVI_ERR_STATE";

describe("issue 22: user code that runs inside a call", () => {
  it("time() whose fn disposes the backend is KIVI_ERR_STATE, not a crash; a new backend works", async () => {
    const kivi = await openCpu();
    assert.throws(
      () => kivi.time(() => kivi.dispose()),
      (e: unknown) => stateError(e) && /time: the backend was disposed/.test((e as Error).message),
    );
    assert.ok(kivi.disposed);
    using again = await openCpu();
    assert.ok(again.time(() => {}) >= 0);
  });

  it("getters in attend, append, quantizer options and out that dispose are KIVI_ERR_STATE; nothing changed", async () => {
    const { rng, kivi, cache, seq, q } = await setup("getters");
    using _k = kivi;
    const before = snap(cache, seq, q);
    const k1 = kvRows(rng, 3, H, D);
    // The cache survives these: each getter frees something the call needs, which it notices.
    using spare = cache.createSequence();
    spare.append(k1, k1, { layer: 0 });
    assert.throws(
      () => spare.append(k1, k1, trap({ layer: 0 }, "trusted", false, () => spare.free())),
      stateError,
    );
    const x = kvRows(rng, 64, 1, 64);
    using t = kivi.upload(x, { shape: [64, 64] });
    // A getter that disposes a tensor the call does not use: the call goes ahead, as the plain call.
    const plain = kivi.quantize(x, {
      shape: [64, 64],
      axis: "token",
      format: { kind: "uniform", bits: 2 },
    });
    const codes = new Uint32Array(64 * 64 / 16);
    kivi.quantize(
      x,
      trap(
        { shape: [64, 64] as [number, number], axis: "token" as const, out: { codes } },
        "format",
        { kind: "uniform", bits: 2 },
        () => t.dispose(),
      ),
    );
    assert.ok(t.disposed);
    assert.deepEqual(codes, plain.codes);
    assert.deepEqual(snap(cache, seq, q), before);
    // Disposing the tensor the call reads:
    using t2 = kivi.upload(x, { shape: [64, 64] });
    assert.throws(
      () =>
        kivi.quantize(
          t2,
          trap(
            { axis: "token" as const },
            "format",
            { kind: "uniform", bits: 2 },
            () => t2.dispose(),
          ),
        ),
      stateError,
    );
    // ... the out buffer it writes:
    using t3 = kivi.upload(x, { shape: [64, 64] });
    using o2 = kivi.alloc([64 * 64 / 16], "u32");
    assert.throws(
      () =>
        kivi.quantize(t3, {
          axis: "token",
          format: { kind: "uniform", bits: 2 },
          out: trap({}, "codes", o2, () => o2.dispose()),
        }),
      stateError,
    );
    // ... the cache, from attend's options and from append's:
    const out = sentinel(new Float32Array(QH * D));
    assert.throws(
      () =>
        cache.attend(0, [seq], q, trap({ out: out.buf }, "dtype", "f32", () => cache.dispose())),
      stateError,
    );
    assertUntouched(out, "attend out");
    assert.ok(cache.disposed);
  });

  it("append with a getter that disposes the cache, or frees the sequence and takes its slot, changes no sequence", async () => {
    const { rng, kivi, cache, seq, q } = await setup("append getters");
    using _k = kivi;
    const k1 = kvRows(rng, 3, H, D);
    const other = cache.createSequence();
    const k2 = kvRows(rng, 3, H, D, L);
    other.append(k2, k2);
    const before = snap(cache, other, q);
    // Frees `seq` and creates a new sequence in its slot: the append must not land in the newcomer.
    let newcomer: Sequence | undefined;
    assert.throws(
      () =>
        seq.append(
          k1,
          k1,
          trap({}, "layer", 0, () => (seq.free(), newcomer = cache.createSequence())),
        ),
      stateError,
    );
    assert.ok(newcomer !== undefined);
    assert.equal(
      newcomer.length(0),
      0,
      "the append went into the sequence that took the freed slot",
    );
    newcomer.free();
    // Freeing seq changed the memory report; nothing of `other` changed.
    const { mem: _m, ...after } = snap(cache, other, q), { mem: _b, ...was } = before;
    assert.deepEqual(after, was);
    assert.throws(
      () => other.append(k1, k1, trap({}, "layer", 0, () => cache.dispose())),
      stateError,
    );
  });

  it("a typed-array subclass whose length getter disposes is read by its real length; the getter never runs", async () => {
    const { rng, kivi, cache, seq } = await setup("length getter");
    using _k = kivi;
    let ran = 0;
    class Sneaky extends Float32Array {
      override get length(): number {
        ran++;
        cache.dispose();
        return 4096 * ROW;
      }
    }
    const k = new Sneaky(kvRows(rng, 2, H, D));
    seq.append(k, new Sneaky(kvRows(rng, 2, H, D)), { layer: 1 });
    assert.equal(ran, 0);
    assert.equal(seq.length(1), 72);
    assert.equal(seq.length(0), 70);
  });
});

describe("issue 22: sizes past 32 bits", () => {
  it("fitCodebook over 2^33 + 32 values computes its outputs in 64-bit arithmetic (no wrap, no crash)", async () => {
    using kivi = await openCpu();
    // 16 GiB, never touched (the library does not run: the out buffer is refused first). Where the
    // system will not even reserve that much, the allocation says so and there is nothing to check.
    let x: DeviceTensor;
    try {
      x = kivi.alloc([2 ** 33 + 32], "f16");
    } catch (e) {
      assert.ok(e instanceof KiviError && e.code === "KIVI_ERR_NOMEM", String(e));
      return;
    }
    using _x = x;
    using small = kivi.alloc([16], "f16");
    const fitInto = (input: DeviceTensor) => () =>
      kivi.fitCodebook(input, {
        axis: "channel",
        bits: 4,
        group: 32,
        iterations: 1,
        trusted: true,
        out: { centroids: small },
      });
    throwsNaming(
      fitInto(x),
      TypeError,
      /out\.centroids must have 4294967312 elements, got 16/,
      "2^33 + 32 values",
    );
    _x.dispose();
    using x32 = kivi.alloc([2 ** 32], "f16");
    throwsNaming(
      fitInto(x32),
      TypeError,
      /out\.centroids must have 2147483648 elements, got 16/,
      "2^32 values",
    );
  });

  it("alloc of a shape whose product is past 2^40 elements, or copyBandwidth past a quarter of memory, is a RangeError in both runtimes", async () => {
    using kivi = await openCpu();
    throwsNaming(
      () => kivi.alloc([2 ** 32, 2 ** 32 + 1], "u8"),
      RangeError,
      /shape must hold at most 2\^40 elements, got 4294967296 x 4294967297/,
      "alloc",
    );
    throwsNaming(
      () => kivi.alloc([2 ** 20, 2 ** 20, 2], "f32"),
      RangeError,
      /at most 2\^40 elements/,
      "alloc 3-d",
    );
    // copyBandwidth allocates and writes two buffers of `bytes`: at most a quarter of the memory each.
    throwsNaming(
      () => kivi.copyBandwidth(2 ** 50, 1),
      RangeError,
      /bytes must be between 1 and \d+, got 1125899906842624/,
      "copyBandwidth",
    );
    assert.equal(kivi.liveTensors, 0);
  });
});

describe("issue 22: lying subclasses, duck-typed tensors and Proxies", () => {
  it("a subclass that overrides length is read by its real length: no read or write past its buffer", async () => {
    const { rng, kivi, seq } = await setup("lying length");
    using _k = kivi;
    class Liar extends Float32Array {
      override get length(): number {
        return 4096 * ROW;
      }
    }
    // Claims 4096 tokens, holds 64 values: not one whole token of this layer.
    throwsNaming(
      () => seq.append(new Liar(64), new Liar(64), { layer: 0 }),
      TypeError,
      /k\.length must be a positive multiple of kvHeads \(2\) x headDim \(64\) = 128, got 64/,
      "append",
    );
    class LiarU32 extends Uint32Array {
      override get length(): number {
        return 2 ** 18;
      }
    }
    const codes = sentinel(new LiarU32(4));
    const x = kvRows(rng, 32, 1, 32);
    throwsNaming(
      () =>
        kivi.quantize(x, {
          shape: [32, 32],
          axis: "channel",
          format: { kind: "uniform", bits: 2, group: 32 },
          out: { codes: codes.buf },
        }),
      TypeError,
      /out\.codes must have 64 elements, got 4/,
      "out.codes",
    );
    assertUntouched(codes, "out.codes");
    // upload and write take the array's address through the plain view: Deno's UnsafePointer.of
    // would read a subclass's byteOffset and length getters (user code) on its own.
    class Shifty extends Float32Array {
      override get byteOffset(): number {
        kivi.dispose();
        return 1 << 20;
      }
      override get length(): number {
        kivi.dispose();
        return 1 << 20;
      }
    }
    const y = new Shifty(kvRows(rng, 1, 1, 64));
    using t = kivi.upload(y);
    t.write(y);
    assert.deepEqual(t.readSync(), new Float32Array(y.buffer));
    assert.ok(!kivi.disposed);
  });

  it("a plain object with pointer() passed as a DeviceTensor, or a Proxy of a real one, is a TypeError", async () => {
    using kivi = await openCpu();
    const duck = {
      pointer: () => 16,
      writePointer: () => 16,
      backend: kivi,
      dtype: "f32",
      length: 1024,
      shape: [32, 32],
      disposed: false,
    };
    throwsNaming(
      () => kivi.quantize(duck as never, { axis: "channel", format: { kind: "uniform", bits: 2 } }),
      TypeError,
      /\bx must be a Float32Array, Float16Array, Uint16Array or DeviceTensor, got Object/,
      "duck x",
    );
    using real = kivi.upload(new Float32Array(1024).fill(0.5), { shape: [32, 32] });
    throwsNaming(
      () =>
        kivi.quantize(new Proxy(real, {}) as never, {
          axis: "channel",
          format: { kind: "uniform", bits: 2 },
        }),
      TypeError,
      /\bx must be a .*DeviceTensor/,
      "proxy x",
    );
    throwsNaming(
      () =>
        kivi.quantize(new Proxy(new Float32Array(1024), {}) as never, {
          shape: [32, 32],
          axis: "channel",
          format: { kind: "uniform", bits: 2 },
        }),
      TypeError,
      /\bx must be a .*DeviceTensor/,
      "proxy array",
    );
    const x = new Float32Array(1024).fill(0.25);
    throwsNaming(
      quantizeInto(kivi, x, 32, { codes: duck }),
      TypeError,
      /out\.codes must be a host typed array like the input/,
      "duck out",
    );
    throwsNaming(
      () => kivi.pack(duck as never, { bits: 2 }),
      TypeError,
      /codes must be a typed array or DeviceTensor/,
      "duck pack",
    );
    // A real tensor whose prototype was swapped for one with lying getters is still read by its own fields.
    using t = kivi.upload(Float32Array.from({ length: 64 }, (_, i) => i / 64), { shape: [2, 32] });
    Object.setPrototypeOf(
      t,
      Object.create(Object.getPrototypeOf(t), {
        length: { get: () => 2 ** 30 },
        dtype: { get: () => "f16" },
      }),
    );
    const q = kivi.quantize(t, { axis: "channel", format: { kind: "uniform", bits: 2 } });
    assert.equal(q.shape[0] * q.shape[1], 64);
  });

  it("a duck-typed or proxied Sequence in seqs, or as cache.read's seq, is a TypeError", async () => {
    const { kivi, cache, seq, q } = await setup("duck seq");
    using _k = kivi;
    const duck = { cache, id: 0, _id: () => 0, freed: false };
    throwsNaming(
      () => cache.attend(0, [duck as never], q),
      TypeError,
      /seqs\[0\] must be a Sequence of this cache, got Object/,
      "duck",
    );
    throwsNaming(
      () => cache.attend(0, [new Proxy(seq, {})], q),
      TypeError,
      /seqs\[0\] must be a Sequence of this cache/,
      "proxy",
    );
    throwsNaming(
      () => cache.read(duck as never, 0),
      TypeError,
      /seq must be a Sequence of this cache/,
      "read",
    );
  });
});

describe("issue 22: values past fp16's range", () => {
  const big = Float32Array.from({ length: 32 }, (_, i) => i * 20000);
  it("the quantizers refuse finite values fp16 cannot hold (RangeError) unless trusted, as the cache does", async () => {
    using kivi = await openCpu();
    const shape: [number, number] = [1, 32];
    const re =
      /\bx must hold values below 65520 in magnitude \(fp16 params\), got 80000 at index 4 \(row 0, col 4\)/;
    for (
      const format of [U2_G32, CB2_G32]
    ) {
      throwsNaming(
        () => kivi.quantize(big, { shape, axis: "channel", format }),
        RangeError,
        re,
        format.kind,
      );
    }
    throwsNaming(
      () => kivi.fitCodebook(big, { shape, axis: "channel", bits: 2 }),
      RangeError,
      re,
      "fitCodebook",
    );
    throwsNaming(
      () =>
        kivi.quantizeWithCodebook(big, new Float16Array([0, 1, 2, 3]), {
          shape,
          axis: "channel",
          bits: 2,
        }),
      RangeError,
      re,
      "quantizeWithCodebook",
    );
    const bf = toInput(big, "bf16").x;
    throwsNaming(
      () =>
        kivi.quantize(bf, {
          shape,
          dtype: "bf16",
          axis: "channel",
          format: { kind: "uniform", bits: 2 },
        }),
      RangeError,
      /got 79872 at index 4/,
      "bf16",
    );
    using t = kivi.upload(big, { shape });
    throwsNaming(
      () => kivi.quantize(t, { axis: "channel", format: { kind: "uniform", bits: 2 } }),
      RangeError,
      re,
      "CPU tensor",
    );
    // The C exports scan too (KIVI_ERR_NONFINITE), for CUDA tensors and direct callers.
    const { lib, ctx } = kivi._native("test");
    const codes = new Uint32Array(2), s = new Uint16Array(1), z = new Uint16Array(1);
    const st = lib.call(
      "kivi_uniform_quantize",
      ctx,
      lib.ptr(big),
      0,
      1,
      32,
      1,
      32,
      2,
      0,
      lib.ptr(codes),
      lib.ptr(s),
      lib.ptr(z),
    );
    assert.equal(st, -3);
    assert.match(
      lib.call("kivi_ctx_last_error", ctx),
      /x must be within fp16's range \(\|x\| < 65520\).*got 80000 at index 4/,
    );
    // Trusted, the values saturate at fp16's largest finite: no Inf scale, no NaN.
    const q = kivi.quantize(big, {
      shape,
      axis: "channel",
      format: { kind: "uniform", bits: 2 },
      trusted: true,
    });
    const back = kivi.dequantize(q) as Float32Array;
    assert.ok(back.every(Number.isFinite), `dequantized ${back.slice(0, 4)}`);
  });

  it("a group spanning [0, 65504] dequantizes, reads and attends to finite fp16 (no 3 x 21840 = 65520)", async () => {
    using kivi = await openCpu();
    const rng = new Rng("fp16 top");
    for (const bits of [2, 4] as const) {
      const x = Float32Array.from(
        { length: 64 },
        (_, i) => (i % 32 === 0 ? 0 : i % 32 === 1 ? 65504 : rng.uniform(0, 65504)),
      );
      const q = kivi.quantize(x, {
        shape: [2, 32],
        axis: "channel",
        format: { kind: "uniform", bits, group: 32 },
      });
      for (const dtype of ["f32", "f16", "bf16"] as const) {
        const back = kivi.dequantize(q, { dtype }) as Float32Array | Float16Array | Uint16Array;
        const vals = dtype === "bf16"
          ? Array.from(back, (b) => toBf(b))
          : Array.from(back as Float32Array);
        assert.ok(
          vals.every((v) => Number.isFinite(v) && Math.abs(v) <= 65504),
          `${bits} bits ${dtype}: ${vals.filter((v) => !(Math.abs(v) <= 65504)).slice(0, 3)}`,
        );
      }
    }
    using cache = kivi.createCache({
      ...OPTS,
      residual: 0,
      keys: { kind: "uniform", bits: 2, group: 32 },
      values: { kind: "uniform", bits: 2, group: 32 },
    });
    using s = cache.createSequence();
    const k = kvRows(rng, 32, H, D), v = new Float32Array(32 * ROW);
    for (let i = 0; i < v.length; i++) v[i] = i % 32 === 0 ? 0 : 65504 - (i % 7);
    s.append(k, v, { layer: 0 });
    assert.equal(s.quantizedLength(0), 32);
    const read = cache.read(s, 0, "f16").values as unknown as Float16Array;
    assert.ok(read.every(Number.isFinite), "cache.read f16");
    const out = cache.attend(0, [s], kvRows(rng, 1, QH, D), { dtype: "f16" }) as Float16Array;
    assert.ok(out.every(Number.isFinite), `attend f16: ${out.slice(0, 4)}`);
  });
});

function toBf(b: number): number {
  return new Float32Array(new Uint32Array([b << 16]).buffer)[0];
}

/** setup(), then what the option tests pass: a snapshot, two tokens k1, a 32 x 32 x and a format. */
async function optionSetup(label: string) {
  const s = await setup(label);
  const before = snap(s.cache, s.seq, s.q);
  const k1 = kvRows(s.rng, 2, H, D);
  const x = kvRows(s.rng, 32, 1, 32);
  return { ...s, before, k1, x, uni: { kind: "uniform", bits: 2, group: 32 } as const };
}

describe("issue 22: strict options", () => {
  it("an unknown key is a TypeError naming it and the closest known key, everywhere", async () => {
    const { kivi, cache, seq, q, before, k1, x, uni } = await optionSetup("unknown keys");
    using _k = kivi;
    // quantize of x with one option added or replaced
    const quantize = (o: Record<string, unknown>) => () =>
      kivi.quantize(x, { shape: [32, 32], axis: "channel", format: uni, ...o } as never);
    const cases: [string, () => unknown, RegExp][] = [
      [
        "createCache",
        () => kivi.createCache({ ...OPTS, resdiual: 0 } as never),
        /options has an unknown key "resdiual"; did you mean "residual"\?/,
      ],
      [
        "cache format",
        () => kivi.createCache({ ...OPTS, keys: { kind: "uniform", bits: 2, grop: 64 } } as never),
        /keys has an unknown key "grop"; did you mean "group"\?/,
      ],
      [
        "quantize format",
        quantize({ format: { kind: "uniform", bits: 2, grop: 64 } }),
        /format has an unknown key "grop"; did you mean "group"\?/,
      ],
      [
        "quantize options",
        quantize({ trustd: true }),
        /options has an unknown key "trustd"; did you mean "trusted"\?/,
      ],
      [
        "attend",
        () => cache.attend(0, [seq], q, { scal: 2 } as never),
        /options has an unknown key "scal"; did you mean "scale"\?/,
      ],
      [
        "append",
        () => seq.append(k1, k1, { layr: 1 } as never),
        /options has an unknown key "layr"; did you mean "layer"\?/,
      ],
      [
        "out",
        quantize({ out: { code: new Uint32Array(64) } }),
        /out has an unknown key "code"; did you mean "codes"\?/,
      ],
      [
        "upload",
        () => kivi.upload(x, { shap: [32, 32] } as never),
        /options has an unknown key "shap"; did you mean "shape"\?/,
      ],
      [
        "openBackend",
        () => kivi.createCache({ ...OPTS, zzzzzzzz: 1 } as never),
        /unknown key "zzzzzzzz"; expected one of "layers", "kvHeads"/,
      ],
    ];
    for (const [what, fn, re] of cases) throwsNaming(fn, TypeError, re, what);
    assert.deepEqual(snap(cache, seq, q), before);
  });

  it("booleans must be booleans and dtype hints must match the array", async () => {
    const { kivi, cache, seq, q, before, k1, x, uni } = await optionSetup("booleans");
    using _k = kivi;
    k1[5] = NaN;
    const cases: [string, () => unknown, new (...a: never[]) => Error, RegExp][] = [
      [
        "trusted a string",
        () => seq.append(k1, k1, { layer: 0, trusted: "false" as never }),
        TypeError,
        /trusted must be a boolean, got "false"/,
      ],
      [
        "trusted 1",
        () =>
          kivi.quantize(x, { shape: [32, 32], axis: "channel", format: uni, trusted: 1 as never }),
        TypeError,
        /trusted must be a boolean, got 1/,
      ],
      [
        "trace a string",
        () =>
          kivi.fitCodebook(x, { shape: [32, 32], axis: "channel", bits: 2, trace: "yes" as never }),
        TypeError,
        /trace must be a boolean, got "yes"/,
      ],
      [
        "dtype int8 on append",
        () => seq.append(k1, k1, { layer: 0, dtype: "int8" as never }),
        RangeError,
        /dtype must be one of "f32", "f16", "bf16", got "int8"/,
      ],
      [
        "dtype bf16 on a Float32Array",
        () => seq.append(k1, k1, { layer: 0, dtype: "bf16" }),
        TypeError,
        /dtype "bf16" does not match k, a Float32Array \(f32\)/,
      ],
      [
        "upload dtype bf16 of a Float32Array",
        () => kivi.upload(x, { dtype: "bf16" }),
        TypeError,
        /dtype "bf16" does not match data, a Float32Array \(f32\)/,
      ],
      [
        "quantize dtype f16 of a Float32Array",
        () => kivi.quantize(x, { shape: [32, 32], dtype: "f16", axis: "channel", format: uni }),
        TypeError,
        /dtype "f16" does not match x, a Float32Array \(f32\)/,
      ],
      [
        "qDtype bf16 of a Float32Array",
        () => cache.attend(0, [seq], q, { qDtype: "bf16" }),
        TypeError,
        /qDtype "bf16" does not match q, a Float32Array \(f32\)/,
      ],
    ];
    for (const [what, fn, kind, re] of cases) throwsNaming(fn, kind, re, what);
    assert.deepEqual(snap(cache, seq, q), before);
    assert.equal(kivi.liveTensors, 0);
  });

  it("-0 as a layer is layer 0 in both runtimes (Deno's FFI refuses -0 as an i32)", async () => {
    const { rng, kivi, cache, seq, q } = await setup("minus zero");
    using _k = kivi;
    assert.equal(seq.length(Math.round(-0.3)), 70);
    assert.equal(seq.quantizedLength(-0), seq.quantizedLength(0));
    const k1 = kvRows(rng, 1, H, D);
    seq.append(k1, k1, { layer: -0 });
    assert.equal(seq.length(0), 71);
    assert.deepEqual(cache.attend(-0, [seq], q), cache.attend(0, [seq], q));
    assert.equal((cache.read(seq, -0).keys as Float32Array).length, 71 * ROW);
  });
});

describe("issue 22: overlapping buffers", () => {
  it("an out that shares memory with q, or a quantizer out that overlaps x or another out, is a TypeError", async () => {
    const { rng, kivi, cache, seq, q } = await setup("overlap");
    using _k = kivi;
    const qq = new Float32Array(q);
    throwsNaming(
      () => cache.attend(0, [seq], qq, { out: qq }),
      TypeError,
      /out must not share memory with q/,
      "out = q",
    );
    const buf = new ArrayBuffer(QH * D * 4 * 2);
    const q2 = new Float32Array(buf, 0, QH * D),
      o2 = new Float32Array(buf, 4 * (QH * D - 4), QH * D);
    q2.set(q);
    throwsNaming(
      () => cache.attend(0, [seq], q2, { out: o2 }),
      TypeError,
      /out must not share memory with q/,
      "overlapping halves",
    );
    // Disjoint parts of one buffer are fine.
    const o3 = new Float32Array(buf, 4 * QH * D, QH * D);
    assert.deepEqual(cache.attend(0, [seq], q2, { out: o3 }), cache.attend(0, [seq], q));
    const x = kvRows(rng, 64, 1, 32);
    const words = new Uint32Array(x.buffer, 0, 64 * 32 / 16);
    throwsNaming(
      quantizeInto(kivi, x, 64, { codes: words }),
      TypeError,
      /out\.codes must not share memory with x/,
      "codes over x",
    );
    const p = new Uint16Array(64);
    throwsNaming(
      quantizeInto(kivi, x, 64, {
        scale: p.subarray(0, 64),
        zero: new Uint16Array(p.buffer, 0, 64),
      }),
      TypeError,
      /out\.zero must not share memory with out\.scale/,
      "zero over scale",
    );
    // Tensors: the same tensor as q and out.
    using qt = kivi.upload(q, { shape: [1, QH, D] });
    throwsNaming(
      () => cache.attend(0, [seq], qt, { out: qt }),
      TypeError,
      /out must not share memory with q/,
      "out = q tensor",
    );
    assert.deepEqual(qt.readSync(), q);
  });
});

describe("issue 22: the command line", () => {
  async function run(...argv: string[]) {
    const out: string[] = [], err: string[] = [];
    const code = await main(argv, (s) => out.push(s), (s) => err.push(s));
    return { code, out: out.join("\n"), err: err.join("\n") };
  }
  it("every bad demo command line exits 2 with the usage and no stack trace", async () => {
    const bad = [
      ["--layers", "abc"],
      ["--layers", "-1"],
      ["--layers", "0"],
      ["--layers", "1.5"],
      ["--layers", "100000"],
      ["--prompt", "0"],
      ["--steps", "x"],
      ["--frobnicate", "1"],
      ["--kv-heads", "5", "--heads", "16"],
      ["--seed", "-3"],
      ["--tokens", "5"],
    ];
    for (const args of bad) {
      const r = await run("demo", "--backend", "cpu", ...args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.err}`);
      assert.match(r.err, /usage: kivi/, args.join(" "));
      assert.doesNotMatch(r.err + r.out, /\n\s+at /, `${args.join(" ")}: a stack trace`);
    }
  });
  it("demo --heads 3 is a valid shape: as many KV heads as query heads where 3 is not a multiple of 4", () => {
    assert.deepEqual(demoShape(parseDemoOptions(["--heads", "3"]), false), {
      layers: 4,
      heads: 3,
      kvHeads: 3,
      prompt: 512,
      steps: 32,
      seed: 42,
    });
    assert.deepEqual(demoShape(parseDemoOptions(["--seed", "7", "--json"]), true), {
      layers: 32,
      heads: 32,
      kvHeads: 32,
      prompt: 1024,
      steps: 64,
      seed: 7,
    });
  });
  it("demo --backend cuda without a CUDA device exits 1 with one line", async (t) => {
    const r = await run("info", "--backend", "auto", "--json");
    if (JSON.parse(r.out).backend === "cuda") return t.skip("a CUDA device is present");
    const d = await run("demo", "--backend", "cuda", "--layers", "1");
    assert.equal(d.code, 1, d.err);
    assert.match(d.err, /KIVI_ERR_NO_DEVICE/);
    assert.doesNotMatch(d.err, /\n\s+at /, "a stack trace");
  });
});

describe("issue 22: the accuracy claims, over awkward inputs", () => {
  it("uniform: every value within scale / 2 of its dequantized value (up to fp32 rounding)", async () => {
    using kivi = await openCpu();
    for (const dtype of ["f32", "f16", "bf16"] as const) {
      for (const bits of [2, 4] as const) {
        const rng = new Rng(`scale/2 ${dtype} ${bits}`);
        const inp = toInput(awkward(rng, 64), dtype);
        for (const axis of ["channel", "token"] as const) {
          const shape: [number, number] = axis === "channel" ? [64, 32] : [32, 64];
          const x = axis === "channel" ? inp : toInput(transpose(inp.v, 64, 32), dtype);
          const q = kivi.quantize(x.x, {
            shape,
            dtype,
            axis,
            format: { kind: "uniform", bits, group: 32 },
          }) as { scale: Float16Array; zero: Float16Array };
          const back = kivi.dequantize(q as never) as Float32Array;
          for (let i = 0; i < back.length; i++) {
            const g = axis === "channel" ? Math.floor(i / 32) : (i % 64);
            const s = q.scale[g];
            const err = Math.abs(back[i] - x.v[i]);
            const tol = s / 2 + 4 * 2 ** -24 * (Math.abs(x.v[i]) + Math.abs(q.zero[g]) + 16 * s);
            if (!(err <= tol)) {
              assert.fail(
                `${dtype} ${bits}b ${axis}: value ${x.v[i]} -> ${back[i]}, error ${err} = ${
                  (err / s).toFixed(2)
                } x scale ${s} ${rng.tag}`,
              );
            }
          }
        }
      }
    }
  });

  it("pinned: the fitted codebook's fp32 error never exceeds the evenly spaced grid's it starts from", async () => {
    using kivi = await openCpu();
    for (const dtype of ["f32", "f16", "bf16"] as const) {
      for (const bits of [2, 4] as const) {
        const rng = new Rng(`pinned ${dtype} ${bits}`);
        const inp = toInput(awkward(rng, 64), dtype);
        const fit = kivi.fitCodebook(inp.x, {
          shape: [64, 32],
          dtype,
          axis: "channel",
          bits,
          fit: "pinned",
          iterations: 16,
          trace: true,
        });
        const inertia = fit.inertia as Float32Array, n = 1 << bits;
        const c = fit.centroids as Float16Array;
        for (let g = 0; g < 64; g++) {
          const tr = inertia.subarray(g * 17, g * 17 + 17);
          let mn = Infinity, mx = -Infinity, M = 0;
          for (let i = 0; i < 32; i++) {
            const v = inp.v[g * 32 + i];
            mn = Math.min(mn, v);
            mx = Math.max(mx, v);
            M = Math.max(M, Math.abs(v));
          }
          assert.ok(
            tr[16] <= tr[0] * (1 + 2 ** -10) + 32 * 32 * (2 ** -24 * M) ** 2,
            `group ${g}: inertia ${tr[16]} > start ${tr[0]} ${rng.tag}`,
          );
          assert.equal(
            c[g * n],
            f16(f32(mn)),
            `group ${g}: first centroid is fp16(min) ${rng.tag}`,
          );
          assert.equal(
            c[g * n + n - 1],
            f16(f32(mx)),
            `group ${g}: last centroid is fp16(max) ${rng.tag}`,
          );
        }
      }
    }
  });
});

/** Groups of 32 around large offsets, in fp16's subnormals, tiny ranges, constant groups, fp16's ends. */
function awkward(rng: Rng, groups: number): Float64Array {
  const v = new Float64Array(groups * 32);
  for (let g = 0; g < groups; g++) {
    const kind = g % 8;
    const off = [1000.3, -3e4, 1e-6, 3e-7, 0.1, 64000, -65000, 7][kind];
    const span = [0.093, 20, 1e-6, 5e-8, 0, 1000, 4, 1e-3][kind];
    for (let i = 0; i < 32; i++) {
      v[g * 32 + i] = off + span * (i === 0 ? 0 : i === 1 ? 1 : rng.next());
    }
  }
  return v;
}

function transpose(v: Float64Array, rows: number, cols: number): Float64Array {
  const t = new Float64Array(v.length);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) t[c * rows + r] = v[r * cols + c];
  return t;
}

describe("issue 22: benchAttend and the memory report", () => {
  it("benchAttend validates q in its warm-up: NaN is KIVI_ERR_NONFINITE", async () => {
    const { kivi, cache, seq, q } = await setup("bench nan");
    using _k = kivi;
    const bad = q.slice();
    bad[7] = NaN;
    throwsNaming(
      () => cache.benchAttend(0, [seq], bad, { iters: 1 }),
      "KIVI_ERR_NONFINITE",
      /q must be finite, got NaN at index 7/,
      "benchAttend",
    );
    assert.ok(cache.benchAttend(0, [seq], q, { iters: 1 }) >= 0);
  });

  it("memory() reports bits per value of the pages in use and of the tokens held", async () => {
    using kivi = await openCpu();
    const rng = new Rng("memory");
    using cache = kivi.createCache({
      ...OPTS,
      residual: 0,
      values: { kind: "uniform", bits: 2, group: 32 },
    });
    using s = cache.createSequence();
    s.append(kvRows(rng, 256, H, D), kvRows(rng, 256, H, D), { layer: 0 });
    s.append(kvRows(rng, 32, H, D), kvRows(rng, 32, H, D), { layer: 1 });
    const m = cache.memory();
    // Layer 1 holds one page of 8 and the pool counts all 8 in both layers: 3.0 bits x 512 / 288.
    assert.ok(Math.abs(m.bitsPerValue - (3 * 512) / 288) < 0.01, `bitsPerValue ${m.bitsPerValue}`);
    assert.ok(Math.abs(m.heldBitsPerValue - 3) < 1e-9, `heldBitsPerValue ${m.heldBitsPerValue}`);
  });
});

gpuDescribe("issue 22 on CUDA", (gpu: Backend) => {
  it("uniform params and codes of awkward groups (widened params) are bit-identical to the CPU build's", async () => {
    using cpu = await openCpu();
    for (const dtype of ["f32", "f16", "bf16"] as const) {
      for (const bits of [2, 4] as const) {
        for (const axis of ["channel", "token"] as const) {
          const rng = new Rng(`awkward gpu ${dtype} ${bits} ${axis}`);
          const v = awkward(rng, 64);
          const inp = toInput(axis === "channel" ? v : transpose(v, 64, 32), dtype);
          const shape: [number, number] = axis === "channel" ? [64, 32] : [32, 64];
          const opts = { axis, format: { kind: "uniform", bits, group: 32 } } as const;
          const want = cpu.quantize(inp.x, { ...opts, shape, dtype }) as unknown as Record<
            "codes" | "scale" | "zero",
            Uint16Array
          >;
          using t = gpu.upload(inp.x, { shape, ...(dtype === "bf16" ? { dtype } : {}) });
          const got = gpu.quantize(t, opts) as unknown as Record<
            "codes" | "scale" | "zero",
            DeviceTensor
          >;
          for (const k of ["codes", "scale", "zero"] as const) {
            assert.deepEqual(
              new Uint8Array(got[k].readSync().buffer),
              new Uint8Array(want[k].buffer),
              `${k} ${rng.tag}`,
            );
            got[k].dispose();
          }
        }
      }
    }
  });

  it("a group spanning [0, 65504] dequantizes to finite fp16; values past fp16 are KIVI_ERR_NONFINITE", () => {
    const x = Float32Array.from(
      { length: 64 },
      (_, i) => (i % 32 === 0 ? 0 : i % 32 === 1 ? 65504 : (i * 977) % 65504),
    );
    using t = gpu.upload(x, { shape: [2, 32] });
    const q = gpu.quantize(t, { axis: "channel", format: { kind: "uniform", bits: 2, group: 32 } });
    const back = gpu.dequantize(q, { dtype: "f16" });
    assert.ok((back.readSync() as Float16Array).every(Number.isFinite));
    for (
      const b of [
        back,
        q.codes,
        (q as { scale: { dispose(): void } }).scale,
        (q as { zero: { dispose(): void } }).zero,
      ]
    ) (b as { dispose(): void }).dispose();
    using big = gpu.upload(Float32Array.from({ length: 32 }, (_, i) => i * 20000), {
      shape: [1, 32],
    });
    throwsNaming(
      () => gpu.quantize(big, { axis: "channel", format: { kind: "uniform", bits: 2 } }),
      "KIVI_ERR_NONFINITE",
      /fp16's range/,
      "CUDA tensor",
    );
  });
  it("time() whose fn disposes the backend is KIVI_ERR_STATE", async () => {
    const { openBackend } = await import("../src/mod.ts");
    const b = await openBackend({ prefer: "cuda" });
    assert.throws(() => b.time(() => b.dispose()), stateError);
  });
});

if (process.env.KIVI_HARDENING_VERBOSE) console.log("hardening tests loaded");
