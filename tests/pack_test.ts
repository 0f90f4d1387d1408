/**
 * pack / unpack: KIVI's LSB-first layout (code j of a word at bit bits * j), bit-exact round trips,
 * and the documented errors.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { type DeviceTensor, KiviError } from "../src/mod.ts";
import { assertSameBits, assertUntouched, BITS, host, openCpu, Rng, sentinel } from "./_helpers.ts";

/** The word kivi.h describes, built in plain JS. */
function packOracle(codes: Uint8Array, bits: number): Uint32Array {
  const cpw = 32 / bits, out = new Uint32Array(codes.length / cpw);
  for (let i = 0; i < codes.length; i++) out[Math.floor(i / cpw)] |= codes[i] << (bits * (i % cpw));
  return out;
}

describe("pack", () => {
  it("matches KIVI's word for codes [1, 2, 3, 0] x 4 at 2 bits", async () => {
    using kivi = await openCpu();
    const codes = new Uint8Array(16).map((_, i) => [1, 2, 3, 0][i % 4]);
    const words = host(kivi.pack(codes, { bits: 2 }));
    assert.deepEqual([...words], [0x39393939]);
    assert.deepEqual([...host(kivi.unpack(words, { bits: 2 }))], [...codes]);
  });

  it("puts code j at nibble j at 4 bits", async () => {
    using kivi = await openCpu();
    const words = host(
      kivi.pack(new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 15]), { bits: 4 }),
    );
    assert.deepEqual([...words], [0x87654321, 0xf000000f]);
    assert.deepEqual([...host(kivi.unpack(new Uint32Array([0x87654321]), { bits: 4 }))], [
      1,
      2,
      3,
      4,
      5,
      6,
      7,
      8,
    ]);
  });

  for (const bits of BITS) {
    it(`round-trips random codes bit-exactly at ${bits} bits`, async () => {
      using kivi = await openCpu();
      const cpw = 32 / bits;
      for (const words of [1, 3, 17, 640]) {
        const rng = new Rng(`pack ${bits} ${words}`);
        const codes = new Uint8Array(words * cpw).map(() => rng.int(1 << bits));
        const packed = host(kivi.pack(codes, { bits }));
        assertSameBits(packed, packOracle(codes, bits), `pack vs oracle ${rng.tag}`);
        assertSameBits(
          host(kivi.unpack(packed, { bits })),
          codes,
          `unpack(pack(codes)) ${rng.tag}`,
        );
      }
    });

    it(`round-trips random words bit-exactly at ${bits} bits`, async () => {
      using kivi = await openCpu();
      const rng = new Rng(`unpack ${bits}`);
      const words = new Uint32Array(97).map(() => (rng.next() * 2 ** 32) >>> 0);
      const codes = host(kivi.unpack(words, { bits }));
      assert.equal(codes.length, 97 * (32 / bits));
      assert.ok(codes.every((q) => q < 1 << bits), `codes below 2^bits ${rng.tag}`);
      assertSameBits(host(kivi.pack(codes, { bits })), words, `pack(unpack(words)) ${rng.tag}`);
    });

    it(`writes into opts.out at ${bits} bits`, async () => {
      using kivi = await openCpu();
      const rng = new Rng(`pack out ${bits}`);
      const codes = new Uint8Array(4 * (32 / bits)).map(() => rng.int(1 << bits));
      const out = new Uint32Array(4).fill(0xdeadbeef);
      assert.equal(kivi.pack(codes, { bits, out }), out);
      assertSameBits(out, packOracle(codes, bits), `out ${rng.tag}`);
      const back = new Uint8Array(codes.length).fill(0xff);
      assert.equal(kivi.unpack(out, { bits, out: back }), back);
      assertSameBits(back, codes, `unpack out ${rng.tag}`);
    });

    it(`rejects a length that is not a multiple of ${32 / bits} at ${bits} bits`, async () => {
      using kivi = await openCpu();
      const cpw = 32 / bits;
      for (const n of [1, cpw - 1, cpw + 1, 3 * cpw + 5]) {
        const out = sentinel(new Uint32Array(4));
        assert.throws(() => kivi.pack(new Uint8Array(n), { bits, out: out.buf }), (e: unknown) => {
          assert.ok(e instanceof RangeError, `n=${n}: ${e}`);
          assert.match((e as Error).message, /codes\.length/);
          assert.match((e as Error).message, new RegExp(`multiple of ${cpw}`));
          return true;
        });
        assertUntouched(out, `n=${n}`);
      }
      assert.throws(() => host(kivi.pack(new Uint8Array(0), { bits })), RangeError);
    });

    it(`rejects a code >= 2^${bits} with KIVI_ERR_ARG and leaves out untouched`, async () => {
      using kivi = await openCpu();
      const rng = new Rng(`pack bad ${bits}`);
      const cpw = 32 / bits;
      for (const bad of [1 << bits, 255]) {
        const codes = new Uint8Array(8 * cpw).map(() => rng.int(1 << bits));
        const at = 3 * cpw + 2;
        codes[at] = bad;
        const out = sentinel(new Uint32Array(8));
        assert.throws(() => kivi.pack(codes, { bits, out: out.buf }), (e: unknown) => {
          assert.ok(e instanceof KiviError, `${e}`);
          assert.equal(e.code, "KIVI_ERR_ARG");
          assert.equal(e.status, -1);
          assert.match(e.message, new RegExp(`codes\\[${at}\\]`));
          return true;
        });
        assertUntouched(out, `code ${bad} ${rng.tag}`);
      }
    });
  }

  it("round-trips through tensors on the CPU backend", async () => {
    using kivi = await openCpu();
    const rng = new Rng("pack tensors");
    const codes = new Uint8Array(64).map(() => rng.int(4));
    using t = kivi.upload(codes) as DeviceTensor<"u8">;
    using w = kivi.pack(t, { bits: 2 }) as DeviceTensor<"u32">;
    assert.equal(w.dtype, "u32");
    assertSameBits(w.readSync(), packOracle(codes, 2), `tensor pack ${rng.tag}`);
    using back = kivi.unpack(w, { bits: 2 }) as DeviceTensor<"u8">;
    assertSameBits(back.readSync(), codes, `tensor unpack ${rng.tag}`);
  });
});
