/**
 * Sticky CUDA faults: after an illegal-address fault (provoked through the test-only export
 * kivi_debug_fault) the backend refuses every later call with KIVI_ERR_CUDA_STICKY and a message
 * that says so, instead of returning garbage, and a new process works normally. A sticky fault
 * ruins CUDA for the whole process, so each case runs in a child process of the same runtime
 * (tests/_sticky_child.ts). On the CPU backend the same child checks that the export refuses with
 * KIVI_ERR_NO_DEVICE and changes nothing (this part runs everywhere).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { gpuDescribe } from "./_gpu.ts";
import type { ChildReport } from "./_sticky_child.ts";

const child = fileURLToPath(new URL("./_sticky_child.ts", import.meta.url));
const isBun = (globalThis as { Bun?: unknown }).Bun !== undefined;
const SEED = 20261129;

function runChild(kind: "cpu" | "cuda", mode: "fault" | "clean"): ChildReport {
  const args = isBun
    ? [child, kind, mode, String(SEED)]
    : ["run", "-A", child, kind, mode, String(SEED)];
  const r = spawnSync(process.execPath, args, {
    encoding: "utf8",
    timeout: 180_000,
    maxBuffer: 16 << 20,
  });
  const out = `${process.execPath} ${
    args.join(" ")
  } (seed ${SEED}) exited ${r.status}\n${r.stdout}\n${r.stderr}`;
  assert.equal(r.status, 0, out);
  const line = r.stdout.trim().split("\n").at(-1) ?? "";
  return JSON.parse(line) as ChildReport;
}

function assertAllOk(steps: ChildReport["before"], what: string): void {
  assert.ok(steps.length >= 7, `${what}: every kind of call ran`);
  for (const s of steps) assert.ok(s.ok, `${what}: ${s.op} failed: ${s.code} ${s.message}`);
}

describe("the test-only fault export on the CPU backend", () => {
  it("refuses with KIVI_ERR_NO_DEVICE and a message, and the backend keeps working (child process)", () => {
    const r = runChild("cpu", "fault");
    assert.equal(r.kind, "cpu");
    assertAllOk(r.before, "before");
    assert.equal(r.fault?.ok, false);
    assert.equal(r.fault?.code, "KIVI_ERR_NO_DEVICE");
    assert.match(r.fault?.message ?? "", /kivi_debug_fault: the CPU build has no CUDA device/);
    assertAllOk(r.after, "after");
    assert.ok(r.disposed.ok, `dispose: ${r.disposed.message}`);
  });
});

gpuDescribe("sticky CUDA faults (child processes)", () => {
  it("after an illegal-address fault every call fails with KIVI_ERR_CUDA_STICKY and says so", () => {
    const r = runChild("cuda", "fault");
    assert.equal(r.kind, "cuda");
    assertAllOk(r.before, "before the fault");
    assert.equal(r.fault?.code, "KIVI_ERR_CUDA_STICKY", `the fault itself: ${r.fault?.message}`);
    assert.match(r.fault?.message ?? "", /illegal/i, "CUDA's name of the fault is in the message");
    assert.ok(r.after.length >= 7, "every kind of call was tried after the fault");
    for (const s of r.after) {
      assert.equal(
        s.code,
        "KIVI_ERR_CUDA_STICKY",
        `${s.op} after the fault: ${s.ok ? "succeeded" : `${s.code} ${s.message}`}`,
      );
      assert.match(s.message ?? "", /sticky CUDA fault/, `${s.op}: the message says why`);
      assert.match(
        s.message ?? "",
        /new process|destroy it/,
        `${s.op}: the message says what to do`,
      );
    }
    assert.ok(r.disposed.ok, `dispose after the fault must not throw: ${r.disposed.message}`);
  });

  it("a new process works normally afterwards", () => {
    const r = runChild("cuda", "clean");
    assert.equal(r.kind, "cuda");
    assertAllOk(r.before, "a fresh process");
    assert.ok(r.disposed.ok, `dispose: ${r.disposed.message}`);
  });
});
