/**
 * Token realms: who receives an upstream's credentials (docs/upstreams.md, "Tokens, redirects and
 * credentials"). End to end, with real servers on loopback addresses that count as other hosts
 * (127.0.0.1 is the registry's, 127.0.0.2 another's): first through the upstream client with test
 * DNS names and TLS, for the cases of the issue (names that share their last two labels, plain
 * HTTP on the registry's own host), then through the proxy with IP literals. Every token server
 * records the Authorization it receives; the ones the cache must not trust must receive none.
 * The decision itself is unit-tested in test/upstream-trust.test.ts.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { buildConfig } from '../src/core/config.js';
import { Metrics } from '../src/telemetry/metrics.js';
import { UpstreamClient } from '../src/upstream/client.js';
import { startDistribution } from './helpers/distribution.js';
import { startProxyWithFake } from './helpers/fake-upstream.js';
import { fakeLookup, selfSigned, startHost, type Handler, type Host } from './helpers/hosts.js';
import { fetchBody, ociError, pullImage, startProxy } from './helpers/proxy.js';
import { image, OCI_MANIFEST, Pusher, sha256 } from './helpers/seed.js';
import { startTokenIssuer } from './helpers/token-issuer.js';

const USER = 'robot';
const PASSWORD = 'realm-s3cret';
const BASIC = `Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}`;
const MANIFEST = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256('{}'), size: 2 }, layers: [] }));

/** Issues the token "good" to anyone, over whatever it is reached by. */
const issue: Handler = (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"token":"good","expires_in":300}');

/** A registry that wants the token "good" and names `realm()` in its challenge. */
function registry(realm: () => string): Handler {
  return (req, res) => {
    if (req.headers.authorization !== 'Bearer good') {
      res.writeHead(401, { 'www-authenticate': `Bearer realm="${realm()}",service="test"` }).end();
      return;
    }
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'docker-content-digest': sha256(MANIFEST), 'content-length': String(MANIFEST.length) }).end(MANIFEST);
  };
}

/** The hosts of the issue, by where they are: the registry's (127.0.0.1) or another (127.0.0.2). */
const NAMES: Record<string, string> = {
  'myteam.azurecr.io': '127.0.0.1',
  'attacker.azurecr.io': '127.0.0.2',
  'registry.example.co.uk': '127.0.0.1',
  'evil.co.uk': '127.0.0.2',
  '123456789012.dkr.ecr.us-east-1.amazonaws.com': '127.0.0.1',
  's3.amazonaws.com': '127.0.0.2',
  'auth.example.net': '127.0.0.2',
  'registry-1.docker.io': '127.0.0.1',
  'auth.docker.io': '127.0.0.2',
};

interface Case {
  what: string;
  /** The upstream's host (its URL is https://host:<registry port>). */
  upstream: string;
  /** The realm, from the servers' ports: own (the registry), other (127.0.0.2, HTTPS), plain (127.0.0.1, HTTP). */
  realm: (p: { own: number; other: number; plain: number }) => string;
  credentials: boolean;
  tokenRealms?: (p: { other: number }) => string[];
  /** Where the realm is served, and whether the cache may ask it: with the credentials, anonymously, or not at all. */
  at: 'own' | 'other' | 'plain';
  expect: 'credentials' | 'anonymous' | 'refused';
}

const CASES: Case[] = [
  { what: 'another tenant of the same registry service (myteam.azurecr.io → attacker.azurecr.io)', upstream: 'myteam.azurecr.io', realm: (p) => `https://attacker.azurecr.io:${p.other}/oauth2/token`, credentials: true, at: 'other', expect: 'refused' },
  { what: 'a neighbour under a public suffix (registry.example.co.uk → evil.co.uk)', upstream: 'registry.example.co.uk', realm: (p) => `https://evil.co.uk:${p.other}/token`, credentials: true, at: 'other', expect: 'refused' },
  { what: 'an ECR registry → an S3 bucket', upstream: '123456789012.dkr.ecr.us-east-1.amazonaws.com', realm: (p) => `https://s3.amazonaws.com:${p.other}/bucket/token`, credentials: true, at: 'other', expect: 'refused' },
  { what: 'plain HTTP on the HTTPS upstream\'s own host', upstream: 'myteam.azurecr.io', realm: (p) => `http://myteam.azurecr.io:${p.plain}/token`, credentials: true, at: 'plain', expect: 'refused' },
  { what: 'the upstream\'s own origin', upstream: 'myteam.azurecr.io', realm: (p) => `https://myteam.azurecr.io:${p.own}/token`, credentials: true, at: 'own', expect: 'credentials' },
  { what: 'an origin listed in tokenRealms', upstream: 'registry.example.co.uk', realm: (p) => `https://auth.example.net:${p.other}/token`, credentials: true, tokenRealms: (p) => [`https://auth.example.net:${p.other}`], at: 'other', expect: 'credentials' },
  { what: 'Docker Hub\'s pair (registry-1.docker.io → auth.docker.io)', upstream: 'registry-1.docker.io', realm: (p) => `https://auth.docker.io:${p.other}/token`, credentials: true, at: 'other', expect: 'credentials' },
  { what: 'anonymous: a realm on another host over HTTPS is asked without credentials', upstream: 'myteam.azurecr.io', realm: (p) => `https://attacker.azurecr.io:${p.other}/oauth2/token`, credentials: false, at: 'other', expect: 'anonymous' },
  { what: 'anonymous: never plain HTTP for an HTTPS upstream', upstream: 'myteam.azurecr.io', realm: (p) => `http://myteam.azurecr.io:${p.plain}/token`, credentials: false, at: 'plain', expect: 'refused' },
];

test('token realms of the issue, through the upstream client: credentials only to the own origin, tokenRealms and known pairs', async (t) => {
  const tls = selfSigned(t, [...Object.keys(NAMES), '127.0.0.1', '127.0.0.2']);
  if (!tls) return;
  const own = await startHost(t, '127.0.0.1', tls);
  const other = await startHost(t, '127.0.0.2', tls);
  const plain = await startHost(t, '127.0.0.1');
  const ports = { own: own.port, other: other.port, plain: plain.port };
  let realm = '';
  own.route('/v2/team/app/manifests/latest', registry(() => realm));
  for (const host of [own, other, plain]) for (const path of ['/token', '/oauth2/token', '/bucket/token']) host.route(path, issue);
  const servers: Record<Case['at'], Host> = { own, other, plain };

  for (const [i, c] of CASES.entries()) {
    await t.test(c.what, async () => {
      realm = c.realm(ports);
      const config = buildConfig(
        {
          storage: { root: '/nonexistent' },
          upstreams: [{ name: `case-${i}.example`, url: `https://${c.upstream}:${own.port}`, ...(c.credentials ? { auth: { username: USER, passwordEnv: 'PASSWORD' } } : {}), tokenRealms: c.tokenRealms?.(ports) ?? [] }],
        },
        { PASSWORD },
      );
      const client = new UpstreamClient(config, new Metrics(), Date.now, { lookup: fakeLookup(NAMES), ca: tls.cert });
      const tokenRequests = (host: Host): Host['requests'] => host.requests.filter((r) => r.url.startsWith('/token') || r.url.includes('/token?'));
      const before = { own: tokenRequests(own).length, other: tokenRequests(other).length, plain: tokenRequests(plain).length };
      try {
        const target = { upstream: config.upstreams[0]!, name: 'team/app' };
        if (c.expect === 'refused') {
          await assert.rejects(client.getManifest(target, 'latest'), { code: 'DENIED' });
        } else {
          assert.deepEqual((await client.getManifest(target, 'latest')).body, MANIFEST);
        }
      } finally {
        await client.close();
      }
      const got = tokenRequests(servers[c.at]).slice(before[c.at]);
      if (c.expect === 'refused') assert.deepEqual(got, [], `${realm} must not be asked at all`);
      else assert.deepEqual(got.map((r) => r.authorization), [c.expect === 'credentials' ? BASIC : undefined]);
    });
  }
  // Whatever the case, no token server but the trusted ones ever saw the password.
  const leaked = (h: Host): number => h.requests.filter((r) => r.authorization === BASIC).length;
  assert.equal(leaked(plain), 0, 'plain HTTP never carries the credentials');
  assert.equal(leaked(other), 2, 'only the listed realm and Docker Hub\'s pair, once each');
});

test('through the proxy: a realm on the upstream\'s host but another port gets no credentials, nor any request', async (t) => {
  const listener = await startHost(t, '127.0.0.1');
  listener.route('/token', issue);
  const { fake, proxy } = await startProxyWithFake(t, { auth: { username: USER, passwordEnv: 'PASSWORD' } }, { env: { PASSWORD } });
  fake.route('/v2/team/app/manifests/latest', registry(() => `${listener.url}/token`));
  const r = await fetchBody(`${proxy.url}/v2/team/app/manifests/latest?ns=fake.example`, { accept: OCI_MANIFEST });
  assert.equal(r.status, 403);
  assert.equal(ociError(r).code, 'DENIED');
  assert.match(ociError(r).message, /tokenRealms/);
  assert.deepEqual(listener.requests, [], 'the listener received nothing, so no Authorization');
});

test('through the proxy: anonymous, a realm on another host over plain HTTP is never dialled', async (t) => {
  const other = await startHost(t, '127.0.0.2');
  other.route('/token', issue);
  const { fake, proxy } = await startProxyWithFake(t);
  fake.route('/v2/team/app/manifests/latest', registry(() => `${other.url}/token`));
  const r = await fetchBody(`${proxy.url}/v2/team/app/manifests/latest?ns=fake.example`, { accept: OCI_MANIFEST });
  assert.equal(r.status, 403);
  assert.equal(other.connections, 0);
});

test('through the proxy: a token server on another host listed in tokenRealms receives the credentials, once', async (t) => {
  const other = await startHost(t, '127.0.0.2');
  other.route('/token', issue);
  const { fake, proxy } = await startProxyWithFake(t, { auth: { username: USER, passwordEnv: 'PASSWORD' }, tokenRealms: [other.url] }, { env: { PASSWORD } });
  // A tag is asked with a HEAD, then its manifest by digest.
  for (const reference of ['latest', sha256(MANIFEST)]) fake.route(`/v2/team/app/manifests/${reference}`, registry(() => `${other.url}/token`));
  const r = await fetchBody(`${proxy.url}/v2/team/app/manifests/latest?ns=fake.example`, { accept: OCI_MANIFEST });
  assert.equal(r.status, 200);
  assert.deepEqual(r.body, MANIFEST);
  assert.deepEqual(other.requests.map((q) => q.authorization), [BASIC]);
  assert.ok(fake.requests.every((q) => q.headers.authorization !== BASIC), 'the registry gets the token, not the password');
});

test('a real registry whose token server is on another port: works once the realm is listed in tokenRealms', async (t) => {
  const creds = { username: USER, password: PASSWORD };
  const issuer = await startTokenIssuer(t, { [USER]: PASSWORD });
  if (!issuer) return;
  const upstream = await startDistribution(t, { token: issuer });
  if (!upstream) return;
  const img = image({ 'realm.txt': Buffer.from('behind a listed realm\n') });
  await new Pusher({ url: upstream.url, basic: creds }).pushImage('secure/app', 'v1', img);
  issuer.requests.length = 0;
  const auth = { username: USER, passwordEnv: 'PASSWORD' };
  const unlisted = await startProxy(t, { upstreams: [{ name: 'token.example', url: upstream.url, auth }], env: { PASSWORD } });
  assert.equal((await pullImage(unlisted.url, 'secure/app', 'v1', 'token.example')).manifest.status, 403);
  assert.equal(issuer.requests.length, 0, 'another port is another origin: not asked');
  const listed = await startProxy(t, { upstreams: [{ name: 'token.example', url: upstream.url, auth, tokenRealms: [issuer.realm] }], env: { PASSWORD } });
  const m = await pullImage(listed.url, 'secure/app', 'v1', 'token.example');
  assert.equal(m.manifest.status, 200);
  for (const [i, b] of img.blobs.entries()) assert.equal(m.blobs[i]!.sha256, b.descriptor.digest);
  assert.deepEqual(issuer.requests.map((r) => r.user), [USER]);
});
