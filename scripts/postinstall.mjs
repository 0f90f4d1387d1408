#!/usr/bin/env node
/**
 * The package's "postinstall": when kivi is installed as a dependency (npm, pnpm, yarn, or Bun with
 * kivi in "trustedDependencies"), builds the native libraries from source inside the installed
 * package, where src/backend.ts looks for them (build/libkivi_*.so beside src/), and says what it
 * built. Plain JavaScript so that Node 20 runs it without TypeScript support.
 *
 * - With Bun (the installer itself, or `bun` on PATH, e.g. node_modules/.bin/bun) or Deno on PATH:
 *   runs build.ts, which builds build/libkivi_cpu.so with gcc and build/libkivi_cuda.so where nvcc
 *   exists.
 * - Otherwise: builds build/libkivi_cpu.so with gcc directly (same flags as build.ts); the CUDA
 *   build needs build.ts (`npx bun build.ts` in the package folder).
 *
 * In the kivi repository itself (`npm ci` / `npm install` there) it does nothing: `npm run build`
 * and `npm test` build. `KIVI_SKIP_BUILD=1` skips the build anywhere. No C compiler is a warning,
 * not an install failure (`KIVI_LIB_PATH` can point at a library built elsewhere); a compiler that
 * fails is an install failure.
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
  return init !== undefined && real(init) !== real(PKG) && !real(init).startsWith(real(PKG) + path.sep);
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
  const libs = fs.existsSync(dir) ? fs.readdirSync(dir).filter((f) => /^libkivi_.*\.so$/.test(f)).sort() : [];
  return libs.map((f) => `build/${f}`);
}

function main() {
  if (process.env.KIVI_SKIP_BUILD === "1") {
    say("KIVI_SKIP_BUILD=1, not building; openBackend() needs build/libkivi_*.so or KIVI_LIB_PATH");
    return 0;
  }
  if (!installedAsDependency()) return 0; // this repository: `npm run build` builds
  say(`building the native libraries in ${PKG}`);

  const bun = typeof process.versions.bun === "string" ? process.execPath : which("bun");
  const deno = bun ? undefined : which("deno");
  const nvcc = which("nvcc") ?? (fs.existsSync("/usr/local/cuda/bin/nvcc") ? "/usr/local/cuda/bin/nvcc" : undefined);
  let result;
  if (bun) {
    result = run(bun, ["build.ts"]);
  } else if (deno) {
    result = run(deno, ["run", "-A", "--no-config", "build.ts"]);
  } else {
    const gcc = which("gcc");
    if (!gcc) {
      say("WARNING: no gcc on PATH, nothing built. Install gcc and run `npx bun build.ts` in " + PKG +
        ", or point KIVI_LIB_PATH at a built libkivi_cpu.so / libkivi_cuda.so.");
      return 0;
    }
    const sources = fs.readdirSync(path.join(PKG, "cuda/cpu")).filter((f) => f.endsWith(".c")).sort().map((f) => `cuda/cpu/${f}`);
    fs.mkdirSync(path.join(PKG, "build"), { recursive: true });
    const flags = ["-std=c11", "-O3", "-march=native", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra"];
    result = run(gcc, [...flags, "-Icuda/include", ...sources, "-o", "build/libkivi_cpu.so", "-lm"]);
    if (result.ok && nvcc) {
      say(`nvcc found (${nvcc}) but no bun or deno to run build.ts: the CUDA build was skipped; run \`npx bun build.ts\` in ${PKG}`);
    }
  }
  if (!result.ok) {
    say(`FAILED (${result.why}); fix the compiler error above, or set KIVI_SKIP_BUILD=1 and use KIVI_LIB_PATH`);
    return 1;
  }
  const built = listBuilt();
  say(`built ${built.join(" and ") || "nothing"} in ${PKG}` +
    (built.some((f) => f.includes("cuda")) ? "" : nvcc ? " (CPU only)" : " (CPU only: no nvcc)"));
  return 0;
}

process.exitCode = main();
