#!/usr/bin/env node
// The peer: the certified `oidc-provider` (npm), configured like the nidan instance that
// bench.mjs starts, so that both answer the same requests with the same work:
//   - RS256 ID tokens (one 2048-bit RSA key), opaque access tokens, 1 h access token lifetime;
//   - one confidential client, client_secret_basic, authorization_code + client_credentials,
//     PKCE S256 (nidan accepts it for every client; the driver always sends it);
//   - the same endpoint paths as nidan (/authorize, /token, /userinfo, /introspect, /jwks);
//   - login: user ID + university password + second password, each checked with argon2id at
//     nidan's production parameters (m=19456 KiB, t=2, p=1) through the `argon2` npm package:
//     two verifications per login, like nidan with its file directory; an unknown user pays a
//     dummy verification; a CSRF token bound to the interaction; no consent page (the grant is
//     created for the registered client, as nidan shows none).
// Storage is oidc-provider's built-in in-memory adapter (nidan writes to SQLite on disk), which
// favours the peer.
//
//   node peer/server.mjs --port PORT --users users.json --client-secret-file FILE
//
// users.json: [{ username, password_hash, second_password_hash, claims }]. Listens on
// 127.0.0.1 only.
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';

import argon2 from 'argon2';
import Provider from 'oidc-provider';

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (fallback === undefined) {
    console.error(`missing --${name}`);
    process.exit(2);
  }
  return fallback;
}

const port = Number(arg('port'));
const issuer = `http://127.0.0.1:${port}`;
const users = new Map(JSON.parse(fs.readFileSync(arg('users'), 'utf8')).map((u) => [u.username, u]));
const clientSecret = fs.readFileSync(arg('client-secret-file'), 'utf8').replace(/\n$/, '');
const clientId = arg('client-id', 'bench');
const redirectUri = arg('redirect-uri', 'http://127.0.0.1:9/cb');

const ARGON2_OPTIONS = { type: argon2.argon2id, memoryCost: 19456, timeCost: 2, parallelism: 1 };
const dummyHash = await argon2.hash('nidan-dummy-password', ARGON2_OPTIONS);

const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: crypto.randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };

const ACR_SECOND = 'urn:nidan:acr:second-password';

const provider = new Provider(issuer, {
  clients: [
    {
      client_id: clientId,
      client_secret: clientSecret,
      redirect_uris: [redirectUri],
      grant_types: ['authorization_code', 'client_credentials'],
      response_types: ['code'],
      token_endpoint_auth_method: 'client_secret_basic',
      introspection_endpoint_auth_method: 'client_secret_basic',
      id_token_signed_response_alg: 'RS256',
    },
  ],
  jwks: { keys: [signingKey] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  routes: {
    authorization: '/authorize',
    token: '/token',
    userinfo: '/userinfo',
    introspection: '/introspect',
    revocation: '/revoke',
    jwks: '/jwks',
    end_session: '/logout',
  },
  scopes: ['openid', 'profile', 'email', 'student'],
  claims: {
    acr: null,
    amr: null,
    auth_time: null,
    sid: null,
    openid: ['sub'],
    profile: ['name', 'family_name', 'given_name', 'preferred_username'],
    email: ['email', 'email_verified'],
    student: ['student_id', 'affiliation'],
  },
  acrValues: ['urn:nidan:acr:password', ACR_SECOND],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
    userinfo: { enabled: true },
  },
  pkce: { required: () => true },
  ttl: {
    AccessToken: 3600,
    ClientCredentials: 3600,
    AuthorizationCode: 60,
    IdToken: 600,
    Interaction: 3600,
    Session: 8 * 3600,
    Grant: 8 * 3600,
  },
  async findAccount(ctx, id) {
    const user = users.get(id);
    if (!user) return undefined;
    return {
      accountId: id,
      async claims() {
        return { sub: id, preferred_username: id, ...user.claims };
      },
    };
  },
  // nidan shows no consent page to its own relying parties: give the registered client what it asks.
  async loadExistingGrant(ctx) {
    const grantId = ctx.oidc.result?.consent?.grantId || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      const found = await ctx.oidc.provider.Grant.find(grantId);
      if (found) return found;
    }
    const grant = new ctx.oidc.provider.Grant({ clientId: ctx.oidc.client.clientId, accountId: ctx.oidc.session.accountId });
    grant.addOIDCScope(ctx.oidc.requestParamScopes ? [...ctx.oidc.requestParamScopes].join(' ') : 'openid');
    grant.addOIDCClaims(['acr', 'amr', 'auth_time', 'sid']);
    await grant.save();
    return grant;
  },
});

// ---------------------------------------------------------------------------
// The login page and its submission (interactions)
// ---------------------------------------------------------------------------

const csrfKey = crypto.randomBytes(32);
const csrfFor = (uid) => crypto.createHmac('sha256', csrfKey).update(uid).digest('base64url');
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function loginPage(uid, error) {
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in</title></head>
<body><main><h1>Students' login</h1>${error ? `<p role="alert">${esc(error)}</p>` : ''}
<form method="post" action="/interaction/${esc(uid)}/login">
<input type="hidden" name="csrf" value="${esc(csrfFor(uid))}">
<label>User ID <input name="username" autocomplete="username"></label>
<label>Password <input type="password" name="password"></label>
<label>Second password <input type="password" name="second_password"></label>
<button type="submit">Log in</button>
</form></main></body></html>`;
}

function send(res, status, body, type = 'text/html; charset=utf-8') {
  res.writeHead(status, { 'content-type': type, 'cache-control': 'no-store', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > 64 * 1024) throw new Error('body too large');
    chunks.push(c);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function interaction(req, res) {
  const url = new URL(req.url, issuer);
  const details = await provider.interactionDetails(req, res);
  const uid = details.uid;
  if (req.method === 'GET' && url.pathname === `/interaction/${uid}`) {
    if (details.prompt.name === 'login') return send(res, 200, loginPage(uid));
    // Only reached if a consent prompt remains: grant what was asked, no page.
    const grant = new provider.Grant({ clientId: details.params.client_id, accountId: details.session.accountId });
    grant.addOIDCScope(details.params.scope);
    const grantId = await grant.save();
    return provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  }
  if (req.method === 'POST' && url.pathname === `/interaction/${uid}/login`) {
    const form = await readForm(req);
    const origin = req.headers.origin;
    if ((origin && origin !== issuer) || form.get('csrf') !== csrfFor(uid)) return send(res, 403, 'forbidden', 'text/plain');
    const username = (form.get('username') ?? '').normalize('NFKC').trim().toLowerCase();
    const password = form.get('password') ?? '';
    const second = form.get('second_password') ?? '';
    const user = users.get(username);
    if (!username || !password) return send(res, 200, loginPage(uid, 'The login failed.'));
    // The university password (the directory's check), then the second password.
    const pwOk = await argon2.verify(user?.password_hash ?? dummyHash, password);
    if (!user || !pwOk) return send(res, 200, loginPage(uid, 'The login failed.'));
    const secondOk = second !== '' && (await argon2.verify(user.second_password_hash, second));
    if (!secondOk) return send(res, 200, loginPage(uid, 'The login failed.'));
    return provider.interactionFinished(
      req,
      res,
      { login: { accountId: username, acr: ACR_SECOND, amr: ['pwd'] } },
      { mergeWithLastSubmission: false },
    );
  }
  return send(res, 404, 'not found', 'text/plain');
}

const callback = provider.callback();
const server = http.createServer((req, res) => {
  if (req.url.startsWith('/interaction/')) {
    interaction(req, res).catch((e) => {
      if (!res.headersSent) send(res, 400, `interaction failed: ${e.message}`, 'text/plain');
      else res.destroy();
    });
    return;
  }
  callback(req, res);
});
server.keepAliveTimeout = 65_000;
server.listen(port, '127.0.0.1', () => console.log(`peer oidc-provider listening on ${issuer}`));
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
    setTimeout(() => process.exit(0), 2000).unref();
  });
}
