/**
 * Benchmark bookkeeping shared by every bench/*.ts: GB/s as 1e9 bytes, medians, and the results
 * file bench/results/<device>.json (one section per benchmark) with a markdown table beside it.
 *
 * @module
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import os from "node:os";

/** GB/s (1e9 bytes per second) of `bytes` moved in `ms` milliseconds. */
export function gbps(bytes: number, ms: number): number {
  return bytes / (ms * 1e-3) / 1e9;
}

/** Median of a list of numbers. */
export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** A file-name-safe slug of a device name ("NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"). */
export function deviceSlug(name: string): string {
  return name.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "");
}

/** One row of a results table. */
export type Row = Record<string, string | number>;

/** A benchmark section: what ran, where, and its rows. */
export interface Section {
  device: string;
  backend: string;
  runtime: string;
  date: string;
  host: string;
  copyGBps: number;
  notes?: string;
  rows: Row[];
}

const resultsDir = fileURLToPath(new URL("./results/", import.meta.url));

function table(rows: Row[]): string {
  if (rows.length === 0) return "";
  const cols = Object.keys(rows[0]);
  const fmt = (v: string | number) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : v);
  return [
    `| ${cols.join(" | ")} |`,
    `| ${cols.map(() => "---").join(" | ")} |`,
    ...rows.map((r) => `| ${cols.map((c) => fmt(r[c] ?? "")).join(" | ")} |`),
  ].join("\n");
}

/** Merges `section` under `name` into bench/results/<device>.json and rewrites <device>.md. */
export function writeSection(name: string, section: Section, dir = resultsDir): string {
  mkdirSync(dir, { recursive: true });
  const slug = deviceSlug(section.device);
  const jsonPath = `${dir}/${slug}.json`;
  const all: Record<string, Section> = existsSync(jsonPath) ? JSON.parse(readFileSync(jsonPath, "utf8")) : {};
  all[name] = section;
  writeFileSync(jsonPath, JSON.stringify(all, null, 2) + "\n");
  const md = Object.entries(all).map(([k, s]) =>
    `## ${k}\n\n${s.device} (${s.backend}, ${s.runtime}), ${s.date}, host ${s.host}; copy bandwidth measured in the same run: ${
      s.copyGBps.toFixed(1)
    } GB/s.${s.notes ? `\n\n${s.notes}` : ""}\n\n${table(s.rows)}\n`
  ).join("\n");
  writeFileSync(`${dir}/${slug}.md`, `# Benchmark results: ${section.device}\n\n${md}`);
  return jsonPath;
}

/** Host description for the record. */
export function hostName(): string {
  return `${os.cpus()[0]?.model ?? "cpu"} x${os.cpus().length}`;
}

/** Parses `--name value` and `--flag` arguments. */
export function parseArgs(argv: string[]): Map<string, string> {
  const m = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (!a.startsWith("--")) continue;
    const next = argv[i + 1];
    if (next !== undefined && !next.startsWith("--")) {
      m.set(a.slice(2), next);
      i++;
    } else m.set(a.slice(2), "true");
  }
  return m;
}
