/**
 * Real clients pulling through ocicache: skopeo (containers/image, as podman and CRI-O use it)
 * by direct reference and as a registries.conf prefix mirror, and a containerd daemon started by
 * the test, pulling with `ctr images pull --hosts-dir` so every request carries `ns`.
 * The README's client snippets are these.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { run, startContainerd, startDockerd } from './helpers/daemons.js';
import { startDistribution, type Distribution } from './helpers/distribution.js';
import { startProxy, type Proxy } from './helpers/proxy.js';
import { image, multiArch, Pusher, sha256, type Image, type MultiArch } from './helpers/seed.js';
import { localSnippet, pointAtCache, readmeSnippet } from './helpers/readme.js';
import { need, tempDir } from './helpers/tools.js';

interface World {
  hub: Distribution;
  ghcr: Distribution;
  proxy: Proxy;
  alpine: MultiArch;
  ghcrApp: Image;
}

/**
 * Two upstreams (as docker.io and ghcr.io) and a proxy with no default upstream unless one is
 * asked for: every request must name its upstream.
 */
async function world(t: TestContext, defaultUpstream?: string): Promise<World | undefined> {
  const hub = await startDistribution(t);
  const ghcr = await startDistribution(t);
  if (!hub || !ghcr) return undefined;
  const alpine = multiArch([{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }], 'alpine');
  await new Pusher({ url: hub.url }).pushMultiArch('library/alpine', '3.20', alpine);
  const ghcrApp = image({ 'etc/app.conf': Buffer.from('from ghcr\n') });
  await new Pusher({ url: ghcr.url }).pushImage('team/app', 'v1', ghcrApp);
  const proxy = await startProxy(t, {
    upstreams: [
      { name: 'docker.io', url: hub.url, aliases: ['index.docker.io', 'registry-1.docker.io'], dockerHubLibrary: true },
      { name: 'ghcr.io', url: ghcr.url },
    ],
    defaultUpstream,
  });
  return { hub, ghcr, proxy, alpine, ghcrApp };
}

test('skopeo pulls through the cache by direct reference and as a prefix mirror', async (t) => {
  const skopeo = need(t, 'skopeo', 'apt-get install skopeo');
  if (!skopeo) return;
  const w = await world(t);
  if (!w) return;
  const dir = tempDir(t, 'skopeo');
  const policy = join(dir, 'policy.json');
  writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }));

  // Direct reference: the proxy as a registry, the upstream as the first path component.
  const raw = await run(skopeo, ['inspect', '--tls-verify=false', '--raw', `docker://${w.proxy.host}/docker.io/library/alpine:3.20`]);
  assert.equal(sha256(raw), w.alpine.digest);
  await run(skopeo, ['--policy', policy, 'copy', '--all', '--preserve-digests', '--src-tls-verify=false', `docker://${w.proxy.host}/ghcr.io/team/app:v1`, `oci:${join(dir, 'direct')}:v1`]);
  const index = JSON.parse(readFileSync(join(dir, 'direct', 'index.json'), 'utf8')) as { manifests: Array<{ digest: string }> };
  assert.equal(index.manifests[0]!.digest, w.ghcrApp.digest);

  // Prefix mirror (podman/CRI-O registries.conf): the primary location is a dead port, so every byte comes from the mirror.
  // containers/image reads $HOME/.config/containers/registries.conf before /etc/containers (skopeo 1.9 has no flag for it).
  const home = join(dir, 'home');
  mkdirSync(join(home, '.config', 'containers'), { recursive: true });
  const conf = join(home, '.config', 'containers', 'registries.conf');
  writeFileSync(conf, localSnippet('registries.conf', w.proxy.host));
  await run(skopeo, ['--policy', policy, 'copy', '--all', '--preserve-digests', `docker://docker.io/library/alpine:3.20`, `oci:${join(dir, 'mirror')}:3.20`], { ...process.env, HOME: home, CONTAINERS_REGISTRIES_CONF: conf });
  const mirrored = JSON.parse(readFileSync(join(dir, 'mirror', 'index.json'), 'utf8')) as { manifests: Array<{ digest: string }> };
  assert.equal(mirrored.manifests[0]!.digest, w.alpine.digest);
  const blobs = readdirSync(join(dir, 'mirror', 'blobs', 'sha256'));
  for (const img of w.alpine.images) for (const b of img.blobs) assert.ok(blobs.includes(b.descriptor.digest.slice(7)));
  // The snippet's second registry goes through the same cache under its own prefix.
  await run(skopeo, ['--policy', policy, 'copy', '--all', '--preserve-digests', 'docker://ghcr.io/team/app:v1', `oci:${join(dir, 'mirror-ghcr')}:v1`], { ...process.env, HOME: home, CONTAINERS_REGISTRIES_CONF: conf });
  const ghcr = JSON.parse(readFileSync(join(dir, 'mirror-ghcr', 'index.json'), 'utf8')) as { manifests: Array<{ digest: string }> };
  assert.equal(ghcr.manifests[0]!.digest, w.ghcrApp.digest);
});

test('podman pulls through the README registries.conf (prefix mirrors for docker.io and ghcr.io)', async (t) => {
  const podman = need(t, 'podman', 'apt-get install podman');
  if (!podman) return;
  const w = await world(t);
  if (!w) return;
  const dir = tempDir(t, 'podman');
  const conf = join(dir, 'registries.conf');
  writeFileSync(conf, localSnippet('registries.conf', w.proxy.host));
  // Its own storage, so the test leaves nothing in the machine's image store.
  const storage = ['--root', join(dir, 'storage'), '--runroot', join(dir, 'run'), '--storage-driver', 'vfs'];
  const env = { ...process.env, CONTAINERS_REGISTRIES_CONF: conf };
  for (const [ref, digest] of [
    ['docker.io/library/alpine:3.20', w.alpine.digest],
    ['ghcr.io/team/app:v1', w.ghcrApp.digest],
  ] as const) {
    await run(podman, [...storage, 'pull', '--quiet', ref], env);
    const repoDigests = JSON.parse(await run(podman, [...storage, 'image', 'inspect', '--format', '{{json .RepoDigests}}', ref], env)) as string[];
    assert.ok(repoDigests.includes(`${ref.split(':')[0]}@${digest}`), `${ref}: ${repoDigests.join(', ')}`);
  }
});

/** Pulls each reference with `ctr --hosts-dir` and checks the image it recorded has the expected digest. */
async function ctrPulls(c: { ctr: string; socket: string }, hostsDir: string, pulls: Array<[string, string]>, namespace = 'default'): Promise<void> {
  for (const [ref, digest] of pulls) {
    await run(c.ctr, ['--address', c.socket, '--namespace', namespace, 'images', 'pull', '--hosts-dir', hostsDir, '--all-platforms', ref]);
    const ls = await run(c.ctr, ['--address', c.socket, '--namespace', namespace, 'images', 'ls']);
    const line = ls.split('\n').find((l) => l.startsWith(`${ref} `));
    assert.ok(line?.includes(digest), `${ref} should resolve to ${digest}:\n${ls}`);
  }
}

test('containerd pulls multi-arch images from two upstreams through one endpoint (hosts.toml, ns)', async (t) => {
  const c = await startContainerd(t);
  if (!c) return;
  const w = await world(t);
  if (!w) return;
  // One hosts.toml for docker.io, and _default for everything else (ghcr.io here). `server` is a
  // dead port so a pull can only succeed through the cache.
  const hostsDir = join(c.dir, 'certs.d');
  const hostsToml = localSnippet('containerd-hosts.toml', w.proxy.host);
  assert.match(hostsToml, /^server = "http:\/\/127\.0\.0\.1:1"$/m);
  for (const sub of ['docker.io', '_default']) {
    mkdirSync(join(hostsDir, sub), { recursive: true });
    writeFileSync(join(hostsDir, sub, 'hosts.toml'), hostsToml);
  }
  await ctrPulls(c, hostsDir, [
    ['docker.io/library/alpine:3.20', w.alpine.digest],
    ['ghcr.io/team/app:v1', w.ghcrApp.digest],
  ]);
  // A second containerd namespace pulls again: all from the cache now.
  const before = w.hub.accessLog.length;
  await ctrPulls(c, hostsDir, [['docker.io/library/alpine:3.20', w.alpine.digest]], 'second');
  await sleep(50);
  assert.deepEqual(w.hub.accessLog.slice(before), [], 'the second pull sent nothing upstream');
});

test('containerd pulls through the hosts.toml files k3s renders from the README registries.yaml', async (t) => {
  // k3s itself cannot run here; test/fixtures/k3s holds what its own rendering code wrote for the snippet.
  const fixtures = new URL('./fixtures/k3s/', import.meta.url);
  assert.equal(readmeSnippet('registries.yaml'), readFileSync(new URL('registries.yaml', fixtures), 'utf8'), 'README k3s snippet and test/fixtures/k3s/registries.yaml differ: render certs.d again with k3s');
  const c = await startContainerd(t);
  if (!c) return;
  const w = await world(t);
  if (!w) return;
  const hostsDir = join(c.dir, 'certs.d');
  for (const sub of ['docker.io', '_default']) {
    const rendered = pointAtCache(readFileSync(new URL(`certs.d/${sub}/hosts.toml`, fixtures), 'utf8'), w.proxy.host);
    assert.match(rendered, new RegExp(`^\\[host\\."http://${w.proxy.host.replace(/[.]/g, '\\.')}/v2"\\]$`, 'm'));
    mkdirSync(join(hostsDir, sub), { recursive: true });
    writeFileSync(join(hostsDir, sub, 'hosts.toml'), rendered);
  }
  await ctrPulls(c, hostsDir, [
    ['docker.io/library/alpine:3.20', w.alpine.digest],
    ['ghcr.io/team/app:v1', w.ghcrApp.digest],
  ]);
  // containerd sent the registry as ns, so each upstream served only its own image.
  assert.ok(w.hub.accessLog.some((l) => l.includes('/v2/library/alpine/manifests/3.20')), w.hub.accessLog.join('\n'));
  assert.ok(w.ghcr.accessLog.some((l) => l.includes('/v2/team/app/manifests/v1')), w.ghcr.accessLog.join('\n'));
  assert.ok(!w.ghcr.accessLog.some((l) => l.includes('alpine')) && !w.hub.accessLog.some((l) => l.includes('team/app')));
});

test('Docker Engine pulls through the README daemon.json (registry-mirrors, no ns: the default upstream)', async (t) => {
  const w = await world(t, 'docker.io');
  if (!w) return;
  const daemonJson = localSnippet('daemon.json', w.proxy.host);
  assert.match(daemonJson, new RegExp(`"http://${w.proxy.host.replace(/[.]/g, '\\.')}"`));
  const d = await startDockerd(t, daemonJson);
  if (!d) return;
  const { docker, env } = d;
  const info = await run(docker, ['info', '--format', '{{json .RegistryConfig.Mirrors}}'], env);
  assert.deepEqual(JSON.parse(info), [`http://${w.proxy.host}/`]);

  // registry-1.docker.io is Docker's fallback; the digest and the upstream's access log show the pull came through the mirror.
  await run(docker, ['pull', '--quiet', 'alpine:3.20'], env);
  const repoDigests = JSON.parse(await run(docker, ['image', 'inspect', '--format', '{{json .RepoDigests}}', 'alpine:3.20'], env)) as string[];
  assert.deepEqual(repoDigests, [`alpine@${w.alpine.digest}`]);
  const manifests = w.hub.accessLog.filter((l) => l.includes('/v2/library/alpine/manifests/'));
  assert.ok(manifests.length > 0, `the upstream behind the default served the manifests:\n${w.hub.accessLog.join('\n')}`);
  assert.deepEqual(w.ghcr.accessLog.filter((l) => l.includes('/v2/library/')), [], 'nothing went to the other upstream');
});
