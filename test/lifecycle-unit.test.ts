/**
 * Lifecycle (src/cache/lifecycle.ts) on a real Db and BlobStore in a temp dir, with a test clock:
 * pins keep blobs from eviction until released, a change during a pass runs the pass again,
 * access times and maxAge decide expiry, and a storage error turns caching off for a while.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import test, { type TestContext } from 'node:test';
import { Lifecycle, type PassResult } from '../src/cache/lifecycle.js';
import { buildConfig } from '../src/core/config.js';
import { BlobStore } from '../src/storage/blob-store.js';
import { Db } from '../src/storage/db.js';
import { Metrics } from '../src/telemetry/metrics.js';
import { metric, testClock, type TestClock } from './helpers/proxy.js';
import { OCI_MANIFEST, sha256 } from './helpers/seed.js';
import { childrenOf } from '../src/core/media-types.js';
import { tempDir, until } from './helpers/tools.js';

interface World {
  lifecycle: Lifecycle;
  db: Db;
  store: BlobStore;
  clock: TestClock;
  metrics: Metrics;
  warnings: string[];
  /** A blob file of `size` bytes written into place and reported added through `upstream`, one second after the last. */
  add(size: number, upstream?: string): string;
  /** Digests with an index row. */
  indexed(): string[];
}

async function world(t: TestContext, storage: Record<string, unknown>, upstreams: Array<Record<string, unknown>> = [{ name: 'docker.io' }]): Promise<World> {
  const root = tempDir(t, 'lifecycle');
  const config = buildConfig({ storage: { root, ...storage }, upstreams: upstreams.map((u) => ({ url: 'http://127.0.0.1:9', ...u })) }, {});
  const store = new BlobStore(root);
  await store.init();
  const db = new Db(join(root, 'index.db'));
  const clock = testClock();
  const metrics = new Metrics();
  const warnings: string[] = [];
  const log = { info: () => undefined, warn: (_obj: object, msg: string) => void warnings.push(msg) };
  const lifecycle = new Lifecycle(config, db, store, metrics, log, clock);
  t.after(async () => {
    await lifecycle.close();
    db.close();
  });
  const add = (size: number, upstream = 'docker.io'): string => {
    const data = randomBytes(size);
    const digest = sha256(data);
    mkdirSync(dirname(store.path(digest)), { recursive: true });
    writeFileSync(store.path(digest), data);
    clock.advance(1000);
    lifecycle.added(digest, size, upstream, 'team/app');
    return digest;
  };
  const indexed = (): string[] => db.allBlobs().map((r) => r.digest).sort();
  return { lifecycle, db, store, clock, metrics, warnings, add, indexed };
}

function result(r: Partial<PassResult>): PassResult {
  return { blobs: 0, bytes: 0, manifests: 0, tags: 0, used: 0, danglingRows: 0, ...r };
}

test('a pinned blob is skipped by eviction and evicted once released', async (t) => {
  // maxSize 1000: eviction starts above 900 bytes and stops at 500.
  const w = await world(t, { maxSize: 1000, highWatermark: 90, lowWatermark: 50 });
  // The oldest blob is being read (pinned), so the pass takes the newer ones instead.
  const old = w.add(600);
  const releaseOld = w.lifecycle.pin(old);
  const again = w.lifecycle.pin(old); // a second reader of the same blob
  const b = w.add(200);
  const c = w.add(200); // 1000 bytes: over the high watermark, a pass starts
  assert.deepEqual(await w.lifecycle.pass('size'), result({ blobs: 2, bytes: 400, used: 600 }));
  assert.deepEqual(w.indexed(), [old]);
  assert.ok(existsSync(w.store.path(old)), 'the pinned blob is kept');
  for (const d of [b, c]) assert.equal(existsSync(w.store.path(d)), false, 'the unpinned blobs went instead');

  // gc evicts down to the low watermark (600 > 500), but not while any pin is held.
  assert.deepEqual(await w.lifecycle.pass('gc'), result({ used: 600 }));
  releaseOld();
  releaseOld(); // idempotent: the other reader's pin still holds
  assert.deepEqual(await w.lifecycle.pass('gc'), result({ used: 600 }));
  assert.ok(existsSync(w.store.path(old)));
  again();
  assert.deepEqual(await w.lifecycle.pass('gc'), result({ blobs: 1, bytes: 600, used: 0 }));
  assert.deepEqual(w.indexed(), []);
  assert.equal(existsSync(w.store.path(old)), false);
  assert.equal(w.lifecycle.usedBytes, 0);
  const text = await w.metrics.registry.metrics();
  assert.equal(metric(text, 'ocicache_evictions_total', { reason: 'size' }), 2);
  assert.equal(metric(text, 'ocicache_evictions_total', { reason: 'gc' }), 1);
  assert.equal(metric(text, 'ocicache_disk_used_bytes'), 0);
});

test('releasing the last pin on a blob that kept usage over the high watermark starts a pass by itself', async (t) => {
  const w = await world(t, { maxSize: 1000, highWatermark: 90, lowWatermark: 50 });
  const big = sha256('big');
  const release = w.lifecycle.pin(big); // pinned by its fill before it is added, as the cache does
  mkdirSync(dirname(w.store.path(big)), { recursive: true });
  writeFileSync(w.store.path(big), 'big');
  w.lifecycle.added(big, 950, 'docker.io', 'team/app'); // the size the index records is what counts
  assert.deepEqual(await w.lifecycle.pass('size'), result({ used: 950 }), 'nothing to take: the only blob is pinned');
  release();
  await until('the pass after the release', () => w.indexed().length === 0);
  assert.equal(existsSync(w.store.path(big)), false);
  assert.equal(w.lifecycle.usedBytes, 0);
});

test('a blob added during a pass runs the pass again after it', async (t) => {
  const w = await world(t, { maxSize: 1000, highWatermark: 90, lowWatermark: 50 });
  const [a, b, c] = [w.add(300), w.add(300), w.add(300)]; // 900: not above the high mark
  assert.deepEqual(await w.lifecycle.pass('size'), result({ used: 900 }));
  const d = w.add(200); // 1100: a pass starts and is now waiting on its first unlink
  const first = w.lifecycle.pass('size'); // the running pass, not a new one
  const e = w.add(500); // during the pass
  // The pass frees what it set out to free (600 bytes: a and b) and stops at 1000 - still above 900.
  assert.deepEqual(await first, result({ blobs: 2, bytes: 600, used: 1000 }));
  // The rerun takes the next least recently used, c and d, down to 500.
  await until('the rerun', () => w.lifecycle.usedBytes === 500);
  assert.deepEqual(w.indexed(), [e]);
  for (const x of [a, b, c, d]) assert.equal(existsSync(w.store.path(x)), false);
  assert.equal(metric(await w.metrics.registry.metrics(), 'ocicache_evictions_total', { reason: 'size' }), 4);
});

test('least recently used goes first: a use moves a blob to the back of the line', async (t) => {
  const w = await world(t, { maxSize: 1000, highWatermark: 90, lowWatermark: 50 });
  const [a, b, c] = [w.add(300), w.add(300), w.add(300)];
  w.clock.advance(1000);
  w.lifecycle.touch(a, 300, 'docker.io'); // in memory until the pass flushes it
  const d = w.add(200);
  assert.deepEqual(await w.lifecycle.pass('size'), result({ blobs: 2, bytes: 600, used: 500 }));
  assert.deepEqual(w.indexed(), [a, d].sort());
  for (const x of [b, c]) assert.equal(existsSync(w.store.path(x)), false);
});

test('a referrer stays as long as its subject and goes with it, linked by its subject field or a sha256-<hex> tag', async (t) => {
  const w = await world(t, { maxSize: 1000, highWatermark: 90, lowWatermark: 50 });
  const manifest = (json: object, tag?: string): string => {
    const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, ...json }));
    const digest = sha256(body);
    w.db.putManifest({ digest, mediaType: OCI_MANIFEST, body }, childrenOf(body), 'docker.io', 'team/app', tag, w.clock());
    return digest;
  };
  // Read once, long ago: a signature (subject field) and a cosign signature (found by its tag).
  const [sbomBlob, sigBlob] = [w.add(60), w.add(40)];
  const [config, layer] = [w.add(50), w.add(300)];
  const subject = manifest({ config: { digest: config }, layers: [{ digest: layer }] });
  const sbom = manifest({ config: { digest: sbomBlob }, layers: [], subject: { mediaType: OCI_MANIFEST, digest: subject } });
  const sig = manifest({ config: { digest: sigBlob }, layers: [] }, `${subject.replace(':', '-')}.sig`);
  const fillers = [w.add(250), w.add(150)];
  // The image is pulled again; a gc must bring 850 bytes down to 500.
  w.clock.advance(1000);
  for (const d of [config, layer]) w.lifecycle.touch(d, 0, 'docker.io');
  assert.deepEqual(await w.lifecycle.pass('gc'), result({ blobs: 2, bytes: 400, used: 450 }));
  // The referrers' blobs are as recent as the image's, so the fillers went, and everything is still served.
  assert.deepEqual(w.indexed(), [sbomBlob, sigBlob, config, layer].sort());
  for (const d of fillers) assert.equal(existsSync(w.store.path(d)), false);
  for (const d of [subject, sbom, sig]) assert.ok(w.db.getManifest(d), d);

  // Now the image is the least recently used: it goes, and its referrers with it.
  const big = w.add(500);
  assert.deepEqual(await w.lifecycle.pass('size'), result({ blobs: 4, bytes: 450, manifests: 3, tags: 1, used: 500 }));
  assert.deepEqual(w.indexed(), [big]);
  for (const d of [subject, sbom, sig]) assert.equal(w.db.getManifest(d), undefined, d);
});

test('a sha256-<hex> tag links only within its repository: it cannot pin another digest through a kept manifest, nor drop a manifest when that digest goes', async (t) => {
  const w = await world(t, { maxSize: 1000, highWatermark: 90, lowWatermark: 50 });
  const put = (json: object, name: string, tag?: string): string => {
    const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, ...json }));
    const digest = sha256(body);
    w.db.putManifest({ digest, mediaType: OCI_MANIFEST, body }, childrenOf(body), 'docker.io', name, tag, w.clock());
    return digest;
  };
  // A kept image, and someone's big image.
  const pauseBlob = w.add(50);
  const pause = put({ config: { digest: pauseBlob }, layers: [] }, 'library/pause', '3.10');
  w.db.kept.set('docker.io/library/pause:3.10', 'docker.io/library/pause:3.10', [pause, pauseBlob]);
  const bigBlob = w.add(800);
  const big = put({ config: { digest: bigBlob }, layers: [] }, 'evil/app', 'v1');
  // The same pause manifest pushed to their repository under the tag that names their image.
  put({ config: { digest: pauseBlob }, layers: [] }, 'evil/app', `${big.replace(':', '-')}.sig`);
  assert.equal(w.db.protectsKept(bigBlob), false, 'their image is not kept through the kept manifest');
  assert.deepEqual(await w.lifecycle.pass('gc'), result({ blobs: 1, bytes: 800, manifests: 1, tags: 1, used: 50 }));
  assert.ok(w.db.getManifest(pause), 'the kept manifest is still there');
  assert.equal(w.db.getTag('docker.io', 'library/pause', '3.10')?.digest, pause);
});

test('what keeps a referrer with its subject is bounded: 16 referrers per subject and repository, of at most 16 MiB each', async (t) => {
  const w = await world(t, {});
  const subjectBlob = w.add(10);
  const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { digest: subjectBlob, size: 10 }, layers: [] }));
  const subject = sha256(body);
  w.db.putManifest({ digest: subject, mediaType: OCI_MANIFEST, body }, childrenOf(body), 'docker.io', 'team/app', 'v1', w.clock());
  const referrer = (size: number): string => {
    const blob = w.add(10);
    const b = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { digest: blob, size }, layers: [], subject: { digest: subject } }));
    w.db.putManifest({ digest: sha256(b), mediaType: OCI_MANIFEST, body: b }, childrenOf(b), 'docker.io', 'team/app', undefined, w.clock());
    return blob;
  };
  const large = referrer(17 * 1024 * 1024);
  const small = Array.from({ length: 20 }, () => referrer(10));
  w.lifecycle.touch(subjectBlob, 10, 'docker.io', w.clock() + 1000);
  w.lifecycle.flush();
  const inherited = w.db.subjects.inheritedAccess(16 * 1024 * 1024);
  assert.equal(inherited.has(large), false, 'a referrer above 16 MiB is not kept with its subject');
  assert.deepEqual(small.map((d) => inherited.has(d)), [...Array(15).fill(true), ...Array(5).fill(false)], 'the first 16 links, the large one among them');
});

test('expiry by age: each upstream keeps a blob for its own maxAge since it last used it', async (t) => {
  const w = await world(t, {}, [{ name: 'docker.io', maxAge: '1h' }, { name: 'ghcr.io', maxAge: '2h' }, { name: 'quay.io' }]);
  const hub = w.add(10, 'docker.io');
  const ghcr = w.add(10, 'ghcr.io');
  const quay = w.add(10, 'quay.io');
  const both = w.add(10, 'docker.io');
  w.lifecycle.touch(both, 10, 'ghcr.io');
  const cases = [
    { advance: 3_600_000 - 5000, gone: [] },
    // docker.io's hour has passed for hub and for both, but ghcr.io still wants both.
    { advance: 11_000, gone: [hub] },
    { advance: 3_600_000, gone: [hub, ghcr, both] },
    { advance: 365 * 86_400_000, gone: [hub, ghcr, both] }, // quay.io has no maxAge
  ];
  for (const c of cases) {
    w.clock.advance(c.advance);
    await w.lifecycle.pass('age');
    assert.deepEqual(w.indexed(), [hub, ghcr, quay, both].filter((d) => !c.gone.includes(d)).sort(), `after ${c.advance} ms more`);
    for (const d of c.gone) assert.equal(existsSync(w.store.path(d)), false);
  }
  assert.equal(metric(await w.metrics.registry.metrics(), 'ocicache_evictions_total', { reason: 'age' }), 3);
});

test('after a storage error caching stays off for 30 s by the clock, then resumes', async (t) => {
  const w = await world(t, { minFree: '1KiB' });
  // Whether a blob could be cached now: room is reserved, then given back.
  const canCache = async (size: number): Promise<boolean> => {
    const room = await w.lifecycle.guard.reserve(size);
    room?.release();
    return room !== undefined;
  };
  assert.equal(await canCache(100), true);
  w.lifecycle.guard.failed(Object.assign(new Error('no space left on device'), { code: 'ENOSPC' }));
  assert.equal(await canCache(100), false);
  w.clock.advance(29_999);
  assert.equal(await canCache(100), false);
  w.clock.advance(1);
  assert.equal(await canCache(100), true);
  assert.deepEqual(w.warnings, ['storage full or unwritable: serving blobs without caching them']);
  const text = await w.metrics.registry.metrics();
  assert.equal(metric(text, 'ocicache_storage_errors_total', { code: 'ENOSPC' }), 1);
  assert.equal(metric(text, 'ocicache_storage_writable'), 1);
});
