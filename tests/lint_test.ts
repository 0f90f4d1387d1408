/**
 * `deno lint` (deno.json `lint`, the recommended rules) passes on the tree, as CI's `npm run lint`
 * checks together with the formatters (scripts/format.ts).
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("../", import.meta.url));
const deno = join(root, "node_modules", ".bin", "deno");

describe("lint", () => {
  it("deno lint finds no problem", (t) => {
    if (!existsSync(deno)) return t.skip("no node_modules/.bin/deno (run npm ci)");
    const r = spawnSync(deno, ["lint"], {
      cwd: root,
      encoding: "utf8",
      env: { ...process.env, NO_COLOR: "1" },
    });
    assert.equal(r.status, 0, `${r.stdout}\n${r.stderr}`.slice(-4000));
  });
  it("CI runs the format check and the linter", () => {
    const ci = readFileSync(join(root, ".ci/run"), "utf8");
    assert.match(ci, /^npm run lint/m);
    const pkg = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
    assert.equal(pkg.scripts.lint, "bun scripts/format.ts --check");
  });
});
