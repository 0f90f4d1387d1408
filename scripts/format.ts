/**
 * The formatters and the linter behind `npm run fmt` and `npm run lint` (CI runs the latter):
 *
 * - TypeScript: `deno fmt` (deno.json `fmt`: 100 columns, 2 spaces, double quotes, semicolons) and
 *   `deno lint` (deno.json `lint`: the recommended rules), with the Deno that `npm ci` installs;
 * - C and CUDA (`cuda/`, `tests/c/`): `clang-format` with `.clang-format` (Google's style at 120
 *   columns). CI installs it from the distribution (Debian 12: clang-format 14, `apt-get install
 *   clang-format`); another major version may wrap a few lines differently, so the check names the
 *   version it ran.
 *
 * `bun scripts/format.ts` formats the tree in place; `--check` changes nothing and fails (exit 1) on
 * an unformatted file or a lint error, after running every step. Each command is echoed first.
 */
import process from "node:process";
import { bin, filesUnder, ROOT, run } from "./_util.ts";

/** Folders holding C and CUDA sources, and the endings clang-format takes. */
const C_DIRS = ["cuda", "tests/c"];
const C_EXTS = [".c", ".h", ".cu", ".cuh"];
/** The clang-format major version CI uses (Debian 12); another one only gets a note. */
const CLANG_FORMAT_MAJOR = 14;

/** Every C and CUDA source under C_DIRS, relative to the root, sorted. */
export function cSources(root = ROOT): string[] {
  return C_DIRS.flatMap((d) => filesUnder(root, d, (n) => C_EXTS.some((x) => n.endsWith(x))))
    .sort();
}

/** clang-format's path and major version, or undefined (with a line saying how to get it). */
async function clangFormat(): Promise<string | undefined> {
  const cmd = process.env.CLANG_FORMAT ?? "clang-format";
  const { code, stdout } = await run(cmd, ["--version"], true);
  if (code !== 0) {
    console.error(
      `format: ${cmd} not found: install it (Debian/Ubuntu: apt-get install clang-format) or set CLANG_FORMAT`,
    );
    return undefined;
  }
  const major = Number(/version (\d+)/.exec(stdout)?.[1]);
  const note = major === CLANG_FORMAT_MAJOR
    ? ""
    : ` (CI uses ${CLANG_FORMAT_MAJOR}; a few lines may wrap differently)`;
  console.log(`format: ${stdout.trim()}${note}`);
  return cmd;
}

async function main(): Promise<number> {
  const check = process.argv.includes("--check");
  const deno = bin("deno");
  const failed: string[] = [];
  const step = async (name: string, cmd: string, args: string[]) => {
    if ((await run(cmd, args)).code !== 0) failed.push(name);
  };
  await step("deno fmt", deno, check ? ["fmt", "--check"] : ["fmt"]);
  if (check) await step("deno lint", deno, ["lint"]);
  const cf = await clangFormat();
  if (cf === undefined) failed.push("clang-format (not installed)");
  else {await step("clang-format", cf, [
      ...(check ? ["--dry-run", "--Werror"] : ["-i"]),
      "--style=file",
      ...cSources(),
    ]);}
  if (failed.length > 0) {
    const fix = check ? "; `npm run fmt` formats the tree, lint errors are fixed by hand" : "";
    console.error(`format: FAILED: ${failed.join(", ")}${fix}`);
    return 1;
  }
  console.log(
    check ? "format: every file formatted, no lint error" : "format: the tree is formatted",
  );
  return 0;
}

if (import.meta.main) process.exit(await main());
