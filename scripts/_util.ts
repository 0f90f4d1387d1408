/**
 * What the scripts share (check.ts, test.ts, format.ts): the file walk, the local binary of an npm
 * devDependency, and running a command echoed first.
 */
import { spawn } from "node:child_process";
import fs from "node:fs";
import path from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";

/** The repository root. */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");

/** The local binary of an npm devDependency (node_modules/.bin), else the name (found on PATH). */
export function bin(name: string): string {
  const local = path.join(ROOT, "node_modules", ".bin", name);
  return fs.existsSync(local) ? local : name;
}

/** Runs cmd in ROOT (echoed first unless its stdout is captured), resolving to its exit code and the
 * captured stdout; colour is off where stdout is not a terminal. */
export function run(
  cmd: string,
  args: string[],
  capture = false,
): Promise<{ code: number; stdout: string }> {
  if (!capture) console.log(`$ ${[path.relative(ROOT, cmd) || cmd, ...args].join(" ")}`);
  return new Promise((resolve) => {
    const env = process.stdout.isTTY ? process.env : { ...process.env, NO_COLOR: "1" };
    const child = spawn(cmd, args, {
      cwd: ROOT,
      env,
      stdio: ["ignore", capture ? "pipe" : "inherit", "inherit"],
    });
    const chunks: Buffer[] = [];
    child.stdout?.on("data", (c: Buffer) => chunks.push(c));
    child.on("error", (err) => {
      console.error(`${cmd}: ${err.message}`);
      resolve({ code: 127, stdout: "" });
    });
    child.on(
      "close",
      (code) => resolve({ code: code ?? 1, stdout: Buffer.concat(chunks).toString("utf8") }),
    );
  });
}

/** Files under `dir` (relative to `root`) whose names pass `keep`, as `dir/.../name`, sorted. */
export function filesUnder(root: string, dir: string, keep: (name: string) => boolean): string[] {
  const out: string[] = [];
  const walk = (rel: string) => {
    let entries: fs.Dirent[];
    try {
      entries = fs.readdirSync(path.join(root, rel), { withFileTypes: true });
    } catch {
      return;
    }
    for (const e of entries) {
      const child = `${rel}/${e.name}`;
      if (e.isDirectory()) walk(child);
      else if (e.isFile() && keep(e.name)) out.push(child);
    }
  };
  walk(dir);
  return out.sort();
}
