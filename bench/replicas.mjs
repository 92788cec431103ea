#!/usr/bin/env node
// Two nidan replicas on PostgreSQL against one on SQLite (token and userinfo throughput), then a
// soak of mixed traffic against the two replicas. bench/replicas.sh creates the database and calls
// this; see the "Replicas and soak" section of bench/README.md.
//
//   node bench/replicas.mjs --database NAME [--pg postgres://postgres@127.0.0.1:5432]
//        [--nidan PATH] [--rounds 3] [--duration 10] [--connections 64] [--soak 600]
//        [--soak-warmup 30] [--quiet-wait 180] [--quiet-load 2.5] [--only compare|soak]
//        [--update-readme] [--keep]
//
// Only 127.0.0.1 is contacted. Bounded: wrk rounds of --duration s, the soak by time and request
// count (bench/soak.mjs), every child under a timeout. Writes bench/results/replicas-latest.{md,json}.
// Exits 1 when a server does not start or a round/the soak saw errors; timing never fails the run.
import { spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..');

const O = {
  nidan: path.join(REPO, 'target/release/nidan'),
  pg: 'postgres://postgres@127.0.0.1:5432',
  database: null,
  rounds: 3,
  duration: 10,
  connections: 64,
  soak: 600,
  soakWarmup: 30,
  quietWait: 180,
  quietLoad: 2.5,
  students: 64,
  accessLifetime: '2m',
  only: null,
  updateReadme: false,
  keep: false,
};
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    if (a === '--nidan') O.nidan = path.resolve(v());
    else if (a === '--pg') O.pg = v().replace(/\/$/, '');
    else if (a === '--database') O.database = v();
    else if (a === '--rounds') O.rounds = Math.max(1, Math.min(5, Number(v())));
    else if (a === '--duration') O.duration = Math.max(1, Math.min(30, Number(v())));
    else if (a === '--connections') O.connections = Number(v());
    else if (a === '--soak') O.soak = Math.max(10, Math.min(600, Number(v())));
    else if (a === '--soak-warmup') O.soakWarmup = Math.max(0, Math.min(60, Number(v())));
    else if (a === '--quiet-wait') O.quietWait = Math.max(0, Math.min(600, Number(v())));
    else if (a === '--quiet-load') O.quietLoad = Number(v());
    else if (a === '--only') O.only = v();
    else if (a === '--update-readme') O.updateReadme = true;
    else if (a === '--keep') O.keep = true;
    else if (a === '--help' || a === '-h') {
      console.log(fs.readFileSync(fileURLToPath(import.meta.url), 'utf8').split('\n').slice(1, 13).join('\n'));
      process.exit(0);
    } else {
      console.error(`unknown argument ${a}`);
      process.exit(2);
    }
  }
  if (!O.database || !/^nidan_bench_[a-z0-9_]+$/.test(O.database)) {
    console.error('--database nidan_bench_… is required (bench/replicas.sh creates and drops it)');
    process.exit(2);
  }
  if (new URL(O.pg).hostname !== '127.0.0.1') {
    console.error('--pg must be on 127.0.0.1');
    process.exit(2);
  }
}
const wanted = (part) => !O.only || O.only === part;

const log = (...a) => console.error(`[replicas ${new Date().toISOString().slice(11, 19)}]`, ...a);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const b64u = (b) => Buffer.from(b).toString('base64url');
const MiB = (kb) => (kb == null ? null : Number((kb / 1024).toFixed(1)));
const loadavg = () => os.loadavg().map((x) => Number(x.toFixed(2)));

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

const children = new Set();
function cleanup() {
  for (const c of children) if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
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

function startServer(name, configPath, logFile, env = {}) {
  const fd = fs.openSync(logFile, 'a');
  const child = spawn(O.nidan, ['serve', '--config', configPath], { cwd: path.dirname(configPath), env: childEnv(env), stdio: ['ignore', fd, fd] });
  fs.closeSync(fd);
  children.add(child);
  child.on('exit', (code, signal) => {
    child.exited = { code, signal };
  });
  return { name, proc: child, logFile };
}

async function waitReady(s, timeoutMs = 120_000) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (s.proc.exited) throw new Error(`${s.name} exited ${JSON.stringify(s.proc.exited)}; log:\n${tail(s.logFile)}`);
    try {
      const res = await fetch(`${s.url}/readyz`, { signal: AbortSignal.timeout(2000) });
      await res.arrayBuffer();
      if (res.ok) return;
    } catch {
      /* not up yet */
    }
    await sleep(200);
  }
  throw new Error(`${s.name} not ready within ${timeoutMs / 1000} s; log:\n${tail(s.logFile)}`);
}

async function stopServer(s, timeoutMs = 30_000) {
  if (s.proc.exited) return { already: s.proc.exited };
  const t0 = Date.now();
  s.proc.kill('SIGTERM');
  while (!s.proc.exited && Date.now() - t0 < timeoutMs) await sleep(50);
  if (!s.proc.exited) {
    s.proc.kill('SIGKILL');
    return { killed: true, ms: Date.now() - t0 };
  }
  return { ...s.proc.exited, ms: Date.now() - t0 };
}

function tail(file, n = 25) {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-n).join('\n');
  } catch {
    return '(no log)';
  }
}

function memory(pid) {
  const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
  const field = (k) => Number(status.match(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm'))?.[1]);
  return { rss_kb: field('VmRSS'), hwm_kb: field('VmHWM') };
}

const TICK_MS = 10;
function cpuOf(pid) {
  try {
    const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(f[11]) + Number(f[12])) * TICK_MS;
  } catch {
    return null;
  }
}
function machineBusy() {
  const [, ...v] = fs.readFileSync('/proc/stat', 'utf8').split('\n')[0].trim().split(/\s+/);
  const n = v.map(Number);
  const total = n.slice(0, 8).reduce((a, b) => a + b, 0);
  return (total - n[3] - n[4]) * TICK_MS;
}
/** PostgreSQL backends serving our database: pid → CPU ms (from their process titles). */
function pgBackends() {
  const out = new Map();
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8');
      if (cmd.startsWith('postgres:') && cmd.includes(` ${O.database} `)) out.set(d, cpuOf(d));
    } catch {
      /* gone */
    }
  }
  return out;
}
function childrenCpu() {
  const f = fs.readFileSync('/proc/self/stat', 'utf8').split(') ')[1].split(' ');
  return (Number(f[13]) + Number(f[14])) * TICK_MS;
}

/** CPU spent by the servers, our PostgreSQL backends, the load generators and everyone else. */
async function accounted(servers, fn) {
  const t0 = performance.now();
  const s0 = servers.map((s) => cpuOf(s.proc.pid));
  const pg0 = pgBackends();
  const c0 = childrenCpu();
  const m0 = machineBusy();
  const self0 = process.cpuUsage();
  const result = await fn();
  const wall = performance.now() - t0;
  const server_ms = servers.reduce((a, s, i) => a + cpuOf(s.proc.pid) - s0[i], 0);
  let pg_ms = 0;
  for (const [pid, cpu] of pgBackends()) pg_ms += cpu - (pg0.get(pid) ?? 0);
  const load_ms = childrenCpu() - c0;
  const u = process.cpuUsage(self0);
  const busy = machineBusy() - m0;
  return {
    result,
    cpu: {
      wall_ms: Math.round(wall),
      server_ms,
      server_cores: Number((server_ms / wall).toFixed(2)),
      pg_cores: Number((pg_ms / wall).toFixed(2)),
      pg_ms,
      load_cores: Number((load_ms / wall).toFixed(2)),
      foreign_cores: Number((Math.max(0, busy - server_ms - pg_ms - load_ms - (u.user + u.system) / 1000) / wall).toFixed(2)),
    },
  };
}

function run(cmd, args, opts = {}) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 120_000, maxBuffer: 64 * 1024 * 1024, ...opts });
  if (r.error) throw r.error;
  return r;
}

function runAsync(cmd, args, { env, timeoutMs = 180_000, stdin } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: env ?? process.env, stdio: [stdin == null ? 'ignore' : 'pipe', 'pipe', 'pipe'] });
    children.add(child);
    let out = '';
    let err = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (err += d));
    if (stdin != null) child.stdin.end(stdin);
    const t = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', reject);
    child.on('close', (code) => {
      clearTimeout(t);
      children.delete(child);
      resolve({ code, stdout: out, stderr: err });
    });
  });
}

function psql(sql) {
  const r = run('psql', [`${O.pg}/${O.database}`, '-X', '-q', '-A', '-t', '-F', '\t', '-v', 'ON_ERROR_STOP=1', '-c', sql]);
  if (r.status !== 0) throw new Error(`psql: ${r.stderr}`);
  return r.stdout.trim();
}

// ---------------------------------------------------------------------------
// Quiet machine: 1-minute load average below --quiet-load, polled for at most --quiet-wait s
// ---------------------------------------------------------------------------

let quietBudgetMs = null; // shared by every wait of the run, so the whole run stays bounded
async function quiet(what) {
  quietBudgetMs ??= O.quietWait * 1000;
  const t0 = Date.now();
  const until = t0 + quietBudgetMs;
  let la = loadavg();
  while (la[0] >= O.quietLoad && Date.now() < until) {
    log(`${what}: load average ${la.join(' ')} ≥ ${O.quietLoad}; waiting (at most ${Math.round((until - Date.now()) / 1000)} s more)`);
    await sleep(10_000);
    la = loadavg();
  }
  quietBudgetMs = Math.max(0, quietBudgetMs - (Date.now() - t0));
  const quietEnough = la[0] < O.quietLoad;
  if (!quietEnough) log(`${what}: still busy (load ${la.join(' ')}); measuring anyway`);
  return { loadavg: la, quiet: quietEnough };
}

// ---------------------------------------------------------------------------
// Setup: students, the configurations, enrollment
// ---------------------------------------------------------------------------

function students(n) {
  return Array.from({ length: n }, (_, i) => {
    const username = `s24${String(i + 1).padStart(5, '0')}`;
    return {
      username,
      password: `Univ-${b64u(crypto.randomBytes(9))}`,
      second_password: `Second${100 + i}Pw${crypto.randomBytes(4).toString('hex')}`,
      email: `${username}@example.ac.jp`,
      claims: { name: `Student ${i + 1}`, family_name: 'Gakusei', given_name: `Taro${i + 1}`, student_id: username.toUpperCase(), affiliation: 'student' },
    };
  });
}
const tomlString = (s) => JSON.stringify(s);
const tomlInline = (o) => `{ ${Object.entries(o).map(([k, v]) => `${k} = ${tomlString(v)}`).join(', ')} }`;

async function prepare(dir, people, secret) {
  fs.writeFileSync(path.join(dir, 'kek'), `${crypto.randomBytes(32).toString('base64')}\n`, { mode: 0o600 });
  fs.writeFileSync(path.join(dir, 'bench.secret'), secret, { mode: 0o600 });
  const hashes = new Array(people.length);
  for (let i = 0; i < people.length; i += 2) {
    await Promise.all(
      people.slice(i, i + 2).map(async (p, j) => {
        const r = await runAsync(O.nidan, ['hash-password'], { env: childEnv(), stdin: p.password, timeoutMs: 60_000 });
        const phc = r.stdout.split('\n').map((l) => l.trim()).find((l) => l.startsWith('$argon2id$'));
        if (r.code !== 0 || !phc) throw new Error(`nidan hash-password exited ${r.code}: ${r.stderr}`);
        hashes[i + j] = phc;
      }),
    );
  }
  fs.writeFileSync(
    path.join(dir, 'users.toml'),
    people.map((p, i) => `[[users]]\nusername = ${tomlString(p.username)}\npassword_hash = ${tomlString(hashes[i])}\nclaims = ${tomlInline(p.claims)}\n`).join('\n'),
  );
  fs.writeFileSync(path.join(dir, 'import.jsonl'), people.map((p) => JSON.stringify({ username: p.username, email: p.email, second_password: p.second_password })).join('\n') + '\n');
  const ports = { sqlite: await freePort(), a: await freePort(), b: await freePort() };
  const config = (name, issuerPort, databaseUrl) => {
    const cdir = path.join(dir, name);
    fs.mkdirSync(cdir, { recursive: true });
    const text = `issuer = ${tomlString(`http://127.0.0.1:${issuerPort}`)}
listen = ${tomlString(`127.0.0.1:${issuerPort}`)}
database_url = ${tomlString(databaseUrl)}
key_encryption_key_file = ${tomlString(path.join(dir, 'kek'))}
enrollment = "on-demand"
university_name = "Bench University"

[lifetimes]
access_token = ${tomlString(O.accessLifetime)}

[directory]
kind = "file"
path = ${tomlString(path.join(dir, 'users.toml'))}

[mail]
transport = "file"
from = "noreply@example.ac.jp"
path = ${tomlString(path.join(cdir, 'mail'))}

[[clients]]
client_id = "bench"
client_secret_file = ${tomlString(path.join(dir, 'bench.secret'))}
redirect_uris = ["http://127.0.0.1:9/cb"]
token_endpoint_auth_method = "client_secret_basic"
grant_types = ["authorization_code", "client_credentials", "refresh_token"]
scopes = ["openid", "profile", "email", "student", "offline_access"]
`;
    const configPath = path.join(cdir, 'nidan.toml');
    fs.writeFileSync(configPath, text);
    const check = run(O.nidan, ['check-config', '--config', configPath], { cwd: cdir, env: childEnv() });
    if (check.status !== 0) throw new Error(`nidan check-config (${name}): ${check.stdout}${check.stderr}`);
    return configPath;
  };
  // One replica on SQLite; two on PostgreSQL with one configuration file (the second listens on
  // its own port through NIDAN_LISTEN; the issuer is the same).
  const sqliteConfig = config('sqlite', ports.sqlite, `sqlite://${path.join(dir, 'sqlite', 'nidan.db')}`);
  const pgConfig = config('pg', ports.a, `${O.pg}/${O.database}`);
  for (const c of [sqliteConfig, pgConfig]) {
    const imp = await runAsync(O.nidan, ['user', 'import', path.join(dir, 'import.jsonl'), '--config', c], { env: childEnv(), timeoutMs: 300_000 });
    if (imp.code !== 0) throw new Error(`nidan user import: ${imp.stdout}${imp.stderr}`);
  }
  return { ports, sqliteConfig, pgConfig };
}

// ---------------------------------------------------------------------------
// Checks and single requests
// ---------------------------------------------------------------------------

async function oneLogin(issuer, studentsFile, secretFile) {
  const r = await runAsync(process.execPath, [path.join(HERE, 'login-driver.mjs'), '--issuer', issuer, '--users', studentsFile, '--secret-file', secretFile, '--once'], { timeoutMs: 60_000 });
  let tokens;
  try {
    tokens = JSON.parse(r.stdout.trim().split('\n').pop());
  } catch {
    tokens = {};
  }
  if (!tokens.access_token) throw new Error(`sign-in at ${issuer} failed: ${r.stdout}${r.stderr}`);
  if (!/^[A-Za-z0-9._~-]+$/.test(tokens.access_token)) throw new Error('access token needs escaping');
  return tokens.access_token;
}

async function expect200(what, url, init) {
  const res = await fetch(url, { ...init, signal: AbortSignal.timeout(10_000) });
  const text = await res.text();
  if (res.status !== 200) throw new Error(`${what}: HTTP ${res.status} ${text.slice(0, 200)}`);
  return text;
}

// ---------------------------------------------------------------------------
// wrk
// ---------------------------------------------------------------------------

async function wrk(url, script, env, connections, durationS) {
  const args = ['-t', '1', '-c', String(connections), '-d', `${durationS}s`, '--timeout', '5s', '-s', path.join(HERE, 'lua', script), url];
  const r = await runAsync('wrk', args, { env: { ...process.env, BENCH_LUA_DIR: path.join(HERE, 'lua'), ...env }, timeoutMs: (durationS + 30) * 1000 });
  const line = r.stdout.split('\n').find((l) => l.startsWith('WRK_JSON '));
  if (r.code !== 0 || !line) throw new Error(`wrk ${url} failed (exit ${r.code}): ${r.stderr || r.stdout}`);
  const res = JSON.parse(line.slice(9));
  res.error_count = Object.values(res.errors).reduce((a, b) => a + b, 0);
  return res;
}

/** One round of a configuration: one wrk per replica at once, connections split evenly. */
async function round(cfg, sc, env, durationS) {
  const per = Math.floor(O.connections / cfg.servers.length);
  const { result, cpu } = await accounted(cfg.servers, () => Promise.all(cfg.servers.map((s) => wrk(`${s.url}${sc.path}`, sc.script, env, per, durationS))));
  return {
    rps: Number(result.reduce((a, r) => a + r.rps, 0).toFixed(1)),
    requests: result.reduce((a, r) => a + r.requests, 0),
    per_replica_rps: result.map((r) => r.rps),
    p50_ms: Number((result.reduce((a, r) => a + r.p50_ms, 0) / result.length).toFixed(3)),
    p99_ms: Math.max(...result.map((r) => r.p99_ms)),
    errors: result.reduce((a, r) => a + r.error_count, 0),
    error_detail: result.map((r) => r.errors),
    cpu,
  };
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function summarize(rounds) {
  const med = (f) => median(rounds.map(f));
  return {
    rps: Number(med((r) => r.rps).toFixed(1)),
    p50_ms: Number(med((r) => r.p50_ms).toFixed(2)),
    p99_ms: Number(med((r) => r.p99_ms).toFixed(2)),
    server_cores: Number(med((r) => r.cpu.server_cores).toFixed(2)),
    pg_cores: Number(med((r) => r.cpu.pg_cores).toFixed(2)),
    load_cores: Number(med((r) => r.cpu.load_cores).toFixed(2)),
    foreign_cores: Number(med((r) => r.cpu.foreign_cores).toFixed(2)),
    server_us_per_req: Number(med((r) => (1000 * r.cpu.server_ms) / r.requests).toFixed(1)),
    pg_us_per_req: Number(med((r) => (1000 * r.cpu.pg_ms) / r.requests).toFixed(1)),
    errors: rounds.reduce((a, r) => a + r.errors, 0),
    rounds,
  };
}

// ---------------------------------------------------------------------------
// Server-side evidence: /metrics, log lines, table sizes
// ---------------------------------------------------------------------------

async function metricsByStatus(s) {
  try {
    const res = await fetch(`${s.url}/metrics`, { signal: AbortSignal.timeout(5000) });
    const text = await res.text();
    const byStatus = {};
    for (const line of text.split('\n')) {
      const m = line.match(/^nidan_http_requests_total\{([^}]*)\}\s+([0-9.e+]+)/);
      if (!m) continue;
      const status = m[1].match(/status="(\d+)"/)?.[1] ?? '?';
      byStatus[status] = (byStatus[status] ?? 0) + Number(m[2]);
    }
    return byStatus;
  } catch (e) {
    return { error: e.message };
  }
}

function logProblems(s) {
  const lines = fs.existsSync(s.logFile) ? fs.readFileSync(s.logFile, 'utf8').split('\n') : [];
  const bad = lines.filter((l) => /\b(WARN|ERROR)\b/.test(l) || /panicked/.test(l));
  return { count: bad.length, first: bad.slice(0, 8).map((l) => l.slice(0, 400)) };
}

function tableStats() {
  const rows = psql(
    "SELECT c.relname, c.reltuples::bigint, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace " +
      "WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1",
  );
  const out = {};
  for (const line of rows.split('\n').filter(Boolean)) {
    const [name, , bytes] = line.split('\t');
    out[name] = { bytes: Number(bytes) };
  }
  for (const t of ['access_tokens', 'refresh_tokens', 'grants', 'authorization_codes', 'browser_sessions', 'login_transactions', 'audit_events']) {
    if (out[t]) out[t].rows = Number(psql(`SELECT count(*) FROM ${t}`));
  }
  out._database_bytes = Number(psql(`SELECT pg_database_size('${O.database}')`));
  return out;
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

const fmt = (x, d = 0) => (x == null ? '–' : Number(x).toLocaleString('en-US', { minimumFractionDigits: d, maximumFractionDigits: d }));

function report(R) {
  const m = R.machine;
  const L = [];
  L.push(`**${m.date}**, ${m.cores} cores (\`nproc\`), ${m.cpu}, ${m.memory_gib} GiB, Linux ${m.kernel}, ${m.postgres}, Node ${m.node}, ${m.wrk}; ` +
    `${R.nidan_version}. Load average at the start ${m.loadavg_start.join(' / ')}${R.compare ? `, before the comparison ${R.compare.quiet.loadavg.join(' / ')}` : ''}` +
    `${R.soak ? `, before the soak ${R.soak_quiet.loadavg.join(' / ')}` : ''}, at the end ${m.loadavg_end.join(' / ')}; the run took ${R.seconds} s.`);
  L.push('');
  if (R.memory_idle) {
    L.push(`Idle RSS after start: ${Object.entries(R.memory_idle).map(([k, v]) => `${k} ${fmt(MiB(v.rss_kb), 1)} MiB`).join(', ')}.`);
    L.push('');
  }
  if (R.compare) {
    L.push(`wrk 1 thread per process, ${O.connections} connections in all (PostgreSQL: one wrk per replica, ${O.connections / 2} connections each, req/s summed, p50 the mean and p99 the worse of the two), ` +
      `${O.duration} s rounds, ${O.rounds} rounds per configuration alternating SQLite → PostgreSQL, 2 s warm-up each; median round. Access tokens live ${O.accessLifetime}; the userinfo token comes from a full login just before each round.`);
    L.push('');
    L.push('| scenario | configuration | req/s | p50 / p99 ms | 2 × PG ÷ 1 × SQLite | nidan cores | nidan µs CPU/req | PostgreSQL cores | PG µs CPU/req | wrk cores | other load (cores) | errors |');
    L.push('|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|');
    for (const sc of R.compare.scenarios) {
      for (const [key, label] of [['sqlite', '1 replica, SQLite'], ['pg', '2 replicas, PostgreSQL']]) {
        const s = sc[key];
        L.push(`| ${sc.title} | ${label} | ${fmt(s.rps)} | ${fmt(s.p50_ms, 2)} / ${fmt(s.p99_ms, 2)} | ${key === 'pg' ? `${(sc.pg.rps / sc.sqlite.rps).toFixed(2)}×` : ''} | ` +
          `${fmt(s.server_cores, 2)} | ${fmt(s.server_us_per_req, 1)} | ${key === 'pg' ? fmt(s.pg_cores, 2) : '–'} | ${key === 'pg' ? fmt(s.pg_us_per_req, 1) : '–'} | ${fmt(s.load_cores, 2)} | ${fmt(s.foreign_cores, 2)} | ${s.errors} |`);
      }
    }
    L.push('');
    L.push(`Rounds (req/s): ${R.compare.scenarios.map((sc) => `${sc.title} SQLite ${sc.sqlite.rounds.map((r) => fmt(r.rps)).join(', ')}; PostgreSQL ${sc.pg.rounds.map((r) => `${fmt(r.rps)} (${r.per_replica_rps.map((x) => fmt(x)).join(' + ')})`).join(', ')}`).join('. ')}.`);
    L.push('');
  }
  if (R.soak) {
    const s = R.soak;
    const st = s.settings;
    L.push(`**Soak**: ${st.duration_s} s of mixed traffic (after a ${st.warmup_s} s warm-up) against the two PostgreSQL replicas, every request to the next replica in turn (client-side round robin, no sticky sessions: ` +
      `each hop of a login may land on the other replica). Rates per second: ${Object.entries(st.rates).map(([k, v]) => `${k} ${v}`).join(', ')}; bounded by ${fmt(st.max_requests)} requests (planned ${fmt(st.planned_requests)}); ` +
      `issued ${fmt(s.requests_issued)}${s.capped ? ' (**cap reached**)' : ''}; ${fmt(s.refreshes)} refresh-token rotations; ${s.unfinished_after_drain} requests unfinished at the end.`);
    L.push('');
    L.push('| stream | answers OK | errors | per replica (A / B) | p50 / p99 / max ms | skipped (no token / busy) |');
    L.push('|---|---:|---:|---|---:|---:|');
    for (const [k, v] of Object.entries(s.measured)) {
      L.push(`| ${k}${k === 'login' ? ' (full code flow)' : ''} | ${fmt(v.ok)} | ${fmt(v.errors)} | ${v.per_replica.map((p) => `${fmt(p.ok)}${p.errors ? ` (${p.errors} err)` : ''}`).join(' / ')} | ` +
        `${fmt(v.p50_ms, 1)} / ${fmt(v.p99_ms, 1)} / ${fmt(v.max_ms, 0)} | ${v.skipped_no_token} / ${v.skipped_busy} |`);
    }
    L.push('');
    L.push(`Errors (warm-up + measured + drain): **${s.errors_total}**${s.errors_total ? ` — ${Object.entries(s.error_kinds).map(([k, v]) => `${k}: ${v}`).join('; ')}` : ' (goal: 0)'}. ` +
      `HTTP statuses in the measured window: ${Object.entries(s.status_counts_measured).map(([k, v]) => `${k} × ${fmt(v)}`).join(', ')}. ` +
      `Server side (/metrics after the soak, whole run): ${R.servers_after.filter((x) => Object.keys(x.metrics).length).map((x) => `${x.name} ${Object.entries(x.metrics).map(([k, v]) => `${k} × ${fmt(v)}`).join(', ')}`).join('; ')}. ` +
      `WARN/ERROR log lines: ${R.servers_after.map((x) => `${x.name} ${x.log.count}`).join(', ')}.`);
    L.push('');
    L.push('| RSS (VmRSS) | start (after warm-up) | end (last request) | growth | goal ≤ +10 % | max sample | VmHWM at end | 5 s after the traffic | threads start → end | CPU during the soak |');
    L.push('|---|---:|---:|---:|---|---:|---:|---:|---:|---:|');
    const start = s.samples.find((x) => x.label === 'start');
    const end = s.samples.find((x) => x.label === 'end');
    const after = s.samples.find((x) => x.label.startsWith('after'));
    for (const [name, g] of Object.entries(s.rss)) {
      const cpu = end[name].cpu_ms - start[name].cpu_ms;
      L.push(`| ${name} | ${fmt(MiB(g.start_kb), 1)} MiB | ${fmt(MiB(g.end_kb), 1)} MiB | ${g.growth_pct > 0 ? '+' : ''}${g.growth_pct} % | ${g.growth_pct <= 10 ? 'met' : '**missed**'} | ${fmt(MiB(g.peak_kb), 1)} MiB | ${fmt(MiB(g.hwm_end_kb), 1)} MiB | ${fmt(MiB(after?.[name]?.rss_kb), 1)} MiB | ${start[name].threads} → ${end[name].threads} | ${fmt(cpu / 1000 / st.duration_s, 2)} cores |`);
    }
    L.push('');
    L.push(`RSS every ${st.sample_s} s (MiB, from the end of the warm-up): ${Object.keys(s.rss).map((name) => `${name} ${s.samples.filter((x) => !x.label.startsWith('after')).map((x) => fmt(MiB(x[name]?.rss_kb), 1)).join(' → ')}`).join('; ')}.`);
    L.push('');
    const b = R.tables_before;
    const a = R.tables_after;
    if (a && b) {
      const rows = (t) => `${t} ${fmt(b[t]?.rows)} → ${fmt(a[t]?.rows)}`;
      L.push(`PostgreSQL during the soak: database ${fmt(b._database_bytes / 2 ** 20, 1)} → ${fmt(a._database_bytes / 2 ** 20, 1)} MiB; rows ${['access_tokens', 'refresh_tokens', 'grants', 'browser_sessions', 'audit_events'].map(rows).join(', ')}.`);
      L.push('');
    }
  }
  if (R.jwks_at_start) {
    const j = R.jwks_at_start;
    L.push(`**Key agreement at start**: both PostgreSQL replicas started at the same moment on an empty database; PostgreSQL then held ${j.signing_keys.length} signing keys ` +
      `(${[...new Set(j.signing_keys.map((k) => k.split('\t')[0]))].map((alg) => `${alg} × ${j.signing_keys.filter((k) => k.startsWith(`${alg}\t`)).length}`).join(', ')}); replica A published ${j.a.length}, replica B ${j.b.length} keys, ` +
      `the same set only after ${j.agreed_after_s} s (the 30 s key reload).`);
    L.push('');
  } else if (R.signing_keys != null) {
    L.push(`**Key agreement at start**: both PostgreSQL replicas started at the same moment on an empty database and published the same ${R.signing_keys} keys at once.`);
    L.push('');
  }
  if (R.stops) L.push(`Shutdown (SIGTERM): ${R.stops.map((x) => `${x.name} ${x.stop.killed ? '**killed after 30 s**' : `exit ${x.stop.code ?? x.stop.signal} in ${x.stop.ms} ms`}`).join(', ')}.`);
  return L.join('\n');
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

async function main() {
  const started = Date.now();
  if (!fs.existsSync(O.nidan)) throw new Error(`${O.nidan} is missing: cargo build --release --bin nidan`);
  const lscpu = run('lscpu', []).stdout ?? '';
  const model = lscpu.match(/^Model name:\s+(.*)$/m)?.[1]?.trim() ?? os.cpus()[0]?.model;
  const hyper = lscpu.match(/^Hypervisor vendor:\s+(.*)$/m)?.[1]?.trim();
  const commit = (run('git', ['-C', REPO, 'rev-parse', '--short', 'HEAD']).stdout ?? '').trim();
  const srcDirty = (run('git', ['-C', REPO, 'status', '--porcelain', '--', 'src', 'migrations']).stdout ?? '').trim();
  // Is the binary older than the last commit that changed the server?
  const [lastCommit, lastTime] = (run('git', ['-C', REPO, 'log', '-1', '--format=%h %ct', '--', 'src', 'migrations', 'templates', 'Cargo.lock']).stdout ?? '').trim().split(' ');
  const binTime = fs.statSync(O.nidan).mtimeMs / 1000;
  const stale = lastTime && binTime < Number(lastTime) ? `; **the binary (built ${new Date(binTime * 1000).toISOString().slice(0, 16)}Z) is older than commit ${lastCommit}**` : '';
  const R = {
    nidan_version: `${(run(O.nidan, ['--version']).stdout ?? '').trim()} (HEAD ${commit}${srcDirty ? ', src/ modified' : ''}${stale})`,
    machine: {
      date: new Date().toISOString().slice(0, 10),
      cpu: `${model}${hyper ? ` (${hyper} guest)` : ''}`,
      cores: Number(run('nproc', []).stdout.trim()),
      memory_gib: Number((os.totalmem() / 2 ** 30).toFixed(1)),
      kernel: os.release(),
      node: process.version,
      wrk: (run('wrk', ['--version']).stdout ?? '').split('\n')[0].replace(/ \[.*$/, '').trim(),
      postgres: `PostgreSQL ${psql('SHOW server_version').split(' ')[0]}`,
      loadavg_start: loadavg(),
    },
    settings: { ...O },
  };
  log(`machine: ${R.machine.cores} cores, ${R.machine.cpu}; ${R.machine.postgres}; load ${R.machine.loadavg_start.join(' ')}`);

  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nidan-replicas-'));
  const secret = b64u(crypto.randomBytes(32));
  const people = students(O.students);
  const studentsFile = path.join(dir, 'students.json');
  const secretFile = path.join(dir, 'bench.secret');
  fs.writeFileSync(studentsFile, JSON.stringify(people));
  log(`preparing in ${dir}: ${people.length} students, SQLite and PostgreSQL (${O.database}) enrolled with nidan user import`);
  const { ports, sqliteConfig, pgConfig } = await prepare(dir, people, secret);
  const issuerPg = `http://127.0.0.1:${ports.a}`;

  // Both PostgreSQL replicas start at the same moment (the signing keys are created under a lease).
  const S = { ...startServer('sqlite', sqliteConfig, path.join(dir, 'sqlite.log')), url: `http://127.0.0.1:${ports.sqlite}` };
  const A = { ...startServer('replica A', pgConfig, path.join(dir, 'replica-a.log')), url: `http://127.0.0.1:${ports.a}` };
  const B = { ...startServer('replica B', pgConfig, path.join(dir, 'replica-b.log'), { NIDAN_LISTEN: `127.0.0.1:${ports.b}` }), url: `http://127.0.0.1:${ports.b}` };
  await Promise.all([S, A, B].map((s) => waitReady(s)));
  await sleep(2000);
  R.memory_idle = Object.fromEntries([S, A, B].map((s) => [s.name, memory(s.proc.pid)]));
  log(`ready: sqlite ${S.url}, replica A ${A.url}, replica B ${B.url} (issuer ${issuerPg}); idle RSS ${[S, A, B].map((s) => `${s.name} ${MiB(R.memory_idle[s.name].rss_kb)} MiB`).join(', ')}`);

  // Correctness across replicas before anything is timed.
  const basic = `Basic ${Buffer.from(`bench:${secret}`).toString('base64')}`;
  const form = { authorization: basic, 'content-type': 'application/x-www-form-urlencoded' };
  // Both replicas started together on an empty database: they must publish the same keys. A
  // difference is recorded (a finding) and waited out: replicas reload keys every 30 s.
  {
    const kids = (text) => JSON.parse(text).keys.map((k) => `${k.alg}:${k.kid}`).sort();
    const t0 = Date.now();
    R.jwks_at_start = null;
    for (;;) {
      const a = kids(await expect200('JWKS A', `${A.url}/jwks`));
      const b = kids(await expect200('JWKS B', `${B.url}/jwks`));
      if (a.join() === b.join()) {
        if (R.jwks_at_start) R.jwks_at_start.agreed_after_s = Math.round((Date.now() - t0) / 1000);
        break;
      }
      R.jwks_at_start ??= { a, b, signing_keys: psql('SELECT alg, kid FROM signing_keys ORDER BY alg, kid').split('\n') };
      if (Date.now() - t0 > 45_000) throw new Error(`replicas A and B still publish different JWKS after 45 s: ${a} / ${b}`);
      await sleep(2000);
    }
    if (R.jwks_at_start) log(`replicas started together published different JWKS (A ${R.jwks_at_start.a.length} keys, B ${R.jwks_at_start.b.length}; ${R.jwks_at_start.signing_keys.length} keys in PostgreSQL); agreed after ${R.jwks_at_start.agreed_after_s} s`);
  }
  R.signing_keys = Number(psql('SELECT count(*) FROM signing_keys'));
  for (const s of [S, A, B]) await expect200(`${s.name} client_credentials`, `${s.url}/token`, { method: 'POST', headers: form, body: 'grant_type=client_credentials' });
  {
    const t = await oneLogin(issuerPg, studentsFile, secretFile); // minted through A
    await expect200('userinfo at B of a token minted at A', `${B.url}/userinfo`, { headers: { authorization: `Bearer ${t}` } });
    const intro = JSON.parse(await expect200('introspection at B', `${B.url}/introspect`, { method: 'POST', headers: form, body: `token=${t}` }));
    if (intro.active !== true) throw new Error(`replica B: a token minted at A is ${JSON.stringify(intro)}`);
    await oneLogin(S.url, studentsFile, secretFile);
  }
  log(`checks passed: same JWKS on both replicas (${R.signing_keys} signing keys in PostgreSQL), a token from A works at B`);

  let errors = 0;
  if (wanted('compare')) {
    const cfgs = { sqlite: { servers: [S], issuer: S.url }, pg: { servers: [A, B], issuer: issuerPg } };
    const scenarios = [
      { key: 'token', title: 'token (client_credentials)', path: '/token', script: 'token.lua' },
      { key: 'userinfo', title: 'userinfo', path: '/userinfo', script: 'userinfo.lua', token: true },
    ];
    R.compare = { quiet: await quiet('comparison'), scenarios: [] };
    for (const sc of scenarios) {
      const envFor = async (key) => ({ BENCH_BASIC: basic, BENCH_TOKEN: sc.token ? await oneLogin(cfgs[key].issuer, studentsFile, secretFile) : '' });
      for (const key of ['sqlite', 'pg']) await round(cfgs[key], sc, await envFor(key), 2); // warm-up
      const rounds = { sqlite: [], pg: [] };
      for (let r = 0; r < O.rounds; r++) {
        for (const key of ['sqlite', 'pg']) {
          const res = await round(cfgs[key], sc, await envFor(key), O.duration);
          log(`${sc.key} round ${r + 1} ${key}: ${res.rps} req/s (${res.per_replica_rps.join(' + ')}), p50 ${res.p50_ms} ms, p99 ${res.p99_ms} ms, errors ${res.errors}, ` +
            `nidan ${res.cpu.server_cores} cores, pg ${res.cpu.pg_cores}, wrk ${res.cpu.load_cores}, foreign ${res.cpu.foreign_cores}`);
          rounds[key].push(res);
        }
      }
      const row = { key: sc.key, title: sc.title, sqlite: summarize(rounds.sqlite), pg: summarize(rounds.pg) };
      errors += row.sqlite.errors + row.pg.errors;
      R.compare.scenarios.push(row);
    }
  }
  R.memory_sqlite_end = memory(S.proc.pid);
  const stops = [{ name: S.name, stop: await stopServer(S) }];

  if (wanted('soak')) {
    R.soak_quiet = await quiet('soak');
    R.tables_before = tableStats();
    const outFile = path.join(dir, 'soak.json');
    log(`soak: ${O.soakWarmup} s warm-up + ${O.soak} s against ${A.url} and ${B.url}`);
    const r = await runAsync(process.execPath, [
      path.join(HERE, 'soak.mjs'), '--replica', A.url, '--replica', B.url, '--issuer', issuerPg,
      '--users', studentsFile, '--secret-file', secretFile,
      '--pid', `replica A=${A.proc.pid}`, '--pid', `replica B=${B.proc.pid}`,
      '--duration', String(O.soak), '--warmup', String(O.soakWarmup), '--sample', '30', '--out', outFile,
    ], { timeoutMs: (O.soak + O.soakWarmup + 120) * 1000 });
    let soak;
    try {
      soak = JSON.parse(r.stdout.trim().split('\n').pop());
    } catch {
      throw new Error(`soak driver failed (exit ${r.code}): ${r.stderr}${r.stdout.slice(-2000)}`);
    }
    if (soak.error) throw new Error(`soak driver: ${soak.error}`);
    R.soak = soak;
    errors += soak.errors_total;
    R.tables_after = tableStats();
    log(`soak: ${soak.requests_issued} requests, ${soak.errors_total} errors; RSS ${Object.entries(soak.rss).map(([k, v]) => `${k} ${MiB(v.start_kb)} → ${MiB(v.end_kb)} MiB (${v.growth_pct} %)`).join(', ')}`);
  }
  R.servers_after = [];
  for (const s of [A, B]) R.servers_after.push({ name: s.name, metrics: await metricsByStatus(s), log: logProblems(s), memory: memory(s.proc.pid) });
  R.servers_after.push({ name: S.name, metrics: {}, log: logProblems(S) });
  for (const s of [A, B]) stops.push({ name: s.name, stop: await stopServer(s) });
  R.stops = stops;
  R.machine.loadavg_end = loadavg();
  R.seconds = Math.round((Date.now() - started) / 1000);

  const table = report(R);
  fs.mkdirSync(path.join(HERE, 'results'), { recursive: true });
  fs.writeFileSync(path.join(HERE, 'results/replicas-latest.json'), `${JSON.stringify(R, null, 2)}\n`);
  fs.writeFileSync(path.join(HERE, 'results/replicas-latest.md'), `${table}\n`);
  console.log(table);
  for (const x of R.servers_after) if (x.log.count) log(`${x.name}: ${x.log.count} WARN/ERROR lines, first:\n${x.log.first.join('\n')}`);
  if (O.updateReadme) {
    const readme = path.join(HERE, 'README.md');
    const text = fs.readFileSync(readme, 'utf8');
    const start = '<!-- replicas:start -->';
    const end = '<!-- replicas:end -->';
    const i = text.indexOf(start);
    const j = text.indexOf(end);
    if (i < 0 || j < i) log('README.md has no replicas markers; not updated');
    else {
      fs.writeFileSync(readme, `${text.slice(0, i + start.length)}\n${table}\n${text.slice(j)}`);
      log('bench/README.md (Replicas and soak) updated');
    }
  }
  if (O.keep) log(`kept ${dir}`);
  else fs.rmSync(dir, { recursive: true, force: true });
  if (errors) {
    log(`${errors} requests failed`);
    process.exitCode = 1;
  }
}

main().catch((e) => {
  console.error(`replicas bench failed: ${e.stack ?? e.message}`);
  cleanup();
  process.exit(1);
});
