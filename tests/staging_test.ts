/**
 * Host typed arrays on the CUDA backend go through temporary tensors (src/_staging.ts). Here the
 * same path runs on the CPU build (`stagingMode.always`; the CPU backend's tensors are host memory
 * from the library's allocator), so it is tested where there is no GPU: every quantizer and the
 * cache give the same bytes staged as direct, write into the caller's `out` arrays, return host
 * arrays, and leave no tensor behind, after a failed call too (outputs then untouched).
 * tests/quant_gpu_test.ts and tests/cache_gpu_test.ts run it on a real device.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { type Backend, KiviError, type UniformQuantized } from "../src/mod.ts";
import { stagingMode } from "../src/_staging.ts";
import { assertSameBits, assertUntouched, bf16Bits, D64_R32, kvRows, openCpu } from "./_helpers.ts";
import { CB4_G64, randomMatrix, Rng, sentinel, U2_G32 } from "./_helpers.ts";

const kivi: Backend = await openCpu();

/** Runs `fn` staged, checking that it did allocate temporaries (or, with `uploads: false`, that
 * it was refused before it uploaded anything: every argument is read before the first upload), and
 * left no tensor and no native reference behind. */
function staged<T>(fn: () => T, uploads = true): T {
  const tensors = kivi.liveTensors, refs = kivi._nativeRefs;
  const alloc = kivi.alloc;
  let allocs = 0;
  kivi.alloc = (...args) => (allocs++, alloc.apply(kivi, args)) as never;
  stagingMode.always = true;
  try {
    return fn();
  } finally {
    stagingMode.always = false;
    kivi.alloc = alloc;
    if (uploads) assert.ok(allocs > 0, "nothing was staged");
    else assert.equal(allocs, 0, "an argument mistake found after an upload");
    assert.equal(kivi.liveTensors, tensors, "staging tensors left alive");
    assert.equal(kivi._nativeRefs, refs, "native references left behind");
  }
}

function bytes(a: ArrayBufferView): Uint8Array {
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

/** Every field of two results that holds a typed array: same type and the same bytes. */
function assertSameArrays(got: object, want: object, msg: string): void {
  const keys = Object.keys(want).filter((k) =>
    ArrayBuffer.isView((want as Record<string, unknown>)[k])
  );
  assert.ok(keys.length > 0, `${msg}: no arrays to compare`);
  for (const k of keys) {
    const g = (got as Record<string, ArrayBufferView>)[k],
      w = (want as Record<string, ArrayBufferView>)[k];
    assert.ok(ArrayBuffer.isView(g), `${msg}: ${k} is not a host array`);
    assert.equal(g.constructor, w.constructor, `${msg}: ${k}`);
    assert.deepEqual(bytes(g), bytes(w), `${msg}: ${k}`);
  }
}

describe("host arrays staged through tensors (the CUDA path, run on the CPU build)", () => {
  const rng = new Rng("staging quant");
  const [rows, cols] = [192, 64];
  const inputs = (["f32", "f16", "bf16"] as const).map((dtype) =>
    randomMatrix(rng, rows, cols, dtype)
  );

  it("quantize, dequantize and stats give the direct call's bytes, for every dtype and both formats", () => {
    for (const { x, dtype } of inputs) {
      for (
        const format of [U2_G32, CB4_G64]
      ) {
        for (const axis of ["token", "channel"] as const) {
          const opts = { shape: [rows, cols] as const, dtype, axis, format };
          const want = kivi.quantize(x, opts);
          const got = staged(() => kivi.quantize(x, opts));
          const msg = `${dtype} ${format.kind} ${axis} ${rng.tag}`;
          assertSameArrays(got, want, msg);
          assertSameBits(
            staged(() => kivi.dequantize(got, { dtype: "bf16" })) as Uint16Array,
            kivi.dequantize(want, { dtype: "bf16" }) as Uint16Array,
            msg,
          );
          const st = { shape: [rows, cols] as const, dtype, axis, group: 32 as const };
          assertSameArrays(staged(() => kivi.stats(x, st)), kivi.stats(x, st), msg);
        }
      }
    }
  });

  it("fitCodebook (with its trace), quantizeWithCodebook, pack and unpack give the direct call's bytes", () => {
    const { x } = inputs[0];
    const fit = {
      shape: [rows, cols] as const,
      axis: "channel" as const,
      bits: 2 as const,
      group: 64 as const,
      trace: true,
    };
    const want = kivi.fitCodebook(x, fit);
    const got = staged(() => kivi.fitCodebook(x, fit));
    assertSameArrays(got, want, `fit ${rng.tag}`);
    assert.ok(
      got.iters instanceof Int32Array && got.inertia instanceof Float32Array,
      "the trace comes back as host arrays",
    );
    const wc = {
      shape: [rows, cols] as const,
      axis: "channel" as const,
      bits: 2 as const,
      group: 64 as const,
      assign: "interval" as const,
    };
    assertSameArrays(
      staged(() => kivi.quantizeWithCodebook(x, want.centroids, wc)),
      kivi.quantizeWithCodebook(x, want.centroids, wc),
      `codes ${rng.tag}`,
    );
    const codes = Uint8Array.from({ length: 256 }, () => rng.int(4));
    const words = staged(() => kivi.pack(codes, { bits: 2 }));
    assert.deepEqual(words, kivi.pack(codes, { bits: 2 }));
    assert.deepEqual(staged(() => kivi.unpack(words, { bits: 2 })), codes);
  });

  it("writes into the caller's out arrays, and a failed call leaves them untouched", () => {
    const { x } = inputs[0];
    const opts = {
      shape: [rows, cols] as const,
      axis: "token" as const,
      format: { kind: "uniform", bits: 4, group: 32 } as const,
    };
    const want = kivi.quantize(x, opts) as UniformQuantized<"host">;
    const out = {
      codes: new Uint32Array(want.codes.length),
      scale: new Float16Array(want.scale.length),
      zero: new Float16Array(want.zero.length),
    };
    const q = staged(() => kivi.quantize(x, { ...opts, out })) as UniformQuantized<"host">;
    assert.equal(q.codes, out.codes, "the result is the out array itself");
    assertSameArrays(out, want, `out ${rng.tag}`);

    const bad = Float32Array.from(x as Float32Array);
    bad[1234] = NaN;
    const s = {
      codes: sentinel(new Uint32Array(want.codes.length)),
      scale: sentinel(new Float16Array(want.scale.length)),
      zero: sentinel(new Float16Array(want.zero.length)),
    };
    assert.throws(
      () =>
        staged(() =>
          kivi.quantize(bad, {
            ...opts,
            out: { codes: s.codes.buf, scale: s.scale.buf, zero: s.zero.buf },
          })
        ),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE",
    );
    for (const [k, v] of Object.entries(s)) assertUntouched(v, `out.${k} after a NaN`);
    // An argument mistake is found before x is uploaded (Call.bind stages after every argument was read).
    assert.throws(
      () => staged(() => kivi.quantize(x, { ...opts, out: { codes: new Uint32Array(3) } }), false),
      TypeError,
    );
  });

  it("the cache: append and attend give the direct call's results, into a given out too", () => {
    const crng = new Rng("staging cache");
    const opts = { ...D64_R32, layers: 2, kvHeads: 2, queryHeads: 4, maxPages: 32, values: U2_G32 };
    using direct = kivi.createCache(opts);
    using viaTensors = kivi.createCache(opts);
    const a = direct.createSequence(), b = viaTensors.createSequence();
    for (const n of [150, 1, 40]) {
      const k = kvRows(crng, n, 2, 64, 2), v = kvRows(crng, n, 2, 64, 2);
      a.append(k, v);
      staged(() => b.append(k, v));
    }
    const kh = Uint16Array.from(kvRows(crng, 3, 2, 64), bf16Bits);
    a.append(kh, kh, { layer: 1, dtype: "bf16" });
    staged(() => b.append(kh, kh, { layer: 1, dtype: "bf16" }));
    for (const layer of [0, 1]) {
      assert.deepEqual(
        viaTensors.read(b, layer),
        direct.read(a, layer),
        `layer ${layer} ${crng.tag}`,
      );
      const q = kvRows(crng, 1, 4, 64);
      const want = direct.attend(layer, [a], q) as Float32Array;
      const got = staged(() => viaTensors.attend(layer, [b], q));
      assert.ok(got instanceof Float32Array, "a host q gives a host result");
      assert.deepEqual(got, want, `attend layer ${layer} ${crng.tag}`);
      const out = sentinel(new Float16Array(4 * 64));
      staged(() =>
        viaTensors.attend(layer, [b], Float16Array.from(q), { dtype: "f16", out: out.buf })
      );
      assert.deepEqual(
        out.buf,
        direct.attend(layer, [a], Float16Array.from(q), { dtype: "f16" }),
        `attend into out ${crng.tag}`,
      );
    }
  });

  it("the cache: a failed append changes nothing and frees its uploads", () => {
    const crng = new Rng("staging cache failure");
    using cache = kivi.createCache({ ...D64_R32, layers: 1, kvHeads: 2, maxPages: 4 });
    const s = cache.createSequence();
    staged(() => s.append(kvRows(crng, 40, 2, 64), kvRows(crng, 40, 2, 64)));
    const before = cache.read(s, 0), mem = cache.memory();
    const bad = kvRows(crng, 5, 2, 64);
    bad[77] = Infinity;
    assert.throws(
      () => staged(() => s.append(bad, bad)),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE",
    );
    const big = kvRows(crng, 5, 2, 64);
    big[3] = 70000;
    assert.throws(() => staged(() => s.append(big, big), false), RangeError);
    assert.throws(
      () => staged(() => s.append(kvRows(crng, 1, 2, 64), new Float32Array(7)), false),
      TypeError,
    );
    assert.deepEqual(cache.read(s, 0), before);
    assert.deepEqual(cache.memory(), mem);
  });
});
