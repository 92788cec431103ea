// Everything the browser talks to, each on its own loopback port and temporary directory:
// nidan instances (`nidan serve --config`), a real slapd, a real SMTP sink and a tiny relying
// party that receives the authorization response.
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

import { sleep } from './harness.mjs';

/** Every temporary directory, removed at exit unless --keep. */
export const tempDirs = [];
/** Every child process we started, stopped at exit (by its own pid only). */
const children = new Set();

export function tempDir(label) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `nidan-browser-${label}-`));
  tempDirs.push(dir);
  return dir;
}

export function freePort() {
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

/** A child's environment: ours without any NIDAN_* variable, plus `extra`. */
function childEnv(extra = {}) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('NIDAN_')) env[k] = v;
  env.RUST_LOG = process.env.RUST_LOG ?? 'info';
  env.NO_COLOR = '1';
  return { ...env, ...extra };
}

/** TOML value writer (strings, numbers, booleans, arrays, inline tables). */
export function toml(v) {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  if (Array.isArray(v)) return `[${v.map(toml).join(', ')}]`;
  if (v && typeof v === 'object') {
    const parts = Object.entries(v).map(([k, x]) => `${/^[A-Za-z0-9_-]+$/.test(k) ? k : JSON.stringify(k)} = ${toml(x)}`);
    return `{ ${parts.join(', ')} }`;
  }
  throw new Error(`cannot write ${v} as TOML`);
}
export function tomlTable(obj) {
  return Object.entries(obj)
    .filter(([, v]) => v !== undefined)
    .map(([k, v]) => `${/^[A-Za-z0-9_-]+$/.test(k) ? k : JSON.stringify(k)} = ${toml(v)}`)
    .join('\n');
}

/** Stops every child we started (SIGTERM, then SIGKILL after 5 s). */
export async function stopChildren() {
  await Promise.all(
    [...children].map(async (child) => {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      const t = setTimeout(() => child.kill('SIGKILL'), 5000);
      await exited;
      clearTimeout(t);
    }),
  );
  children.clear();
}
/** Last resort at process exit: no waiting possible, kill what is left. */
export function killChildrenNow() {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}

function logTail(file, n) {
  try {
    return fs
      .readFileSync(file, 'utf8')
      .trimEnd()
      .split('\n')
      .slice(-n)
      .map((l) => `  | ${l}`)
      .join('\n');
  } catch {
    return '  | (no log)';
  }
}

/**
 * One nidan instance with its own configuration file, SQLite database, key-encryption key and
 * students. `directory` is the [directory] table (default: a file directory of `students`);
 * `mail` the [mail] table (default: the file transport, which enables /dev/mail and /demo).
 */
export class Nidan {
  constructor(bin, name, { students = [], extra = {}, tables = {}, directory, mail, clients = [], env = {} } = {}) {
    this.bin = bin;
    this.name = name;
    this.students = students;
    this.extra = extra;
    this.tables = tables;
    this.directory = directory;
    this.mail = mail;
    this.clients = clients;
    this.env = env;
  }

  url(p = '/') {
    return `${this.issuer}${p}`;
  }

  run(args, input) {
    const r = spawnSync(this.bin, ['--config', this.configPath, ...args], {
      cwd: this.dir,
      env: childEnv(this.env),
      input: input ?? '',
      encoding: 'utf8',
      timeout: 60_000,
    });
    if (r.error && r.error.code !== 'EPIPE') throw r.error;
    return r;
  }

  hashPassword(password) {
    const r = spawnSync(this.bin, ['hash-password'], { cwd: this.dir, env: childEnv(), input: password, encoding: 'utf8', timeout: 60_000 });
    const phc = (r.stdout ?? '').split('\n').map((l) => l.trim()).find((l) => l.startsWith('$argon2'));
    if (r.status !== 0 || !phc) throw new Error(`nidan hash-password exited ${r.status}: ${(r.stderr || r.stdout || '').trim().slice(0, 300)}`);
    return phc;
  }

  async prepare() {
    this.dir = tempDir(this.name);
    this.port = await freePort();
    this.issuer = `http://127.0.0.1:${this.port}`;
    fs.writeFileSync(path.join(this.dir, 'kek'), `${randomBytes(32).toString('base64')}\n`, { mode: 0o600 });
    let directory = this.directory;
    if (!directory) {
      const users = this.students
        .map((s) => `[[users]]\n${tomlTable({ username: s.username, password_hash: this.hashPassword(s.password), claims: s.claims })}\n`)
        .join('\n');
      fs.writeFileSync(path.join(this.dir, 'users.toml'), users);
      directory = { kind: 'file', path: path.join(this.dir, 'users.toml') };
    }
    const mail = this.mail ?? { transport: 'file', from: 'noreply@example.ac.jp', path: path.join(this.dir, 'mail') };
    const top = {
      issuer: this.issuer,
      listen: `127.0.0.1:${this.port}`,
      database_url: `sqlite://${path.join(this.dir, 'nidan.db')}`,
      key_encryption_key_file: path.join(this.dir, 'kek'),
      // English pages must carry no Japanese text, and this line is shown on every language's
      // pages (the default is Japanese): written in ASCII here.
      support_contact: 'Student Support Office 06-0000-0000 (weekdays 9:00-17:00)',
      ...this.extra,
    };
    const parts = [tomlTable(top), ''];
    for (const [name, table] of Object.entries(this.tables)) parts.push(`[${name}]`, tomlTable(table), '');
    const { claims, ...dirRest } = directory;
    parts.push('[directory]', tomlTable(dirRest), '');
    if (claims) parts.push('[directory.claims]', tomlTable(claims), '');
    parts.push('[mail]', tomlTable(mail), '');
    const clients = typeof this.clients === 'function' ? this.clients(this.dir) : this.clients;
    for (const c of clients) parts.push('[[clients]]', tomlTable(c), '');
    this.configPath = path.join(this.dir, 'nidan.toml');
    fs.writeFileSync(this.configPath, parts.join('\n'));
  }

  async start() {
    this.logPath = path.join(this.dir, 'server.log');
    const fd = fs.openSync(this.logPath, 'a');
    const child = spawn(this.bin, ['serve', '--config', this.configPath], {
      cwd: this.dir,
      env: childEnv(this.env),
      stdio: ['ignore', fd, fd],
    });
    fs.closeSync(fd);
    children.add(child);
    this.child = child;
    let exited = null;
    child.on('exit', (code, signal) => {
      exited = { code, signal };
      children.delete(child);
    });
    const deadline = Date.now() + 90_000;
    while (Date.now() < deadline) {
      if (exited) throw new Error(`nidan serve (${this.name}) exited ${JSON.stringify(exited)}; log:\n${this.logTail(30)}`);
      try {
        const res = await fetch(this.url('/readyz'), { signal: AbortSignal.timeout(2000) });
        if (res.ok) {
          this.ready = await res.json();
          return;
        }
      } catch {
        /* not up yet */
      }
      await sleep(200);
    }
    throw new Error(`nidan (${this.name}) not ready within 90 s; log:\n${this.logTail(30)}`);
  }

  /** `nidan user import` (JSON Lines) while the server runs on the same database. */
  importStudents(list) {
    if (list.length === 0) return;
    const lines = list.map((s) => JSON.stringify({ username: s.username, email: s.email, second_password: s.second })).join('\n');
    const file = path.join(this.dir, `import-${Date.now()}.jsonl`);
    fs.writeFileSync(file, `${lines}\n`);
    const r = this.run(['user', 'import', file]);
    if (r.status !== 0) throw new Error(`nidan user import exited ${r.status}: ${(r.stderr || r.stdout).trim().slice(0, 500)}`);
  }

  logTail(n = 30) {
    return logTail(this.logPath, n);
  }
}

// ---------------------------------------------------------------------------
// slapd
// ---------------------------------------------------------------------------

export const LDAP = {
  suffix: 'dc=example,dc=ac,dc=jp',
  people: 'ou=people,dc=example,dc=ac,dc=jp',
  adminDn: 'cn=admin,dc=example,dc=ac,dc=jp',
  adminPassword: 'admin-secret',
  serviceDn: 'cn=nidan,ou=services,dc=example,dc=ac,dc=jp',
  servicePassword: 'service-secret',
};

/** The LDAP students (university passwords satisfy every second-password rule on purpose). */
export const LDAP_STUDENTS = [
  { username: 's2401001', password: 'Daigaku2401Pass', cn: ['学生 太郎', 'Taro Gakusei'], sn: '学生', snKana: 'ガクセイ', givenName: '太郎', givenKana: 'タロウ', employeeNumber: 'S2401001' },
  { username: 's2401003', password: 'Daigaku2403Pass', cn: ['Alex Smith'], sn: 'Smith', givenName: 'Alex', employeeNumber: 'S2401003' },
];

function ldif() {
  const base = `dn: ${LDAP.suffix}
objectClass: dcObject
objectClass: organization
o: Example University
dc: example

dn: ${LDAP.people}
objectClass: organizationalUnit
ou: people

dn: ou=services,${LDAP.suffix}
objectClass: organizationalUnit
ou: services

dn: ${LDAP.serviceDn}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: nidan
userPassword: ${LDAP.servicePassword}
`;
  const people = LDAP_STUDENTS.map((s) => {
    const lines = [`dn: uid=${s.username},${LDAP.people}`, 'objectClass: inetOrgPerson', `uid: ${s.username}`];
    for (const cn of s.cn) lines.push(`cn: ${cn}`);
    lines.push(`sn: ${s.sn}`);
    if (s.snKana) lines.push(`sn;lang-ja;phonetic: ${s.snKana}`);
    lines.push(`givenName: ${s.givenName}`);
    if (s.givenKana) lines.push(`givenName;lang-ja;phonetic: ${s.givenKana}`);
    lines.push(`employeeNumber: ${s.employeeNumber}`, 'ou: student', `userPassword: ${s.password}`);
    return lines.join('\n');
  });
  return `${base}\n${people.join('\n\n')}\n`;
}

function slapdConf(root) {
  return `include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/inetorgperson.schema
include /etc/ldap/schema/nis.schema
attributeoptions lang- phonetic
pidfile ${root}/slapd.pid
argsfile ${root}/slapd.args
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "${LDAP.suffix}"
rootdn "${LDAP.adminDn}"
rootpw ${LDAP.adminPassword}
directory ${root}/db
access to dn.base="" by * read
access to attrs=userPassword by anonymous auth by * none
access to dn.subtree="${LDAP.people}" by self read by dn.exact="${LDAP.serviceDn}" read by * none
access to * by users read by * none
`;
}

export const SLAPD_BIN = '/usr/sbin/slapd';

/** Starts a throw-away slapd on a free loopback port; returns { url, directory (nidan table) }. */
export async function startSlapd() {
  const root = tempDir('slapd');
  fs.mkdirSync(path.join(root, 'db'));
  fs.writeFileSync(path.join(root, 'slapd.conf'), slapdConf(root));
  fs.writeFileSync(path.join(root, 'entries.ldif'), ldif());
  const add = spawnSync(path.join(path.dirname(SLAPD_BIN), 'slapadd'), ['-f', path.join(root, 'slapd.conf'), '-l', path.join(root, 'entries.ldif')], { encoding: 'utf8', timeout: 30_000 });
  if (add.status !== 0) throw new Error(`slapadd failed: ${(add.stderr || add.stdout || add.error?.message || '').trim().slice(0, 500)}`);
  const passwordFile = path.join(root, 'service-password');
  fs.writeFileSync(passwordFile, `${LDAP.servicePassword}\n`, { mode: 0o600 });
  let lastLog = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    const port = await freePort();
    const url = `ldap://127.0.0.1:${port}`;
    const logFile = path.join(root, 'slapd.log');
    const fd = fs.openSync(logFile, 'w');
    const child = spawn(SLAPD_BIN, ['-f', path.join(root, 'slapd.conf'), '-h', `${url}/`, '-d', '0'], { stdio: ['ignore', fd, fd] });
    fs.closeSync(fd);
    children.add(child);
    let exited = false;
    child.on('exit', () => {
      exited = true;
      children.delete(child);
    });
    for (let i = 0; i < 100 && !exited; i++) {
      if (await canConnect(port)) {
        return {
          url,
          child,
          directory: {
            kind: 'ldap',
            url,
            bind_dn: LDAP.serviceDn,
            bind_password_file: passwordFile,
            base_dn: LDAP.people,
            user_filter: '(uid={username})',
            id_attribute: 'entryUUID',
            timeout: '5s',
            claims: {
              name: 'cn',
              family_name: 'sn',
              given_name: 'givenName',
              'family_name#ja-Kana-JP': 'sn;lang-ja;phonetic',
              'given_name#ja-Kana-JP': 'givenName;lang-ja;phonetic',
              student_id: 'employeeNumber',
              affiliation: 'ou',
            },
          },
        };
      }
      await sleep(100);
    }
    if (!exited) child.kill('SIGKILL');
    lastLog = fs.readFileSync(logFile, 'utf8');
  }
  throw new Error(`slapd did not start:\n${lastLog.slice(-1000)}`);
}

function canConnect(port) {
  return new Promise((resolve) => {
    const s = net.connect({ host: '127.0.0.1', port }, () => {
      s.destroy();
      resolve(true);
    });
    s.on('error', () => resolve(false));
    s.setTimeout(1000, () => {
      s.destroy();
      resolve(false);
    });
  });
}

// ---------------------------------------------------------------------------
// SMTP sink
// ---------------------------------------------------------------------------

function decodeWords(s) {
  return s.replace(/=\?([^?]+)\?([bBqQ])\?([^?]*)\?=\s*(?==\?)|=\?([^?]+)\?([bBqQ])\?([^?]*)\?=/g, (...m) => {
    const enc = (m[2] ?? m[5]).toLowerCase();
    const text = m[3] ?? m[6];
    if (enc === 'b') return Buffer.from(text, 'base64').toString('utf8');
    return Buffer.from(
      text.replace(/_/g, ' ').replace(/=([0-9A-Fa-f]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16))),
      'latin1',
    ).toString('utf8');
  });
}

/** A plain-text mail (what nidan sends): headers, decoded subject and UTF-8 text body. */
export function parseMail(raw) {
  const text = raw.toString('latin1');
  const split = text.indexOf('\r\n\r\n') >= 0 ? text.indexOf('\r\n\r\n') : text.indexOf('\n\n');
  const head = text.slice(0, split).replace(/\r?\n[ \t]+/g, ' ');
  const bodyRaw = raw.subarray(Buffer.byteLength(text.slice(0, split), 'latin1')).toString('latin1').replace(/^\r?\n\r?\n/, '');
  const headers = {};
  for (const line of head.split(/\r?\n/)) {
    const i = line.indexOf(':');
    if (i > 0) headers[line.slice(0, i).trim().toLowerCase()] = line.slice(i + 1).trim();
  }
  const cte = (headers['content-transfer-encoding'] ?? '7bit').toLowerCase();
  let body;
  if (cte === 'base64') body = Buffer.from(bodyRaw.replace(/\s+/g, ''), 'base64').toString('utf8');
  else if (cte === 'quoted-printable') {
    body = Buffer.from(
      bodyRaw.replace(/=\r?\n/g, '').replace(/=([0-9A-Fa-f]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16))),
      'latin1',
    ).toString('utf8');
  } else body = Buffer.from(bodyRaw, 'latin1').toString('utf8');
  return { headers, subject: decodeWords(headers.subject ?? ''), contentType: headers['content-type'] ?? '', body: body.replace(/\r\n/g, '\n') };
}

/** A real SMTP server (the smtp-server package) on a loopback port that keeps every message. */
export async function startSmtpSink() {
  const { SMTPServer } = await import('smtp-server');
  const messages = [];
  const waiters = new Set();
  const server = new SMTPServer({
    secure: false,
    authOptional: true,
    disabledCommands: ['STARTTLS', 'AUTH'],
    logger: false,
    banner: 'nidan browser suite sink',
    onData(stream, session, callback) {
      const chunks = [];
      stream.on('data', (c) => chunks.push(c));
      stream.on('end', () => {
        const raw = Buffer.concat(chunks);
        const mail = { ...parseMail(raw), to: session.envelope.rcptTo.map((r) => r.address.toLowerCase()), from: session.envelope.mailFrom?.address, raw, seen: false };
        messages.push(mail);
        for (const w of waiters) w();
        callback(null, 'queued');
      });
    },
  });
  const port = await freePort();
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', resolve);
  });
  return {
    port,
    messages,
    /** The first not yet taken mail to `to` (matching `filter`), waiting up to `timeout` ms. */
    async take(to, { filter = () => true, timeout = 15_000 } = {}) {
      const deadline = Date.now() + timeout;
      for (;;) {
        const m = messages.find((x) => !x.seen && x.to.includes(to.toLowerCase()) && filter(x));
        if (m) {
          m.seen = true;
          return m;
        }
        const left = deadline - Date.now();
        if (left <= 0) throw new Error(`no mail to ${to} arrived at the SMTP sink within ${timeout / 1000} s (${messages.length} received in all)`);
        await new Promise((r) => {
          const w = () => {
            waiters.delete(w);
            clearTimeout(t);
            r();
          };
          const t = setTimeout(w, Math.min(left, 500));
          waiters.add(w);
        });
      }
    },
    close: () => new Promise((r) => server.close(r)),
  };
}

// ---------------------------------------------------------------------------
// A relying party's redirect_uri
// ---------------------------------------------------------------------------

/** A loopback HTTP listener standing for a relying party's callback page. */
export async function startRpListener() {
  const hits = [];
  const server = http.createServer((req, res) => {
    if (req.url.startsWith('/callback')) {
      hits.push(new URL(req.url, `http://${req.headers.host}`));
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
      res.end('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>Certificates (test RP)</title>'
        + '<link rel="icon" href="data:,"></head><body><main><h1>Callback received</h1></main></body></html>');
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found');
  });
  const port = await freePort();
  await new Promise((resolve) => server.listen(port, '127.0.0.1', resolve));
  return { port, redirectUri: `http://127.0.0.1:${port}/callback`, hits, close: () => new Promise((r) => server.close(r)) };
}
