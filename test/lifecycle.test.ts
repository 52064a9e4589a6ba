/**
 * Bounded disk against a real registry: watermark eviction that keeps the index consistent, a
 * blob being streamed is never cut off, expiry by age per upstream with `ocicache gc`,
 * `ocicache verify` repairing a damaged cache, and a full disk that still serves pulls.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { get as httpGet, type IncomingMessage } from 'node:http';
import { join } from 'node:path';
import test, { type TestContext } from 'node:test';
import Database from 'better-sqlite3';
import { formatBytes } from '../src/core/units.js';
import { runCli, writeConfig } from './helpers/cli.js';
import { startDistribution, type Distribution } from './helpers/distribution.js';
import { blobFile, metric, metricsText, pullImage, startProxy, testClock, type Proxy } from './helpers/proxy.js';
import { image, Pusher, sha256, type Image } from './helpers/seed.js';
import { mountTmpfs, needRoot, tempDir, until } from './helpers/tools.js';

const MiB = 1024 * 1024;

/** pullImage, every answer a 200 with the right digest; returns the X-Cache values of the manifest, config and layers. */
async function pull(proxy: Proxy, name: string, tag: string, ns = 'docker.io'): Promise<string[]> {
  const { manifest, blobs } = await pullImage(proxy.url, name, tag, ns);
  assert.equal(manifest.status, 200, `${name}:${tag}`);
  for (const b of blobs) {
    assert.equal(b.status, 200);
    assert.equal(b.sha256, b.digest);
  }
  return [manifest, ...blobs].map((r) => String(r.headers['x-cache']));
}

/** The index must never name a manifest whose blobs were evicted: every manifest's blob children exist. */
function assertConsistent(root: string): void {
  const db = new Database(join(root, 'index.db'), { readonly: true });
  try {
    const manifests = new Set(db.prepare('SELECT digest FROM manifests').pluck().all() as string[]);
    const blobs = new Set(db.prepare('SELECT digest FROM blobs').pluck().all() as string[]);
    for (const d of blobs) assert.ok(existsSync(blobFile(root, d)), `blob row ${d} has its file`);
    for (const t of db.prepare('SELECT digest FROM tags').pluck().all() as string[]) assert.ok(manifests.has(t), 'every tag points to a cached manifest');
    const evicted = db.prepare('SELECT parent, child FROM refs').all() as Array<{ parent: string; child: string }>;
    for (const r of evicted) assert.ok(manifests.has(r.parent), 'refs only for cached manifests');
  } finally {
    db.close();
  }
}

function dbRows(root: string, sql: string): unknown[] {
  const db = new Database(join(root, 'index.db'), { readonly: true });
  try {
    return db.prepare(sql).pluck().all();
  } finally {
    db.close();
  }
}

async function seeded(t: TestContext, images: Record<string, Image>): Promise<Distribution | undefined> {
  const registry = await startDistribution(t);
  if (!registry) return undefined;
  const pusher = new Pusher({ url: registry.url });
  for (const [ref, img] of Object.entries(images)) {
    const [name, tag] = ref.split(':') as [string, string];
    await pusher.pushImage(name, tag, img);
  }
  return registry;
}

test('watermark eviction drops the least recently used blobs and the manifests that use them, keeping a shared blob', async (t) => {
  const shared = randomBytes(MiB);
  const a = image({ 'shared.bin': shared, 'a.bin': randomBytes(MiB) });
  const b = image({ 'shared.bin': shared, 'b.bin': randomBytes(MiB) });
  assert.equal(a.blobs[1]!.descriptor.digest, b.blobs[1]!.descriptor.digest, 'the two images share a layer');
  const registry = await seeded(t, { 'team/a:v1': a, 'team/b:v1': b });
  if (!registry) return;
  // 3.2 MiB limit: A and B together (three 1 MiB layers) pass the 90% mark; 70% is reached by dropping A's own blobs.
  const clock = testClock();
  const proxy = await startProxy(t, { clock, upstreams: [{ name: 'docker.io', url: registry.url }], storage: { maxSize: Math.round(3.2 * MiB), highWatermark: 90, lowWatermark: 70 } });

  await pull(proxy, 'team/a', 'v1');
  // A's fills are indexed (a client has the last byte just before that), then B's uses come later.
  await until("A's blobs to be indexed", () => dbRows(proxy.root, 'SELECT digest FROM blobs').length === a.blobs.length);
  clock.advance(20);
  await pull(proxy, 'team/b', 'v1');
  const [cA, , lA] = a.blobs.map((x) => x.descriptor.digest);
  const [cB, s, lB] = b.blobs.map((x) => x.descriptor.digest);
  await until('eviction', () => !existsSync(blobFile(proxy.root, lA!)));
  assert.equal(existsSync(blobFile(proxy.root, cA!)), false, "A's config is evicted");
  for (const d of [cB, s, lB]) assert.ok(existsSync(blobFile(proxy.root, d!)), `${d} kept`);
  assert.deepEqual(dbRows(proxy.root, 'SELECT digest FROM manifests'), [b.digest], "A's manifest went with its blobs; B's stays");
  assert.deepEqual(dbRows(proxy.root, "SELECT name || ':' || tag FROM tags"), ['team/b:v1']);
  assertConsistent(proxy.root);
  const text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_evictions_total', { reason: 'size' }), 2);
  const kept = [cB, s, lB].reduce((n, d) => n + statSync(blobFile(proxy.root, d!)).size, 0);
  assert.equal(metric(text, 'ocicache_disk_used_bytes'), kept);
  assert.equal(metric(text, 'ocicache_disk_limit_bytes'), Math.round(3.2 * MiB));

  // B is whole in the cache: pulling it sends no blob request upstream.
  const seen = registry.accessLog.length;
  assert.deepEqual((await pull(proxy, 'team/b', 'v1')).slice(1), ['HIT', 'HIT', 'HIT']);
  assert.deepEqual(registry.accessLog.slice(seen).filter((l) => l.includes('/blobs/')), []);
  // A comes back from upstream.
  assert.deepEqual(await pull(proxy, 'team/a', 'v1'), ['MISS', 'MISS', 'HIT', 'MISS']);
});

test('a blob being streamed to a client is never evicted or cut off', async (t) => {
  const big = image({ 'big.bin': randomBytes(8 * MiB) });
  const small = image({ 'small.bin': randomBytes(2 * MiB) });
  const registry = await seeded(t, { 'team/big:v1': big, 'team/small:v1': small });
  if (!registry) return;
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: registry.url }], storage: { maxSize: 10 * MiB, highWatermark: 90, lowWatermark: 50 } });
  await pull(proxy, 'team/big', 'v1');
  const layer = big.blobs[1]!.descriptor.digest;

  // A slow client: reads the first chunk, then stops reading while eviction runs.
  const res = await new Promise<IncomingMessage>((resolve) => httpGet(`${proxy.url}/v2/team/big/blobs/${layer}?ns=docker.io`, resolve));
  const chunks: Buffer[] = [];
  await new Promise<void>((resolve) => res.once('data', (c: Buffer) => (chunks.push(c), res.pause(), resolve())));

  await pull(proxy, 'team/small', 'v1');
  const smallLayer = small.blobs[1]!.descriptor.digest;
  // The pass takes every unpinned blob (it cannot reach the low mark without the pinned one).
  await until('eviction', async () => metric(await metricsText(proxy), 'ocicache_evictions_total', { reason: 'size' }) === 3);
  assert.ok(existsSync(blobFile(proxy.root, layer)), 'the blob being read is kept');
  assert.equal(existsSync(blobFile(proxy.root, smallLayer)), false, 'the unpinned blobs went instead');
  assertConsistent(proxy.root);

  res.on('data', (c: Buffer) => chunks.push(c));
  res.resume();
  await new Promise((r) => res.once('end', r));
  assert.equal(sha256(Buffer.concat(chunks)), layer, 'the slow client got the whole blob');
});

test('ocicache gc: expiry by age since last access, per upstream, and eviction down to the low watermark', async (t) => {
  const viaHub = image({ 'hub.bin': randomBytes(64 * 1024) });
  const viaGhcr = image({ 'ghcr.bin': randomBytes(64 * 1024) });
  const registry = await seeded(t, { 'team/hub:v1': viaHub, 'team/ghcr:v1': viaGhcr });
  if (!registry) return;
  const root = tempDir(t, 'gc');
  const upstreams = [
    { name: 'docker.io', url: registry.url, maxAge: '1s' },
    { name: 'ghcr.io', url: registry.url },
  ];
  const proxy = await startProxy(t, { root, upstreams });
  await pull(proxy, 'team/hub', 'v1', 'docker.io');
  await pull(proxy, 'team/ghcr', 'v1', 'ghcr.io');
  await proxy.app.close();
  // Every use two seconds ago, rather than sleeping past docker.io's maxAge: gc is another process, on the system's clock.
  const index = new Database(join(root, 'index.db'));
  index.exec('UPDATE blobs SET last_access = last_access - 2000; UPDATE blob_access SET last_access = last_access - 2000');
  index.close();

  // The server's secrets are not needed to collect garbage: an unset admin token env is fine here.
  const config = writeConfig(root, { storage: { root }, upstreams, admin: { tokenEnv: 'OCICACHE_TEST_UNSET_TOKEN' } });
  const r = await runCli(['gc', '--config', config]);
  assert.equal(r.code, 0, r.stderr);
  const hubBytes = viaHub.blobs.reduce((n, x) => n + x.data.length, 0);
  const ghcrBytes = viaGhcr.blobs.reduce((n, x) => n + x.data.length, 0);
  assert.equal(
    r.stdout,
    `gc: freed 2 blobs (${formatBytes(hubBytes)}); dropped 1 manifests, 1 tags and 0 dangling index rows\n` +
      `cache: ${formatBytes(ghcrBytes)} in 2 blobs (limit none)\n`,
  );
  for (const x of viaHub.blobs) assert.equal(existsSync(blobFile(root, x.descriptor.digest)), false, 'docker.io maxAge: 1s expired it');
  for (const x of viaGhcr.blobs) assert.ok(existsSync(blobFile(root, x.descriptor.digest)), 'ghcr.io has no maxAge');
  assertConsistent(root);

  // Size: a limit below what is cached; gc evicts down to the low watermark even under the high one.
  const small = writeConfig(root, { storage: { root, maxSize: ghcrBytes, lowWatermark: 50, highWatermark: 99 }, upstreams });
  const r2 = await runCli(['gc', '--config', small]);
  assert.equal(r2.code, 0, r2.stderr);
  assert.match(r2.stdout, /^gc: freed [12] blobs .*; dropped 1 manifests, 1 tags/);
  assertConsistent(root);
});

test('ocicache verify finds and repairs corrupt, missing, stray and unindexed content; exits 1, then 0', async (t) => {
  const img = image({ 'one.bin': randomBytes(100_000), 'two.bin': randomBytes(100_000) });
  const other = image({ 'three.bin': randomBytes(50_000) });
  const registry = await seeded(t, { 'team/app:v1': img, 'team/other:v1': other });
  if (!registry) return;
  const root = tempDir(t, 'verify');
  const upstreams = [{ name: 'docker.io', url: registry.url }];
  const proxy = await startProxy(t, { root, upstreams });
  await pull(proxy, 'team/app', 'v1');
  await pull(proxy, 'team/other', 'v1');
  await proxy.app.close();

  const [, one, two] = img.blobs.map((x) => x.descriptor.digest) as [string, string, string];
  writeFileSync(blobFile(root, one), randomBytes(100)); // bit rot
  rmSync(blobFile(root, two)); // deleted behind our back
  const stray = join(root, 'blobs', 'sha256', 'zz', 'not-a-digest');
  mkdirSync(join(stray, '..'), { recursive: true });
  writeFileSync(stray, 'junk');
  const misplaced = join(root, 'blobs', 'sha256', '00', other.blobs[0]!.descriptor.digest.slice(7));
  mkdirSync(join(misplaced, '..'), { recursive: true });
  writeFileSync(misplaced, other.blobs[0]!.data); // right content, wrong directory
  const orphan = Buffer.from('a verified blob without an index row');
  mkdirSync(join(blobFile(root, sha256(orphan)), '..'), { recursive: true });
  writeFileSync(blobFile(root, sha256(orphan)), orphan);
  const db = new Database(join(root, 'index.db'));
  db.prepare('UPDATE manifests SET body = ? WHERE digest = ?').run(Buffer.from('{"tampered":true}'), other.digest);
  db.close();

  const config = writeConfig(root, { storage: { root }, upstreams });
  const r = await runCli(['verify', '--config', config]);
  assert.equal(r.code, 1, r.stderr);
  assert.equal(
    r.stdout,
    [
      `corrupt blob ${one}: deleted`,
      `missing blob file ${two}: index row dropped`,
      `blob file without index row ${sha256(orphan)}: verified and adopted`,
      ...[misplaced, stray].sort().map((p) => `stray file ${p}: deleted`),
      `corrupt manifest ${other.digest}: dropped`,
      'dropped 1 manifests and 2 tags that pointed to removed content',
      'verify: checked 5 blobs and 1 manifests: 6 problems found and repaired',
      '',
    ].join('\n'),
  );
  const again = await runCli(['verify', '--config', config]);
  assert.equal(again.code, 0, again.stdout);
  assert.equal(again.stdout, 'verify: checked 4 blobs and 0 manifests: all good\n');
  assertConsistent(root);

  // And the repaired cache serves both images again, refetching what was removed.
  const proxy2 = await startProxy(t, { root, upstreams });
  assert.deepEqual(await pull(proxy2, 'team/app', 'v1'), ['MISS', 'HIT', 'MISS', 'MISS']);
  assert.deepEqual(await pull(proxy2, 'team/other', 'v1'), ['MISS', 'HIT', 'HIT']);
});

test('disk full: blobs stream through uncached with a warning and a metric; caching resumes when space returns', async (t) => {
  if (!needRoot(t, 'mounting a small tmpfs')) return;
  const img = image({ 'layer.bin': randomBytes(16 * MiB) });
  const registry = await seeded(t, { 'team/app:v1': img });
  if (!registry) return;
  const root = mountTmpfs(t, '40m');
  // Something else fills the filesystem: 12 MiB stay free, too few for a 16 MiB layer.
  const filler = join(root, 'other-data.bin');
  writeFileSync(filler, Buffer.alloc(28 * MiB));

  const proxy = await startProxy(t, { root, upstreams: [{ name: 'docker.io', url: registry.url }], storage: { minFree: '1MiB' } });
  const layer = img.blobs[1]!.descriptor.digest;
  const results = await pull(proxy, 'team/app', 'v1');
  assert.equal(results[2], 'PASSTHROUGH', 'served from upstream, verified on the way');
  assert.equal(existsSync(blobFile(root, layer)), false);
  assert.deepEqual(readdirSync(join(root, 'tmp')), []);
  let text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_storage_writable'), 0);
  assert.equal(metric(text, 'ocicache_uncached_blobs_total', { upstream: 'docker.io' }), 1);

  rmSync(filler);
  assert.equal((await pull(proxy, 'team/app', 'v1'))[2], 'MISS');
  await until('the layer is cached', () => existsSync(blobFile(root, layer)));
  text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_storage_writable'), 1);
  assert.equal((await pull(proxy, 'team/app', 'v1'))[2], 'HIT');
});
