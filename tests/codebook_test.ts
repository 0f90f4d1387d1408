/**
 * Codebook format on the CPU reference: the k-means fit (trace, iteration count, sorted fp16
 * centroids, pinned ends), its error against the uniform format at the same bits and group,
 * nearest and interval assignment against float64 oracles, and the seed's worked example.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { Axis, Backend, Fit, GroupSize } from "../src/mod.ts";
import type { DataDType } from "./_helpers.ts";
import { asCodebook, asUniform, bf16Bits, BITS, codesOf, DTYPES, f16 } from "./_helpers.ts";
import { groupCount, groupMaxAbs, groupMembers, groupSse, host } from "./_helpers.ts";
import { intervalOracle, nearestOracle, nearMidpoint, openCpu, randomMatrix } from "./_helpers.ts";
import { Rng, toInput, U32 } from "./_helpers.ts";

type Case = [axis: Axis, rows: number, cols: number, group: GroupSize];
/** [rows, cols, group] per axis, awkward on purpose. */
const SHAPES: Record<Axis, [number, number, GroupSize][]> = {
  token: [[96, 40, 32], [160, 128, 32], [4096, 40, 64], [256, 40, 128]],
  channel: [[1, 64, 32], [3, 128, 64], [17, 256, 128], [3, 640, 128]],
};
const CASES: Case[] = (["token", "channel"] as const).flatMap((a) =>
  SHAPES[a].map(([r, c, g]): Case => [a, r, c, g])
);
const FITS: readonly Fit[] = ["free", "pinned"];

/** Sorted random fp16 centroids per group, inside and a little beyond the data's range, with a
 * duplicate now and then (allowed: "ascending" is non-strict). */
function randomCentroids(rng: Rng, groups: number, bits: number): Float16Array {
  const n = 1 << bits;
  const res = new Float16Array(groups * n);
  for (let g = 0; g < groups; g++) {
    const c = Array.from({ length: n }, () => rng.uniform(-4, 4)).sort((a, b) => a - b);
    if (rng.next() < 0.2) c[1] = c[2];
    const h = Float16Array.from(c).sort();
    res.set(h, g * n);
  }
  return res;
}

describe("codebook fit", () => {
  for (const fit of FITS) {
    for (const bits of BITS) {
      it(`${fit}, ${bits} bits: inertia never increases, 1 <= iters <= cap, sorted centroids`, async () => {
        using kivi = await openCpu();
        for (const [axis, rows, cols, group] of CASES) {
          for (const cap of [16, 3]) {
            const dtype = DTYPES[(rows + cols + cap) % 3];
            const rng = new Rng(
              `fit ${fit} ${bits} ${axis} ${rows}x${cols} G${group} cap ${cap} ${dtype}`,
            );
            const inp = randomMatrix(rng, rows, cols, dtype);
            const r = kivi.fitCodebook(inp.x, {
              shape: [rows, cols],
              dtype,
              axis,
              bits,
              group,
              fit,
              iterations: cap,
              trace: true,
            });
            const groups = groupCount(rows, cols, axis, group);
            const n = 1 << bits;
            assert.equal(r.groups, groups);
            const cent = host(r.centroids) as Float16Array,
              iters = host(r.iters!) as Int32Array,
              inertia = host(r.inertia!) as Float32Array;
            assert.equal(cent.length, groups * n);
            assert.equal(iters.length, groups);
            assert.equal(inertia.length, groups * (cap + 1));
            for (let g = 0; g < groups; g++) {
              const it = iters[g];
              assert.ok(it >= 1 && it <= cap, `iters[${g}] = ${it} outside 1..${cap} ${rng.tag}`);
              const tr = inertia.subarray(g * (cap + 1), (g + 1) * (cap + 1));
              // fp32 summation slack only (the brief's allowance): 1e-6 of the initial inertia
              const slack = 1e-6 * tr[0] + 1e-30;
              for (let k = 0; k < cap; k++) {
                if (!(tr[k + 1] <= tr[k] + slack)) {
                  assert.fail(
                    `inertia rose ${tr[k]} -> ${tr[k + 1]} at ${k} (group ${g}) ${rng.tag}`,
                  );
                }
              }
              for (let k = it + 1; k <= cap; k++) {
                assert.equal(
                  tr[k],
                  tr[it],
                  `inertia repeated after the stop (group ${g}) ${rng.tag}`,
                );
              }
              const m = groupMembers(rows, cols, axis, group, g);
              // trace[0] is the fp32 SSE of the uniform grid mn + i (mx - mn) / (n - 1), nearest assignment.
              // Float64 value within: G + 3 roundings of the sum of squares (relative u each), plus the
              // grid points' fp32 rounding (<= 4u M each, moving each |e| by as much).
              let mn = Infinity, mx = -Infinity;
              for (const i of m) {
                mn = Math.min(mn, inp.v[i]);
                mx = Math.max(mx, inp.v[i]);
              }
              const grid = Array.from({ length: n }, (_, i) => mn + (i * (mx - mn)) / (n - 1));
              let sse0 = 0, sumAbs = 0;
              for (const i of m) {
                const e = Math.abs(inp.v[i] - grid[nearestOracle(inp.v[i], grid)]);
                sse0 += e * e;
                sumAbs += e;
              }
              const M = groupMaxAbs(inp.v, m);
              const tol0 = (group + 3) * U32 * sse0 + 2 * 4 * U32 * M * sumAbs +
                group * (4 * U32 * M) ** 2;
              assert.ok(
                Math.abs(tr[0] - sse0) <= tol0,
                `inertia[0] ${tr[0]} vs uniform-grid SSE ${sse0} (group ${g}) ${rng.tag}`,
              );
              const c = cent.subarray(g * n, (g + 1) * n);
              for (let k = 1; k < n; k++) {
                assert.ok(
                  c[k - 1] <= c[k],
                  `centroids of group ${g} not ascending: ${[...c]} ${rng.tag}`,
                );
              }
              assert.ok(c.every((v) => Number.isFinite(v)), `centroids finite ${rng.tag}`);
              if (fit === "pinned") {
                assert.equal(
                  c[0],
                  f16(mn),
                  `pinned: first centroid is half(min) (group ${g}) ${rng.tag}`,
                );
                assert.equal(
                  c[n - 1],
                  f16(mx),
                  `pinned: last centroid is half(max) (group ${g}) ${rng.tag}`,
                );
              } else {
                assert.ok(
                  c[0] >= f16(mn) && c[n - 1] <= f16(mx),
                  `free: centroids inside [min, max] (group ${g}) ${rng.tag}`,
                );
              }
            }
          }
        }
      });
    }
  }

  for (const fit of FITS) {
    for (const dtype of DTYPES) {
      it(`${fit}, ${dtype}: every group's squared error is at most the uniform format's (same bits, group)`, async () => {
        using kivi = await openCpu();
        const iterations = 16;
        for (const bits of BITS) {
          for (const [axis, rows, cols, group] of CASES) {
            const rng = new Rng(`sse ${fit} ${dtype} ${bits} ${axis} ${rows}x${cols} G${group}`);
            const inp = randomMatrix(rng, rows, cols, dtype);
            const opts = { shape: [rows, cols] as [number, number], dtype, axis };
            const cb = asCodebook(
              kivi.quantize(inp.x, {
                ...opts,
                format: { kind: "codebook", bits, group, fit, iterations },
              }),
            );
            const un = asUniform(
              kivi.quantize(inp.x, { ...opts, format: { kind: "uniform", bits, group } }),
            );
            const dc = host(kivi.dequantize(cb)) as Float32Array,
              du = host(kivi.dequantize(un)) as Float32Array;
            const top = (1 << bits) - 1;
            for (let g = 0; g < cb.groups; g++) {
              const m = groupMembers(rows, cols, axis, group, g);
              const M = groupMaxAbs(inp.v, m);
              let mn = Infinity, mx = -Infinity;
              for (const i of m) {
                mn = Math.min(mn, inp.v[i]);
                mx = Math.max(mx, inp.v[i]);
              }
              // Bound, as L2 norms over the group (triangle inequality), with u = 2^-24:
              //  - both fits start from the grid mn + i (mx - mn) / top in fp32 and Lloyd never raises the
              //    nearest-assignment SSE; the uniform format's grid z + i s (fp16 params) differs from it by
              //    delta per point, so the start's norm <= the uniform format's norm + sqrt(G) delta (its
              //    codes are the nearest on its grid or clamped to an end, never better than nearest);
              //  - fp32 arithmetic in each of the T updates (a mean off by <= G u M, an assignment at an
              //    fp32 midpoint off by <= 2 u M) adds <= sqrt(G) (G + 2) u M per update;
              //  - storing the centroids in fp16 moves each by <= 2^-11 M + 2^-25 (half an fp16 ulp).
              let delta = 0;
              for (let i = 0; i <= top; i++) {
                delta = Math.max(
                  delta,
                  Math.abs(mn + (i * (mx - mn)) / top - (un.zero[g] + i * un.scale[g])),
                );
              }
              delta += 4 * U32 * M;
              const slack = Math.sqrt(group) *
                (delta + iterations * (group + 2) * U32 * M + 2 ** -11 * M + 2 ** -25);
              const ec = Math.sqrt(groupSse(inp.v, dc, m)), eu = Math.sqrt(groupSse(inp.v, du, m));
              if (!(ec <= eu + slack)) {
                assert.fail(
                  `group ${g}: codebook L2 error ${ec} > uniform ${eu} + ${slack} ${rng.tag}`,
                );
              }
            }
          }
        }
      });
    }
  }

  it("quantize() with a codebook format gives fitCodebook's centroids and quantizeWithCodebook's codes", async () => {
    using kivi = await openCpu();
    for (const [axis, rows, cols, group] of CASES) {
      for (const bits of BITS) {
        for (const fit of FITS) {
          for (const assign of ["nearest", "interval"] as const) {
            const dtype = DTYPES[(rows + bits) % 3];
            const rng = new Rng(`encode ${axis} ${rows}x${cols} ${bits} ${fit} ${assign} ${dtype}`);
            const inp = randomMatrix(rng, rows, cols, dtype);
            const opts = { shape: [rows, cols] as [number, number], dtype, axis };
            const q = asCodebook(
              kivi.quantize(inp.x, {
                ...opts,
                format: { kind: "codebook", bits, group, fit, assign, iterations: 8 },
              }),
            );
            const f = kivi.fitCodebook(inp.x, { ...opts, bits, group, fit, iterations: 8 });
            assert.deepEqual([...q.centroids], [...f.centroids], `centroids ${rng.tag}`);
            const w = kivi.quantizeWithCodebook(inp.x, q.centroids, {
              ...opts,
              bits,
              group,
              assign,
            });
            assert.deepEqual([...w.codes], [...q.codes], `codes ${rng.tag}`);
            assert.equal(w.centroids, q.centroids);
          }
        }
      }
    }
  });
});

describe("codebook assignment", () => {
  for (const dtype of DTYPES) {
    for (const bits of BITS) {
      it(`nearest, ${dtype}, ${bits} bits: codes equal the float64 oracle, ties to the upper centroid`, async () => {
        using kivi = await openCpu();
        for (const [axis, rows, cols, group] of CASES) {
          const rng = new Rng(`nearest ${dtype} ${bits} ${axis} ${rows}x${cols}`);
          const groups = groupCount(rows, cols, axis, group), n = 1 << bits;
          const cent = randomCentroids(rng, groups, bits);
          const base = randomMatrix(rng, rows, cols, "f32");
          const vals = Float64Array.from(base.v);
          // plant every exact midpoint (and every centroid) of each group among its values
          for (let g = 0; g < groups; g++) {
            const m = groupMembers(rows, cols, axis, group, g);
            for (let k = 0; k + 1 < n; k++) {
              vals[m[2 * k]] = (cent[g * n + k] + cent[g * n + k + 1]) / 2;
            }
            for (let k = 0; k < n && 2 * (n - 1) + k < group; k++) {
              vals[m[2 * (n - 1) + k]] = cent[g * n + k];
            }
          }
          const inp = toInput(vals, dtype);
          const shape: [number, number] = [rows, cols];
          const q = kivi.quantizeWithCodebook(inp.x, cent, { shape, dtype, axis, bits, group });
          const codes = codesOf(q.codes, rows, cols, axis, bits);
          const deq = host(kivi.dequantize(q)) as Float32Array;
          let undecided = 0;
          for (let g = 0; g < groups; g++) {
            const c = cent.subarray(g * n, (g + 1) * n);
            for (const i of groupMembers(rows, cols, axis, group, g)) {
              // codebook dequantize is a lookup: the fp16 centroid, exactly
              assert.equal(deq[i], c[codes[i]], `x'[${i}] ${rng.tag}`);
              if (nearMidpoint(inp.v[i], c)) {
                undecided++;
                continue;
              }
              const want = nearestOracle(inp.v[i], c);
              if (codes[i] !== want) {
                assert.fail(
                  `x = ${inp.v[i]} got code ${codes[i]}, oracle ${want}; centroids ${[
                    ...c,
                  ]} ${rng.tag}`,
                );
              }
            }
          }
          assert.ok(
            undecided <= rows * cols * 1e-3,
            `${undecided} values within fp32 rounding of a midpoint ${rng.tag}`,
          );
        }
      });
    }
  }

  it("nearest: a value exactly at a midpoint goes to the upper centroid", async () => {
    using kivi = await openCpu();
    const c = new Float16Array([-1.5, 0.25, 1, 3.5]);
    const head = [-0.625, 0.625, 2.25, -1.5, 0.25, 1, 3.5, -100, 100];
    const want = [1, 2, 3, 0, 1, 2, 3, 0, 3];
    const x = new Float32Array(32).map((_, i) => head[i % head.length]);
    const q = kivi.quantizeWithCodebook(x, c, { shape: [1, 32], axis: "channel", bits: 2 });
    const codes = codesOf(q.codes, 1, 32, "channel", 2);
    for (let i = 0; i < 32; i++) assert.equal(codes[i], want[i % head.length], `x = ${x[i]}`);
    // duplicate centroids: the upper of equal ones wins
    const d = kivi.quantizeWithCodebook(
      new Float32Array(32).fill(1),
      new Float16Array([0, 1, 1, 2]),
      { shape: [1, 32], axis: "channel", bits: 2 },
    );
    assert.ok(codesOf(d.codes, 1, 32, "channel", 2).every((v) => v === 2));
  });

  it("nearest: of two equal centroids, a value below them gets the first (kivi.h)", async () => {
    using kivi = await openCpu();
    const q = kivi.quantizeWithCodebook(
      new Float32Array(32).fill(0.75),
      new Float16Array([0, 1, 1, 2]),
      {
        shape: [1, 32],
        axis: "channel",
        bits: 2,
      },
    );
    assert.ok(codesOf(q.codes, 1, 32, "channel", 2).every((v) => v === 1));
  });

  for (const bits of BITS) {
    it(`interval, ${bits} bits: codes equal the seed's table`, async () => {
      using kivi = await openCpu();
      for (const [axis, rows, cols, group] of CASES) {
        for (const dtype of DTYPES) {
          const rng = new Rng(`interval ${bits} ${axis} ${rows}x${cols} ${dtype}`);
          const groups = groupCount(rows, cols, axis, group), n = 1 << bits;
          const cent = randomCentroids(rng, groups, bits);
          const vals = Float64Array.from(randomMatrix(rng, rows, cols, "f32").v);
          for (let g = 0; g < groups; g++) {
            const m = groupMembers(rows, cols, axis, group, g);
            for (let k = 0; k < n; k++) vals[m[k]] = cent[g * n + k]; // boundaries exactly
          }
          const inp = toInput(vals, dtype as DataDType);
          const shape: [number, number] = [rows, cols];
          const q = kivi.quantizeWithCodebook(inp.x, cent, {
            shape,
            dtype,
            axis,
            bits,
            group,
            assign: "interval",
          });
          assert.equal(q.format.assign, "interval");
          const codes = codesOf(q.codes, rows, cols, axis, bits);
          for (let g = 0; g < groups; g++) {
            const c = cent.subarray(g * n, (g + 1) * n);
            for (const i of groupMembers(rows, cols, axis, group, g)) {
              const want = intervalOracle(inp.v[i], c);
              if (codes[i] !== want) {
                assert.fail(
                  `x = ${inp.v[i]} got ${codes[i]}, table ${want}; centroids ${[...c]} ${rng.tag}`,
                );
              }
            }
          }
        }
      }
    });
  }

  for (const out of ["f16", "bf16"] as const) {
    it(`dequantizes to ${out}: the fp16 centroid, converted once`, async () => {
      using kivi = await openCpu();
      const rng = new Rng(`cb deq ${out}`);
      const inp = randomMatrix(rng, 96, 40, "f32");
      const q = asCodebook(
        kivi.quantize(inp.x, {
          shape: [96, 40],
          axis: "token",
          format: { kind: "codebook", bits: 4 },
        }),
      );
      const codes = codesOf(q.codes, 96, 40, "token", 4);
      const d = host(kivi.dequantize(q, { dtype: out }));
      for (let g = 0; g < q.groups; g++) {
        for (const i of groupMembers(96, 40, "token", 32, g)) {
          const c = q.centroids[g * 16 + codes[i]];
          assert.equal(d[i], out === "f16" ? c : bf16Bits(c), `x'[${i}] ${rng.tag}`);
        }
      }
    });
  }
});

describe("the seed's worked example", () => {
  const data = [0.1, 0.5, 1.2, 2.5, 3.8, 4.2, 5.1, 5.9];
  // one group of 32: the 8 values, then 3 more copies, so the group's MAE is the 8 values' MAE
  const x = new Float32Array(32).map((_, i) => data[i % 8]);
  const centroids = new Float16Array([0, 1, 4, 6]); // v_min, v1, v2, v_max

  /** x against the centroids along `axis` (one group: shape [1, 32] or [32, 1]), dequantized. */
  function coded(kivi: Backend, axis: Axis, assign?: "interval") {
    const shape: [number, number] = axis === "channel" ? [1, 32] : [32, 1];
    const opts = { shape, axis, bits: 2, ...(assign ? { assign } : {}) } as const;
    const q = kivi.quantizeWithCodebook(x, centroids, opts);
    return { q, deq: host(kivi.dequantize(q)) as Float32Array };
  }

  function mae(deq: Float32Array): number {
    let s = 0;
    for (let i = 0; i < 32; i++) s += Math.abs(x[i] - deq[i]);
    return s / 32;
  }

  it("interval assignment: codes [0,0,1,1,1,2,2,2], values [0,0,1,1,1,4,4,4], MAE 1.0375", async () => {
    using kivi = await openCpu();
    const { q, deq } = coded(kivi, "channel", "interval");
    const codes = codesOf(q.codes, 1, 32, "channel", 2);
    for (let r = 0; r < 4; r++) {
      assert.deepEqual([...codes.subarray(8 * r, 8 * r + 8)], [0, 0, 1, 1, 1, 2, 2, 2]);
      assert.deepEqual([...deq.subarray(8 * r, 8 * r + 8)], [0, 0, 1, 1, 1, 4, 4, 4]);
    }
    // the inputs are fp32 roundings of the decimals: each off by < 2^-24 * 8, far below 1e-6
    assert.ok(Math.abs(mae(deq) - 1.0375) <= 1e-6, `MAE ${mae(deq)}`);
  });

  it("nearest assignment on the same centroids: MAE 0.4625", async () => {
    using kivi = await openCpu();
    const { q, deq } = coded(kivi, "channel");
    const codes = codesOf(q.codes, 1, 32, "channel", 2);
    // 0.5 and 2.5 are exact midpoints (0|1 and 1|4): ties go up
    assert.deepEqual([...codes.subarray(0, 8)], [0, 1, 1, 2, 2, 2, 3, 3]);
    assert.deepEqual([...deq.subarray(0, 8)], [0, 1, 1, 4, 4, 4, 6, 6]);
    assert.ok(Math.abs(mae(deq) - 0.4625) <= 1e-6, `MAE ${mae(deq)}`);
  });

  it("is the same along the token axis (shape [32, 1])", async () => {
    using kivi = await openCpu();
    const { deq } = coded(kivi, "token", "interval");
    assert.deepEqual([...deq.subarray(0, 8)], [0, 0, 1, 1, 1, 4, 4, 4]);
  });
});
