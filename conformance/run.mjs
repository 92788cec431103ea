#!/usr/bin/env node
// Offline OpenID Provider conformance check for nidan.
//
// Starts a throw-away nidan instance on a free loopback port, then plays both the
// relying parties (with openid-client + jose, which share none of nidan's code or
// assumptions) and the student's browser (plain fetch, no redirects followed, our
// own cookie jar). Covers what the OpenID Foundation's Basic OP, Config OP and
// RP-Initiated Logout OP plans check, plus nidan's documented protocol decisions.
//
//   node conformance/run.mjs [--nidan PATH] [--only WORD] [--keep] [--verbose]
//
// Prints one line per check and, last, exactly one line "N passed, N failed, N skipped".
// Exits 1 if any check failed. Never contacts anything but 127.0.0.1.

import { spawn, spawnSync } from 'node:child_process';
import { randomBytes, randomUUID, createHash } from 'node:crypto';
import fs from 'node:fs';
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
// Main
// ---------------------------------------------------------------------------

const AREAS = [
  ['Discovery (Config OP)', discoveryChecks],
  ['JWKS', jwksChecks],
  ['Code flow and client authentication (Basic OP)', codeFlowChecks],
  ['ID token', idTokenChecksArea],
  ['nonce and state', nonceStateChecks],
  ['prompt', promptChecks],
  ['Other request parameters (Basic OP)', requestParameterChecks],
  ['max_age', maxAgeChecks],
  ['acr_values and the step-up', acrChecks],
  ['UserInfo', userinfoChecks],
  ['Authorization code reuse', codeReuseChecks],
  ['Refresh tokens', refreshChecks],
  ['Revocation', revocationChecks],
  ['Introspection', introspectionChecks],
  ['Client credentials', clientCredentialsChecks],
  ['Authorization request errors', authRequestErrorChecks],
  ['RP-initiated logout', logoutChecks],
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
