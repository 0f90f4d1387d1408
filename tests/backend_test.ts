/**
 * Backend selection, ownership and tensors on the CPU build: openBackend's choices and reasons,
 * KIVI_LIB_PATH, disposal (`using`, idempotent, parent disposes children), host <-> tensor round
 * trips for every dtype, and quantizers on tensors matching the same calls on host arrays.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { fileURLToPath } from "node:url";
import type { Backend, DeviceTensor, TensorDType } from "../src/mod.ts";
import { defaultLibraryPath, KiviError, openBackend } from "../src/mod.ts";
import { asCodebook, asUniform, bf16Bits, BITS, DTYPES, host, openCpu } from "./_helpers.ts";
import { randomMatrix, Rng } from "./_helpers.ts";

/** Runs fn with KIVI_LIB_PATH set (or unset), restoring the caller's value after. */
async function withLibPath<T>(value: string | undefined, fn: () => Promise<T>): Promise<T> {
  const saved = process.env.KIVI_LIB_PATH;
  if (value === undefined) delete process.env.KIVI_LIB_PATH;
  else process.env.KIVI_LIB_PATH = value;
  try {
    return await fn();
  } finally {
    if (saved === undefined) delete process.env.KIVI_LIB_PATH;
    else process.env.KIVI_LIB_PATH = saved;
  }
}

describe("openBackend", () => {
  it('prefer "cpu" gives the CPU build with a reason', async () => {
    await withLibPath(undefined, async () => {
      using kivi = await openBackend({ prefer: "cpu" });
      assert.equal(kivi.kind, "cpu");
      assert.ok(kivi.reason.length > 0, "a reason");
      assert.match(kivi.deviceName, /^CPU/);
      assert.equal(kivi.device, 0);
      assert.equal(kivi.libraryPath, defaultLibraryPath("cpu"));
      assert.equal(kivi.runtime, "Bun" in globalThis ? "bun" : "deno");
      const m = kivi.memInfo();
      assert.ok(m.total > 0 && m.free >= 0 && m.free <= m.total, `memInfo ${JSON.stringify(m)}`);
      kivi.synchronizeSync();
      await kivi.synchronize();
    });
  });

  it('prefer "auto" without a CUDA device falls back to the CPU build and says why', async (t) => {
    await withLibPath(undefined, async () => {
      using kivi = await openBackend({ prefer: "auto" });
      if (kivi.kind === "cuda") {
        t.skip(`a CUDA device is present (${kivi.deviceName})`);
        return;
      }
      assert.equal(kivi.kind, "cpu");
      // the reason names the CUDA build or device that was not usable
      assert.match(kivi.reason, /cuda/i, `reason: ${kivi.reason}`);
    });
  });

  it('prefer "cuda" without a usable CUDA build or device is KIVI_ERR_NO_DEVICE saying why', async (t) => {
    await withLibPath(undefined, async () => {
      let kivi: Backend | undefined;
      try {
        kivi = await openBackend({ prefer: "cuda" });
      } catch (e) {
        assert.ok(e instanceof KiviError, `${e}`);
        assert.equal(e.code, "KIVI_ERR_NO_DEVICE");
        assert.match(e.message, /the CUDA build is unusable: \S/);
        return;
      }
      t.skip(`a CUDA device is present (${kivi.deviceName})`);
      kivi.dispose();
    });
  });

  it("KIVI_LIB_PATH naming a missing file is a clear error naming the variable and the path", async () => {
    const missing = "/nonexistent/dir/libkivi_missing.so";
    await withLibPath(missing, async () => {
      for (const prefer of ["auto", "cpu"] as const) {
        await assert.rejects(openBackend({ prefer }), (e: unknown) => {
          assert.ok(e instanceof TypeError, `${e}`);
          assert.match((e as Error).message, /KIVI_LIB_PATH/);
          assert.ok((e as Error).message.includes(missing), (e as Error).message);
          assert.match((e as Error).message, /no such file/);
          return true;
        });
      }
    });
  });

  it("KIVI_LIB_PATH naming a file that is not a library is an error naming the file", async () => {
    const notLib = fileURLToPath(new URL("../cuda/include/kivi.h", import.meta.url));
    await withLibPath(notLib, async () => {
      await assert.rejects(openBackend(), (e: unknown) => {
        assert.ok(e instanceof Error);
        assert.ok(e.message.includes(notLib), e.message);
        return true;
      });
    });
  });

  it("KIVI_LIB_PATH naming the CPU build loads it and says so", async () => {
    await withLibPath(defaultLibraryPath("cpu"), async () => {
      using kivi = await openBackend();
      assert.equal(kivi.kind, "cpu");
      assert.match(kivi.reason, /KIVI_LIB_PATH/);
    });
  });

  it("rejects bad options with a RangeError naming them", async () => {
    await assert.rejects(
      openBackend({ prefer: "gpu" as "cuda" }),
      (e: unknown) => e instanceof RangeError && /prefer/.test(e.message),
    );
    await assert.rejects(
      openBackend({ prefer: "cpu", device: -1 }),
      (e: unknown) => e instanceof RangeError && /device/.test(e.message),
    );
    await assert.rejects(
      openBackend({ prefer: "cpu", device: 1 }),
      (e: unknown) => e instanceof KiviError && e.code === "KIVI_ERR_NO_DEVICE",
    );
  });
});

describe("ownership", () => {
  it("`using` disposes the backend at the end of the block", async () => {
    let seen: Backend | undefined;
    {
      using kivi = await openCpu();
      seen = kivi;
      assert.equal(kivi.disposed, false);
    }
    assert.equal(seen.disposed, true);
    assert.throws(
      () => seen!.memInfo(),
      (e: unknown) => e instanceof KiviError && e.code === "KIVI_ERR_STATE",
    );
  });

  it("dispose is idempotent for backends and tensors", async () => {
    const kivi = await openCpu();
    const t = kivi.upload(new Float32Array([1, 2, 3]));
    t.dispose();
    t.dispose();
    assert.equal(t.disposed, true);
    kivi.dispose();
    kivi.dispose();
    kivi[Symbol.dispose]();
    assert.equal(kivi.disposed, true);
  });

  it("backend.dispose() disposes its live tensors", async () => {
    const kivi = await openCpu();
    const a = kivi.upload(new Float32Array(64).fill(1.25), { shape: [2, 32] });
    const b = kivi.alloc([128], "u8");
    const c = kivi.upload(new Float16Array(8).fill(3));
    c.dispose();
    assert.equal(kivi.liveTensors, 2);
    kivi.dispose();
    assert.equal(a.disposed, true);
    assert.equal(b.disposed, true);
    assert.throws(
      () => a.readSync(),
      (e: unknown) => e instanceof KiviError && e.code === "KIVI_ERR_STATE",
    );
  });

  it("`using` disposes a tensor and the backend forgets it", async () => {
    using kivi = await openCpu();
    let seen: DeviceTensor | undefined;
    {
      using t = kivi.alloc([4, 8], "f32");
      seen = t;
      assert.equal(kivi.liveTensors, 1);
    }
    assert.equal(seen.disposed, true);
    assert.equal(kivi.liveTensors, 0);
  });

  // FinalizationRegistry safety net: needs a run with --expose-gc; for a later suite.
  it("tensors, caches and decode batches dropped without dispose are freed by their finalizers", async () => {
    const g = globalThis as { Bun?: { gc(force: boolean): void }; gc?: () => void };
    const collect = () => (g.Bun ? g.Bun.gc(true) : g.gc?.());
    if (!g.Bun && !g.gc) {
      assert.fail("run with --expose-gc (deno test --v8-flags=--expose-gc), as npm test does");
    }
    using kivi = await openCpu();
    (() => {
      for (let i = 0; i < 200; i++) kivi.upload(new Float32Array(1024).fill(i));
      for (let i = 0; i < 5; i++) {
        kivi.createCache({ layers: 1, kvHeads: 1, headDim: 64, maxPages: 2, maxSequences: 1 });
      }
      // decode batches over a cache and tensors that are dropped with them
      const cache = kivi.createCache({
        layers: 1,
        kvHeads: 1,
        headDim: 64,
        maxPages: 2,
        maxSequences: 1,
      });
      const seq = cache.createSequence();
      seq.append(new Float32Array(64).fill(0.5), new Float32Array(64).fill(0.25));
      const q = kivi.upload(new Float32Array(64).fill(1)), out = kivi.alloc([64], "f32");
      for (let i = 0; i < 5; i++) cache.batch([seq], { q, out }).attend(0);
    })();
    assert.equal(kivi._nativeRefs, 1 + 205 + 1 + 2 + 5);
    // Finalizers run some time after a collection: collect and yield until they have, or give up.
    for (let i = 0; i < 200 && kivi._nativeRefs > 1; i++) {
      collect();
      await new Promise((r) => setTimeout(r, 5));
    }
    assert.equal(
      kivi._nativeRefs,
      1,
      "every dropped tensor, cache and batch was freed by its finalizer",
    );
  });
});

describe("tensors", () => {
  const cases: [TensorDType, () => ArrayBufferView & { length: number }][] = [
    ["f32", () => new Float32Array([1.5, -2.25, 3e-8, 65504, -0.0])],
    ["f16", () => new Float16Array([1.5, -2.25, 6e-8, 65504, -0.0])],
    ["bf16", () => Uint16Array.from([1.5, -2.25, 3e-8, 1e38, -7], bf16Bits)],
    ["u32", () => new Uint32Array([0, 1, 0xdeadbeef, 0xffffffff, 7])],
    ["u16", () => new Uint16Array([0, 1, 0xbeef, 0xffff, 7])],
    ["u8", () => new Uint8Array([0, 1, 0x7f, 0xff, 7])],
    ["i32", () => new Int32Array([0, -1, 2 ** 31 - 1, -(2 ** 31), 7])],
  ];
  for (const [dtype, make] of cases) {
    it(`${dtype}: upload, read, readSync and write round-trip bit-exactly`, async () => {
      using kivi = await openCpu();
      const data = make();
      using t = kivi.upload(data as Float32Array, { dtype, shape: [data.length] });
      assert.equal(t.dtype, dtype);
      assert.equal(t.length, data.length);
      assert.deepEqual(t.shape, [data.length]);
      const bytes = (
        a: ArrayBufferView,
      ) => [...new Uint8Array(a.buffer, a.byteOffset, a.byteLength)];
      assert.equal(t.bytes, data.byteLength);
      const s = t.readSync();
      assert.equal(s.constructor, data.constructor);
      assert.deepEqual(bytes(s), bytes(data));
      assert.deepEqual(bytes(await t.read()), bytes(data));
      const rev = (data as Uint8Array).slice().reverse();
      t.write(rev as never);
      assert.deepEqual(bytes(t.readSync()), bytes(rev));
      assert.throws(
        () => t.write((data as Uint8Array).subarray(1) as never),
        TypeError,
        "write of a wrong length",
      );
    });
  }

  it("upload keeps a multi-dimensional shape; alloc rejects bad shapes", async () => {
    using kivi = await openCpu();
    using t = kivi.upload(new Float32Array(2 * 3 * 4), { shape: [2, 3, 4] });
    assert.deepEqual(t.shape, [2, 3, 4]);
    assert.throws(() => kivi.upload(new Float32Array(5), { shape: [2, 3] }), TypeError);
    assert.throws(() => kivi.alloc([2, 0], "f32"), RangeError);
    assert.throws(() => kivi.alloc([2.5], "f32"), RangeError);
    assert.throws(() => kivi.alloc([], "f32"), TypeError);
    assert.throws(() => kivi.alloc([4], "f64" as "f32"), RangeError);
    assert.equal(kivi.liveTensors, 1, "failed uploads leave no tensor behind");
  });

  for (const dtype of DTYPES) {
    it(`${dtype}: quantizers on tensors give the same results as on host arrays`, async () => {
      using kivi = await openCpu();
      for (const bits of BITS) {
        for (const [axis, rows, cols] of [["token", 96, 40], ["channel", 3, 128]] as const) {
          const rng = new Rng(`tensor ${dtype} ${bits} ${axis}`);
          const inp = randomMatrix(rng, rows, cols, dtype);
          const shape = [rows, cols] as [number, number];
          using xt = kivi.upload(inp.x, { shape, dtype }) as DeviceTensor<"f32">;

          const uh = asUniform(
            kivi.quantize(inp.x, { shape, dtype, axis, format: { kind: "uniform", bits } }),
          );
          const ut = asUniform(kivi.quantize(xt, { axis, format: { kind: "uniform", bits } }));
          assert.deepEqual([...ut.codes.readSync()], [...uh.codes], `uniform codes ${rng.tag}`);
          assert.deepEqual([...ut.scale.readSync()], [...uh.scale], `uniform scale ${rng.tag}`);
          assert.deepEqual([...ut.zero.readSync()], [...uh.zero], `uniform zero ${rng.tag}`);
          using ud = kivi.dequantize(ut) as DeviceTensor<"f32">;
          assert.deepEqual(
            [...ud.readSync()],
            [...host(kivi.dequantize(uh))],
            `uniform values ${rng.tag}`,
          );

          const ch = asCodebook(
            kivi.quantize(inp.x, {
              shape,
              dtype,
              axis,
              format: { kind: "codebook", bits, fit: "pinned" },
            }),
          );
          const ct = asCodebook(
            kivi.quantize(xt, { axis, format: { kind: "codebook", bits, fit: "pinned" } }),
          );
          assert.deepEqual([...ct.codes.readSync()], [...ch.codes], `codebook codes ${rng.tag}`);
          assert.deepEqual(
            [...ct.centroids.readSync()],
            [...ch.centroids],
            `codebook centroids ${rng.tag}`,
          );

          const sh = kivi.stats(inp.x, { shape, dtype, axis });
          const st = kivi.stats(xt, { axis });
          assert.deepEqual([...st.stats.readSync()], [...sh.stats], `stats ${rng.tag}`);
          for (
            const tt of [
              ut.codes,
              ut.scale,
              ut.zero,
              ct.codes,
              ct.centroids,
              st.stats,
              st.nonfinite,
            ]
          ) tt.dispose();
        }
      }
    });
  }

  it("a tensor of rank 3 is read as [prod(leading), last]", async () => {
    using kivi = await openCpu();
    const rng = new Rng("tensor rank 3");
    const inp = randomMatrix(rng, 96, 64, "f16");
    using xt = kivi.upload(inp.x, { shape: [2, 48, 64] }) as DeviceTensor<"f16">;
    const qt = asUniform(
      kivi.quantize(xt, { axis: "token", format: { kind: "uniform", bits: 2 } }),
    );
    assert.deepEqual(qt.shape, [96, 64]);
    const qh = asUniform(
      kivi.quantize(inp.x, {
        shape: [96, 64],
        axis: "token",
        format: { kind: "uniform", bits: 2 },
      }),
    );
    assert.deepEqual([...qt.codes.readSync()], [...qh.codes], rng.tag);
  });

  it("time() and copyBandwidth() report positive figures on the CPU", async () => {
    using kivi = await openCpu();
    const ms = kivi.time(() => kivi.pack(new Uint8Array(1 << 16), { bits: 2 }));
    assert.ok(ms >= 0 && Number.isFinite(ms), `ms ${ms}`);
    const gbps = kivi.copyBandwidth(1 << 20, 2);
    assert.ok(gbps > 0 && Number.isFinite(gbps), `GB/s ${gbps}`);
  });
});
