/**
 * Decode batches (`cache.batch`, src/batch.ts; kivi.h kivi_batch_*) on the CPU build: each layer-step
 * gives the bytes of the general path (`cache.attend`, `seq.append` one sequence at a time) on the
 * same data, across flushes, new pages and every dtype; the deferred checks of q, k and v (NaN in an
 * out, the error at the next call, a poisoned sequence); and every refusal (at creation, and at a call
 * between steps: a freed sequence, a disposed tensor, cache or backend, a read in flight, a bad layer)
 * with nothing changed. On CUDA (where a device is present) the same batch runs on the GPU against its
 * general path.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { Backend, CacheOptions, DecodeBatch, DeviceTensor, KVCache } from "../src/mod.ts";
import type { Sequence } from "../src/mod.ts";
import { KiviError } from "../src/mod.ts";
import { cacheOptions, DTYPES, kvRows, NONFINITE, openCpu, Rng, setRaw } from "./_helpers.ts";
import { throwsNaming, toInput } from "./_helpers.ts";
import { gpu, gpuDescribe } from "./_gpu.ts";

const L = 3, H = 2, QH = 8, D = 64, ROW = H * D;
const OPTS = cacheOptions(L, H, QH, D, 64, 6);

type DT = "f32" | "f16" | "bf16";
/** Host data of a dtype, as a tensor of the backend. */
function tensorOf(kivi: Backend, vals: Float32Array, dtype: DT): DeviceTensor {
  const x = toInput(vals, dtype);
  return kivi.upload(x.x, dtype === "bf16" ? { dtype } : {});
}
const bytesOf = (x: ArrayBufferView | DeviceTensor): Uint8Array => {
  const v = ArrayBuffer.isView(x) ? x : x.readSync();
  return new Uint8Array(v.buffer, v.byteOffset, v.byteLength).slice();
};
/** A sequence of `cache` holding n seeded tokens in every layer. */
function filled(cache: KVCache, rng: Rng, n: number): Sequence {
  const s = cache.createSequence();
  if (n > 0) s.append(kvRows(rng, n, H, D, L), kvRows(rng, n, H, D, L));
  return s;
}

/** A CPU backend, a cache of OPTS, one sequence of `tokens` tokens, and a batch over it whose q
 * holds a NaN at `nanAt`; disposing it disposes them all, the batch first. */
async function nanBatch(label: string, tokens: number, nanAt: number, trusted = false) {
  const rng = new Rng(label);
  const kivi = await openCpu();
  const cache = kivi.createCache(OPTS);
  const seqs = [filled(cache, rng, tokens)];
  const q = nanQ(kivi, rng, nanAt), out = kivi.alloc([1, QH, D], "f32");
  const batch = cache.batch(seqs, trusted ? { q, out, trusted } : { q, out });
  return {
    out,
    batch,
    [Symbol.dispose]() {
      for (const d of [batch, out, q, cache, kivi]) d.dispose();
    },
  };
}

/** Each of `ops` on the batch is KIVI_ERR_STATE with the message "<op>: <why>". */
function refusedOps(
  batch: DecodeBatch<Sequence>,
  ops: readonly ("attend" | "append" | "check")[],
  why: string,
  what: string,
): void {
  for (const op of ops) {
    const call = () => (op === "check" ? batch.check() : batch[op](0));
    throwsNaming(call, "KIVI_ERR_STATE", new RegExp(`${op}: ${why}`), `${what}: ${op}`);
  }
}

/** Everything a failed call must leave as it was. */
function snapshot(kivi: Backend, cache: KVCache, seqs: Sequence[], outs: DeviceTensor[] = []) {
  return {
    mem: cache.memory(),
    seqs: seqs.filter((s) => !s.freed).map((s) => ({
      lens: Array.from({ length: L }, (_, l) => [s.length(l), s.quantizedLength(l)]),
      pages: [...s.pages()],
      reads: Array.from({ length: L }, (_, l) => {
        const r = cache.read(s, l);
        return [bytesOf(r.keys as Float32Array), bytesOf(r.values as Float32Array)];
      }),
    })),
    outs: outs.filter((t) => !t.disposed).map(bytesOf),
    tensors: kivi.liveTensors,
  };
}

/** One sequence's q with a NaN at element `at`, uploaded. */
function nanQ(kivi: Backend, rng: Rng, at: number): DeviceTensor {
  const qv = kvRows(rng, 1, QH, D);
  qv[at] = NaN;
  return kivi.upload(qv);
}

describe("decode batch: the same bytes as the general path", () => {
  it("batch.attend gives cache.attend's output for every q and out dtype, GQA, every layer, sequences of different lengths", async () => {
    const rng = new Rng("batch attend");
    using kivi = await openCpu();
    using cache = kivi.createCache(OPTS);
    const seqs = [filled(cache, rng, 1), filled(cache, rng, 45), filled(cache, rng, 150)];
    for (const qd of DTYPES) {
      for (const od of DTYPES) {
        using q = tensorOf(kivi, kvRows(rng, seqs.length, QH, D), qd);
        using out = kivi.alloc([seqs.length, QH, D], od);
        for (const trusted of [false, true]) {
          using batch = cache.batch(seqs, { q, out, trusted, ...(trusted ? { scale: 0.3 } : {}) });
          for (let l = 0; l < L; l++) {
            batch.attend(l);
            const want = cache.attend(l, seqs, q, {
              dtype: od,
              ...(trusted ? { scale: 0.3 } : {}),
            }) as DeviceTensor;
            assert.deepEqual(
              bytesOf(out),
              bytesOf(want),
              `q ${qd}, out ${od}, layer ${l}, trusted ${trusted} ${rng.tag}`,
            );
            want.dispose();
          }
          batch.synchronizeSync();
        }
      }
    }
  });

  const formats: [string, Partial<CacheOptions>][] = [
    ["uniform 2-bit keys, codebook values", {}],
    ["bits 16", { keys: { bits: 16 }, values: { bits: 16 } }],
    ["4-bit keys, residual 0 (the token goes straight into its page)", {
      residual: 0,
      keys: { kind: "uniform", bits: 4, group: 32 },
    }],
    ["codebook keys G64, page 64", {
      pageTokens: 64,
      residual: 64,
      keys: { kind: "codebook", bits: 2, group: 64 },
      values: { kind: "uniform", bits: 4, group: 64 },
    }],
  ];
  for (const [name, o] of formats) {
    it(`batch.append stores what seq.append stores, step after step, across flushes and new pages (${name})`, async () => {
      const rng = new Rng(`batch append ${name}`);
      using kivi = await openCpu();
      const opts = { ...OPTS, ...o };
      using a = kivi.createCache(opts), b = kivi.createCache(opts);
      const lens = [0, 31, 70];
      const sa = lens.map((n) => filled(a, new Rng(`prefill ${n}`), n)),
        sb = lens.map((n) => filled(b, new Rng(`prefill ${n}`), n));
      // a prefill leaves the layer empty for n = 0: the batch appends there too
      const dts: DT[] = ["f32", "f16", "bf16"];
      using q = kivi.upload(kvRows(rng, 3, QH, D)), out = kivi.alloc([3, QH, D], "f32");
      const start = a.memory();
      for (let step = 0; step < 75; step++) {
        const dt = dts[step % 3];
        using k = tensorOf(kivi, kvRows(rng, 3, H, D), dt),
          v = tensorOf(kivi, kvRows(rng, 3, H, D), dt);
        using batch = a.batch(sa, { q, out, k, v, trusted: step % 2 === 0 });
        const kh = k.readSync(), vh = v.readSync();
        for (let l = 0; l < L; l++) {
          batch.append(l);
          sb.forEach((s, i) => {
            const opt = { layer: l, ...(dt === "bf16" ? { dtype: "bf16" as const } : {}) };
            s.append(
              kh.subarray(i * ROW, (i + 1) * ROW) as Float32Array,
              vh.subarray(i * ROW, (i + 1) * ROW) as Float32Array,
              opt,
            );
          });
          batch.attend(l);
          const want = b.attend(l, sb, q) as DeviceTensor;
          assert.deepEqual(
            bytesOf(out),
            bytesOf(want),
            `step ${step}, layer ${l}: attention after the append ${rng.tag}`,
          );
          want.dispose();
        }
        batch.synchronizeSync();
        if (step % 15 === 14 || step === 74) {
          assert.deepEqual(a.memory(), b.memory(), `step ${step}: memory report`);
          sa.forEach((s, i) => {
            assert.deepEqual(
              [...s.pages()],
              [...sb[i].pages()],
              `step ${step}: block table of sequence ${i}`,
            );
            for (let l = 0; l < L; l++) {
              assert.deepEqual([s.length(l), s.quantizedLength(l)], [
                sb[i].length(l),
                sb[i].quantizedLength(l),
              ], `step ${step}: lengths`);
              const x = a.read(s, l), y = b.read(sb[i], l);
              assert.deepEqual(
                bytesOf(x.keys as Float32Array),
                bytesOf(y.keys as Float32Array),
                `step ${step}, seq ${i}, layer ${l}: keys ${rng.tag}`,
              );
              assert.deepEqual(
                bytesOf(x.values as Float32Array),
                bytesOf(y.values as Float32Array),
                `step ${step}, seq ${i}, layer ${l}: values`,
              );
            }
          });
        }
      }
      const end = a.memory();
      assert.ok(
        end.quantizedTokens > start.quantizedTokens && end.pagesUsed > start.pagesUsed,
        "the run crossed flushes and new pages",
      );
    });
  }
});

describe("decode batch: deferred checks", () => {
  for (const dt of DTYPES) {
    it(`${dt}: NaN, +Inf and -Inf in q make that out NaN; the next call throws KIVI_ERR_NONFINITE naming it, the cache unchanged; the batch goes on`, async () => {
      const rng = new Rng(`batch q nonfinite ${dt}`);
      using kivi = await openCpu();
      using cache = kivi.createCache(OPTS);
      const seqs = [filled(cache, rng, 40), filled(cache, rng, 90)];
      const qv = kvRows(rng, 2, QH, D);
      for (const [name, bits] of NONFINITE[dt]) {
        const x = toInput(qv, dt).x as Float32Array | Float16Array | Uint16Array;
        const at = QH * D + 3 * D + 17; // batch 1, head 3, channel 17
        setRaw(x, at, bits);
        using q = kivi.upload(x, dt === "bf16" ? { dtype: "bf16" } : {}),
          out = kivi.alloc([2, QH, D], "f32");
        using batch = cache.batch(seqs, { q, out });
        const before = snapshot(kivi, cache, seqs);
        batch.attend(2); // returns: the check is deferred
        assert.ok(
          (out.readSync() as Float32Array).every((o) => Number.isNaN(o)),
          `${name}: out is NaN`,
        );
        throwsNaming(
          () => batch.attend(1),
          "KIVI_ERR_NONFINITE",
          new RegExp(
            `kivi_batch_attend \\(layer 2\\) met ${
              name.replace("+", "\\+")
            } in q at batch 1 \\(sequence ${seqs[1].id}\\), head 3, channel 17; that call's out`,
          ),
          `${name} ${rng.tag}`,
        );
        assert.deepEqual(snapshot(kivi, cache, seqs), before, `${name}: the cache changed`);
        batch.check(); // read: nothing pending
        // the batch works again once q is finite, and gives the general path's bytes
        q.write(toInput(qv, dt).x as never);
        batch.attend(1);
        const want = cache.attend(1, seqs, q) as DeviceTensor;
        assert.deepEqual(bytesOf(out), bytesOf(want), `${name}: after the error`);
        want.dispose();
      }
    });
  }

  it("check() and synchronizeSync() throw a deferred error once; synchronize() too", async () => {
    using f = await nanBatch("batch check", 10, 5);
    const { batch } = f;
    for (const read of [() => batch.check(), () => batch.synchronizeSync()]) {
      batch.attend(0);
      throwsNaming(
        read,
        "KIVI_ERR_NONFINITE",
        /kivi_batch_status: kivi_batch_attend \(layer 0\) met NaN in q at batch 0 \(sequence \d+\), head 0, channel 5/,
        "read",
      );
      read(); // read: nothing more
    }
    batch.attend(1);
    await assert.rejects(
      batch.synchronize(),
      (e: unknown) =>
        e instanceof KiviError && e.code === "KIVI_ERR_NONFINITE" && /layer 1/.test(e.message),
    );
    await batch.synchronize();
  });

  for (const dt of DTYPES) {
    it(`${dt}: NaN, Inf or a value beyond fp16 in k or v is stored; once read, its sequence is refused (KIVI_ERR_NONFINITE) and the others go on`, async () => {
      const rng = new Rng(`batch kv nonfinite ${dt}`);
      using kivi = await openCpu();
      using cache = kivi.createCache(OPTS);
      const bad: [string, number, RegExp][] = [
        ...NONFINITE[dt].map(([n, b]) =>
          [n, b, new RegExp(n.replace("+", "\\+"))] as [string, number, RegExp]
        ),
        ...(dt === "f16" ? [] : [
          [
            "beyond fp16",
            dt === "f32" ? 1e5 : 0x47c3,
            /a finite value beyond fp16's range \(\|x\| >= 65520\)/,
          ] as [string, number, RegExp],
        ]),
      ];
      for (const [name, bits, shown] of bad) {
        for (const part of ["k", "v"] as const) {
          const seqs = [filled(cache, rng, 20), filled(cache, rng, 33), filled(cache, rng, 5)];
          const kv = [kvRows(rng, 3, H, D), kvRows(rng, 3, H, D)].map((a) =>
            toInput(a, dt).x as Float32Array | Float16Array | Uint16Array
          );
          const at = ROW + D + 9; // batch 1, head 1, channel 9
          setRaw(kv[part === "k" ? 0 : 1], at, bits);
          const hint = dt === "bf16" ? { dtype: "bf16" as const } : {};
          using k = kivi.upload(kv[0], hint), v = kivi.upload(kv[1], hint);
          using q = kivi.upload(kvRows(rng, 3, QH, D)), out = kivi.alloc([3, QH, D], "f32");
          using batch = cache.batch(seqs, { q, out, k, v });
          using q1 = kivi.alloc([1, QH, D], "f32"), o1 = kivi.alloc([1, QH, D], "f32");
          const lens = seqs.map((s) => s.length(1));
          batch.append(1); // stored, deferred
          assert.deepEqual(
            seqs.map((s) => s.length(1)),
            lens.map((n) => n + 1),
            `${name} in ${part}: every token stored`,
          );
          // The CPU build's check ran inside the call, so the next call finds the error (on CUDA a call
          // made before the device ran the check would go on, its out NaN)
          const before = bytesOf(out);
          throwsNaming(
            () => batch.attend(0),
            "KIVI_ERR_NONFINITE",
            new RegExp(
              `kivi_batch_append \\(layer 1\\) met ${shown.source} in ${part} at batch 1 \\(sequence ${
                seqs[1].id
              }\\), head 1, channel 9; the token was stored`,
            ),
            `${name} in ${part} ${rng.tag}`,
          );
          assert.deepEqual(
            bytesOf(out),
            before,
            `${name} in ${part}: the failing call wrote nothing`,
          );
          const poisoned = new RegExp(
            `sequence ${
              seqs[1].id
            } holds a non-finite value that batch\\.append stored in layer 1 \\(a deferred check\\); free it`,
          );
          for (
            const [what, fn] of [
              ["batch.attend", () => batch.attend(0)],
              ["batch.append", () => batch.append(0)],
              ["cache.attend", () => cache.attend(0, [seqs[1]], q.readSync().subarray(0, QH * D))],
              ["seq.append", () =>
                seqs[1].append(
                  kv[0].subarray(0, ROW) as Float32Array,
                  kv[0].subarray(0, ROW) as Float32Array,
                  { layer: 0, ...hint },
                )],
              ["cache.read", () => cache.read(seqs[1], 0)],
              ["a new batch", () => cache.batch([seqs[1]], { q: q1, out: o1 })],
            ] as [string, () => unknown][]
          ) throwsNaming(fn, "KIVI_ERR_NONFINITE", poisoned, `${name} in ${part}: ${what}`);
          assert.equal(seqs[1].length(1), lens[1] + 1, "its length can still be read");
          // the others go on in a batch without it, with the general path's bytes
          using rest = cache.batch([seqs[0], seqs[2]], {
            q: kivi.upload(kvRows(rng, 2, QH, D)),
            out: kivi.alloc([2, QH, D], "f32"),
          });
          rest.attend(1);
          for (const s of seqs) s.free();
        }
      }
    });
  }

  it("a trusted batch checks nothing: a NaN q gives what the kernel gives, and no error follows", async () => {
    using f = await nanBatch("batch trusted", 50, 0, true);
    const { out, batch } = f;
    assert.equal(batch.trusted, true);
    batch.attend(0);
    batch.synchronizeSync();
    const o = out.readSync() as Float32Array;
    assert.ok(
      Number.isNaN(o[0]) && o.subarray(D).every((x) => Number.isFinite(x)),
      "head 0 is NaN, the other heads are finite",
    );
  });
});

describe("decode batch: refusals", () => {
  async function world(label: string) {
    const rng = new Rng(`batch refusals ${label}`);
    const kivi = await openCpu();
    const cache = kivi.createCache(OPTS);
    const seqs = [filled(cache, rng, 40), filled(cache, rng, 100)];
    const q = kivi.upload(kvRows(rng, 2, QH, D)), out = kivi.alloc([2, QH, D], "f32");
    const k = kivi.upload(kvRows(rng, 2, H, D)), v = kivi.upload(kvRows(rng, 2, H, D));
    return { rng, kivi, cache, seqs, q, out, k, v };
  }

  it("bad arguments at creation are TypeErrors or RangeErrors naming them (or KiviErrors for dead objects); nothing is made", async () => {
    const w = await world("creation");
    using _ = w.kivi;
    const { cache, seqs, q, out, v, kivi } = w;
    using other = await openCpu();
    using foreign = other.upload(kvRows(w.rng, 2, QH, D));
    using q16 = kivi.alloc([2, QH, D], "f16"),
      small = kivi.alloc([1, QH, D], "f32"),
      u32 = kivi.alloc([2, QH, D], "u32");
    using k16 = kivi.alloc([2, H, D], "f16"), gone = kivi.alloc([2, QH, D], "f32");
    gone.dispose();
    using q3 = kivi.alloc([3, QH, D], "f32"),
      out3 = kivi.alloc([3, QH, D], "f32"),
      out1 = kivi.alloc([1, QH, D], "f32");
    using otherCache = kivi.createCache(OPTS);
    const stranger = otherCache.createSequence();
    const freed = filled(cache, w.rng, 3);
    freed.free();
    const before = snapshot(kivi, cache, seqs);
    const refs = kivi._nativeRefs;
    const cases: [string, () => unknown, Parameters<typeof throwsNaming>[1], RegExp][] = [
      [
        "seqs empty",
        () => cache.batch([], { q, out }),
        TypeError,
        /seqs must be a non-empty array of Sequences, got \[\]/,
      ],
      [
        "seqs not an array",
        () => cache.batch(seqs[0] as never, { q, out }),
        TypeError,
        /seqs must be a non-empty array of Sequences/,
      ],
      [
        "a sequence repeated",
        () => cache.batch([seqs[0], seqs[1], seqs[0]], { q: q3, out: out3 }),
        TypeError,
        /seqs\[2\] repeats seqs\[0\]; a batch holds each sequence once/,
      ],
      [
        "a sequence of another cache",
        () => cache.batch([stranger], { q: small, out: out1 }),
        TypeError,
        /seqs\[0\] must be a Sequence of this cache/,
      ],
      [
        "a duck-typed sequence",
        () => cache.batch([{ id: 0, cache } as never, seqs[1]], { q, out }),
        TypeError,
        /seqs\[0\] must be a Sequence of this cache, got Object/,
      ],
      [
        "a freed sequence",
        () => cache.batch([seqs[0], freed], { q, out }),
        "KIVI_ERR_STATE",
        /batch: the sequence was freed; create a new one/,
      ],
      [
        "more than 512",
        () => cache.batch(Array(513).fill(seqs[0]), { q, out }),
        RangeError,
        /seqs must hold at most 512 sequences, got 513/,
      ],
      [
        "options null",
        () => cache.batch(seqs, null as never),
        TypeError,
        /options must be an object, got null/,
      ],
      [
        "an unknown option",
        () => cache.batch(seqs, { q, out, tusted: true } as never),
        TypeError,
        /options has an unknown key "tusted"; did you mean "trusted"\?/,
      ],
      [
        "no buffers",
        () => cache.batch(seqs, {}),
        TypeError,
        /a batch needs q and out \(attend\), k and v \(append\), or all four/,
      ],
      [
        "q alone",
        () => cache.batch(seqs, { q }),
        TypeError,
        /q and out must be given together, got q alone/,
      ],
      [
        "v alone",
        () => cache.batch(seqs, { v }),
        TypeError,
        /k and v must be given together, got v alone/,
      ],
      [
        "q a host array",
        () => cache.batch(seqs, { q: q.readSync() as never, out }),
        TypeError,
        /q must be a DeviceTensor, got Float32Array: a batch keeps its buffers where the library works/,
      ],
      [
        "q a Proxy of a tensor",
        () => cache.batch(seqs, { q: new Proxy(q, {}), out }),
        TypeError,
        /q must be a DeviceTensor, got/,
      ],
      [
        "q of another backend",
        () => cache.batch(seqs, { q: foreign, out }),
        TypeError,
        /q belongs to another backend; upload it to this one first/,
      ],
      [
        "out u32",
        () => cache.batch(seqs, { q, out: u32 }),
        RangeError,
        /out\.dtype must be one of "f32", "f16", "bf16", got "u32"/,
      ],
      [
        "q too short",
        () => cache.batch(seqs, { q: small, out }),
        TypeError,
        /q must hold batch \(2\) x queryHeads \(8\) x headDim \(64\) = 1024 values, got 512/,
      ],
      [
        "out too short",
        () => cache.batch(seqs, { q, out: small }),
        TypeError,
        /out must hold batch \(2\) x queryHeads \(8\) x headDim \(64\) = 1024 values like q, got 512/,
      ],
      [
        "k with q's length",
        () => cache.batch(seqs, { k: q, v }),
        TypeError,
        /k must hold batch \(2\) x kvHeads \(2\) x headDim \(64\) = 256 values \(one token a sequence\), got 1024/,
      ],
      [
        "k f16, v f32",
        () => cache.batch(seqs, { k: k16, v }),
        TypeError,
        /k and v must have the same dtype, got f16 and f32/,
      ],
      [
        "out = q",
        () => cache.batch(seqs, { q, out: q }),
        TypeError,
        /out must not share memory with q/,
      ],
      [
        "out = q (dtypes apart)",
        () => cache.batch(seqs, { q: q16, out: q16 }),
        TypeError,
        /out must not share memory with q/,
      ],
      [
        "scale NaN",
        () => cache.batch(seqs, { q, out, scale: NaN }),
        RangeError,
        /scale must be a number finite in fp32/,
      ],
      [
        "scale past fp32",
        () => cache.batch(seqs, { q, out, scale: 1e39 }),
        RangeError,
        /scale must be a number finite in fp32 \(below 3\.4e38 in magnitude\), got 1e\+39/,
      ],
      [
        "trusted not a boolean",
        () => cache.batch(seqs, { q, out, trusted: "false" as never }),
        TypeError,
        /trusted must be a boolean, got "false"/,
      ],
      [
        "a disposed tensor",
        () => cache.batch(seqs, { q: gone, out }),
        "KIVI_ERR_STATE",
        /batch: the tensor was disposed; allocate a new one/,
      ],
    ];
    for (const [what, fn, kind, names] of cases) {
      throwsNaming(fn, kind, names, what);
      assert.deepEqual(snapshot(kivi, cache, seqs), before, `${what}: the cache changed`);
    }
    assert.equal(kivi._nativeRefs, refs, "no native batch was made");
  });

  it("between steps: a freed sequence, a reused slot, disposed tensors, an out being read, bad layers, a batch without k or q: typed errors, nothing changed", async () => {
    const w = await world("steps");
    using _ = w.kivi;
    const { kivi, cache, seqs, q, out, k, v, rng } = w;
    const extra = filled(cache, rng, 12);
    const all = [...seqs, extra];
    using q3 = kivi.upload(kvRows(rng, 3, QH, D)), out3 = kivi.alloc([3, QH, D], "f32");
    using k3 = kivi.upload(kvRows(rng, 3, H, D)), v3 = kivi.upload(kvRows(rng, 3, H, D));
    const batch = cache.batch(all, { q: q3, out: out3, k: k3, v: v3 });
    batch.append(0);
    batch.attend(0);
    const check = (
      what: string,
      fn: () => unknown,
      kind: Parameters<typeof throwsNaming>[1],
      names: RegExp,
      outs: DeviceTensor[] = [out3],
    ) => {
      const before = snapshot(kivi, cache, all, outs);
      throwsNaming(fn, kind, names, `${what} ${rng.tag}`);
      assert.deepEqual(snapshot(kivi, cache, all, outs), before, `${what}: something changed`);
    };
    for (
      const [name, layer, kind, msg] of [
        ["layer past the last", L, RangeError, /layer must be between 0 and 2, got 3/],
        ["layer negative", -1, RangeError, /layer must be between 0 and 2, got -1/],
        ["layer fractional", 0.5, RangeError, /layer must be an integer, got 0\.5/],
        ["layer NaN", NaN, RangeError, /layer must be an integer, got NaN/],
        ["layer a string", "1", TypeError, /layer must be a number, got "1"/],
        [
          "layer an object with valueOf",
          { valueOf: () => 1 },
          TypeError,
          /layer must be a number, got Object/,
        ],
      ] as [string, unknown, Parameters<typeof throwsNaming>[1], RegExp][]
    ) {
      check(`attend: ${name}`, () => batch.attend(layer as number), kind, msg);
      check(`append: ${name}`, () => batch.append(layer as number), kind, msg);
    }
    batch.attend(-0); // -0 is 0
    // an out whose read() is in flight
    const reading = out3.read();
    check(
      "attend while out is read",
      () => batch.attend(1),
      "KIVI_ERR_STATE",
      /attend: out has a read\(\) in flight; await it before writing into the tensor/,
      [],
    );
    await reading;
    // a sequence outside the batch freed: the batch goes on (it re-checks its own)
    filled(cache, rng, 5).free();
    batch.attend(1);
    // a sequence of the batch freed, its slot reused by a new one
    extra.free();
    const reuse = filled(cache, rng, 7);
    assert.equal(
      reuse.id,
      (() => {
        try {
          return extra.id;
        } catch {
          return reuse.id;
        }
      })(),
    );
    const live = [...seqs, reuse];
    const before = snapshot(kivi, cache, live, [out3]);
    refusedOps(batch, ["attend", "append"], "the sequence was freed; create a new one", "freed");
    assert.deepEqual(
      snapshot(kivi, cache, live, [out3]),
      before,
      "a freed sequence: nothing changed",
    );
    batch.dispose();
    // disposed tensors
    using b2 = cache.batch(seqs, { q, out, k, v });
    for (
      const [name, t, call, re] of [
        ["q", q, () => b2.attend(0), /attend: the tensor was disposed; allocate a new one/],
        ["out", out, () => b2.attend(0), /attend: the tensor was disposed; allocate a new one/],
        ["k", k, () => b2.append(0), /append: the tensor was disposed; allocate a new one/],
        ["v", v, () => b2.append(0), /append: the tensor was disposed; allocate a new one/],
      ] as [string, DeviceTensor, () => unknown, RegExp][]
    ) {
      const kept = kivi.upload(t.readSync() as Float32Array);
      t.dispose();
      const snap = snapshot(kivi, cache, seqs);
      throwsNaming(call, "KIVI_ERR_STATE", re, `disposed ${name}`);
      assert.deepEqual(snapshot(kivi, cache, seqs), snap, `disposed ${name}: nothing changed`);
      kept.dispose();
    }
    // a batch without k and v cannot append; one without q and out cannot attend
    const halves = [
      ["append", "k and v", {
        q: q3.readSync().length === 3 * QH * D ? kivi.alloc([2, QH, D], "f32") : q3,
        out: kivi.alloc([2, QH, D], "f32"),
      }],
      ["attend", "q and out", { k: kivi.alloc([2, H, D], "f32"), v: kivi.alloc([2, H, D], "f32") }],
    ] as const;
    for (const [op, without, opts] of halves) {
      using half = cache.batch(seqs, opts);
      check(
        `${op} without ${without}`,
        () => half[op](0),
        "KIVI_ERR_STATE",
        new RegExp(`${op}: the batch was made without ${without}; make one with them`),
        [],
      );
    }
    // a disposed batch
    const dead = cache.batch(seqs, {
      q: kivi.alloc([2, QH, D], "f32"),
      out: kivi.alloc([2, QH, D], "f32"),
    });
    dead.dispose();
    dead.dispose(); // idempotent
    assert.equal(dead.disposed, true);
    check(
      "a disposed batch",
      () => dead.attend(0),
      "KIVI_ERR_STATE",
      /attend: the batch was disposed; make a new one with cache\.batch\(\)/,
      [],
    );
  });

  it("a full pool: a batch append that needs more pages than are free is KIVI_ERR_CAPACITY, every sequence as it was", async () => {
    const rng = new Rng("batch capacity");
    using kivi = await openCpu();
    using cache = kivi.createCache({ ...OPTS, maxPages: 2 });
    // 3 sequences of 63 tokens, all in their windows (R + F = 64): the next token of each flushes 32 into a new page
    const seqs = [filled(cache, rng, 63), filled(cache, rng, 63), filled(cache, rng, 63)];
    using k = kivi.upload(kvRows(rng, 3, H, D)), v = kivi.upload(kvRows(rng, 3, H, D));
    using batch = cache.batch(seqs, { k, v });
    const before = snapshot(kivi, cache, seqs);
    throwsNaming(
      () => batch.append(0),
      "KIVI_ERR_CAPACITY",
      /kivi_batch_append: the page pool is full: the batch's 3 sequences need 3 more page\(s\), 2 of 2 are free/,
      `full ${rng.tag}`,
    );
    assert.deepEqual(snapshot(kivi, cache, seqs), before, "nothing changed");
    // with pages back, it goes through
    using rest = cache.batch(seqs.slice(0, 2), {
      k: kivi.alloc([2, H, D], "f32"),
      v: kivi.alloc([2, H, D], "f32"),
    });
    seqs[2].free();
    rest.append(0);
    assert.deepEqual(seqs.slice(0, 2).map((s) => s.length(0)), [64, 64]);
  });

  it("a disposed cache or backend disposes its batches: KIVI_ERR_STATE naming the cache", async () => {
    const rng = new Rng("batch disposed cache");
    const kivi = await openCpu();
    const cache = kivi.createCache(OPTS);
    const seqs = [filled(cache, rng, 9)];
    const q = kivi.upload(kvRows(rng, 1, QH, D)), out = kivi.alloc([1, QH, D], "f32");
    const batch = cache.batch(seqs, { q, out });
    const refs = kivi._nativeRefs;
    cache.dispose();
    assert.equal(batch.disposed, true);
    assert.equal(kivi._nativeRefs, refs - 2, "the batch and the cache let go of the context");
    refusedOps(batch, ["attend", "check"], "the cache was disposed; create a new one", "cache");
    const c2 = kivi.createCache(OPTS);
    const b2 = c2.batch([filled(c2, rng, 3)], { q, out });
    kivi.dispose();
    assert.equal(b2.disposed, true);
    assert.equal(kivi._nativeRefs, 0, "the context was released");
    throwsNaming(
      () => b2.attend(0),
      "KIVI_ERR_STATE",
      /attend: the cache was disposed; create a new one/,
      "backend",
    );
  });
});

describe("decode batch: the error record's rules (kivi.h)", () => {
  it("kivi_batch_status reports op 0 and clears nothing when there was no error; NULL and bad sizes are KIVI_ERR_ARG", async () => {
    using kivi = await openCpu();
    const { lib } = kivi._native("test");
    const report = new BigInt64Array(6).fill(7n);
    assert.equal(
      lib.call("kivi_batch_status", null, 0, lib.ptr(report), 6, null),
      -1,
      "NULL batch",
    );
    assert.equal(lib.call("kivi_batch_attend", null, 0), -1);
    assert.equal(lib.call("kivi_batch_append", null, 0), -1);
    assert.equal(lib.call("kivi_batch_destroy", null), 0, "NULL is a no-op");
    using cache = kivi.createCache(OPTS);
    const s = filled(cache, new Rng("status"), 4);
    using q = kivi.alloc([1, QH, D], "f32"), out = kivi.alloc([1, QH, D], "f32");
    q.write(new Float32Array(QH * D).fill(0.25));
    using batch: DecodeBatch = cache.batch([s], { q, out });
    batch.attend(0);
    batch.check();
  });
});

gpuDescribe("decode batch on CUDA", (g) => {
  it("attend and append give the general path's bytes on the device; a NaN q is deferred there too", () => {
    const rng = new Rng("batch gpu");
    using cache = g.createCache(OPTS), twin = g.createCache(OPTS);
    const lens = [3, 40, 140];
    const sa = lens.map((n) => filled(cache, new Rng(`gpu prefill ${n}`), n)),
      sb = lens.map((n) => filled(twin, new Rng(`gpu prefill ${n}`), n));
    for (const dt of ["f16", "f32", "bf16"] as DT[]) {
      using q = tensorOf(g, kvRows(rng, 3, QH, D), dt), out = g.alloc([3, QH, D], dt);
      using k = tensorOf(g, kvRows(rng, 3, H, D), dt), v = tensorOf(g, kvRows(rng, 3, H, D), dt);
      using batch = cache.batch(sa, { q, out, k, v });
      const kh = k.readSync(), vh = v.readSync();
      for (let step = 0; step < 40; step++) {
        for (let l = 0; l < L; l++) {
          batch.append(l);
          sb.forEach((s, i) => {
            using kt = g.upload(
              kh.subarray(i * ROW, (i + 1) * ROW) as Float32Array,
              dt === "bf16" ? { dtype: "bf16" } : {},
            );
            using vt = g.upload(
              vh.subarray(i * ROW, (i + 1) * ROW) as Float32Array,
              dt === "bf16" ? { dtype: "bf16" } : {},
            );
            s.append(kt, vt, { layer: l });
          });
          batch.attend(l);
          const want = twin.attend(l, sb, q, { dtype: dt }) as DeviceTensor;
          assert.deepEqual(
            bytesOf(out),
            bytesOf(want),
            `${dt}, step ${step}, layer ${l} ${rng.tag}`,
          );
          want.dispose();
        }
      }
      batch.synchronizeSync();
      for (let l = 0; l < L; l++) {
        sa.forEach((s, i) => {
          const x = cache.read(s, l), y = twin.read(sb[i], l);
          assert.deepEqual(
            bytesOf(x.keys as DeviceTensor),
            bytesOf(y.keys as DeviceTensor),
            `${dt}: keys of ${i}, layer ${l}`,
          );
          assert.deepEqual(
            bytesOf(x.values as DeviceTensor),
            bytesOf(y.values as DeviceTensor),
            `${dt}: values of ${i}, layer ${l}`,
          );
          for (const t of [x.keys, x.values, y.keys, y.values]) (t as DeviceTensor).dispose();
        });
      }
    }
    const qv = kvRows(rng, 3, QH, D);
    qv[2 * QH * D + 5 * D + 1] = Infinity;
    using q = g.upload(qv), out = g.alloc([3, QH, D], "f32");
    using batch = cache.batch(sa, { q, out });
    batch.attend(1);
    throwsNaming(
      () => batch.synchronizeSync(),
      "KIVI_ERR_NONFINITE",
      /kivi_batch_attend \(layer 1\) met \+Inf in q at batch 2 \(sequence \d+\), head 5, channel 1/,
      "gpu q",
    );
    assert.ok((out.readSync() as Float32Array).every((x) => Number.isNaN(x)), "the out is NaN");
    void gpu;
  });
});
