/**
 * A node tier chained to a fleet by ns (README, "Running a fleet"): node-local ocicaches whose
 * `parent` is the fleet's balancer ask it for every upstream with `?ns=<upstream>`, check the
 * answer's OCI-Namespace, verify every byte again and hold no upstream credentials. containerd on
 * a second node pulls with nothing reaching the upstream registries; content of one upstream is
 * never taken for another's, through both tiers; with the parent gone a node serves what it has.
 */
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { buildConfig } from '../src/core/config.js';
import { run, startContainerd } from './helpers/daemons.js';
import { startDistribution } from './helpers/distribution.js';
import { startFakeUpstream } from './helpers/fake-upstream.js';
import { startFleet } from './helpers/fleet.js';
import { fetchBody, metric, metricsText, ociError, pullImage, startProxy } from './helpers/proxy.js';
import { image, multiArch, OCI_MANIFEST, Pusher, sha256 } from './helpers/seed.js';
import { freePort, stopChild, tempDir } from './helpers/tools.js';

/** The node tier's config: the public names of the upstreams, never dialled; the parent does. */
const NODE_UPSTREAMS = [
  { name: 'docker.io', url: 'https://registry-1.docker.io', aliases: ['index.docker.io'], dockerHubLibrary: true, tagTtl: '1ms' },
  { name: 'ghcr.io', url: 'https://ghcr.io', tagTtl: '1ms' },
];

function hostsDir(parent: string, node: string): string {
  const dir = join(parent, `certs-${node.replace(/[:.]/g, '-')}.d`);
  for (const sub of ['docker.io', 'ghcr.io']) {
    mkdirSync(join(dir, sub), { recursive: true });
    writeFileSync(join(dir, sub, 'hosts.toml'), `server = "http://127.0.0.1:1"\n\n[host."http://${node}"]\n  capabilities = ["pull", "resolve"]\n`);
  }
  return dir;
}

test('node tier: containerd on a second node pulls through its node cache and the fleet with nothing reaching the upstreams', { timeout: 180_000 }, async (t) => {
  const hub = await startDistribution(t);
  const ghcr = await startDistribution(t);
  if (!hub || !ghcr) return;
  const alpine = multiArch([{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }], 'alpine');
  await new Pusher({ url: hub.url }).pushMultiArch('library/alpine', '3.20', alpine);
  // The same repository and tag on both upstreams, different content.
  const hubApp = image({ 'who.txt': Buffer.from('docker.io team/app\n') });
  const ghcrApp = image({ 'who.txt': Buffer.from('ghcr.io team/app\n') });
  await new Pusher({ url: hub.url }).pushImage('team/app', 'v1', hubApp);
  await new Pusher({ url: ghcr.url }).pushImage('team/app', 'v1', ghcrApp);
  const dir = tempDir(t, 'node-tier');
  const fleet = await startFleet(t, dir, {
    upstreams: [
      { name: 'docker.io', url: hub.url, aliases: ['index.docker.io', 'registry-1.docker.io'], dockerHubLibrary: true },
      { name: 'ghcr.io', url: ghcr.url },
    ],
  });
  if (!fleet) return;
  const first = await startContainerd(t);
  const second = await startContainerd(t);
  if (!first || !second) return;
  const nodeA = await startProxy(t, { upstreams: NODE_UPSTREAMS, parent: { url: fleet.url } });
  const nodeB = await startProxy(t, { upstreams: NODE_UPSTREAMS, parent: { url: fleet.url } });
  const pulls: Array<[string, string]> = [
    ['docker.io/library/alpine:3.20', alpine.digest],
    ['docker.io/team/app:v1', hubApp.digest],
    ['ghcr.io/team/app:v1', ghcrApp.digest],
  ];
  const pullAll = async (c: { ctr: string; socket: string }, node: string): Promise<void> => {
    const hosts = hostsDir(dir, node);
    for (const [ref, digest] of pulls) {
      await run(c.ctr, ['--address', c.socket, 'images', 'pull', '--all-platforms', '--hosts-dir', hosts, ref]);
      const ls = await run(c.ctr, ['--address', c.socket, 'images', 'ls']);
      assert.ok(ls.split('\n').some((l) => l.startsWith(`${ref} `) && l.includes(digest)), `${ref} is ${digest}:\n${ls}`);
    }
  };
  // The first node: its node cache asks the fleet, which fetches from the upstreams.
  await pullAll(first, nodeA.host);
  assert.ok(hub.accessLog.length > 0 && ghcr.accessLog.length > 0);
  // The second node: its node cache is cold, the fleet is warm; nothing reaches the upstreams
  // (tags revalidate at the fleet within its TTL, 5 minutes by default).
  const before = [hub.accessLog.length, ghcr.accessLog.length];
  await pullAll(second, nodeB.host);
  await sleep(50);
  assert.deepEqual([hub.accessLog.slice(before[0]), ghcr.accessLog.slice(before[1])], [[], []], 'nothing reached the upstreams');

  // With the parent gone the node serves what it has: tags past their TTL are served stale.
  await stopChild(fleet.haproxy, 'SIGKILL');
  const stale = await fetchBody(`${nodeB.url}/v2/team/app/manifests/v1?ns=ghcr.io`, { accept: OCI_MANIFEST });
  assert.deepEqual([stale.status, stale.headers['x-cache'], sha256(stale.body!)], [200, 'STALE', ghcrApp.digest]);
  const cold = await fetchBody(`${nodeB.url}/v2/team/other/manifests/v1?ns=ghcr.io`, { accept: OCI_MANIFEST });
  assert.equal(cold.status, 503);
});

test('node tier: an answer from the parent that names another namespace is refused and not stored; upstream credentials are refused', async (t) => {
  const parent = await startFakeUpstream(t);
  const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256('{}'), size: 2 }, layers: [] }));
  const seen: string[] = [];
  parent.route('/v2/team/app/manifests/v1', (req, res) => {
    seen.push(req.url ?? '');
    // A parent that mixes up namespaces: ghcr.io's content for a docker.io request.
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'content-length': String(body.length), 'docker-content-digest': sha256(body), 'oci-namespace': 'ghcr.io' }).end(req.method === 'HEAD' ? undefined : body);
  });
  const node = await startProxy(t, { upstreams: NODE_UPSTREAMS, parent: { url: parent.url } });
  for (const path of ['/v2/team/app/manifests/v1?ns=docker.io', '/v2/team/app/manifests/v1?ns=docker.io']) {
    const r = await fetchBody(`${node.url}${path}`, { accept: OCI_MANIFEST });
    assert.equal(r.status, 502);
    assert.deepEqual(ociError(r), { code: 'UNKNOWN', message: 'the parent cache answered for docker.io with OCI-Namespace "ghcr.io"' });
  }
  // Asked with ns each time (nothing was stored), by the node's upstream name.
  assert.ok(seen.length >= 2 && seen.every((u) => /[?&]ns=docker\.io(&|$)/.test(u)), seen.join(' '));

  const cases: Array<[unknown, string]> = [
    [{ parent: { url: parent.url }, upstreams: [{ name: 'docker.io', url: 'https://registry-1.docker.io', auth: { username: 'u', passwordEnv: 'PW' } }] }, 'config: upstreams[0].auth: a cache with a parent holds no upstream credentials (the parent does): remove auth'],
    [{ parent: { url: 'ftp://parent' }, upstreams: NODE_UPSTREAMS }, 'config: parent.url: must use http or https'],
    [{ parent: { url: `${parent.url}?ns=x` }, upstreams: NODE_UPSTREAMS }, "config: parent.url: must be the parent's base URL: no credentials (use auth), no query"],
    [{ parent: { url: parent.url, fallback: 'yes' }, upstreams: NODE_UPSTREAMS }, 'config: parent.fallback: must be true or false'],
    [{ parent: { url: parent.url, retries: 2 }, upstreams: NODE_UPSTREAMS }, 'config: parent.retries: unknown key (known: url, auth, fallback, caFile, clientCertFile, clientKeyFile, insecure)'],
  ];
  for (const [doc, message] of cases) assert.throws(() => buildConfig(doc, { PW: 'p' }), { message });
});

test('node tier: with parent.fallback a node whose parent is unreachable asks the upstream itself; without it, 503', async (t) => {
  const hub = await startDistribution(t);
  if (!hub) return;
  const app = image({ 'who.txt': Buffer.from('straight from the upstream\n') });
  await new Pusher({ url: hub.url }).pushImage('team/app', 'v1', app);
  const dead = `http://127.0.0.1:${await freePort()}`;
  const upstreams = [{ name: 'docker.io', url: hub.url }];
  const cases: Array<[string, Record<string, unknown>, number]> = [
    ['fallback', { url: dead, fallback: true }, 200],
    ['no fallback', { url: dead }, 503],
  ];
  for (const [what, parent, status] of cases) {
    const node = await startProxy(t, { upstreams, parent });
    const before: number = hub.accessLog.length;
    const r = await fetchBody(`${node.url}/v2/team/app/manifests/v1?ns=docker.io`, { accept: OCI_MANIFEST });
    assert.equal(r.status, status, what);
    if (status === 200) {
      assert.equal(sha256(r.body!), app.digest);
      const pulled = await pullImage(node.url, 'team/app', 'v1');
      for (const b of pulled.blobs) assert.deepEqual([b.status, b.sha256], [200, b.digest]);
      assert.ok(hub.accessLog.length > before, 'the upstream was asked');
      assert.equal(metric(await metricsText(node), 'ocicache_parent_fallbacks_total', { upstream: 'docker.io' }) > 0, true);
    } else {
      assert.equal(hub.accessLog.length, before, 'the upstream was not asked');
    }
  }
});
