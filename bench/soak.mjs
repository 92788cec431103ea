#!/usr/bin/env node
// Soak traffic for several nidan replicas sharing one store (bench/replicas.mjs runs it; see the
// "Replicas and soak" section of bench/README.md). Open-loop mixed traffic at fixed rates, every
// request to the next replica in turn (client-side round robin, like an L4 load balancer without
// sticky sessions — a full login's hops land on different replicas too):
//
//   discovery, JWKS, client_credentials, introspection and userinfo of user access tokens minted
//   moments before (often by the other replica), refresh (rotating refresh tokens, each used by
//   one request at a time), and full code flows with login (authorize → login page → POST user ID
//   + university password + second password → code → token) at a low rate.
//
//   node soak.mjs --replica URL --replica URL --issuer URL --users FILE --secret-file FILE
//        [--pid NAME=PID ...] [--duration 600] [--warmup 30] [--sample 30]
//        [--rates discovery=40,jwks=40,client_credentials=40,introspection=40,userinfo=40,refresh=20,login=2]
//        [--max-requests N] [--max-in-flight 64] [--access-max-age 90] [--out FILE]
//
// Bounded by time (warm-up + duration, then at most 10 s for requests in flight) and by request
// count (--max-requests, default 1.1 × the planned number). Every answer that is not 2xx/3xx, or
// 2xx with a wrong body (inactive token, no access token…), and every connection error or timeout
// (10 s) is an error; the first 100 are kept with replica, stream, status and body excerpt.
// VmRSS/VmHWM and CPU of each --pid are sampled after the warm-up, every --sample seconds, at the
// end of the traffic and 5 s after it. Prints one JSON line (also written to --out).
// Only 127.0.0.1 is ever contacted.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';

// ---------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------

const O = {
  replicas: [],
  pids: [],
  duration: 600,
  warmup: 30,
  sample: 30,
  rates: { discovery: 40, jwks: 40, client_credentials: 40, introspection: 40, userinfo: 40, refresh: 20, login: 2 },
  maxRequests: 0,
  maxInFlight: 64,
  accessMaxAge: 90,
  clientId: 'bench',
  redirectUri: 'http://127.0.0.1:9/cb',
  out: null,
};
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const v = () => argv[++i];
    if (a === '--replica') O.replicas.push(v().replace(/\/$/, ''));
    else if (a === '--issuer') O.issuer = v().replace(/\/$/, '');
    else if (a === '--users') O.users = v();
    else if (a === '--secret-file') O.secretFile = v();
    else if (a === '--pid') {
      const [name, pid] = v().split('=');
      O.pids.push({ name, pid: Number(pid) });
    } else if (a === '--duration') O.duration = Number(v());
    else if (a === '--warmup') O.warmup = Number(v());
    else if (a === '--sample') O.sample = Number(v());
    else if (a === '--rates') {
      for (const kv of v().split(',')) {
        const [k, r] = kv.split('=');
        if (!(k in O.rates)) throw new Error(`unknown stream ${k}`);
        O.rates[k] = Number(r);
      }
    } else if (a === '--max-requests') O.maxRequests = Number(v());
    else if (a === '--max-in-flight') O.maxInFlight = Number(v());
    else if (a === '--access-max-age') O.accessMaxAge = Number(v());
    else if (a === '--out') O.out = v();
    else throw new Error(`unknown argument ${a}`);
  }
  for (const k of ['issuer', 'users', 'secretFile']) if (!O[k]) throw new Error(`--${k} is required`);
  if (!O.replicas.length) throw new Error('--replica is required');
  for (const u of [O.issuer, ...O.replicas]) if (new URL(u).hostname !== '127.0.0.1') throw new Error(`refusing ${u}: loopback only`);
  // Each login is about 7 requests (authorize, login page, POST, redirects, token).
  const planned = Object.entries(O.rates).reduce((a, [k, r]) => a + r * (k === 'login' ? 7 : 1), 0) * (O.warmup + O.duration);
  if (!O.maxRequests) O.maxRequests = Math.ceil(planned * 1.1);
  O.planned = Math.round(planned);
}

const STUDENTS = JSON.parse(fs.readFileSync(O.users, 'utf8'));
const SECRET = fs.readFileSync(O.secretFile, 'utf8').replace(/\n$/, '');
const formEnc = (s) => encodeURIComponent(s).replace(/%20/g, '+');
const BASIC = `Basic ${Buffer.from(`${formEnc(O.clientId)}:${formEnc(SECRET)}`).toString('base64')}`;
const ISSUER_ORIGIN = new URL(O.issuer).origin;
const b64u = (b) => Buffer.from(b).toString('base64url');
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const now = () => performance.now();

// ---------------------------------------------------------------------------
// HTTP: one keep-alive agent per replica, round robin, 10 s timeout
// ---------------------------------------------------------------------------

const agents = O.replicas.map(() => new http.Agent({ keepAlive: true, maxSockets: 32 }));
let rr = 0;
const nextReplica = () => rr++ % O.replicas.length;

let issued = 0;
let capped = false;
let inFlight = 0;

/** Sends one request to replica `r`; `url` may name the issuer's origin (rewritten to the replica). */
function send(r, url, { method = 'GET', headers = {}, body } = {}) {
  const u = new URL(url, O.replicas[r]);
  const target = new URL(O.replicas[r]);
  if (u.origin !== ISSUER_ORIGIN && u.origin !== target.origin) throw new Error(`refusing ${u.origin}`);
  issued++;
  inFlight++;
  return new Promise((resolve) => {
    const t0 = now();
    const req = http.request(
      { host: target.hostname, port: target.port, path: u.pathname + u.search, method, headers, agent: agents[r] },
      (res) => {
        if (phase === 'measure') statusCounts[res.statusCode] = (statusCounts[res.statusCode] ?? 0) + 1;
        const chunks = [];
        res.on('data', (c) => chunks.push(c));
        res.on('end', () => {
          inFlight--;
          resolve({ status: res.statusCode, headers: res.headers, text: Buffer.concat(chunks).toString('utf8'), ms: now() - t0, replica: r });
        });
        res.on('error', (e) => {
          inFlight--;
          resolve({ status: 0, error: e.code || e.message, ms: now() - t0, replica: r });
        });
      },
    );
    req.setTimeout(10_000, () => req.destroy(Object.assign(new Error('timeout after 10 s'), { code: 'TIMEOUT' })));
    req.on('error', (e) => {
      inFlight--;
      if (phase === 'measure') statusCounts[e.code || 'error'] = (statusCounts[e.code || 'error'] ?? 0) + 1;
      resolve({ status: 0, error: e.code || e.message, ms: now() - t0, replica: r });
    });
    if (body) req.end(body);
    else req.end();
  });
}

// ---------------------------------------------------------------------------
// Accounting
// ---------------------------------------------------------------------------

let phase = 'warmup'; // warmup | measure | drain
const STREAMS = ['discovery', 'jwks', 'client_credentials', 'introspection', 'userinfo', 'refresh', 'login'];
const stats = {};
for (const p of ['warmup', 'measure', 'drain']) {
  stats[p] = {};
  for (const s of STREAMS) stats[p][s] = { ok: 0, errors: 0, skipped_busy: 0, skipped_no_token: 0, per_replica: O.replicas.map(() => ({ ok: 0, errors: 0 })), ms: [] };
}
const errorLog = [];
const errorKinds = {};
const statusCounts = {}; // every HTTP answer of the measured window by status
let loginRequests = 0;

function note(stream, res, okBody = true, why = '') {
  const st = stats[phase][stream];
  const good = res.status >= 200 && res.status < 400 && okBody;
  if (good) return true;
  const kind = `${stream} ${res.status ? `HTTP ${res.status}` : res.error}${why ? ` (${why})` : ''}`;
  errorKinds[kind] = (errorKinds[kind] ?? 0) + 1;
  if (errorLog.length < 100) {
    errorLog.push({
      t_s: Number(((now() - T0) / 1000).toFixed(1)),
      phase,
      stream,
      replica: res.replica,
      status: res.status,
      error: res.error,
      why,
      request_id: res.headers?.['x-request-id'],
      body: res.text?.slice(0, 300),
    });
  }
  return false;
}

function count(stream, r, good, ms) {
  const st = stats[phase][stream];
  if (good) {
    st.ok++;
    st.per_replica[r].ok++;
    if (phase === 'measure') st.ms.push(ms);
  } else {
    st.errors++;
    st.per_replica[r].errors++;
  }
}

// ---------------------------------------------------------------------------
// Token pools
// ---------------------------------------------------------------------------

/** User access tokens, newest last: { token, at }. */
const access = [];
function pushAccess(token) {
  access.push({ token, at: now() });
  if (access.length > 512) access.splice(0, access.length - 512);
}
function anyAccess() {
  const young = now() - O.accessMaxAge * 1000;
  while (access.length && access[0].at < young) access.shift();
  if (!access.length) return null;
  return access[Math.floor(Math.random() * access.length)].token;
}
/** Refresh tokens, each held by at most one request (taken out, the rotated one put back). */
const refresh = [];
function pushRefresh(token) {
  refresh.push(token);
  if (refresh.length > 256) refresh.splice(0, refresh.length - 256);
}
let refreshesDone = 0;

// ---------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------

const FORM = { authorization: BASIC, 'content-type': 'application/x-www-form-urlencoded' };
let DISCOVERY;

const json = (text) => {
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
};

const streams = {
  async discovery() {
    const r = nextReplica();
    const res = await send(r, '/.well-known/openid-configuration');
    const ok = res.status !== 200 || json(res.text)?.issuer === O.issuer;
    count('discovery', r, note('discovery', res, ok, ok ? '' : 'wrong issuer'), res.ms);
  },
  async jwks() {
    const r = nextReplica();
    const res = await send(r, '/jwks');
    const ok = res.status !== 200 || (json(res.text)?.keys?.length ?? 0) > 0;
    count('jwks', r, note('jwks', res, ok, ok ? '' : 'no keys'), res.ms);
  },
  async client_credentials() {
    const r = nextReplica();
    const res = await send(r, '/token', { method: 'POST', headers: FORM, body: 'grant_type=client_credentials' });
    const ok = res.status !== 200 || !!json(res.text)?.access_token;
    count('client_credentials', r, note('client_credentials', res, ok, ok ? '' : 'no access_token'), res.ms);
  },
  async introspection() {
    const token = anyAccess();
    if (!token) return void stats[phase].introspection.skipped_no_token++;
    const r = nextReplica();
    const res = await send(r, '/introspect', { method: 'POST', headers: FORM, body: `token=${token}&token_type_hint=access_token` });
    const body = res.status === 200 ? json(res.text) : null;
    const ok = res.status !== 200 || body?.active === true;
    count('introspection', r, note('introspection', res, ok, ok ? '' : `active=${body?.active}`), res.ms);
  },
  async userinfo() {
    const token = anyAccess();
    if (!token) return void stats[phase].userinfo.skipped_no_token++;
    const r = nextReplica();
    const res = await send(r, '/userinfo', { headers: { authorization: `Bearer ${token}` } });
    const ok = res.status !== 200 || !!json(res.text)?.sub;
    count('userinfo', r, note('userinfo', res, ok, ok ? '' : 'no sub'), res.ms);
  },
  async refresh() {
    const token = refresh.shift();
    if (!token) return void stats[phase].refresh.skipped_no_token++;
    const r = nextReplica();
    const res = await send(r, '/token', { method: 'POST', headers: FORM, body: `grant_type=refresh_token&refresh_token=${encodeURIComponent(token)}` });
    const body = res.status === 200 ? json(res.text) : null;
    const ok = res.status !== 200 || (!!body?.access_token && !!body?.refresh_token);
    const good = note('refresh', res, ok, ok ? '' : 'no access_token/refresh_token');
    count('refresh', r, good, res.ms);
    if (good) {
      refreshesDone++;
      pushRefresh(body.refresh_token);
      pushAccess(body.access_token);
    }
  },
  async login() {
    const t0 = now();
    const student = STUDENTS[loginSeq++ % STUDENTS.length];
    let last;
    try {
      const tokens = await signIn(student, (res) => {
        last = res;
        loginRequests++;
      });
      pushAccess(tokens.access_token);
      if (tokens.refresh_token) pushRefresh(tokens.refresh_token);
      else throw Object.assign(new Error('no refresh_token (offline_access)'), { res: last });
      count('login', last.replica, true, now() - t0);
    } catch (e) {
      const res = e.res ?? last ?? { status: 0, error: e.message, replica: 0 };
      note('login', { ...res, error: res.error ?? e.message }, false, e.message.slice(0, 200));
      count('login', res.replica ?? 0, false, now() - t0);
    }
  },
};
let loginSeq = 0;

// ---------------------------------------------------------------------------
// A full login, every hop to the next replica (cookies kept per browser)
// ---------------------------------------------------------------------------

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
  constructor(onResponse) {
    this.cookies = new Map();
    this.onResponse = onResponse;
  }
  async request(url, { method = 'GET', form } = {}) {
    const h = {};
    if (this.cookies.size) h.cookie = [...this.cookies].map(([k, v]) => `${k}=${v}`).join('; ');
    let body;
    if (form) {
      body = new URLSearchParams(form).toString();
      h['content-type'] = 'application/x-www-form-urlencoded';
    }
    // The browser only ever sees the issuer's origin; the load balancer picks the replica.
    if (method === 'POST') h.origin = ISSUER_ORIGIN;
    const r = nextReplica();
    const res = await send(r, url, { method, headers: h, body });
    this.onResponse(res);
    if (res.status === 0) throw Object.assign(new Error(`${new URL(url).pathname}: ${res.error}`), { res });
    const setCookie = res.headers['set-cookie'] ?? [];
    for (const line of setCookie) {
      const [pair, ...rest] = line.split(';');
      const i = pair.indexOf('=');
      const name = pair.slice(0, i).trim();
      const gone = rest.some((s) => /^\s*max-age=0\b/i.test(s) || /^\s*max-age=-/i.test(s));
      if (gone) this.cookies.delete(name);
      else this.cookies.set(name, pair.slice(i + 1).trim());
    }
    // Locations are resolved against the issuer (what the browser believes it talks to).
    const u = new URL(url, O.issuer);
    const seen = `${ISSUER_ORIGIN}${u.pathname}${u.search}`;
    const loc = res.headers.location;
    return { ...res, url: seen, location: loc ? new URL(loc, seen).href : null };
  }
}

async function signIn(student, onResponse) {
  const browser = new Browser(onResponse);
  const verifier = b64u(crypto.randomBytes(32));
  const challenge = b64u(crypto.createHash('sha256').update(verifier).digest());
  const state = b64u(crypto.randomBytes(16));
  const auth = new URL(DISCOVERY.authorization_endpoint);
  for (const [k, v] of Object.entries({
    response_type: 'code',
    client_id: O.clientId,
    redirect_uri: O.redirectUri,
    scope: 'openid profile email offline_access',
    state,
    nonce: b64u(crypto.randomBytes(16)),
    code_challenge: challenge,
    code_challenge_method: 'S256',
  })) {
    auth.searchParams.set(k, v);
  }
  const rp = new URL(O.redirectUri);
  const fail = (res, msg) => Object.assign(new Error(msg), { res });
  let res = await browser.request(auth.href);
  let posted = false;
  let code;
  for (let hop = 0; hop < 12 && !code; hop++) {
    if (res.status >= 300 && res.status < 400 && res.location) {
      const loc = new URL(res.location);
      if (loc.origin === rp.origin && loc.pathname === rp.pathname) {
        if (loc.searchParams.get('error')) throw fail(res, `authorization error ${loc.searchParams.get('error')}: ${loc.searchParams.get('error_description') ?? ''}`);
        if (loc.searchParams.get('state') !== state) throw fail(res, 'state mismatch');
        code = loc.searchParams.get('code');
        break;
      }
      res = await browser.request(loc.href);
      continue;
    }
    if (res.status === 200 && !posted) {
      const form = loginForm(res.text, res.url);
      if (!form) throw fail(res, `no login form at ${new URL(res.url).pathname}`);
      const fields = { ...form.hidden, ...form.submit, username: student.username, password: student.password, second_password: student.second_password };
      posted = true;
      res = await browser.request(form.action, { method: 'POST', form: fields });
      continue;
    }
    const alert = res.text?.match(/role\s*=\s*["']alert["'][^>]*>([\s\S]*?)</i);
    throw fail(res, `HTTP ${res.status} at ${new URL(res.url).pathname}${alert ? `: ${decode(alert[1]).trim()}` : ''}`);
  }
  if (!code) throw fail(res, 'no code after 12 hops');
  const r = nextReplica();
  const tr = await send(r, DISCOVERY.token_endpoint, {
    method: 'POST',
    headers: FORM,
    body: new URLSearchParams({ grant_type: 'authorization_code', code, redirect_uri: O.redirectUri, code_verifier: verifier }).toString(),
  });
  onResponse(tr);
  const tokens = tr.status === 200 ? json(tr.text) : null;
  if (!tokens?.access_token || !tokens?.id_token) throw fail(tr, `token: HTTP ${tr.status || tr.error} ${(tr.text ?? '').slice(0, 200)}`);
  // The ID token's key must be published by every replica (checked against the JWKS read at start).
  const kid = json(Buffer.from(tokens.id_token.split('.')[0], 'base64url').toString())?.kid;
  if (kid && !JWKS_KIDS.has(kid)) throw fail(tr, `ID token kid ${kid} is not in JWKS`);
  return tokens;
}
let JWKS_KIDS = new Set();

// ---------------------------------------------------------------------------
// Memory and CPU of the servers
// ---------------------------------------------------------------------------

function procSample(pid) {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    const field = (k) => Number(status.match(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm'))?.[1]);
    const f = fs.readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return { rss_kb: field('VmRSS'), hwm_kb: field('VmHWM'), threads: Number(status.match(/^Threads:\s+(\d+)/m)?.[1]), cpu_ms: (Number(f[11]) + Number(f[12])) * 10 };
  } catch (e) {
    return { error: `pid ${pid}: ${e.code ?? e.message}` };
  }
}
const samples = [];
function sampleAll(label) {
  const t = Number(((now() - T0) / 1000 - O.warmup).toFixed(1));
  const s = { label, t_s: t, requests: issued, self_rss_kb: Math.round(process.memoryUsage().rss / 1024) };
  for (const p of O.pids) s[p.name] = procSample(p.pid);
  samples.push(s);
  return s;
}

// ---------------------------------------------------------------------------
// Main: open-loop schedulers at fixed rates
// ---------------------------------------------------------------------------

let T0;

async function main() {
  // Discovery and JWKS through every replica first: all must agree.
  const docs = [];
  const kidsets = [];
  for (let r = 0; r < O.replicas.length; r++) {
    const d = await send(r, '/.well-known/openid-configuration');
    const j = await send(r, '/jwks');
    if (d.status !== 200 || j.status !== 200) throw new Error(`replica ${O.replicas[r]}: discovery ${d.status || d.error}, JWKS ${j.status || j.error}`);
    docs.push(d.text);
    kidsets.push(JSON.parse(j.text).keys.map((k) => k.kid).sort().join(' '));
  }
  if (new Set(docs).size !== 1) throw new Error('the replicas publish different discovery documents');
  if (new Set(kidsets).size !== 1) throw new Error(`the replicas publish different JWKS: ${JSON.stringify(kidsets)}`);
  DISCOVERY = JSON.parse(docs[0]);
  JWKS_KIDS = new Set(kidsets[0].split(' '));
  issued = 0;

  T0 = now();
  const measureFrom = T0 + O.warmup * 1000;
  const until = measureFrom + O.duration * 1000;
  const pending = new Set();
  const launched = Object.fromEntries(STREAMS.map((s) => [s, 0]));
  const loginCap = Math.max(4, Math.ceil(O.rates.login * 4));
  const inFlightOf = Object.fromEntries(STREAMS.map((s) => [s, 0]));
  let nextSample = measureFrom;

  while (true) {
    const t = now();
    if (phase === 'warmup' && t >= measureFrom) {
      phase = 'measure';
      sampleAll('start');
      nextSample = measureFrom + O.sample * 1000;
    }
    if (phase === 'measure' && t >= nextSample && t < until - 1000) {
      sampleAll('sample');
      nextSample += O.sample * 1000;
    }
    if (t >= until) break;
    const elapsed = (t - T0) / 1000;
    for (const s of STREAMS) {
      const due = Math.floor(elapsed * O.rates[s]);
      while (launched[s] < due) {
        launched[s]++;
        const cap = s === 'login' ? loginCap : O.maxInFlight;
        if (issued >= O.maxRequests) {
          capped = true;
          continue;
        }
        if (inFlightOf[s] >= cap) {
          stats[phase][s].skipped_busy++;
          continue;
        }
        inFlightOf[s]++;
        const p = streams[s]().catch((e) => {
          errorKinds[`${s} driver: ${e.message}`] = (errorKinds[`${s} driver: ${e.message}`] ?? 0) + 1;
        }).finally(() => {
          inFlightOf[s]--;
          pending.delete(p);
        });
        pending.add(p);
      }
    }
    await sleep(5);
  }
  const end = sampleAll('end');
  phase = 'drain';
  const drainUntil = now() + 10_000;
  while (pending.size && now() < drainUntil) await sleep(50);
  const unfinished = pending.size;
  await sleep(5000);
  sampleAll('after 5 s idle');
  for (const a of agents) a.destroy();

  const pct = (xs, q) => {
    if (!xs.length) return null;
    const s = [...xs].sort((a, b) => a - b);
    return Number(s[Math.min(s.length - 1, Math.ceil(q * s.length) - 1)].toFixed(2));
  };
  const summary = (p) =>
    Object.fromEntries(
      STREAMS.map((s) => {
        const st = stats[p][s];
        return [s, { ok: st.ok, errors: st.errors, skipped_busy: st.skipped_busy, skipped_no_token: st.skipped_no_token, per_replica: st.per_replica, p50_ms: pct(st.ms, 0.5), p99_ms: pct(st.ms, 0.99), max_ms: st.ms.length ? Number(Math.max(...st.ms).toFixed(1)) : null, rate_per_s: Number((st.ok / O.duration).toFixed(2)) }];
      }),
    );
  const start = samples.find((s) => s.label === 'start');
  const growth = {};
  for (const p of O.pids) {
    const a = start?.[p.name]?.rss_kb;
    const b = end[p.name]?.rss_kb;
    growth[p.name] = { start_kb: a, end_kb: b, growth_pct: a && b ? Number(((100 * (b - a)) / a).toFixed(1)) : null, peak_kb: Math.max(...samples.map((s) => s[p.name]?.rss_kb ?? 0)), hwm_end_kb: end[p.name]?.hwm_kb };
  }
  const measured = summary('measure');
  const out = {
    settings: { replicas: O.replicas, issuer: O.issuer, duration_s: O.duration, warmup_s: O.warmup, sample_s: O.sample, rates: O.rates, max_requests: O.maxRequests, planned_requests: O.planned, max_in_flight: O.maxInFlight, access_max_age_s: O.accessMaxAge },
    requests_issued: issued,
    capped,
    unfinished_after_drain: unfinished,
    login_requests: loginRequests,
    refreshes: refreshesDone,
    errors_total: STREAMS.reduce((a, s) => a + stats.warmup[s].errors + stats.measure[s].errors + stats.drain[s].errors, 0),
    errors_measured: STREAMS.reduce((a, s) => a + stats.measure[s].errors, 0),
    error_kinds: errorKinds,
    errors_first: errorLog,
    status_counts_measured: statusCounts,
    measured,
    warmup: summary('warmup'),
    drain: Object.fromEntries(STREAMS.map((s) => [s, { ok: stats.drain[s].ok, errors: stats.drain[s].errors }])),
    rss: growth,
    samples,
  };
  const line = JSON.stringify(out);
  if (O.out) fs.writeFileSync(O.out, `${JSON.stringify(out, null, 2)}\n`);
  process.stdout.write(`${line}\n`);
}

main().catch((e) => {
  process.stdout.write(`${JSON.stringify({ error: e.stack ?? e.message })}\n`);
  process.exit(1);
});
