/**
 * The benchmark report writer: GB/s as 1e9 bytes, medians, and the attention chart.
 */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import type { Section } from "../bench/_report.ts";
import { attentionChart, deviceSlug, gbps, median, parseArgs } from "../bench/_report.ts";

describe("bench report", () => {
  it("counts GB/s in 1e9 bytes and takes medians", () => {
    assert.equal(gbps(2e9, 1000), 2);
    assert.equal(median([5, 1, 3]), 3);
    assert.equal(median([4, 1, 3, 2]), 2.5);
    assert.equal(deviceSlug("NVIDIA H100 80GB HBM3"), "nvidia-h100-80gb-hbm3");
  });

  it("charts time per step against tokens read, one line and one floor per cache, GQA left out", () => {
    const row = (c: string, cache: string, us: number, mb: number) => ({
      case: c,
      cache,
      "us/step": us,
      "MB read": mb,
    });
    const s: Section = {
      device: "Test GPU",
      backend: "cuda",
      runtime: "bun",
      date: "2026-11-28",
      host: "x",
      copyGBps: 1000,
      rows: [
        row("1x4096", "bits 16", 100, 67),
        row("8x8192", "bits 16", 900, 1074),
        row("1x4096", "2-bit", 30, 14),
        row("8x8192", "2-bit", 200, 215),
        row("8x32768 GQA 32/8", "2-bit", 300, 205),
      ],
    };
    const svg = attentionChart(s);
    assert.match(svg, /^<svg /);
    assert.equal(
      (svg.match(/<polyline /g) ?? []).length,
      4,
      "a line and a floor for each of 2 caches",
    );
    assert.equal((svg.match(/<circle /g) ?? []).length, 4, "GQA row not on the tokens axis");
    assert.match(svg, /Test GPU \(copy 1000 GB\/s/);
  });
});

describe("bench arguments", () => {
  it("reads --name value and --flag with node:util parseArgs, refusing unknown options", () => {
    const args = parseArgs(["--backend", "cpu", "--write"], ["backend", "out"], ["write"]);
    assert.equal(args.get("backend"), "cpu");
    assert.equal(args.get("write"), "true");
    assert.equal(args.has("out"), false);
    assert.throws(() => parseArgs(["--bogus"], ["backend"]), /bogus/);
  });
});
