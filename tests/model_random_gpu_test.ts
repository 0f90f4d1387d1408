/**
 * The end-to-end bench's CUDA pieces against the CPU build: the seeded fill (the same bits: integer
 * hash, one fmaf, the same fp16 rounding), the fp16 tensor-core matmul (cublasGemmEx), the deep copy
 * of a sequence, and a random model's forward. Skipped visibly without a device.
 *
 * Tolerance of GemmEx against the CPU's f16 path: both multiply the same fp16 x and W exactly and
 * sum in f32, in different orders (cuBLAS's tiles against the C loops): |difference| <= 2 k 2^-24
 * sum |x_i w_i|.
 */
import { it } from "node:test";
import assert from "node:assert/strict";
import type { Backend, RandomModelConfig } from "../src/mod.ts";
import { ModelOps } from "../src/model/_ops.ts";
import { cpu, gpuDescribe } from "./_gpu.ts";
import { f16, Rng } from "./_helpers.ts";

function fill(b: Backend, n: number, seed: number, mean: number, std: number): Uint16Array {
  using t = b.alloc([n], "f16");
  new ModelOps(b).fillNormal(t, n, seed, mean, std);
  const x = t.readSync() as Float16Array;
  return new Uint16Array(x.buffer, x.byteOffset, x.length);
}

gpuDescribe("end-to-end bench pieces on CUDA", (gpu) => {
  it("kivi_model_fill_normal writes the CPU build's bits", () => {
    for (
      const [n, seed, mean, std] of [[1_000_003, 0, 0, 1], [77_777, 2 ** 32 - 1, 1, 0.02], [
        4096,
        9,
        -2,
        3,
      ]]
    ) {
      const g = fill(gpu, n, seed, mean, std), c = fill(cpu, n, seed, mean, std);
      let diff = 0;
      for (let i = 0; i < n; i++) diff += g[i] !== c[i] ? 1 : 0;
      assert.equal(
        diff,
        0,
        `${diff} of ${n} elements differ (seed ${seed}, mean ${mean}, std ${std})`,
      );
    }
  });

  it("kivi_model_linear_f16 (cublasGemmEx) agrees with the CPU's f16 path within 2 k 2^-24 sum |x w|", () => {
    const rng = new Rng("gemm ex");
    const shapes: [number, number, number, boolean][] = [
      [1, 4096, 4096, false],
      [8, 1031, 4096, true],
      [37, 128, 14336, false],
    ];
    for (const [rows, n, k, acc] of shapes) {
      const x = Float32Array.from({ length: rows * k }, () => rng.normal());
      const w = Float16Array.from({ length: n * k }, () => rng.normal() * 0.02);
      const y0 = Float32Array.from({ length: rows * n }, () => rng.normal());
      const run = (b: Backend) => {
        using tx = b.upload(x, { shape: [rows, k] }), tw = b.upload(w, { shape: [n, k] });
        using ty = b.upload(y0, { shape: [rows, n] });
        new ModelOps(b).linearF16(tx, tw, rows, n, k, ty, acc);
        return ty.readSync() as Float32Array;
      };
      const g = run(gpu), c = run(cpu);
      let worst = 0;
      for (let r = 0; r < rows; r++) {
        for (let j = 0; j < n; j += 7) {
          let mag = acc ? Math.abs(y0[r * n + j]) : 0;
          for (let i = 0; i < k; i++) mag += Math.abs(f16(x[r * k + i]) * w[j * k + i]);
          const d = Math.abs(g[r * n + j] - c[r * n + j]);
          worst = Math.max(worst, d / mag);
          assert.ok(
            d <= 2 * k * 2 ** -24 * mag + 1e-30,
            `${rows}x${n}x${k} [${r}][${j}]: ${g[r * n + j]} vs ${c[r * n + j]} ${rng.tag}`,
          );
        }
      }
      console.log(
        `GemmEx ${rows}x${n}x${k}: worst |CUDA - CPU| / sum |x w| = ${worst.toExponential(2)}`,
      );
    }
  });

  it("a sequence copy reads back and attends like its source, on CUDA as on the CPU", () => {
    const rng = new Rng("copy on cuda");
    for (const f of [{ keys: { bits: 16 }, values: { bits: 16 } }, {}] as const) {
      const T = 333, row = 8 * 128;
      const k = Float32Array.from(
        { length: 2 * T * row },
        (_, i) => rng.normal() * (i % 128 === 3 ? 8 : 1),
      );
      const v = Float32Array.from({ length: 2 * T * row }, () => rng.normal());
      const q1 = Array.from({ length: 32 * 128 }, () => rng.normal());
      const q = Float32Array.from([...q1, ...q1]); // the same query for the source and its copy
      const run = (b: Backend) => {
        using cache = b.createCache({
          layers: 2,
          kvHeads: 8,
          queryHeads: 32,
          headDim: 128,
          maxPages: 64,
          ...f,
        });
        const s = cache.createSequence();
        s.append(k, v);
        const c = cache._copySequence(s);
        const host = (x: unknown): Float32Array => {
          if (x instanceof Float32Array) return x;
          const t = x as { readSync(): Float32Array; dispose(): void };
          const h = t.readSync();
          t.dispose();
          return h;
        };
        for (const l of [0, 1]) {
          const a = cache.read(s, l), b2 = cache.read(c, l);
          assert.deepEqual(host(b2.keys), host(a.keys), `${b.kind} layer ${l} keys`);
          assert.deepEqual(host(b2.values), host(a.values), `${b.kind} layer ${l} values`);
        }
        using tq = b.upload(q, { shape: [2, 32, 128] });
        const out = cache.attend(1, [s, c], b.kind === "cuda" ? tq : q);
        const o = host(out);
        return o;
      };
      const g = run(gpu), c = run(cpu);
      let worst = 0;
      for (let i = 0; i < g.length; i++) worst = Math.max(worst, Math.abs(g[i] - c[i]));
      assert.ok(worst < 2e-3, `${JSON.stringify(f)}: worst |CUDA - CPU| attention ${worst}`);
      // the copy's heads (second half) against the source's, on CUDA
      let self = 0;
      for (let i = 0; i < g.length / 2; i++) {
        self = Math.max(self, Math.abs(g[i] - g[i + g.length / 2]));
      }
      assert.ok(self < 1e-6, `${JSON.stringify(f)}: copy vs source on CUDA ${self}`);
    }
  });

  it("a random model's forward (f16 matmul) agrees with the CPU build within 2e-3 (1 + |log p|)", () => {
    const config: RandomModelConfig = {
      vocab: 1000,
      hidden: 512,
      layers: 3,
      heads: 8,
      kvHeads: 2,
      headDim: 64,
      intermediate: 1408,
      context: 256,
    };
    using mg = gpu.randomModel(config, { seed: 11 }), mc = cpu.randomModel(config, { seed: 11 });
    const ids = [Int32Array.from({ length: 40 }, (_, i) => (i * 131) % config.vocab)];
    const a = mg.teacherForced(ids), b = mc.teacherForced(ids);
    let w = 0;
    for (let i = 0; i < a.length; i++) {
      w = Math.max(w, Math.abs(a[i] - b[i]) / (1 + Math.abs(b[i])));
    }
    console.log(`random model: worst |CUDA - CPU| / (1 + |log p|) = ${w.toExponential(3)}`);
    assert.ok(w < 2e-3, `${w}`);
  });
});
