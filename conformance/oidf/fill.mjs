#!/usr/bin/env node
// The OpenID Foundation conformance suite plan configurations for nidan: which plans, which
// clients each needs (and the `nidan client add` commands that register them), and the filling
// of the JSON templates beside this file with a deployment's values.
//
//   node conformance/oidf/fill.mjs commands --issuer https://idp.example.ac.jp [--config FILE]
//       prints the `nidan client add` commands for every client the plans use
//   node conformance/oidf/fill.mjs fill --values values.json --out DIR
//       writes the four configurations with every {{…}} placeholder replaced
//
// values.json: { "issuer": "https://idp.example.ac.jp", "username": "…", "password": "…",
//                "second_password": "…", "secrets": { "oidf-basic": "…", … } }
//
// Nothing here contacts any network: the operator uploads the written files to the suite.

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));

/** The hosted suite; its test URLs are https://www.certification.openid.net/test/a/<alias>/… */
export const SUITE = 'https://www.certification.openid.net';

const SCOPES = ['openid', 'profile', 'email', 'offline_access'];

/**
 * The plans: the suite's plan name, the variant to pick when creating the plan, the template,
 * its alias and the clients to register (client_id, token endpoint authentication, logout URIs).
 */
export const PLANS = [
  {
    name: 'Basic OP',
    plan: 'oidcc-basic-certification-test-plan',
    variant: { server_metadata: 'discovery', client_registration: 'static_client' },
    file: 'basic-op.json',
    alias: 'nidan-basic',
    clients: [
      { id: 'oidf-basic', key: 'client', auth: 'client_secret_basic' },
      { id: 'oidf-basic-2', key: 'client2', auth: 'client_secret_basic' },
      { id: 'oidf-basic-post', key: 'client_secret_post', auth: 'client_secret_post' },
    ],
  },
  {
    name: 'Config OP',
    plan: 'oidcc-config-certification-test-plan',
    variant: {},
    file: 'config-op.json',
    alias: 'nidan-config',
    clients: [],
  },
  {
    name: 'RP-Initiated Logout OP',
    plan: 'oidcc-rp-initiated-logout-certification-test-plan',
    variant: { response_type: 'code', client_registration: 'static_client' },
    file: 'rp-initiated-logout-op.json',
    alias: 'nidan-rp-logout',
    clients: [{ id: 'oidf-rp-logout', key: 'client', auth: 'client_secret_basic', postLogout: true }],
  },
  {
    name: 'Back-Channel Logout OP',
    plan: 'oidcc-backchannel-rp-initiated-logout-certification-test-plan',
    variant: { response_type: 'code', client_registration: 'static_client' },
    file: 'backchannel-logout-op.json',
    alias: 'nidan-bc-logout',
    clients: [{ id: 'oidf-bc-logout', key: 'client', auth: 'client_secret_basic', postLogout: true, backchannel: true }],
  },
];

/** The suite URLs of one alias (what the suite's test modules use for static clients). */
export function suiteUris(alias, suite = SUITE) {
  const base = `${suite}/test/a/${alias}`;
  return {
    callback: `${base}/callback`,
    postLogout: `${base}/post_logout_redirect`,
    backchannel: `${base}/backchannel_logout`,
  };
}

/**
 * `nidan client add` argument lists, one per client of every plan. `suite` can be replaced (the
 * offline check registers loopback twins); `suffix` is appended to each client_id then.
 */
export function registrations({ suite = SUITE, suffix = '' } = {}) {
  const out = [];
  for (const p of PLANS) {
    const uris = suiteUris(p.alias, suite);
    for (const c of p.clients) {
      const args = ['client', 'add', `${c.id}${suffix}`, '--redirect-uri', uris.callback, '--auth-method', c.auth];
      for (const s of SCOPES) args.push('--scope', s);
      if (c.postLogout) args.push('--post-logout-redirect-uri', uris.postLogout);
      if (c.backchannel) args.push('--backchannel-logout-uri', uris.backchannel);
      args.push('--name', `OpenID Foundation conformance suite (${p.name})`);
      out.push({ plan: p, client: c, args });
    }
  }
  return out;
}

const shellQuote = (a) => (/^[A-Za-z0-9_./:@=,+-]+$/.test(a) ? a : `'${a.replace(/'/g, `'\\''`)}'`);

/** The template of a plan, parsed. */
export function template(plan) {
  return JSON.parse(fs.readFileSync(path.join(HERE, plan.file), 'utf8'));
}

/** Every {{…}} placeholder in a JSON value. */
export function placeholders(value) {
  const found = new Set();
  JSON.stringify(value).replace(/\{\{([^}]+)\}\}/g, (_, p) => found.add(p));
  return [...found];
}

/** Replaces the placeholders; throws when a value is missing. */
export function fill(value, values) {
  const issuer = String(values.issuer ?? '').replace(/\/+$/, '');
  const lookup = (p) => {
    if (p === 'ISSUER') return issuer;
    if (p === 'USERNAME') return values.username;
    if (p === 'PASSWORD') return values.password;
    if (p === 'SECOND_PASSWORD') return values.second_password;
    if (p.startsWith('SECRET:')) return values.secrets?.[p.slice(7)];
    return undefined;
  };
  const walk = (v) => {
    if (typeof v === 'string') {
      return v.replace(/\{\{([^}]+)\}\}/g, (_, p) => {
        const x = lookup(p);
        if (x === undefined || x === null || x === '') throw new Error(`no value for {{${p}}}`);
        return String(x);
      });
    }
    if (Array.isArray(v)) return v.map(walk);
    if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, walk(x)]));
    return v;
  };
  return walk(value);
}

function main(argv) {
  const [cmd, ...rest] = argv;
  const opt = (name) => {
    const i = rest.indexOf(name);
    return i >= 0 ? rest[i + 1] : undefined;
  };
  if (cmd === 'commands') {
    const issuer = opt('--issuer');
    const config = opt('--config');
    for (const r of registrations()) {
      const args = config ? [...r.args, '--config', config] : r.args;
      console.log(`# ${r.plan.name}: "${r.client.key}" of ${r.plan.file}`);
      console.log(`nidan ${args.map(shellQuote).join(' ')}`);
    }
    if (issuer) {
      console.log(`\n# discovery the suite will read: ${issuer.replace(/\/+$/, '')}/.well-known/openid-configuration`);
    }
    return 0;
  }
  if (cmd === 'fill') {
    const valuesFile = opt('--values');
    const out = opt('--out');
    if (!valuesFile || !out) {
      console.error('usage: fill.mjs fill --values values.json --out DIR');
      return 2;
    }
    const values = JSON.parse(fs.readFileSync(valuesFile, 'utf8'));
    if (!/^https:\/\//.test(values.issuer ?? '')) {
      console.error('values.issuer must be the public https issuer (the suite runs on the internet)');
      return 2;
    }
    fs.mkdirSync(out, { recursive: true });
    for (const p of PLANS) {
      const filled = fill(template(p), values);
      const file = path.join(out, p.file);
      fs.writeFileSync(file, `${JSON.stringify(filled, null, 2)}\n`, { mode: 0o600 });
      const v = Object.entries(p.variant).map(([k, x]) => `${k}=${x}`).join(', ');
      console.log(`${file}: plan ${p.plan}${v ? ` (${v})` : ''}`);
    }
    return 0;
  }
  console.error('usage: fill.mjs commands --issuer URL [--config FILE] | fill --values values.json --out DIR');
  return 2;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exitCode = main(process.argv.slice(2));
}
