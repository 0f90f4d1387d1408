/**
 * CUDA quantizers against the CPU reference on seeded random data of awkward sizes: uniform codes
 * and params bit for bit, codebook centroids within a stated bound, statistics within float
 * rounding, pack/unpack, non-finite input rejected, CUDA failures surfacing as KiviError, and host
 * arrays taken (copied to the device, results copied back) with the tensor path's results.
 */
import { it } from "node:test";
import assert from "node:assert/strict";
import type { Axis, Backend, Bits, CodebookQuantized, DeviceTensor } from "../src/mod.ts";
import type { GroupSize, UniformQuantized } from "../src/mod.ts";
import { KiviError } from "../src/mod.ts";
import { assertSameBits, DTYPES, randomMatrix, Rng } from "./_helpers.ts";
import { cpu, gpuDescribe } from "./_gpu.ts";

type Case = [Axis, number, number, GroupSize];
/** [rows, cols, group] per axis: awkward sizes and large ones. */
const SHAPES: Record<Axis, [number, number, GroupSize][]> = {
  token: [[96, 40, 32], [4096, 128, 64], [256, 4096, 128], [32, 1, 32]],
  channel: [[5, 64, 32], [17, 128, 64], [1000, 4096, 128], [1, 32, 32]],
};
const CASES: Case[] = (["token", "channel"] as const).flatMap((a) =>
  SHAPES[a].map(([r, c, g]): Case => [a, r, c, g])
);

function up(
  g: Backend,
  x: Float32Array | Float16Array | Uint16Array,
  dtype: "f32" | "f16" | "bf16",
  rows: number,
  cols: number,
): DeviceTensor {
  return g.upload(x, { shape: [rows, cols], dtype });
}

function firstDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) return -2;
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return i;
  return -1;
}

/** A device fp16 result holds the same bits as the host's. */
async function sameHalves(got: DeviceTensor, want: Float16Array, what: string): Promise<void> {
  const bits = new Uint16Array((await got.read()).buffer);
  assert.equal(firstDiff(bits, new Uint16Array(want.buffer)), -1, what);
}

gpuDescribe("CUDA uniform quantize and dequantize equal the CPU reference bit for bit", (g) => {
  for (const bits of [2, 4] as Bits[]) {
    for (const [axis, rows, cols, group] of CASES) {
      it(`${bits} bits, ${axis} [${rows} x ${cols}] G${group}, every dtype`, async () => {
        for (const dtype of DTYPES) {
          const rng = new Rng(`gpu uniform ${bits} ${axis} ${rows}x${cols} ${dtype}`);
          const inp = randomMatrix(rng, rows, cols, dtype);
          const format = { kind: "uniform", bits, group } as const;
          const want = cpu.quantize(inp.x, {
            shape: [rows, cols],
            dtype,
            axis,
            format,
          }) as UniformQuantized<"host">;
          using x = up(g, inp.x, dtype, rows, cols);
          const got = g.quantize(x, { axis, format }) as UniformQuantized<"device">;
          assert.equal(firstDiff(await got.codes.read(), want.codes), -1, `codes ${rng.tag}`);
          await sameHalves(got.scale, want.scale, `scale ${rng.tag}`);
          await sameHalves(got.zero, want.zero, `zero ${rng.tag}`);
          for (const od of DTYPES) {
            const back = g.dequantize(got, { dtype: od }) as DeviceTensor;
            const ref = cpu.dequantize(want, { dtype: od });
            assert.equal(
              firstDiff(await back.read(), ref as ArrayLike<number>),
              -1,
              `dequantize to ${od} ${rng.tag}`,
            );
            back.dispose();
          }
          for (const t of [got.codes, got.scale, got.zero]) t.dispose();
        }
      });
    }
  }
});

gpuDescribe("CUDA codebook fit and encode agree with the CPU reference", (g) => {
  for (const bits of [2, 4] as Bits[]) {
    for (const fit of ["free", "pinned"] as const) {
      for (const [axis, rows, cols, group] of CASES.slice(0, 6)) {
        it(`${bits} bits ${fit}, ${axis} [${rows} x ${cols}] G${group}`, async () => {
          const rng = new Rng(`gpu codebook ${bits} ${fit} ${axis} ${rows}x${cols}`);
          const inp = randomMatrix(rng, rows, cols, "f32");
          const format = { kind: "codebook", bits, group, fit, iterations: 16 } as const;
          const want = cpu.quantize(inp.x, {
            shape: [rows, cols],
            axis,
            format,
          }) as CodebookQuantized<"host">;
          using x = up(g, inp.x, "f32", rows, cols);
          const got = g.quantize(x, { axis, format }) as CodebookQuantized<"device">;
          const gc = await got.centroids.read(), wc = want.centroids;
          const n = 1 << bits;
          // Both builds run the same Lloyd iterations in fp32; only the order of the fp32 sums in a
          // cluster mean differs, by at most G * 2^-24 * (max - min) per update. That can flip an
          // assignment of a value within that distance of a midpoint, and a flipped assignment can
          // move a centroid further. Bound: 1e-3 of the group's range plus one fp16 ulp of the
          // centroid; observed differences are far smaller.
          let maxRel = 0;
          for (let gi = 0; gi < want.groups; gi++) {
            const lo = wc[gi * n], hi = wc[gi * n + n - 1];
            const range = Math.max(hi - lo, 1e-30);
            for (let k = 0; k < n; k++) {
              const a = gc[gi * n + k], b = wc[gi * n + k];
              const ulp = Math.abs(b) * 2 ** -10 + 2 ** -24;
              const d = Math.abs(a - b);
              maxRel = Math.max(maxRel, d / range);
              assert.ok(
                d <= 1e-3 * range + ulp,
                `group ${gi} centroid ${k}: ${a} vs ${b} ${rng.tag}`,
              );
            }
          }
          // Codes: dequantized values may differ only by the centroid difference above or where
          // the value sits within that bound of a decision boundary.
          const gd = await (g.dequantize(got) as DeviceTensor<"f32">).read();
          const wd = cpu.dequantize(want) as Float32Array;
          let differ = 0;
          for (let i = 0; i < wd.length; i++) {
            if (Math.abs(gd[i] - wd[i]) > 2e-3 * Math.abs(wd[i]) + 1e-6) differ++;
          }
          assert.ok(
            differ <= wd.length * 1e-3,
            `${differ} of ${wd.length} values differ beyond the centroid bound ${rng.tag}`,
          );
          got.codes.dispose();
          got.centroids.dispose();
          console.log(
            `  max centroid difference ${
              (maxRel * 100).toExponential(2)
            }% of the group range; ${differ} codes differ`,
          );
        });
      }
    }
  }
});

gpuDescribe("CUDA block statistics and pack/unpack", (g) => {
  it("statistics within float rounding of the CPU, non-finite values counted", async () => {
    for (const [axis, rows, cols, group] of CASES) {
      const rng = new Rng(`gpu stats ${axis} ${rows}x${cols}`);
      const inp = randomMatrix(rng, rows, cols, "f32");
      const x = inp.x as Float32Array;
      x[rng.int(x.length)] = NaN;
      x[rng.int(x.length)] = Infinity;
      const want = cpu.stats(x, { shape: [rows, cols], axis, group });
      using t = g.upload(x, { shape: [rows, cols] });
      const got = g.stats(t, { axis, group });
      assert.deepEqual(await got.nonfinite.read(), want.nonfinite, `nonfinite ${rng.tag}`);
      const gs = await got.stats.read();
      for (let i = 0; i < gs.length; i++) {
        const w = want.stats[i];
        const base = i - (i % 4);
        const mag = Math.max(Math.abs(want.stats[base]), Math.abs(want.stats[base + 1]));
        // min and max are exact. The mean is an fp32 sum of <= 128 terms against the CPU's double
        // sum: |err| <= 128 * 2^-24 * mag (plus the final rounding); the variance, a mean of squared
        // deviations bounded by (2 mag)^2, likewise with (2 mag)^2 in place of mag.
        const tol = i % 4 < 2
          ? 0
          : i % 4 === 2
          ? 130 * 2 ** -24 * mag
          : 130 * 2 ** -24 * (2 * mag) ** 2 * 2;
        assert.ok(Math.abs(gs[i] - w) <= tol + 1e-30, `stats[${i}] ${gs[i]} vs ${w} ${rng.tag}`);
      }
      got.stats.dispose();
      got.nonfinite.dispose();
    }
  });

  it("pack and unpack equal the CPU at 2 and 4 bits, bad codes rejected", async () => {
    for (const bits of [2, 4] as Bits[]) {
      const rng = new Rng(`gpu pack ${bits}`);
      const codes = Uint8Array.from({ length: 16 * 1000 }, () => rng.int(1 << bits));
      using t = g.upload(codes);
      const words = g.pack(t, { bits });
      assert.deepEqual(await words.read(), cpu.pack(codes, { bits }));
      const back = g.unpack(words, { bits });
      assert.deepEqual(await back.read(), codes);
      codes[77] = 1 << bits;
      using bad = g.upload(codes);
      using out = g.upload(new Uint32Array(codes.length / (32 / bits)).fill(0xdeadbeef));
      assert.throws(
        () => g.pack(bad, { bits, out }),
        (e) => e instanceof KiviError && e.code === "KIVI_ERR_ARG",
      );
      assert.ok((await out.read()).every((w) => w === 0xdeadbeef), "out untouched");
      words.dispose();
      back.dispose();
    }
  });
});

gpuDescribe("CUDA errors come back as KiviError and the backend keeps working", (g) => {
  it("a NaN in x is rejected before anything is written", async () => {
    const rng = new Rng("gpu nan");
    const inp = randomMatrix(rng, 64, 128, "f16");
    (inp.x as Float16Array)[1234] = NaN;
    using x = g.upload(inp.x, { shape: [64, 128] });
    using codes = g.upload(new Uint32Array(64 * 128 / 16).fill(7));
    assert.throws(
      () => g.quantize(x, { axis: "token", format: { kind: "uniform", bits: 2 }, out: { codes } }),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE" && /\bx\b/.test(e.message),
    );
    assert.ok((await codes.read()).every((w) => w === 7));
  });

  it("an allocation larger than the card fails with CUDA's message, then work goes on", async () => {
    const { total } = g.memInfo();
    assert.throws(
      () => g.alloc([total * 4], "u8"),
      (e) =>
        e instanceof KiviError && (e.code === "KIVI_ERR_NOMEM" || e.code === "KIVI_ERR_CUDA") &&
        /memory/i.test(e.message),
    );
    using t = g.upload(new Float32Array([1, 2, 3, 4]));
    assert.deepEqual(await t.read(), new Float32Array([1, 2, 3, 4]));
    console.log(`  device: ${g.deviceName}, ${(total / 2 ** 30).toFixed(1)} GiB`);
  });
});

gpuDescribe("CUDA quantizers take host arrays: copied to the device and the results back", (g) => {
  /** The tensor path's result of the same call, read back to host arrays field by field. */
  async function readAll(r: object): Promise<Record<string, unknown>> {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(r)) {
      out[k] = v !== null && typeof v === "object" && "read" in v
        ? await (v as DeviceTensor).read()
        : v;
      if (v !== null && typeof v === "object" && "read" in v) (v as DeviceTensor).dispose();
    }
    return out;
  }

  it("every quantizer gives the tensor path's bytes as host arrays, and leaves no tensor behind", async () => {
    const rng = new Rng("gpu host arrays");
    const [rows, cols] = [160, 96];
    const live = g.liveTensors;
    for (const dtype of DTYPES) {
      const inp = randomMatrix(rng, rows, cols, dtype);
      using x = up(g, inp.x, dtype, rows, cols);
      const cent = new Float16Array(((rows * cols) / 32) * 4).map((_, i) =>
        (i % 4) - 1.5 + rng.uniform(-0.4, 0.4)
      );
      using ct = g.upload(cent);
      // each call made on the host array (with its shape and dtype) and on the tensor
      type Call = (x: unknown, o: Record<string, unknown>) => object;
      const both = (call: Call, o: Record<string, unknown>) =>
        [() => call(inp.x, { shape: [rows, cols], dtype, ...o }), () => call(x, o)] as const;
      const quantize: Call = (v, o) => g.quantize(v as never, o as never);
      const fit: Call = (v, o) => g.fitCodebook(v as never, o as never);
      const stats: Call = (v, o) => g.stats(v as never, o as never);
      // the centroids where x lives: the host array's for it, the tensor's for the tensor
      const given: Call = (v, o) =>
        g.quantizeWithCodebook(v as never, (v === inp.x ? cent : ct) as never, o as never);
      const calls: [string, () => object, () => object][] = [
        ["uniform", ...both(quantize, { axis: "token", format: { kind: "uniform", bits: 2 } })],
        [
          "codebook",
          ...both(quantize, { axis: "channel", format: { kind: "codebook", bits: 4, group: 32 } }),
        ],
        ["stats", ...both(stats, { axis: "token", group: 32 })],
        ["fit", ...both(fit, { axis: "token", bits: 2, trace: true })],
        ["given centroids", ...both(given, { axis: "channel", bits: 2 })],
      ];
      for (const [name, viaHost, viaTensor] of calls) {
        const got = viaHost() as Record<string, unknown>;
        const want = await readAll(viaTensor());
        for (const [k, w] of Object.entries(want)) {
          if (!ArrayBuffer.isView(w)) continue;
          assert.ok(ArrayBuffer.isView(got[k]), `${name}.${k} is a host array`);
          assertSameBits(got[k] as Uint8Array, w as Uint8Array, `${name}.${k} ${dtype} ${rng.tag}`);
        }
      }
      // Uniform codes equal the CPU's bit for bit, through host arrays as through tensors.
      const opts = {
        shape: [rows, cols],
        dtype,
        axis: "token",
        format: { kind: "uniform", bits: 2 },
      };
      const want = cpu.quantize(inp.x, opts as never) as UniformQuantized<"host">;
      const got = g.quantize(inp.x, opts as never) as UniformQuantized<"host">;
      assertSameBits(got.codes, want.codes, `codes vs CPU ${rng.tag}`);
      assertSameBits(
        g.dequantize(got, { dtype: "f16" }) as Float16Array,
        cpu.dequantize(want, { dtype: "f16" }) as Float16Array,
        `dequantize vs CPU ${rng.tag}`,
      );
    }
    const codes = Uint8Array.from({ length: 16 * 300 }, () => rng.int(4));
    const words = g.pack(codes, { bits: 2 });
    assert.deepEqual(words, cpu.pack(codes, { bits: 2 }));
    assert.deepEqual(g.unpack(words, { bits: 2 }), codes);
    assert.equal(g.liveTensors, live, "staging tensors freed");
  });

  it("writes into host out arrays; a NaN leaves them untouched", () => {
    const rng = new Rng("gpu host out");
    const inp = randomMatrix(rng, 64, 128, "f32");
    const want = cpu.quantize(inp.x, {
      shape: [64, 128],
      axis: "channel",
      format: { kind: "uniform", bits: 4 },
    }) as UniformQuantized<"host">;
    const out = {
      codes: new Uint32Array(want.codes.length),
      scale: new Float16Array(want.scale.length),
      zero: new Float16Array(want.zero.length),
    };
    g.quantize(inp.x, {
      shape: [64, 128],
      axis: "channel",
      format: { kind: "uniform", bits: 4 },
      out,
    });
    assertSameBits(out.codes, want.codes, `out.codes ${rng.tag}`);
    assertSameBits(out.scale, want.scale, `out.scale ${rng.tag}`);
    (inp.x as Float32Array)[99] = NaN;
    const codes = new Uint32Array(want.codes.length).fill(7);
    assert.throws(
      () =>
        g.quantize(inp.x, {
          shape: [64, 128],
          axis: "channel",
          format: { kind: "uniform", bits: 4 },
          out: { codes },
        }),
      (e) => e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE",
    );
    assert.ok(codes.every((w) => w === 7), "out.codes untouched");
  });
});
