/**
 * The keep list (config `keep`, cache/keep.ts): images fetched at start-up in the background, only
 * the listed platforms, tag globs resolved against the upstream, never evicted by size, served
 * when the upstream is gone, shown on the status page, GET /admin/keep and `ocicache kept`; a real
 * distribution registry as the upstream.
 */
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import test from 'node:test';
import { request } from 'undici';
import { buildConfig } from '../src/core/config.js';
import { runCli, writeConfig } from './helpers/cli.js';
import { startDistribution } from './helpers/distribution.js';
import { startFakeUpstream } from './helpers/fake-upstream.js';
import { blobFile, fetchBody, jsonBody, startProxy } from './helpers/proxy.js';
import { image, OCI_INDEX, OCI_MANIFEST, Pusher, sha256, type Image } from './helpers/seed.js';
import { tempDir, until } from './helpers/tools.js';

const MiB = 1024 * 1024;

/** An index of one image per platform, each with a layer of `size` random bytes. */
function multiPlatform(platforms: Array<{ os: string; architecture: string }>, size: number): { index: Buffer; images: Image[] } {
  const images = platforms.map((p) => image({ [`${p.architecture}.bin`]: randomBytes(size) }, p));
  const index = Buffer.from(
    JSON.stringify({
      schemaVersion: 2,
      mediaType: OCI_INDEX,
      manifests: images.map((img, i) => ({ mediaType: OCI_MANIFEST, digest: img.digest, size: img.manifest.length, platform: platforms[i] })),
    }),
  );
  return { index, images };
}

test('keep: listed images are fetched at start-up (listed platforms only, tag globs resolved), survive eviction and an upstream outage, and are shown', { timeout: 120_000 }, async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const pusher = new Pusher({ url: registry.url });
  const busybox = multiPlatform([{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }], 2 * MiB);
  for (const img of busybox.images) await pusher.pushImage('library/busybox', undefined, img);
  await pusher.pushManifest('library/busybox', '1.36', busybox.index, OCI_INDEX);
  const pause: Record<string, Image> = {};
  for (const tag of ['3.9', '3.10', 'latest']) await pusher.pushImage('pause', tag, (pause[tag] = image({ [`pause-${tag}`]: randomBytes(64 * 1024) })));
  const fillers = Array.from({ length: 4 }, () => image({ 'filler.bin': randomBytes(2 * MiB) }));
  for (const [i, img] of fillers.entries()) await pusher.pushImage(`team/filler${i}`, 'v1', img);

  const proxy = await startProxy(t, {
    upstreams: [
      { name: 'docker.io', url: registry.url, dockerHubLibrary: true },
      // A second name for the same registry, as registry.k8s.io would be.
      { name: 'registry.k8s.io', url: registry.url },
    ],
    // Room for the kept images and about one filler: the rest must be evicted around them.
    storage: { maxSize: 5 * MiB, highWatermark: 90, lowWatermark: 50 },
    keep: { images: ['docker.io/library/busybox:1.36', 'registry.k8s.io/pause:3.*'], platforms: ['linux/amd64'] },
    admin: { tokenEnv: 'ADMIN' },
    env: { ADMIN: 'admin-token' },
  });
  const admin = { authorization: 'Bearer admin-token' };
  type Entries = { entries: Array<{ pattern: string; upstream: string; name: string; refs: Array<{ ref: string; digests: number }>; refreshedAt?: number; error?: string }> };
  const entries = async (): Promise<Entries['entries']> => jsonBody<Entries>(await fetchBody(`${proxy.url}/admin/keep`, admin)).entries;
  await until('the keep list is fetched', async () => (await entries()).every((e) => e.refreshedAt !== undefined), 30_000);

  const amd64 = busybox.images[0]!;
  const arm64 = busybox.images[1]!;
  assert.deepEqual(await entries(), [
    { pattern: 'docker.io/library/busybox:1.36', upstream: 'docker.io', name: 'library/busybox', refs: [{ ref: 'docker.io/library/busybox:1.36', digests: 1 + 1 + amd64.blobs.length }], refreshedAt: (await entries())[0]!.refreshedAt },
    {
      pattern: 'registry.k8s.io/pause:3.*',
      upstream: 'registry.k8s.io',
      name: 'pause',
      refs: ['3.10', '3.9'].map((tag) => ({ ref: `registry.k8s.io/pause:${tag}`, digests: 1 + pause[tag]!.blobs.length })),
      refreshedAt: (await entries())[1]!.refreshedAt,
    },
  ]);
  // Only linux/amd64 of the index was fetched: arm64's manifest and layers never left the upstream.
  const asked = registry.accessLog.filter((l) => /^(GET|HEAD) /.test(l));
  for (const b of arm64.blobs) assert.ok(!asked.some((l) => l.includes(b.descriptor.digest)), `arm64 blob ${b.descriptor.digest} was not fetched`);
  assert.ok(!asked.some((l) => l.includes(`/manifests/${arm64.digest}`)), 'the arm64 manifest was not fetched');
  assert.ok(!asked.some((l) => l.includes('/pause/manifests/latest')), 'pause:latest does not match 3.*');

  // Fillers pulled through the cache overflow it; gc evicts them, never the kept images.
  for (const [i, img] of fillers.entries()) {
    for (const b of img.blobs) assert.equal((await fetchBody(`${proxy.url}/v2/team/filler${i}/blobs/${b.descriptor.digest}?ns=docker.io`)).status, 200);
  }
  const gc = await request(`${proxy.url}/admin/gc`, { method: 'POST', headers: admin });
  assert.equal(gc.statusCode, 200);
  assert.ok(((await gc.body.json()) as { blobs: number }).blobs > 0, 'gc evicted fillers');
  const kept = [...amd64.blobs, ...Object.values(pause).filter((_, i) => i < 2).flatMap((img) => img.blobs)];
  for (const b of kept) assert.ok(existsSync(blobFile(proxy.root, b.descriptor.digest)), `kept blob ${b.descriptor.digest} is still on disk`);

  // The upstream goes away: the kept image is still served, by tag, from the cache.
  await registry.stop();
  const m = await fetchBody(`${proxy.url}/v2/library/busybox/manifests/1.36?ns=docker.io`, { accept: OCI_INDEX });
  assert.deepEqual([m.status, sha256(m.body!)], [200, sha256(busybox.index)]);
  for (const b of amd64.blobs) assert.equal((await fetchBody(`${proxy.url}/v2/library/busybox/blobs/${b.descriptor.digest}?ns=docker.io`)).status, 200);

  // The status page lists them.
  const status = (await fetchBody(`${proxy.url}/`)).body!.toString();
  assert.match(status, /<h2>Kept images<\/h2>/);
  assert.match(status, /registry\.k8s\.io\/pause:3\.10 \(3\)<br>registry\.k8s\.io\/pause:3\.9 \(3\)/);
});

test('keep: the kept images alone over storage.maxSize are warned about; `ocicache kept` lists them; bad entries are refused naming the key', async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const big = image({ 'big.bin': randomBytes(3 * MiB) });
  await new Pusher({ url: registry.url }).pushImage('team/big', 'v1', big);
  const dir = tempDir(t, 'keep');
  const log: string[] = [];
  const doc = { upstreams: [{ name: 'docker.io', url: registry.url }], storage: { root: dir, maxSize: 1 * MiB }, keep: { images: ['docker.io/team/big:v1'] } };
  const proxy = await startProxy(t, { ...doc, root: dir, storage: doc.storage, logger: { level: 'warn', stream: { write: (l: string) => void log.push(l) } } });
  await until('the warning', () => log.some((l) => l.includes('keep: the kept images alone exceed storage.maxSize')), 30_000);
  await proxy.app.close();
  // The cache directory is free again: the CLI reads it.
  const listed = await runCli(['kept', '--config', writeConfig(dir, doc)]);
  assert.equal(listed.code, 0, listed.stderr);
  assert.equal(listed.stdout, `docker.io/team/big:v1  docker.io/team/big:v1  ${1 + big.blobs.length} manifests and blobs kept\n`);

  const bad = (keep: unknown, message: string): void => assert.throws(() => buildConfig({ upstreams: doc.upstreams, keep }, {}), { message });
  bad({ images: [] }, 'config: keep.images: must be a non-empty list');
  bad({ images: ['docker.io/team/app:v1 extra'] }, 'config: keep.images[0]: must be an image reference such as registry.k8s.io/pause:3.10, docker.io/library/busybox:1.* or ghcr.io/org/app@sha256:…, got "docker.io/team/app:v1 extra"');
  bad({ images: ['docker.io/team/app'], platforms: ['amd64'] }, 'config: keep.platforms[0]: must be a platform such as linux/amd64 or linux/arm64/v8, got "amd64"');
  bad({ images: ['docker.io/team/app'], refresh: '10s' }, 'config: keep.refresh: expected a duration of at least 1m such as 6h, got "10s"');
  bad({ images: ['docker.io/team/app'], withReferrers: 'yes' }, 'config: keep.withReferrers: expected true or false, got "yes"');
  // An image of no configured upstream is refused when the server starts.
  await assert.rejects(startProxy(t, { upstreams: doc.upstreams, keep: { images: ['quay.io/team/app:v1'] } }), /config: keep\.images\[0\]: /);
});

test('keep: an upstream whose tag list never ends (or does not move on) fails the entry within a bound, and the refresh goes on', async (t) => {
  const fake = await startFakeUpstream(t);
  // Every page: the next 1000 tags after `last`, and a Link to more, for ever.
  fake.route('/v2/team/endless/tags/list', (req, res) => {
    const last = new URL(req.url ?? '/', 'http://x').searchParams.get('last');
    const from = last === null ? 0 : Number(last.slice(1)) + 1;
    const tags = Array.from({ length: 1000 }, (_, i) => `v${String(from + i).padStart(9, '0')}`);
    res.writeHead(200, { 'content-type': 'application/json', link: '</v2/team/endless/tags/list?n=1000>; rel="next"' }).end(JSON.stringify({ name: 'team/endless', tags }));
  });
  // The same page, for ever.
  fake.route('/v2/team/stuck/tags/list', (_req, res) => {
    res.writeHead(200, { 'content-type': 'application/json', link: '</v2/team/stuck/tags/list?n=1000>; rel="next"' }).end(JSON.stringify({ name: 'team/stuck', tags: ['v1', 'v2'] }));
  });
  const proxy = await startProxy(t, {
    upstreams: [{ name: 'fake.example', url: fake.url }],
    keep: { images: ['fake.example/team/endless:v*', 'fake.example/team/stuck:v*'] },
    admin: { tokenEnv: 'ADMIN' },
    env: { ADMIN: 'admin-token' },
  });
  type Entry = { pattern: string; refreshedAt?: number; error?: string };
  const entries = async (): Promise<Entry[]> => jsonBody<{ entries: Entry[] }>(await fetchBody(`${proxy.url}/admin/keep`, { authorization: 'Bearer admin-token' })).entries;
  await until('both entries refreshed', async () => (await entries()).every((e) => e.refreshedAt !== undefined), 60_000);
  assert.deepEqual(
    (await entries()).map((e) => [e.pattern, e.error]),
    [
      ['fake.example/team/endless:v*', "fake.example/team/endless: the upstream's tag list does not end within 100000 tags"],
      ['fake.example/team/stuck:v*', "fake.example/team/stuck: the upstream's tag list does not end within 100000 tags"],
    ],
  );
  assert.ok(fake.count('GET', '/v2/team/endless/tags/list') <= 100, `${fake.count('GET', '/v2/team/endless/tags/list')} pages asked`);
});
