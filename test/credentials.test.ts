/**
 * Upstream credentials found at run time (upstream/credentials.ts): a Docker config file (the
 * format of a kubernetes.io/dockerconfigjson pull secret) swapped while the server runs, and a
 * real executable speaking the docker-credential-helpers protocol (written by the test, found on
 * PATH), against a real distribution registry with Basic auth and one with token auth whose
 * token server checks passwords.
 */
import assert from 'node:assert/strict';
import { chmodSync, existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { buildConfig } from '../src/core/config.js';
import { startDistribution } from './helpers/distribution.js';
import { startProxyWithFake } from './helpers/fake-upstream.js';
import { fetchBody, ociError, startProxy, testClock } from './helpers/proxy.js';
import { Credentials, secretExpiry } from '../src/upstream/credentials.js';
import { image, OCI_MANIFEST, Pusher, sha256 } from './helpers/seed.js';
import { startTokenIssuer } from './helpers/token-issuer.js';
import { tempDir, until } from './helpers/tools.js';

const USER = 'puller';
const PASSWORD = 'right-password';
const b64 = (s: string): string => Buffer.from(s).toString('base64');

interface Helper {
  dir: string;
  /** The server each call asked about, in order. */
  calls(): string[];
  /** What the next calls print: credentials, or a behaviour. */
  answer(a: { user: string; secret: string } | 'hang' | 'fail' | 'none'): void;
}

/** docker-credential-ocitest on PATH: reads the server from stdin, answers as told by files in its directory. */
function credentialHelper(t: TestContext): Helper {
  const dir = tempDir(t, 'helper');
  const script = join(dir, 'docker-credential-ocitest');
  writeFileSync(
    script,
    `#!/bin/sh
[ "$1" = get ] || exit 2
read server
echo "$server" >> '${dir}/calls'
[ -f '${dir}/hang' ] && exec sleep 30
[ -f '${dir}/fail' ] && { echo 'the keychain is locked'; exit 3; }
[ -f '${dir}/none' ] && { echo 'credentials not found in native keychain'; exit 1; }
cat '${dir}/answer.json'
`,
  );
  chmodSync(script, 0o755);
  const path = process.env.PATH;
  process.env.PATH = `${dir}${delimiter}${path}`;
  t.after(() => void (process.env.PATH = path));
  const helper: Helper = {
    dir,
    calls: () => (existsSync(join(dir, 'calls')) ? readFileSync(join(dir, 'calls'), 'utf8').split('\n').filter(Boolean) : []),
    answer(a) {
      for (const f of ['hang', 'fail', 'none']) rmSync(join(dir, f), { force: true });
      if (typeof a === 'string') writeFileSync(join(dir, a), '');
      else writeFileSync(join(dir, 'answer.json'), JSON.stringify({ ServerURL: 'x', Username: a.user, Secret: a.secret }));
    },
  };
  return helper;
}

async function basicRegistry(t: TestContext): Promise<{ url: string; host: string; digest: string } | undefined> {
  const registry = await startDistribution(t, { basic: { username: USER, password: PASSWORD } });
  if (!registry) return undefined;
  const img = image({ 'private.txt': Buffer.from('behind Basic auth\n') });
  await new Pusher({ url: registry.url, basic: { username: USER, password: PASSWORD } }).pushImage('team/private', 'v1', img);
  return { url: registry.url, host: registry.host, digest: img.digest };
}

const manifest = (base: string): Promise<{ status: number; body?: Buffer }> => fetchBody(`${base}/v2/team/private/manifests/v1?ns=private.example`, { accept: OCI_MANIFEST });

test('auth.dockerConfig: a pull secret swapped while the server runs is used at once', async (t) => {
  const r = await basicRegistry(t);
  if (!r) return;
  const dir = tempDir(t, 'pull-secret');
  const file = join(dir, '.dockerconfigjson');
  // As Kubernetes mounts a pull secret: the wrong password first.
  writeFileSync(file, JSON.stringify({ auths: { [r.host]: { auth: b64(`${USER}:wrong`) } } }));
  const proxy = await startProxy(t, { upstreams: [{ name: 'private.example', url: r.url, auth: { dockerConfig: file } }] });
  const refused = await manifest(proxy.url);
  assert.notEqual(refused.status, 200);
  // The secret is updated (a new file renamed into place, as the kubelet's atomic writer does).
  writeFileSync(`${file}.new`, JSON.stringify({ auths: { [`https://${r.host}`]: { username: USER, password: PASSWORD } } }));
  renameSync(`${file}.new`, file);
  await until('the new secret is used', async () => (await manifest(proxy.url)).status === 200, 5000);
  const ok = await manifest(proxy.url);
  assert.equal(sha256(ok.body!), r.digest);
});

test('auth.helper and a Docker config credHelpers entry: the helper is asked for the server once, and again once after the upstream refuses', async (t) => {
  const helper = credentialHelper(t);
  const users: Record<string, string> = { [USER]: 'first-password' };
  const issuer = await startTokenIssuer(t, users);
  if (!issuer) return;
  const registry = await startDistribution(t, { token: issuer });
  if (!registry) return;
  const img = image({ 'app.txt': Buffer.from('behind token auth\n') });
  const pusher = new Pusher({ url: registry.url, basic: { username: USER, password: 'first-password' } });
  await pusher.pushImage('team/private', 'v1', img);
  await pusher.pushImage('team/second', 'v1', img);
  const dir = tempDir(t, 'docker-config');
  const file = join(dir, 'config.json');
  writeFileSync(file, JSON.stringify({ credHelpers: { [registry.host]: 'ocitest' } }));
  const tokenRealms = [new URL(issuer.realm).origin];
  const cases: Array<[string, Record<string, unknown>]> = [
    ['auth.helper', { helper: 'ocitest' }],
    ['credHelpers in a Docker config', { dockerConfig: file }],
  ];
  for (const [what, auth] of cases) {
    users[USER] = 'first-password';
    helper.answer({ user: USER, secret: 'first-password' });
    const before = helper.calls().length;
    const proxy = await startProxy(t, { upstreams: [{ name: 'private.example', url: registry.url, tokenRealms, auth }], cache: { tagTtl: '0s' } });
    for (let i = 0; i < 5; i++) assert.equal((await manifest(proxy.url)).status, 200, `${what}: pull ${i}`);
    assert.deepEqual(helper.calls().slice(before), [registry.host], `${what}: asked once, for the registry's host`);
    const authenticated = issuer.requests.filter((q) => q.user === USER).length;
    assert.ok(authenticated >= 1, `${what}: the token server saw the user`);

    // The password is rotated, and the helper knows the new one: the next token the proxy needs
    // (another repository) is refused with the old one, which fetches it again, once.
    users[USER] = 'second-password';
    helper.answer({ user: USER, secret: 'second-password' });
    const fresh = await fetchBody(`${proxy.url}/v2/team/second/tags/list?ns=private.example`);
    assert.equal(fresh.status, 200, `${what}: ${fresh.body?.toString()}`);
    assert.equal(helper.calls().length - before, 2, `${what}: asked again once`);
  }
});

test('a helper that hangs is killed after helperTimeout; one that fails or is missing is the upstream refusing; "not found" is anonymous', async (t) => {
  const helper = credentialHelper(t);
  const r = await basicRegistry(t);
  if (!r) return;
  const upstream = (auth: Record<string, unknown>): Array<Record<string, unknown>> => [{ name: 'private.example', url: r.url, auth }];
  const cases: Array<[string, 'hang' | 'fail' | 'none' | undefined, Record<string, unknown>, number, string]> = [
    ['hangs', 'hang', { helper: 'ocitest' }, 403, 'credential helper docker-credential-ocitest for upstream private.example did not answer within 300 ms'],
    ['fails', 'fail', { helper: 'ocitest' }, 403, 'credential helper docker-credential-ocitest for upstream private.example failed (exit 3): the keychain is locked'],
    ['is missing', undefined, { helper: 'nosuchhelper' }, 403, 'credential helper docker-credential-nosuchhelper for upstream private.example is not on PATH'],
  ];
  for (const [what, behaviour, auth, status, message] of cases) {
    if (behaviour) helper.answer(behaviour);
    const proxy = await startProxy(t, { upstreams: upstream(auth), credentials: { helperTimeout: '300ms' } });
    const started = Date.now();
    const res = await manifest(proxy.url);
    assert.deepEqual([res.status, ociError(res)], [status, { code: 'DENIED', message }], what);
    assert.ok(Date.now() - started < 5000, `${what}: answered within the timeout, not the helper's 30 s`);
    assert.equal((await fetchBody(`${proxy.url}/healthz`)).status, 200, `${what}: the server lives`);
  }
  // "credentials not found": anonymous, as Docker treats it; the registry then refuses.
  helper.answer('none');
  const proxy = await startProxy(t, { upstreams: upstream({ helper: 'ocitest' }) });
  const anonymous = await manifest(proxy.url);
  assert.notEqual(anonymous.status, 200);
  assert.notEqual(anonymous.status, 500);
});

test('a secret that says when it expires (a JWT exp) is asked for again 30 s before then, not after the ttl; at most once a second', async (t) => {
  const helper = credentialHelper(t);
  const clock = testClock();
  const b64url = (o: object): string => Buffer.from(JSON.stringify(o)).toString('base64url');
  const jwt = (inSeconds: number): string => `${b64url({ alg: 'RS256', typ: 'JWT' })}.${b64url({ sub: USER, exp: Math.floor(clock() / 1000) + inSeconds })}.c2lnbmF0dXJl`;
  // The registry takes the token as a password (as ACR takes its refresh token); ttl is 10 minutes.
  const secret = jwt(120);
  const registry = await startDistribution(t, { basic: { username: USER, password: secret } });
  if (!registry) return;
  await new Pusher({ url: registry.url, basic: { username: USER, password: secret } }).pushImage('team/private', 'v1', image({ 'jwt.txt': Buffer.from('behind a JWT\n') }));
  helper.answer({ user: USER, secret });
  const proxy = await startProxy(t, { upstreams: [{ name: 'private.example', url: registry.url, auth: { helper: 'ocitest' } }], cache: { tagTtl: '0s' }, credentials: { ttl: '10m' }, clock });
  const steps: Array<[string, number, number]> = [
    ['first pull', 0, 1],
    ['a minute later', 60_000, 1],
    ['89 s after: 31 s before exp', 29_000, 1],
    ['91 s after: within 30 s of exp', 2_000, 2],
  ];
  for (const [when, advance, calls] of steps) {
    clock.advance(advance);
    assert.equal((await manifest(proxy.url)).status, 200, when);
    assert.equal(helper.calls().length, calls, when);
  }

  // A secret already within the margin is used, and asked for again a second later, not per request.
  const credentials = new Credentials(buildConfig({ upstreams: [{ name: 'private.example', url: registry.url }] }, {}).credentials, clock);
  const upstream = buildConfig({ upstreams: [{ name: 'private.example', url: registry.url, auth: { helper: 'ocitest' } }] }, {}).upstreams[0]!;
  helper.answer({ user: USER, secret: jwt(10) });
  const before = helper.calls().length;
  for (const advance of [0, 500, 499]) {
    clock.advance(advance);
    assert.equal((await credentials.get(upstream))?.username, USER);
  }
  assert.equal(helper.calls().length - before, 1, 'kept for a second');
  clock.advance(2);
  await credentials.get(upstream);
  assert.equal(helper.calls().length - before, 2, 'asked again after it');
});

test('secretExpiry: a JWT-shaped secret with a numeric exp, nothing else', () => {
  const b64url = (o: unknown): string => Buffer.from(typeof o === 'string' ? o : JSON.stringify(o)).toString('base64url');
  const cases: Array<[string, string, number | undefined]> = [
    ['a JWT', `${b64url({ alg: 'RS256' })}.${b64url({ exp: 1_900_000_000 })}.sig`, 1_900_000_000_000],
    ['an unsigned JWT', `${b64url({ alg: 'none' })}.${b64url({ exp: 1_900_000_000 })}.`, 1_900_000_000_000],
    ['no exp', `${b64url({ alg: 'RS256' })}.${b64url({ sub: 'x' })}.sig`, undefined],
    ['exp as a string', `${b64url({ alg: 'RS256' })}.${b64url({ exp: '1900000000' })}.sig`, undefined],
    ['a payload that is not JSON', `${b64url({ alg: 'RS256' })}.${b64url('not json')}.sig`, undefined],
    ['a password', 'correct horse battery staple', undefined],
    ['a GCP access token', 'ya29.a0AfH6SMBx-example', undefined],
  ];
  for (const [what, secret, expiry] of cases) assert.equal(secretExpiry(secret), expiry, what);
});

test('credential sources are validated, naming the key', () => {
  const up = (auth: unknown): unknown => ({ upstreams: [{ name: 'private.example', url: 'https://private.example', auth }] });
  const cases: Array<[unknown, string]> = [
    [up({ helper: '../bin/evil' }), 'config: upstreams[0].auth.helper: must be a helper name such as ecr-login (docker-credential-ecr-login on PATH), got "../bin/evil"'],
    [up({ helper: 'ecr-login', dockerConfig: '/x' }), 'config: upstreams[0].auth: dockerConfig or helper, not both'],
    [up({ helper: 'ecr-login', username: 'u' }), 'config: upstreams[0].auth: username and a password, dockerConfig, or helper: one of them'],
    [{ ...(up(undefined) as object), credentials: { helperTimeout: 'soon' } }, 'config: credentials.helperTimeout: expected a duration such as 30s, 5m or 24h, got "soon"'],
  ];
  for (const [doc, message] of cases) assert.throws(() => buildConfig(doc, {}), { message });
  // The top-level credentials.dockerConfig serves every upstream without auth of its own.
  const config = buildConfig({ credentials: { dockerConfig: '/etc/ocicache/config.json' }, upstreams: [{ name: 'a.example', url: 'https://a.example' }, { name: 'b.example', url: 'https://b.example', auth: { helper: 'ecr-login' } }] }, {});
  assert.deepEqual(config.upstreams.map((u) => u.credentials), [{ dockerConfig: '/etc/ocicache/config.json' }, { helper: 'ecr-login' }]);
});

test('credentials are filed by the host the upstream URL names: an upstream called docker.io that points elsewhere gets no Docker Hub credentials', async (t) => {
  const helper = credentialHelper(t);
  const r = await basicRegistry(t);
  if (!r) return;
  const dir = tempDir(t, 'hub-config');
  const file = join(dir, 'config.json');
  // Docker Hub's entry holds the password this registry would accept: it must still not be sent here.
  writeFileSync(file, JSON.stringify({ auths: { 'https://index.docker.io/v1/': { auth: b64(`${USER}:${PASSWORD}`) } } }));
  const hubNamed = { name: 'docker.io', url: r.url, dockerHubLibrary: true };
  const viaFile = await startProxy(t, { upstreams: [{ ...hubNamed, auth: { dockerConfig: file } }] });
  const res = await fetchBody(`${viaFile.url}/v2/team/private/manifests/v1?ns=docker.io`, { accept: OCI_MANIFEST });
  assert.notEqual(res.status, 200, 'no credentials were found for this host');
  // A helper is asked for the host, not for Docker Hub's index URL.
  helper.answer({ user: USER, secret: PASSWORD });
  const viaHelper = await startProxy(t, { upstreams: [{ ...hubNamed, auth: { helper: 'ocitest' } }] });
  assert.equal((await fetchBody(`${viaHelper.url}/v2/team/private/manifests/v1?ns=docker.io`, { accept: OCI_MANIFEST })).status, 200);
  assert.deepEqual(helper.calls(), [r.host]);
});

test('a 401 to a bearer token (a repository the token does not cover) does not run the helper again', async (t) => {
  const helper = credentialHelper(t);
  helper.answer({ user: USER, secret: PASSWORD });
  const { fake, proxy } = await startProxyWithFake(t, { auth: { helper: 'ocitest' } });
  fake.route('/token', (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"token":"t","expires_in":300}'));
  // As Docker Hub answers for a repository that does not exist: 401, whatever the token.
  fake.route('/v2/nobody/here/manifests/v1', (_req, res) => res.writeHead(401, { 'www-authenticate': `Bearer realm="${fake.url}/token",service="fake",scope="repository:nobody/here:pull"` }).end());
  for (let i = 0; i < 4; i++) assert.notEqual((await fetchBody(`${proxy.url}/v2/nobody/here/manifests/v1?ns=fake.example`, { accept: OCI_MANIFEST })).status, 200);
  assert.equal(helper.calls().length, 1, 'the helper ran once');
});
