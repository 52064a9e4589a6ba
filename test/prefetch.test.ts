/** Warming the cache: `ocicache prefetch` (directly and via --server) and POST /admin/prefetch. */
import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { request } from 'undici';
import { formatBytes } from '../src/core/units.js';
import { runCli, writeConfig } from './helpers/cli.js';
import { startDistribution } from './helpers/distribution.js';
import { blobFile, metric, metricsText, startProxy } from './helpers/proxy.js';
import { startFakeUpstream } from './helpers/fake-upstream.js';
import { image, multiArch, OCI_CONFIG, OCI_MANIFEST, Pusher, randomLayer, sha256 } from './helpers/seed.js';
import { tempDir } from './helpers/tools.js';

const platforms = [
  { os: 'linux', architecture: 'amd64' },
  { os: 'linux', architecture: 'arm64' },
];

test('ocicache prefetch fetches an index and only the chosen platforms, from arguments and a file', async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const alpine = multiArch(platforms, 'alpine');
  const app = image({ 'app.bin': randomLayer(300_000) });
  const pusher = new Pusher({ url: registry.url });
  await pusher.pushMultiArch('library/alpine', '3.20', alpine);
  await pusher.pushImage('team/app', 'v1', app);

  const root = tempDir(t, 'prefetch');
  const upstreams = [{ name: 'docker.io', url: registry.url, dockerHubLibrary: true }];
  const config = writeConfig(root, { storage: { root }, upstreams, defaultUpstream: 'docker.io' });
  const refs = join(root, 'refs.txt');
  writeFileSync(refs, '# images for the rollout\nteam/app:v1\n\n');
  const r = await runCli(['prefetch', '--config', config, '--platform', 'linux/arm64', 'docker.io/library/alpine:3.20', '--file', refs]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  const [amd64, arm64] = alpine.images;
  const lines = r.stdout.trim().split('\n');
  assert.equal(lines[0], `docker.io/library/alpine:3.20  manifest ${alpine.digest} ${formatBytes(alpine.index.length)} fetched`);
  assert.equal(lines[1], `docker.io/library/alpine:3.20  manifest ${arm64!.digest} ${formatBytes(arm64!.manifest.length)} fetched (linux/arm64)`);
  assert.ok(lines.includes(`team/app:v1  manifest ${app.digest} ${formatBytes(app.manifest.length)} fetched`));
  assert.equal(lines.at(-1), `prefetch: 2 images, 4 blobs (4 fetched), ${formatBytes(arm64!.blobs.concat(app.blobs).reduce((n, b) => n + b.data.length, 0))} in the cache; 0 failed`);
  for (const b of [...arm64!.blobs, ...app.blobs]) assert.ok(existsSync(blobFile(root, b.descriptor.digest)), 'chosen platform cached');
  for (const b of amd64!.blobs) assert.equal(existsSync(blobFile(root, b.descriptor.digest)), false, 'other platform not fetched');

  // Once more: everything is already there.
  const again = await runCli(['prefetch', '--config', config, '--platform', 'linux/arm64', 'alpine:3.20']);
  assert.equal(again.code, 0);
  assert.match(again.stdout, /prefetch: 1 images, 2 blobs \(0 fetched\)/);

  // The warmed cache serves the pull without a blob request upstream.
  const proxy = await startProxy(t, { root, upstreams });
  const seen = registry.accessLog.length;
  for (const b of arm64!.blobs) {
    const res = await request(`${proxy.url}/v2/library/alpine/blobs/${b.descriptor.digest}?ns=docker.io`);
    await res.body.dump();
    assert.equal(res.headers['x-cache'], 'HIT');
  }
  assert.deepEqual(registry.accessLog.slice(seen), []);
  // One process per cache directory: the one-shot command runs once the server is stopped.
  await proxy.app.close();

  const bad = await runCli(['prefetch', '--config', config, 'nosuch.example/x:1', 'team/app:missing']);
  assert.equal(bad.code, 1);
  assert.match(bad.stdout, /^nosuch\.example\/x:1  error: .+$/m);
  assert.match(bad.stdout, /^team\/app:missing  error: manifest unknown$/m);
  assert.match(bad.stdout, /; 2 failed\n$/);
});

test('POST /admin/prefetch and /admin/gc: off without a token, 401 without the right one, NDJSON progress with it, and prefetch --server', async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const alpine = multiArch(platforms, 'alpine');
  await new Pusher({ url: registry.url }).pushMultiArch('library/alpine', '3.20', alpine);
  const upstreams = [{ name: 'docker.io', url: registry.url, dockerHubLibrary: true }];

  const closed = await startProxy(t, { upstreams });
  const off = await request(`${closed.url}/admin/prefetch`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '{"references":["alpine:3.20"]}' });
  assert.equal(off.statusCode, 403);
  assert.deepEqual(await off.body.json(), { errors: [{ code: 'DENIED', message: 'the admin API is off: set admin.tokenEnv or admin.tokenFile in the config' }] });

  const proxy = await startProxy(t, { upstreams, defaultUpstream: 'docker.io', admin: { tokenEnv: 'ADMIN_TOKEN' }, env: { ADMIN_TOKEN: 's3cret' } });
  const call = (token: string | undefined, body: string) =>
    request(`${proxy.url}/admin/prefetch`, { method: 'POST', headers: { 'content-type': 'application/json', ...(token ? { authorization: `Bearer ${token}` } : {}) }, body });
  for (const token of [undefined, 'wrong']) {
    const res = await call(token, '{"references":["alpine:3.20"]}');
    assert.equal(res.statusCode, 401);
    assert.equal(res.headers['www-authenticate'], 'Bearer realm="ocicache-admin"');
    assert.deepEqual(await res.body.json(), { errors: [{ code: 'UNAUTHORIZED', message: 'admin token required' }] });
  }
  for (const [body, message] of [
    ['{"references":[]}', 'references must list at least one image'],
    ['{"references":"alpine"}', 'references must be a list of strings'],
    ['not json', 'request body is not valid JSON'],
  ]) {
    const res = await call('s3cret', body!);
    assert.equal(res.statusCode, 400, body);
    assert.equal(((await res.body.json()) as { errors: Array<{ message: string }> }).errors[0]!.message, message);
  }

  const res = await call('s3cret', '{"references":["docker.io/library/alpine:3.20"],"platforms":["linux/amd64"]}');
  assert.equal(res.statusCode, 200);
  assert.equal(res.headers['content-type'], 'application/x-ndjson');
  const events = (await res.body.text()).trim().split('\n').map((l) => JSON.parse(l) as { event: string; result?: string; summary?: Record<string, number> });
  assert.deepEqual(events.map((e) => `${e.event}:${e.result ?? ''}`), ['manifest:fetched', 'manifest:fetched', 'blob:fetched', 'blob:fetched', 'done:']);
  assert.deepEqual(events.at(-1)!.summary, { refs: 1, failedRefs: 0, blobs: 2, fetched: 2, bytes: alpine.images[0]!.blobs.reduce((n, b) => n + b.data.length, 0) });
  const text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_prefetch_blobs_total', { result: 'fetched' }), 2);

  const gc = await request(`${proxy.url}/admin/gc`, { method: 'POST', headers: { authorization: 'Bearer s3cret' } });
  assert.equal(gc.statusCode, 200);
  assert.deepEqual(await gc.body.json(), { blobs: 0, bytes: 0, manifests: 0, tags: 0, used: events.at(-1)!.summary!.bytes, danglingRows: 0, limit: null });
  const gcDenied = await request(`${proxy.url}/admin/gc`, { method: 'POST' });
  assert.equal(gcDenied.statusCode, 401);
  await gcDenied.body.dump();

  const cli = await runCli(['prefetch', '--server', proxy.url, '--platform', 'linux/amd64,linux/arm64', 'alpine:3.20'], { OCICACHE_ADMIN_TOKEN: 's3cret' });
  assert.equal(cli.code, 0, cli.stdout + cli.stderr);
  assert.match(cli.stdout, /prefetch: 1 images, 4 blobs \(2 fetched\)/);
  const denied = await runCli(['prefetch', '--server', proxy.url, 'alpine:3.20'], { OCICACHE_ADMIN_TOKEN: '' });
  assert.equal(denied.code, 2);
  assert.match(denied.stderr, /answered 401/);
});

test('prefetch refuses digests from upstream content that are not digests (no path escapes the cache)', async (t) => {
  const fake = await startFakeUpstream(t);
  const outside = tempDir(t, 'victim');
  const victim = join(outside, 'victim.txt');
  writeFileSync(victim, 'must survive');
  const proxy = await startProxy(t, { upstreams: [{ name: 'evil.example', url: fake.url }], admin: { tokenEnv: 'T' }, env: { T: 'tok' } });
  const evil = `sha256:${'../'.repeat(8)}${victim.slice(1)}`;
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: OCI_CONFIG, digest: evil, size: 12 }, layers: [] }));
  const serve = (req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse): void => {
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'docker-content-digest': sha256(manifest) });
    res.end(req.method === 'HEAD' ? undefined : manifest);
  };
  fake.route('/v2/evil/app/manifests/v1', serve);
  fake.route(`/v2/evil/app/manifests/${sha256(manifest)}`, serve);
  const res = await request(`${proxy.url}/admin/prefetch`, { method: 'POST', headers: { authorization: 'Bearer tok', 'content-type': 'application/json' }, body: '{"references":["evil.example/evil/app:v1"]}' });
  const events = (await res.body.text()).trim().split('\n').map((l) => JSON.parse(l) as { event: string; result?: string; error?: string });
  const blob = events.find((e) => e.event === 'blob')!;
  assert.equal(blob.result, 'failed');
  assert.match(blob.error!, /^invalid digest/);
  const gc = await request(`${proxy.url}/admin/gc`, { method: 'POST', headers: { authorization: 'Bearer tok' } });
  assert.equal(((await gc.body.json()) as { blobs: number }).blobs, 0);
  assert.equal(readFileSync(victim, 'utf8'), 'must survive');
});
