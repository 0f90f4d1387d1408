/**
 * Builds the native libraries:
 *
 * - `build/libkivi_cpu.so` from `cuda/cpu/*.c` with the system C compiler (always);
 * - `build/libkivi_cuda.so` from `cuda/src/*.cu` with `nvcc` (on `PATH` or in `/usr/local/cuda/bin`),
 *   where a CUDA device is present or when asked for (`--cuda`, `KIVI_BUILD_CUDA=1`): each `.cu` is
 *   compiled on its own into `build/cuda/<name>.o`, as many at once as there are cores, with a
 *   progress line as each one ends, then linked. Compiling for a GPU the machine does not have takes
 *   minutes on a small machine, so it is skipped there unless asked for (CI asks, so that a compile
 *   error fails it); the build says which rule decided (see {@linkcode decideCuda});
 * - `build/libkivi_cpu_asan.so` (the CPU build with AddressSanitizer and UBSan) with `--asan`.
 *
 * Runs under Bun (`bun build.ts`) and Deno (`deno run -A build.ts`): only `node:` built-ins are used.
 * Incremental: a target is skipped when its output is newer than every input (its sources, every
 * header, and this file, so changing a flag here rebuilds everything); `--force` rebuilds anyway.
 *
 * @example
 * ```sh
 * bun build.ts              # CPU and, where a CUDA device is present, CUDA
 * bun build.ts --cuda       # CPU and CUDA, device or not (KIVI_BUILD_CUDA=1 does the same)
 * bun build.ts --cpu-only   # CPU only (KIVI_BUILD_CUDA=0 does the same)
 * bun build.ts --asan       # also build/libkivi_cpu_asan.so
 * bun build.ts --force      # rebuild everything
 * ```
 *
 * @example
 * ```ts
 * import { build } from "./build.ts";
 * const result = await build({ cuda: false });
 * console.log(result.summary);
 * ```
 */
import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

/** Options of {@linkcode build}. */
export interface BuildOptions {
  /** Rebuild every target even when it is up to date. */
  force?: boolean;
  /**
   * Build the CUDA library: `true` even without a device (nvcc must exist), `false` never; by
   * default `KIVI_BUILD_CUDA` (`1` or `0`) decides, else whether a CUDA device is present.
   */
  cuda?: boolean;
  /** Also build `build/libkivi_cpu_asan.so` (ASan + UBSan, `-O1 -g`). */
  asan?: boolean;
  /** Repository root; defaults to the folder of this file. */
  root?: string;
  /** Where progress goes (commands, compiler output, the closing line); defaults to stdout. */
  log?: (line: string) => void;
  /** Compiles run at once; defaults to `os.availableParallelism()`. */
  jobs?: number;
}

/** What happened to one target. */
export interface TargetResult {
  /** `cpu`, `cpu-asan` or `cuda`. */
  name: string;
  /** Output path, relative to the root. */
  output: string;
  status: "built" | "up to date" | "skipped";
  /** Why it was built or skipped (the changed input, `--force`, `nvcc not found`, ...). */
  reason: string;
}

/** The result of {@linkcode build}. */
export interface BuildResult {
  targets: TargetResult[];
  /** The closing line, also logged. */
  summary: string;
}

/** A compiler or linker failed; its output has already been logged. */
export class BuildError extends Error {
  constructor(message: string, readonly output: string) {
    super(message);
    this.name = "BuildError";
  }
}

const ROOT = path.dirname(fileURLToPath(import.meta.url));
const SELF = path.basename(fileURLToPath(import.meta.url));

/** What every CPU build shares: a shared library exporting only kivi.h's functions, warnings on. */
const LIB_FLAGS = ["-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra"];
const CPU_FLAGS = ["-std=c11", "-O3", "-march=native", ...LIB_FLAGS];
const ASAN_FLAGS = [
  "-std=c11",
  "-O1",
  "-g",
  "-fno-omit-frame-pointer",
  "-fsanitize=address,undefined",
  ...LIB_FLAGS,
];
/** `KIVI_CUDA_ARCH=90` (say) builds for that one architecture only: a quicker build on the device. */
const ONE_ARCH = process.env.KIVI_CUDA_ARCH?.match(/^\d{2,3}$/)?.[0];
const NVCC_FLAGS = [
  "-O3",
  "-std=c++17",
  "-Xcompiler",
  "-fPIC,-fvisibility=hidden",
  "-Icuda/include",
  ...(ONE_ARCH ? ["-gencode", `arch=compute_${ONE_ARCH},code=sm_${ONE_ARCH}`] : [
    "-gencode",
    "arch=compute_80,code=sm_80",
    "-gencode",
    "arch=compute_90,code=sm_90",
    "-gencode",
    "arch=compute_90,code=compute_90",
  ]),
  // The targets of one file compile in parallel (codebook.cu dominates the build).
  "--threads",
  "0",
];

/** Files of `dir` (relative to root) whose names end with one of `exts`, sorted; [] if no such dir. */
function listFiles(root: string, dir: string, exts: string[]): string[] {
  let names: string[];
  try {
    names = fs.readdirSync(path.join(root, dir));
  } catch {
    return [];
  }
  return names
    .filter((n) => exts.some((e) => n.endsWith(e)))
    .filter((n) => fs.statSync(path.join(root, dir, n)).isFile())
    .sort()
    .map((n) => `${dir}/${n}`);
}

function mtime(root: string, file: string): number | undefined {
  try {
    return fs.statSync(path.join(root, file)).mtimeMs;
  } catch {
    return undefined;
  }
}

/** Undefined when `output` is newer than every input, else the reason to rebuild it. */
function staleReason(
  root: string,
  output: string,
  inputs: string[],
  force: boolean,
): string | undefined {
  if (force) return "--force";
  const out = mtime(root, output);
  if (out === undefined) return `no ${output} yet`;
  let newest: string | undefined;
  let newestTime = -Infinity;
  for (const input of inputs) {
    const t = mtime(root, input) ?? Infinity;
    if (t > newestTime) [newest, newestTime] = [input, t];
  }
  return newest !== undefined && newestTime >= out ? `${newest} changed` : undefined;
}

function isExecutable(file: string): boolean {
  try {
    fs.accessSync(file, fs.constants.X_OK);
    return fs.statSync(file).isFile();
  } catch {
    return false;
  }
}

/** The command to run nvcc with (`nvcc` when on PATH, else the full path), or undefined. */
export function findNvcc(): string | undefined {
  for (const dir of (process.env.PATH ?? "").split(path.delimiter)) {
    if (dir && isExecutable(path.join(dir, "nvcc"))) return "nvcc";
  }
  const fallback = "/usr/local/cuda/bin/nvcc";
  return isExecutable(fallback) ? fallback : undefined;
}

/** Where {@linkcode findCudaDevice} looks; tests point it at folders of their own. */
export interface DeviceProbe {
  /** One folder per GPU the NVIDIA driver has bound (default `/proc/driver/nvidia/gpus`). */
  procGpus?: string;
  /** Where the device nodes `nvidia0`, `nvidia1`, ... live (default `/dev`). */
  devDir?: string;
  /** The command whose `-L` lists the GPUs (default `nvidia-smi`). */
  nvidiaSmi?: string;
}

/**
 * How a CUDA device (a driver with a GPU bound to it) was found, or undefined where none is; needs
 * no CUDA toolkit. The rules, in order: the driver lists a GPU under `/proc/driver/nvidia/gpus/`,
 * a device node `/dev/nvidia<N>` exists, `nvidia-smi -L` lists a GPU.
 */
export function findCudaDevice(probe: DeviceProbe = {}): string | undefined {
  const procGpus = probe.procGpus ?? "/proc/driver/nvidia/gpus";
  const devDir = probe.devDir ?? "/dev";
  const list = (dir: string) => {
    try {
      return fs.readdirSync(dir).sort();
    } catch {
      return [];
    }
  };
  const bound = list(procGpus);
  if (bound.length > 0) return `the driver lists ${path.join(procGpus, bound[0]!)}`;
  const node = list(devDir).find((n) => /^nvidia\d+$/.test(n));
  if (node !== undefined) return `${path.join(devDir, node)} exists`;
  const smi = probe.nvidiaSmi ?? "nvidia-smi";
  const r = spawnSync(smi, ["-L"], { encoding: "utf8", timeout: 10_000 });
  const gpu = r.status === 0 ? r.stdout.split("\n").find((l) => l.startsWith("GPU ")) : undefined;
  return gpu === undefined ? undefined : `${smi} -L lists ${gpu.trim()}`;
}

/** Whether the CUDA library is built, and the rule that decided. */
export interface CudaDecision {
  build: boolean;
  /** True where the caller asked for it (`--cuda`, `KIVI_BUILD_CUDA=1`): no nvcc is then an error. */
  asked: boolean;
  why: string;
}

/**
 * Decides whether to build the CUDA library: `opts.cuda` when given, else `KIVI_BUILD_CUDA` (`1` or
 * `0`) when set, else whether {@linkcode findCudaDevice} finds a device.
 *
 * @example
 * ```ts
 * import { decideCuda } from "./build.ts";
 * console.log(decideCuda({ cuda: true }).why); // asked for (--cuda)
 * ```
 */
export function decideCuda(
  opts: Pick<BuildOptions, "cuda"> = {},
  env: Record<string, string | undefined> = process.env,
  probe: DeviceProbe = {},
): CudaDecision {
  if (opts.cuda !== undefined) {
    return {
      build: opts.cuda,
      asked: opts.cuda,
      why: opts.cuda ? "asked for (--cuda)" : "--cpu-only",
    };
  }
  const v = env.KIVI_BUILD_CUDA;
  if (v === "1") return { build: true, asked: true, why: "asked for (KIVI_BUILD_CUDA=1)" };
  if (v === "0") return { build: false, asked: false, why: "KIVI_BUILD_CUDA=0" };
  if (v !== undefined && v !== "") {
    throw new BuildError(`KIVI_BUILD_CUDA must be 1 or 0, got ${JSON.stringify(v)}`, "");
  }
  const device = findCudaDevice(probe);
  if (device !== undefined) {
    return { build: true, asked: false, why: `a CUDA device is present: ${device}` };
  }
  return {
    build: false,
    asked: false,
    why:
      "no CUDA device here: no GPU under /proc/driver/nvidia/gpus, no /dev/nvidia<N>, none from nvidia-smi -L; " +
      "--cuda or KIVI_BUILD_CUDA=1 builds it anyway",
  };
}

function quote(arg: string): string {
  return /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", `'\\''`)}'`;
}

/** Echoes `$ cmd args`, runs it in root, logs its output when it ends, throws BuildError on failure. */
function run(
  root: string,
  log: (line: string) => void,
  cmd: string,
  args: string[],
): Promise<void> {
  const line = [cmd, ...args].map(quote).join(" ");
  log(`$ ${line}`);
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
    const chunks: string[] = [];
    child.stdout.setEncoding("utf8").on("data", (c: string) => chunks.push(c));
    child.stderr.setEncoding("utf8").on("data", (c: string) => chunks.push(c));
    child.on("error", (err) => reject(new BuildError(`${cmd}: ${err.message}`, "")));
    child.on("close", (code, signal) => {
      const output = chunks.join("").trimEnd();
      if (output) log(output);
      if (code === 0) resolve();
      else {
        const why = signal ? `killed by ${signal}` : `exited with code ${code}`;
        reject(new BuildError(`${cmd} ${why}: ${line}`, output));
      }
    });
  });
}

/** Runs `tasks` with at most `jobs` at once; the first failure stops new ones and is rethrown. */
async function pool(tasks: (() => Promise<void>)[], jobs: number): Promise<void> {
  let next = 0;
  let failure: unknown;
  const worker = async () => {
    while (failure === undefined && next < tasks.length) {
      const task = tasks[next++]!;
      try {
        await task();
      } catch (err) {
        failure ??= err;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.min(jobs, tasks.length)) }, worker));
  if (failure !== undefined) throw failure;
}

/** The object file build.ts compiles `src` (a `cuda/src/*.cu`) into. */
function objectOf(src: string): string {
  return `build/cuda/${path.basename(src, ".cu")}.o`;
}

/**
 * Compiles each `.cu` of `sources` to its object, `jobs` at once, with a line `[n/m] file (elapsed s)`
 * as each one ends and, during a long wait, a line every 30 s naming what is still compiling.
 */
async function compileAll(
  root: string,
  log: (line: string) => void,
  nvcc: string,
  sources: string[],
  jobs: number,
): Promise<void> {
  if (sources.length === 0) return;
  const t0 = performance.now();
  const elapsed = () => `${((performance.now() - t0) / 1000).toFixed(1)} s`;
  const running = new Set<string>();
  let done = 0;
  const tick = setInterval(
    () => log(`build: still compiling ${[...running].join(", ")} (${elapsed()})`),
    30_000,
  );
  try {
    await pool(
      sources.map((src) => async () => {
        running.add(src);
        await run(root, log, nvcc, [...NVCC_FLAGS, "-c", src, "-o", objectOf(src)]);
        running.delete(src);
        log(`[${++done}/${sources.length}] ${src} (${elapsed()})`);
      }),
      jobs,
    );
  } finally {
    clearInterval(tick);
  }
}

function availableParallelism(): number {
  return typeof os.availableParallelism === "function"
    ? os.availableParallelism()
    : os.cpus().length || 1;
}

/**
 * Builds the libraries (see the module doc) and returns what was built, was up to date or skipped.
 * Throws {@linkcode BuildError} when a compiler fails, after logging its output.
 */
export async function build(opts: BuildOptions = {}): Promise<BuildResult> {
  const root = opts.root ?? ROOT;
  const log = opts.log ?? ((line: string) => console.log(line));
  const force = opts.force ?? false;
  const jobs = opts.jobs ?? availableParallelism();
  const targets: TargetResult[] = [];
  const cuda = decideCuda(opts);

  const headers = [
    ...listFiles(root, "cuda/include", [".h", ".cuh"]),
    ...listFiles(root, "cuda/src", [".cuh", ".h"]),
    ...listFiles(root, "cuda/cpu", [".h"]),
  ];
  const common = [...headers, SELF];

  fs.mkdirSync(path.join(root, "build"), { recursive: true });

  // CPU reference build (and its sanitizer variant).
  const cSources = listFiles(root, "cuda/cpu", [".c"]);
  if (cSources.length === 0) {
    throw new BuildError("no C sources: cuda/cpu/*.c matched nothing", "");
  }
  const cpuVariants = [{ name: "cpu", output: "build/libkivi_cpu.so", flags: CPU_FLAGS }];
  if (opts.asan) {
    cpuVariants.push({ name: "cpu-asan", output: "build/libkivi_cpu_asan.so", flags: ASAN_FLAGS });
  }
  for (const v of cpuVariants) {
    const reason = staleReason(root, v.output, [...cSources, ...common], force);
    if (reason === undefined) {
      targets.push({
        name: v.name,
        output: v.output,
        status: "up to date",
        reason: "no input changed",
      });
      continue;
    }
    await run(root, log, "gcc", [...v.flags, "-Icuda/include", ...cSources, "-o", v.output, "-lm"]);
    targets.push({ name: v.name, output: v.output, status: "built", reason });
  }

  // CUDA build: one object per .cu, then one link.
  const cudaOut = "build/libkivi_cuda.so";
  const cuSources = listFiles(root, "cuda/src", [".cu"]);
  const nvcc = cuda.build ? findNvcc() : undefined;
  if (!cuda.build) {
    targets.push({ name: "cuda", output: cudaOut, status: "skipped", reason: cuda.why });
  } else if (nvcc === undefined) {
    const why = `nvcc not found on PATH or in /usr/local/cuda/bin (CUDA build ${cuda.why})`;
    if (cuda.asked) throw new BuildError(why, "");
    targets.push({ name: "cuda", output: cudaOut, status: "skipped", reason: why });
  } else if (cuSources.length === 0) {
    targets.push({
      name: "cuda",
      output: cudaOut,
      status: "skipped",
      reason: "no cuda/src/*.cu sources",
    });
  } else {
    fs.mkdirSync(path.join(root, "build/cuda"), { recursive: true });
    const objects = cuSources.map(objectOf);
    // Objects of deleted sources would otherwise linger and confuse a later glob; the library relinks.
    const removed = listFiles(root, "build/cuda", [".o"]).filter((o) => !objects.includes(o));
    for (const stale of removed) fs.rmSync(path.join(root, stale));
    const compiled = cuSources.filter((src, i) =>
      staleReason(root, objects[i]!, [src, ...common], force) !== undefined
    );
    if (compiled.length > 0) {
      log(
        `build: CUDA library ${cuda.why}; compiling ${compiled.length} of ${cuSources.length} .cu, ${
          Math.min(jobs, compiled.length)
        } at a time`,
      );
    }
    await compileAll(root, log, nvcc, compiled, jobs);
    const linkReason = removed.length > 0
      ? `${removed.join(", ")} removed`
      : staleReason(root, cudaOut, objects, force);
    if (linkReason === undefined) {
      targets.push({
        name: "cuda",
        output: cudaOut,
        status: "up to date",
        reason: `no input changed; ${cuda.why}`,
      });
    } else {
      await run(root, log, nvcc, ["-shared", ...objects, "-o", cudaOut, "-ldl"]);
      const what = force
        ? "--force"
        : compiled.length > 0
        ? `${compiled.length} of ${cuSources.length} .cu recompiled: ${
          compiled.slice(0, 3).join(", ")
        }${compiled.length > 3 ? ", ..." : ""}`
        : linkReason;
      targets.push({
        name: "cuda",
        output: cudaOut,
        status: "built",
        reason: `${what}; ${cuda.why}`,
      });
    }
  }

  const summary = "build: " +
    targets.map((t) => `${t.output} ${t.status} (${t.reason})`).join("; ");
  log(summary);
  return { targets, summary };
}

function parseArgs(argv: string[]): BuildOptions {
  const opts: BuildOptions = {};
  for (const arg of argv) {
    if (arg === "--force") opts.force = true;
    else if (arg === "--cpu-only") opts.cuda = false;
    else if (arg === "--cuda") opts.cuda = true;
    else if (arg === "--asan") opts.asan = true;
    else if (arg === "-h" || arg === "--help") {
      console.log("usage: bun build.ts [--force] [--cuda | --cpu-only] [--asan]");
      process.exit(0);
    } else {
      console.error(
        `build: unknown argument '${arg}' (expected --force, --cuda, --cpu-only or --asan)`,
      );
      process.exit(2);
    }
  }
  return opts;
}

if (import.meta.main) {
  try {
    await build(parseArgs(process.argv.slice(2)));
  } catch (err) {
    console.error(`build: FAILED: ${err instanceof Error ? err.message : String(err)}`);
    process.exit(1);
  }
}
