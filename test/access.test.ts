/**
 * Client authentication and authorisation (src/access/, src/http/access-guard.ts) end to end: an
 * htpasswd file written by the real `htpasswd -B`, a real registry upstream, skopeo and direct
 * HTTP through the token flow every client speaks. Unit tables (globs, config errors) are in
 * access-units.test.ts.
 */
import assert from 'node:assert/strict';
import { appendFileSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { buildConfig } from '../src/core/config.js';
import { buildApp } from '../src/http/app.js';
import { startDistribution, type Distribution } from './helpers/distribution.js';
import { fetchComplete, jsonBody, metric, ociError, type Fetched } from './helpers/proxy.js';
import { image, OCI_MANIFEST, Pusher } from './helpers/seed.js';
import { exec, need, tempDir, until } from './helpers/tools.js';

const basic = (user: string, password: string): string => `Basic ${Buffer.from(`${user}:${password}`).toString('base64')}`;

interface Setup {
  url: string;
  host: string;
  registry: Distribution;
  htpasswdFile: string;
  htpasswd: string;
  logs: Array<Record<string, unknown>>;
  get(path: string, authorization?: string, method?: 'GET' | 'HEAD'): Promise<Fetched>;
  /** Upstream requests so far that touched `name`. */
  upstreamHits(name: string): number;
}

async function setup(t: TestContext): Promise<Setup | undefined> {
  const htpasswd = need(t, 'htpasswd', 'apt-get install apache2-utils');
  const registry = await startDistribution(t);
  if (!htpasswd || !registry) return undefined;
  const dir = tempDir(t, 'access');
  const htpasswdFile = join(dir, 'htpasswd');
  for (const [i, [user, pw]] of [['alice', 'alice-pw'], ['bob', 'bob-pw'], ['carol', 'carol-pw']].entries()) {
    const r = await exec(htpasswd, [i === 0 ? '-Bbc' : '-Bb', htpasswdFile, user!, pw!]);
    assert.equal(r.code, 0, r.stderr);
  }
  const pusher = new Pusher({ url: registry.url });
  await pusher.pushImage('library/alpine', 'v1', image({ 'a.txt': Buffer.from('public\n') }));
  await pusher.pushImage('team/app', 'v1', image({ 'b.txt': Buffer.from('team\n') }));
  await pusher.pushImage('secret/x', 'v1', image({ 'c.txt': Buffer.from('secret\n') }));

  // The pushes above are in the upstream's log too: only what follows counts.
  const pushed = registry.accessLog.length;
  const root = mkdtempSync(join(tmpdir(), 'ocicache-cache-'));
  const config = buildConfig(
    {
      server: { host: '127.0.0.1', port: 0, shutdownTimeout: '2s' },
      storage: { root },
      defaultUpstream: 'docker.io',
      upstreams: [{ name: 'docker.io', url: registry.url, dockerHubLibrary: true }],
      access: {
        htpasswd: htpasswdFile,
        groups: { team: ['bob'] },
        rules: [
          { upstreams: ['*'], repositories: ['library/*'], allow: ['anonymous'] },
          { upstreams: ['docker.io'], repositories: ['team/**'], allow: ['group:team', 'alice'] },
          { upstreams: ['*'], repositories: ['**'], allow: ['alice'] },
        ],
      },
    },
    {},
  );
  const logs: Array<Record<string, unknown>> = [];
  const app = await buildApp(config, { logger: { level: 'info', stream: { write: (s: string) => void logs.push(JSON.parse(s) as Record<string, unknown>) } } });
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.after(async () => {
    await app.close();
    rmSync(root, { recursive: true, force: true });
  });
  const { port } = app.server.address() as AddressInfo;
  const url = `http://127.0.0.1:${port}`;
  return {
    url,
    host: `127.0.0.1:${port}`,
    registry,
    htpasswdFile,
    htpasswd,
    logs,
    get: (path, authorization, method = 'GET') => fetchComplete(`${url}${path}`, { accept: OCI_MANIFEST, ...(authorization ? { authorization } : {}) }, method),
    upstreamHits: (name) => registry.accessLog.slice(pushed).filter((l) => l.includes(`/${name}/`)).length,
  };
}

/** The token flow as clients do it: follow the challenge's realm with Basic credentials (or none). */
async function token(s: Setup, challenge: string, authorization?: string): Promise<Fetched> {
  const realm = /realm="([^"]+)"/.exec(challenge)![1]!;
  const service = /service="([^"]+)"/.exec(challenge)![1]!;
  const scope = /scope="([^"]+)"/.exec(challenge)?.[1] ?? '';
  return fetchComplete(`${realm}?service=${service}&scope=${encodeURIComponent(scope)}`, authorization ? { authorization } : {});
}

test('access control: challenges, the token flow, rules, groups, the warm path, the status page and the audit log', async (t) => {
  const s = await setup(t);
  if (!s) return;
  const challenge = `Bearer realm="${s.url}/token",service="ocicache"`;

  await t.test('/v2/ answers 401 with the challenge without credentials, 200 with them', async () => {
    const r = await s.get('/v2/');
    assert.equal(r.status, 401);
    assert.equal(r.headers['www-authenticate'], challenge);
    assert.equal(ociError(r).code, 'UNAUTHORIZED');
    assert.equal((await s.get('/v2/', basic('alice', 'alice-pw'))).status, 200);
    const wrong = await s.get('/v2/', basic('alice', 'nope'));
    assert.equal(wrong.status, 401);
    assert.equal(ociError(wrong).code, 'UNAUTHORIZED');
  });

  await t.test('a protected manifest without credentials: 401 with a scoped challenge, nothing sent upstream', async () => {
    const r = await s.get('/v2/team/app/manifests/v1');
    assert.equal(r.status, 401);
    assert.equal(r.headers['www-authenticate'], `${challenge},scope="repository:team/app:pull"`);
    assert.equal(s.upstreamHits('team/app'), 0);
  });

  await t.test('anonymous reads what the rules give anonymous, without any token', async () => {
    const r = await s.get('/v2/alpine/manifests/v1');
    assert.equal(r.status, 200);
  });

  await t.test('token flow: Basic -> token -> manifest 200; anonymous tokens; wrong password -> 401 envelope', async () => {
    const first = await s.get('/v2/team/app/manifests/v1');
    const issued = await token(s, String(first.headers['www-authenticate']), basic('bob', 'bob-pw'));
    assert.equal(issued.status, 200);
    const body = jsonBody<{ token: string; access_token: string; expires_in: number }>(issued);
    assert.equal(body.access_token, body.token);
    assert.equal(body.expires_in, 300);
    const r = await s.get('/v2/team/app/manifests/v1', `Bearer ${body.token}`);
    assert.equal(r.status, 200);
    // Bob's group does not reach secret/: authenticated but not allowed.
    const denied = await s.get('/v2/secret/x/manifests/v1', `Bearer ${body.token}`);
    assert.equal(denied.status, 403);
    assert.equal(ociError(denied).code, 'DENIED');

    const anon = jsonBody<{ token: string }>(await token(s, challenge));
    assert.equal((await s.get('/v2/', `Bearer ${anon.token}`)).status, 200, 'a client that fetched a token has presented credentials');
    assert.equal((await s.get('/v2/alpine/manifests/v1', `Bearer ${anon.token}`)).status, 200);
    assert.equal((await s.get('/v2/team/app/manifests/v1', `Bearer ${anon.token}`)).status, 401);

    const wrong = await token(s, challenge, basic('bob', 'alice-pw'));
    assert.equal(wrong.status, 401);
    assert.equal(ociError(wrong).code, 'UNAUTHORIZED');
    assert.equal((await s.get('/v2/', 'Bearer not.a.token')).status, 401);
  });

  await t.test('an authenticated user the rules do not name: 403 DENIED, nothing sent upstream', async () => {
    for (const path of ['/v2/secret/x/manifests/v1', '/v2/secret/x/tags/list', `/v2/secret/x/blobs/sha256:${'0'.repeat(64)}`, `/v2/secret/x/referrers/sha256:${'0'.repeat(64)}`]) {
      const r = await s.get(path, basic('carol', 'carol-pw'));
      assert.equal(r.status, 403, path);
      assert.equal(ociError(r).code, 'DENIED', path);
    }
    assert.equal(s.upstreamHits('secret/x'), 0);
    assert.equal((await s.get('/v2/secret/x/manifests/v1', basic('alice', 'alice-pw'))).status, 200);
  });

  await t.test('a cached manifest is not served on the warm path to a client that may not read it', async () => {
    const alice = basic('alice', 'alice-pw');
    assert.equal((await s.get('/v2/team/app/manifests/v1', alice)).headers['x-cache'], 'HIT');
    const anon = await s.get('/v2/team/app/manifests/v1');
    assert.equal(anon.status, 401);
    assert.equal((await s.get('/v2/team/app/manifests/v1', undefined, 'HEAD')).status, 401);
    assert.equal((await s.get('/v2/team/app/manifests/v1', basic('carol', 'carol-pw'))).status, 403);
    assert.equal((await s.get('/v2/team/app/manifests/v1', basic('alice', 'wrong'))).status, 401);
  });

  await t.test('the status page needs an authenticated user; probes and metrics stay open', async () => {
    const r = await s.get('/');
    assert.equal(r.status, 401);
    assert.equal(r.headers['www-authenticate'], 'Basic realm="ocicache"');
    const carol = await s.get('/', basic('carol', 'carol-pw'));
    assert.equal(carol.status, 200);
    // Image names can be private: each viewer sees only the images the rules let them pull.
    const listed = (html: string): string[] => [...html.matchAll(/<tr><td>(docker\.io\/[^<]+)<\/td><td>\d+<\/td><\/tr>/g)].map((m) => m[1]!).sort();
    assert.deepEqual(listed(carol.body.toString()), ['docker.io/library/alpine']);
    assert.deepEqual(listed((await s.get('/', basic('alice', 'alice-pw'))).body.toString()), ['docker.io/library/alpine', 'docker.io/secret/x', 'docker.io/team/app']);
    for (const p of ['/healthz', '/readyz']) assert.equal((await s.get(p)).status, 200, p);
    const metrics = (await s.get('/metrics')).body.toString();
    assert.ok(metric(metrics, 'ocicache_access_denied_total', { reason: 'forbidden' }) >= 5);
    assert.ok(metric(metrics, 'ocicache_access_denied_total', { reason: 'unauthenticated' }) >= 3);
    assert.ok(metric(metrics, 'ocicache_access_denied_total', { reason: 'bad_credentials' }) >= 3);
  });

  await t.test('every request line carries the client address and the user (absent for anonymous)', async () => {
    await until('request lines', () => s.logs.some((l) => l.msg === 'request' && l.user === 'alice'));
    const lines = s.logs.filter((l) => l.msg === 'request');
    assert.ok(lines.every((l) => l.client === '127.0.0.1'), JSON.stringify(lines.find((l) => l.client !== '127.0.0.1')));
    const warm = lines.find((l) => l.user === 'alice' && l.cache === 'hit' && l.name === 'team/app');
    assert.ok(warm, 'the warm path logs the user');
    assert.ok(lines.some((l) => l.status === 401 && !('user' in l)));
    assert.ok(lines.some((l) => l.status === 403 && l.user === 'carol'));
  });

  await t.test('htpasswd is reloaded when it changes; a file that does not parse keeps the users', async () => {
    const dave = basic('dave', 'dave-pw');
    assert.equal((await s.get('/v2/', dave)).status, 401);
    const r = await exec(s.htpasswd, ['-Bb', s.htpasswdFile, 'dave', 'dave-pw']);
    assert.equal(r.code, 0, r.stderr);
    await until('dave is known', async () => (await s.get('/v2/', dave)).status === 200, 5000);
    appendFileSync(s.htpasswdFile, 'broken line without a hash\n');
    // The file is looked at when used, at most once a second.
    await until('the warning', async () => (await s.get('/v2/', dave)).status === 200 && s.logs.some((l) => String(l.msg).startsWith('htpasswd not reloaded')), 5000);
    assert.equal((await s.get('/v2/', dave)).status, 200);
    // Said once for this version of the file, and in a gauge until a good file is read.
    const stale = async (): Promise<number> => metric((await s.get('/metrics')).body.toString(), 'ocicache_access_htpasswd_stale');
    assert.equal(await stale(), 1);
    await new Promise((r) => setTimeout(r, 1100));
    await s.get('/v2/', dave);
    assert.equal(s.logs.filter((l) => String(l.msg).startsWith('htpasswd not reloaded')).length, 1);
    // Removing a user revokes their tokens too.
    const tok = jsonBody<{ token: string }>(await token(s, challenge, dave)).token;
    writeFileSync(s.htpasswdFile, (await exec(s.htpasswd, ['-Bbn', 'alice', 'alice-pw'])).stdout);
    await until('dave is gone', async () => (await s.get('/v2/', `Bearer ${tok}`)).status === 401, 5000);
    assert.equal(await stale(), 0);
  });
});

test('access control with skopeo: pulls with credentials, fails without', async (t) => {
  const skopeo = need(t, 'skopeo', 'apt-get install skopeo');
  const s = await setup(t);
  if (!skopeo || !s) return;
  const ok = await exec(skopeo, ['inspect', '--tls-verify=false', '--creds', 'bob:bob-pw', `docker://${s.host}/team/app:v1`]);
  assert.equal(ok.code, 0, ok.stderr);
  assert.equal(JSON.parse(ok.stdout).Name, `${s.host}/team/app`);
  const anon = await exec(skopeo, ['inspect', '--tls-verify=false', '--no-creds', `docker://${s.host}/team/app:v1`]);
  assert.notEqual(anon.code, 0);
  assert.match(anon.stderr, /unauthorized|authentication required/i);
  const wrong = await exec(skopeo, ['inspect', '--tls-verify=false', '--creds', 'bob:nope', `docker://${s.host}/team/app:v1`]);
  assert.notEqual(wrong.code, 0);
  const denied = await exec(skopeo, ['inspect', '--tls-verify=false', '--creds', 'carol:carol-pw', `docker://${s.host}/team/app:v1`]);
  assert.notEqual(denied.code, 0);
  assert.match(denied.stderr, /denied/i);
  const pub = await exec(skopeo, ['inspect', '--tls-verify=false', '--no-creds', `docker://${s.host}/library/alpine:v1`]);
  assert.equal(pub.code, 0, pub.stderr);
});
