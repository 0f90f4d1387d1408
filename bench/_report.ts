/**
 * Benchmark bookkeeping shared by every bench/*.ts: GB/s as 1e9 bytes, medians, and the results
 * file bench/results/<device>.json (one section per benchmark) with a markdown table beside it.
 *
 * @module
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import os from "node:os";
import { parseArgs as parseArgv } from "node:util";

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
  const fmt = (
    v: string | number,
  ) => (typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : v);
  return [
    `| ${cols.join(" | ")} |`,
    `| ${cols.map(() => "---").join(" | ")} |`,
    ...rows.map((r) => `| ${cols.map((c) => fmt(r[c] ?? "")).join(" | ")} |`),
  ].join("\n");
}

/**
 * An SVG chart of the attention section: time per decode step against the KV tokens read
 * (batch x context), one line per cache, with the bandwidth floor of each cache's bytes at the
 * copy bandwidth of the same run drawn dashed. Log-log axes.
 */
export function attentionChart(section: Section): string {
  const W = 720, H = 440, L = 70, R = 230, T = 40, B = 50;
  const series = new Map<string, { x: number; y: number; floor: number }[]>();
  for (const r of section.rows) {
    const m = /^(\d+)x(\d+)$/.exec(String(r.case));
    if (!m) continue; // GQA and other shapes are not on the same axis
    const x = Number(m[1]) * Number(m[2]);
    const y = Number(r["us/step"]);
    const floor = (Number(r["MB read"]) * 1e6) / (section.copyGBps * 1e9) * 1e6;
    const name = String(r.cache);
    if (!series.has(name)) series.set(name, []);
    series.get(name)!.push({ x, y, floor });
  }
  const pts = [...series.values()].flat();
  if (pts.length === 0) return "";
  const xs = pts.map((p) => p.x), ys = pts.flatMap((p) => [p.y, p.floor]);
  const lx0 = Math.floor(Math.log10(Math.min(...xs))), lx1 = Math.ceil(Math.log10(Math.max(...xs)));
  const ly0 = Math.floor(Math.log10(Math.min(...ys))), ly1 = Math.ceil(Math.log10(Math.max(...ys)));
  const px = (x: number) => L + ((Math.log10(x) - lx0) / Math.max(lx1 - lx0, 1)) * (W - L - R);
  const py = (y: number) => H - B - ((Math.log10(y) - ly0) / Math.max(ly1 - ly0, 1)) * (H - T - B);
  const colors = ["#444444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${L}" y="22" font-size="14">Decode attention per layer-step, ${section.device} (copy ${
      section.copyGBps.toFixed(0)
    } GB/s, ${section.date})</text>`,
  ];
  for (let e = lx0; e <= lx1; e++) {
    out.push(
      `<line x1="${px(10 ** e)}" y1="${T}" x2="${px(10 ** e)}" y2="${H - B}" stroke="#eee"/>`,
    );
    out.push(`<text x="${px(10 ** e)}" y="${H - B + 16}" text-anchor="middle">1e${e}</text>`);
  }
  for (let e = ly0; e <= ly1; e++) {
    out.push(
      `<line x1="${L}" y1="${py(10 ** e)}" x2="${W - R}" y2="${py(10 ** e)}" stroke="#eee"/>`,
    );
    out.push(
      `<text x="${L - 6}" y="${py(10 ** e) + 4}" text-anchor="end">${
        10 ** e >= 1 ? 10 ** e : (10 ** e).toPrecision(1)
      }</text>`,
    );
  }
  out.push(
    `<text x="${(L + W - R) / 2}" y="${
      H - 12
    }" text-anchor="middle">KV tokens read per step (batch x context)</text>`,
  );
  out.push(
    `<text x="16" y="${(T + H - B) / 2}" transform="rotate(-90 16 ${
      (T + H - B) / 2
    })" text-anchor="middle">microseconds per step</text>`,
  );
  out.push(
    `<rect x="${L}" y="${T}" width="${W - L - R}" height="${
      H - T - B
    }" fill="none" stroke="#888"/>`,
  );
  [...series.entries()].forEach(([name, list], i) => {
    const c = colors[i % colors.length];
    const sorted = [...list].sort((a, b) => a.x - b.x);
    const line = (key: "y" | "floor") =>
      sorted.map((p) => `${px(p.x).toFixed(1)},${py(p[key]).toFixed(1)}`).join(" ");
    out.push(`<polyline points="${line("y")}" fill="none" stroke="${c}" stroke-width="2"/>`);
    out.push(
      `<polyline points="${
        line("floor")
      }" fill="none" stroke="${c}" stroke-width="1" stroke-dasharray="5,4"/>`,
    );
    for (const p of sorted) {
      out.push(`<circle cx="${px(p.x).toFixed(1)}" cy="${py(p.y).toFixed(1)}" r="3" fill="${c}"/>`);
    }
    const ly = T + 14 + i * 36;
    out.push(
      `<line x1="${W - R + 12}" y1="${ly}" x2="${
        W - R + 36
      }" y2="${ly}" stroke="${c}" stroke-width="2"/>`,
    );
    out.push(
      `<text x="${W - R + 42}" y="${ly + 4}">${
        name.replace(/&/g, "&amp;").replace(/</g, "&lt;")
      }</text>`,
    );
    out.push(
      `<line x1="${W - R + 12}" y1="${ly + 16}" x2="${W - R + 36}" y2="${
        ly + 16
      }" stroke="${c}" stroke-dasharray="5,4"/>`,
    );
    out.push(`<text x="${W - R + 42}" y="${ly + 20}" fill="#555">its bandwidth floor</text>`);
  });
  out.push("</svg>");
  return out.join("\n") + "\n";
}

/** Merges `section` under `name` into bench/results/<device>.json and rewrites <device>.md (and,
 * for the attention section, <device>-attention.svg). */
export function writeSection(name: string, section: Section, dir = resultsDir): string {
  mkdirSync(dir, { recursive: true });
  const slug = deviceSlug(section.device);
  const jsonPath = `${dir}/${slug}.json`;
  const all: Record<string, Section> = existsSync(jsonPath)
    ? JSON.parse(readFileSync(jsonPath, "utf8"))
    : {};
  all[name] = section;
  writeFileSync(jsonPath, JSON.stringify(all, null, 2) + "\n");
  const md = Object.entries(all).map(([k, s]) =>
    `## ${k}\n\n${s.device} (${s.backend}, ${s.runtime}), ${s.date}, host ${s.host}; copy bandwidth measured in the same run: ${
      s.copyGBps.toFixed(1)
    } GB/s.${s.notes ? `\n\n${s.notes}` : ""}\n\n${table(s.rows)}\n`
  ).join("\n");
  const chart = all.attention ? attentionChart(all.attention) : "";
  if (chart) writeFileSync(`${dir}/${slug}-attention.svg`, chart);
  const img = chart ? `![decode attention time per step](${slug}-attention.svg)\n\n` : "";
  writeFileSync(`${dir}/${slug}.md`, `# Benchmark results: ${section.device}\n\n${img}${md}`);
  return jsonPath;
}

/** A results section of this run: the device, backend and runtime of `kivi`, today's date, the host. */
export function section(
  kivi: { deviceName: string; kind: string; runtime: string },
  copyGBps: number,
  notes: string,
  rows: Row[],
): Section {
  return {
    device: kivi.deviceName,
    backend: kivi.kind,
    runtime: kivi.runtime,
    date: new Date().toISOString().slice(0, 10),
    host: hostName(),
    copyGBps,
    notes,
    rows,
  };
}

/** Host description for the record. */
export function hostName(): string {
  return `${os.cpus()[0]?.model ?? "cpu"} x${os.cpus().length}`;
}

/** Parses `--name value` options and `--flag` flags with node:util's parseArgs (in Bun and Deno alike):
 * strict, so an unknown option or a missing value is an error that names it. Values come back as
 * strings, a flag given as "true". */
export function parseArgs(
  argv: string[],
  strings: readonly string[],
  flags: readonly string[] = [],
): Map<string, string> {
  const options: Record<string, { type: "string" | "boolean" }> = {};
  for (const n of strings) options[n] = { type: "string" };
  for (const n of flags) options[n] = { type: "boolean" };
  const { values } = parseArgv({ args: argv, options, strict: true, allowPositionals: false });
  return new Map(Object.entries(values).map(([k, v]) => [k, String(v)]));
}

/** One point of {@link klChart}. */
export interface KlPoint {
  /** The series (one a residual, say), a line through its calibrated points. */
  series: string;
  label: string;
  bitsPerValue: number;
  kl: number;
  /** A calibrated plan (a square on the series' line) or a uniform cache (a circle). */
  calibrated: boolean;
}

const esc = (s: string) => s.replace(/&/g, "&amp;").replace(/</g, "&lt;");

/**
 * An SVG chart of KL against bits 16 (log axis) over bits per value (linear axis, the fp16 window
 * excluded): each series' uniform caches as circles labelled with their names, its calibrated plans
 * as squares joined by a line. Points at KL 0 or beyond 8 bits (bits 16) are left out.
 */
export function klChart(title: string, points: readonly KlPoint[]): string {
  const W = 760, H = 460, L = 70, R = 200, T = 40, B = 50;
  const pts = points.filter((p) => p.kl > 0 && p.bitsPerValue <= 8);
  if (pts.length === 0) return "";
  const x0 = Math.floor(Math.min(...pts.map((p) => p.bitsPerValue)) * 2) / 2;
  const x1 = Math.ceil(Math.max(...pts.map((p) => p.bitsPerValue)) * 2) / 2;
  const ly0 = Math.floor(Math.log10(Math.min(...pts.map((p) => p.kl))));
  const ly1 = Math.ceil(Math.log10(Math.max(...pts.map((p) => p.kl))));
  const px = (x: number) => L + ((x - x0) / Math.max(x1 - x0, 0.5)) * (W - L - R);
  const py = (y: number) => H - B - ((Math.log10(y) - ly0) / Math.max(ly1 - ly0, 1)) * (H - T - B);
  const colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#444444"];
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${L}" y="22" font-size="14">${esc(title)}</text>`,
  ];
  for (let x = x0; x <= x1 + 1e-9; x += 0.5) {
    out.push(`<line x1="${px(x)}" y1="${T}" x2="${px(x)}" y2="${H - B}" stroke="#eee"/>`);
    out.push(`<text x="${px(x)}" y="${H - B + 16}" text-anchor="middle">${x}</text>`);
  }
  for (let e = ly0; e <= ly1; e++) {
    out.push(
      `<line x1="${L}" y1="${py(10 ** e)}" x2="${W - R}" y2="${py(10 ** e)}" stroke="#eee"/>`,
    );
    out.push(`<text x="${L - 6}" y="${py(10 ** e) + 4}" text-anchor="end">1e${e}</text>`);
  }
  out.push(
    `<text x="${(L + W - R) / 2}" y="${
      H - 12
    }" text-anchor="middle">bits per value (K and V, window excluded)</text>`,
    `<text x="16" y="${(T + H - B) / 2}" transform="rotate(-90 16 ${
      (T + H - B) / 2
    })" text-anchor="middle">KL vs bits 16 (nats a step)</text>`,
    `<rect x="${L}" y="${T}" width="${W - L - R}" height="${
      H - T - B
    }" fill="none" stroke="#888"/>`,
  );
  const series = [...new Set(pts.map((p) => p.series))];
  series.forEach((name, i) => {
    const c = colors[i % colors.length];
    const mine = pts.filter((p) => p.series === name);
    const cal = mine.filter((p) => p.calibrated).sort((a, b) => a.bitsPerValue - b.bitsPerValue);
    if (cal.length > 1) {
      const line = cal.map((p) => `${px(p.bitsPerValue).toFixed(1)},${py(p.kl).toFixed(1)}`);
      out.push(`<polyline points="${line.join(" ")}" fill="none" stroke="${c}" stroke-width="2"/>`);
    }
    for (const p of mine) {
      const x = px(p.bitsPerValue), y = py(p.kl);
      out.push(
        p.calibrated
          ? `<rect x="${(x - 4).toFixed(1)}" y="${
            (y - 4).toFixed(1)
          }" width="8" height="8" fill="${c}"/>`
          : `<circle cx="${x.toFixed(1)}" cy="${
            y.toFixed(1)
          }" r="4" fill="none" stroke="${c}" stroke-width="2"/>`,
        `<text x="${(x + 7).toFixed(1)}" y="${(y - 5).toFixed(1)}" font-size="9" fill="${c}">${
          esc(p.label)
        }</text>`,
      );
    }
    const ly = T + 14 + i * 40;
    out.push(
      `<circle cx="${W - R + 20}" cy="${ly}" r="4" fill="none" stroke="${c}" stroke-width="2"/>`,
      `<text x="${W - R + 32}" y="${ly + 4}">${esc(name)}: uniform</text>`,
      `<rect x="${W - R + 16}" y="${ly + 12}" width="8" height="8" fill="${c}"/>`,
      `<text x="${W - R + 32}" y="${ly + 20}">${esc(name)}: calibrated</text>`,
    );
  });
  out.push("</svg>");
  return out.join("\n") + "\n";
}
