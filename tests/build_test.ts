/**
 * build.ts: when the CUDA library is built (a device found by each of the three rules, or asked for
 * by option or KIVI_BUILD_CUDA), and how: every `.cu` of cuda/src compiled on its own, in parallel,
 * with a progress line as each ends, then linked; incremental (a new header recompiles every `.cu`,
 * a new `.cu` is picked up, a deleted one's object removed); a compile error fails the build.
 * The compiling part runs a tiny tree of our own in a temporary folder, so it takes seconds.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, utimesSync } from "node:fs";
import { writeFileSync } from "node:fs";
import { spawnSync } from "node:child_process";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { build, BuildError, decideCuda, findNvcc } from "../build.ts";

/** A temporary folder with the given files (path -> text); removed by the caller. */
function tree(files: Record<string, string>): string {
  const dir = mkdtempSync(join(tmpdir(), "kivi-build-"));
  for (const [rel, text] of Object.entries(files)) {
    mkdirSync(join(dir, rel, ".."), { recursive: true });
    writeFileSync(join(dir, rel), text);
  }
  return dir;
}

/** An executable shell script standing in for nvidia-smi. */
function fakeSmi(dir: string, body: string): string {
  const file = join(dir, "nvidia-smi");
  writeFileSync(file, `#!/bin/sh\n${body}\n`);
  chmodSync(file, 0o755);
  return file;
}

describe("build.ts: whether the CUDA library is built", () => {
  const noEnv = {};

  it("--cuda and --cpu-only decide before anything else", () => {
    const dir = tree({ "gpus/0000:17:00.0/information": "Model: NVIDIA H200" });
    try {
      const device = { procGpus: join(dir, "gpus") };
      assert.deepEqual(decideCuda({ cuda: true }, { KIVI_BUILD_CUDA: "0" }, {}), {
        build: true,
        asked: true,
        why: "asked for (--cuda)",
      });
      assert.deepEqual(decideCuda({ cuda: false }, { KIVI_BUILD_CUDA: "1" }, device), {
        build: false,
        asked: false,
        why: "--cpu-only",
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("KIVI_BUILD_CUDA=1 asks for it, =0 refuses it whatever the machine has, anything else is an error", () => {
    const dir = tree({ "dev/nvidia0": "" });
    try {
      assert.deepEqual(
        decideCuda({}, { KIVI_BUILD_CUDA: "1" }, {
          procGpus: join(dir, "none"),
          devDir: join(dir, "none"),
          nvidiaSmi: join(dir, "none"),
        }),
        {
          build: true,
          asked: true,
          why: "asked for (KIVI_BUILD_CUDA=1)",
        },
      );
      assert.equal(
        decideCuda({}, { KIVI_BUILD_CUDA: "0" }, { devDir: join(dir, "dev") }).build,
        false,
      );
      assert.throws(
        () => decideCuda({}, { KIVI_BUILD_CUDA: "yes" }),
        (e) =>
          e instanceof BuildError && /KIVI_BUILD_CUDA must be 1 or 0, got "yes"/.test(e.message),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it("finds a device by each rule, saying which; device nodes other than nvidia<N> and a failing nvidia-smi are not one", () => {
    const dir = tree({
      "gpus/0000:17:00.0/information": "Model: NVIDIA H200",
      "dev/nvidia3": "",
      "ctl/nvidiactl": "",
      "ctl/nvidia-uvm": "",
    });
    try {
      const none = join(dir, "none");
      const smiOk = fakeSmi(join(dir), "echo 'GPU 0: NVIDIA H200 (UUID: GPU-1234)'");
      const proc = decideCuda({}, noEnv, {
        procGpus: join(dir, "gpus"),
        devDir: none,
        nvidiaSmi: none,
      });
      assert.deepEqual(proc, {
        build: true,
        asked: false,
        why: `a CUDA device is present: the driver lists ${join(dir, "gpus", "0000:17:00.0")}`,
      });
      const dev = decideCuda({}, noEnv, {
        procGpus: none,
        devDir: join(dir, "dev"),
        nvidiaSmi: none,
      });
      assert.equal(dev.why, `a CUDA device is present: ${join(dir, "dev", "nvidia3")} exists`);
      const smi = decideCuda({}, noEnv, {
        procGpus: none,
        devDir: join(dir, "ctl"),
        nvidiaSmi: smiOk,
      });
      assert.equal(
        smi.why,
        `a CUDA device is present: ${smiOk} -L lists GPU 0: NVIDIA H200 (UUID: GPU-1234)`,
      );

      mkdirSync(join(dir, "smi-fails"));
      const smiFails = fakeSmi(
        join(dir, "smi-fails"),
        "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9",
      );
      for (const nvidiaSmi of [smiFails, none]) {
        const d = decideCuda({}, noEnv, { procGpus: none, devDir: join(dir, "ctl"), nvidiaSmi });
        assert.equal(d.build, false, nvidiaSmi);
        assert.match(
          d.why,
          /^no CUDA device here: .*; --cuda or KIVI_BUILD_CUDA=1 builds it anyway$/,
        );
      }
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

const TINY_C = '__attribute__((visibility("default"))) int kivi_tiny(void) { return 7; }\n';
const tinyCu = (name: string) =>
  `#include "tiny.cuh"\n__global__ void k_${name}(float *x) { x[threadIdx.x] *= SCALE; }\n` +
  `extern "C" __attribute__((visibility("default"))) int kivi_${name}(float *x) { k_${name}<<<1, 32>>>(x); return 0; }\n`;

const nvcc = findNvcc();
if (nvcc === undefined) {
  it(
    "skipped: build.ts compiling CUDA in parallel needs nvcc, which is not here",
    { skip: true },
    () => {},
  );
} else {
  describe("build.ts: compiling the CUDA library", () => {
    it("compiles each .cu in parallel with a progress line, links, and rebuilds only what changed", async () => {
      const dir = tree({
        "build.ts": "// stands in for the build script, which every target depends on\n",
        "cuda/include/tiny.h": "#define TINY 1\n",
        "cuda/cpu/tiny.c": TINY_C,
        "cuda/src/tiny.cuh": "#define SCALE 2.0f\n",
        "cuda/src/a.cu": tinyCu("a"),
        "cuda/src/b.cu": tinyCu("b"),
      });
      const past = new Date(Date.now() - 60_000);
      for (
        const f of [
          "build.ts",
          "cuda/include/tiny.h",
          "cuda/cpu/tiny.c",
          "cuda/src/tiny.cuh",
          "cuda/src/a.cu",
          "cuda/src/b.cu",
        ]
      ) utimesSync(join(dir, f), past, past);
      const run = async () => {
        const lines: string[] = [];
        const r = await build({ root: dir, cuda: true, jobs: 2, log: (l) => lines.push(l) });
        return { lines, cuda: r.targets.find((t) => t.name === "cuda")! };
      };
      try {
        const first = await run();
        assert.equal(first.cuda.status, "built", first.lines.join("\n"));
        assert.match(first.cuda.reason, /2 of 2 \.cu recompiled.*; asked for \(--cuda\)$/);
        assert.ok(
          first.lines.includes(
            "build: CUDA library asked for (--cuda); compiling 2 of 2 .cu, 2 at a time",
          ),
          first.lines.join("\n"),
        );
        for (const src of ["a", "b"]) {
          assert.ok(
            first.lines.some((l) =>
              l.startsWith("$ ") && l.includes(` -c cuda/src/${src}.cu -o build/cuda/${src}.o`)
            ),
            `the ${src}.cu command is echoed`,
          );
        }
        const progress = first.lines.filter((l) =>
          /^\[\d\/2\] cuda\/src\/[ab]\.cu \(\d+\.\d s\)$/.test(l)
        );
        assert.deepEqual(
          progress.map((l) => l.slice(0, 5)),
          ["[1/2]", "[2/2]"],
          first.lines.join("\n"),
        );
        const nm = spawnSync("nm", ["-D", "--defined-only", join(dir, "build/libkivi_cuda.so")], {
          encoding: "utf8",
        });
        if (nm.status === 0) assert.match(nm.stdout, /\bkivi_a\b[\s\S]*\bkivi_b\b/);

        const again = await run();
        assert.equal(again.cuda.status, "up to date");
        assert.ok(!again.lines.some((l) => l.startsWith("$ ")), "nothing recompiled");

        writeFileSync(join(dir, "cuda/src/new_part.cuh"), "#define NEW_PART 1\n"); // a header appearing
        writeFileSync(join(dir, "cuda/src/c.cu"), tinyCu("c"));
        const more = await run();
        assert.match(
          more.cuda.reason,
          /^3 of 3 \.cu recompiled/,
          "a new header recompiles every .cu; the new .cu is picked up",
        );
        assert.equal(more.lines.filter((l) => l.startsWith("[")).length, 3);

        rmSync(join(dir, "cuda/src/c.cu"));
        const fewer = await run();
        assert.equal(fewer.cuda.status, "built");
        assert.ok(
          !existsSync(join(dir, "build/cuda/c.o")),
          "the deleted source's object is removed",
        );

        writeFileSync(join(dir, "cuda/src/bad.cu"), "__global__ void k_bad( { }\n");
        await assert.rejects(run(), (e) => e instanceof BuildError && /bad\.cu/.test(e.message));
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    });
  });
}
