/**
 * Real clients with credentials against the cache with access control on: an htpasswd file
 * written by the real `htpasswd -B`, a real registry upstream, and podman (an auth file written by
 * `podman login`, and --creds), containerd's `ctr` (a hosts.toml mirror with an Authorization
 * header) and Docker Engine (registry-mirrors). skopeo is in access.test.ts. Each client pulls
 * with credentials (the request lines name the user) and fails without. The README's
 * "Securing a shared cache" snippets are these.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { run, startContainerd, startDockerd } from './helpers/daemons.js';
import { startDistribution, type Distribution } from './helpers/distribution.js';
import { startProxy, type Proxy } from './helpers/proxy.js';
import { localSnippet } from './helpers/readme.js';
import { image, Pusher, type Image } from './helpers/seed.js';
import { exec, need, tempDir } from './helpers/tools.js';

/** The README's user and password: its snippets run as written. */
const USER = 'alice';
const PASSWORD = 'PASSWORD';

interface World {
  hub: Distribution;
  proxy: Proxy;
  app: Image;
  logs: Array<Record<string, unknown>>;
  /** Request lines for team/app so far, with their status and user. */
  lines(): Array<{ status: unknown; user: unknown; path: string }>;
}

/** docker.io (a real registry) behind the cache; only alice may read anything, anonymous nothing. */
async function world(t: TestContext): Promise<World | undefined> {
  const htpasswd = need(t, 'htpasswd', 'apt-get install apache2-utils');
  const hub = await startDistribution(t);
  if (!htpasswd || !hub) return undefined;
  const app = image({ 'etc/app.conf': Buffer.from('team app\n') });
  await new Pusher({ url: hub.url }).pushImage('team/app', 'v1', app);
  const dir = tempDir(t, 'access-clients');
  const htpasswdFile = join(dir, 'htpasswd');
  const r = await exec(htpasswd, ['-Bbc', htpasswdFile, USER, PASSWORD]);
  assert.equal(r.code, 0, r.stderr);
  const logs: Array<Record<string, unknown>> = [];
  const proxy = await startProxy(t, {
    upstreams: [{ name: 'docker.io', url: hub.url, aliases: ['index.docker.io', 'registry-1.docker.io'], dockerHubLibrary: true }],
    defaultUpstream: 'docker.io',
    access: { htpasswd: htpasswdFile, rules: [{ upstreams: ['*'], repositories: ['**'], allow: [USER] }] },
    logger: { level: 'info', stream: { write: (s: string) => void logs.push(JSON.parse(s) as Record<string, unknown>) } },
  });
  return {
    hub,
    proxy,
    app,
    logs,
    lines: () =>
      logs
        .filter((l) => l.msg === 'request' && String(l.url ?? l.path ?? '').includes('team/app'))
        .map((l) => ({ status: l.status, user: l.user, path: String(l.url ?? l.path) })),
  };
}

/** Since `from`: a manifest and a blob of team/app served to alice, and nothing served to anyone else. */
function servedOnlyToAlice(w: World, from: number): void {
  const lines = w.lines().slice(from);
  const ok = lines.filter((l) => l.status === 200);
  assert.ok(ok.some((l) => l.path.includes('/manifests/')) && ok.some((l) => l.path.includes('/blobs/')), JSON.stringify(lines));
  assert.ok(ok.every((l) => l.user === USER), JSON.stringify(ok));
}

/** Since `from`: team/app was refused (401) and nothing of it was served. */
function refused(w: World, from: number): void {
  const lines = w.lines().slice(from);
  assert.ok(lines.some((l) => l.status === 401), JSON.stringify(lines));
  assert.ok(!lines.some((l) => l.status === 200), JSON.stringify(lines));
}

test('podman with access control: podman login then pull through the registries.conf mirror; --creds; nothing without', async (t) => {
  const podman = need(t, 'podman', 'apt-get install podman');
  if (!podman) return;
  const w = await world(t);
  if (!w) return;
  const dir = tempDir(t, 'podman-access');
  const conf = join(dir, 'registries.conf');
  writeFileSync(conf, localSnippet('registries.conf', w.proxy.host));
  // Its own storage and auth file, so the test leaves nothing in the machine's image store or logins.
  const storageConf = join(dir, 'storage.conf');
  writeFileSync(storageConf, `[storage]\ndriver = "vfs"\ngraphroot = "${join(dir, 'storage')}"\nrunroot = "${join(dir, 'run')}"\n`);
  const env = { ...process.env, CONTAINERS_REGISTRIES_CONF: conf, CONTAINERS_STORAGE_CONF: storageConf, REGISTRY_AUTH_FILE: join(dir, 'auth.json') };
  // podman pull wants the file REGISTRY_AUTH_FILE names to exist.
  writeFileSync(join(dir, 'auth.json'), '{"auths": {}}');

  // Without credentials: the mirror refuses, the real location is a dead port, the pull fails.
  let from = w.lines().length;
  const anon = await exec(podman, ['pull', '--quiet', 'docker.io/team/app:v1'], env);
  assert.notEqual(anon.code, 0, anon.stdout);
  refused(w, from);

  // The README's commands as written (the cache's address swapped for the one under test).
  from = w.lines().length;
  await run('sh', ['-ec', localSnippet('podman-login.sh', w.proxy.host)], env);
  servedOnlyToAlice(w, from);
  const digests = JSON.parse(await run(podman, ['image', 'inspect', '--format', '{{json .RepoDigests}}', 'docker.io/team/app:v1'], env)) as string[];
  assert.ok(digests.includes(`docker.io/team/app@${w.app.digest}`), digests.join(', '));
  await run(podman, ['logout', w.proxy.host], env);

  // --creds, by direct reference (no login kept); a wrong password fails.
  from = w.lines().length;
  await run(podman, ['pull', '--quiet', '--tls-verify=false', '--creds', `${USER}:${PASSWORD}`, `${w.proxy.host}/docker.io/team/app:v1`], env);
  servedOnlyToAlice(w, from);
  const wrong = await exec(podman, ['pull', '--quiet', '--tls-verify=false', '--creds', `${USER}:nope`, `${w.proxy.host}/docker.io/team/app:v1`], env);
  assert.notEqual(wrong.code, 0);
  assert.match(wrong.stderr, /unauthorized|authentication required|invalid/i);
});

test('containerd with access control: hosts.toml with an Authorization header pulls; without it, nothing', async (t) => {
  const c = await startContainerd(t);
  if (!c) return;
  const w = await world(t);
  if (!w) return;
  const ctr = (hostsDir: string, ns: string): Promise<{ code: number | null; stdout: string; stderr: string }> =>
    exec(c.ctr, ['--address', c.socket, '--namespace', ns, 'images', 'pull', '--hosts-dir', hostsDir, 'docker.io/team/app:v1']);

  // The plain README hosts.toml: no credentials, refused.
  const plain = join(c.dir, 'plain');
  mkdirSync(join(plain, 'docker.io'), { recursive: true });
  writeFileSync(join(plain, 'docker.io', 'hosts.toml'), localSnippet('containerd-hosts.toml', w.proxy.host));
  let from = w.lines().length;
  const anon = await ctr(plain, 'anon');
  assert.notEqual(anon.code, 0, anon.stdout);
  refused(w, from);

  // The README's hosts.toml with the header.
  const withAuth = join(c.dir, 'auth');
  const hostsToml = localSnippet('containerd-hosts-auth.toml', w.proxy.host);
  assert.match(hostsToml, new RegExp(`Authorization = "Basic ${Buffer.from(`${USER}:${PASSWORD}`).toString('base64')}"`));
  mkdirSync(join(withAuth, 'docker.io'), { recursive: true });
  writeFileSync(join(withAuth, 'docker.io', 'hosts.toml'), hostsToml);
  from = w.lines().length;
  const ok = await ctr(withAuth, 'auth');
  assert.equal(ok.code, 0, ok.stderr);
  servedOnlyToAlice(w, from);
  const ls = await run(c.ctr, ['--address', c.socket, '--namespace', 'auth', 'images', 'ls']);
  assert.ok(ls.split('\n').find((l) => l.startsWith('docker.io/team/app:v1 '))?.includes(w.app.digest), ls);
});

test('Docker Engine with access control: registry-mirrors sends the credentials kept for Docker Hub, not those of docker login <mirror>', async (t) => {
  const w = await world(t);
  if (!w) return;
  // insecure-registries only so that `docker login` to the plain-HTTP cache is possible at all.
  const daemonJson = JSON.parse(localSnippet('daemon.json', w.proxy.host)) as Record<string, unknown>;
  const d = await startDockerd(t, JSON.stringify({ ...daemonJson, 'insecure-registries': [w.proxy.host] }));
  if (!d) return;
  const docker = (args: string[]): ReturnType<typeof exec> => exec(d.docker, args, d.env);

  // No credentials: the mirror answers 401, Docker falls back to registry-1.docker.io (no network here) and fails.
  let from = w.lines().length;
  const anon = await docker(['pull', '--quiet', 'team/app:v1']);
  assert.notEqual(anon.code, 0, anon.stdout);
  refused(w, from);

  // `docker login <cache>` succeeds (the cache checks the password), but dockerd does not use that
  // login for a mirror: the pull is refused just the same.
  const login = await docker(['login', '-u', USER, '--password', PASSWORD, w.proxy.host]);
  assert.equal(login.code, 0, login.stderr);
  from = w.lines().length;
  const afterLogin = await docker(['pull', '--quiet', 'team/app:v1']);
  assert.notEqual(afterLogin.code, 0, afterLogin.stdout);
  refused(w, from);

  // What dockerd sends a mirror is what the client keeps for Docker Hub: the README's config.json.
  writeFileSync(join(d.dir, 'client', 'config.json'), localSnippet('docker-config.json', w.proxy.host));
  from = w.lines().length;
  await run(d.docker, ['pull', '--quiet', 'team/app:v1'], d.env);
  servedOnlyToAlice(w, from);
  const repoDigests = JSON.parse(await run(d.docker, ['image', 'inspect', '--format', '{{json .RepoDigests}}', 'team/app:v1'], d.env)) as string[];
  assert.deepEqual(repoDigests, [`team/app@${w.app.digest}`]);
});
