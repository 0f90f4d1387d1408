/**
 * Bad input, tested as carefully as good input: every documented error is thrown with a message
 * that names the argument, and every output buffer passed in (filled with a sentinel) is left
 * exactly as it was. The second half calls the C exports directly, bypassing the TS checks.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { Axis, Backend, DeviceTensor, StatusName } from "../src/mod.ts";
import { defaultLibraryPath, KiviError } from "../src/mod.ts";
import type { NativeLib, Pointer } from "../src/ffi/_native.ts";
import { loadNative } from "../src/ffi/load.ts";
import { assertUntouched, DTYPES, f16Bits, NONFINITE, openCpu, randomMatrix } from "./_helpers.ts";
import { Rng, sentinel, setRaw, throwsNaming } from "./_helpers.ts";

type Sentinel = { buf: ArrayBufferView; snap: Uint8Array };
const UNIFORM2 = { kind: "uniform", bits: 2 } as const;

/** Sentinel-filled outputs of a uniform quantize of [rows][cols] (2 bits, G 32 unless told). */
function uniformOuts(rows: number, cols: number, axis: Axis, bits = 2, group = 32) {
  const groups = axis === "token"
    ? cols * Math.max(1, Math.floor(rows / group))
    : rows * Math.max(1, Math.floor(cols / group));
  return {
    codes: sentinel(new Uint32Array(Math.max(1, Math.floor((rows * cols * bits) / 32)))),
    scale: sentinel(new Float16Array(groups)),
    zero: sentinel(new Float16Array(groups)),
  };
}
function outOf(o: ReturnType<typeof uniformOuts>) {
  return { codes: o.codes.buf, scale: o.scale.buf, zero: o.zero.buf };
}
function untouched(o: Record<string, Sentinel>, what: string): void {
  for (const [k, s] of Object.entries(o)) assertUntouched(s, `${what}: out.${k}`);
}

/** A uniform 2-bit quantize of x (96 x 40 values, axis "token") with `shape` into sentinel outputs
 * throws `kind` naming `names`, and writes nothing. */
function refusesShape(
  kivi: Backend,
  x: Float32Array,
  shape: [number, number],
  kind: new (...a: never[]) => Error,
  names: RegExp,
): void {
  const o = uniformOuts(96, 40, "token");
  throwsNaming(
    () => kivi.quantize(x, { shape, axis: "token", format: UNIFORM2, out: outOf(o) }),
    kind,
    names,
    `shape ${shape}`,
  );
  untouched(o, `shape ${shape}`);
}

describe("bad input through the TypeScript API", () => {
  it("a shape that does not match the array is a TypeError naming shape and x", async () => {
    using kivi = await openCpu();
    const rng = new Rng("errors length");
    const x = randomMatrix(rng, 96, 40, "f32").x;
    for (const shape of [[96, 41], [95, 40], [32, 40]] as [number, number][]) {
      refusesShape(kivi, x as Float32Array, shape, TypeError, /shape.*x's 3840 elements/);
    }
    throwsNaming(
      () => kivi.quantize(x, { axis: "token", format: { kind: "uniform", bits: 2 } }),
      TypeError,
      /shape must be given/,
      "no shape",
    );
    throwsNaming(
      () =>
        kivi.quantize(new Float64Array(64) as unknown as Float32Array, {
          shape: [2, 32],
          axis: "channel",
          format: { kind: "uniform", bits: 2 },
        }),
      TypeError,
      /\bx must be/,
      "Float64Array",
    );
  });

  it("output buffers of the wrong size or type are TypeErrors naming out.<name>, and nothing is written", async () => {
    using kivi = await openCpu();
    const x = randomMatrix(new Rng("errors out size"), 64, 64, "f32").x;
    const fmt = { kind: "uniform", bits: 2 } as const;
    for (const bad of ["codes", "scale", "zero"] as const) {
      const o = uniformOuts(64, 64, "token");
      const out = outOf(o) as Record<string, ArrayBufferView>;
      const wrong = bad === "codes"
        ? sentinel(new Uint32Array(255))
        : sentinel(new Float16Array(127));
      out[bad] = wrong.buf;
      throwsNaming(
        () => kivi.quantize(x, { shape: [64, 64], axis: "token", format: fmt, out }),
        TypeError,
        new RegExp(`out\\.${bad}`),
        bad,
      );
      untouched({ ...o, wrong }, `out.${bad}`);
    }
    const o = uniformOuts(64, 64, "token");
    const f32 = sentinel(new Float32Array(128));
    throwsNaming(
      () =>
        kivi.quantize(x, {
          shape: [64, 64],
          axis: "token",
          format: fmt,
          out: { ...outOf(o), scale: f32.buf as unknown as Float16Array },
        }),
      TypeError,
      /out\.scale must be a f16 array/,
      "Float32Array scale",
    );
    untouched({ ...o, f32 }, "Float32Array scale");
    const q = kivi.quantize(x, { shape: [64, 64], axis: "token", format: fmt });
    const d = sentinel(new Float32Array(64 * 64 - 1));
    throwsNaming(
      () => kivi.dequantize(q, { out: d.buf }),
      TypeError,
      /\bout must have 4096 elements/,
      "dequantize out",
    );
    assertUntouched(d, "dequantize out");
  });

  it("a group that does not divide the grouped axis is a RangeError naming the axis and group", async () => {
    using kivi = await openCpu();
    const rng = new Rng("errors group divide");
    const cases: [Axis, number, number, 32 | 64 | 128, RegExp][] = [
      ["token", 96, 40, 64, /shape\[0\] \(rows\) must be a multiple of group \(64\).*got 96/],
      ["token", 160, 40, 128, /shape\[0\] \(rows\) must be a multiple of group \(128\)/],
      ["channel", 3, 96, 64, /shape\[1\] \(cols\) must be a multiple of group \(64\).*got 96/],
      ["channel", 17, 40, 32, /shape\[1\] \(cols\) must be a multiple of group \(32\)/],
    ];
    for (const [axis, rows, cols, group, names] of cases) {
      const x = randomMatrix(rng, rows, cols, "f32").x;
      const o = uniformOuts(rows, cols, axis, 2, group);
      throwsNaming(
        () =>
          kivi.quantize(x, {
            shape: [rows, cols],
            axis,
            format: { kind: "uniform", bits: 2, group },
            out: outOf(o),
          }),
        RangeError,
        names,
        `${axis} G${group}`,
      );
      untouched(o, `${axis} G${group}`);
      const c = sentinel(new Float16Array(64));
      throwsNaming(
        () =>
          kivi.fitCodebook(x, {
            shape: [rows, cols],
            axis,
            bits: 2,
            group,
            out: { centroids: c.buf },
          }),
        RangeError,
        names,
        `fit ${axis} G${group}`,
      );
      assertUntouched(c, "fit centroids");
    }
  });

  it('bits other than 2 or 4, group 48, axis "row" and bad fit/assign/iterations are RangeErrors naming the option', async () => {
    using kivi = await openCpu();
    const x = randomMatrix(new Rng("errors options"), 128, 64, "f32").x;
    const base = { shape: [128, 64] as [number, number], axis: "token" as Axis };
    const bad: [string, () => unknown, RegExp][] = [];
    for (const bits of [3, 1, 8, 0, 16]) {
      bad.push([
        `bits ${bits}`,
        () => kivi.quantize(x, { ...base, format: { kind: "uniform", bits: bits as 2 } }),
        /format\.bits must be one of 2, 4, got \d+/,
      ]);
      bad.push([
        `fit bits ${bits}`,
        () => kivi.fitCodebook(x, { ...base, bits: bits as 2 }),
        /format\.bits/,
      ]);
    }
    bad.push([
      "group 48",
      () => kivi.quantize(x, { ...base, format: { kind: "uniform", bits: 2, group: 48 as 32 } }),
      /format\.group must be one of 32, 64, 128, got 48/,
    ]);
    bad.push([
      "cb group 48",
      () => kivi.quantize(x, { ...base, format: { kind: "codebook", bits: 2, group: 48 as 32 } }),
      /format\.group/,
    ]);
    bad.push([
      "axis row",
      () =>
        kivi.quantize(x, { ...base, axis: "row" as Axis, format: { kind: "uniform", bits: 2 } }),
      /axis must be one of "token", "channel", got "row"/,
    ]);
    bad.push([
      "fit axis row",
      () => kivi.fitCodebook(x, { ...base, axis: "row" as Axis, bits: 2 }),
      /axis/,
    ]);
    bad.push([
      "fit loose",
      () =>
        kivi.quantize(x, {
          ...base,
          format: { kind: "codebook", bits: 2, fit: "loose" as "free" },
        }),
      /format\.fit/,
    ]);
    bad.push([
      "assign far",
      () =>
        kivi.quantize(x, {
          ...base,
          format: { kind: "codebook", bits: 2, assign: "far" as "nearest" },
        }),
      /format\.assign/,
    ]);
    for (const iterations of [0, 257, 1.5, -3]) {
      bad.push([
        `iterations ${iterations}`,
        () => kivi.fitCodebook(x, { ...base, bits: 2, iterations }),
        /iterations/,
      ]);
    }
    for (const [what, fn, names] of bad) throwsNaming(fn, RangeError, names, what);
  });

  it("a fractional, negative or zero shape is a RangeError naming the dimension", async () => {
    using kivi = await openCpu();
    const x = new Float32Array(96 * 40).fill(1.5);
    const cases: [[number, number], RegExp][] = [
      [[95.5, 40], /shape\[0\] \(rows\) must be an integer, got 95\.5/],
      [[96, 40.25], /shape\[1\] \(cols\) must be an integer/],
      [[-96, -40], /shape\[0\] \(rows\) must be between 1 and/],
      [[96, -40], /shape\[1\] \(cols\) must be between 1 and/],
      [[0, 40], /shape\[0\] \(rows\)/],
    ];
    for (const [shape, names] of cases) refusesShape(kivi, x, shape, RangeError, names);
  });

  for (const dtype of DTYPES) {
    it(`${dtype}: NaN, +Inf and -Inf in x are KIVI_ERR_NONFINITE naming x; nothing is written`, async () => {
      using kivi = await openCpu();
      for (const [label, value] of NONFINITE[dtype]) {
        for (const [axis, rows, cols] of [["token", 96, 40], ["channel", 3, 128]] as const) {
          const rng = new Rng(`nonfinite ${dtype} ${label} ${axis}`);
          const inp = randomMatrix(rng, rows, cols, dtype);
          const at = rng.int(rows * cols);
          setRaw(inp.x, at, value);
          const shape = [rows, cols] as [number, number];
          const names = new RegExp(
            `\\bx must be finite, got ${label.replace("+", "\\+")} at index ${at}\\b`,
          );
          const what = `${dtype} ${label} ${axis} ${rng.tag}`;
          const o = uniformOuts(rows, cols, axis);
          throwsNaming(
            () =>
              kivi.quantize(inp.x, {
                shape,
                dtype,
                axis,
                format: { kind: "uniform", bits: 2 },
                out: outOf(o),
              }),
            "KIVI_ERR_NONFINITE",
            names,
            what,
          );
          untouched(o, what);
          const groups = o.scale.buf.length;
          const cb = {
            centroids: sentinel(new Float16Array(groups * 4)),
            codes: sentinel(new Uint32Array(o.codes.buf.length)),
          };
          const cent = new Float16Array(groups * 4).map((_, i) => [-1, 0, 1, 2][i % 4]);
          const base = { shape, dtype, axis };
          const calls: [string, () => unknown][] = [
            ["encode", () =>
              kivi.quantize(inp.x, {
                ...base,
                format: { kind: "codebook", bits: 2 },
                out: { centroids: cb.centroids.buf, codes: cb.codes.buf },
              })],
            [
              "fit",
              () =>
                kivi.fitCodebook(inp.x, { ...base, bits: 2, out: { centroids: cb.centroids.buf } }),
            ],
            [
              "codebook",
              () =>
                kivi.quantizeWithCodebook(inp.x, cent, {
                  ...base,
                  bits: 2,
                  out: { codes: cb.codes.buf },
                }),
            ],
          ];
          for (const [op, call] of calls) {
            throwsNaming(call, "KIVI_ERR_NONFINITE", names, `${op} ${what}`);
            untouched(cb, `${op} ${what}`);
          }
        }
      }
    });
  }

  it("unsorted or non-finite centroids are KIVI_ERR_ARG naming centroids; out.codes untouched", async () => {
    using kivi = await openCpu();
    const rng = new Rng("errors centroids");
    const x = randomMatrix(rng, 3, 64, "f32").x; // 6 groups of 32 along channels
    const good = new Float16Array(6 * 4).map((_, i) => [-1, 0, 1, 2][i % 4]);
    const cases: [string, Float16Array, RegExp][] = [];
    const unsorted = good.slice();
    unsorted[4 * 3 + 1] = 5; // group 3: [-1, 5, 1, 2]
    cases.push(["unsorted", unsorted, /centroids must be sorted ascending.*group 3/]);
    const inf = good.slice();
    inf[4 * 5 + 3] = Infinity;
    cases.push(["Inf", inf, /centroids must be finite.*group 5/]);
    const nan = good.slice();
    nan[0] = NaN;
    cases.push(["NaN", nan, /centroids must be finite.*group 0/]);
    for (const [what, cent, names] of cases) {
      for (const assign of ["nearest", "interval"] as const) {
        const codes = sentinel(new Uint32Array(12));
        throwsNaming(
          () =>
            kivi.quantizeWithCodebook(x, cent, {
              shape: [3, 64],
              axis: "channel",
              bits: 2,
              assign,
              out: { codes: codes.buf },
            }),
          "KIVI_ERR_ARG",
          names,
          `${what} ${assign}`,
        );
        assertUntouched(codes, `${what} ${assign}`);
      }
    }
    const short = sentinel(new Uint32Array(12));
    throwsNaming(
      () =>
        kivi.quantizeWithCodebook(x, good.subarray(0, 20), {
          shape: [3, 64],
          axis: "channel",
          bits: 2,
          out: { codes: short.buf },
        }),
      TypeError,
      /centroids must have 24 elements/,
      "short centroids",
    );
    assertUntouched(short, "short centroids");
  });

  it("a disposed backend is KIVI_ERR_STATE on every call", async () => {
    const kivi = await openCpu();
    const x = randomMatrix(new Rng("errors disposed backend"), 64, 32, "f32").x;
    const q = kivi.quantize(x, {
      shape: [64, 32],
      axis: "token",
      format: { kind: "uniform", bits: 2 },
    });
    kivi.dispose();
    const o = uniformOuts(64, 32, "token");
    const calls: [string, () => unknown][] = [
      [
        "quantize",
        () =>
          kivi.quantize(x, {
            shape: [64, 32],
            axis: "token",
            format: { kind: "uniform", bits: 2 },
            out: outOf(o),
          }),
      ],
      ["dequantize", () => kivi.dequantize(q)],
      ["fitCodebook", () => kivi.fitCodebook(x, { shape: [64, 32], axis: "token", bits: 2 })],
      ["stats", () => kivi.stats(x, { shape: [64, 32], axis: "token" })],
      ["pack", () => kivi.pack(new Uint8Array(16), { bits: 2 })],
      ["unpack", () => kivi.unpack(new Uint32Array(1), { bits: 2 })],
      ["alloc", () => kivi.alloc([4], "f32")],
      ["upload", () => kivi.upload(new Float32Array(4))],
      ["memInfo", () => kivi.memInfo()],
      ["synchronizeSync", () => kivi.synchronizeSync()],
      ["libraryPath", () => kivi.libraryPath],
    ];
    for (const [what, fn] of calls) {
      throwsNaming(fn, "KIVI_ERR_STATE", /the backend was disposed; open a new one/, what);
    }
    await assert.rejects(
      kivi.synchronize(),
      (e: unknown) => e instanceof KiviError && e.code === "KIVI_ERR_STATE",
    );
    untouched(o, "disposed backend");
  });

  it("a disposed tensor is KIVI_ERR_STATE naming the tensor, as input or output; outputs untouched", async () => {
    using kivi = await openCpu();
    const inp = randomMatrix(new Rng("errors disposed tensor"), 64, 32, "f32");
    const t = kivi.upload(inp.x, { shape: [64, 32] }) as DeviceTensor<"f32">;
    const codes = kivi.upload(new Uint32Array(128).fill(0xdeadbeef)) as DeviceTensor<"u32">;
    const scale = kivi.upload(new Float16Array(64).fill(-777)) as DeviceTensor<"f16">;
    const zero = kivi.upload(new Float16Array(64).fill(-777)) as DeviceTensor<"f16">;
    t.dispose();
    assert.equal(t.disposed, true);
    const fmt = { kind: "uniform", bits: 2 } as const;
    throwsNaming(
      () => kivi.quantize(t, { axis: "token", format: fmt, out: { codes, scale, zero } }),
      "KIVI_ERR_STATE",
      /the tensor was disposed/,
      "input",
    );
    throwsNaming(
      () => t.readSync(),
      "KIVI_ERR_STATE",
      /readSync: the tensor was disposed/,
      "readSync",
    );
    await assert.rejects(
      t.read(),
      (e: unknown) => e instanceof KiviError && e.code === "KIVI_ERR_STATE",
    );
    throwsNaming(
      () => t.write(inp.x as Float32Array),
      "KIVI_ERR_STATE",
      /the tensor was disposed/,
      "write",
    );
    assert.ok(codes.readSync().every((w) => w === 0xdeadbeef), "out.codes untouched");
    assert.ok(
      scale.readSync().every((v) => v === -777) && zero.readSync().every((v) => v === -777),
      "out.scale/zero untouched",
    );
    // a disposed output tensor
    using live = kivi.upload(inp.x, { shape: [64, 32] }) as DeviceTensor<"f32">;
    zero.dispose();
    throwsNaming(
      () => kivi.quantize(live, { axis: "token", format: fmt, out: { codes, scale, zero } }),
      "KIVI_ERR_STATE",
      /the tensor was disposed/,
      "output",
    );
    assert.ok(codes.readSync().every((w) => w === 0xdeadbeef), "out.codes untouched");
    assert.ok(scale.readSync().every((v) => v === -777), "out.scale untouched");
    codes.dispose();
    scale.dispose();
  });

  it("a host input with a tensor out buffer (and the reverse) is a TypeError naming the buffer", async () => {
    using kivi = await openCpu();
    const inp = randomMatrix(new Rng("errors mixed memory"), 64, 32, "f32");
    using codesT = kivi.upload(new Uint32Array(128).fill(0xdeadbeef)) as DeviceTensor<"u32">;
    const o = uniformOuts(64, 32, "token");
    throwsNaming(
      () =>
        kivi.quantize(inp.x, {
          shape: [64, 32],
          axis: "token",
          format: { kind: "uniform", bits: 2 },
          out: { ...outOf(o), codes: codesT as unknown as Uint32Array },
        }),
      TypeError,
      /out\.codes must be a host typed array like the input/,
      "host x, tensor out",
    );
    untouched({ scale: o.scale, zero: o.zero }, "host x, tensor out");
    assert.ok(codesT.readSync().every((w) => w === 0xdeadbeef));
    using xt = kivi.upload(inp.x, { shape: [64, 32] }) as DeviceTensor<"f32">;
    throwsNaming(
      () =>
        kivi.quantize(xt, {
          axis: "token",
          format: { kind: "uniform", bits: 2 },
          out: { codes: o.codes.buf as unknown as DeviceTensor<"u32"> },
        }),
      TypeError,
      /out\.codes must be a DeviceTensor like the input/,
      "tensor x, host out",
    );
    untouched(o, "tensor x, host out");
    const q = kivi.quantize(inp.x, {
      shape: [64, 32],
      axis: "token",
      format: { kind: "uniform", bits: 2 },
    });
    using outT = kivi.alloc([64 * 32], "f32");
    throwsNaming(
      () => kivi.dequantize(q, { out: outT as unknown as Float32Array }),
      TypeError,
      /\bout must be a host typed array/,
      "dequantize",
    );
    const words = sentinel(new Uint32Array(1));
    using codes8 = kivi.upload(new Uint8Array(16)) as DeviceTensor<"u8">;
    throwsNaming(
      () => kivi.pack(codes8, { bits: 2, out: words.buf as unknown as DeviceTensor<"u32"> }),
      TypeError,
      /out\.words must be a DeviceTensor/,
      "pack",
    );
    assertUntouched(words, "pack");
  });

  it("a tensor of another backend is a TypeError saying to upload it", async () => {
    using a = await openCpu();
    using b = await openCpu();
    using t = b.upload(new Float32Array(64).fill(0.5), { shape: [2, 32] }) as DeviceTensor<"f32">;
    throwsNaming(
      () => a.quantize(t, { axis: "channel", format: { kind: "uniform", bits: 2 } }),
      TypeError,
      /\bx belongs to another backend/,
      "x",
    );
  });
});

/* ------------------------------------------------------------------ the C layer directly ---- */

interface Native {
  lib: NativeLib;
  ctx: Pointer;
}

/** The CPU library and a context of its own, freed at the end of the `using` scope. */
async function openNative(): Promise<Native & Disposable> {
  const lib = await loadNative(defaultLibraryPath("cpu"));
  const out = new BigUint64Array(1);
  assert.equal(lib.call("kivi_ctx_create", 0, lib.ptr(out)), 0);
  const ctx = lib.pointerAt(out, 0);
  return {
    lib,
    ctx,
    [Symbol.dispose]() {
      lib.call("kivi_ctx_destroy", ctx);
      lib.close();
    },
  };
}

/** Checks a failed status: its value, its name, and both error slots naming the argument. */
function expectStatus(
  n: Native,
  st: number,
  want: StatusName,
  names: RegExp,
  what: string,
  ctxSlot = true,
): void {
  const code = {
    KIVI_ERR_ARG: -1,
    KIVI_ERR_SHAPE: -2,
    KIVI_ERR_NONFINITE: -3,
    KIVI_ERR_NO_DEVICE: -7,
  }[want as string];
  assert.equal(
    st,
    code,
    `${what}: status ${st} (${n.lib.call("kivi_status_str", st)}), want ${want}`,
  );
  assert.equal(n.lib.call("kivi_status_str", st), want, what);
  const msg = n.lib.call("kivi_last_error");
  assert.ok(msg.length > 0, `${what}: kivi_last_error() is empty`);
  assert.match(msg, names, what);
  if (ctxSlot) {
    assert.equal(n.lib.call("kivi_ctx_last_error", n.ctx), msg, `${what}: kivi_ctx_last_error`);
  }
}

describe("bad arguments straight into the C exports", () => {
  it("kivi_uniform_quantize rejects each bad argument with kivi.h's status and writes nothing", async () => {
    using n = await openNative();
    const { lib } = n;
    const rows = 64, cols = 40;
    const x = randomMatrix(new Rng("c uniform"), rows, cols, "f32").x as Float32Array;
    const good = {
      x: lib.ptr(x) as Pointer,
      dtype: 0,
      rows,
      cols,
      axis: 0,
      group: 32,
      bits: 2,
      flags: 0,
    };
    type Args = typeof good;
    const cases: [
      string,
      Partial<Args> & { nullOut?: "codes" | "scale" | "zero"; nullCtx?: boolean },
      StatusName,
      RegExp,
    ][] = [
      [
        "group 48",
        { group: 48 },
        "KIVI_ERR_ARG",
        /kivi_uniform_quantize: group must be 32, 64 or 128, got 48/,
      ],
      ["group 0", { group: 0 }, "KIVI_ERR_ARG", /group/],
      ["bits 3", { bits: 3 }, "KIVI_ERR_ARG", /bits must be 2 or 4, got 3/],
      ["bits 8", { bits: 8 }, "KIVI_ERR_ARG", /bits/],
      ["rows 48", { rows: 48 }, "KIVI_ERR_SHAPE", /rows \(48\) must be a multiple of group \(32\)/],
      [
        "cols 40 per channel",
        { axis: 1 },
        "KIVI_ERR_SHAPE",
        /cols \(40\) must be a multiple of group/,
      ],
      ["rows 0", { rows: 0 }, "KIVI_ERR_ARG", /rows must be >= 1/],
      ["rows -64", { rows: -64 }, "KIVI_ERR_ARG", /rows/],
      ["cols 0", { cols: 0 }, "KIVI_ERR_ARG", /cols must be >= 1/],
      [
        "rows * cols >= 2^40",
        { rows: 2 ** 35, cols: 2 ** 5 },
        "KIVI_ERR_ARG",
        /rows \* cols must be below 2\^40/,
      ],
      ["axis 2", { axis: 2 }, "KIVI_ERR_ARG", /axis/],
      ["dtype 3", { dtype: 3 }, "KIVI_ERR_ARG", /\bdtype must be/],
      ["dtype -1", { dtype: -1 }, "KIVI_ERR_ARG", /\bdtype/],
      ["flags 2", { flags: 2 }, "KIVI_ERR_ARG", /flags/],
      ["x NULL", { x: null }, "KIVI_ERR_ARG", /\bx must not be NULL/],
      ["codes NULL", { nullOut: "codes" }, "KIVI_ERR_ARG", /\bcodes must not be NULL/],
      ["scale NULL", { nullOut: "scale" }, "KIVI_ERR_ARG", /\bscale must not be NULL/],
      ["zero NULL", { nullOut: "zero" }, "KIVI_ERR_ARG", /\bzero must not be NULL/],
      ["ctx NULL", { nullCtx: true }, "KIVI_ERR_ARG", /\bctx must not be NULL/],
    ];
    for (const [what, mod, want, names] of cases) {
      const a = { ...good, ...mod };
      const o = {
        codes: sentinel(new Uint32Array(160)),
        scale: sentinel(new Uint16Array(80)),
        zero: sentinel(new Uint16Array(80)),
      };
      const p = (k: "codes" | "scale" | "zero") => (mod.nullOut === k ? null : lib.ptr(o[k].buf));
      const st = lib.call(
        "kivi_uniform_quantize",
        mod.nullCtx ? null : n.ctx,
        a.x,
        a.dtype,
        a.rows,
        a.cols,
        a.axis,
        a.group,
        a.bits,
        a.flags,
        p("codes"),
        p("scale"),
        p("zero"),
      );
      expectStatus(n, st, want, names, what, !mod.nullCtx);
      untouched(o, what);
    }
    // NaN, +Inf and -Inf (f32, f16 and bf16 bit patterns): KIVI_ERR_NONFINITE naming x
    for (const dtype of DTYPES) {
      for (const [label, v] of NONFINITE[dtype]) {
        const code = { f32: 0, f16: 1, bf16: 2 }[dtype];
        const inp = randomMatrix(new Rng(`c nonfinite ${dtype}`), rows, cols, dtype);
        setRaw(inp.x, 77, v);
        const o = {
          codes: sentinel(new Uint32Array(160)),
          scale: sentinel(new Uint16Array(80)),
          zero: sentinel(new Uint16Array(80)),
        };
        const st = lib.call(
          "kivi_uniform_quantize",
          n.ctx,
          lib.ptr(inp.x),
          code,
          rows,
          cols,
          0,
          32,
          2,
          0,
          lib.ptr(o.codes.buf),
          lib.ptr(o.scale.buf),
          lib.ptr(o.zero.buf),
        );
        expectStatus(
          n,
          st,
          "KIVI_ERR_NONFINITE",
          new RegExp(
            `\\bx must be finite, got ${label.replace("+", "\\+")} at index 77 \\(row 1, col 37`,
          ),
          `${dtype} ${label}`,
        );
        untouched(o, `${dtype} ${label}`);
      }
    }
    // and a good call succeeds after all that
    const o = {
      codes: new Uint32Array(160),
      scale: new Uint16Array(80),
      zero: new Uint16Array(80),
    };
    assert.equal(
      lib.call(
        "kivi_uniform_quantize",
        n.ctx,
        good.x,
        0,
        rows,
        cols,
        0,
        32,
        2,
        0,
        lib.ptr(o.codes),
        lib.ptr(o.scale),
        lib.ptr(o.zero),
      ),
      0,
    );
  });

  it("the other quantizer exports reject bad arguments the same way", async () => {
    using n = await openNative();
    const { lib } = n;
    const x = randomMatrix(new Rng("c others"), 64, 32, "f32").x as Float32Array;
    const px = lib.ptr(x);
    const groups = 64; // channel axis, G 32: 64 rows x 1
    const cent = new Uint16Array(groups * 4).map((_, i) => f16Bits([-1, 0, 1, 2][i % 4]));
    const unsorted = cent.slice();
    unsorted[4 * 9 + 2] = f16Bits(-2);
    const infCent = cent.slice();
    infCent[4 * 9 + 2] = 0x7c00;
    const mk = () => ({
      codes: sentinel(new Uint32Array(128)),
      cent: sentinel(new Uint16Array(groups * 4)),
      f32s: sentinel(new Float32Array(groups * 4)),
      i32s: sentinel(new Int32Array(groups)),
      inertia: sentinel(new Float32Array(groups * 17)),
      out: sentinel(new Float32Array(64 * 32)),
      bytes: sentinel(new Uint8Array(64 * 32)),
    });
    type O = ReturnType<typeof mk>;
    // x: 64 x 32 f32 grouped by 32 along the channel axis at 2 bits; each call below changes one
    // argument by name and keeps the others valid
    type Dims = { rows?: number; cols?: number; axis?: number; group?: number; bits?: number };
    const dims = (d: Dims) =>
      [d.rows ?? 64, d.cols ?? 32, d.axis ?? 1, d.group ?? 32, d.bits ?? 2] as const;
    // x and its dtype, then the sizes
    const matrix = (d: Dims) => [px, 0, ...dims(d)] as const;
    const fit = (
      o: O,
      a: Dims & { fit?: number; iters?: number; cent?: Pointer; trace?: false } = {},
    ) => {
      const c = a.cent === undefined ? lib.ptr(o.cent.buf) : a.cent;
      const traced = (s: Sentinel) => (a.trace === false ? null : lib.ptr(s.buf));
      const rest = [a.fit ?? 0, a.iters ?? 16, 0, c, traced(o.i32s), traced(o.inertia)] as const;
      return lib.call("kivi_codebook_fit", n.ctx, ...matrix(a), ...rest);
    };
    const quantize = (o: O, a: Dims & { cent?: Pointer; assign?: number } = {}) => {
      const c = a.cent === undefined ? lib.ptr(cent) : a.cent, out = lib.ptr(o.codes.buf);
      return lib.call("kivi_codebook_quantize", n.ctx, ...matrix(a), c, a.assign ?? 0, 0, out);
    };
    const encode = (o: O, a: Dims & { assign?: number; codes?: null } = {}) => {
      const out = a.codes === null ? null : lib.ptr(o.codes.buf);
      const rest = [0, 16, a.assign ?? 0, 0, lib.ptr(o.cent.buf), out] as const;
      return lib.call("kivi_codebook_encode", n.ctx, ...matrix(a), ...rest);
    };
    const words = () => lib.ptr(new Uint32Array(128));
    const pack = (codes: Uint8Array, count: number, bits: number, out: Pointer) =>
      lib.call("kivi_codes_pack", n.ctx, lib.ptr(codes), count, bits, out);
    const ARG = "KIVI_ERR_ARG", SHAPE = "KIVI_ERR_SHAPE";
    const cases: [string, (o: O) => number, StatusName, RegExp][] = [
      ["fit max_iters 0", (o) => fit(o, { iters: 0 }), ARG, /max_iters must be in 1\.\.256, got 0/],
      ["fit max_iters 257", (o) => fit(o, { iters: 257, trace: false }), ARG, /max_iters/],
      ["fit fit 2", (o) => fit(o, { fit: 2, trace: false }), ARG, /\bfit must be/],
      ["fit centroids NULL", (o) => fit(o, { cent: null }), ARG, /centroids must not be NULL/],
      ["fit group 48", (o) => fit(o, { group: 48 }), ARG, /group/],
      [
        "quantize unsorted",
        (o) => quantize(o, { cent: lib.ptr(unsorted) }),
        ARG,
        /centroids must be sorted ascending.*group 9/,
      ],
      [
        "quantize Inf centroid",
        (o) => quantize(o, { cent: lib.ptr(infCent) }),
        ARG,
        /centroids must be finite/,
      ],
      ["quantize assign 2", (o) => quantize(o, { assign: 2 }), ARG, /assign/],
      ["quantize bits 3", (o) => quantize(o, { bits: 3 }), ARG, /bits/],
      [
        "quantize centroids NULL",
        (o) => quantize(o, { cent: null }),
        ARG,
        /centroids must not be NULL/,
      ],
      ["encode assign 5", (o) => encode(o, { assign: 5 }), ARG, /assign/],
      [
        "encode cols 32 rows 48 token",
        (o) => encode(o, { rows: 48, axis: 0 }),
        SHAPE,
        /rows \(48\)/,
      ],
      ["encode codes NULL", (o) => encode(o, { codes: null }), ARG, /\bcodes must not be NULL/],
      [
        "cb dequantize out NULL",
        () =>
          lib.call("kivi_codebook_dequantize", n.ctx, words(), lib.ptr(cent), ...dims({}), null, 0),
        ARG,
        /\bout must not be NULL/,
      ],
      [
        "cb dequantize out_dtype 9",
        (o) =>
          lib.call(
            "kivi_codebook_dequantize",
            n.ctx,
            words(),
            lib.ptr(cent),
            ...dims({}),
            lib.ptr(o.out.buf),
            9,
          ),
        ARG,
        /out_dtype/,
      ],
      [
        "uniform dequantize scale NULL",
        (o) =>
          lib.call(
            "kivi_uniform_dequantize",
            n.ctx,
            words(),
            null,
            lib.ptr(new Uint16Array(64)),
            ...dims({}),
            lib.ptr(o.out.buf),
            0,
          ),
        ARG,
        /\bscale must not be NULL/,
      ],
      [
        "uniform dequantize group 48",
        (o) => {
          const half = () => lib.ptr(new Uint16Array(64));
          return lib.call(
            "kivi_uniform_dequantize",
            n.ctx,
            words(),
            half(),
            half(),
            ...dims({ group: 48 }),
            lib.ptr(o.out.buf),
            0,
          );
        },
        ARG,
        /group/,
      ],
      [
        "stats nonfinite NULL",
        (o) => lib.call("kivi_stats_block", n.ctx, px, 0, 64, 32, 1, 32, lib.ptr(o.f32s.buf), null),
        ARG,
        /nonfinite must not be NULL/,
      ],
      [
        "stats cols 48",
        (o) =>
          lib.call(
            "kivi_stats_block",
            n.ctx,
            px,
            0,
            32,
            48,
            1,
            32,
            lib.ptr(o.f32s.buf),
            lib.ptr(o.i32s.buf),
          ),
        SHAPE,
        /cols \(48\)/,
      ],
      [
        "pack n 15",
        (o) => pack(new Uint8Array(15), 15, 2, lib.ptr(o.codes.buf)),
        SHAPE,
        /\bn \(15\) must be a multiple of 16/,
      ],
      [
        "pack n 0",
        (o) => pack(new Uint8Array(16), 0, 2, lib.ptr(o.codes.buf)),
        ARG,
        /\bn must be >= 1/,
      ],
      [
        "pack code 4",
        (o) => pack(new Uint8Array(32).fill(4, 20, 21), 32, 2, lib.ptr(o.codes.buf)),
        ARG,
        /codes\[20\] must be below 2\^bits/,
      ],
      [
        "pack code 16 at 4 bits",
        (o) => pack(new Uint8Array(8).fill(16, 7), 8, 4, lib.ptr(o.codes.buf)),
        ARG,
        /codes\[7\]/,
      ],
      ["pack bits 3", (o) => pack(new Uint8Array(32), 32, 3, lib.ptr(o.codes.buf)), ARG, /bits/],
      [
        "pack words NULL",
        () => pack(new Uint8Array(32), 32, 2, null),
        ARG,
        /words must not be NULL/,
      ],
      [
        "unpack n 20 at 4 bits",
        (o) =>
          lib.call(
            "kivi_codes_unpack",
            n.ctx,
            lib.ptr(new Uint32Array(4)),
            20,
            4,
            lib.ptr(o.bytes.buf),
          ),
        SHAPE,
        /\bn \(20\)/,
      ],
      [
        "unpack words NULL",
        (o) => lib.call("kivi_codes_unpack", n.ctx, null, 16, 2, lib.ptr(o.bytes.buf)),
        ARG,
        /words must not be NULL/,
      ],
    ];
    for (const [what, call, want, names] of cases) {
      const o = mk();
      expectStatus(n, call(o), want, names, what);
      untouched(o, what);
    }
    // the fit accepts NULL iters and inertia ("or NULL")
    const c = new Uint16Array(groups * 4);
    assert.equal(fit(mk(), { cent: lib.ptr(c), trace: false }), 0);
  });

  it("library and context exports report their own bad arguments", async () => {
    using n = await openNative();
    const { lib } = n;
    const out = sentinel(new BigUint64Array(1));
    expectStatus(
      n,
      lib.call("kivi_ctx_create", 1, lib.ptr(out.buf)),
      "KIVI_ERR_NO_DEVICE",
      /device must be 0 in the CPU build, got 1/,
      "ctx device 1",
      false,
    );
    assertUntouched(out, "ctx_create out");
    expectStatus(
      n,
      lib.call("kivi_ctx_create", 0, null),
      "KIVI_ERR_ARG",
      /\bout must not be NULL/,
      "ctx out NULL",
      false,
    );
    expectStatus(
      n,
      lib.call("kivi_device_count", null),
      "KIVI_ERR_ARG",
      /count must not be NULL/,
      "device_count NULL",
      false,
    );
    expectStatus(
      n,
      lib.call("kivi_mem_alloc", n.ctx, 0, lib.ptr(out.buf)),
      "KIVI_ERR_ARG",
      /bytes must be > 0/,
      "alloc 0",
    );
    assertUntouched(out, "mem_alloc out");
    expectStatus(
      n,
      lib.call("kivi_ctx_query", n.ctx, null),
      "KIVI_ERR_ARG",
      /done must not be NULL/,
      "query NULL",
    );
    expectStatus(
      n,
      lib.call("kivi_bench_copy", n.ctx, 1024, 0, lib.ptr(new Float64Array(1))),
      "KIVI_ERR_ARG",
      /iters must be >= 1/,
      "bench iters 0",
    );
    assert.equal(lib.call("kivi_status_str", -42), "KIVI_ERR_UNKNOWN");
    assert.equal(lib.call("kivi_status_str", 0), "KIVI_OK");
    assert.equal(lib.call("kivi_ctx_destroy", null), 0, "destroy(NULL) is a no-op");
    assert.equal(lib.call("kivi_mem_free", n.ctx, null), 0, "mem_free(NULL) is a no-op");
    const cnt = new Int32Array(1);
    assert.equal(lib.call("kivi_device_count", lib.ptr(cnt)), 0);
    assert.equal(cnt[0], 1);
  });
});
