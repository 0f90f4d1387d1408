#!/usr/bin/env node
/**
 * The package's "postinstall": builds the native libraries from source inside the package, where
 * src/backend.ts looks for them (build/libkivi_*.so beside src/), and says what it built. Plain
 * JavaScript so that Node 20 runs it without TypeScript support.
 *
 * - Installed as a dependency (npm, pnpm, yarn, or Bun with kivi in "trustedDependencies"): with Bun
 *   (the installer itself, or `bun` on PATH, e.g. node_modules/.bin/bun) or Deno on PATH it runs
 *   build.ts, which builds build/libkivi_cpu.so with gcc and build/libkivi_cuda.so where a CUDA
 *   device is present (KIVI_BUILD_CUDA=1 builds it anyway); otherwise it builds
 *   build/libkivi_cpu.so with gcc directly (same flags as build.ts), and the CUDA build needs
 *   build.ts (`npx bun build.ts` in the package folder).
 * - In the kivi repository itself (`npm ci` / `npm install` there): the CPU library only (a few
 *   seconds of gcc), so that `npx kivi info` works right after `npm ci`; `npm start`, `npm test` and
 *   `npm run build` build the CUDA library where it is wanted. A failure there is a warning, not an
 *   install failure (`npm run build` shows it again).
 *
 * `KIVI_SKIP_BUILD=1` skips the build anywhere. No C compiler is a warning, not an install failure
 * (`KIVI_LIB_PATH` can point at a library built elsewhere); a compiler that fails while installing
 * kivi as a dependency is an install failure.
 */
import { spawnSync } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

const PKG = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const say = (line) => console.log(`kivi postinstall: ${line}`);

function real(p) {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

/** True when this package is being installed into another project (not `npm ci` in this repo). */
function installedAsDependency() {
  if (PKG.split(path.sep).includes("node_modules")) return true;
  // A linked folder install (`npm install /path/to/kivi`) runs here with INIT_CWD the consumer.
  const init = process.env.INIT_CWD;
  return init !== undefined && real(init) !== real(PKG) &&
    !real(init).startsWith(real(PKG) + path.sep);
}

/** The full path of an executable on PATH, or undefined. */
function which(name) {
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (!dir) continue;
    const file = path.join(dir, name);
    try {
      fs.accessSync(file, fs.constants.X_OK);
      if (fs.statSync(file).isFile()) return file;
    } catch {
      // not here
    }
  }
  return undefined;
}

function run(cmd, args) {
  say(`$ ${[cmd, ...args].join(" ")}`);
  const r = spawnSync(cmd, args, { cwd: PKG, stdio: "inherit" });
  if (r.error) return { ok: false, why: r.error.message };
  return { ok: r.status === 0, why: `exit code ${r.status ?? r.signal}` };
}

function listBuilt() {
  const dir = path.join(PKG, "build");
  const libs = fs.existsSync(dir)
    ? fs.readdirSync(dir).filter((f) => /^libkivi_.*\.so$/.test(f)).sort()
    : [];
  return libs.map((f) => `build/${f}`);
}

function main() {
  if (process.env.KIVI_SKIP_BUILD === "1") {
    say("KIVI_SKIP_BUILD=1, not building; openBackend() needs build/libkivi_*.so or KIVI_LIB_PATH");
    return 0;
  }
  const dependency = installedAsDependency();
  // This repository: the CPU library only (the CUDA one takes minutes; `npm start` builds it where wanted).
  const args = dependency ? ["build.ts"] : ["build.ts", "--cpu-only"];
  say(
    dependency
      ? `building the native libraries in ${PKG}`
      : "building the CPU library of this checkout",
  );

  const bun = typeof process.versions.bun === "string" ? process.execPath : which("bun");
  const deno = bun ? undefined : which("deno");
  const nvcc = which("nvcc") ??
    (fs.existsSync("/usr/local/cuda/bin/nvcc") ? "/usr/local/cuda/bin/nvcc" : undefined);
  let result;
  if (bun) {
    result = run(bun, args);
  } else if (deno) {
    result = run(deno, ["run", "-A", "--no-config", ...args]);
  } else {
    const gcc = which("gcc");
    if (!gcc) {
      say(
        "WARNING: no gcc on PATH, nothing built. Install gcc and run `npx bun build.ts` in " + PKG +
          ", or point KIVI_LIB_PATH at a built libkivi_cpu.so / libkivi_cuda.so.",
      );
      return 0;
    }
    const sources = fs.readdirSync(path.join(PKG, "cuda/cpu")).filter((f) => f.endsWith(".c"))
      .sort().map((f) => `cuda/cpu/${f}`);
    fs.mkdirSync(path.join(PKG, "build"), { recursive: true });
    const flags = [
      "-std=c11",
      "-O3",
      "-march=native",
      "-fPIC",
      "-shared",
      "-fvisibility=hidden",
      "-Wall",
      "-Wextra",
    ];
    result = run(gcc, [
      ...flags,
      "-Icuda/include",
      ...sources,
      "-o",
      "build/libkivi_cpu.so",
      "-lm",
    ]);
    if (result.ok && nvcc && dependency) {
      say(
        `nvcc found (${nvcc}) but no bun or deno to run build.ts: the CUDA build was skipped; run \`npx bun build.ts\` in ${PKG}`,
      );
    }
  }
  if (!result.ok) {
    if (!dependency) {
      say(`WARNING: the CPU build failed (${result.why}); \`npm run build\` shows the error again`);
      return 0;
    }
    say(
      `FAILED (${result.why}); fix the compiler error above, or set KIVI_SKIP_BUILD=1 and use KIVI_LIB_PATH`,
    );
    return 1;
  }
  const built = listBuilt();
  const note = built.some((f) => f.includes("cuda"))
    ? ""
    : !dependency
    ? " (`npm start` and `npm test` build the CUDA library where a CUDA device is present)"
    : bun || deno
    ? " (CPU only, for the reason build.ts gave above)"
    : nvcc
    ? " (CPU only)"
    : " (CPU only: no nvcc)";
  say(`built ${built.join(" and ") || "nothing"} in ${PKG}${note}`);
  return 0;
}

process.exitCode = main();
