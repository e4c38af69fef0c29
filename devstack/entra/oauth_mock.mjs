// Entra ID stand-in: oauth2-mock-server behind a wrapper that makes it look like a tenant's v2.0
// endpoint (https://localhost:PORT/<tenant>/v2.0), with Entra-shaped tokens and the errors the app
// must handle. Started by devstack/entra.py:
//   node oauth_mock.mjs --port N --cert server.pem --key server.key --tenant T
//        [--client-id ID] [--redirect-uri URI]...
//   The app's client secret comes from env ENTRA_CLIENT_SECRET (or --client-secret; ps shows arguments).
// Endpoints have Entra's shape under the issuer: /oauth2/v2.0/authorize, /oauth2/v2.0/token,
// /discovery/v2.0/keys, /.well-known/openid-configuration.
// Control surface for tests (never part of Entra): under /_control/
//   POST deny-next-consent   the next /authorize redirects back with error=access_denied (AADSTS65004)
//   POST fail-refresh        {"enabled": true|false} refresh_token grants answer invalid_grant (AADSTS700082)
//   POST user                {"username", "oid", "name"} who signs in from now on
//   POST reset               all of the above back to normal
//   GET  stats               {"requests": n, "paths": {...}}  (control calls are not counted)
//   GET  issued              every code, access, id and refresh token issued so far
import { OAuth2Issuer, OAuth2Service } from 'oauth2-mock-server';
import https from 'node:https';
import fs from 'node:fs';
import { parseArgs } from 'node:util';
import { randomUUID } from 'node:crypto';

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    cert: { type: 'string' },
    key: { type: 'string' },
    tenant: { type: 'string', default: '00000000-0000-0000-0000-000000000001' },
    'client-id': { type: 'string' },
    'client-secret': { type: 'string' },
    'redirect-uri': { type: 'string', multiple: true, default: [] },
  },
});
const TENANT = args.tenant;
const CLIENT_SECRET = process.env.ENTRA_CLIENT_SECRET || args['client-secret'] || '';
const PREFIX = `/${TENANT}/v2.0`;
const DEFAULT_USER = { username: 'admin@contoso.test', oid: '99999999-0000-0000-0000-000000000abc', name: 'Contoso Admin' };

const state = {
  denyNextConsent: false,
  failRefresh: false,
  user: { ...DEFAULT_USER },
  requests: 0,
  paths: {},
  issued: { codes: [], access_tokens: [], id_tokens: [], refresh_tokens: [] },
  liveCodes: new Set(),
  liveRefreshTokens: new Map(), // refresh token -> user it was issued to
};

function reset() {
  state.denyNextConsent = false;
  state.failRefresh = false;
  state.user = { ...DEFAULT_USER };
}

function oauthError(resp, status, error, description) {
  resp.statusCode = status;
  resp.body = {
    error,
    error_description: `${description}\r\nTrace ID: 00000000-0000-0000-0000-000000000000\r\nTimestamp: ${new Date().toISOString()}`,
    error_codes: [Number(description.match(/AADSTS(\d+)/)?.[1] || 0)],
  };
}

const issuer = new OAuth2Issuer();
await issuer.keys.generate('RS256');
const service = new OAuth2Service(issuer, {
  authorize: '/oauth2/v2.0/authorize',
  token: '/oauth2/v2.0/token',
  jwks: '/discovery/v2.0/keys',
  userinfo: '/oidc/userinfo',
  endSession: '/oauth2/v2.0/logout',
});

// The user a token is for: the refresh token's owner on refresh, else whoever signs in now.
function userFor(req) {
  if (req.body?.grant_type === 'refresh_token') return state.liveRefreshTokens.get(req.body.refresh_token) || state.user;
  return state.user;
}

service.on('beforeTokenSigning', (token, req) => {
  const p = token.payload;
  p.uti = randomUUID(); // Entra's unique token id: no two tokens are byte-identical, even within a second
  if (req.body?.grant_type === 'client_credentials') {
    Object.assign(p, { tid: TENANT, oid: '77777777-0000-0000-0000-0000000000c1', sub: '77777777-0000-0000-0000-0000000000c1',
      appid: req.body.client_id, azp: req.body.client_id, idtyp: 'app' });
  } else {
    const user = userFor(req);
    Object.assign(p, { tid: TENANT, oid: user.oid, sub: user.oid });
    if (p.scope === undefined) Object.assign(p, { preferred_username: user.username, name: user.name, ver: '2.0' });
    else Object.assign(p, { upn: user.username, unique_name: user.username, name: user.name, appid: req.body.client_id });
  }
  if (p.scope !== undefined) { // access token: the audience is the resource the scope names
    const res = String(p.scope).split(' ').find((x) => x.startsWith('https://'));
    if (res) {
      const u = new URL(res);
      p.aud = u.origin;
      p.scp = String(p.scope).split(' ').filter((x) => x.startsWith('https://')).map((x) => new URL(x).pathname.slice(1)).join(' ');
      if (req.body?.grant_type === 'client_credentials') { delete p.scp; p.roles = []; }
    }
    delete p.scope;
  }
});

service.on('beforeAuthorizeRedirect', (redirect, req) => {
  const code = redirect.url.searchParams.get('code');
  if (state.denyNextConsent) {
    state.denyNextConsent = false;
    redirect.url.searchParams.delete('code');
    redirect.url.searchParams.set('error', 'access_denied');
    redirect.url.searchParams.set('error_description',
      'AADSTS65004: User declined to consent to access the app.\r\nTrace ID: 00000000-0000-0000-0000-000000000000');
    return;
  }
  if (code) {
    state.liveCodes.add(code);
    state.issued.codes.push(code);
  }
});

service.on('beforeResponse', (resp, req) => {
  const body = req.body || {};
  const grant = body.grant_type;
  if (args['client-id'] && body.client_id !== args['client-id']) {
    return oauthError(resp, 400, 'unauthorized_client', `AADSTS700016: Application with identifier '${body.client_id}' was not found in the directory.`);
  }
  if (CLIENT_SECRET && body.client_secret !== CLIENT_SECRET && !body.client_assertion) {
    return oauthError(resp, 401, 'invalid_client', 'AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.');
  }
  if (grant === 'authorization_code') {
    if (!state.liveCodes.delete(body.code)) {
      return oauthError(resp, 400, 'invalid_grant', 'AADSTS54005: OAuth2 Authorization code was already redeemed, please retry with a new valid code or use an existing refresh token.');
    }
  }
  if (grant === 'refresh_token') {
    if (state.failRefresh) {
      return oauthError(resp, 400, 'invalid_grant', 'AADSTS700082: The refresh token has expired due to inactivity. The token was issued on 2026-08-01T00:00:00Z and was inactive for 90.00:00:00.');
    }
    if (!state.liveRefreshTokens.has(body.refresh_token)) {
      return oauthError(resp, 400, 'invalid_grant', 'AADSTS9002313: Invalid request. Request is malformed or invalid.');
    }
  }
  if (resp.statusCode !== 200) return;
  const b = resp.body;
  if (grant !== 'client_credentials') {
    const user = userFor(req);
    b.client_info = Buffer.from(JSON.stringify({ uid: user.oid, utid: TENANT })).toString('base64url');
    state.liveRefreshTokens.set(b.refresh_token, user);
    state.issued.refresh_tokens.push(b.refresh_token);
    if (b.id_token) state.issued.id_tokens.push(b.id_token);
    // Entra echoes the granted scopes without the resource prefix for the reserved ones
    if (b.scope) b.scope = `${String(b.scope).split(' ').filter((s) => s.startsWith('https://')).join(' ')} openid profile offline_access`;
  } else {
    delete b.refresh_token;
    delete b.id_token;
  }
  b.ext_expires_in = b.expires_in;
  state.issued.access_tokens.push(b.access_token);
});

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString() || '{}';
  try { return JSON.parse(text); } catch { return {}; }
}

function sendJson(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

async function control(req, res) {
  const path = req.url.split('?')[0].replace(/^\/_control\//, '');
  if (req.method === 'GET' && path === 'stats') return sendJson(res, 200, { requests: state.requests, paths: state.paths });
  if (req.method === 'GET' && path === 'issued') return sendJson(res, 200, state.issued);
  if (req.method !== 'POST') return sendJson(res, 405, { error: 'method not allowed' });
  const body = await readJson(req);
  if (path === 'deny-next-consent') state.denyNextConsent = true;
  else if (path === 'fail-refresh') state.failRefresh = body.enabled !== false;
  else if (path === 'user') state.user = { ...DEFAULT_USER, ...body };
  else if (path === 'reset') reset();
  else return sendJson(res, 404, { error: `unknown control ${path}` });
  return sendJson(res, 200, { ok: true });
}

function authorizeGuard(req, res) {
  // Entra refuses a redirect_uri that is not registered on the app, on its own page (no redirect).
  const url = new URL(req.url, 'https://localhost');
  const redirect = url.searchParams.get('redirect_uri');
  if (args['redirect-uri'].length && !args['redirect-uri'].includes(redirect)) {
    sendJson(res, 400, { error: 'invalid_request', error_description: `AADSTS50011: The redirect URI '${redirect}' specified in the request does not match the redirect URIs configured for the application.` });
    return false;
  }
  if (args['client-id'] && url.searchParams.get('client_id') !== args['client-id']) {
    sendJson(res, 400, { error: 'unauthorized_client', error_description: 'AADSTS700016: Application not found in the directory.' });
    return false;
  }
  return true;
}

const server = https.createServer({ key: fs.readFileSync(args.key), cert: fs.readFileSync(args.cert) }, (req, res) => {
  if (req.url.startsWith('/_control/')) {
    control(req, res).catch((err) => sendJson(res, 500, { error: String(err) }));
    return;
  }
  state.requests += 1;
  const path = req.url.split('?')[0];
  state.paths[path] = (state.paths[path] || 0) + 1;
  if (!req.url.startsWith(PREFIX)) return sendJson(res, 404, { error: 'not_found', error_description: `tenant path is ${PREFIX}` });
  req.url = req.url.slice(PREFIX.length) || '/';
  if (req.url.startsWith('/oauth2/v2.0/authorize') && !authorizeGuard(req, res)) return;
  service.requestHandler(req, res);
});
server.listen(Number(args.port), '127.0.0.1', () => {
  const port = server.address().port;
  issuer.url = `https://localhost:${port}${PREFIX}`; // iss == discovery issuer == the tokens' iss
  console.log(`ready ${issuer.url}`);
});
