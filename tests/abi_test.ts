/**
 * The ABI written once in cuda/include/kivi.h and once in src/ffi/symbols.ts must agree: same
 * exports, same arity, exact-width types (never widened), and the built libraries (the CPU one, and
 * the CUDA one where it was built) export exactly those symbols.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { type FfiType, symbols } from "../src/ffi/symbols.ts";
import { ABI_VERSION, defaultLibraryPath, Status } from "../src/mod.ts";
import { loadNative } from "../src/ffi/load.ts";

const HEADER = fileURLToPath(new URL("../cuda/include/kivi.h", import.meta.url));

interface Param {
  type: string;
  name: string;
}
interface Decl {
  name: string;
  returns: string;
  params: Param[];
}

function stripComments(src: string): string {
  return src.replace(/\/\*[\s\S]*?\*\//g, " ").replace(/\/\/[^\n]*/g, " ");
}

/** Every `KIVI_API <type> kivi_xxx(<params>);` of the header (params may span lines). */
function parseHeader(
  src: string,
): { decls: Decl[]; int32Typedefs: Set<string>; pointerTypedefs: Set<string> } {
  const text = stripComments(src);
  const int32Typedefs = new Set(
    [...text.matchAll(/typedef\s+int32_t\s+(\w+)\s*;/g)].map((m) => m[1]),
  );
  const pointerTypedefs = new Set(
    [...text.matchAll(/typedef\s+[\w\s]+\*\s*(\w+)\s*;/g)].map((m) => m[1]),
  );
  const decls: Decl[] = [];
  for (const m of text.matchAll(/KIVI_API\s+([^;(]*?)\b(kivi_\w+)\s*\(([^)]*)\)\s*;/g)) {
    const inner = m[3].replace(/\s+/g, " ").trim();
    const params = inner === "void" || inner === "" ? [] : inner.split(",").map((p) => {
      const t = p.trim();
      const pm = /^(.*?)(\w+)$/.exec(t);
      assert.ok(pm, `cannot parse parameter "${t}" of ${m[2]}`);
      return { type: pm[1].replace(/\s+/g, " ").trim(), name: pm[2] };
    });
    decls.push({ name: m[2], returns: m[1].replace(/\s+/g, " ").trim(), params });
  }
  return { decls, int32Typedefs, pointerTypedefs };
}

const header = readFileSync(HEADER, "utf8");
const parsed = parseHeader(header);

/** The FFI type a C type must map to, exactly. */
function ffiOf(ctype: string): FfiType | undefined {
  const t = ctype.replace(/\bconst\b/g, "").replace(/\s+/g, " ").trim();
  if (t.includes("*")) return t === "char *" ? "cstring" : "ptr";
  if (parsed.pointerTypedefs.has(t)) return "ptr";
  if (t === "int32_t" || parsed.int32Typedefs.has(t)) return "i32";
  if (t === "int64_t") return "i64";
  if (t === "uint64_t") return "u64";
  if (t === "float") return "f32";
  if (t === "double") return "f64";
  return undefined;
}

describe("ABI: kivi.h vs src/ffi/symbols.ts", () => {
  it("the header parses into the exports we expect to see", () => {
    const names = parsed.decls.map((d) => d.name);
    assert.ok(names.length >= 25, `only ${names.length} exports parsed`);
    assert.equal(new Set(names).size, names.length, "an export is declared twice");
    for (const t of ["kivi_status", "kivi_dtype", "kivi_axis", "kivi_fit", "kivi_assign"]) {
      assert.ok(parsed.int32Typedefs.has(t), `${t} is a typedef of int32_t`);
    }
    assert.ok(parsed.pointerTypedefs.has("kivi_ctx_t"), "kivi_ctx_t is a pointer typedef");
    const fit = parsed.decls.find((d) => d.name === "kivi_codebook_fit")!;
    assert.equal(fit.params.length, 14, "a declaration spanning lines keeps every parameter");
    assert.equal(
      parsed.decls.find((d) => d.name === "kivi_abi_version")!.params.length,
      0,
      "(void) is zero parameters",
    );
    const m = /#define\s+KIVI_ABI_VERSION\s+(\d+)/.exec(header);
    assert.equal(Number(m?.[1]), ABI_VERSION, "ABI_VERSION in backend.ts matches KIVI_ABI_VERSION");
  });

  it("every export is in the symbol table with the same number of parameters, and nothing else is", () => {
    const table = symbols as Record<string, { args: readonly FfiType[]; returns: FfiType }>;
    const inHeader = new Set(parsed.decls.map((d) => d.name));
    for (const d of parsed.decls) {
      assert.ok(d.name in table, `${d.name} is missing from src/ffi/symbols.ts`);
      assert.equal(
        table[d.name].args.length,
        d.params.length,
        `${d.name}: ${table[d.name].args.length} args in the table, ${d.params.length} in kivi.h`,
      );
    }
    for (const name of Object.keys(table)) {
      assert.ok(inHeader.has(name), `${name} is in the table but not exported by kivi.h`);
    }
  });

  it("parameter and result types have exact widths: pointers ptr, int64_t i64, uint64_t u64, int32_t and enums i32", () => {
    const table = symbols as Record<string, { args: readonly FfiType[]; returns: FfiType }>;
    for (const d of parsed.decls) {
      const spec = table[d.name];
      if (spec === undefined) continue; // reported by the arity test
      d.params.forEach((p, i) => {
        const want = ffiOf(p.type);
        assert.ok(want !== undefined, `${d.name}: unknown C type "${p.type}" of ${p.name}`);
        assert.equal(
          spec.args[i],
          want === "cstring" ? "ptr" : want,
          `${d.name} parameter ${i} (${p.type} ${p.name})`,
        );
      });
      const r = ffiOf(d.returns);
      assert.ok(r !== undefined, `${d.name}: unknown return type "${d.returns}"`);
      assert.equal(spec.returns, r, `${d.name} returns ${d.returns}`);
    }
  });

  /** The defined dynamic symbols of a library (nm -D), or undefined where nm cannot run. */
  function exportsOf(lib: string): string[] | undefined {
    const r = spawnSync("nm", ["-D", "--defined-only", lib], { encoding: "utf8" });
    if (r.error || r.status !== 0) return undefined;
    const exported = r.stdout.split("\n").map((l) => l.trim().split(/\s+/)).filter((f) =>
      f.length === 3 && /[TtDdBbRrWwVvi]/.test(f[1])
    ).map((f) => f[2]);
    return exported.filter((n) => !/^_(init|fini)$/.test(n)).sort();
  }

  /** The library's defined dynamic symbols are exactly kivi.h's (skipped without nm). */
  function exportsExactly(t: { skip(why: string): void }, lib: string, name: string): void {
    const ours = exportsOf(lib);
    if (ours === undefined) {
      t.skip("nm is not available here");
      return;
    }
    assert.deepEqual(
      ours,
      parsed.decls.map((d) => d.name).sort(),
      `defined dynamic symbols of build/${name}`,
    );
  }

  it("the built CPU library exports exactly kivi.h's symbols (nm -D)", (t) => {
    exportsExactly(t, defaultLibraryPath("cpu"), "libkivi_cpu.so");
  });

  // CI builds the CUDA library without a device (KIVI_BUILD_CUDA=1), so this runs there too.
  const cudaLib = defaultLibraryPath("cuda");
  if (existsSync(cudaLib)) {
    it("the built CUDA library exports exactly kivi.h's symbols (nm -D)", (t) => {
      exportsExactly(t, cudaLib, "libkivi_cuda.so");
    });
  } else {
    it(
      "skipped: build/libkivi_cuda.so is not built (build.ts builds it where there is a CUDA device, or with KIVI_BUILD_CUDA=1 as CI does)",
      { skip: true },
      () => {},
    );
  }

  it("status codes agree between kivi.h, src/errors.ts and kivi_status_str", async () => {
    const text = stripComments(header);
    const inHeader = Object.fromEntries(
      [...text.matchAll(/\b(KIVI_(?:OK|ERR_\w+))\s*=\s*(-?\d+)/g)].map((m) => [m[1], Number(m[2])]),
    );
    assert.deepEqual(Status, inHeader, "Status in src/errors.ts vs the kivi_status enum");
    const lib = await loadNative(defaultLibraryPath("cpu"));
    try {
      for (const [name, code] of Object.entries(inHeader)) {
        assert.equal(lib.call("kivi_status_str", code), name);
      }
    } finally {
      lib.close();
    }
  });

  it("the loader binds every symbol of the table in this runtime", async () => {
    const lib = await loadNative(defaultLibraryPath("cpu"));
    try {
      assert.equal(lib.call("kivi_abi_version"), ABI_VERSION);
      assert.equal(lib.call("kivi_backend_kind"), 0);
      assert.equal(lib.call("kivi_status_str", -2), "KIVI_ERR_SHAPE");
      assert.equal(typeof lib.call("kivi_last_error"), "string");
    } finally {
      lib.close();
    }
  });

  it("kivi_debug_fault (test only) is declared as such; the CPU build refuses it with KIVI_ERR_NO_DEVICE", async () => {
    assert.match(
      header,
      /TEST ONLY[^/]*\*\/\s*KIVI_API kivi_status kivi_debug_fault\(kivi_ctx_t ctx\);/,
      "kivi.h documents it as test-only",
    );
    const lib = await loadNative(defaultLibraryPath("cpu"));
    const out = new BigUint64Array(1);
    assert.equal(lib.call("kivi_ctx_create", 0, lib.ptr(out)), Status.KIVI_OK);
    const ctx = lib.pointerAt(out, 0);
    try {
      assert.equal(lib.call("kivi_debug_fault", null), Status.KIVI_ERR_ARG);
      assert.equal(lib.call("kivi_debug_fault", ctx), Status.KIVI_ERR_NO_DEVICE);
      assert.match(
        lib.call("kivi_ctx_last_error", ctx),
        /^kivi_debug_fault: the CPU build has no CUDA device/,
      );
      const done = new Int32Array(1);
      assert.equal(
        lib.call("kivi_ctx_query", ctx, lib.ptr(done)),
        Status.KIVI_OK,
        "the context still works",
      );
    } finally {
      lib.call("kivi_ctx_destroy", ctx);
      lib.close();
    }
  });
});
