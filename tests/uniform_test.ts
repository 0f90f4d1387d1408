/**
 * Uniform (KIVI) format on the CPU reference: params, codes and values against the float64
 * oracle of kivi.h's formula (bit-exact), the per-element error bound, constant groups and the
 * packed layout, for keys (axis "token") and values (axis "channel") in every input dtype.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { Axis, Backend, Bits, GroupSize } from "../src/mod.ts";
import { asUniform, bf16Bits, bf16Value, BITS, codesOf, f16, groupMembers } from "./_helpers.ts";
import { host, openCpu, randomMatrix, Rng, toInput, uniformBound } from "./_helpers.ts";
import { uniformOracle, wordOf } from "./_helpers.ts";
import type { DataDType } from "./_helpers.ts";
import { DTYPES } from "./_helpers.ts";

type Case = [rows: number, cols: number, group: GroupSize];

/** Keys: G consecutive tokens of a channel. 520, 530 and 600 columns cross the CPU build's 512-column tile. */
const TOKEN_CASES: Case[] = [
  [96, 40, 32],
  [160, 128, 32],
  [4096, 40, 64],
  [4096, 128, 128],
  [64, 600, 32],
  [128, 520, 64],
  [256, 530, 128],
];
/** Values: G consecutive channels of a token. 544 and 640 columns cross the 512-column tile. */
const CHANNEL_CASES: Case[] = [];
for (const rows of [1, 3, 17]) {
  for (const cols of [64, 128, 256]) {
    for (const g of [32, 64, 128] as const) {
      if (cols % g === 0) CHANNEL_CASES.push([rows, cols, g]);
    }
  }
}
CHANNEL_CASES.push([3, 640, 128], [2, 544, 32]);

function casesOf(axis: Axis): Case[] {
  return axis === "token" ? TOKEN_CASES : CHANNEL_CASES;
}

/** A seeded [rows, cols] matrix (`dtype`, f32 by default, then passed as the hint), quantized
 * uniformly, and the oracle's answer for it. */
function againstOracle(
  kivi: Backend,
  tag: string,
  [rows, cols]: [number, number],
  axis: Axis,
  group: GroupSize,
  bits: Bits,
  dtype?: DataDType,
) {
  const rng = new Rng(tag);
  const inp = randomMatrix(rng, rows, cols, dtype ?? "f32");
  const q = asUniform(
    kivi.quantize(inp.x, {
      shape: [rows, cols],
      ...(dtype === undefined ? {} : { dtype }),
      axis,
      format: { kind: "uniform", bits, group },
    }),
  );
  return { rng, inp, q, o: uniformOracle(inp.v, rows, cols, axis, group, bits) };
}

describe("uniform", () => {
  for (const axis of ["token", "channel"] as const) {
    for (const dtype of DTYPES) {
      for (const bits of BITS) {
        it(`axis ${axis}, ${dtype}, ${bits} bits: params, codes and values equal the oracle`, async () => {
          using kivi = await openCpu();
          for (const [rows, cols, group] of casesOf(axis)) {
            const { rng, inp, q, o } = againstOracle(
              kivi,
              `uniform ${axis} ${dtype} ${bits} ${rows}x${cols} G${group}`,
              [rows, cols],
              axis,
              group,
              bits,
              dtype,
            );
            const groups = o.scale.length;
            assert.equal(q.groups, groups, rng.tag);
            assert.equal(q.codes.length, (rows * cols * bits) / 32, rng.tag);
            for (let g = 0; g < groups; g++) {
              if (!Object.is(q.scale[g], o.scale[g]) || !Object.is(q.zero[g], o.zero[g])) {
                assert.fail(
                  `group ${g}: scale/zero ${q.scale[g]}/${q.zero[g]}, oracle ${o.scale[g]}/${
                    o.zero[g]
                  } ${rng.tag}`,
                );
              }
            }
            // codes read out of the words by kivi.h's index formula
            const codes = codesOf(q.codes, rows, cols, axis, bits);
            for (let i = 0; i < codes.length; i++) {
              if (codes[i] !== o.codes[i]) {
                assert.fail(
                  `code of (${Math.floor(i / cols)}, ${i % cols}) is ${codes[i]}, oracle ${
                    o.codes[i]
                  } ${rng.tag}`,
                );
              }
            }
            // x' = fmaf(q, s, z): exact in the oracle (see uniformOracle), so equal, not merely close.
            const deq = host(kivi.dequantize(q)) as Float32Array;
            assert.ok(deq instanceof Float32Array);
            for (let g = 0; g < groups; g++) {
              for (const i of groupMembers(rows, cols, axis, group, g)) {
                if (deq[i] !== o.deq[i]) {
                  assert.fail(`x'[${i}] = ${deq[i]}, fmaf(q, s, z) = ${o.deq[i]} ${rng.tag}`);
                }
                const err = Math.abs(inp.v[i] - deq[i]);
                const bound = uniformBound(inp.v[i], o.scale[g], o.zero[g], o.mn[g], o.mx[g], bits);
                if (!(err <= bound)) {
                  assert.fail(`|x - x'| = ${err} > ${bound} at ${i} (group ${g}) ${rng.tag}`);
                }
              }
            }
          }
        });
      }
    }
  }

  for (const axis of ["token", "channel"] as const) {
    it(`axis ${axis}: the code of (r, c) sits at the word and slot kivi.h documents (via unpack)`, async () => {
      using kivi = await openCpu();
      for (const bits of BITS) {
        const [rows, cols, group] = axis === "token" ? [96, 40, 32] as Case : [3, 256, 64] as Case;
        const { rng, q, o } = againstOracle(
          kivi,
          `layout ${axis} ${bits}`,
          [rows, cols],
          axis,
          group,
          bits,
        );
        const unpacked = host(kivi.unpack(q.codes, { bits })) as Uint8Array;
        assert.equal(unpacked.length, rows * cols);
        const cpw = 32 / bits;
        for (let r = 0; r < rows; r++) {
          for (let c = 0; c < cols; c++) {
            const [w, slot] = wordOf(r, c, rows, cols, axis, bits);
            assert.equal(
              unpacked[w * cpw + slot],
              o.codes[r * cols + c],
              `(${r}, ${c}) word ${w} slot ${slot} ${rng.tag}`,
            );
          }
        }
        // each group's codes are one contiguous run of group / cpw words, in group order
        const g = 7;
        const m = groupMembers(rows, cols, axis, group, g);
        for (let i = 0; i < group; i++) {
          assert.equal(unpacked[g * group + i], o.codes[m[i]], `group ${g} member ${i} ${rng.tag}`);
        }
      }
    });
  }

  for (const dtype of DTYPES) {
    it(`${dtype}: a constant group has no NaN and reproduces the constant within half an fp16 step`, async () => {
      using kivi = await openCpu();
      for (const axis of ["token", "channel"] as const) {
        for (const bits of BITS) {
          const [rows, cols, group] = axis === "token"
            ? [96, 40, 32] as Case
            : [3, 128, 32] as Case;
          const rng = new Rng(`constant ${dtype} ${axis} ${bits}`);
          const base = randomMatrix(rng, rows, cols, "f32");
          const vals = Float64Array.from(base.v);
          const consts = [Math.PI, -1234.567, 0.0001234, 0.5];
          for (let k = 0; k < consts.length; k++) {
            for (const i of groupMembers(rows, cols, axis, group, 2 * k + 1)) {
              vals[i] = consts[k];
            }
          }
          const inp = toInput(vals, dtype);
          const q = asUniform(
            kivi.quantize(inp.x, {
              shape: [rows, cols],
              dtype,
              axis,
              format: { kind: "uniform", bits, group },
            }),
          );
          const deq = host(kivi.dequantize(q)) as Float32Array;
          assert.ok(deq.every((d) => Number.isFinite(d)), `no NaN/Inf in the output ${rng.tag}`);
          const codes = codesOf(q.codes, rows, cols, axis, bits);
          for (let k = 0; k < consts.length; k++) {
            const g = 2 * k + 1;
            const m = groupMembers(rows, cols, axis, group, g);
            const c = inp.v[m[0]]; // the constant as the input dtype holds it
            if (f16(c) === c) {
              // fp16 holds it: scale 0, zero the constant, code 0, exact.
              assert.equal(q.scale[g], 0, `scale of constant group ${g} ${rng.tag}`);
              assert.equal(q.zero[g], c, `zero of constant group ${g} ${rng.tag}`);
            } else {
              // It lies between two fp16 values: zero is the lower, and one step brings it within half of it.
              assert.ok(
                q.zero[g] < c && q.scale[g] > 0,
                `params of constant group ${g}: ${q.zero[g]}, ${q.scale[g]} ${rng.tag}`,
              );
            }
            for (const i of m) {
              assert.equal(codes[i], codes[m[0]], `one code in constant group ${g} ${rng.tag}`);
              assert.ok(
                Math.abs(deq[i] - c) <= q.scale[g] / 2 + 2 ** -24 * Math.abs(c),
                `|x' - c| <= scale / 2 ${rng.tag}`,
              );
              // no worse than fp16 rounding of a normal number: relative error <= 2^-11
              assert.ok(Math.abs(deq[i] - c) <= 2 ** -11 * Math.abs(c), `|x' - c| ${rng.tag}`);
            }
          }
        }
      }
    });
  }

  it("rounds a code exactly halfway between two levels to even (rintf), and clamps to 0..2^b-1", async () => {
    using kivi = await openCpu();
    // min 0, max 3 at 2 bits: s = 1, z = 0, so (x - z) / s is x itself
    const head = [0, 3, 0.5, 1.5, 2.5, 1, 2, 0.49999997, 2.5000002];
    const want = [0, 3, 0, 2, 2, 1, 2, 0, 3];
    const vals = new Float32Array(32).map((_, i) => head[i % head.length]);
    const q = asUniform(
      kivi.quantize(vals, {
        shape: [1, 32],
        axis: "channel",
        format: { kind: "uniform", bits: 2 },
      }),
    );
    assert.equal(q.scale[0], 1);
    assert.equal(q.zero[0], 0);
    const codes = codesOf(q.codes, 1, 32, "channel", 2);
    for (let i = 0; i < 32; i++) assert.equal(codes[i], want[i % head.length], `x = ${vals[i]}`);
  });

  it("a group whose range rounds to a zero fp16 scale gets fp16's smallest step instead, within scale / 2", async () => {
    using kivi = await openCpu();
    // range 2^-23 over 15 steps is below 2^-25, half of fp16's smallest subnormal: KIVI's scale rounds to
    // 0 (every value would become 1); the smallest step 2^-24 reaches 1 + 2^-23 with code 2, exactly
    const vals = new Float32Array(32).map((_, i) => (i % 2 ? 1 + 2 ** -23 : 1));
    const q = asUniform(
      kivi.quantize(vals, {
        shape: [1, 32],
        axis: "channel",
        format: { kind: "uniform", bits: 4 },
      }),
    );
    assert.equal(q.scale[0], 2 ** -24);
    assert.equal(q.zero[0], 1);
    assert.deepEqual([...host(kivi.dequantize(q))], [...vals]);
  });

  for (const out of ["f16", "bf16"] as const) {
    it(`dequantizes to ${out}: the fp32 value fmaf(q, s, z) rounded once to ${out}`, async () => {
      using kivi = await openCpu();
      for (
        const [axis, rows, cols, group] of [["token", 160, 40, 32], ["token", 64, 600, 64], [
          "channel",
          17,
          256,
          64,
        ], ["channel", 3, 640, 128]] as const
      ) {
        for (const bits of BITS) {
          const { rng, q, o } = againstOracle(
            kivi,
            `deq ${out} ${axis} ${bits}`,
            [rows, cols],
            axis,
            group,
            bits,
          );
          const d = host(kivi.dequantize(q, { dtype: out }));
          if (out === "f16") {
            assert.ok(d instanceof Float16Array);
            for (let i = 0; i < d.length; i++) {
              if (d[i] !== f16(o.deq[i])) {
                assert.fail(`f16 x'[${i}] ${d[i]} vs ${f16(o.deq[i])} ${rng.tag}`);
              }
            }
          } else {
            assert.ok(d instanceof Uint16Array);
            for (let i = 0; i < d.length; i++) {
              if (d[i] !== bf16Bits(o.deq[i])) {
                assert.fail(
                  `bf16 x'[${i}] ${bf16Value(d[i])} vs ${bf16Value(bf16Bits(o.deq[i]))} ${rng.tag}`,
                );
              }
            }
          }
        }
      }
    });
  }

  it("writes into opts.out buffers and returns them; trusted gives the same result", async () => {
    using kivi = await openCpu();
    const [rows, cols, group, bits]: [number, number, GroupSize, Bits] = [160, 40, 32, 2];
    const rng = new Rng("uniform out");
    const inp = randomMatrix(rng, rows, cols, "f16" as DataDType);
    const fmt = { kind: "uniform", bits, group } as const;
    const ref = asUniform(
      kivi.quantize(inp.x, { shape: [rows, cols], axis: "token", format: fmt }),
    );
    const out = {
      codes: new Uint32Array(ref.codes.length),
      scale: new Float16Array(ref.groups),
      zero: new Float16Array(ref.groups),
    };
    const q = asUniform(
      kivi.quantize(inp.x, { shape: [rows, cols], axis: "token", format: fmt, out }),
    );
    assert.equal(q.codes, out.codes);
    assert.equal(q.scale, out.scale);
    assert.equal(q.zero, out.zero);
    assert.deepEqual([...q.codes], [...ref.codes], rng.tag);
    assert.deepEqual([...q.scale], [...ref.scale], rng.tag);
    assert.deepEqual([...q.zero], [...ref.zero], rng.tag);
    const t = asUniform(
      kivi.quantize(inp.x, { shape: [rows, cols], axis: "token", format: fmt, trusted: true }),
    );
    assert.deepEqual([...t.codes], [...ref.codes], rng.tag);
    const deqOut = new Float32Array(rows * cols);
    assert.equal(kivi.dequantize(q, { out: deqOut }), deqOut);
    assert.deepEqual([...deqOut], [...host(kivi.dequantize(ref))]);
  });
});
