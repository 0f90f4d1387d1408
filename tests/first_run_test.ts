/**
 * The first run of a fresh checkout, in a copy of it without build/ (src/, build.ts and the install
 * step copied, cuda/ linked): `npm ci`'s postinstall builds the CPU library (and no CUDA one), and
 * where nothing built it, `kivi info` builds it on first use, saying so in one line on stderr; where
 * it cannot (no gcc), the error says what failed and what to run.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { cpSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { tmpdir } from "node:os";
import { delimiter, join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../", import.meta.url));
const isDeno = "Deno" in globalThis;

/** A copy of the checkout without build/; removed by the caller. */
function freshCopy(): string {
  const dir = mkdtempSync(join(tmpdir(), "kivi-fresh-"));
  cpSync(join(root, "src"), join(dir, "src"), { recursive: true });
  mkdirSync(join(dir, "scripts"));
  for (const f of ["build.ts", "scripts/postinstall.mjs"]) cpSync(join(root, f), join(dir, f));
  symlinkSync(join(root, "cuda"), join(dir, "cuda"));
  return dir;
}

/** `kivi <args>` run from the copy's src/cli.ts by this runtime, with `env` added. */
function kivi(dir: string, args: string[], env: Record<string, string> = {}) {
  const cli = join(dir, "src/cli.ts");
  const argv = isDeno ? ["run", "-A", cli, ...args] : [cli, ...args];
  // KIVI_LIB_PATH would bypass build/ altogether.
  const { KIVI_LIB_PATH: _, ...rest } = process.env;
  return spawnSync(process.execPath, argv, {
    cwd: dir,
    encoding: "utf8",
    env: { ...rest, NO_COLOR: "1", ...env },
    timeout: 120_000,
  });
}

describe("first run of a fresh checkout", () => {
  it("kivi info builds the missing CPU library on first use, saying so in one line, and runs", () => {
    const dir = freshCopy();
    try {
      const r = kivi(dir, ["info", "--json"]);
      assert.equal(r.status, 0, r.stderr);
      const notice = r.stderr.trim().split("\n");
      assert.equal(notice.length, 1, `one line on stderr, got:\n${r.stderr}`);
      assert.match(
        notice[0],
        /^kivi: .*build\/libkivi_cpu\.so is missing; building it now \(gcc, a few seconds; `bun build\.ts` builds it ahead of time\)$/,
      );
      const info = JSON.parse(r.stdout);
      assert.equal(info.backend, "cpu");
      assert.equal(info.library, join(dir, "build/libkivi_cpu.so"));
      assert.ok(info.copyGBps > 0, "the library it built runs");
      const again = kivi(dir, ["info", "--json"]);
      assert.equal(again.status, 0, again.stderr);
      assert.equal(again.stderr.trim(), "", "nothing to build the second time");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("without gcc, the error says the build failed, why, and what to run", () => {
    const dir = freshCopy();
    try {
      mkdirSync(join(dir, "empty-path"));
      const r = kivi(dir, ["info"], { PATH: join(dir, "empty-path") });
      assert.equal(r.status, 1, r.stderr);
      assert.match(
        r.stderr,
        /is not built and building it failed \(gcc: .*\); run `bun build\.ts`/,
      );
      assert.ok(!existsSync(join(dir, "build/libkivi_cpu.so")));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  // The postinstall step is a node script, whatever runtime runs the tests: once is enough.
  const node = spawnSync("node", ["--version"]);
  if (isDeno || node.error !== undefined || node.status !== 0) {
    const why = isDeno
      ? "run once, under bun test"
      : "the postinstall step needs node, which is not here";
    it(`skipped: npm ci's postinstall: ${why}`, { skip: true }, () => {});
    return;
  }
  it("npm ci's postinstall builds the CPU library, and no CUDA one, in the checkout itself", () => {
    const dir = freshCopy();
    try {
      const path = [join(root, "node_modules/.bin"), process.env.PATH ?? ""].join(delimiter);
      // As `npm ci` runs it in the checkout (INIT_CWD), even where CI asks for the CUDA build.
      const r = spawnSync("node", ["scripts/postinstall.mjs"], {
        cwd: dir,
        encoding: "utf8",
        env: { ...process.env, PATH: path, INIT_CWD: dir, KIVI_BUILD_CUDA: "1" },
        timeout: 120_000,
      });
      assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`);
      assert.match(r.stdout, /^kivi postinstall: building the CPU library of this checkout$/m);
      assert.match(r.stdout, /^kivi postinstall: \$ \S+ build\.ts --cpu-only$/m);
      assert.match(r.stdout, /^kivi postinstall: built build\/libkivi_cpu\.so in /m);
      assert.ok(existsSync(join(dir, "build/libkivi_cpu.so")));
      assert.ok(!existsSync(join(dir, "build/libkivi_cuda.so")));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
