#!/usr/bin/env node
// Offline OpenID Provider conformance check for nidan.
//
// Starts a throw-away nidan instance on a free loopback port, then plays both the
// relying parties (with openid-client + jose, which share none of nidan's code or
// assumptions) and the student's browser (plain fetch, no redirects followed, our
// own cookie jar). Covers what the OpenID Foundation's Basic OP, Config OP,
// RP-Initiated Logout OP and Back-Channel Logout OP plans check (a loopback receiver takes the
// logout tokens), RFC 9207 iss, the RFC 9470 step-up, and nidan's documented protocol decisions;
// replays the suite plan configurations of conformance/oidf/ against nidan's pages.
//
//   node conformance/run.mjs [--nidan PATH] [--only WORD] [--keep] [--verbose]
//
// Prints one line per check and, last, exactly one line "N passed, N failed, N skipped".
// Exits 1 if any check failed. Never contacts anything but 127.0.0.1.

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes, randomUUID, createHash } from 'node:crypto';
import fs from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

// The two independent libraries. Loaded dynamically so that a missing `npm ci` is reported as
// a failed check with the closing line, not as a stack trace.
let client, jose;
try {
  client = await import('openid-client');
  jose = await import('jose');
} catch (e) {
  console.log(`  FAIL  load openid-client and jose: ${e.message} (run: npm ci --prefix conformance)`);
  console.log('\n0 passed, 1 failed, 0 skipped');
  process.exit(1);
}

// ---------------------------------------------------------------------------
// Command line
// ---------------------------------------------------------------------------

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..');

function parseArgs(argv) {
  const opts = { nidan: null, only: [], keep: false, verbose: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--nidan') opts.nidan = argv[++i];
    else if (a.startsWith('--nidan=')) opts.nidan = a.slice(8);
    else if (a === '--only') opts.only.push(argv[++i].toLowerCase());
    else if (a === '--keep') opts.keep = true;
    else if (a === '--verbose' || a === '-v') opts.verbose = true;
    else if (a === '--help' || a === '-h') {
      console.log('usage: node conformance/run.mjs [--nidan PATH] [--only WORD]... [--keep] [--verbose]');
      console.log('  --nidan PATH  nidan binary (default target/release/nidan, then target/debug/nidan)');
      console.log('  --only WORD   run only the areas whose title contains WORD (setup always runs)');
      console.log('  --keep        keep the temporary directory (config, database, server log)');
      console.log('  --verbose     print the server log at the end');
      process.exit(0);
    } else {
      console.error(`unknown argument: ${a}`);
      process.exit(2);
    }
  }
  return opts;
}
const OPTS = parseArgs(process.argv.slice(2));

// ---------------------------------------------------------------------------
// Tiny test harness
// ---------------------------------------------------------------------------

const counts = { passed: 0, failed: 0, skipped: 0 };
class Skip extends Error {}

/** Skip the current check. */
function skip(reason) {
  throw new Skip(reason);
}
/** A value an earlier check should have produced; skip when it did not. */
function need(value, what) {
  if (value === undefined || value === null || value === false) skip(`needs ${what}`);
  return value;
}
function assert(cond, message) {
  if (!cond) throw new Error(message);
}
function show(v) {
  if (typeof v === 'string') return JSON.stringify(v.length > 300 ? `${v.slice(0, 300)}…` : v);
  try {
    const s = JSON.stringify(v);
    return s === undefined ? String(v) : s.length > 300 ? `${s.slice(0, 300)}…` : s;
  } catch {
    return String(v);
  }
}
function eq(actual, expected, what) {
  if (actual !== expected) throw new Error(`${what}: expected ${show(expected)}, got ${show(actual)}`);
}
function describeError(e) {
  if (e instanceof client.ResponseBodyError) {
    return `HTTP ${e.status} ${e.error}${e.error_description ? ` (${e.error_description})` : ''}`;
  }
  if (e instanceof client.AuthorizationResponseError) {
    return `authorization error ${e.error}${e.error_description ? ` (${e.error_description})` : ''}`;
  }
  if (e instanceof client.WWWAuthenticateChallengeError) {
    return `HTTP ${e.status} WWW-Authenticate ${show(e.cause)}`;
  }
  let msg = e?.message ?? String(e);
  if (e?.cause && typeof e.cause === 'object') {
    const c = e.cause.message ?? (e.cause.code ? e.cause.code : show(e.cause));
    if (c && !msg.includes(c)) msg += ` [${c}]`;
  }
  return msg;
}

/** Run one named check. Returns what fn returned when it passed, else undefined. */
async function test(name, fn) {
  try {
    const value = await fn();
    counts.passed++;
    console.log(`  ok    ${name}`);
    return value === undefined ? true : value;
  } catch (e) {
    if (e instanceof Skip) {
      counts.skipped++;
      console.log(`  skip  ${name}: ${e.message}`);
    } else {
      counts.failed++;
      console.log(`  FAIL  ${name}: ${describeError(e)}`);
    }
    return undefined;
  }
}
function section(title) {
  console.log(`\n# ${title}`);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const now = () => Math.floor(Date.now() / 1000);
const b64u = (buf) => Buffer.from(buf).toString('base64url');

// ---------------------------------------------------------------------------
// The nidan instance
// ---------------------------------------------------------------------------

const USER1 = {
  username: 's2401001',
  password: `Univ-${b64u(randomBytes(9))}`,
  secondPassword: `Second${randomBytes(3).readUIntBE(0, 3) % 900 + 100}Pw${b64u(randomBytes(6)).replace(/[^A-Za-z0-9]/g, 'x')}`,
  email: 's2401001@example.ac.jp',
  claims: {
    name: 'Taro Gakusei',
    family_name: 'Gakusei',
    given_name: 'Taro',
    student_id: 'S2401001',
    affiliation: 'student',
  },
};
const USER2 = {
  username: 's2401002',
  password: `Univ-${b64u(randomBytes(9))}`,
  claims: {
    name: 'Hanako Gakusei',
    family_name: 'Gakusei',
    given_name: 'Hanako',
    student_id: 'S2401002',
    affiliation: 'student',
  },
};

const ACR_PASSWORD = 'urn:nidan:acr:password';
const ACR_SECOND = 'urn:nidan:acr:second-password';
const ALL_SCOPES = ['openid', 'profile', 'email', 'student', 'offline_access'];

const state = {
  tmp: null,
  child: null,
  childExited: null,
  logPath: null,
  issuer: null,
  port: null,
  enrolled: false,
  meta: null, // discovery document
  rps: {},
};

function findBinary() {
  if (OPTS.nidan) return path.resolve(OPTS.nidan);
  for (const p of ['target/release/nidan', 'target/debug/nidan']) {
    const full = path.join(REPO, p);
    if (fs.existsSync(full)) return full;
  }
  return null;
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

// ---------------------------------------------------------------------------
// The back-channel logout receiver: a tiny HTTP server on loopback that records every request
// (recorded when its body has arrived, before it is answered) and answers per path from a plan
// (status, delay), 200 once the plan is used up.
// ---------------------------------------------------------------------------

const receiver = { server: null, origin: null, requests: [], plans: new Map() };

function startReceiver() {
  return new Promise((resolve, reject) => {
    const srv = createHttpServer((req, res) => {
      const chunks = [];
      req.on('data', (c) => chunks.push(c));
      req.on('end', () => {
        const u = new URL(req.url, receiver.origin);
        const plan = receiver.plans.get(u.pathname) ?? [];
        const step = plan.length ? plan.shift() : { status: 200 };
        receiver.requests.push({
          method: req.method,
          url: `${receiver.origin}${req.url}`,
          path: u.pathname,
          headers: req.headers,
          body: Buffer.concat(chunks).toString('utf8'),
          at: Date.now(),
          answered: step.status,
        });
        const answer = () => {
          if (res.destroyed || res.writableEnded) return;
          try {
            res.writeHead(step.status, { 'content-type': 'text/plain', 'cache-control': 'no-store' });
            res.end(step.status === 200 ? '' : 'receiver says no');
          } catch {
            /* the caller gave up (timeout) */
          }
        };
        if (step.delay) setTimeout(answer, step.delay).unref();
        else answer();
      });
      req.on('error', () => {});
    });
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      receiver.server = srv;
      receiver.origin = `http://127.0.0.1:${srv.address().port}`;
      resolve(receiver.origin);
    });
  });
}
function stopReceiver() {
  if (!receiver.server) return;
  receiver.server.closeAllConnections?.();
  receiver.server.close();
  receiver.server = null;
}
/** The requests the receiver got on a path, oldest first. */
const deliveries = (pathname) => receiver.requests.filter((r) => r.path === pathname);
/** Waits (bounded) until a path has at least n requests; returns them. */
async function waitForDeliveries(pathname, n, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (deliveries(pathname).length < n && Date.now() < deadline) await sleep(50);
  return deliveries(pathname);
}

function childEnv() {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('NIDAN_')) env[k] = v;
  env.RUST_LOG = process.env.RUST_LOG ?? 'info';
  env.NO_COLOR = '1';
  return env;
}

function runNidan(bin, args, input) {
  const r = spawnSync(bin, args, {
    cwd: state.tmp,
    env: childEnv(),
    input: input ?? '',
    encoding: 'utf8',
    timeout: 60_000,
  });
  // A program that does not read its stdin makes the write fail with EPIPE; its exit status still counts.
  if (r.error && r.error.code !== 'EPIPE') throw r.error;
  return r;
}

/** TOML value writer (enough for strings, numbers, booleans, arrays, inline tables). */
function toml(v) {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (Array.isArray(v)) return `[${v.map(toml).join(', ')}]`;
  if (v && typeof v === 'object') {
    const parts = Object.entries(v).map(([k, x]) => `${/^[A-Za-z0-9_-]+$/.test(k) ? k : JSON.stringify(k)} = ${toml(x)}`);
    return `{ ${parts.join(', ')} }`;
  }
  throw new Error(`cannot write ${v} as TOML`);
}
function tomlTable(obj) {
  return Object.entries(obj)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${k} = ${toml(v)}`)
    .join('\n');
}

async function makeRp(id, method, extra = {}) {
  const rp = {
    id,
    method,
    redirectUri: `http://127.0.0.1:9/${id}/cb`,
    redirectUriQ: `http://127.0.0.1:9/${id}/cb?x=1`,
    postLogout: `http://127.0.0.1:9/${id}/logged-out`,
    grants: ['authorization_code', 'refresh_token', 'client_credentials'],
    alg: 'RS256',
    ...extra,
  };
  if (method === 'client_secret_basic' || method === 'client_secret_post') {
    // Characters that must be form-urlencoded before base64 (RFC 6749 §2.3.1).
    rp.secret = `${b64u(randomBytes(24))}${extra.specialSecret ? ':+/ %&=' : ''}`;
  }
  if (method === 'private_key_jwt') {
    const { publicKey, privateKey } = await jose.generateKeyPair('RS256', { extractable: true });
    const jwk = await jose.exportJWK(publicKey);
    jwk.kid = await jose.calculateJwkThumbprint(jwk);
    jwk.alg = 'RS256';
    jwk.use = 'sig';
    rp.privateKey = privateKey;
    rp.publicJwk = jwk;
  }
  return rp;
}

function clientToml(rp, dir) {
  const c = {
    client_id: rp.id,
    client_secret_file: rp.secret !== undefined ? path.join(dir, `${rp.id}.secret`) : undefined,
    redirect_uris: rp.id === 'rp-basic' ? [rp.redirectUri, rp.redirectUriQ] : [rp.redirectUri],
    post_logout_redirect_uris: [rp.postLogout],
    token_endpoint_auth_method: rp.method,
    grant_types: rp.grants,
    scopes: ALL_SCOPES,
    id_token_signed_response_alg: rp.alg === 'RS256' ? undefined : rp.alg,
    jwks: rp.publicJwk ? { keys: [rp.publicJwk] } : undefined,
    backchannel_logout_uri: rp.backchannelUri,
    backchannel_logout_session_required: rp.backchannelUri ? true : undefined,
  };
  return `[[clients]]\n${tomlTable(c)}\n`;
}

async function prepareInstance(bin) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nidan-conformance-'));
  state.tmp = dir;
  state.port = await freePort();
  state.issuer = `http://127.0.0.1:${state.port}`;

  const r = state.rps;
  r.basic = await makeRp('rp-basic', 'client_secret_basic', { specialSecret: true });
  r.post = await makeRp('rp-post', 'client_secret_post', { grants: ['authorization_code', 'refresh_token'] });
  r.jwt = await makeRp('rp-jwt', 'private_key_jwt');
  r.public = await makeRp('rp-public', 'none', { grants: ['authorization_code', 'refresh_token'] });
  r.es256 = await makeRp('rp-es256', 'client_secret_basic', { alg: 'ES256' });
  r.eddsa = await makeRp('rp-eddsa', 'client_secret_basic', { alg: 'EdDSA' });
  // Back-channel logout clients: their URIs point at the runner's own loopback receiver and carry
  // a query string that must come back exactly as registered.
  const rx = await startReceiver();
  const bcGrants = { grants: ['authorization_code', 'refresh_token'] };
  r.bc = await makeRp('rp-bc', 'client_secret_basic', { ...bcGrants, backchannelUri: `${rx}/bc?tenant=x` });
  r.bcRetry = await makeRp('rp-bc-retry', 'client_secret_basic', { ...bcGrants, alg: 'ES256', backchannelUri: `${rx}/bc-retry?tenant=y` });
  r.bcSlow = await makeRp('rp-bc-slow', 'client_secret_basic', { ...bcGrants, backchannelUri: `${rx}/bc-slow?tenant=z` });

  fs.writeFileSync(path.join(dir, 'kek'), `${randomBytes(32).toString('base64')}\n`, { mode: 0o600 });
  for (const rp of Object.values(r)) {
    if (rp.secret !== undefined) fs.writeFileSync(path.join(dir, `${rp.id}.secret`), rp.secret, { mode: 0o600 });
  }

  const hashes = {};
  for (const u of [USER1, USER2]) {
    const out = runNidan(bin, ['hash-password'], u.password);
    const phc = (out.stdout ?? '').split('\n').map((l) => l.trim()).find((l) => l.startsWith('$argon2'));
    if (out.status !== 0 || !phc) {
      throw new Error(`nidan hash-password exited ${out.status}: ${(out.stderr || out.stdout || '').trim().slice(0, 300)}`);
    }
    hashes[u.username] = phc;
  }
  const users = [USER1, USER2]
    .map((u) => `[[users]]\n${tomlTable({ username: u.username, password_hash: hashes[u.username], claims: u.claims })}\n`)
    .join('\n');
  fs.writeFileSync(path.join(dir, 'users.toml'), users);

  const top = {
    issuer: state.issuer,
    listen: `127.0.0.1:${state.port}`,
    database_url: `sqlite://${path.join(dir, 'nidan.db')}`,
    key_encryption_key_file: path.join(dir, 'kek'),
    // Password-level clients work before enrollment; the enrolled test student is imported.
    enrollment: 'on-demand',
    university_name: 'Conformance University',
  };
  const config = [
    tomlTable(top),
    '',
    '[directory]',
    tomlTable({ kind: 'file', path: path.join(dir, 'users.toml') }),
    '',
    '[mail]',
    tomlTable({ transport: 'file', from: 'noreply@example.ac.jp', path: path.join(dir, 'mail') }),
    '',
    ...Object.values(r).map((rp) => clientToml(rp, dir)),
  ].join('\n');
  state.configPath = path.join(dir, 'nidan.toml');
  fs.writeFileSync(state.configPath, config);
  return dir;
}

async function startServer(bin) {
  state.logPath = path.join(state.tmp, 'server.log');
  const fd = fs.openSync(state.logPath, 'a');
  const child = spawn(bin, ['serve', '--config', state.configPath], {
    cwd: state.tmp,
    env: childEnv(),
    stdio: ['ignore', fd, fd],
  });
  fs.closeSync(fd);
  state.child = child;
  state.childExited = null;
  child.on('exit', (code, signal) => {
    state.childExited = { code, signal };
  });
  const deadline = Date.now() + 120_000;
  const url = `${state.issuer}/.well-known/openid-configuration`;
  while (Date.now() < deadline) {
    if (state.childExited) {
      throw new Error(`nidan serve exited (${show(state.childExited)}) before serving discovery; log:\n${logTail(30)}`);
    }
    try {
      const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
      if (res.ok) return await res.json();
    } catch {
      /* not up yet */
    }
    await sleep(250);
  }
  throw new Error(`discovery not served within 120 s; log:\n${logTail(30)}`);
}

async function stopServer() {
  const child = state.child;
  if (!child || state.childExited) return;
  const exited = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  const t = setTimeout(() => child.kill('SIGKILL'), 10_000);
  await exited;
  clearTimeout(t);
}

function logTail(n) {
  try {
    const lines = fs.readFileSync(state.logPath, 'utf8').trimEnd().split('\n');
    return lines
      .slice(-n)
      .map((l) => `  | ${l}`)
      .join('\n');
  } catch {
    return '  | (no server log)';
  }
}

// ---------------------------------------------------------------------------
// HTTP: a browser with a cookie jar that never follows redirects, and raw helpers
// ---------------------------------------------------------------------------

function assertLoopback(url) {
  const u = new URL(url);
  if (u.hostname !== '127.0.0.1') throw new Error(`refusing to contact non-loopback URL ${u.href}`);
  return u;
}

function decodeEntities(s) {
  return s
    .replace(/&#x([0-9a-f]+);/gi, (_, h) => String.fromCodePoint(parseInt(h, 16)))
    .replace(/&#(\d+);/g, (_, d) => String.fromCodePoint(Number(d)))
    .replace(/&quot;/g, '"')
    .replace(/&apos;/g, "'")
    .replace(/&lt;/g, '<')
    .replace(/&gt;/g, '>')
    .replace(/&amp;/g, '&');
}
function attrs(tag) {
  const out = {};
  const re = /([A-Za-z_:][-A-Za-z0-9_:.]*)(?:\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+)))?/g;
  const inner = tag.replace(/^<[A-Za-z]+/, '').replace(/\/?>$/, '');
  let m;
  while ((m = re.exec(inner))) out[m[1].toLowerCase()] = decodeEntities(m[2] ?? m[3] ?? m[4] ?? '');
  return out;
}
/** All forms of a page: { action, method, fields: {name: value}, names: Set, hidden: {} }. */
function parseForms(html, pageUrl) {
  const forms = [];
  for (const m of html.matchAll(/<form\b[^>]*>[\s\S]*?<\/form>/gi)) {
    const open = m[0].match(/^<form\b[^>]*>/i)[0];
    const a = attrs(open);
    const form = {
      action: new URL(a.action || pageUrl, pageUrl).href,
      method: (a.method || 'get').toUpperCase(),
      hidden: {},
      names: new Set(),
      submit: undefined,
    };
    for (const t of m[0].matchAll(/<(input|textarea|select|button)\b[^>]*>/gi)) {
      const ia = attrs(t[0]);
      if (!ia.name) continue;
      const type = (ia.type || (t[1].toLowerCase() === 'button' ? 'submit' : 'text')).toLowerCase();
      if (type === 'submit') {
        form.submit ??= { [ia.name]: ia.value ?? '' }; // the first named submit button, as a browser sends it
        continue;
      }
      form.names.add(ia.name);
      if ((ia.type || '').toLowerCase() === 'hidden') form.hidden[ia.name] = ia.value ?? '';
    }
    forms.push(form);
  }
  return forms;
}
function pageText(html) {
  return decodeEntities(
    html
      .replace(/<(script|style)\b[\s\S]*?<\/\1>/gi, ' ')
      .replace(/<[^>]+>/g, ' ')
      .replace(/\s+/g, ' ')
      .trim(),
  );
}
function alertText(html) {
  const m = html.match(/<([a-z0-9]+)\b[^>]*role\s*=\s*["']alert["'][^>]*>([\s\S]*?)<\/\1>/i);
  return m ? pageText(m[2]) : null;
}
function summary(res) {
  const t = res.text ?? '';
  if (/html/i.test(res.headers.get('content-type') ?? '')) {
    const title = t.match(/<title[^>]*>([\s\S]*?)<\/title>/i);
    return `${title ? pageText(title[1]) + ': ' : ''}${(alertText(t) ?? pageText(t)).slice(0, 200)}`;
  }
  return t.slice(0, 200);
}
const isRedirect = (s) => s >= 300 && s < 400;

class Browser {
  constructor() {
    this.cookies = new Map(); // name -> value
    this.rawCookies = new Map(); // name -> last Set-Cookie line
  }
  store(res) {
    for (const line of res.headers.getSetCookie()) {
      const [pair, ...rest] = line.split(';');
      const i = pair.indexOf('=');
      const name = pair.slice(0, i).trim();
      const value = pair.slice(i + 1).trim();
      const lower = rest.map((s) => s.trim().toLowerCase());
      const maxAge = lower.find((s) => s.startsWith('max-age='));
      const expires = rest.map((s) => s.trim()).find((s) => s.toLowerCase().startsWith('expires='));
      const gone =
        (maxAge && Number(maxAge.slice(8)) <= 0) || (expires && Date.parse(expires.slice(8)) < Date.now());
      this.rawCookies.set(name, line);
      if (gone) this.cookies.delete(name);
      else this.cookies.set(name, value);
    }
  }
  cookieHeader() {
    return [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
  }
  /** One request; redirects are returned, not followed. */
  async request(url, { method = 'GET', form, headers = {} } = {}) {
    const u = assertLoopback(url);
    const h = new Headers(headers);
    if (this.cookies.size) h.set('cookie', this.cookieHeader());
    let body;
    if (form) {
      body = new URLSearchParams(form).toString();
      h.set('content-type', 'application/x-www-form-urlencoded');
    }
    if (method === 'POST' && !h.has('origin')) h.set('origin', u.origin);
    const res = await fetch(u, { method, headers: h, body, redirect: 'manual', signal: AbortSignal.timeout(20_000) });
    this.store(res);
    const text = await res.text();
    const loc = res.headers.get('location');
    return {
      url: u.href,
      status: res.status,
      headers: res.headers,
      text,
      location: loc ? new URL(loc, u).href : null,
    };
  }
}

/** Raw HTTP without cookies. Returns {status, headers, text, json}. */
async function http(url, { method = 'GET', form, headers = {}, body } = {}) {
  const u = assertLoopback(url);
  const h = new Headers(headers);
  if (form) {
    body = new URLSearchParams(form).toString();
    h.set('content-type', 'application/x-www-form-urlencoded');
  }
  const res = await fetch(u, { method, headers: h, body, redirect: 'manual', signal: AbortSignal.timeout(20_000) });
  const text = await res.text();
  let json;
  try {
    json = JSON.parse(text);
  } catch {
    json = undefined;
  }
  return { status: res.status, headers: res.headers, text, json, location: res.headers.get('location') };
}
const formEnc = (s) => new URLSearchParams({ x: s }).toString().slice(2);
const basicAuth = (id, secret) => `Basic ${Buffer.from(`${formEnc(id)}:${formEnc(secret)}`).toString('base64')}`;

/** Token endpoint request authenticated the way the client is registered (raw, for negative checks). */
async function rawToken(rp, params, { as = rp } = {}) {
  const headers = {};
  const form = { ...params };
  if (as.method === 'client_secret_basic') headers.authorization = basicAuth(as.id, as.secret);
  else if (as.method === 'client_secret_post') Object.assign(form, { client_id: as.id, client_secret: as.secret });
  else if (as.method === 'private_key_jwt') {
    Object.assign(form, {
      client_id: as.id,
      client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
      client_assertion: await clientAssertion(as),
    });
  } else form.client_id = as.id;
  return http(state.meta.token_endpoint, { method: 'POST', form, headers });
}
/** Confidential-client authentication for introspection/revocation (raw). */
async function rawAuthed(url, rp, params) {
  const headers = {};
  const form = { ...params };
  if (rp.method === 'client_secret_basic') headers.authorization = basicAuth(rp.id, rp.secret);
  else if (rp.method === 'client_secret_post') Object.assign(form, { client_id: rp.id, client_secret: rp.secret });
  else form.client_id = rp.id;
  return http(url, { method: 'POST', form, headers });
}
async function clientAssertion(rp, { aud = state.meta.token_endpoint, key = rp.privateKey, kid = rp.publicJwk.kid, jti } = {}) {
  return new jose.SignJWT({})
    .setProtectedHeader({ alg: 'RS256', kid })
    .setIssuer(rp.id)
    .setSubject(rp.id)
    .setAudience(aud)
    .setJti(jti ?? randomUUID())
    .setIssuedAt()
    .setExpirationTime('60s')
    .sign(key);
}

// ---------------------------------------------------------------------------
// The student's side: drive /authorize through the login pages like a browser
// ---------------------------------------------------------------------------

/**
 * GET the authorization URL and follow nidan's own redirects and pages until nidan redirects
 * to the RP. `login` = { username, password, secondPassword } fills the login page (the second
 * password is typed only when login.typeSecond) and the step-up page.
 * Returns { callback: URL, pages: ['login'|'step-up'], postStatuses: [..] }.
 */
async function authorize(browser, authUrl, redirectUri, login) {
  const rpTarget = new URL(redirectUri);
  const pages = [];
  const postStatuses = [];
  let res = await browser.request(authUrl);
  for (let hop = 0; hop < 12; hop++) {
    if (isRedirect(res.status)) {
      assert(res.location, `HTTP ${res.status} without Location at ${res.url}`);
      const loc = new URL(res.location);
      if (loc.origin === rpTarget.origin && loc.pathname === rpTarget.pathname) {
        return { callback: loc, pages, postStatuses, last: res };
      }
      assert(loc.origin === new URL(state.issuer).origin, `redirected to an unexpected place: ${loc.href}`);
      if (/^\/enroll\//.test(loc.pathname)) throw new Error(`nidan asked for enrollment (${loc.pathname})`);
      res = await browser.request(loc.href);
      continue;
    }
    if (res.status === 200 && /<form/i.test(res.text)) {
      const forms = parseForms(res.text, res.url);
      const form = forms.find((f) => f.names.has('password') || f.names.has('second_password'));
      if (!form) throw new Error(`unexpected page at ${res.url}: ${summary(res)}`);
      if (!login) throw new Error(`a page was shown (${new URL(res.url).pathname}) although none was expected`);
      const fields = { ...form.hidden, ...form.submit };
      if (form.names.has('username')) {
        pages.push('login');
        Object.assign(fields, {
          username: login.username,
          password: login.password,
          second_password: login.typeSecond ? login.secondPassword : '',
        });
      } else {
        pages.push('step-up');
        if (!login.secondPassword) throw new Error('the step-up page asked for a second password the student does not have');
        fields.second_password = login.secondPassword;
      }
      res = await browser.request(form.action, { method: form.method === 'GET' ? 'GET' : 'POST', form: fields });
      postStatuses.push(res.status);
      if (res.status === 200) {
        const alert = alertText(res.text);
        if (alert) throw new Error(`login refused: ${alert}`);
      }
      continue;
    }
    throw new Error(`unexpected HTTP ${res.status} at ${res.url}: ${summary(res)}`);
  }
  throw new Error('too many redirects/pages');
}

/** Builds an authorization URL by hand (for requests openid-client would not make). */
function authUrl(params) {
  const u = new URL(state.meta.authorization_endpoint);
  for (const [k, v] of Object.entries(params)) if (v !== undefined) u.searchParams.set(k, v);
  return u.href;
}

/**
 * A complete authorization code flow for one RP through openid-client.
 * opts: browser, scope, extra (more authorization parameters), user (login), pkce, nonce,
 * state, maxAge, expectPages (array, checked exactly).
 */
async function codeFlow(rp, opts = {}) {
  const browser = opts.browser ?? new Browser();
  const st = opts.state ?? client.randomState();
  const nonce = opts.nonce === false ? undefined : client.randomNonce();
  const pkce = opts.pkce ?? rp.method === 'none';
  const verifier = pkce ? client.randomPKCECodeVerifier() : undefined;
  const params = {
    redirect_uri: rp.redirectUri,
    scope: opts.scope ?? 'openid profile email student',
    state: st,
    ...(nonce && { nonce }),
    ...(pkce && { code_challenge: await client.calculatePKCECodeChallenge(verifier), code_challenge_method: 'S256' }),
    ...(opts.maxAge !== undefined && { max_age: String(opts.maxAge) }),
    ...opts.extra,
  };
  const url = client.buildAuthorizationUrl(rp.config, params);
  const login = opts.user === null ? null : { ...(opts.user ?? USER1), typeSecond: opts.typeSecond };
  const started = now();
  const { callback, pages, postStatuses } = await authorize(browser, url.href, rp.redirectUri, login);
  if (opts.expectPages) {
    eq(pages.join(','), opts.expectPages.join(','), 'pages shown to the student');
  }
  if (callback.searchParams.get('error')) {
    const e = callback.searchParams;
    throw new Error(`authorization error ${e.get('error')}${e.get('error_description') ? ` (${e.get('error_description')})` : ''}`);
  }
  rp.http.length = 0;
  const tokens = await client.authorizationCodeGrant(
    rp.config,
    callback,
    { expectedState: st, expectedNonce: nonce, pkceCodeVerifier: verifier, maxAge: opts.maxAge, idTokenExpected: true },
  );
  const tokenHttp = rp.http.find((h) => h.url === state.meta.token_endpoint);
  return { rp, browser, state: st, nonce, verifier, callback, pages, postStatuses, tokens, claims: tokens.claims(), tokenHttp, started };
}

/** Sends an authorization request and returns the error response parameters nidan redirected with. */
async function authError(rp, params, { browser = new Browser(), user = USER1 } = {}) {
  const st = params.state ?? client.randomState();
  const url = authUrl({ client_id: rp.id, response_type: 'code', redirect_uri: rp.redirectUri, scope: 'openid', state: st, ...params });
  const r = await authorize(browser, url, params.redirect_uri ?? rp.redirectUri, user);
  const p = r.callback.searchParams;
  return { error: p.get('error'), state: p.get('state'), iss: p.get('iss'), code: p.get('code'), pages: r.pages, sentState: st, params: p };
}
function expectAuthError(r, error) {
  if (Array.isArray(error)) assert(error.includes(r.error), `expected error ${error.join(' or ')}, got ${show(r.error ?? `code=${r.code}`)}`);
  else eq(r.error, error, 'error');
  eq(r.state, r.sentState, 'state in the error response');
  eq(r.iss, state.issuer, 'iss in the error response (RFC 9207)');
}

// ---------------------------------------------------------------------------
// ID token checks
// ---------------------------------------------------------------------------

let remoteJwks;
function jwks() {
  remoteJwks ??= jose.createRemoteJWKSet(new URL(state.meta.jwks_uri), { timeoutDuration: 10_000 });
  return remoteJwks;
}
function hashFor(alg) {
  if (alg === 'EdDSA' || alg === 'Ed25519' || alg.endsWith('512')) return 'sha512';
  if (alg.endsWith('384')) return 'sha384';
  return 'sha256';
}
function tokenHash(value, alg) {
  const d = createHash(hashFor(alg)).update(value, 'ascii').digest();
  return b64u(d.subarray(0, d.length / 2));
}

/** Named checks of an ID token; each returns a problem string or null. */
function idTokenChecks(flow, expect = {}) {
  const c = flow.claims;
  const idt = flow.tokens.id_token;
  const header = jose.decodeProtectedHeader(idt);
  const rp = flow.rp;
  const t = now();
  return {
    [`signature (${expect.alg ?? rp.alg}) verifies with a key from jwks_uri`]: async () => {
      if (header.alg !== (expect.alg ?? rp.alg)) return `alg is ${show(header.alg)}, expected ${expect.alg ?? rp.alg}`;
      if (!header.kid) return 'no kid in the header';
      await jose.jwtVerify(idt, jwks(), { algorithms: [header.alg], clockTolerance: 5 });
      return null;
    },
    'iss is the issuer': () => (c.iss === state.issuer ? null : `iss ${show(c.iss)}`),
    'sub is a non-empty ASCII string of at most 255 characters': () =>
      typeof c.sub === 'string' && c.sub.length > 0 && c.sub.length <= 255 && /^[\x20-\x7e]+$/.test(c.sub) ? null : `sub ${show(c.sub)}`,
    'sub does not reveal the university user ID': () =>
      c.sub.toLowerCase().includes(USER1.username) || c.sub.toLowerCase().includes(USER2.username) ? `sub ${show(c.sub)}` : null,
    'aud contains the client_id': () => {
      const aud = Array.isArray(c.aud) ? c.aud : [c.aud];
      if (!aud.includes(rp.id)) return `aud ${show(c.aud)}`;
      if (aud.length > 1 && c.azp !== rp.id) return 'several audiences but azp is not the client';
      return null;
    },
    'azp is the client_id': () => (c.azp === rp.id ? null : `azp ${show(c.azp)}`),
    'exp is in the future and after iat': () =>
      Number.isInteger(c.exp) && c.exp > t && c.exp > c.iat ? null : `exp ${show(c.exp)}, iat ${show(c.iat)}, now ${t}`,
    'iat is a recent time': () =>
      Number.isInteger(c.iat) && c.iat <= t + 5 && c.iat >= flow.started - 5 ? null : `iat ${show(c.iat)}, now ${t}`,
    'auth_time is present and not after iat': () =>
      Number.isInteger(c.auth_time) && c.auth_time <= c.iat + 1 && c.auth_time <= t + 5 ? null : `auth_time ${show(c.auth_time)}, iat ${show(c.iat)}`,
    'nonce is the one sent': () => (c.nonce === flow.nonce ? null : `nonce ${show(c.nonce)}, sent ${show(flow.nonce)}`),
    'acr is one of the advertised levels': () => {
      if (![ACR_PASSWORD, ACR_SECOND].includes(c.acr)) return `acr ${show(c.acr)}`;
      if (expect.acr && c.acr !== expect.acr) return `acr ${show(c.acr)}, expected ${expect.acr}`;
      return null;
    },
    'amr contains "pwd" and never "mfa"': () =>
      Array.isArray(c.amr) && c.amr.includes('pwd') && !c.amr.includes('mfa') ? null : `amr ${show(c.amr)}`,
    'at_hash matches the access token': () => {
      if (typeof c.at_hash !== 'string') return `at_hash ${show(c.at_hash)}`;
      const want = tokenHash(flow.tokens.access_token, header.alg);
      return c.at_hash === want ? null : `at_hash ${c.at_hash}, computed ${want}`;
    },
    'sid is present': () => (typeof c.sid === 'string' && c.sid.length > 0 ? null : `sid ${show(c.sid)}`),
  };
}
/** All ID token checks as one test (for the flows after the first). */
async function idTokenAllGood(flow, expect) {
  const problems = [];
  for (const [name, check] of Object.entries(idTokenChecks(flow, expect))) {
    try {
      const p = await check();
      if (p) problems.push(`${name}: ${p}`);
    } catch (e) {
      problems.push(`${name}: ${describeError(e)}`);
    }
  }
  if (problems.length) throw new Error(problems.join('; '));
}
/** Every ID token check as its own test. */
async function idTokenTests(prefix, flow, expect) {
  for (const [name, check] of Object.entries(idTokenChecks(flow, expect))) {
    await test(`${prefix}${name}`, async () => {
      const p = await check();
      if (p) throw new Error(p);
    });
  }
}

function noStore(h, what = 'response') {
  const cc = h?.get('cache-control') ?? '';
  assert(/\bno-store\b/i.test(cc), `${what} Cache-Control is ${show(cc || null)}, expected no-store`);
}
function expectOAuthError(r, status, error, what = 'response') {
  const errs = Array.isArray(error) ? error : [error];
  const got = r.json?.error;
  assert(
    r.status === status && errs.includes(got),
    `${what}: expected HTTP ${status} ${errs.join(' or ')}, got HTTP ${r.status} ${show(r.json ?? r.text)}`,
  );
}
function expectInvalidClient(r) {
  expectOAuthError(r, 401, 'invalid_client');
  assert(r.headers.get('www-authenticate'), 'no WWW-Authenticate header on the 401');
}

async function userinfo(token, how = 'header') {
  const ep = state.meta.userinfo_endpoint;
  if (how === 'header') return http(ep, { headers: { authorization: `Bearer ${token}` } });
  if (how === 'post-header') return http(ep, { method: 'POST', headers: { authorization: `Bearer ${token}` } });
  return http(ep, { method: 'POST', form: { access_token: token } });
}
async function introspect(token, by = state.rps.basic) {
  const r = await rawAuthed(state.meta.introspection_endpoint, by, { token });
  assert(r.status === 200 && r.json, `introspection: HTTP ${r.status} ${show(r.text)}`);
  return r.json;
}
/** The access token no longer works anywhere. */
async function expectDead(accessToken, what) {
  const u = await userinfo(accessToken);
  assert(u.status === 401, `${what}: userinfo still answers HTTP ${u.status}`);
  const i = await introspect(accessToken);
  assert(i.active === false, `${what}: introspection says ${show(i)}`);
}

// ---------------------------------------------------------------------------
// Relying-party configurations (openid-client)
// ---------------------------------------------------------------------------

function configureRps() {
  for (const rp of Object.values(state.rps)) {
    let auth;
    if (rp.method === 'client_secret_basic') auth = client.ClientSecretBasic(rp.secret);
    else if (rp.method === 'client_secret_post') auth = client.ClientSecretPost(rp.secret);
    else if (rp.method === 'private_key_jwt') auth = client.PrivateKeyJwt({ key: rp.privateKey, kid: rp.publicJwk.kid });
    else auth = client.None();
    const metadata = {
      redirect_uris: [rp.redirectUri],
      token_endpoint_auth_method: rp.method,
      id_token_signed_response_alg: rp.alg,
    };
    rp.config = new client.Configuration(state.meta, rp.id, metadata, auth);
    client.allowInsecureRequests(rp.config); // http on 127.0.0.1 only
    client.enableNonRepudiationChecks(rp.config); // verify ID token signatures too
    rp.http = [];
    rp.config[client.customFetch] = async (url, options) => {
      assertLoopback(url);
      const res = await fetch(url, options);
      rp.http.push({ url: String(url), status: res.status, headers: res.headers });
      return res;
    };
  }
}

// ---------------------------------------------------------------------------
// Checks, one function per plan area
// ---------------------------------------------------------------------------

async function discoveryChecks() {
  section('Discovery (Config OP)');
  const m = state.meta;
  await test('discovery is served as JSON', async () => {
    const r = await http(`${state.issuer}/.well-known/openid-configuration`);
    eq(r.status, 200, 'status');
    assert(/^application\/json/i.test(r.headers.get('content-type') ?? ''), `content-type ${r.headers.get('content-type')}`);
  });
  await test('openid-client discovery() accepts the document (issuer matches exactly)', async () => {
    const c = await client.discovery(new URL(state.issuer), 'rp-basic', undefined, client.None(), {
      execute: [client.allowInsecureRequests],
    });
    eq(c.serverMetadata().issuer, state.issuer, 'issuer');
  });
  const has = (key, ...values) => async () => {
    const v = m[key];
    assert(Array.isArray(v), `${key} is ${show(v)}`);
    for (const x of values) assert(v.includes(x), `${key} ${show(v)} lacks ${show(x)}`);
  };
  const endpoint = (key, p) => async () => {
    eq(m[key], `${state.issuer}${p}`, key);
  };
  await test('authorization_endpoint', endpoint('authorization_endpoint', '/authorize'));
  await test('token_endpoint', endpoint('token_endpoint', '/token'));
  await test('userinfo_endpoint', endpoint('userinfo_endpoint', '/userinfo'));
  await test('jwks_uri', endpoint('jwks_uri', '/jwks'));
  await test('introspection_endpoint', endpoint('introspection_endpoint', '/introspect'));
  await test('revocation_endpoint', endpoint('revocation_endpoint', '/revoke'));
  await test('end_session_endpoint', endpoint('end_session_endpoint', '/logout'));
  await test('response_types_supported is ["code"]', async () => eq(show(m.response_types_supported), '["code"]', 'response_types_supported'));
  await test('response_modes_supported includes query', has('response_modes_supported', 'query'));
  await test('subject_types_supported includes public', has('subject_types_supported', 'public'));
  await test('id_token_signing_alg_values_supported has RS256, ES256, EdDSA', has('id_token_signing_alg_values_supported', 'RS256', 'ES256', 'EdDSA'));
  await test('scopes_supported has openid profile email student offline_access', has('scopes_supported', ...ALL_SCOPES));
  await test('claims_supported lists the ID token claims', has('claims_supported', 'sub', 'iss', 'acr', 'amr', 'auth_time'));
  await test('token_endpoint_auth_methods_supported has all four methods', has('token_endpoint_auth_methods_supported', 'client_secret_basic', 'client_secret_post', 'private_key_jwt', 'none'));
  await test('code_challenge_methods_supported is ["S256"]', async () => eq(show(m.code_challenge_methods_supported), '["S256"]', 'code_challenge_methods_supported'));
  await test('grant_types_supported has authorization_code, refresh_token, client_credentials', has('grant_types_supported', 'authorization_code', 'refresh_token', 'client_credentials'));
  await test('acr_values_supported has both levels', has('acr_values_supported', ACR_PASSWORD, ACR_SECOND));
  await test('claims_parameter_supported is true', async () => eq(m.claims_parameter_supported, true, 'claims_parameter_supported'));
  await test('request_parameter_supported is false', async () => eq(m.request_parameter_supported, false, 'request_parameter_supported'));
  await test('request_uri_parameter_supported is false (its default is true)', async () => eq(m.request_uri_parameter_supported, false, 'request_uri_parameter_supported'));
  await test('authorization_response_iss_parameter_supported is true', async () => eq(m.authorization_response_iss_parameter_supported, true, 'authorization_response_iss_parameter_supported'));
  await test('backchannel_logout_supported and backchannel_logout_session_supported are true', async () => {
    eq(m.backchannel_logout_supported, true, 'backchannel_logout_supported');
    eq(m.backchannel_logout_session_supported, true, 'backchannel_logout_session_supported');
  });
}

async function jwksChecks() {
  section('JWKS');
  const r = await test('jwks_uri serves a JSON key set', async () => {
    const res = await http(state.meta.jwks_uri);
    eq(res.status, 200, 'status');
    assert(/json/i.test(res.headers.get('content-type') ?? ''), `content-type ${res.headers.get('content-type')}`);
    assert(Array.isArray(res.json?.keys) && res.json.keys.length > 0, `body ${show(res.text)}`);
    return res.json.keys;
  });
  const keys = () => need(r, 'the key set');
  await test('every key has a unique kid', async () => {
    const kids = keys().map((k) => k.kid);
    assert(kids.every((k) => typeof k === 'string' && k), `kids ${show(kids)}`);
    eq(new Set(kids).size, kids.length, 'distinct kids');
  });
  await test('no private key material is published', async () => {
    for (const k of keys()) for (const p of ['d', 'p', 'q', 'dp', 'dq', 'qi', 'k']) assert(!(p in k), `key ${k.kid} has "${p}"`);
  });
  await test('RSA keys are at least 2048 bits', async () => {
    const rsa = keys().filter((k) => k.kty === 'RSA');
    assert(rsa.length > 0, 'no RSA key');
    for (const k of rsa) {
      const bits = Buffer.from(k.n, 'base64url').length * 8;
      assert(bits >= 2048, `key ${k.kid} has ${bits} bits`);
    }
  });
  await test('there is a key for each advertised algorithm (RS256, ES256 P-256, EdDSA Ed25519)', async () => {
    const ks = keys();
    assert(ks.some((k) => k.kty === 'RSA'), 'no RSA key');
    assert(ks.some((k) => k.kty === 'EC' && k.crv === 'P-256'), 'no P-256 key');
    assert(ks.some((k) => k.kty === 'OKP' && k.crv === 'Ed25519'), 'no Ed25519 key');
  });
  await test('every key imports with jose', async () => {
    for (const k of keys()) {
      const alg = k.alg ?? (k.kty === 'RSA' ? 'RS256' : k.kty === 'EC' ? 'ES256' : 'EdDSA');
      await jose.importJWK(k, alg);
    }
  });
}

const flows = {};

async function codeFlowChecks() {
  section('Code flow and client authentication (Basic OP)');
  const { basic, post, jwt, public: pub } = state.rps;
  flows.basic = await test('code flow, client_secret_basic (secret with characters that need form-urlencoding)', () =>
    codeFlow(basic, { expectPages: ['login'] }));
  await test('login POST answers 303 (never 307/308)', async () => {
    const f = need(flows.basic, 'the client_secret_basic flow');
    eq(f.postStatuses.join(','), '303', 'status of POST /login');
  });
  await test('authorization response carries iss = issuer (RFC 9207)', async () => {
    eq(need(flows.basic, 'the client_secret_basic flow').callback.searchParams.get('iss'), state.issuer, 'iss');
  });
  await test('authorization response carries state unchanged', async () => {
    const f = need(flows.basic, 'the client_secret_basic flow');
    eq(f.callback.searchParams.get('state'), f.state, 'state');
  });
  await test('token response: token_type Bearer, expires_in, access_token, id_token', async () => {
    const t = need(flows.basic, 'the client_secret_basic flow').tokens;
    eq(String(t.token_type).toLowerCase(), 'bearer', 'token_type');
    assert(Number.isInteger(t.expires_in) && t.expires_in > 0, `expires_in ${show(t.expires_in)}`);
    assert(typeof t.access_token === 'string' && t.access_token, 'no access_token');
    assert(typeof t.id_token === 'string', 'no id_token');
  });
  await test('token response has Cache-Control: no-store', async () => {
    noStore(need(flows.basic, 'the client_secret_basic flow').tokenHttp?.headers, 'token response');
  });

  flows.post = await test('code flow, client_secret_post', () => codeFlow(post));
  await test('  … its ID token is valid', async () => idTokenAllGood(need(flows.post, 'the flow')));
  flows.jwt = await test('code flow, private_key_jwt (assertion aud = issuer, as openid-client sends it)', () => codeFlow(jwt));
  await test('  … its ID token is valid', async () => idTokenAllGood(need(flows.jwt, 'the flow')));
  flows.public = await test('code flow, public client (none) with PKCE S256', () => codeFlow(pub));
  await test('  … its ID token is valid', async () => idTokenAllGood(need(flows.public, 'the flow')));
  await test('  … and the token response has Cache-Control: no-store', async () =>
    noStore(need(flows.public, 'the flow').tokenHttp?.headers, 'token response'));
  await test('code flow, confidential client with PKCE', () => codeFlow(basic, { pkce: true }));

  await test('private_key_jwt assertion with aud = token endpoint URL is accepted (OIDC Core §9)', async () => {
    const r = await rawToken(jwt, { grant_type: 'client_credentials' });
    eq(r.status, 200, `status (${show(r.json ?? r.text)})`);
  });
  await test('private_key_jwt assertion replay (same jti) is refused with invalid_client', async () => {
    const assertion = await clientAssertion(jwt);
    const form = {
      grant_type: 'client_credentials',
      client_id: jwt.id,
      client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
      client_assertion: assertion,
    };
    const first = await http(state.meta.token_endpoint, { method: 'POST', form });
    eq(first.status, 200, `first use status (${show(first.json ?? first.text)})`);
    expectInvalidClient(await http(state.meta.token_endpoint, { method: 'POST', form }));
  });
  await test('private_key_jwt assertion signed with an unregistered key is refused (401 invalid_client)', async () => {
    const { privateKey } = await jose.generateKeyPair('RS256');
    const form = {
      grant_type: 'client_credentials',
      client_id: jwt.id,
      client_assertion_type: 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer',
      client_assertion: await clientAssertion(jwt, { key: privateKey }),
    };
    expectInvalidClient(await http(state.meta.token_endpoint, { method: 'POST', form }));
  });
  await test('wrong client secret (Basic) gives 401 invalid_client with WWW-Authenticate', async () => {
    const r = await http(state.meta.token_endpoint, {
      method: 'POST',
      form: { grant_type: 'client_credentials' },
      headers: { authorization: basicAuth(basic.id, 'wrong-secret') },
    });
    expectInvalidClient(r);
  });
  await test('wrong client secret (POST) gives 401 invalid_client with WWW-Authenticate', async () => {
    const r = await http(state.meta.token_endpoint, {
      method: 'POST',
      form: { grant_type: 'authorization_code', code: 'x', redirect_uri: post.redirectUri, client_id: post.id, client_secret: 'wrong' },
    });
    expectInvalidClient(r);
  });
  await test('unknown client gives 401 invalid_client', async () => {
    const r = await http(state.meta.token_endpoint, {
      method: 'POST',
      form: { grant_type: 'client_credentials' },
      headers: { authorization: basicAuth('no-such-client', 'x') },
    });
    expectInvalidClient(r);
  });
  await test('a client_secret_basic client may not authenticate with client_secret_post', async () => {
    const r = await http(state.meta.token_endpoint, {
      method: 'POST',
      form: { grant_type: 'client_credentials', client_id: basic.id, client_secret: basic.secret },
    });
    expectInvalidClient(r);
  });
  await test('a client_secret_post client may not authenticate with client_secret_basic', async () => {
    const r = await http(state.meta.token_endpoint, {
      method: 'POST',
      form: { grant_type: 'authorization_code', code: 'x', redirect_uri: post.redirectUri },
      headers: { authorization: basicAuth(post.id, post.secret) },
    });
    expectInvalidClient(r);
  });
  await test('unsupported grant_type gives unsupported_grant_type', async () => {
    const r = await rawToken(basic, { grant_type: 'urn:example:no-such-grant' });
    expectOAuthError(r, 400, 'unsupported_grant_type');
  });

  // PKCE and code binding: each needs its own fresh code.
  const freshCode = async (rp, { pkce = false } = {}) => {
    const verifier = pkce ? client.randomPKCECodeVerifier() : undefined;
    const url = authUrl({
      client_id: rp.id,
      response_type: 'code',
      redirect_uri: rp.redirectUri,
      scope: 'openid',
      state: client.randomState(),
      nonce: client.randomNonce(),
      ...(pkce && { code_challenge: await client.calculatePKCECodeChallenge(verifier), code_challenge_method: 'S256' }),
    });
    const r = await authorize(new Browser(), url, rp.redirectUri, USER1);
    const code = r.callback.searchParams.get('code');
    assert(code, `no code: ${r.callback.href}`);
    return { code, verifier };
  };
  await test('PKCE: a wrong code_verifier gives invalid_grant', async () => {
    const { code } = await freshCode(pub, { pkce: true });
    const r = await rawToken(pub, { grant_type: 'authorization_code', code, redirect_uri: pub.redirectUri, code_verifier: client.randomPKCECodeVerifier() });
    expectOAuthError(r, 400, 'invalid_grant');
  });
  await test('PKCE: a missing code_verifier gives invalid_grant', async () => {
    const { code } = await freshCode(pub, { pkce: true });
    const r = await rawToken(pub, { grant_type: 'authorization_code', code, redirect_uri: pub.redirectUri });
    expectOAuthError(r, 400, ['invalid_grant', 'invalid_request']);
  });
  await test('PKCE: a code_verifier for a code issued without a challenge is refused', async () => {
    const { code } = await freshCode(basic);
    const r = await rawToken(basic, { grant_type: 'authorization_code', code, redirect_uri: basic.redirectUri, code_verifier: client.randomPKCECodeVerifier() });
    expectOAuthError(r, 400, ['invalid_grant', 'invalid_request']);
  });
  await test('a code issued to another client gives invalid_grant', async () => {
    const { code } = await freshCode(basic);
    const r = await rawToken(post, { grant_type: 'authorization_code', code, redirect_uri: basic.redirectUri });
    expectOAuthError(r, 400, 'invalid_grant');
  });
  await test('a different redirect_uri at the token endpoint gives invalid_grant', async () => {
    const { code } = await freshCode(basic);
    const r = await rawToken(basic, { grant_type: 'authorization_code', code, redirect_uri: basic.redirectUriQ });
    expectOAuthError(r, 400, 'invalid_grant');
  });
  await test('token error responses have Cache-Control: no-store', async () => {
    const r = await rawToken(basic, { grant_type: 'authorization_code', code: 'not-a-code', redirect_uri: basic.redirectUri });
    expectOAuthError(r, 400, 'invalid_grant');
    noStore(r.headers, 'token error response');
  });
}

async function idTokenChecksArea() {
  section('ID token');
  const f = flows.basic;
  if (f) await idTokenTests('RS256 (client_secret_basic flow): ', f, { acr: ACR_PASSWORD });
  else await test('RS256 ID token claims', async () => skip('needs the client_secret_basic flow'));
  await test('without the second password the level is urn:nidan:acr:password', async () =>
    eq(need(f, 'the client_secret_basic flow').claims.acr, ACR_PASSWORD, 'acr'));

  const es = await test('code flow for a client registered for ES256', () => codeFlow(state.rps.es256));
  await test('  … ID token is signed with ES256 and valid', async () => idTokenAllGood(need(es, 'the ES256 flow'), { alg: 'ES256' }));
  await test('  … the signing key is a P-256 key in the JWKS', async () => {
    const h = jose.decodeProtectedHeader(need(es, 'the ES256 flow').tokens.id_token);
    const keys = (await http(state.meta.jwks_uri)).json.keys;
    const k = keys.find((x) => x.kid === h.kid);
    assert(k && k.kty === 'EC' && k.crv === 'P-256', `key ${show(k)}`);
  });
  const ed = await test('code flow for a client registered for EdDSA', () => codeFlow(state.rps.eddsa));
  await test('  … ID token is signed with EdDSA (Ed25519) and valid', async () => idTokenAllGood(need(ed, 'the EdDSA flow'), { alg: 'EdDSA' }));
  await test('  … the signing key is an Ed25519 key in the JWKS', async () => {
    const h = jose.decodeProtectedHeader(need(ed, 'the EdDSA flow').tokens.id_token);
    const keys = (await http(state.meta.jwks_uri)).json.keys;
    const k = keys.find((x) => x.kid === h.kid);
    assert(k && k.kty === 'OKP' && k.crv === 'Ed25519', `key ${show(k)}`);
  });

  await test('sub is stable for the same student and client', async () => {
    const a = need(flows.basic, 'the client_secret_basic flow');
    const b = await codeFlow(state.rps.basic);
    eq(b.claims.sub, a.claims.sub, 'sub of a second login');
  });
  await test('different students get different sub values', async () => {
    const a = need(flows.basic, 'the client_secret_basic flow');
    const b = await codeFlow(state.rps.basic, { user: USER2 });
    assert(b.claims.sub !== a.claims.sub, `both students have sub ${show(a.claims.sub)}`);
    await idTokenAllGood(b);
  });
}

async function nonceStateChecks() {
  section('nonce and state');
  const { basic } = state.rps;
  await test('state with reserved characters comes back unchanged', async () => {
    const st = `s t/a+t=e&?%#é${b64u(randomBytes(6))}`;
    const f = await codeFlow(basic, { state: st });
    eq(f.callback.searchParams.get('state'), st, 'state');
  });
  await test('without nonce the code flow works and the ID token has no nonce', async () => {
    const f = await codeFlow(basic, { nonce: false });
    eq(f.claims.nonce, undefined, 'nonce');
  });
  await test('two logins get their own nonces', async () => {
    const b = new Browser();
    const f1 = await codeFlow(basic, { browser: b });
    const f2 = await codeFlow(basic, { browser: b, expectPages: [] });
    assert(f1.claims.nonce === f1.nonce && f2.claims.nonce === f2.nonce && f1.nonce !== f2.nonce, 'nonces mixed up');
  });
  await test('without state the response carries no state', async () => {
    const url = authUrl({ client_id: basic.id, response_type: 'code', redirect_uri: basic.redirectUri, scope: 'openid', nonce: 'n' });
    const r = await authorize(new Browser(), url, basic.redirectUri, USER1);
    assert(r.callback.searchParams.get('code'), `no code: ${r.callback.href}`);
    eq(r.callback.searchParams.get('state'), null, 'state');
  });
}

async function promptChecks() {
  section('prompt');
  const { basic } = state.rps;
  await test('prompt=none without a session gives login_required (no page)', async () => {
    const r = await authError(basic, { prompt: 'none' }, { user: null });
    expectAuthError(r, 'login_required');
  });
  const b = new Browser();
  const first = await test('a first login establishes a session', () => codeFlow(basic, { browser: b, expectPages: ['login'] }));
  await test('session cookie: HttpOnly, SameSite=Lax, not Secure/__Host- on a loopback http issuer', async () => {
    need(first, 'the first login');
    const line = b.rawCookies.get('nidan_session');
    assert(line, `no nidan_session cookie (cookies: ${show([...b.rawCookies.keys()])})`);
    assert(/;\s*httponly/i.test(line), `not HttpOnly: ${line}`);
    assert(/;\s*samesite=lax/i.test(line), `not SameSite=Lax: ${line}`);
    assert(!/;\s*secure/i.test(line), `Secure on http: ${line}`);
  });
  const silent = await test('prompt=none with a session returns a code without any page', () =>
    codeFlow(basic, { browser: b, extra: { prompt: 'none' }, user: null, expectPages: [] }));
  await test('  … same sub, same sid, same auth_time', async () => {
    const a = need(first, 'the first login').claims;
    const s = need(silent, 'the silent login').claims;
    eq(s.sub, a.sub, 'sub');
    eq(s.sid, a.sid, 'sid');
    eq(s.auth_time, a.auth_time, 'auth_time');
  });
  await test('prompt=login with a session shows the login page again and updates auth_time', async () => {
    const a = need(first, 'the first login').claims;
    await sleep(1100);
    const f = await codeFlow(basic, { browser: b, extra: { prompt: 'login' }, expectPages: ['login'] });
    assert(f.claims.auth_time > a.auth_time, `auth_time ${f.claims.auth_time} is not after ${a.auth_time}`);
    eq(f.claims.sub, a.sub, 'sub');
  });
  await test('prompt=consent is accepted (nothing to ask)', async () => {
    need(first, 'the first login');
    await codeFlow(basic, { browser: b, extra: { prompt: 'consent' }, expectPages: [] });
  });
  await test('prompt=none combined with another value gives invalid_request', async () => {
    const r = await authError(basic, { prompt: 'none login' }, { browser: b, user: null });
    expectAuthError(r, 'invalid_request');
  });
}

async function requestParameterChecks() {
  section('Other request parameters (Basic OP)');
  const { basic } = state.rps;
  await test('login_hint is accepted', async () => {
    await codeFlow(basic, { extra: { login_hint: USER1.username } });
  });
  await test('ui_locales=en gives an English login page (<html lang="en">)', async () => {
    const b = new Browser();
    const url = client.buildAuthorizationUrl(basic.config, {
      redirect_uri: basic.redirectUri, scope: 'openid', state: 's', nonce: 'n', ui_locales: 'en',
    });
    let r = await b.request(url.href);
    for (let i = 0; i < 5 && isRedirect(r.status); i++) r = await b.request(r.location);
    eq(r.status, 200, `login page status (${summary(r)})`);
    const lang = r.text.match(/<html\b[^>]*\blang\s*=\s*["']([^"']+)["']/i)?.[1];
    assert(lang && lang.toLowerCase().startsWith('en'), `<html lang> is ${show(lang ?? null)}`);
  });
  await test('display=popup is accepted (and ignored)', async () => {
    await codeFlow(basic, { extra: { display: 'popup' } });
  });
  await test('unknown request parameters are ignored', async () => {
    await codeFlow(basic, { extra: { foo_unknown: 'bar', x_nidan_test: '1' } });
  });
  await test('prompt=none with id_token_hint of the current session returns a code', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b });
    const f = await codeFlow(basic, { browser: b, user: null, expectPages: [], extra: { prompt: 'none', id_token_hint: g.tokens.id_token } });
    eq(f.claims.sub, g.claims.sub, 'sub');
  });
  await test('claims parameter: a userinfo claim asked for by name is released (scope openid only)', async () => {
    const claims = JSON.stringify({ userinfo: { name: { essential: true }, preferred_username: null } });
    const g = await codeFlow(basic, { scope: 'openid', extra: { claims } });
    const u = ok2(await userinfo(g.tokens.access_token), g.claims.sub);
    eq(u.name, USER1.claims.name, 'name');
    eq(u.preferred_username, USER1.username, 'preferred_username');
  });
  await test('claims parameter: an ID token claim asked for by name is in the ID token', async () => {
    const claims = JSON.stringify({ id_token: { name: null } });
    const g = await codeFlow(basic, { scope: 'openid', extra: { claims } });
    eq(g.claims.name, USER1.claims.name, 'name');
  });
  await test('claims parameter that is not JSON gives invalid_request', async () => {
    expectAuthError(await authError(basic, { claims: '{not json' }), 'invalid_request');
  });
}

async function maxAgeChecks() {
  section('max_age');
  const { basic } = state.rps;
  const b = new Browser();
  const first = await test('login for the max_age checks', () => codeFlow(basic, { browser: b }));
  await test('max_age larger than the session age: no page, same auth_time', async () => {
    const a = need(first, 'the login').claims;
    const f = await codeFlow(basic, { browser: b, maxAge: 3600, expectPages: [] });
    eq(f.claims.auth_time, a.auth_time, 'auth_time');
  });
  await test('max_age shorter than the session age: the student authenticates again', async () => {
    const a = need(first, 'the login').claims;
    await sleep(2200);
    const f = await codeFlow(basic, { browser: b, maxAge: 1 });
    assert(f.pages.length > 0, 'no login page was shown');
    assert(f.claims.auth_time > a.auth_time, `auth_time ${f.claims.auth_time} not after ${a.auth_time}`);
    assert(f.claims.auth_time >= now() - 10, `auth_time ${f.claims.auth_time} is not recent`);
  });
  await test('max_age=0 shows the full login page', async () => {
    need(first, 'the login');
    await sleep(1100);
    await codeFlow(basic, { browser: b, maxAge: 0, expectPages: ['login'] });
  });
}

async function acrChecks() {
  section('acr_values and the step-up');
  const { basic } = state.rps;
  const enrolled = () => {
    if (!state.enrolled) skip('the test student could not be enrolled (nidan user import failed)');
  };
  const b = new Browser();
  const low = await test('acr_values=urn:nidan:acr:password gives the password level', async () => {
    const f = await codeFlow(basic, { browser: b, extra: { acr_values: ACR_PASSWORD }, expectPages: ['login'] });
    eq(f.claims.acr, ACR_PASSWORD, 'acr');
    return f;
  });
  await test('prompt=none asking for the higher level from a password session gives login_required/interaction_required', async () => {
    need(low, 'a password-level session');
    const r = await authError(basic, { prompt: 'none', acr_values: ACR_SECOND }, { browser: b, user: null });
    expectAuthError(r, ['login_required', 'interaction_required']);
  });
  await test('acr_values=second-password on a password session shows only the step-up page', async () => {
    const l = need(low, 'a password-level session').claims;
    enrolled();
    await sleep(1100);
    const f = await codeFlow(basic, { browser: b, extra: { acr_values: ACR_SECOND }, expectPages: ['step-up'] });
    eq(f.claims.acr, ACR_SECOND, 'acr');
    assert(Array.isArray(f.claims.amr) && f.claims.amr.includes('pwd') && !f.claims.amr.includes('mfa'), `amr ${show(f.claims.amr)}`);
    assert(f.claims.auth_time > l.auth_time, `auth_time ${f.claims.auth_time} not after the step-up`);
    eq(f.claims.sid, l.sid, 'sid across the step-up');
    eq(f.claims.sub, l.sub, 'sub');
    await idTokenAllGood(f, { acr: ACR_SECOND });
  });
  await test('typing all three on the login page gives the second-password level directly', async () => {
    enrolled();
    const f = await codeFlow(basic, { extra: { acr_values: ACR_SECOND }, typeSecond: true, expectPages: ['login'] });
    eq(f.claims.acr, ACR_SECOND, 'acr');
    assert(!f.claims.amr?.includes('mfa'), `amr ${show(f.claims.amr)}`);
  });
  await test('an essential acr in the claims parameter triggers the step-up', async () => {
    enrolled();
    const b2 = new Browser();
    await codeFlow(basic, { browser: b2 });
    const claims = JSON.stringify({ id_token: { acr: { essential: true, values: [ACR_SECOND] } } });
    const f = await codeFlow(basic, { browser: b2, extra: { claims }, expectPages: ['step-up'] });
    eq(f.claims.acr, ACR_SECOND, 'acr');
  });
  await test('unknown acr_values are ignored, not an error', async () => {
    const f = await codeFlow(basic, { extra: { acr_values: 'urn:example:unknown-level' } });
    assert([ACR_PASSWORD, ACR_SECOND].includes(f.claims.acr), `acr ${show(f.claims.acr)}`);
  });
}

async function userinfoChecks() {
  section('UserInfo');
  const f = flows.basic;
  const at = () => need(f, 'the client_secret_basic flow').tokens.access_token;
  const sub = () => f.claims.sub;
  const ok = (r) => {
    assert(r.status === 200, `HTTP ${r.status} ${show(r.text)}`);
    assert(/^application\/json/i.test(r.headers.get('content-type') ?? ''), `content-type ${r.headers.get('content-type')}`);
    eq(r.json?.sub, sub(), 'sub');
    return r.json;
  };
  const info = await test('GET with the bearer token in the Authorization header', async () => ok(await userinfo(at(), 'header')));
  await test('POST with the token as a form parameter (RFC 6750 §2.2)', async () => ok(await userinfo(at(), 'form')));
  await test('POST with the bearer token in the Authorization header', async () => ok(await userinfo(at(), 'post-header')));
  await test('openid-client fetchUserInfo() with the expected sub', async () => {
    const u = await client.fetchUserInfo(need(f, 'the flow').rp.config, at(), sub());
    eq(u.sub, sub(), 'sub');
  });
  await test('profile scope: name, family_name, given_name, preferred_username = university user ID', async () => {
    const u = need(info, 'a userinfo response');
    eq(u.name, USER1.claims.name, 'name');
    eq(u.family_name, USER1.claims.family_name, 'family_name');
    eq(u.given_name, USER1.claims.given_name, 'given_name');
    eq(u.preferred_username, USER1.username, 'preferred_username');
  });
  await test('student scope: student_id and affiliation', async () => {
    const u = need(info, 'a userinfo response');
    eq(u.student_id, USER1.claims.student_id, 'student_id');
    eq(u.affiliation, USER1.claims.affiliation, 'affiliation');
  });
  await test('email scope: the registered email and email_verified', async () => {
    const u = need(info, 'a userinfo response');
    if (!state.enrolled) skip('the test student has no registered email (import failed)');
    eq(u.email, USER1.email, 'email');
    eq(u.email_verified, true, 'email_verified');
  });
  await test('scope openid only releases no profile, email or student claims', async () => {
    const g = await codeFlow(state.rps.basic, { scope: 'openid' });
    const u = ok2(await userinfo(g.tokens.access_token), g.claims.sub);
    for (const k of ['name', 'preferred_username', 'email', 'student_id', 'affiliation']) assert(!(k in u), `${k} released: ${show(u)}`);
  });
  await test('no token gives 401 with WWW-Authenticate: Bearer', async () => {
    const r = await http(state.meta.userinfo_endpoint);
    eq(r.status, 401, 'status');
    assert(/^bearer/i.test(r.headers.get('www-authenticate') ?? ''), `WWW-Authenticate ${show(r.headers.get('www-authenticate'))}`);
  });
  await test('an invalid token gives 401 with error="invalid_token"', async () => {
    const r = await userinfo('not-a-valid-token');
    eq(r.status, 401, 'status');
    assert(/invalid_token/.test(r.headers.get('www-authenticate') ?? ''), `WWW-Authenticate ${show(r.headers.get('www-authenticate'))}`);
  });
}
function ok2(r, sub) {
  assert(r.status === 200, `userinfo HTTP ${r.status} ${show(r.text)}`);
  eq(r.json?.sub, sub, 'sub');
  return r.json;
}

async function codeReuseChecks() {
  section('Authorization code reuse');
  const { basic } = state.rps;
  const f = await test('code flow (with offline_access) for the reuse checks', () =>
    codeFlow(basic, { scope: 'openid profile offline_access' }));
  const second = await test('a second use of the code gives invalid_grant', async () => {
    const g = need(f, 'the flow');
    const r = await rawToken(basic, { grant_type: 'authorization_code', code: g.callback.searchParams.get('code'), redirect_uri: basic.redirectUri });
    expectOAuthError(r, 400, 'invalid_grant');
    return true;
  });
  await test('  … and the access token from the first use is revoked', async () => {
    need(second, 'the reuse');
    await sleep(200);
    await expectDead(f.tokens.access_token, 'first access token');
  });
  await test('  … and the refresh token from the first use is revoked', async () => {
    need(second, 'the reuse');
    const rt = need(f.tokens.refresh_token, 'a refresh token from the first use');
    const r = await rawToken(basic, { grant_type: 'refresh_token', refresh_token: rt });
    expectOAuthError(r, 400, 'invalid_grant');
  });
}

async function refreshChecks() {
  section('Refresh tokens');
  const { basic, public: pub } = state.rps;
  const f = await test('offline_access gives a refresh token', async () => {
    const g = await codeFlow(basic, { scope: 'openid profile offline_access' });
    assert(typeof g.tokens.refresh_token === 'string' && g.tokens.refresh_token, 'no refresh_token');
    return g;
  });
  const r1 = await test('refresh with openid-client gives new tokens and a rotated refresh token', async () => {
    const g = need(f, 'a refresh token');
    basic.http.length = 0;
    const t = await client.refreshTokenGrant(basic.config, g.tokens.refresh_token);
    assert(t.access_token && t.access_token !== g.tokens.access_token, 'no new access token');
    assert(t.refresh_token && t.refresh_token !== g.tokens.refresh_token, `refresh token not rotated (${show(t.refresh_token)})`);
    noStore(basic.http.find((h) => h.url === state.meta.token_endpoint)?.headers, 'refresh response');
    return t;
  });
  await test('  … a refreshed ID token keeps iss, sub, aud, auth_time', async () => {
    const t = need(r1, 'a refresh');
    if (!t.id_token) skip('no ID token in the refresh response');
    const c = t.claims();
    const o = f.claims;
    eq(c.iss, o.iss, 'iss');
    eq(c.sub, o.sub, 'sub');
    assert((Array.isArray(c.aud) ? c.aud : [c.aud]).includes(basic.id), `aud ${show(c.aud)}`);
    eq(c.auth_time, o.auth_time, 'auth_time');
    await jose.jwtVerify(t.id_token, jwks(), { issuer: state.issuer, audience: basic.id, clockTolerance: 5 });
  });
  await test('  … the new access token works at userinfo', async () => {
    ok2(await userinfo(need(r1, 'a refresh').access_token), f.claims.sub);
  });
  const reuse = await test('reusing the rotated (old) refresh token gives invalid_grant', async () => {
    need(r1, 'a refresh');
    const r = await rawToken(basic, { grant_type: 'refresh_token', refresh_token: f.tokens.refresh_token });
    expectOAuthError(r, 400, 'invalid_grant');
    return true;
  });
  await test('  … and revokes the whole grant: the newest refresh token fails', async () => {
    need(reuse, 'the reuse');
    const r = await rawToken(basic, { grant_type: 'refresh_token', refresh_token: r1.refresh_token });
    expectOAuthError(r, 400, 'invalid_grant');
  });
  await test('  … and the newest access token is dead', async () => {
    need(reuse, 'the reuse');
    await expectDead(r1.access_token, 'newest access token');
  });
  await test('a refresh token is bound to its client (another client gets invalid_grant)', async () => {
    const g = await codeFlow(basic, { scope: 'openid offline_access' });
    const rt = need(g.tokens.refresh_token, 'a refresh token');
    const r = await rawToken(state.rps.post, { grant_type: 'refresh_token', refresh_token: rt });
    expectOAuthError(r, 400, 'invalid_grant');
  });
  await test('a refresh token issued without offline_access ends with the session (logout)', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b, scope: 'openid profile' });
    if (!g.tokens.refresh_token) return; // none issued: nothing outlives the session
    const r = await b.request(client.buildEndSessionUrl(basic.config, { id_token_hint: g.tokens.id_token }).href);
    assert(r.status < 400, `logout: HTTP ${r.status} ${summary(r)}`);
    expectOAuthError(await rawToken(basic, { grant_type: 'refresh_token', refresh_token: g.tokens.refresh_token }), 400, 'invalid_grant', 'refresh after logout');
  });
  await test('an offline_access refresh token survives the logout of the session', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b, scope: 'openid offline_access' });
    const rt = need(g.tokens.refresh_token, 'a refresh token');
    const r = await b.request(client.buildEndSessionUrl(basic.config, { id_token_hint: g.tokens.id_token }).href);
    assert(r.status < 400, `logout: HTTP ${r.status} ${summary(r)}`);
    const t = await rawToken(basic, { grant_type: 'refresh_token', refresh_token: rt });
    eq(t.status, 200, `refresh after logout (${show(t.json ?? t.text)})`);
  });
  await test('public client: refresh with PKCE-issued tokens and rotation', async () => {
    const g = await codeFlow(pub, { scope: 'openid offline_access' });
    const rt = need(g.tokens.refresh_token, 'a refresh token for the public client');
    const t = await client.refreshTokenGrant(pub.config, rt);
    assert(t.refresh_token && t.refresh_token !== rt, 'refresh token not rotated');
  });
}

async function revocationChecks() {
  section('Revocation (RFC 7009)');
  const { basic, post } = state.rps;
  const f = await test('code flow for the revocation checks', () => codeFlow(basic, { scope: 'openid offline_access' }));
  await test('another client cannot revoke this client\'s access token', async () => {
    const g = need(f, 'the flow');
    await rawAuthed(state.meta.revocation_endpoint, post, { token: g.tokens.access_token });
    ok2(await userinfo(g.tokens.access_token), g.claims.sub);
  });
  await test('revoking the access token: 200, then it fails at once', async () => {
    const g = need(f, 'the flow');
    await client.tokenRevocation(basic.config, g.tokens.access_token, { token_type_hint: 'access_token' });
    await expectDead(g.tokens.access_token, 'revoked access token');
  });
  await test('revoking the refresh token: then refresh gives invalid_grant', async () => {
    const g = need(f, 'the flow');
    const rt = need(g.tokens.refresh_token, 'a refresh token');
    await client.tokenRevocation(basic.config, rt, { token_type_hint: 'refresh_token' });
    const r = await rawToken(basic, { grant_type: 'refresh_token', refresh_token: rt });
    expectOAuthError(r, 400, 'invalid_grant');
  });
  await test('revoking an unknown token answers 200', async () => {
    const r = await rawAuthed(state.meta.revocation_endpoint, basic, { token: 'no-such-token' });
    eq(r.status, 200, `status (${show(r.text)})`);
  });
  await test('revocation without client authentication gives 401 invalid_client', async () => {
    const r = await http(state.meta.revocation_endpoint, { method: 'POST', form: { token: 'x', client_id: basic.id } });
    expectInvalidClient(r);
  });
}

async function introspectionChecks() {
  section('Introspection (RFC 7662)');
  const { basic, post, public: pub } = state.rps;
  const f = await test('code flow for the introspection checks', () => codeFlow(basic, { scope: 'openid profile' }));
  await test('an active access token: active, client_id, sub, scope, exp, acr, auth_time', async () => {
    const g = need(f, 'the flow');
    const i = await introspect(g.tokens.access_token);
    eq(i.active, true, 'active');
    eq(i.client_id, basic.id, 'client_id');
    eq(i.sub, g.claims.sub, 'sub');
    assert(typeof i.scope === 'string' && i.scope.split(' ').includes('openid'), `scope ${show(i.scope)}`);
    assert(Number.isInteger(i.exp) && i.exp > now(), `exp ${show(i.exp)}`);
    eq(i.acr, g.claims.acr, 'acr');
    eq(i.auth_time, g.claims.auth_time, 'auth_time');
  });
  await test('openid-client tokenIntrospection() works', async () => {
    const g = need(f, 'the flow');
    const i = await client.tokenIntrospection(basic.config, g.tokens.access_token);
    eq(i.active, true, 'active');
  });
  await test('another authenticated confidential client may introspect', async () => {
    const g = need(f, 'the flow');
    const i = await introspect(g.tokens.access_token, post);
    eq(i.active, true, 'active');
  });
  await test('an unknown token is {"active": false}', async () => {
    const i = await introspect('no-such-token');
    eq(i.active, false, 'active');
  });
  await test('a public client may not introspect', async () => {
    const g = need(f, 'the flow');
    const r = await http(state.meta.introspection_endpoint, { method: 'POST', form: { token: g.tokens.access_token, client_id: pub.id } });
    assert(r.status === 401 || r.status === 403, `HTTP ${r.status} ${show(r.text)}`);
    assert(r.json?.active !== true, 'token details released to a public client');
  });
  await test('introspection without client authentication gives 401 invalid_client', async () => {
    const g = need(f, 'the flow');
    expectInvalidClient(await http(state.meta.introspection_endpoint, { method: 'POST', form: { token: g.tokens.access_token } }));
  });
}

async function clientCredentialsChecks() {
  section('Client credentials');
  const { basic, post } = state.rps;
  const cc = await test('client_credentials without scope returns an access token only', async () => {
    basic.http.length = 0;
    const t = await client.clientCredentialsGrant(basic.config);
    assert(t.access_token, 'no access_token');
    eq(String(t.token_type).toLowerCase(), 'bearer', 'token_type');
    eq(t.id_token, undefined, 'id_token');
    eq(t.refresh_token, undefined, 'refresh_token');
    noStore(basic.http.find((h) => h.url === state.meta.token_endpoint)?.headers, 'token response');
    return t;
  });
  await test('  … the token introspects as active for the client', async () => {
    const i = await introspect(need(cc, 'a client_credentials token').access_token);
    eq(i.active, true, 'active');
    eq(i.client_id, basic.id, 'client_id');
  });
  await test('a scope outside the client\'s scopes gives invalid_scope', async () => {
    expectOAuthError(await rawToken(basic, { grant_type: 'client_credentials', scope: 'no-such-scope' }), 400, 'invalid_scope');
  });
  await test('a client not registered for client_credentials gets unauthorized_client', async () => {
    expectOAuthError(await rawToken(post, { grant_type: 'client_credentials' }), 400, 'unauthorized_client');
  });
}

async function authRequestErrorChecks() {
  section('Authorization request errors');
  const { basic, public: pub } = state.rps;
  await test('request parameter gives request_not_supported', async () => {
    const jwt = `${b64u(JSON.stringify({ alg: 'none' }))}.${b64u(JSON.stringify({ iss: basic.id, aud: state.issuer }))}.`;
    expectAuthError(await authError(basic, { request: jwt }), 'request_not_supported');
  });
  await test('request_uri parameter gives request_uri_not_supported', async () => {
    expectAuthError(await authError(basic, { request_uri: 'urn:example:request:1' }), 'request_uri_not_supported');
  });
  const errorPage = async (params, what) => {
    const b = new Browser();
    const r = await b.request(authUrl({ response_type: 'code', scope: 'openid', state: 'st', ...params }));
    assert(!isRedirect(r.status), `${what}: redirected (HTTP ${r.status}) to ${r.location}`);
    assert(r.status >= 400 && r.status < 500, `${what}: HTTP ${r.status}, expected a 4xx error page`);
    assert(/text\/html/i.test(r.headers.get('content-type') ?? ''), `${what}: content-type ${r.headers.get('content-type')}`);
  };
  await test('unregistered redirect_uri gives an error page, not a redirect', () =>
    errorPage({ client_id: basic.id, redirect_uri: 'http://127.0.0.1:9/evil/cb' }, 'unregistered redirect_uri'));
  await test('redirect_uri differing only in the query gives an error page', () =>
    errorPage({ client_id: basic.id, redirect_uri: `${basic.redirectUri}?x=2` }, 'redirect_uri with another query'));
  await test('redirect_uri with a trailing slash added gives an error page', () =>
    errorPage({ client_id: basic.id, redirect_uri: `${basic.redirectUri}/` }, 'redirect_uri with extra slash'));
  await test('missing redirect_uri gives an error page', () => errorPage({ client_id: basic.id }, 'no redirect_uri'));
  await test('unknown client_id gives an error page', () =>
    errorPage({ client_id: 'no-such-client', redirect_uri: basic.redirectUri }, 'unknown client'));
  await test('a registered redirect_uri with a query matches exactly and keeps its query', async () => {
    const st = client.randomState();
    const url = authUrl({ client_id: basic.id, response_type: 'code', redirect_uri: basic.redirectUriQ, scope: 'openid', state: st, nonce: 'n1' });
    const r = await authorize(new Browser(), url, basic.redirectUriQ, USER1);
    const p = r.callback.searchParams;
    eq(p.get('x'), '1', 'the registered query parameter');
    assert(p.get('code'), `no code: ${r.callback.href}`);
    const t = await rawToken(basic, { grant_type: 'authorization_code', code: p.get('code'), redirect_uri: basic.redirectUriQ });
    eq(t.status, 200, `token exchange status (${show(t.json ?? t.text)})`);
  });
  await test('response_type=token gives unsupported_response_type', async () => {
    expectAuthError(await authError(basic, { response_type: 'token' }), 'unsupported_response_type');
  });
  await test('missing response_type gives invalid_request', async () => {
    expectAuthError(await authError(basic, { response_type: undefined }), 'invalid_request');
  });
  await test('a scope outside the client\'s scopes gives invalid_scope', async () => {
    expectAuthError(await authError(basic, { scope: 'openid no-such-scope' }), 'invalid_scope');
  });
  await test('public client without code_challenge gives invalid_request', async () => {
    expectAuthError(await authError(pub, {}), 'invalid_request');
  });
  await test('code_challenge_method=plain gives invalid_request', async () => {
    const v = client.randomPKCECodeVerifier();
    expectAuthError(await authError(pub, { code_challenge: v, code_challenge_method: 'plain' }), 'invalid_request');
  });
  await test('POST to the authorization endpoint works like GET', async () => {
    const b = new Browser();
    const st = client.randomState();
    const form = { client_id: basic.id, response_type: 'code', redirect_uri: basic.redirectUri, scope: 'openid', state: st, nonce: 'n' };
    const r = await b.request(state.meta.authorization_endpoint, { method: 'POST', form });
    assert(isRedirect(r.status) && r.location, `HTTP ${r.status}: ${summary(r)}`);
    const done = await authorize(b, r.location, basic.redirectUri, USER1);
    assert(done.callback.searchParams.get('code'), `no code: ${done.callback.href}`);
    eq(done.callback.searchParams.get('state'), st, 'state');
  });
}

async function logoutChecks() {
  section('RP-initiated logout');
  const { basic } = state.rps;
  const sessionGone = async (b) => {
    const r = await authError(basic, { prompt: 'none' }, { browser: b, user: null });
    expectAuthError(r, 'login_required');
  };
  const logoutRedirect = (r, rp, st) => {
    assert(isRedirect(r.status), `HTTP ${r.status}: ${summary(r)}`);
    const loc = new URL(r.location);
    eq(`${loc.origin}${loc.pathname}`, rp.postLogout, 'redirect target');
    eq(loc.searchParams.get('state'), st, 'state');
  };

  const b1 = new Browser();
  const f1 = await test('login for the logout checks', () => codeFlow(basic, { browser: b1 }));
  const out = await test('id_token_hint + registered post_logout_redirect_uri + state: redirect with state, no page', async () => {
    const g = need(f1, 'a login');
    const st = client.randomState();
    const url = client.buildEndSessionUrl(basic.config, { id_token_hint: g.tokens.id_token, post_logout_redirect_uri: basic.postLogout, state: st });
    logoutRedirect(await b1.request(url.href), basic, st);
    return true;
  });
  await test('  … the session has ended (prompt=none gives login_required)', async () => {
    need(out, 'the logout');
    await sessionGone(b1);
  });
  await test('logout by POST (form) with id_token_hint also redirects with state', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b });
    const st = client.randomState();
    const r = await b.request(state.meta.end_session_endpoint, {
      method: 'POST',
      form: { id_token_hint: g.tokens.id_token, post_logout_redirect_uri: basic.postLogout, state: st, client_id: basic.id },
    });
    logoutRedirect(r, basic, st);
    await sessionGone(b);
  });

  await test('unregistered post_logout_redirect_uri is refused (no redirect there)', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b });
    const evil = 'http://127.0.0.1:9/evil/logged-out';
    const url = client.buildEndSessionUrl(basic.config, { id_token_hint: g.tokens.id_token, post_logout_redirect_uri: evil, state: 'x' });
    const r = await b.request(url.href);
    if (isRedirect(r.status)) {
      assert(!r.location.startsWith(evil), `redirected to the unregistered URI: ${r.location}`);
      assert(new URL(r.location).origin === new URL(state.issuer).origin, `redirected to ${r.location}`);
    } else {
      assert(r.status === 200 || (r.status >= 400 && r.status < 500), `HTTP ${r.status}`);
    }
  });

  await test('id_token_hint + registered post_logout_redirect_uri without state: redirect without state', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b });
    const r = await b.request(client.buildEndSessionUrl(basic.config, { id_token_hint: g.tokens.id_token, post_logout_redirect_uri: basic.postLogout }).href);
    assert(isRedirect(r.status), `HTTP ${r.status}: ${summary(r)}`);
    eq(r.location, basic.postLogout, 'redirect target');
    await sessionGone(b);
  });

  await test('id_token_hint without post_logout_redirect_uri: logged out, a page without a form', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b });
    const r = await b.request(client.buildEndSessionUrl(basic.config, { id_token_hint: g.tokens.id_token, state: 'ignored' }).href);
    if (isRedirect(r.status)) {
      assert(new URL(r.location).origin === new URL(state.issuer).origin, `redirected off-site to ${r.location}`);
    } else {
      eq(r.status, 200, `status (${summary(r)})`);
      assert(!parseForms(r.text, r.url).some((fm) => fm.method === 'POST' && 'csrf' in fm.hidden), 'a confirmation form was shown although the hint is valid');
    }
    await sessionGone(b);
  });

  await test('post_logout_redirect_uri with a query added is not redirected to', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b });
    const r = await b.request(
      client.buildEndSessionUrl(basic.config, { id_token_hint: g.tokens.id_token, post_logout_redirect_uri: `${basic.postLogout}?extra=1`, state: 'x' }).href,
    );
    assert(!(isRedirect(r.status) && r.location?.startsWith(basic.postLogout)), `redirected to ${r.location}`);
  });

  await test('post_logout_redirect_uri without id_token_hint: no redirect before the student confirms', async () => {
    const b = new Browser();
    await codeFlow(basic, { browser: b });
    const u = new URL(state.meta.end_session_endpoint);
    u.searchParams.set('post_logout_redirect_uri', basic.postLogout);
    u.searchParams.set('client_id', basic.id);
    u.searchParams.set('state', 'x');
    const r = await b.request(u.href);
    assert(!(isRedirect(r.status) && r.location?.startsWith(basic.postLogout)), `redirected to the RP without confirmation: ${r.location}`);
    await codeFlow(basic, { browser: b, extra: { prompt: 'none' }, user: null, expectPages: [] });
  });

  await test('without id_token_hint: a confirmation page (POST form with csrf), then logged out', async () => {
    const b = new Browser();
    await codeFlow(basic, { browser: b });
    const r = await b.request(state.meta.end_session_endpoint);
    eq(r.status, 200, `status (${summary(r)})`);
    const form = parseForms(r.text, r.url).find((fm) => fm.method === 'POST' && 'csrf' in fm.hidden);
    assert(form, 'no POST form with a csrf field');
    const done = await b.request(form.action, { method: 'POST', form: { ...form.hidden, ...form.submit } });
    assert(done.status === 200 || isRedirect(done.status), `confirmation POST: HTTP ${done.status} ${summary(done)}`);
    if (done.location) assert(new URL(done.location).origin === new URL(state.issuer).origin || done.location.startsWith(basic.postLogout), `redirected to ${done.location}`);
    await sessionGone(b);
  });

  await test('an id_token_hint with a bad signature: no silent logout, the confirmation page instead', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b });
    const [h, p, s] = g.tokens.id_token.split('.');
    const sig = Buffer.from(s, 'base64url');
    sig[0] ^= 0xff;
    const forged = `${h}.${p}.${b64u(sig)}`;
    const url = client.buildEndSessionUrl(basic.config, { id_token_hint: forged, post_logout_redirect_uri: basic.postLogout, state: 'x' });
    const r = await b.request(url.href);
    assert(!(isRedirect(r.status) && r.location?.startsWith(basic.postLogout)), `redirected to the RP: ${r.location}`);
    // PRODUCT.md: "without a valid hint it asks the student to confirm"
    eq(r.status, 200, `status (${summary(r)})`);
    assert(parseForms(r.text, r.url).some((fm) => fm.method === 'POST' && 'csrf' in fm.hidden), 'no confirmation form (POST with csrf)');
    // the session must still be there (nothing confirmed)
    await codeFlow(basic, { browser: b, extra: { prompt: 'none' }, user: null, expectPages: [] });
  });

  await test('logout ends the session for every client of the browser', async () => {
    const b = new Browser();
    const g = await codeFlow(basic, { browser: b });
    await codeFlow(state.rps.post, { browser: b, expectPages: [] });
    const st = client.randomState();
    const r = await b.request(
      client.buildEndSessionUrl(basic.config, { id_token_hint: g.tokens.id_token, post_logout_redirect_uri: basic.postLogout, state: st }).href,
    );
    logoutRedirect(r, basic, st);
    const e = await authError(state.rps.post, { prompt: 'none' }, { browser: b, user: null });
    expectAuthError(e, 'login_required');
  });
}

// ---------------------------------------------------------------------------
// Back-channel logout (OpenID Connect Back-Channel Logout 1.0)
// ---------------------------------------------------------------------------

const BCL_EVENT = 'http://schemas.openid.net/event/backchannel-logout';

function decodeDelivery(entry) {
  const params = new URLSearchParams(entry.body);
  const token = params.get('logout_token');
  let header = null;
  let claims = null;
  try {
    header = jose.decodeProtectedHeader(token);
    claims = jose.decodeJwt(token);
  } catch {
    /* reported by the checks */
  }
  return { params, token, header, claims };
}

/**
 * Named checks of one delivered logout token; each returns a problem string or null.
 * ctx: { rp, sid, sub, after (ms: the logout was sent after this) }.
 */
function logoutTokenChecks(entry, ctx) {
  const d = decodeDelivery(entry);
  const h = d.header ?? {};
  const c = d.claims ?? {};
  const t = now();
  return {
    [`POSTed to the registered URI exactly as registered, query included (${new URL(ctx.rp.backchannelUri).pathname}${new URL(ctx.rp.backchannelUri).search})`]: () =>
      entry.method === 'POST' && entry.url === ctx.rp.backchannelUri ? null : `${entry.method} ${entry.url}`,
    'body is application/x-www-form-urlencoded with logout_token as its only parameter (§2.5)': () => {
      const ct = entry.headers['content-type'] ?? '';
      if (!/^application\/x-www-form-urlencoded\b/i.test(ct)) return `content-type ${show(ct)}`;
      const keys = [...d.params.keys()];
      return keys.length === 1 && keys[0] === 'logout_token' && d.token ? null : `parameters ${show(keys)}`;
    },
    'a JWT whose header typ is "logout+jwt"': () => {
      if (!d.header) return `not a JWT: ${show(d.token)}`;
      return h.typ === 'logout+jwt' ? null : `typ ${show(h.typ)}`;
    },
    [`signed with the client's algorithm (${ctx.rp.alg}) by a key from jwks_uri (§2.4)`]: async () => {
      if (h.alg !== ctx.rp.alg) return `alg ${show(h.alg)}, expected ${ctx.rp.alg}`;
      if (!h.kid) return 'no kid in the header';
      await jose.jwtVerify(d.token, jwks(), {
        algorithms: [h.alg],
        typ: 'logout+jwt',
        issuer: state.issuer,
        audience: ctx.rp.id,
        clockTolerance: 5,
      });
      return null;
    },
    'iss is the issuer': () => (c.iss === state.issuer ? null : `iss ${show(c.iss)}`),
    'aud is the client_id': () => {
      const aud = Array.isArray(c.aud) ? c.aud : [c.aud];
      return aud.includes(ctx.rp.id) ? null : `aud ${show(c.aud)}`;
    },
    'iat is the time of the logout': () =>
      Number.isInteger(c.iat) && c.iat >= Math.floor(ctx.after / 1000) - 5 && c.iat <= t + 5 ? null : `iat ${show(c.iat)}, now ${t}`,
    'exp is after iat and at most 2 minutes after it': () =>
      Number.isInteger(c.exp) && c.exp > c.iat && c.exp - c.iat <= 120 ? null : `iat ${show(c.iat)}, exp ${show(c.exp)}`,
    'jti is present': () => (typeof c.jti === 'string' && c.jti.length > 0 ? null : `jti ${show(c.jti)}`),
    'sid is the sid of the ID token (backchannel_logout_session_required)': () => (c.sid === ctx.sid ? null : `sid ${show(c.sid)}, ID token sid ${show(ctx.sid)}`),
    'sub is the sub of the ID token': () => (c.sub === ctx.sub ? null : `sub ${show(c.sub)}, ID token sub ${show(ctx.sub)}`),
    'events holds exactly the back-channel logout event, as an empty object': () => {
      const e = c.events;
      if (!e || typeof e !== 'object' || Array.isArray(e)) return `events ${show(e)}`;
      const keys = Object.keys(e);
      if (keys.length !== 1 || keys[0] !== BCL_EVENT) return `events ${show(e)}`;
      const v = e[BCL_EVENT];
      return v && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length === 0 ? null : `events ${show(e)}`;
    },
    'no nonce (§2.4: a logout token must not contain one)': () => ('nonce' in c ? `nonce ${show(c.nonce)}` : null),
  };
}
async function logoutTokenTests(prefix, entry, ctx) {
  for (const [name, check] of Object.entries(logoutTokenChecks(entry, ctx))) {
    await test(`${prefix}${name}`, async () => {
      const p = await check();
      if (p) throw new Error(p);
    });
  }
}
async function logoutTokenAllGood(entry, ctx) {
  const problems = [];
  for (const [name, check] of Object.entries(logoutTokenChecks(entry, ctx))) {
    try {
      const p = await check();
      if (p) problems.push(`${name}: ${p}`);
    } catch (e) {
      problems.push(`${name}: ${describeError(e)}`);
    }
  }
  if (problems.length) throw new Error(problems.join('; '));
}
const jtiOf = (entry) => decodeDelivery(entry).claims?.jti;

async function backchannelChecks() {
  section('Back-channel logout OP');
  const { bc, bcRetry, bcSlow } = state.rps;
  const endSession = (b, rp, idToken, st) =>
    b.request(client.buildEndSessionUrl(rp.config, { id_token_hint: idToken, post_logout_redirect_uri: rp.postLogout, state: st }).href);
  const redirectedBack = (r, rp, st) => {
    assert(isRedirect(r.status), `logout answered HTTP ${r.status}: ${summary(r)}`);
    const loc = new URL(r.location);
    eq(`${loc.origin}${loc.pathname}`, rp.postLogout, 'redirect target');
    eq(loc.searchParams.get('state'), st, 'state');
  };
  const sessionGone = async (b, rp) => expectAuthError(await authError(rp, { prompt: 'none' }, { browser: b, user: null }), 'login_required');
  await test('discovery: backchannel_logout_supported and backchannel_logout_session_supported are true', async () => {
    eq(state.meta.backchannel_logout_supported, true, 'backchannel_logout_supported');
    eq(state.meta.backchannel_logout_session_supported, true, 'backchannel_logout_session_supported');
  });

  // A receiver that refuses first: started early so that its retry runs while the rest is checked.
  receiver.plans.set('/bc-retry', [{ status: 500 }]);
  const retry = await test('rp-bc-retry (ES256, receiver answers 500 at first): login, then RP-initiated logout completes', async () => {
    const b = new Browser();
    const f = await codeFlow(bcRetry, { browser: b });
    const st = client.randomState();
    const sent = Date.now();
    redirectedBack(await endSession(b, bcRetry, f.tokens.id_token, st), bcRetry, st);
    const got = deliveries('/bc-retry');
    assert(got.length === 1 && got[0].answered === 500, `receiver saw ${got.length} deliveries before the answer`);
    return { f, sent };
  });

  // A receiver that does not answer: nidan's 2-second timeout must bound the logout.
  receiver.plans.set('/bc-slow', [{ status: 200, delay: 6000 }]);
  const slow = await test('a receiver that does not answer holds the logout at most about 2 s (the delivery timeout)', async () => {
    const b = new Browser();
    const f = await codeFlow(bcSlow, { browser: b });
    const st = client.randomState();
    const t0 = Date.now();
    const r = await endSession(b, bcSlow, f.tokens.id_token, st);
    const took = Date.now() - t0;
    redirectedBack(r, bcSlow, st);
    eq(deliveries('/bc-slow').length, 1, 'deliveries to the slow receiver');
    assert(took < 4000, `the logout took ${took} ms (receiver answers after 6000 ms; PRODUCT.md: 2 s timeout each)`);
    return { f, sent: t0 };
  });

  // The plain case: rp-bc, RP-initiated logout with id_token_hint.
  const b1 = new Browser();
  const f1 = await test('rp-bc: login; the ID token carries sid', async () => {
    const f = await codeFlow(bc, { browser: b1 });
    assert(typeof f.claims.sid === 'string' && f.claims.sid, `sid ${show(f.claims.sid)}`);
    return f;
  });
  let sentAt = 0;
  const out = await test('RP-initiated logout with id_token_hint: redirect to post_logout_redirect_uri with state', async () => {
    const f = need(f1, 'the rp-bc login');
    const st = client.randomState();
    sentAt = Date.now();
    redirectedBack(await endSession(b1, bc, f.tokens.id_token, st), bc, st);
    return true;
  });
  const first = await test('  … exactly one logout token was POSTed to rp-bc, before the logout answered', async () => {
    need(out, 'the logout');
    const got = deliveries('/bc');
    eq(got.length, 1, 'deliveries to rp-bc');
    return got[0];
  });
  if (first) await logoutTokenTests('  … logout token: ', first, { rp: bc, sid: f1.claims.sid, sub: f1.claims.sub, after: sentAt });
  else await test('  … logout token checks', async () => skip('needs the delivered token'));
  await test('  … the session has ended (prompt=none gives login_required)', async () => {
    need(out, 'the logout');
    await sessionGone(b1, bc);
  });
  await test('  … a second logout request without a session sends no further token', async () => {
    need(first, 'the first delivery');
    const r = await endSession(b1, bc, f1.tokens.id_token, 'again');
    assert(r.status < 500, `HTTP ${r.status}`);
    eq(deliveries('/bc').length, 1, 'deliveries to rp-bc');
  });

  // The menu's logout button (POST with csrf from /account).
  const b2 = new Browser();
  const menu = await test('menu logout: after a login with the second password, /account shows the menu with a logout form (POST, csrf)', async () => {
    if (!state.enrolled) skip('the test student could not be enrolled');
    const f = await codeFlow(bc, { browser: b2, typeSecond: true, expectPages: ['login'] });
    eq(f.claims.acr, ACR_SECOND, 'acr');
    const page = await b2.request(`${state.issuer}/account`);
    eq(page.status, 200, `/account status (${summary(page)})`);
    const form = parseForms(page.text, page.url).find((fm) => new URL(fm.action).pathname === '/logout' && fm.method === 'POST' && 'csrf' in fm.hidden);
    assert(form, 'no POST form to /logout with a csrf field on /account');
    return { f, form };
  });
  const menuOut = await test('  … posting it ends the session and answers without an error', async () => {
    const { form } = need(menu, 'the menu page');
    const before = deliveries('/bc').length;
    const t0 = Date.now();
    const r = await b2.request(form.action, { method: 'POST', form: { ...form.hidden, ...form.submit } });
    assert(r.status === 200 || isRedirect(r.status), `HTTP ${r.status}: ${summary(r)}`);
    if (r.location) assert(new URL(r.location).origin === new URL(state.issuer).origin, `redirected off-site to ${r.location}`);
    await sessionGone(b2, bc);
    return { before, t0 };
  });
  await test('  … and delivered one logout token for that session before answering (sid, sub, signature, claims)', async () => {
    const { before, t0 } = need(menuOut, 'the menu logout');
    const got = deliveries('/bc');
    eq(got.length, before + 1, 'deliveries to rp-bc');
    const entry = got[got.length - 1];
    await logoutTokenAllGood(entry, { rp: bc, sid: menu.f.claims.sid, sub: menu.f.claims.sub, after: t0 });
    assert(jtiOf(entry) !== jtiOf(got[0]), 'jti repeated from the earlier logout token');
  });

  // Another student signing in on the same browser logs the first one out everywhere.
  const b3 = new Browser();
  const other = await test('another student signing in on the same browser: the first student\'s session is notified (sid, sub)', async () => {
    const f = await codeFlow(bc, { browser: b3 });
    const before = deliveries('/bc').length;
    const t0 = Date.now();
    const g = await codeFlow(bc, { browser: b3, user: USER2, extra: { prompt: 'login' }, expectPages: ['login'] });
    const got = deliveries('/bc');
    eq(got.length, before + 1, 'deliveries to rp-bc');
    await logoutTokenAllGood(got[got.length - 1], { rp: bc, sid: f.claims.sid, sub: f.claims.sub, after: t0 });
    return { f, g };
  });
  await test('  … and the new student gets another sid', async () => {
    const { f, g } = need(other, 'the second sign-in');
    assert(g.claims.sid !== f.claims.sid, `same sid ${show(f.claims.sid)} for two students`);
    assert(g.claims.sub !== f.claims.sub, 'same sub for two students');
  });

  // Back to the retries.
  const retried = await test('the delivery refused with 500 is retried from the outbox within a few seconds, with a freshly signed token (new jti)', async () => {
    const { f, sent } = need(retry, 'the refused delivery');
    const got = await waitForDeliveries('/bc-retry', 2, 10_000);
    assert(got.length >= 2, `no retry within ${Math.round((Date.now() - sent) / 1000)} s of the logout`);
    const [a, b] = got;
    assert(jtiOf(a) && jtiOf(b) && jtiOf(a) !== jtiOf(b), `jti ${show(jtiOf(a))} then ${show(jtiOf(b))}`);
    await logoutTokenAllGood(b, { rp: bcRetry, sid: f.claims.sid, sub: f.claims.sub, after: sent });
    assert(decodeDelivery(b).claims.iat >= decodeDelivery(a).claims.iat, 'the retried token is older than the first');
    return b;
  });
  await test('  … the refused first token was a valid logout token too (ES256)', async () => {
    const { f, sent } = need(retry, 'the refused delivery');
    await logoutTokenAllGood(deliveries('/bc-retry')[0], { rp: bcRetry, sid: f.claims.sid, sub: f.claims.sub, after: sent });
  });
  await test('the delivery that timed out is retried with a freshly signed token (new jti)', async () => {
    const { f, sent } = need(slow, 'the timed-out delivery');
    const got = await waitForDeliveries('/bc-slow', 2, 10_000);
    assert(got.length >= 2, 'no retry after the timeout');
    assert(jtiOf(got[0]) !== jtiOf(got[1]), 'jti repeated');
    await logoutTokenAllGood(got[1], { rp: bcSlow, sid: f.claims.sid, sub: f.claims.sub, after: sent });
  });
  await test('a delivery answered 200 is not sent again; each receiver got only its own sessions\' tokens', async () => {
    const b = need(retried, 'the retried delivery');
    const wait = b.at + 2500 - Date.now(); // the next retry would have been due 2 s after the second attempt
    if (wait > 0) await sleep(wait);
    eq(deliveries('/bc-retry').length, 2, 'deliveries to rp-bc-retry');
    eq(deliveries('/bc').length, 3, 'deliveries to rp-bc (RP-initiated, menu, another student)');
    const stray = receiver.requests.filter((r) => !['/bc', '/bc-retry', '/bc-slow'].includes(r.path));
    eq(stray.length, 0, 'requests to unregistered paths');
  });
}

// ---------------------------------------------------------------------------
// RFC 9207: iss in every authorization response
// ---------------------------------------------------------------------------

async function issChecks() {
  section('RFC 9207 authorization response iss');
  const { basic } = state.rps;
  await test('discovery: authorization_response_iss_parameter_supported is true', async () =>
    eq(state.meta.authorization_response_iss_parameter_supported, true, 'authorization_response_iss_parameter_supported'));
  await test('success response: iss exactly once, equal to the issuer', async () => {
    const f = await codeFlow(basic);
    eq(show(f.callback.searchParams.getAll('iss')), show([state.issuer]), 'iss values');
  });
  await test('error response (prompt=none without a session → login_required): iss exactly once', async () => {
    const r = await authError(basic, { prompt: 'none' }, { user: null });
    expectAuthError(r, 'login_required');
    eq(show(r.params.getAll('iss')), show([state.issuer]), 'iss values');
  });
  await test('error response (invalid_scope): iss exactly once', async () => {
    const r = await authError(basic, { scope: 'openid no-such-scope' });
    expectAuthError(r, 'invalid_scope');
    eq(show(r.params.getAll('iss')), show([state.issuer]), 'iss values');
  });
  await test('error response from a registered redirect URI with a query keeps the query and adds iss', async () => {
    const st = client.randomState();
    const url = authUrl({ client_id: basic.id, response_type: 'code', redirect_uri: basic.redirectUriQ, scope: 'openid', state: st, prompt: 'none' });
    const r = await authorize(new Browser(), url, basic.redirectUriQ, null);
    const p = r.callback.searchParams;
    eq(p.get('x'), '1', 'the registered query parameter');
    eq(p.get('error'), 'login_required', 'error');
    eq(p.get('iss'), state.issuer, 'iss');
  });
  // openid-client checks iss because discovery says it is supported: prove that the check is real.
  const fresh = async () => {
    const st = client.randomState();
    const nonce = client.randomNonce();
    const url = client.buildAuthorizationUrl(basic.config, { redirect_uri: basic.redirectUri, scope: 'openid', state: st, nonce });
    const r = await authorize(new Browser(), url.href, basic.redirectUri, USER1);
    return { cb: r.callback, st, nonce };
  };
  await test('openid-client refuses the response with iss removed, and with another iss (the RP-side check is real)', async () => {
    const { cb, st, nonce } = await fresh();
    for (const [what, mutate] of [
      ['iss removed', (u) => u.searchParams.delete('iss')],
      ['another iss', (u) => u.searchParams.set('iss', 'http://127.0.0.1:9/other')],
    ]) {
      const u = new URL(cb);
      mutate(u);
      let refused = false;
      try {
        await client.authorizationCodeGrant(basic.config, u, { expectedState: st, expectedNonce: nonce });
      } catch {
        refused = true;
      }
      assert(refused, `openid-client accepted the response with ${what}`);
    }
    const t = await client.authorizationCodeGrant(basic.config, cb, { expectedState: st, expectedNonce: nonce });
    assert(t.id_token, 'the untouched response did not work');
  });
}

// ---------------------------------------------------------------------------
// RFC 9470 step-up: acr_values, max_age, essential acr, introspection
// ---------------------------------------------------------------------------

async function stepUpChecks() {
  section('RFC 9470 step-up (acr_values, max_age, introspection)');
  const { basic } = state.rps;
  const enrolled = () => {
    if (!state.enrolled) skip('the test student could not be enrolled (nidan user import failed)');
  };
  const introspectMatches = async (f) => {
    const i = await introspect(f.tokens.access_token);
    eq(i.active, true, 'active');
    eq(i.acr, f.claims.acr, 'introspection acr');
    eq(i.auth_time, f.claims.auth_time, 'introspection auth_time');
  };

  // A password-level session, then the step-up page by hand.
  const bA = new Browser();
  const low = await test('a client without min_acr, empty second password: acr urn:nidan:acr:password', async () => {
    const f = await codeFlow(basic, { browser: bA, expectPages: ['login'] });
    eq(f.claims.acr, ACR_PASSWORD, 'acr');
    return f;
  });
  await test('  … introspection returns the same acr and auth_time as the ID token', async () => introspectMatches(need(low, 'the login')));
  const stepUpReq = await test('acr_values=second-password on that session: 303 to /login/step-up (not the full login page)', async () => {
    need(low, 'the password-level session');
    enrolled();
    await sleep(1100); // a newer auth_time must be visible
    const st = client.randomState();
    const nonce = client.randomNonce();
    const url = client.buildAuthorizationUrl(basic.config, { redirect_uri: basic.redirectUri, scope: 'openid profile', state: st, nonce, acr_values: ACR_SECOND });
    const r = await bA.request(url.href);
    assert(isRedirect(r.status) && r.location, `HTTP ${r.status}: ${summary(r)}`);
    eq(new URL(r.location).pathname, '/login/step-up', 'redirect target');
    const page = await bA.request(r.location);
    eq(page.status, 200, `step-up page status (${summary(page)})`);
    return { page, st, nonce };
  });
  await test('  … the step-up page asks only for the second password: one form, second_password + csrf/tx, no username or password field (not even hidden)', async () => {
    const { page } = need(stepUpReq, 'the step-up page');
    const forms = parseForms(page.text, page.url).filter((fm) => fm.method === 'POST' && new URL(fm.action).pathname.startsWith('/login'));
    eq(forms.length, 1, 'login forms on the page');
    const form = forms[0];
    eq(new URL(form.action).pathname, '/login/step-up', 'form action');
    assert(form.names.has('second_password') && 'csrf' in form.hidden && 'tx' in form.hidden, `fields ${show([...form.names])}`);
    const extra = [...form.names].filter((n) => !['second_password', 'csrf', 'tx', 'lang'].includes(n));
    eq(show(extra), '[]', 'other fields');
    assert(!/\bname\s*=\s*["']?(username|password)["'\s>]/i.test(page.text), 'a username or password field is on the step-up page');
    const input = page.text.match(/<input\b[^>]*\bname\s*=\s*["']second_password["'][^>]*>/i)?.[0] ?? '';
    eq(attrs(input).type, 'password', 'type of the second_password field');
  });
  const stepped = await test('  … posting the second password completes the request: code, state, iss; acr second-password, newer auth_time, same sid', async () => {
    const { page, st, nonce } = need(stepUpReq, 'the step-up page');
    const form = parseForms(page.text, page.url).find((fm) => fm.names.has('second_password'));
    const r = await bA.request(form.action, { method: 'POST', form: { ...form.hidden, ...form.submit, second_password: USER1.secondPassword } });
    eq(r.status, 303, `status of the step-up POST (${summary(r)})`);
    const cb = new URL(r.location);
    eq(`${cb.origin}${cb.pathname}`, basic.redirectUri, 'redirect target');
    eq(cb.searchParams.get('iss'), state.issuer, 'iss');
    const tokens = await client.authorizationCodeGrant(basic.config, cb, { expectedState: st, expectedNonce: nonce });
    const c = tokens.claims();
    const l = low.claims;
    eq(c.acr, ACR_SECOND, 'acr');
    assert(c.auth_time > l.auth_time, `auth_time ${c.auth_time} is not after ${l.auth_time}`);
    eq(c.sid, l.sid, 'sid');
    eq(c.sub, l.sub, 'sub');
    assert(c.amr?.includes('pwd') && !c.amr.includes('mfa'), `amr ${show(c.amr)}`);
    return { tokens, claims: c };
  });
  await test('  … introspection of the stepped-up access token returns acr second-password and the same auth_time', async () =>
    introspectMatches(need(stepped, 'the stepped-up tokens')));
  await test('prompt=none asking for the second-password level from the stepped-up session: a code, no page, same auth_time', async () => {
    const s = need(stepped, 'the stepped-up session').claims;
    const f = await codeFlow(basic, { browser: bA, user: null, expectPages: [], extra: { prompt: 'none', acr_values: ACR_SECOND } });
    eq(f.claims.acr, ACR_SECOND, 'acr');
    eq(f.claims.auth_time, s.auth_time, 'auth_time');
  });

  // acr_values lists acceptable levels; an essential acr claim raises the level.
  const bB = new Browser();
  const lowB = await test('acr_values listing both levels on a password session: the lower level is enough (no page, acr password)', async () => {
    await codeFlow(basic, { browser: bB, expectPages: ['login'] });
    const f = await codeFlow(basic, { browser: bB, expectPages: [], extra: { acr_values: `${ACR_PASSWORD} ${ACR_SECOND}` } });
    eq(f.claims.acr, ACR_PASSWORD, 'acr');
    return f;
  });
  await test('claims={"id_token":{"acr":{"essential":true,"value":"…second-password"}}} behaves like acr_values: the step-up page only', async () => {
    need(lowB, 'the password session');
    enrolled();
    const claims = JSON.stringify({ id_token: { acr: { essential: true, value: ACR_SECOND } } });
    const f = await codeFlow(basic, { browser: bB, extra: { claims }, expectPages: ['step-up'] });
    eq(f.claims.acr, ACR_SECOND, 'acr');
    eq(f.claims.sid, lowB.claims.sid, 'sid');
    await introspectMatches(f);
  });

  // max_age and prompt=login on second-password sessions (levels.rs decide(): the university
  // password is checked against max_age first — too old: the full login page; fresh enough but the
  // second password too old: the step-up page only).
  const bC = new Browser();
  const bD = new Browser();
  const bE = new Browser();
  const both = await test('three sessions signed in with all three fields: acr second-password', async () => {
    enrolled();
    const out = [];
    for (const b of [bC, bD, bE]) {
      const f = await codeFlow(basic, { browser: b, typeSecond: true, extra: { acr_values: ACR_SECOND }, expectPages: ['login'] });
      eq(f.claims.acr, ACR_SECOND, 'acr');
      out.push(f);
    }
    return out;
  });
  if (both) await sleep(2100); // both checks of the three sessions are now older than max_age=1
  const fresher = await test('after 2 s, prompt=login on one session: the full login page; the university password is typed again (second password empty)', async () => {
    const [c] = need(both, 'the sessions');
    const f = await codeFlow(basic, { browser: bC, extra: { prompt: 'login' }, expectPages: ['login'] });
    assert(f.claims.auth_time > c.claims.auth_time, `auth_time ${f.claims.auth_time} not after ${c.claims.auth_time}`);
    return f;
  });
  await test('  … then max_age=1 + acr_values=second-password: university password within max_age, second password older: the step-up page only', async () => {
    const p = need(fresher, 'the fresh university password');
    const f = await codeFlow(basic, { browser: bC, maxAge: 1, extra: { acr_values: ACR_SECOND }, expectPages: ['step-up'] });
    eq(f.claims.acr, ACR_SECOND, 'acr');
    assert(f.claims.auth_time >= p.claims.auth_time, `auth_time ${f.claims.auth_time} before ${p.claims.auth_time}`);
    eq(f.claims.sid, p.claims.sid, 'sid');
    await introspectMatches(f);
  });
  const maxB = both
    ? await codeFlow(basic, { browser: bD, maxAge: 1, extra: { acr_values: ACR_SECOND } }).catch((e) => ({ error: e }))
    : null;
  await test('max_age=1 + acr_values=second-password, both checks older than 1 s: the full login page first', async () => {
    const f = need(maxB, 'the sessions');
    if (f.error && !f.pages) throw f.error;
    eq(f.pages[0], 'login', 'first page');
  });
  await test('  … and the second password, older than max_age, is asked again when left empty (login, then step-up)', async () => {
    const f = need(maxB, 'the sessions');
    if (f.error) throw f.error;
    const c = f.claims;
    const d = both[1].claims;
    eq(f.pages.join(','), 'login,step-up', `pages shown to the student (nidan answered acr ${c.acr}, auth_time ${c.auth_time}; the second password was typed at ${d.auth_time}, ${c.auth_time - d.auth_time} s earlier, max_age=1)`);
    eq(c.acr, ACR_SECOND, 'acr');
    assert(f.claims.auth_time >= now() - 10, `auth_time ${f.claims.auth_time} is not recent`);
  });
  const max0 = both
    ? await codeFlow(basic, { browser: bE, maxAge: 0, extra: { acr_values: ACR_SECOND } }).catch((e) => ({ error: e }))
    : null;
  await test('max_age=0 with acr_values=second-password on a second-password session: the full login page first', async () => {
    const f = need(max0, 'the sessions');
    if (f.error && !f.pages) throw f.error;
    eq(f.pages[0], 'login', 'first page');
  });
  await test('  … and, the second password being older than max_age=0, it is asked again when left empty (login, then step-up)', async () => {
    const f = need(max0, 'the sessions');
    if (f.error) throw f.error;
    const c = f.claims;
    const e = both[2].claims;
    eq(f.pages.join(','), 'login,step-up', `pages shown to the student (nidan answered acr ${c.acr}, auth_time ${c.auth_time}; the second password was typed at ${e.auth_time}, ${c.auth_time - e.auth_time} s earlier, max_age=0)`);
    eq(c.acr, ACR_SECOND, 'acr');
  });
  await test('prompt=login + acr_values=second-password on a second-password session: the full login page, then acr second-password', async () => {
    const [, d] = need(both, 'the sessions');
    const f = await codeFlow(basic, { browser: bD, extra: { prompt: 'login', acr_values: ACR_SECOND } });
    eq(f.pages[0], 'login', 'first page');
    eq(f.claims.acr, ACR_SECOND, 'acr');
    assert(f.claims.auth_time > d.claims.auth_time, `auth_time ${f.claims.auth_time} not after ${d.claims.auth_time}`);
    await introspectMatches(f);
  });
}

// ---------------------------------------------------------------------------
// OpenID Foundation plan configurations (conformance/oidf/): checked offline by replaying their
// scripted-browser steps against nidan's real pages, the way the suite's BrowserControl runs them
// (match a block by URL, run each task whose URL pattern matches, "text" types like sendKeys,
// "click" submits the button's form, "wait" looks for an element and a regular expression).
// The suite's own pages (callback, post_logout_redirect) are never fetched: only their URLs are
// compared with the patterns.
// ---------------------------------------------------------------------------

const VOID_TAGS = new Set(['area', 'base', 'br', 'col', 'embed', 'hr', 'img', 'input', 'link', 'meta', 'param', 'source', 'track', 'wbr']);

/** A small HTML tree: { tag, attrs, children, parent } elements and { text } nodes. */
function parseHtml(html) {
  const root = { tag: '#root', attrs: {}, children: [], parent: null };
  let cur = root;
  const re = /<!--[\s\S]*?-->|<!doctype[^>]*>|<(script|style)\b[^>]*>[\s\S]*?<\/\1\s*>|<\/([a-zA-Z][\w-]*)\s*>|<([a-zA-Z][\w-]*)\b((?:[^>"']|"[^"]*"|'[^']*')*)>|([^<]+)/gi;
  let m;
  while ((m = re.exec(html))) {
    if (m[2]) {
      const tag = m[2].toLowerCase();
      let n = cur;
      while (n && n.tag !== tag) n = n.parent;
      if (n && n.parent) cur = n.parent;
    } else if (m[3]) {
      const tag = m[3].toLowerCase();
      const el = { tag, attrs: attrs(`<x${m[4]}>`), children: [], parent: cur };
      cur.children.push(el);
      if (!VOID_TAGS.has(tag) && !/\/\s*$/.test(m[4])) cur = el;
    } else if (m[5]) {
      cur.children.push({ text: decodeEntities(m[5]) });
    }
  }
  return root;
}
function* elementsOf(node) {
  for (const c of node.children ?? []) {
    if (c.tag) {
      yield c;
      yield* elementsOf(c);
    }
  }
}
const textOf = (el) => (el.children ?? []).map((c) => (c.tag ? textOf(c) : c.text)).join('');

/** CSS selectors: compounds of tag, #id, .class, [attr], [attr=value], with descendant and child combinators, comma lists. */
function parseSelector(selector) {
  const alternatives = [];
  let parts = [];
  let buf = '';
  let comb = ' ';
  let depth = 0;
  let quote = null;
  const flush = () => {
    if (buf) parts.push({ comb, compound: parseCompound(buf) });
    buf = '';
  };
  for (const ch of `${selector} `) {
    if (quote) {
      buf += ch;
      if (ch === quote) quote = null;
    } else if (ch === '"' || ch === "'") {
      quote = ch;
      buf += ch;
    } else if (ch === '[') {
      depth++;
      buf += ch;
    } else if (ch === ']') {
      depth--;
      buf += ch;
    } else if (depth === 0 && (ch === ' ' || ch === '>' || ch === ',')) {
      if (buf) {
        flush();
        comb = ' ';
      }
      if (ch === '>') comb = '>';
      if (ch === ',') {
        alternatives.push(parts);
        parts = [];
        comb = ' ';
      }
    } else buf += ch;
  }
  if (parts.length) alternatives.push(parts);
  return alternatives;
}
function parseCompound(s) {
  const c = { tag: null, id: null, classes: [], attrs: [] };
  const re = /^([a-zA-Z][\w-]*|\*)|#([\w-]+)|\.([\w-]+)|\[\s*([\w-]+)\s*(?:=\s*(?:"([^"]*)"|'([^']*)'|([^\]\s]+)))?\s*\]/g;
  let m;
  let consumed = 0;
  while ((m = re.exec(s))) {
    if (m.index !== consumed) break;
    consumed = re.lastIndex;
    if (m[1]) c.tag = m[1] === '*' ? null : m[1].toLowerCase();
    else if (m[2]) c.id = m[2];
    else if (m[3]) c.classes.push(m[3]);
    else if (m[4]) c.attrs.push({ name: m[4].toLowerCase(), value: m[5] ?? m[6] ?? m[7] });
  }
  if (consumed !== s.length) throw new Error(`unsupported CSS selector part ${show(s)}`);
  return c;
}
function matchCompound(el, c) {
  if (c.tag && el.tag !== c.tag) return false;
  if (c.id && el.attrs.id !== c.id) return false;
  const classes = (el.attrs.class ?? '').split(/\s+/);
  if (!c.classes.every((x) => classes.includes(x))) return false;
  return c.attrs.every((a) => a.name in el.attrs && (a.value === undefined || el.attrs[a.name] === a.value));
}
function matchComplex(el, parts, i) {
  if (!el.tag || el.tag === '#root' || !matchCompound(el, parts[i].compound)) return false;
  if (i === 0) return true;
  if (parts[i].comb === '>') return matchComplex(el.parent, parts, i - 1);
  for (let a = el.parent; a && a.tag !== '#root'; a = a.parent) if (matchComplex(a, parts, i - 1)) return true;
  return false;
}
/** Elements for a suite selector type (id, name, css, class). */
function selectElements(root, by, target) {
  const all = [...elementsOf(root)];
  if (by === 'id') return all.filter((e) => e.attrs.id === target);
  if (by === 'name') return all.filter((e) => e.attrs.name === target);
  if (by === 'class') return all.filter((e) => (e.attrs.class ?? '').split(/\s+/).includes(target));
  if (by === 'css') {
    const alts = parseSelector(target);
    return all.filter((e) => alts.some((parts) => matchComplex(e, parts, parts.length - 1)));
  }
  throw new Error(`selector type ${show(by)} is not emulated here`);
}
/** Spring's PatternMatchUtils.simpleMatch, which the suite uses for "match": '*' is any text. */
function simpleMatch(pattern, text) {
  const re = pattern.split('*').map((p) => p.replace(/[.+?^${}()|[\]\\]/g, '\\$&')).join('.*');
  return new RegExp(`^${re}$`, 's').test(text);
}

/** GET (or POST) on nidan, following nidan's own redirects; stops at the first URL elsewhere. */
async function navigate(browser, url, options) {
  const origin = new URL(state.issuer).origin;
  let res = await browser.request(url, options);
  for (let hop = 0; hop < 10; hop++) {
    if (!isRedirect(res.status)) return { url: res.url, status: res.status, text: res.text, external: false };
    if (new URL(res.location).origin !== origin) return { url: res.location, status: null, text: '', external: true };
    res = await browser.request(res.location);
  }
  throw new Error('too many redirects');
}

/**
 * Runs the suite's browser steps for a URL the test module would send the browser to.
 * Returns { page, ran: [task names], notEmulated: [commands left to the suite's own pages] }.
 */
async function emulateSuiteBrowser(blocks, startUrl, browser) {
  const block = blocks.find((b) => simpleMatch(b.match, startUrl));
  if (!block) throw new Error(`no browser block matches ${startUrl} (the suite would wait for a person)`);
  let page = await navigate(browser, startUrl);
  const ran = [];
  const notEmulated = [];
  for (const task of block.tasks) {
    const pattern = task.match ?? '*';
    if (!simpleMatch(pattern, page.url)) {
      if (task.optional) continue;
      const why = page.external ? '' : ` (HTTP ${page.status}: ${(alertText(page.text) ?? pageText(page.text)).slice(0, 200)})`;
      throw new Error(`task "${task.task}": the browser is at ${page.url}, which does not match ${pattern}${why}`);
    }
    ran.push(task.task);
    const typed = new Map();
    for (const cmd of task.commands ?? []) {
      const [verb, by, target, ...rest] = cmd;
      const where = `task "${task.task}", ${JSON.stringify(cmd)}`;
      if (verb === 'wait' && (by === 'contains' || by === 'match')) {
        const ok = by === 'contains' ? page.url.includes(target) : new RegExp(target).test(page.url);
        if (!ok) throw new Error(`${where}: URL ${page.url}`);
        continue;
      }
      if (page.external) {
        notEmulated.push(cmd); // the suite's own page
        continue;
      }
      page.dom ??= parseHtml(page.text); // one tree per page: typed values stay on its elements
      const els = selectElements(page.dom, by, target);
      if (verb === 'text') {
        const el = els[0];
        if (!el || !['input', 'textarea'].includes(el.tag) || (el.attrs.type ?? '').toLowerCase() === 'hidden') {
          throw new Error(`${where}: no visible input on ${page.url} (HTTP ${page.status})`);
        }
        typed.set(el, `${typed.get(el) ?? el.attrs.value ?? ''}${rest[0]}`); // sendKeys appends to what is there
      } else if (verb === 'click') {
        const el = els[0];
        if (!el) throw new Error(`${where}: nothing to click on ${page.url} (HTTP ${page.status}: ${pageText(page.text).slice(0, 150)})`);
        let form = el.parent;
        while (form && form.tag !== 'form') form = form.parent;
        const isSubmit = (el.tag === 'button' && (el.attrs.type ?? 'submit').toLowerCase() === 'submit') || (el.tag === 'input' && el.attrs.type === 'submit');
        if (el.tag === 'a' && el.attrs.href) {
          page = await navigate(browser, new URL(el.attrs.href, page.url).href);
        } else if (form && isSubmit) {
          const fields = {};
          for (const f of elementsOf(form)) {
            if (!f.attrs.name || !['input', 'textarea', 'select'].includes(f.tag)) continue;
            const type = (f.attrs.type ?? 'text').toLowerCase();
            if (['submit', 'button', 'image', 'reset'].includes(type)) continue;
            if ((type === 'checkbox' || type === 'radio') && !('checked' in f.attrs)) continue;
            fields[f.attrs.name] = typed.get(f) ?? f.attrs.value ?? '';
          }
          if (el.attrs.name) fields[el.attrs.name] = el.attrs.value ?? '';
          const action = new URL(form.attrs.action || page.url, page.url).href;
          const method = (form.attrs.method ?? 'get').toUpperCase();
          if (method === 'POST') page = await navigate(browser, action, { method: 'POST', form: fields });
          else {
            const u = new URL(action);
            for (const [k, v] of Object.entries(fields)) u.searchParams.set(k, v);
            page = await navigate(browser, u.href);
          }
        } else throw new Error(`${where}: the element is not a submit button of a form or a link`);
      } else if (verb === 'wait') {
        const [, regexp, action] = rest;
        if (action && !['update-image-placeholder', 'update-image-placeholder-optional'].includes(action)) throw new Error(`${where}: unknown action`);
        const ok = regexp ? els.some((e) => new RegExp(regexp).test(textOf(e))) : els.length > 0;
        if (!ok) throw new Error(`${where}: not found on ${page.url} (HTTP ${page.status}: ${pageText(page.text).slice(0, 150)})`);
      } else throw new Error(`${where}: unknown command`);
    }
  }
  return { page, ran, notEmulated };
}

// The suite's test modules of each plan that a configuration may override (from the suite's plan
// classes); an override under any other name would be silently unused.
const OIDF_MODULES = {
  'basic-op.json': [
    'oidcc-server', 'oidcc-response-type-missing', 'oidcc-idtoken-signature', 'oidcc-idtoken-unsigned', 'oidcc-userinfo-get',
    'oidcc-userinfo-post-header', 'oidcc-userinfo-post-body', 'oidcc-ensure-request-without-nonce-succeeds-for-code-flow',
    'oidcc-scope-profile', 'oidcc-scope-email', 'oidcc-scope-address', 'oidcc-scope-phone', 'oidcc-scope-all',
    'oidcc-ensure-other-scope-order-succeeds', 'oidcc-display-page', 'oidcc-display-popup', 'oidcc-prompt-login',
    'oidcc-prompt-none-not-logged-in', 'oidcc-prompt-none-logged-in', 'oidcc-max-age-1', 'oidcc-max-age-10000',
    'oidcc-ensure-request-with-unknown-parameter-succeeds', 'oidcc-id-token-hint', 'oidcc-login-hint', 'oidcc-ui-locales',
    'oidcc-claims-locales', 'oidcc-ensure-request-with-acr-values-succeeds', 'oidcc-codereuse', 'oidcc-codereuse-30seconds',
    'oidcc-ensure-registered-redirect-uri', 'oidcc-ensure-post-request-succeeds', 'oidcc-server-client-secret-post',
    'oidcc-request-uri-unsigned-supported-correctly-or-rejected-as-unsupported',
    'oidcc-unsigned-request-object-supported-correctly-or-rejected-as-unsupported', 'oidcc-claims-essential',
    'oidcc-ensure-request-object-with-redirect-uri', 'oidcc-refresh-token', 'oidcc-ensure-request-with-valid-pkce-succeeds',
  ],
  'config-op.json': ['oidcc-discovery-endpoint-verification'],
  'rp-initiated-logout-op.json': [
    'oidcc-rp-initiated-logout-discovery-endpoint-verification', 'oidcc-rp-initiated-logout',
    'oidcc-rp-initiated-logout-bad-post-logout-redirect-uri', 'oidcc-rp-initiated-logout-modified-id-token-hint',
    'oidcc-rp-initiated-logout-no-id-token-hint', 'oidcc-rp-initiated-logout-no-params',
    'oidcc-rp-initiated-logout-no-post-logout-redirect-uri', 'oidcc-rp-initiated-logout-no-state',
    'oidcc-rp-initiated-logout-only-state',
  ],
  'backchannel-logout-op.json': ['oidcc-backchannel-logout-discovery-endpoint-verification', 'oidcc-backchannel-rp-initiated-logout'],
};

async function oidfChecks() {
  section('OpenID Foundation plan configurations (conformance/oidf/, replayed offline)');
  let oidf;
  try {
    oidf = await import('./oidf/fill.mjs');
  } catch (e) {
    await test('conformance/oidf/fill.mjs loads', async () => {
      throw e;
    });
    return;
  }
  const { PLANS, template, placeholders, fill, registrations, suiteUris } = oidf;
  const KNOWN = new Set(['ISSUER', 'USERNAME', 'PASSWORD', 'SECOND_PASSWORD']);
  const templates = {};
  for (const p of PLANS) {
    templates[p.file] = await test(`${p.file} (${p.plan}): alias, discoveryUrl, clients, browser patterns and placeholders`, async () => {
      const t = template(p);
      eq(t.alias, p.alias, 'alias');
      assert(typeof t.description === 'string' && t.description, 'no description');
      eq(t.server?.discoveryUrl, '{{ISSUER}}/.well-known/openid-configuration', 'server.discoveryUrl');
      for (const c of p.clients) {
        eq(t[c.key]?.client_id, c.id, `${c.key}.client_id`);
        eq(t[c.key]?.client_secret, `{{SECRET:${c.id}}}`, `${c.key}.client_secret`);
      }
      for (const ph of placeholders(t)) {
        assert(KNOWN.has(ph) || (ph.startsWith('SECRET:') && p.clients.some((c) => c.id === ph.slice(7))), `unknown placeholder {{${ph}}}`);
      }
      const blocks = [t.browser ?? [], ...Object.values(t.override ?? {}).map((o) => o.browser ?? [])].flat();
      if (p.clients.length) assert(blocks.length > 0, 'no browser steps');
      for (const b of blocks) {
        for (const pat of [b.match, ...b.tasks.map((x) => x.match)]) {
          assert(pat.startsWith('{{ISSUER}}/') || pat.startsWith(`*/test/a/${p.alias}/`), `pattern ${show(pat)} names neither nidan nor this alias`);
        }
        assert(b.tasks.some((x) => !x.optional), `a block for ${b.match} has only optional tasks`);
      }
      for (const name of Object.keys(t.override ?? {})) {
        assert(OIDF_MODULES[p.file].includes(name), `override for ${show(name)}, which is not a module of ${p.plan}`);
      }
      return t;
    });
  }
  const values = {
    issuer: state.issuer,
    username: USER1.username,
    password: USER1.password,
    second_password: USER1.secondPassword,
    secrets: {},
  };

  // The registration commands the operator is told to run, against this instance (while serve runs).
  const secrets = await test('the `nidan client add` commands of fill.mjs (suite redirect/logout URIs) are accepted', async () => {
    const bin = findBinary();
    const got = {};
    for (const r of registrations()) {
      const out = runNidan(bin, [...r.args, '--config', state.configPath]);
      assert(out.status === 0, `nidan ${r.args.join(' ')}: exit ${out.status}: ${firstLines(out.stderr || out.stdout)}`);
      const secret = out.stdout.match(/^client_secret:\s*(\S+)/m)?.[1];
      assert(secret, `no client_secret printed for ${r.client.id}`);
      got[r.client.id] = secret;
    }
    return got;
  });
  await test('  … `nidan client show oidf-bc-logout`: backchannel_logout_uri as registered, session required, post-logout URI', async () => {
    need(secrets, 'the registrations');
    const out = runNidan(findBinary(), ['client', 'show', 'oidf-bc-logout', '--config', state.configPath]);
    eq(out.status, 0, `exit status (${firstLines(out.stderr)})`);
    const s = JSON.parse(out.stdout.slice(out.stdout.indexOf('{'), out.stdout.lastIndexOf('}') + 1));
    const uris = suiteUris('nidan-bc-logout');
    eq(s.backchannel_logout_uri, uris.backchannel, 'backchannel_logout_uri');
    eq(s.backchannel_logout_session_required, true, 'backchannel_logout_session_required');
    eq(show(s.post_logout_redirect_uris), show([uris.postLogout]), 'post_logout_redirect_uris');
    eq(show(s.redirect_uris), show([uris.callback]), 'redirect_uris');
  });
  // A loopback twin of the back-channel client: the suite's own URIs would leave this machine.
  const twin = await test('  … and a loopback twin of oidf-bc-logout (suite URIs on the runner\'s receiver) for the replay', async () => {
    const r = registrations({ suite: receiver.origin, suffix: '-loop' }).find((x) => x.client.id === 'oidf-bc-logout');
    const out = runNidan(findBinary(), [...r.args, '--config', state.configPath]);
    assert(out.status === 0, `exit ${out.status}: ${firstLines(out.stderr || out.stdout)}`);
    return { id: 'oidf-bc-logout-loop', secret: out.stdout.match(/^client_secret:\s*(\S+)/m)?.[1], uris: suiteUris('nidan-bc-logout', receiver.origin) };
  });
  if (secrets) Object.assign(values.secrets, secrets);
  const filled = {};
  for (const p of PLANS) {
    filled[p.file] = await test(`fill.mjs fills ${p.file}: no placeholder left, discoveryUrl served`, async () => {
      const t = need(templates[p.file], 'the template');
      if (p.clients.length) need(secrets, 'the client secrets');
      const f = fill(t, values);
      assert(!JSON.stringify(f).includes('{{'), 'a placeholder is left');
      const d = await http(f.server.discoveryUrl);
      eq(d.status, 200, 'discovery status');
      eq(d.json?.issuer, state.issuer, 'issuer');
      return f;
    });
  }

  const suiteAuthUrl = (clientId, alias, extra = {}) =>
    authUrl({
      client_id: clientId,
      response_type: 'code',
      redirect_uri: suiteUris(alias).callback,
      scope: 'openid',
      state: client.randomState(),
      nonce: client.randomNonce(),
      ...extra,
    });
  const pseudoRp = (id, method) => ({ id, method, secret: values.secrets[id] });
  const expectCode = (run, alias) => {
    assert(run.page.external, `the browser stayed on nidan: ${run.page.url} (HTTP ${run.page.status}: ${pageText(run.page.text).slice(0, 150)})`);
    const u = new URL(run.page.url);
    assert(simpleMatch(`*/test/a/${alias}/callback*`, u.href), `ended at ${u.href}`);
    const code = u.searchParams.get('code');
    assert(code, `no code: ${u.href}`);
    eq(u.searchParams.get('iss'), state.issuer, 'iss');
    return code;
  };
  const exchange = async (rp, code, alias, redirectUri = suiteUris(alias).callback) => {
    const t = await rawToken(rp, { grant_type: 'authorization_code', code, redirect_uri: redirectUri });
    eq(t.status, 200, `token endpoint (${rp.method}) status (${show(t.json ?? t.text)})`);
    assert(t.json?.id_token, 'no id_token');
    return t.json;
  };

  // Basic OP.
  const basic = filled['basic-op.json'];
  const bb = new Browser();
  await test('Basic OP, default steps (client, client_secret_basic): login page filled, callback with code and iss, token exchange', async () => {
    const f = need(basic, 'the filled configuration');
    const run = await emulateSuiteBrowser(f.browser, suiteAuthUrl('oidf-basic', f.alias), bb);
    eq(run.ran.join(','), 'Login,Verify Complete', 'tasks run');
    await exchange(pseudoRp('oidf-basic', 'client_secret_basic'), expectCode(run, f.alias), f.alias);
  });
  await test('Basic OP, oidcc-prompt-login steps: the second login page is shown, filled and screenshotted', async () => {
    const f = need(basic, 'the filled configuration');
    const run = await emulateSuiteBrowser(f.override['oidcc-prompt-login'].browser, suiteAuthUrl('oidf-basic', f.alias, { prompt: 'login' }), bb);
    eq(run.ran.join(','), 'Login,Verify Complete', 'tasks run');
    expectCode(run, f.alias);
  });
  await test('Basic OP, oidcc-max-age-1 uses the same steps as oidcc-prompt-login', async () => {
    const f = need(basic, 'the filled configuration');
    eq(JSON.stringify(f.override['oidcc-max-age-1']), JSON.stringify(f.override['oidcc-prompt-login']), 'override');
  });
  await test('Basic OP, oidcc-login-hint steps: the user ID prefilled from login_hint is not typed twice', async () => {
    const f = need(basic, 'the filled configuration');
    eq(f.server.login_hint, USER1.username, 'server.login_hint');
    const run = await emulateSuiteBrowser(f.override['oidcc-login-hint'].browser, suiteAuthUrl('oidf-basic', f.alias, { login_hint: f.server.login_hint }), new Browser());
    expectCode(run, f.alias);
  });
  await test('Basic OP, oidcc-ensure-registered-redirect-uri steps: nidan\'s error page (role=alert) is found, no redirect', async () => {
    const f = need(basic, 'the filled configuration');
    const run = await emulateSuiteBrowser(
      f.override['oidcc-ensure-registered-redirect-uri'].browser,
      suiteAuthUrl('oidf-basic', f.alias, { redirect_uri: `${suiteUris(f.alias).callback}/not-registered` }),
      new Browser(),
    );
    assert(!run.page.external, `redirected to ${run.page.url}`);
    assert(run.page.status >= 400, `HTTP ${run.page.status}`);
  });
  for (const [key, id, method] of [['client2', 'oidf-basic-2', 'client_secret_basic'], ['client_secret_post', 'oidf-basic-post', 'client_secret_post']]) {
    await test(`Basic OP, ${key} (${id}, ${method}): default steps, token exchange with its method`, async () => {
      const f = need(basic, 'the filled configuration');
      eq(f[key].client_id, id, `${key}.client_id`);
      const run = await emulateSuiteBrowser(f.browser, suiteAuthUrl(id, f.alias), new Browser());
      await exchange(pseudoRp(id, method), expectCode(run, f.alias), f.alias);
    });
  }

  // RP-Initiated Logout OP: each module's end-session request, as the suite builds it.
  const rpl = filled['rp-initiated-logout-op.json'];
  const logoutModules = [
    ['oidcc-rp-initiated-logout', { hint: true, plru: true, state: true }, 'redirect'],
    ['oidcc-rp-initiated-logout-no-state', { hint: true, plru: true }, 'redirect'],
    ['oidcc-rp-initiated-logout-bad-post-logout-redirect-uri', { hint: true, plru: 'bad', state: true }, 'page'],
    ['oidcc-rp-initiated-logout-modified-id-token-hint', { hint: 'alg-none', plru: true, state: true }, 'page'],
    ['oidcc-rp-initiated-logout-no-id-token-hint', { plru: true, state: true }, 'page'],
    ['oidcc-rp-initiated-logout-no-params', {}, 'logged-out'],
    ['oidcc-rp-initiated-logout-no-post-logout-redirect-uri', { hint: true, state: true }, 'logged-out'],
    ['oidcc-rp-initiated-logout-only-state', { state: true }, 'logged-out'],
  ];
  for (const [module, req, outcome] of logoutModules) {
    await test(`RP-Initiated Logout OP, ${module}: ${outcome === 'redirect' ? 'back to post_logout_redirect' : outcome === 'page' ? 'an error page (role=alert), no redirect' : 'logged-out page (role=status)'}${outcome !== 'page' ? ', then prompt=none gives login_required' : ''}`, async () => {
      const f = need(rpl, 'the filled configuration');
      const blocks = f.override?.[module]?.browser ?? f.browser;
      const b = new Browser();
      const run = await emulateSuiteBrowser(blocks, suiteAuthUrl('oidf-rp-logout', f.alias), b);
      const tokens = await exchange(pseudoRp('oidf-rp-logout', 'client_secret_basic'), expectCode(run, f.alias), f.alias);
      const uris = suiteUris(f.alias);
      const u = new URL(state.meta.end_session_endpoint);
      const st = client.randomState() + client.randomState(); // the suite sends a long state
      if (req.hint === true) u.searchParams.set('id_token_hint', tokens.id_token);
      if (req.hint === 'alg-none') {
        const [, payload] = tokens.id_token.split('.');
        u.searchParams.set('id_token_hint', `${b64u(JSON.stringify({ alg: 'none' }))}.${payload}.`);
      }
      if (req.plru) u.searchParams.set('post_logout_redirect_uri', req.plru === 'bad' ? `${uris.postLogout}/not-registered` : uris.postLogout);
      if (req.state) u.searchParams.set('state', st);
      const out = await emulateSuiteBrowser(blocks, u.href, b);
      if (outcome === 'redirect') {
        assert(out.page.external, `stayed on nidan: ${out.page.url}`);
        const back = new URL(out.page.url);
        eq(`${back.origin}${back.pathname}`, uris.postLogout, 'redirect target');
        eq(back.searchParams.get('state'), req.state ? st : null, 'state');
      } else {
        assert(!out.page.external, `redirected to ${out.page.url}`);
        assert(out.ran.length > 0, 'no task ran');
      }
      if (outcome !== 'page') {
        const again = await emulateSuiteBrowser(blocks, suiteAuthUrl('oidf-rp-logout', f.alias, { prompt: 'none' }), b);
        assert(again.page.external, `prompt=none stayed on nidan: ${again.page.url}`);
        eq(new URL(again.page.url).searchParams.get('error'), 'login_required', 'error after the logout');
      }
    });
  }

  // Back-Channel Logout OP, with the loopback twin client.
  const bcl = filled['backchannel-logout-op.json'];
  await test('Back-Channel Logout OP (loopback twin): login, logout to post_logout_redirect with state, logout token at /backchannel_logout, then login_required', async () => {
    const f = need(bcl, 'the filled configuration');
    const tw = need(twin, 'the loopback twin client');
    const b = new Browser();
    const start = authUrl({ client_id: tw.id, response_type: 'code', redirect_uri: tw.uris.callback, scope: 'openid', state: client.randomState(), nonce: client.randomNonce() });
    const run = await emulateSuiteBrowser(f.browser, start, b);
    const rp = { id: tw.id, method: 'client_secret_basic', secret: tw.secret, alg: 'RS256', backchannelUri: tw.uris.backchannel };
    const tokens = await exchange(rp, expectCode(run, f.alias), f.alias, tw.uris.callback);
    const idc = jose.decodeJwt(tokens.id_token);
    const st = client.randomState();
    const u = new URL(state.meta.end_session_endpoint);
    u.searchParams.set('id_token_hint', tokens.id_token);
    u.searchParams.set('post_logout_redirect_uri', tw.uris.postLogout);
    u.searchParams.set('state', st);
    const before = Date.now();
    const out = await emulateSuiteBrowser(f.browser, u.href, b);
    assert(out.page.external && out.page.url.startsWith(tw.uris.postLogout), `ended at ${out.page.url}`);
    eq(new URL(out.page.url).searchParams.get('state'), st, 'state');
    const got = deliveries(new URL(tw.uris.backchannel).pathname);
    eq(got.length, 1, 'logout tokens at /backchannel_logout');
    await logoutTokenAllGood(got[0], { rp, sid: idc.sid, sub: idc.sub, after: before });
    const start2 = authUrl({ client_id: tw.id, response_type: 'code', redirect_uri: tw.uris.callback, scope: 'openid', state: 's', prompt: 'none' });
    const again = await emulateSuiteBrowser(f.browser, start2, b);
    eq(new URL(again.page.url).searchParams.get('error'), 'login_required', 'error after the logout');
  });
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

const AREAS = [
  ['Discovery (Config OP)', discoveryChecks],
  ['JWKS', jwksChecks],
  ['Code flow and client authentication (Basic OP)', codeFlowChecks],
  ['RFC 9207 authorization response iss', issChecks],
  ['ID token', idTokenChecksArea],
  ['nonce and state', nonceStateChecks],
  ['prompt', promptChecks],
  ['Other request parameters (Basic OP)', requestParameterChecks],
  ['max_age', maxAgeChecks],
  ['acr_values and the step-up', acrChecks],
  ['RFC 9470 step-up (acr_values, max_age, introspection)', stepUpChecks],
  ['UserInfo', userinfoChecks],
  ['Authorization code reuse', codeReuseChecks],
  ['Refresh tokens', refreshChecks],
  ['Revocation', revocationChecks],
  ['Introspection', introspectionChecks],
  ['Client credentials', clientCredentialsChecks],
  ['Authorization request errors', authRequestErrorChecks],
  ['RP-initiated logout', logoutChecks],
  ['Back-channel logout OP', backchannelChecks],
  ['OpenID Foundation plan configurations (oidf)', oidfChecks],
];

function firstLines(text, n = 2) {
  return (text ?? '').split('\n').map((l) => l.trim()).filter(Boolean).slice(0, n).join(' / ').slice(0, 400);
}

async function setup() {
  section('Setup');
  const bin = await test('nidan binary found', async () => {
    const b = findBinary();
    if (!b || !fs.existsSync(b)) throw new Error(`no binary (looked at ${OPTS.nidan ?? 'target/release/nidan, target/debug/nidan'}); build it or pass --nidan`);
    return b;
  });
  if (!bin) return false;
  const prepared = await test('temporary instance prepared (KEK, users.toml via `nidan hash-password`, client secrets, config)', () =>
    prepareInstance(bin));
  if (!prepared) return false;
  await test('`nidan check-config` accepts the configuration', async () => {
    const r = runNidan(bin, ['check-config', '--config', state.configPath]);
    if (r.status !== 0) throw new Error(`exit ${r.status}: ${firstLines(r.stderr || r.stdout)}`);
  });
  const meta = await test(`nidan serve starts and serves discovery on ${state.issuer}`, () => startServer(bin));
  if (!meta) return false;
  state.meta = meta;
  state.enrolled = Boolean(
    await test('`nidan user import` enrolls the test student (email + second password) while serve runs', async () => {
      const file = path.join(state.tmp, 'import.jsonl');
      fs.writeFileSync(file, `${JSON.stringify({ username: USER1.username, email: USER1.email, second_password: USER1.secondPassword })}\n`);
      const r = runNidan(bin, ['user', 'import', file, '--config', state.configPath]);
      if (r.status !== 0) throw new Error(`exit ${r.status}: ${firstLines(r.stderr || r.stdout)}`);
    }),
  );
  configureRps();
  return true;
}

async function main() {
  const watchdog = setTimeout(() => {
    console.log('\n  FAIL  whole run: did not finish within 15 minutes');
    counts.failed++;
    finish();
  }, 15 * 60_000);
  watchdog.unref();
  let ok = false;
  try {
    ok = await setup();
    if (ok) {
      for (const [title, fn] of AREAS) {
        if (OPTS.only.length && !OPTS.only.some((w) => title.toLowerCase().includes(w))) continue;
        try {
          await fn();
        } catch (e) {
          counts.failed++;
          console.log(`  FAIL  ${title}: the area stopped early: ${describeError(e)}`);
        }
        if (state.childExited) {
          counts.failed++;
          console.log(`  FAIL  nidan serve exited during "${title}" (${show(state.childExited)})`);
          break;
        }
      }
    }
  } catch (e) {
    counts.failed++;
    console.log(`  FAIL  runner: ${describeError(e)}`);
  }
  await finish();
}

let finishing = false;
async function finish() {
  if (finishing) return;
  finishing = true;
  try {
    await stopServer();
  } catch {
    /* ignore */
  }
  stopReceiver();
  if (state.logPath && (OPTS.verbose || counts.failed > 0)) {
    console.log(`\n# server log (last ${OPTS.verbose ? 400 : 40} lines)`);
    console.log(logTail(OPTS.verbose ? 400 : 40));
  }
  if (state.tmp) {
    if (OPTS.keep) console.log(`\n# kept ${state.tmp}`);
    else fs.rmSync(state.tmp, { recursive: true, force: true });
  }
  console.log(`\n${counts.passed} passed, ${counts.failed} failed, ${counts.skipped} skipped`);
  process.exit(counts.failed > 0 ? 1 : 0);
}

for (const ev of ['uncaughtException', 'unhandledRejection']) {
  process.on(ev, (e) => {
    console.log(`  FAIL  runner: ${ev}: ${describeError(e)}`);
    counts.failed++;
    finish();
  });
}
// Never leave a server behind, whatever happens.
process.on('exit', () => {
  if (state.child && !state.childExited) state.child.kill('SIGKILL');
});
for (const sig of ['SIGINT', 'SIGTERM']) {
  process.on(sig, () => {
    console.log(`\n  FAIL  interrupted by ${sig}`);
    counts.failed++;
    finish();
  });
}

await main();
