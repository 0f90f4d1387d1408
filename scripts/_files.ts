/**
 * The file walk the scripts share (check.ts, test.ts, format.ts): every file under a folder whose
 * name passes a test, relative to the root, sorted; a missing folder holds none.
 */
import fs from "node:fs";
import path from "node:path";

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
