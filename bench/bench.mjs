#!/usr/bin/env node
// nidan side by side with the certified oidc-provider (the peer) and an axum hello-world, on this
// machine, in one run. bench/run.sh builds what is needed and calls this; see bench/README.md.
//
//   node bench/bench.mjs [--nidan PATH] [--hello PATH] [--argon2 PATH] [--rounds 2]
//        [--duration 10] [--connections 64] [--login-duration 10] [--only WORD]
//        [--quiet-wait 20] [--update-readme] [--keep]
//
// Only 127.0.0.1 is contacted. Every run is bounded: wrk rounds of --duration seconds, login
// runs of --login-duration seconds (plus 2 s warm-up each) and at most 2000 sign-ins each.
// Prints the result table; writes bench/results/latest.{md,json}; with --update-readme also
// replaces the table in bench/README.md. Timing never fails the run: it exits non-zero only
// when a server does not start or a scenario answers errors.
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

import argon2 from 'argon2';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..');

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

const OPTS = {
  nidan: path.join(REPO, 'target/release/nidan'),
  hello: path.join(HERE, 'hello/target/release/nidan-bench-hello'),
  argon2: path.join(HERE, 'argon2-verify/target/release/nidan-bench-argon2'),
  rounds: 2,
  duration: 10,
  connections: 64,
  threads: 1,
  loginDuration: 10,
  loginWarmup: 2,
  concurrencies: [2, 8, 32],
  students: 64,
  only: [],
  updateReadme: false,
  keep: false,
  quietWait: 20,
};
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    if (a === '--nidan') OPTS.nidan = path.resolve(v());
    else if (a === '--hello') OPTS.hello = path.resolve(v());
    else if (a === '--argon2') OPTS.argon2 = path.resolve(v());
    else if (a === '--rounds') OPTS.rounds = Math.max(1, Math.min(5, Number(v())));
    else if (a === '--duration') OPTS.duration = Math.max(1, Math.min(30, Number(v())));
    else if (a === '--connections') OPTS.connections = Number(v());
    else if (a === '--login-duration') OPTS.loginDuration = Math.max(2, Math.min(60, Number(v())));
    else if (a === '--only') OPTS.only.push(v().toLowerCase());
    else if (a === '--update-readme') OPTS.updateReadme = true;
    else if (a === '--quiet-wait') OPTS.quietWait = Math.max(0, Math.min(120, Number(v())));
    else if (a === '--keep') OPTS.keep = true;
    else if (a === '--help' || a === '-h') {
      console.log(fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').slice(1, 13).join('\n'));
      process.exit(0);
    } else {
      console.error(`unknown argument ${a}`);
      process.exit(2);
    }
  }
}
const wanted = (name) => !OPTS.only.length || OPTS.only.some((w) => name.toLowerCase().includes(w));

const log = (...a) => console.error(`[bench ${new Date().toISOString().slice(11, 19)}]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const b64u = (b) => Buffer.from(b).toString('base64url');
const MiB = (kb) => (kb == null ? null : Number((kb / 1024).toFixed(1)));

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

const children = new Set();
let shuttingDown = false;
function cleanup() {
  shuttingDown = true;
  for (const c of children) {
    if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
  }
}
process.on('exit', cleanup);
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    cleanup();
    process.exit(130);
  });
}

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

function childEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('NIDAN_') && k !== 'RUST_LOG') env[k] = v;
  return { ...env, NO_COLOR: '1', ...extra };
}

function startServer(name, cmd, args, { cwd, logFile, env } = {}) {
  const fd = fs.openSync(logFile, 'a');
  const child = spawn(cmd, args, { cwd, env: childEnv(env), stdio: ['ignore', fd, fd] });
  fs.closeSync(fd);
  children.add(child);
  child.on('exit', (code, signal) => {
    child.exited = { code, signal };
    if (!shuttingDown) log(`${name} (pid ${child.pid}) exited unexpectedly: code ${code}, signal ${signal}`);
  });
  child.benchName = name;
  child.logFile = logFile;
  return child;
}

async function waitHttp(child, url, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (child.exited) throw new Error(`${child.benchName} exited ${JSON.stringify(child.exited)}; log:\n${tail(child.logFile)}`);
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
      if (res.ok) {
        await res.arrayBuffer();
        return;
      }
    } catch {
      /* not up yet */
    }
    await sleep(200);
  }
  throw new Error(`${child.benchName} did not answer ${url} within ${timeoutMs / 1000} s; log:\n${tail(child.logFile)}`);
}

function tail(file, n = 25) {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-n).join('\n');
  } catch {
    return '(no log)';
  }
}

/** VmRSS and VmHWM of a process, in KiB. */
function memory(pid) {
  let status;
  try {
    status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return { rss_kb: null, hwm_kb: null };
  }
  const field = (k) => Number(status.match(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm'))?.[1]);
  return { rss_kb: field('VmRSS'), hwm_kb: field('VmHWM') };
}

const TICK_MS = 10; // USER_HZ = 100 on Linux
/** User + system CPU of a process so far, in ms. */
function cpuOf(pid) {
  let text;
  try {
    text = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return 0; // exited; reported by the exit handler
  }
  const f = text.split(') ')[1].split(' ');
  return (Number(f[11]) + Number(f[12])) * TICK_MS;
}
/** CPU of this process's waited-for children (wrk, the login driver, the probe), in ms. */
function childrenCpu() {
  const f = fs.readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ');
  return (Number(f[13]) + Number(f[14])) * TICK_MS;
}
/** Busy CPU of the whole machine so far, in ms. */
function machineBusy() {
  const [, ...v] = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/);
  const n = v.map(Number);
  const total = n.slice(0, 8).reduce((a, b) => a + b, 0);
  return (total - n[3] - n[4]) * TICK_MS;
}
/**
 * Measures what `fn` costs: CPU of the server under test, of the load generator (children), of
 * everything else on the machine ("foreign": other servers of this run idle, and other users).
 */
async function accounted(server, others, fn) {
  const t0 = performance.now();
  const s0 = cpuOf(server.proc.pid);
  const o0 = others.map((o) => cpuOf(o.proc.pid));
  const c0 = childrenCpu();
  const self0 = process.cpuUsage();
  const m0 = machineBusy();
  const result = await fn();
  const wall = performance.now() - t0;
  const server_ms = cpuOf(server.proc.pid) - s0;
  const others_ms = others.reduce((a, o, i) => a + cpuOf(o.proc.pid) - o0[i], 0);
  const load_ms = childrenCpu() - c0;
  const u = process.cpuUsage(self0);
  const self_ms = (u.user + u.system) / 1000;
  const busy_ms = machineBusy() - m0;
  return {
    result,
    cpu: {
      wall_ms: Math.round(wall),
      server_ms,
      server_cores: Number((server_ms / wall).toFixed(2)),
      load_cores: Number((load_ms / wall).toFixed(2)),
      foreign_cores: Number((Math.max(0, busy_ms - server_ms - others_ms - load_ms - self_ms) / wall).toFixed(2)),
    },
  };
}

/** Waits (at most `budgetS`) until the machine is quiet: < 0.3 cores busy outside this run. */
async function quiet(ours, budgetS) {
  const until = Date.now() + budgetS * 1000;
  let foreign = 0;
  do {
    const m0 = machineBusy();
    const o0 = ours.map((o) => cpuOf(o.proc.pid));
    const self0 = process.cpuUsage();
    await sleep(1000);
    const u = process.cpuUsage(self0);
    const mine = ours.reduce((a, o, i) => a + cpuOf(o.proc.pid) - o0[i], 0) + (u.user + u.system) / 1000;
    foreign = (machineBusy() - m0 - mine) / 1000;
    if (foreign < 0.3) return Number(foreign.toFixed(2));
    await sleep(1000);
  } while (Date.now() < until);
  log(`the machine is busy (${foreign.toFixed(2)} cores used outside this run); measuring anyway`);
  return Number(foreign.toFixed(2));
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 120_000, maxBuffer: 64 * 1024 * 1024, ...opts });
  if (r.error && r.error.code !== 'EPIPE') throw r.error;
  return r;
}

function runAsync(cmd, args, { env, timeoutMs = 180_000 } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: env ?? process.env, stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(t);
      children.delete(child);
      resolve({ code, stdout: out, stderr: err });
    });
  });
}

// ---------------------------------------------------------------------------
// Machine
// ---------------------------------------------------------------------------

function machine() {
  const lscpu = run('lscpu', []).stdout ?? '';
  const model = lscpu.match(/^Model name:\s+(.*)$/m)?.[1]?.trim() ?? os.cpus()[0]?.model ?? 'unknown';
  const nproc = Number((run('nproc', []).stdout ?? '').trim()) || os.cpus().length;
  const hypervisor = lscpu.match(/^Hypervisor vendor:\s+(.*)$/m)?.[1]?.trim();
  const wrkVersion = (run('wrk', ['--version']).stdout ?? '').split('\n')[0].replace(/ \[.*$/, '').trim();
  return {
    date: new Date().toISOString().slice(0, 10),
    cpu: `${model}${hypervisor ? ` (${hypervisor} guest)` : ''}`,
    cores: nproc,
    memory_gib: Number((os.totalmem() / 2 ** 30).toFixed(1)),
    kernel: os.release(),
    node: process.version,
    wrk: wrkVersion,
    loadavg_start: os.loadavg().map((x) => Number(x.toFixed(2))),
  };
}

// ---------------------------------------------------------------------------
// Setup: students, nidan configuration, peer users
// ---------------------------------------------------------------------------

const ARGON2_NODE = { type: argon2.argon2id, memoryCost: 19456, timeCost: 2, parallelism: 1 };

function students(n) {
  return Array.from({ length: n }, (_, i) => {
    const username = `s24${String(i + 1).padStart(5, '0')}`;
    return {
      username,
      password: `Univ-${b64u(crypto.randomBytes(9))}`,
      // ≥ 8 characters, A–Z, a–z and 0–9, half-width letters and digits only.
      second_password: `Second${100 + i}Pw${crypto.randomBytes(4).toString('hex')}`,
      email: `${username}@example.ac.jp`,
      claims: { name: `Student ${i + 1}`, family_name: 'Gakusei', given_name: `Taro${i + 1}`, student_id: username.toUpperCase(), affiliation: 'student' },
    };
  });
}

const tomlString = (s) => JSON.stringify(s);
const tomlInline = (o) => `{ ${Object.entries(o).map(([k, v]) => `${k} = ${tomlString(v)}`).join(', ')} }`;

async function prepareNidan(dir, people, secret) {
  const ndir = path.join(dir, 'nidan');
  fs.mkdirSync(ndir, { recursive: true });
  fs.writeFileSync(path.join(ndir, 'kek'), `${crypto.randomBytes(32).toString('base64')}\n`, { mode: 0o600 });
  fs.writeFileSync(path.join(ndir, 'bench.secret'), secret, { mode: 0o600 });
  // University password hashes through `nidan hash-password` (production parameters), two at a time.
  const hashes = new Array(people.length);
  for (let i = 0; i < people.length; i += 2) {
    await Promise.all(
      people.slice(i, i + 2).map(async (p, j) => {
        const r = await new Promise((resolve, reject) => {
          const child = spawn(OPTS.nidan, ['hash-password'], { env: childEnv(), stdio: ['pipe', 'pipe', 'pipe'] });
          let out = '';
          child.stdout.on('data', (d) => (out += d));
          child.on('error', reject);
          child.on('close', (code) => resolve({ code, out }));
          child.stdin.end(p.password);
        });
        const phc = r.out.split('\n').map((l) => l.trim()).find((l) => l.startsWith('$argon2id$'));
        if (r.code !== 0 || !phc) throw new Error(`nidan hash-password exited ${r.code}`);
        hashes[i + j] = phc;
      }),
    );
  }
  if (!hashes[0].startsWith('$argon2id$v=19$m=19456,t=2,p=1$')) throw new Error(`unexpected hash parameters: ${hashes[0]}`);
  fs.writeFileSync(
    path.join(ndir, 'users.toml'),
    people.map((p, i) => `[[users]]\nusername = ${tomlString(p.username)}\npassword_hash = ${tomlString(hashes[i])}\nclaims = ${tomlInline(p.claims)}\n`).join('\n'),
  );
  const port = await freePort();
  const issuer = `http://127.0.0.1:${port}`;
  const config = `issuer = ${tomlString(issuer)}
listen = ${tomlString(`127.0.0.1:${port}`)}
database_url = ${tomlString(`sqlite://${path.join(ndir, 'nidan.db')}`)}
key_encryption_key_file = ${tomlString(path.join(ndir, 'kek'))}
enrollment = "on-demand"
university_name = "Bench University"

[lifetimes]
access_token = "1h"

[directory]
kind = "file"
path = ${tomlString(path.join(ndir, 'users.toml'))}

[mail]
transport = "file"
from = "noreply@example.ac.jp"
path = ${tomlString(path.join(ndir, 'mail'))}

[[clients]]
client_id = "bench"
client_secret_file = ${tomlString(path.join(ndir, 'bench.secret'))}
redirect_uris = ["http://127.0.0.1:9/cb"]
token_endpoint_auth_method = "client_secret_basic"
grant_types = ["authorization_code", "client_credentials"]
scopes = ["openid", "profile", "email", "student"]
`;
  const configPath = path.join(ndir, 'nidan.toml');
  fs.writeFileSync(configPath, config);
  const check = run(OPTS.nidan, ['check-config', '--config', configPath], { cwd: ndir, env: childEnv() });
  if (check.status !== 0) throw new Error(`nidan check-config: ${check.stdout}${check.stderr}`);
  // Enroll every student with a second password (the email counts as verified).
  const jsonl = path.join(ndir, 'import.jsonl');
  fs.writeFileSync(jsonl, people.map((p) => JSON.stringify({ username: p.username, email: p.email, second_password: p.second_password })).join('\n') + '\n');
  const imp = run(OPTS.nidan, ['user', 'import', jsonl, '--config', configPath], { cwd: ndir, env: childEnv(), timeout: 300_000 });
  if (imp.status !== 0) throw new Error(`nidan user import: ${imp.stdout}${imp.stderr}`);
  return { dir: ndir, port, issuer, configPath };
}

async function preparePeer(dir, people, secret) {
  const pdir = path.join(dir, 'peer');
  fs.mkdirSync(pdir, { recursive: true });
  fs.writeFileSync(path.join(pdir, 'bench.secret'), secret, { mode: 0o600 });
  const users = await Promise.all(
    people.map(async (p) => ({
      username: p.username,
      password_hash: await argon2.hash(p.password, ARGON2_NODE),
      second_password_hash: await argon2.hash(p.second_password, ARGON2_NODE),
      claims: { ...p.claims, email: p.email, email_verified: true },
    })),
  );
  fs.writeFileSync(path.join(pdir, 'users.json'), JSON.stringify(users));
  const port = await freePort();
  return { dir: pdir, port, issuer: `http://127.0.0.1:${port}` };
}

// ---------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------

async function argon2Rust() {
  if (!fs.existsSync(OPTS.argon2)) throw new Error(`${OPTS.argon2} is missing (bench/run.sh builds it)`);
  const r = await runAsync(OPTS.argon2, ['30']);
  if (r.code !== 0) throw new Error(`argon2 timing failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim());
}

async function argon2Node() {
  const hash = await argon2.hash('Second2401001Pw', ARGON2_NODE);
  for (let i = 0; i < 2; i++) await argon2.verify(hash, 'Second2401001Pw');
  const times = [];
  for (let i = 0; i < 20; i++) {
    const t = performance.now();
    await argon2.verify(hash, 'Second2401001Pw');
    times.push(performance.now() - t);
  }
  times.sort((a, b) => a - b);
  return { params: 'argon2id m=19456 KiB, t=2, p=1', package: 'argon2 (npm) 0.45.1', median_ms: Number(times[10].toFixed(2)), min_ms: Number(times[0].toFixed(2)) };
}

function alive(...servers) {
  for (const s of servers) {
    if (s.proc.exited) throw new Error(`${s.name} exited (${JSON.stringify(s.proc.exited)}); log:\n${tail(s.proc.logFile)}`);
  }
}

async function wrk(url, script, env = {}, durationS = OPTS.duration) {
  const args = ['-t', String(OPTS.threads), '-c', String(OPTS.connections), '-d', `${durationS}s`, '--timeout', '5s', '-s', path.join(HERE, 'lua', script), url];
  const r = await runAsync('wrk', args, { env: { ...process.env, BENCH_LUA_DIR: path.join(HERE, 'lua'), ...env }, timeoutMs: (durationS + 30) * 1000 });
  const line = r.stdout.split('\n').find((l) => l.startsWith('WRK_JSON '));
  if (r.code !== 0 || !line) throw new Error(`wrk ${url} failed (exit ${r.code}): ${r.stderr || r.stdout}`);
  const res = JSON.parse(line.slice(9));
  const errs = Object.values(res.errors).reduce((a, b) => a + b, 0);
  res.error_count = errs;
  return res;
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function summarize(rounds) {
  const withCpu = rounds.filter((r) => r.cpu);
  return {
    cpu_us_per_req: withCpu.length ? Number(median(withCpu.map((r) => (1000 * r.cpu.server_ms) / r.requests)).toFixed(1)) : null,
    server_cores: withCpu.length ? Number(median(withCpu.map((r) => r.cpu.server_cores)).toFixed(2)) : null,
    load_cores: withCpu.length ? Number(median(withCpu.map((r) => r.cpu.load_cores)).toFixed(2)) : null,
    foreign_cores: withCpu.length ? Number(median(withCpu.map((r) => r.cpu.foreign_cores)).toFixed(2)) : null,
    rps: Number(median(rounds.map((r) => r.rps)).toFixed(1)),
    p50_ms: Number(median(rounds.map((r) => r.p50_ms)).toFixed(2)),
    p99_ms: Number(median(rounds.map((r) => r.p99_ms)).toFixed(2)),
    errors: rounds.reduce((a, r) => a + r.error_count, 0),
    rounds: rounds.map((r) => ({ rps: r.rps, p50_ms: r.p50_ms, p99_ms: r.p99_ms, requests: r.requests, errors: r.error_count, cpu: r.cpu })),
  };
}

async function loginRun(server, concurrency, { probe } = {}) {
  const args = [
    path.join(HERE, 'login-driver.mjs'),
    '--issuer', server.issuer,
    '--users', server.studentsFile,
    '--secret-file', server.secretFile,
    '--concurrency', String(concurrency),
    '--warmup', String(OPTS.loginWarmup),
    '--duration', String(OPTS.loginDuration),
    '--max-logins', '2000',
  ];
  const driver = runAsync(process.execPath, args, { timeoutMs: (OPTS.loginDuration + OPTS.loginWarmup + 120) * 1000 });
  let probed;
  if (probe) {
    // Measure while every core is on argon2: start after the warm-up, stop before the end.
    await sleep(OPTS.loginWarmup * 1000 + 500);
    probed = runAsync(process.execPath, [
      path.join(HERE, 'probe.mjs'), '--duration', String(Math.max(2, OPTS.loginDuration - 2)), '--rate', '40',
      `${server.issuer}/.well-known/openid-configuration`, `${server.issuer}/jwks`,
    ]);
  }
  const r = await driver;
  const line = r.stdout.trim().split('\n').pop();
  let res;
  try {
    res = JSON.parse(line);
  } catch {
    throw new Error(`login driver (${server.name}) failed: ${r.stderr || r.stdout}`);
  }
  if (res.error) throw new Error(`login driver (${server.name}): ${res.error}`);
  if (probed) {
    const p = await probed;
    res.probe = JSON.parse(p.stdout.trim().split('\n').pop());
  }
  return res;
}

async function oneLogin(server) {
  const r = await runAsync(process.execPath, [
    path.join(HERE, 'login-driver.mjs'), '--issuer', server.issuer, '--users', server.studentsFile, '--secret-file', server.secretFile, '--once',
  ]);
  const tokens = JSON.parse(r.stdout.trim().split('\n').pop());
  if (!tokens.access_token) throw new Error(`sign-in at ${server.name} failed: ${r.stdout}${r.stderr}`);
  if (!/^[A-Za-z0-9._~-]+$/.test(tokens.access_token)) throw new Error(`${server.name}: access token needs escaping`);
  return tokens.access_token;
}

async function expectOk(server, what, url, init) {
  const res = await fetch(url, init);
  const text = await res.text();
  if (!res.ok) throw new Error(`${server.name} ${what}: HTTP ${res.status} ${text.slice(0, 200)}`);
  return text;
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

const fmt = (x, d = 0) => (x == null ? '–' : Number(x).toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d }));
const ratio = (a, b) => (a && b ? `${(a / b).toFixed(2)}×` : '–');
const ok = (b) => (b == null ? '–' : b ? 'met' : '**missed**');

function report(R) {
  const m = R.machine;
  const a = R.argon2;
  const lines = [];
  lines.push(`**${m.date}**, ${m.cores} cores (\`nproc\`), ${m.cpu}, ${m.memory_gib} GiB, Linux ${m.kernel}, Node ${m.node}, ${m.wrk}; ` +
    `nidan ${R.nidan_version}. Load average at start ${m.loadavg_start.join(' / ')}, at the end ${m.loadavg_end.join(' / ')}; the run took ${R.seconds} s.`);
  lines.push('');
  lines.push(`wrk: ${OPTS.threads} thread, ${OPTS.connections} connections, ${OPTS.duration} s rounds, ${OPTS.rounds} rounds per server alternating nidan → peer (→ hello-world), ` +
    `2 s warm-up each; the median round is shown. Logins: ${OPTS.loginWarmup} s warm-up + ${OPTS.loginDuration} s counted per concurrency and server.`);
  lines.push('');
  if (a) {
    lines.push(`**argon2id** (m=19456 KiB, t=2, p=1), release build of the argon2 0.5.3 crate nidan uses: one verification **${a.rust.verify_ms.median} ms** ` +
      `(median of ${a.rust.iterations}; min ${a.rust.verify_ms.min}, p90 ${a.rust.verify_ms.p90}); ${a.rust.parallel.threads} threads at once: ${a.rust.parallel.verifications_per_s} verifications/s ` +
      `(${a.rust.parallel.median_ms} ms each); with one reused block buffer instead of a fresh 19 MiB allocation: ${a.rust.reused_buffer_verify_ms?.median} ms; ` +
      `nidan's extra short-lived hash per full login (m=4096 KiB, t=1): ${a.rust.short_lived_hash_ms} ms. The peer's argon2 (npm 0.45.1): ${a.node.median_ms} ms.`);
    lines.push('');
  }
  lines.push('| scenario | nidan req/s | peer req/s | nidan ÷ peer | nidan p50 / p99 ms | peer p50 / p99 ms | target | result |');
  lines.push('|---|---:|---:|---:|---:|---:|---|---|');
  for (const s of R.scenarios) {
    const n = s.nidan;
    const p = s.peer;
    lines.push(`| ${s.title} | ${fmt(n.rps)} | ${fmt(p?.rps)} | ${ratio(n.rps, p?.rps)} | ${fmt(n.p50_ms, 2)} / ${fmt(n.p99_ms, 2)} | ${p ? `${fmt(p.p50_ms, 2)} / ${fmt(p.p99_ms, 2)}` : '–'} | ${s.target_text} | ${ok(s.met)} |`);
  }
  if (R.hello) {
    lines.push(`| axum hello-world | ${fmt(R.hello.rps)} | | | ${fmt(R.hello.p50_ms, 2)} / ${fmt(R.hello.p99_ms, 2)} | | the ceiling on this machine | |`);
  }
  lines.push('');
  if (R.scenarios.some((s) => s.nidan.cpu_us_per_req != null)) {
    lines.push('CPU per request (server process, user + system, from `/proc/<pid>/stat`) and where the 2 cores went during the rounds (medians):');
    lines.push('');
    lines.push('| scenario | nidan µs CPU/req | peer µs CPU/req | peer ÷ nidan | nidan cores busy | peer cores busy | wrk cores | other load (cores) |');
    lines.push('|---|---:|---:|---:|---:|---:|---:|---:|');
    for (const s of R.scenarios) {
      const n = s.nidan;
      const p = s.peer;
      lines.push(`| ${s.title} | ${fmt(n.cpu_us_per_req, 1)} | ${fmt(p?.cpu_us_per_req, 1)} | ${ratio(p?.cpu_us_per_req, n.cpu_us_per_req)} | ${fmt(n.server_cores, 2)} | ${fmt(p?.server_cores, 2)} | ${fmt(n.load_cores, 2)} | ${fmt(Math.max(n.foreign_cores ?? 0, p?.foreign_cores ?? 0), 2)} |`);
    }
    if (R.hello?.cpu_us_per_req != null) {
      lines.push(`| axum hello-world | ${fmt(R.hello.cpu_us_per_req, 1)} | | | ${fmt(R.hello.server_cores, 2)} | | ${fmt(R.hello.load_cores, 2)} | ${fmt(R.hello.foreign_cores, 2)} |`);
    }
    lines.push('');
  }
  if (R.logins.length) {
    const bound = R.login_bound;
    lines.push(`**Full code flows with login** (authorize → login page → POST user ID + password + second password → code → token), each browser its own student. ` +
      `Bound = cores ÷ (argon2 checks per login × verify time) = ${m.cores} ÷ (2 × ${a.rust.verify_ms.median} ms) = **${fmt(bound.nidan, 1)} logins/s** ` +
      `(file directory: university password hash + second password; with LDAP one check: ${fmt(2 * bound.nidan, 1)}/s); the peer's bound with its own verify time: ${fmt(bound.peer, 1)}/s.`);
    lines.push('');
    if (bound.nidan_parallel) {
      const contended = (1000 * m.cores) / (2 * bound.nidan_parallel);
      lines.push('');
      lines.push(`With the verify time measured while every core verifies at once (${fmt(contended, 2)} ms each: ${a.rust.parallel.verifications_per_s} verifications/s on ${a.rust.parallel.threads} threads) ` +
        `the same formula gives **${fmt(bound.nidan_parallel, 1)} logins/s**, the most this machine's argon2 allows; the "% of parallel ceiling" column uses it.`);
    }
    lines.push('');
    lines.push('| concurrency | nidan logins/s | % of bound | % of parallel ceiling | nidan p50 / p99 ms | peer logins/s | % of its bound | peer p50 / p99 ms | nidan ÷ peer | nidan CPU ms/login | peer CPU ms/login | other load (cores) | target ≥ 80 % |');
    lines.push('|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|');
    for (const l of R.logins) {
      const n = l.nidan;
      const p = l.peer;
      lines.push(`| ${l.concurrency} | ${fmt(n.logins_per_s, 1)} | ${fmt((100 * n.logins_per_s) / bound.nidan, 0)} % | ${bound.nidan_parallel ? `${fmt((100 * n.logins_per_s) / bound.nidan_parallel, 0)} %` : '–'} | ${fmt(n.p50_ms)} / ${fmt(n.p99_ms)} | ` +
        `${fmt(p?.logins_per_s, 1)} | ${p ? `${fmt((100 * p.logins_per_s) / bound.peer, 0)} %` : '–'} | ${p ? `${fmt(p.p50_ms)} / ${fmt(p.p99_ms)}` : '–'} | ${ratio(n.logins_per_s, p?.logins_per_s)} | ` +
        `${fmt(n.cpu_ms_per_login, 1)} | ${fmt(p?.cpu_ms_per_login, 1)} | ${fmt(Math.max(n.cpu?.foreign_cores ?? 0, p?.cpu?.foreign_cores ?? 0), 2)} | ${ok(l.met)} |`);
    }
    lines.push('');
    const cpuPerLogin = median(R.logins.map((l) => l.nidan.cpu_ms_per_login).filter((x) => x));
    if (cpuPerLogin) {
      const argon = 2 * a.rust.verify_ms.median + a.rust.short_lived_hash_ms;
      const parallelCeiling = a.rust.parallel.verifications_per_s / 2;
      lines.push(`Where the login time goes: nidan spends a median **${fmt(cpuPerLogin, 1)} ms of CPU per login**; two verifications + the short-lived hash are ` +
        `${fmt(argon, 1)} ms of that when timed alone (${fmt((100 * argon) / cpuPerLogin, 0)} %). With both cores to itself nidan would reach at most ` +
        `${m.cores} ÷ ${fmt(cpuPerLogin, 1)} ms = ${fmt((1000 * m.cores) / cpuPerLogin, 1)} logins/s (${fmt((100 * (1000 * m.cores) / cpuPerLogin) / bound.nidan, 0)} % of the bound); ` +
        `the login driver runs on the same cores. Measured parallel argon2 ceiling (${a.rust.parallel.threads} threads verifying at once, ${a.rust.parallel.verifications_per_s}/s ÷ 2 checks): ` +
        `${fmt(parallelCeiling, 1)} logins/s (${fmt((100 * parallelCeiling) / bound.nidan, 0)} % of the bound).`);
      lines.push('');
    }
    const sat = R.logins.find((l) => l.nidan.probe);
    if (sat) {
      const np = sat.nidan.probe;
      const pp = sat.peer?.probe;
      lines.push(`**Responsiveness while argon2 is saturated** (${sat.concurrency} concurrent logins): discovery + JWKS probed at 40 requests/s — ` +
        `nidan p50 ${np.p50_ms} ms, p99 ${np.p99_ms} ms, max ${np.max_ms} ms (${np.requests} answers, ${np.errors} errors)` +
        (R.idle_probe ? `; the same probe on idle nidan: p50 ${R.idle_probe.p50_ms} ms, p99 ${R.idle_probe.p99_ms} ms` : '') +
        (pp ? `; the peer under the same load: p50 ${pp.p50_ms} ms, p99 ${pp.p99_ms} ms, max ${pp.max_ms} ms.` : '.'));
      lines.push('');
    }
  }
  lines.push('| memory (VmRSS) | nidan | peer | nidan ÷ peer | hello-world | target (nidan) | result |');
  lines.push('|---|---:|---:|---:|---:|---|---|');
  const mem = R.memory;
  lines.push(`| idle, after start | ${fmt(MiB(mem.nidan.idle.rss_kb), 1)} MiB | ${fmt(MiB(mem.peer?.idle.rss_kb), 1)} MiB | ${ratio(mem.nidan.idle.rss_kb, mem.peer?.idle.rss_kb)} | ${fmt(MiB(mem.hello?.idle.rss_kb), 1)} MiB | < 30 MiB | ${ok(mem.nidan.idle.rss_kb < 30 * 1024)} |`);
  if (mem.nidan.after_wrk && R.scenarios.length) {
    lines.push(`| after the wrk scenarios (before the login runs) | ${fmt(MiB(mem.nidan.after_wrk.rss_kb), 1)} MiB | ${fmt(MiB(mem.peer?.after_wrk?.rss_kb), 1)} MiB | ${ratio(mem.nidan.after_wrk.rss_kb, mem.peer?.after_wrk?.rss_kb)} | ${fmt(MiB(mem.hello?.after_wrk?.rss_kb), 1)} MiB | < 80 MiB | ${ok(mem.nidan.after_wrk.rss_kb < 80 * 1024)} |`);
  }
  if (mem.nidan.after) {
    lines.push(`| after all the load (wrk + logins) | ${fmt(MiB(mem.nidan.after.rss_kb), 1)} MiB | ${fmt(MiB(mem.peer?.after?.rss_kb), 1)} MiB | ${ratio(mem.nidan.after.rss_kb, mem.peer?.after?.rss_kb)} | ${fmt(MiB(mem.hello?.after?.rss_kb), 1)} MiB | < 80 MiB | ${ok(mem.nidan.after.rss_kb < 80 * 1024)} |`);
    lines.push(`| peak (VmHWM) | ${fmt(MiB(mem.nidan.after.hwm_kb), 1)} MiB | ${fmt(MiB(mem.peer?.after?.hwm_kb), 1)} MiB | ${ratio(mem.nidan.after.hwm_kb, mem.peer?.after?.hwm_kb)} | ${fmt(MiB(mem.hello?.after?.hwm_kb), 1)} MiB | | |`);
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

async function main() {
  const started = Date.now();
  for (const [what, p] of [['nidan', OPTS.nidan], ['hello', OPTS.hello]]) {
    if (!fs.existsSync(p)) throw new Error(`${what} binary ${p} is missing (bench/run.sh builds it)`);
  }
  const version = (run(OPTS.nidan, ['--version']).stdout ?? '').trim();
  const commit = (run('git', ['-C', REPO, 'rev-parse', '--short', 'HEAD']).stdout ?? '').trim();
  const R = { nidan_version: `${version || 'nidan'}${commit ? ` (commit ${commit}${(run('git', ['-C', REPO, 'status', '--porcelain', '--', 'src']).stdout ?? '').trim() ? ', src/ modified' : ''})` : ''}`, machine: machine(), settings: { ...OPTS, only: undefined }, scenarios: [], logins: [], memory: {} };
  log(`machine: ${R.machine.cores} cores, ${R.machine.cpu}; load ${R.machine.loadavg_start.join(' ')}`);


  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nidan-bench-'));
  const secret = b64u(crypto.randomBytes(32));
  const people = students(OPTS.students);
  fs.writeFileSync(path.join(dir, 'students.json'), JSON.stringify(people));
  fs.writeFileSync(path.join(dir, 'bench.secret'), secret, { mode: 0o600 });
  log(`preparing nidan and the peer in ${dir} (${people.length} enrolled students each)`);
  const [n, p] = await Promise.all([prepareNidan(dir, people, secret), preparePeer(dir, people, secret)]);
  const helloPort = await freePort();

  const nidan = {
    name: 'nidan', issuer: n.issuer, studentsFile: path.join(dir, 'students.json'), secretFile: path.join(dir, 'bench.secret'),
    proc: startServer('nidan', OPTS.nidan, ['serve', '--config', n.configPath], { cwd: n.dir, logFile: path.join(dir, 'nidan.log') }),
  };
  const peer = {
    name: 'peer', issuer: p.issuer, studentsFile: nidan.studentsFile, secretFile: nidan.secretFile,
    proc: startServer('peer', process.execPath, [path.join(HERE, 'peer/server.mjs'), '--port', String(p.port), '--users', path.join(p.dir, 'users.json'), '--client-secret-file', path.join(p.dir, 'bench.secret')], {
      cwd: p.dir, logFile: path.join(dir, 'peer.log'), env: { NODE_ENV: 'production' },
    }),
  };
  const hello = {
    name: 'hello', issuer: `http://127.0.0.1:${helloPort}`,
    proc: startServer('hello', OPTS.hello, [`127.0.0.1:${helloPort}`], { logFile: path.join(dir, 'hello.log') }),
  };
  await Promise.all([
    waitHttp(nidan.proc, `${nidan.issuer}/.well-known/openid-configuration`),
    waitHttp(peer.proc, `${peer.issuer}/.well-known/openid-configuration`),
    waitHttp(hello.proc, `${hello.issuer}/`),
  ]);
  await sleep(3000);
  for (const s of [nidan, peer, hello]) R.memory[s.name] = { idle: memory(s.proc.pid) };
  log(`idle RSS: nidan ${MiB(R.memory.nidan.idle.rss_kb)} MiB, peer ${MiB(R.memory.peer.idle.rss_kb)} MiB, hello ${MiB(R.memory.hello.idle.rss_kb)} MiB`);

  // Both servers must do what the scenarios ask before anything is timed.
  const basic = `Basic ${Buffer.from(`bench:${secret}`).toString('base64')}`;
  const formHeaders = { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' };
  const tokens = {};
  for (const s of [nidan, peer]) {
    await expectOk(s, 'client_credentials', `${s.issuer}/token`, { method: 'POST', headers: formHeaders, body: 'grant_type=client_credentials' });
    tokens[s.name] = await oneLogin(s);
    await expectOk(s, 'userinfo', `${s.issuer}/userinfo`, { headers: { authorization: `Bearer ${tokens[s.name]}` } });
    const intro = JSON.parse(await expectOk(s, 'introspection', `${s.issuer}/introspect`, { method: 'POST', headers: formHeaders, body: `token=${tokens[s.name]}` }));
    if (intro.active !== true) throw new Error(`${s.name}: introspection says ${JSON.stringify(intro)}`);
  }
  log('both servers answer every scenario');

  // Idle responsiveness of discovery/JWKS, for comparison with the saturated run below.
  if (wanted('login')) {
    const p0 = await runAsync(process.execPath, [path.join(HERE, 'probe.mjs'), '--duration', '4', '--rate', '40', `${nidan.issuer}/.well-known/openid-configuration`, `${nidan.issuer}/jwks`]);
    R.idle_probe = JSON.parse(p0.stdout.trim().split('\n').pop());
  }

  const scenarios = [
    { key: 'discovery', title: 'discovery', path: '/.well-known/openid-configuration', script: 'get.lua', factor: 5, hello: true },
    { key: 'jwks', title: 'JWKS', path: '/jwks', script: 'get.lua', factor: 5, hello: true },
    { key: 'token', title: 'token (client_credentials)', path: '/token', script: 'token.lua', factor: 3 },
    { key: 'introspection', title: 'introspection', path: '/introspect', script: 'introspect.lua', factor: 3, token: true },
    { key: 'userinfo', title: 'userinfo', path: '/userinfo', script: 'userinfo.lua', factor: 3, token: true },
  ];
  const helloRounds = [];
  const all = [nidan, peer, hello];
  let errors = 0;
  for (const sc of scenarios) {
    if (!wanted(sc.key)) continue;
    const rounds = { nidan: [], peer: [] };
    const servers = [nidan, peer];
    const envFor = (s) => ({ BENCH_BASIC: basic, BENCH_TOKEN: sc.token ? tokens[s.name] : '' });
    if (sc.token) {
      // A fresh user token for each server (the peer keeps at most 1000 entries in memory, and the
      // token rounds before this one filled it).
      for (const s of servers) tokens[s.name] = await oneLogin(s);
    }
    alive(nidan, peer, ...(sc.hello ? [hello] : []));
    await quiet(all, OPTS.quietWait);
    // Warm-up, not counted (JIT, connection pools, page cache).
    for (const s of servers) await wrk(`${s.issuer}${sc.path}`, sc.script, envFor(s), 2);
    if (sc.hello && !helloRounds.length) await wrk(`${hello.issuer}/`, 'get.lua', {}, 2);
    const timed = async (s, url, script, env) => {
      const { result, cpu } = await accounted(s, all.filter((o) => o !== s), () => wrk(url, script, env));
      result.cpu = cpu;
      return result;
    };
    for (let r = 0; r < OPTS.rounds; r++) {
      for (const s of servers) {
        const res = await timed(s, `${s.issuer}${sc.path}`, sc.script, envFor(s));
        log(`${sc.key} round ${r + 1} ${s.name}: ${res.rps} req/s, p50 ${res.p50_ms} ms, p99 ${res.p99_ms} ms, errors ${res.error_count}, ` +
          `${((1000 * res.cpu.server_ms) / res.requests).toFixed(1)} µs CPU/req, foreign ${res.cpu.foreign_cores} cores`);
        rounds[s.name].push(res);
      }
      if (sc.hello) {
        const res = await timed(hello, `${hello.issuer}/`, 'get.lua', {});
        log(`hello round ${helloRounds.length + 1}: ${res.rps} req/s, p99 ${res.p99_ms} ms, ${((1000 * res.cpu.server_ms) / res.requests).toFixed(1)} µs CPU/req`);
        helloRounds.push(res);
      }
    }
    const row = { key: sc.key, title: sc.title, nidan: summarize(rounds.nidan), peer: summarize(rounds.peer) };
    errors += row.nidan.errors + row.peer.errors;
    const helloRps = helloRounds.length ? median(helloRounds.map((h) => h.rps)) : null;
    const vsPeer = row.nidan.rps >= sc.factor * row.peer.rps;
    const p99 = row.nidan.p99_ms < 20;
    if (sc.hello) {
      const vsHello = helloRps ? row.nidan.rps >= 0.5 * helloRps : null;
      row.target_text = `≥ ${sc.factor}× peer (${ratio(row.nidan.rps, row.peer.rps)}), ≥ ½ hello (${helloRps ? `${((100 * row.nidan.rps) / helloRps).toFixed(0)} %` : '–'}), p99 < 20 ms`;
      row.met = vsPeer && vsHello !== false && p99;
      row.checks = { vs_peer: vsPeer, vs_hello: vsHello, p99 };
    } else {
      row.target_text = `≥ ${sc.factor}× peer, p99 < 20 ms`;
      row.met = vsPeer && p99;
      row.checks = { vs_peer: vsPeer, p99 };
    }
    R.scenarios.push(row);
  }
  if (helloRounds.length) R.hello = summarize(helloRounds);
  // Before any login: what the request load alone left (no argon2 yet, apart from the few setup logins).
  for (const s of all) R.memory[s.name].after_wrk = memory(s.proc.pid);

  // The verify time right before the login runs, on a machine as quiet as it gets, with the
  // servers idle: the bound must come from the same conditions as the logins.
  await quiet(all, OPTS.quietWait);
  log('argon2id verification time (Rust release build, then the npm package)');
  R.argon2 = { rust: await argon2Rust(), node: await argon2Node() };
  log(`argon2: ${JSON.stringify(R.argon2)}`);

  if (wanted('login')) {
    const checks = 2;
    R.login_bound = {
      nidan: R.machine.cores / (checks * (R.argon2.rust.verify_ms.median / 1000)),
      peer: R.machine.cores / (checks * (R.argon2.node.median_ms / 1000)),
      // The same formula with the verify time measured while every core verifies at once (argon2
      // is memory-bound: on a VM whose vCPUs share the memory path it does not scale with cores).
      nidan_parallel: R.argon2.rust.parallel.verifications_per_s / checks,
    };
    for (const c of OPTS.concurrencies) {
      const row = { concurrency: c };
      const saturated = c === Math.max(...OPTS.concurrencies);
      alive(nidan, peer);
      await quiet(all, OPTS.quietWait);
      for (const s of [nidan, peer]) {
        const { result, cpu } = await accounted(s, all.filter((o) => o !== s), () => loginRun(s, c, { probe: saturated }));
        result.cpu = cpu;
        result.cpu_ms_per_login = result.completed_total ? Number((cpu.server_ms / result.completed_total).toFixed(1)) : null;
        row[s.name] = result;
        log(`logins c=${c} ${s.name}: ${JSON.stringify(row[s.name])}`);
        errors += row[s.name].failures;
      }
      row.met = row.nidan.logins_per_s >= 0.8 * R.login_bound.nidan;
      R.logins.push(row);
    }
  }

  await sleep(2000);
  for (const s of [nidan, peer, hello]) R.memory[s.name].after = memory(s.proc.pid);
  R.machine.loadavg_end = os.loadavg().map((x) => Number(x.toFixed(2)));
  R.seconds = Math.round((Date.now() - started) / 1000);

  const table = report(R);
  fs.mkdirSync(path.join(HERE, 'results'), { recursive: true });
  fs.writeFileSync(path.join(HERE, 'results/latest.json'), `${JSON.stringify(R, null, 2)}\n`);
  fs.writeFileSync(path.join(HERE, 'results/latest.md'), `${table}\n`);
  console.log(table);
  if (OPTS.updateReadme) {
    const readme = path.join(HERE, 'README.md');
    const text = fs.readFileSync(readme, 'utf8');
    const start = '<!-- results:start -->';
    const end = '<!-- results:end -->';
    const i = text.indexOf(start);
    const j = text.indexOf(end);
    if (i < 0 || j < i) throw new Error('README.md has no results markers');
    fs.writeFileSync(readme, `${text.slice(0, i + start.length)}\n${table}\n${text.slice(j)}`);
    log('bench/README.md updated');
  }
  cleanup();
  await sleep(500);
  if (OPTS.keep) log(`kept ${dir}`);
  else fs.rmSync(dir, { recursive: true, force: true });
  if (errors) {
    log(`${errors} requests or sign-ins failed: the numbers above are not valid`);
    process.exitCode = 1;
  }
}

main().catch((e) => {
  console.error(`bench failed: ${e.stack ?? e.message}`);
  cleanup();
  process.exit(1);
});
