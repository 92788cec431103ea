#!/usr/bin/env node
// Full sign-ins per second: N concurrent "browsers" (own cookie jar, redirects followed by hand),
// each doing the complete authorization code flow with PKCE:
//   GET /authorize → the login page → POST user ID + university password + second password
//   (+ the hidden csrf/tx fields the page carries) → redirects until the RP's redirect_uri with
//   `code` → POST /token (client_secret_basic) → access + ID token.
// Works against nidan and the peer alike (it fills whatever form has a password field).
// Each browser signs in as its own student (students[i % count]), so no two parallel attempts
// share a throttle key.
//
//   node login-driver.mjs --issuer URL --users FILE --secret-file FILE
//        [--client-id bench] [--redirect-uri http://127.0.0.1:9/cb]
//        [--concurrency 8] [--warmup 2] [--duration 10] [--max-logins 2000] [--once]
//
// Prints one JSON line: logins counted in the measuring window (after the warm-up), logins/s,
// p50/p99/max of one sign-in, failures and the first error. --once signs in once and prints
// the token response (bench.mjs uses its access token for the userinfo and introspection rounds).
// Only 127.0.0.1 is ever contacted.
import crypto from 'node:crypto';
import fs from 'node:fs';

function args(argv) {
  const o = {
    clientId: 'bench',
    redirectUri: 'http://127.0.0.1:9/cb',
    concurrency: 8,
    warmup: 2,
    duration: 10,
    maxLogins: 2000,
    once: false,
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    if (a === '--issuer') o.issuer = v();
    else if (a === '--users') o.users = v();
    else if (a === '--secret-file') o.secretFile = v();
    else if (a === '--client-id') o.clientId = v();
    else if (a === '--redirect-uri') o.redirectUri = v();
    else if (a === '--concurrency') o.concurrency = Number(v());
    else if (a === '--warmup') o.warmup = Number(v());
    else if (a === '--duration') o.duration = Number(v());
    else if (a === '--max-logins') o.maxLogins = Number(v());
    else if (a === '--once') o.once = true;
    else throw new Error(`unknown argument ${a}`);
  }
  for (const k of ['issuer', 'users', 'secretFile']) if (!o[k]) throw new Error(`--${k} is required`);
  return o;
}

const OPTS = args(process.argv.slice(2));
const STUDENTS = JSON.parse(fs.readFileSync(OPTS.users, 'utf8'));
const SECRET = fs.readFileSync(OPTS.secretFile, 'utf8').replace(/\n$/, '');
const formEnc = (s) => encodeURIComponent(s).replace(/%20/g, '+');
const BASIC = `Basic ${Buffer.from(`${formEnc(OPTS.clientId)}:${formEnc(SECRET)}`).toString('base64')}`;
const b64u = (b) => Buffer.from(b).toString('base64url');

function loopback(url) {
  const u = new URL(url);
  if (u.hostname !== '127.0.0.1') throw new Error(`refusing to contact ${u.href}`);
  return u;
}

function decode(s) {
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
  while ((m = re.exec(inner))) out[m[1].toLowerCase()] = decode(m[2] ?? m[3] ?? m[4] ?? '');
  return out;
}
/** The form with a password field: { action, hidden, names, submit }. */
function loginForm(html, pageUrl) {
  for (const m of html.matchAll(/<form\b[^>]*>[\s\S]*?<\/form>/gi)) {
    const a = attrs(m[0].match(/^<form\b[^>]*>/i)[0]);
    const form = { action: new URL(a.action || pageUrl, pageUrl).href, hidden: {}, names: new Set(), submit: {} };
    let submitSeen = false;
    for (const t of m[0].matchAll(/<(input|button)\b[^>]*>/gi)) {
      const ia = attrs(t[0]);
      if (!ia.name) continue;
      const type = (ia.type || (t[1].toLowerCase() === 'button' ? 'submit' : 'text')).toLowerCase();
      if (type === 'submit') {
        if (!submitSeen) form.submit = { [ia.name]: ia.value ?? '' };
        submitSeen = true;
        continue;
      }
      form.names.add(ia.name);
      if (type === 'hidden') form.hidden[ia.name] = ia.value ?? '';
    }
    if (form.names.has('password') || form.names.has('second_password')) return form;
  }
  return null;
}

class Browser {
  constructor() {
    this.cookies = new Map();
  }
  async request(url, { method = 'GET', form, headers = {} } = {}) {
    const u = loopback(url);
    const h = { ...headers };
    if (this.cookies.size) h.cookie = [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
    let body;
    if (form) {
      body = new URLSearchParams(form).toString();
      h['content-type'] = 'application/x-www-form-urlencoded';
    }
    if (method === 'POST') h.origin = u.origin;
    const res = await fetch(u, { method, headers: h, body, redirect: 'manual', signal: AbortSignal.timeout(60_000) });
    for (const line of res.headers.getSetCookie()) {
      const [pair, ...rest] = line.split(';');
      const i = pair.indexOf('=');
      const name = pair.slice(0, i).trim();
      const gone = rest.some((s) => /^\s*max-age=0\b/i.test(s) || /^\s*max-age=-/i.test(s));
      if (gone) this.cookies.delete(name);
      else this.cookies.set(name, pair.slice(i + 1).trim());
    }
    const text = await res.text();
    const loc = res.headers.get('location');
    return { url: u.href, status: res.status, text, location: loc ? new URL(loc, u).href : null };
  }
}

let META;
async function discover() {
  const res = await fetch(loopback(`${OPTS.issuer}/.well-known/openid-configuration`));
  if (!res.ok) throw new Error(`discovery: HTTP ${res.status}`);
  META = await res.json();
}

/** One complete sign-in; returns the token response. */
async function signIn(student) {
  const browser = new Browser();
  const verifier = b64u(crypto.randomBytes(32));
  const challenge = b64u(crypto.createHash('sha256').update(verifier).digest());
  const state = b64u(crypto.randomBytes(16));
  const auth = new URL(META.authorization_endpoint);
  for (const [k, v] of Object.entries({
    response_type: 'code',
    client_id: OPTS.clientId,
    redirect_uri: OPTS.redirectUri,
    scope: 'openid profile email',
    state,
    nonce: b64u(crypto.randomBytes(16)),
    code_challenge: challenge,
    code_challenge_method: 'S256',
  })) {
    auth.searchParams.set(k, v);
  }
  const rp = new URL(OPTS.redirectUri);
  let res = await browser.request(auth.href);
  let posted = false;
  let code;
  for (let hop = 0; hop < 12 && !code; hop++) {
    if (res.status >= 300 && res.status < 400 && res.location) {
      const loc = new URL(res.location);
      if (loc.origin === rp.origin && loc.pathname === rp.pathname) {
        if (loc.searchParams.get('error')) throw new Error(`authorization error ${loc.searchParams.get('error')}: ${loc.searchParams.get('error_description') ?? ''}`);
        if (loc.searchParams.get('state') !== state) throw new Error('state mismatch');
        code = loc.searchParams.get('code');
        break;
      }
      res = await browser.request(loc.href);
      continue;
    }
    if (res.status === 200 && !posted) {
      const form = loginForm(res.text, res.url);
      if (!form) throw new Error(`no login form at ${res.url}`);
      const fields = { ...form.hidden, ...form.submit, username: student.username, password: student.password, second_password: student.second_password };
      posted = true;
      res = await browser.request(form.action, { method: 'POST', form: fields });
      continue;
    }
    const alert = res.text.match(/role\s*=\s*["']alert["'][^>]*>([\s\S]*?)</i);
    throw new Error(`HTTP ${res.status} at ${new URL(res.url).pathname}${alert ? `: ${decode(alert[1]).trim()}` : ''}`);
  }
  if (!code) throw new Error('no code after 12 hops');
  const tokenRes = await fetch(loopback(META.token_endpoint), {
    method: 'POST',
    headers: { authorization: BASIC, 'content-type': 'application/x-www-form-urlencoded' },
    body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: OPTS.redirectUri, code_verifier: verifier }).toString(),
  });
  const tokens = await tokenRes.json().catch(() => ({}));
  if (!tokenRes.ok || !tokens.access_token || !tokens.id_token) throw new Error(`token: HTTP ${tokenRes.status} ${JSON.stringify(tokens).slice(0, 200)}`);
  return tokens;
}

function pct(sorted, q) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)];
}

async function main() {
  await discover();
  if (OPTS.once) {
    const tokens = await signIn(STUDENTS[0]);
    process.stdout.write(`${JSON.stringify(tokens)}\n`);
    return;
  }
  const start = performance.now();
  const measureFrom = start + OPTS.warmup * 1000;
  const deadline = measureFrom + OPTS.duration * 1000;
  const latencies = [];
  let failures = 0;
  let firstError = null;
  let started = 0;
  let completed = 0;
  async function worker(i) {
    const student = STUDENTS[i % STUDENTS.length];
    while (performance.now() < deadline && started < OPTS.maxLogins) {
      started++;
      const t0 = performance.now();
      try {
        await signIn(student);
        completed++;
        const t1 = performance.now();
        // Counted when it finished inside the measuring window.
        if (t1 > measureFrom && t1 <= deadline) latencies.push(t1 - t0);
      } catch (e) {
        failures++;
        firstError ??= e.message;
      }
    }
  }
  await Promise.all(Array.from({ length: OPTS.concurrency }, (_, i) => worker(i)));
  const end = Math.min(performance.now(), deadline);
  const seconds = Math.max(0.001, (end - measureFrom) / 1000);
  latencies.sort((a, b) => a - b);
  const out = {
    concurrency: OPTS.concurrency,
    students: Math.min(STUDENTS.length, OPTS.concurrency),
    logins: latencies.length,
    seconds: Number(seconds.toFixed(3)),
    logins_per_s: Number((latencies.length / seconds).toFixed(2)),
    p50_ms: latencies.length ? Number(pct(latencies, 0.5).toFixed(1)) : null,
    p99_ms: latencies.length ? Number(pct(latencies, 0.99).toFixed(1)) : null,
    max_ms: latencies.length ? Number(latencies[latencies.length - 1].toFixed(1)) : null,
    failures,
    first_error: firstError,
    // Every sign-in of the run, warm-up and tail included (for CPU per sign-in).
    completed_total: completed,
  };
  process.stdout.write(`${JSON.stringify(out)}\n`);
}

main().catch((e) => {
  process.stdout.write(`${JSON.stringify({ error: e.message })}\n`);
  process.exit(1);
});
