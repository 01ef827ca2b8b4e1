// Maps a config error path (compositions.NAME.calls.user.url) to the line
// of that key in the YAML text of the composition, by indentation.

function keyLines(text) {
  const out = [];
  text.split('\n').forEach((line, i) => {
    const m = /^(\s*)(-\s+)?("([^"]*)"|'([^']*)'|[^\s:#'"][^:#]*?)\s*:(\s|$)/.exec(line);
    const dash = /^(\s*)-(\s|$)/.exec(line);
    if (m) {
      const key = m[4] ?? m[5] ?? m[3];
      out.push({ line: i + 1, indent: m[1].length + (m[2] ? m[2].length : 0), key, item: !!m[2], itemIndent: m[1].length });
    } else if (dash) {
      out.push({ line: i + 1, indent: dash[1].length + 2, key: null, item: true, itemIndent: dash[1].length });
    }
  });
  return out;
}

function segments(path) {
  const segs = [];
  for (const part of path.split('.')) {
    const m = /^([^[]*)((\[\d+\])*)$/.exec(part);
    if (!m) { segs.push(part); continue; }
    if (m[1]) segs.push(m[1]);
    for (const idx of m[2].matchAll(/\[(\d+)\]/g)) segs.push(Number(idx[1]));
  }
  return segs;
}

/// The 1-based line of `path` in `text`, or of its nearest ancestor found;
/// 1 when nothing matches. `prefix` (compositions.NAME) is dropped first.
export function lineOf(text, path, prefix) {
  let rel = path;
  if (prefix && (rel === prefix || rel.startsWith(prefix + '.'))) rel = rel.slice(prefix.length + 1);
  if (!rel) return 1;
  const lines = keyLines(text);
  let lo = 0, hi = lines.length, parentIndent = -1, best = 1;
  for (const seg of segments(rel)) {
    const kids = lines.slice(lo, hi).filter(l => l.indent > parentIndent);
    if (!kids.length) break;
    const childIndent = Math.min(...kids.map(l => l.indent));
    let found = -1;
    if (typeof seg === 'number') {
      let n = -1;
      for (let i = lo; i < hi; i++) {
        const l = lines[i];
        if (l.item && l.indent === childIndent && ++n === seg) { found = i; break; }
      }
    } else {
      for (let i = lo; i < hi; i++) {
        const l = lines[i];
        if (l.indent === childIndent && l.key === seg) { found = i; break; }
      }
    }
    if (found < 0) break;
    best = lines[found].line;
    const own = lines[found].indent;
    let end = found + 1;
    while (end < hi && lines[end].indent > own && !(lines[end].item && lines[end].itemIndent < own)) end++;
    // A list item's own keys share its indent: they belong to it.
    if (typeof seg === 'number') {
      end = found + 1;
      while (end < hi && !(lines[end].indent <= childIndent && lines[end].item) && lines[end].indent >= own) end++;
      lo = found; hi = end; parentIndent = own - 1;
      // the item's first key is on the dash line; keep it in range
      continue;
    }
    lo = found + 1; hi = end; parentIndent = own;
  }
  return best;
}

/// A YAML parse error names its line: `... at line 3 column 5`.
export function lineOfMessage(message) {
  const m = /line (\d+)/.exec(message);
  return m ? Number(m[1]) : null;
}
