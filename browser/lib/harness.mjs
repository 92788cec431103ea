// The tiny test harness of the browser suite: named checks, skips, one result line each, and
// exactly one closing line "N passed, N failed, N skipped".

export const counts = { passed: 0, failed: 0, skipped: 0 };
export const failures = [];

export class Skip extends Error {}

/** Skip the current check. */
export function skip(reason) {
  throw new Skip(reason);
}

/** A value an earlier check should have produced; skip when it did not. */
export function need(value, what) {
  if (value === undefined || value === null || value === false) skip(`needs ${what}`);
  return value;
}

export function assert(cond, message) {
  if (!cond) throw new Error(message);
}

export function show(v) {
  if (typeof v === 'string') return JSON.stringify(v.length > 300 ? `${v.slice(0, 300)}…` : v);
  try {
    const s = JSON.stringify(v);
    return s === undefined ? String(v) : s.length > 300 ? `${s.slice(0, 300)}…` : s;
  } catch {
    return String(v);
  }
}

export function eq(actual, expected, what) {
  if (actual !== expected) throw new Error(`${what}: expected ${show(expected)}, got ${show(actual)}`);
}

/** Strips Playwright's multi-line call logs down to the first line. */
export function describeError(e) {
  let msg = e?.message ?? String(e);
  const lines = msg.split('\n').filter((l) => l.trim() && !/^\s*(Call log|=+|\s*- )/.test(l));
  msg = lines.slice(0, 6).join(' | ').replace(/\u001b\[[0-9;]*m/g, '');
  return msg;
}

let only = [];
export function setOnly(words) {
  only = words.map((w) => w.toLowerCase());
}
/** Whether a flow whose title is `title` runs under --only. */
export function selected(title) {
  return only.length === 0 || only.some((w) => title.toLowerCase().includes(w));
}

/** Records one result without running anything (page checks report through this). */
export function record(name, problems, skipped) {
  if (skipped) {
    counts.skipped++;
    console.log(`  skip  ${name}: ${skipped}`);
  } else if (problems.length === 0) {
    counts.passed++;
    console.log(`  ok    ${name}`);
  } else {
    counts.failed++;
    failures.push(name);
    console.log(`  FAIL  ${name}:`);
    for (const p of problems) console.log(`          - ${p}`);
  }
}

/** Runs one named check. Returns what fn returned when it passed, else undefined. */
export async function test(name, fn) {
  const started = Date.now();
  try {
    const value = await fn();
    counts.passed++;
    console.log(`  ok    ${name} (${((Date.now() - started) / 1000).toFixed(1)} s)`);
    return value === undefined ? true : value;
  } catch (e) {
    if (e instanceof Skip) {
      counts.skipped++;
      console.log(`  skip  ${name}: ${e.message}`);
    } else {
      counts.failed++;
      failures.push(name);
      console.log(`  FAIL  ${name}: ${describeError(e)}`);
    }
    return undefined;
  }
}

export function section(title) {
  console.log(`\n# ${title}`);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function closingLine() {
  return `${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped`;
}
