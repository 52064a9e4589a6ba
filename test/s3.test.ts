/**
 * Blobs in an S3 bucket (`storage.backend: s3`), against a real S3 server (SeaweedFS, with
 * credentials checked) and a real upstream registry: one upstream GET per cold blob while clients
 * stream it, the object written only once verified and then gone from local disk, warm reads and
 * ranges from the bucket or by redirect, adoption by a second replica sharing the bucket,
 * eviction in the bucket, and the bucket down, slow or refusing.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { createServer, connect, type Socket } from 'node:net';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import test, { after, type TestContext } from 'node:test';
import { HeadObjectCommand, ListObjectsV2Command, S3Client } from '@aws-sdk/client-s3';
import { request } from 'undici';
import { startDistribution, type Distribution } from './helpers/distribution.js';
import { blobFile, fetchBody, metric, metricsText, ociError, startProxy, type Proxy } from './helpers/proxy.js';
import { startSeaweed, type Seaweed } from './helpers/seaweed.js';
import { image, Pusher, randomLayer, type Image } from './helpers/seed.js';
import { tempDir, until } from './helpers/tools.js';

const CACHE = { name: 'cache', accessKey: 'cache-key', secretKey: 'cache-secret', actions: ['Read', 'Write', 'List', 'Tagging'] };
const MiB = 1024 * 1024;

/** A shared credentials file, as a mounted Secret would be. */
function credentialsFile(t: TestContext, who = CACHE): string {
  const file = join(tempDir(t, 'aws'), 'credentials');
  writeFileSync(file, `[default]\naws_access_key_id = ${who.accessKey}\naws_secret_access_key = ${who.secretKey}\n`);
  return file;
}

interface World {
  weed: Seaweed;
  registry: Distribution;
  img: Image;
  layer: string;
  s3: (extra?: Record<string, unknown>) => Record<string, unknown>;
  /** The admin's view of the bucket. */
  objects(): Promise<Array<{ key: string; size: number }>>;
  head(digest: string): Promise<{ size: number; metadata: Record<string, string> } | undefined>;
  blobGets(): number;
}

/** One SeaweedFS for the tests that do not stop it (it takes seconds to start): each has a bucket of its own. */
const cleanups: Array<() => unknown> = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});
let shared: Promise<Seaweed | undefined> | undefined;
let buckets = 0;
const OTHER = { name: 'elsewhere', accessKey: 'other-key', secretKey: 'other-secret', actions: ['Read:another', 'Write:another'] };

async function sharedWeed(t: TestContext): Promise<Seaweed | undefined> {
  shared ??= startSeaweed({ after: (fn) => void cleanups.push(fn), skip: (msg) => t.skip(msg) }, { identities: [CACHE, OTHER] });
  const weed = await shared;
  if (!weed) t.skip('.tools/weed missing: run scripts/build-weed.sh');
  return weed;
}

async function world(t: TestContext, layerBytes = 3 * MiB, own = false): Promise<World | undefined> {
  const weed = own ? await startSeaweed(t, { identities: [CACHE] }) : await sharedWeed(t);
  if (!weed) return undefined;
  const bucket = `cache-${++buckets}`;
  await weed.createBucket(bucket);
  const registry = await startDistribution(t);
  if (!registry) return undefined;
  const img = image({ 'big.bin': randomBytes(layerBytes) });
  await new Pusher({ url: registry.url }).pushImage('team/app', 'v1', img);
  const layer = img.blobs[1]!.descriptor.digest;
  const creds = credentialsFile(t);
  const admin = new S3Client({ endpoint: weed.endpoint, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: 'admin-key', secretAccessKey: 'admin-secret' } });
  t.after(() => admin.destroy());
  const key = (digest: string): string => `ocicache/blobs/sha256/${digest.slice(7, 9)}/${digest.slice(7)}`;
  return {
    weed,
    registry,
    img,
    layer,
    s3: (extra = {}) => ({ backend: 's3', s3: { endpoint: weed.endpoint, bucket, prefix: 'ocicache/', credentialsFile: creds, ...extra } }),
    async objects() {
      const r = await admin.send(new ListObjectsV2Command({ Bucket: bucket, Prefix: 'ocicache/' }));
      return (r.Contents ?? []).map((o) => ({ key: o.Key!, size: o.Size! }));
    },
    async head(digest) {
      try {
        const r = await admin.send(new HeadObjectCommand({ Bucket: bucket, Key: key(digest) }));
        return { size: r.ContentLength!, metadata: r.Metadata ?? {} };
      } catch {
        return undefined;
      }
    },
    blobGets: () => registry.accessLog.filter((l) => l.startsWith(`GET /v2/team/app/blobs/${layer}`)).length,
  };
}

const blobUrl = (proxy: Proxy, digest: string, name = 'team/app'): string => `${proxy.url}/v2/${name}/blobs/${digest}?ns=docker.io`;

/** Waits until `digest` is in the bucket and the proxy has nothing left to write. */
async function uploaded(proxy: Proxy, w: World, digest = w.layer): Promise<void> {
  await until('the upload to the bucket', async () => (await w.head(digest)) !== undefined && metric(await metricsText(proxy), 'ocicache_uploads_pending') === 0, 30_000);
}

test('s3: 32 cold requests make one upstream GET and stream; the blob is written to the bucket once verified and leaves local disk; warm reads and ranges come from the bucket', async (t) => {
  const w = await world(t);
  if (!w) return;
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: w.registry.url }], storage: w.s3() });
  const data = w.img.blobs[1]!.data;
  const cold = await Promise.all(Array.from({ length: 32 }, () => fetchBody(blobUrl(proxy, w.layer))));
  assert.ok(cold.every((r) => r.status === 200 && r.body!.equals(data)), 'every client got the whole blob');
  assert.equal(w.blobGets(), 1, 'one upstream GET');
  await uploaded(proxy, w);
  assert.deepEqual(await w.head(w.layer), { size: data.length, metadata: { upstream: 'docker.io', repository: 'team/app' } });
  assert.equal(existsSync(blobFile(proxy.root, w.layer)), false, 'the local copy is gone once the bucket has it');

  const warm = await fetchBody(blobUrl(proxy, w.layer));
  assert.deepEqual([warm.status, warm.headers['x-cache'], warm.headers['content-length']], [200, 'HIT', String(data.length)]);
  assert.ok(warm.body!.equals(data));
  const range = await fetchBody(blobUrl(proxy, w.layer), { range: 'bytes=1000-1999' });
  assert.deepEqual([range.status, range.headers['content-range']], [206, `bytes 1000-1999/${data.length}`]);
  assert.ok(range.body!.equals(data.subarray(1000, 2000)));
  const head = await fetchBody(blobUrl(proxy, w.layer), {}, 'HEAD');
  assert.deepEqual([head.status, head.headers['content-length']], [200, String(data.length)]);
  assert.equal(w.blobGets(), 1, 'warm reads never asked the upstream');
  const text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_bucket_requests_total', { op: 'put', result: 'ok' }), 1);
  assert.ok(metric(text, 'ocicache_bucket_requests_total', { op: 'get', result: 'ok' }) >= 2);
});

test('s3: a second replica sharing the bucket adopts what the first wrote: no upstream GET for the same upstream, a HEAD for another repository, a GET for another upstream', async (t) => {
  const w = await world(t);
  if (!w) return;
  await new Pusher({ url: w.registry.url }).pushImage('team/other', 'v1', w.img);
  const upstreams = [{ name: 'docker.io', url: w.registry.url }, { name: 'mirror.example', url: w.registry.url }];
  const first = await startProxy(t, { upstreams, storage: w.s3() });
  assert.equal((await fetchBody(blobUrl(first, w.layer))).status, 200);
  await uploaded(first, w);
  const second = await startProxy(t, { upstreams, storage: w.s3({ evict: false }) });
  const asked = (): string[] => w.registry.accessLog.filter((l) => l.includes(w.layer)).map((l) => l.split(' ').slice(0, 2).join(' '));
  const before = asked().length;
  const data = w.img.blobs[1]!.data;
  const cases: Array<[string, string, string, string[]]> = [
    ['the same repository', blobUrl(second, w.layer), 'HIT', []],
    ['another repository of the same upstream', blobUrl(second, w.layer, 'team/other'), 'REVALIDATED', [`HEAD /v2/team/other/blobs/${w.layer}`]],
    ['another upstream (its bytes prove nothing there)', `${second.url}/v2/team/app/blobs/${w.layer}?ns=mirror.example`, 'MISS', [`GET /v2/team/app/blobs/${w.layer}`]],
  ];
  for (const [what, url, cache, upstream] of cases) {
    const seen = asked().length;
    const r = await fetchBody(url);
    assert.deepEqual([r.status, r.headers['x-cache']], [200, cache], what);
    assert.ok(r.body!.equals(data), what);
    assert.deepEqual(asked().slice(seen), upstream, what);
  }
  assert.equal(asked().length - before, 2);
  // The object was already there: the second replica wrote nothing.
  await uploaded(second, w);
  assert.equal(metric(await metricsText(second), 'ocicache_bucket_requests_total', { op: 'put', result: 'ok' }), 0);
});

test('s3: storage.s3.redirect answers warm blobs with a 307 to a presigned URL, which skopeo follows', async (t) => {
  const w = await world(t);
  if (!w) return;
  const lines: Array<Record<string, unknown>> = [];
  const proxy = await startProxy(t, {
    upstreams: [{ name: 'docker.io', url: w.registry.url }],
    storage: w.s3({ redirect: true, redirectTtl: '2m' }),
    defaultUpstream: 'docker.io',
    logger: { level: 'info', stream: { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) } },
  });
  // Cold: streamed by the cache while it downloads.
  assert.equal((await fetchBody(blobUrl(proxy, w.layer))).headers['x-cache'], 'MISS');
  await uploaded(proxy, w);
  const res = await request(blobUrl(proxy, w.layer));
  await res.body.dump();
  assert.deepEqual([res.statusCode, res.headers['x-cache']], [307, 'HIT']);
  const location = new URL(String(res.headers.location));
  assert.equal(location.origin, w.weed.endpoint);
  assert.equal(location.searchParams.get('X-Amz-Expires'), '120');
  const direct = await fetchBody(location.href);
  assert.ok(direct.body!.equals(w.img.blobs[1]!.data), 'the presigned URL serves the blob');
  const { need, exec } = await import('./helpers/tools.js');
  const skopeo = need(t, 'skopeo', 'apt-get install skopeo');
  if (!skopeo) return;
  const out = join(tempDir(t, 'skopeo'), 'oci');
  const copy = await exec(skopeo, ['copy', '--src-tls-verify=false', `docker://${proxy.host}/team/app:v1`, `oci:${out}:v1`]);
  assert.equal(copy.code, 0, copy.stderr);
  // skopeo was sent to the bucket for the layer, and got it there (its copy checks every digest).
  const layerAnswers = lines.filter((l) => l.msg === 'request' && l.reference === w.layer && l.method === 'GET').map((l) => l.status);
  assert.deepEqual(layerAnswers, [200, 307, 307]);
});

test('s3: eviction deletes from the bucket (storage.s3.evict), or only forgets locally when another replica evicts', async (t) => {
  const w = await world(t, 600 * 1024);
  if (!w) return;
  const second = image({ 'second.bin': randomBytes(600 * 1024) });
  await new Pusher({ url: w.registry.url }).pushImage('team/second', 'v1', second);
  const secondLayer = second.blobs[1]!.descriptor.digest;
  // Room for one of the two layers: the second one in evicts the first.
  const small = { maxSize: 1024 * 1024, highWatermark: 90, lowWatermark: 60 };
  for (const [evict, kept] of [[true, false], [false, true]] as const) {
    const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: w.registry.url }], storage: { ...w.s3({ evict }), ...small } });
    assert.equal((await fetchBody(blobUrl(proxy, w.layer))).status, 200);
    await uploaded(proxy, w);
    assert.equal((await fetchBody(blobUrl(proxy, secondLayer, 'team/second'))).status, 200);
    await until('the first layer is evicted', async () => metric(await metricsText(proxy), 'ocicache_evictions_total', { reason: 'size' }) >= 1);
    assert.equal((await w.head(w.layer)) !== undefined, kept, `evict: ${evict}`);
    await uploaded(proxy, w, secondLayer);
    await proxy.app.close();
  }
});

test('s3: a bucket that refuses the credentials stops the start, naming the key', async (t) => {
  const weed = await sharedWeed(t);
  if (!weed) return;
  await weed.createBucket('cache');
  const cases: Array<[string, Record<string, unknown>, RegExp]> = [
    ['another bucket only', { credentialsFile: credentialsFile(t, { ...CACHE, accessKey: 'other-key', secretKey: 'other-secret' }) }, /^config: storage\.s3\.bucket: cache at http:\/\/127\.0\.0\.1:\d+ cannot be used: AccessDenied \(403\)$/],
    ['unknown key', { credentialsFile: credentialsFile(t, { ...CACHE, accessKey: 'nobody', secretKey: 'x' }) }, /^config: storage\.s3\.bucket: cache at .* cannot be used: AccessDenied \(403\)$/],
    ['no such bucket', { bucket: 'missing', credentialsFile: credentialsFile(t) }, /^config: storage\.s3\.bucket: missing at .* cannot be used: NotFound \(404\)$/],
  ];
  for (const [what, s3, message] of cases) {
    await assert.rejects(startProxy(t, { upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:9' }], storage: { backend: 's3', s3: { endpoint: weed.endpoint, bucket: 'cache', ...s3 } } }), { message }, what);
  }
});

test('s3: the bucket down at start: blobs are served from local disk meanwhile and written once it is back', async (t) => {
  const w = await world(t, 3 * MiB, true);
  if (!w) return;
  await w.weed.kill();
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: w.registry.url }], storage: w.s3(), timeouts: { connect: '500ms', blobIdle: '3s' } });
  const data = w.img.blobs[1]!.data;
  const cold = await fetchBody(blobUrl(proxy, w.layer));
  assert.deepEqual([cold.status, cold.headers['x-cache'], cold.body!.equals(data)], [200, 'MISS', true]);
  await until('the fill is in place', () => existsSync(blobFile(proxy.root, w.layer)));
  const warm = await fetchBody(blobUrl(proxy, w.layer));
  assert.deepEqual([warm.status, warm.headers['x-cache'], warm.body!.equals(data)], [200, 'HIT', true], 'served from local disk meanwhile');
  assert.equal(metric(await metricsText(proxy), 'ocicache_uploads_pending'), 1);
  await w.weed.start();
  await uploaded(proxy, w);
  assert.equal((await w.head(w.layer))?.size, data.length);
  assert.equal(existsSync(blobFile(proxy.root, w.layer)), false);
  assert.equal(w.blobGets(), 1);

  // Down again, and the cache restarted before it is back: the next start writes what waited.
  await w.weed.kill();
  const config = w.img.blobs[0]!.descriptor.digest;
  assert.equal((await fetchBody(blobUrl(proxy, config))).status, 200);
  await until('the fill is in place', () => existsSync(blobFile(proxy.root, config)));
  await proxy.app.close();
  await w.weed.start();
  const restarted = await startProxy(t, { root: proxy.root, upstreams: [{ name: 'docker.io', url: w.registry.url }], storage: w.s3() });
  await uploaded(restarted, w, config);
  assert.equal(existsSync(blobFile(proxy.root, config)), false);
});

/**
 * A TCP relay to `port` that can be told to stall (new connections are accepted and never
 * answered), or to cut every connection once `cutAfter` bytes went towards the server.
 */
async function relay(t: TestContext, port: number): Promise<{ endpoint: string; stall(on: boolean): void; cutAfter(bytes: number | undefined, thenStall?: boolean): void; cuts: number }> {
  let stalled = false;
  let cutAt: number | undefined;
  let stallAfterCut = false;
  let sent = 0;
  const sockets = new Set<Socket>();
  const r = { endpoint: '', stall: (_on: boolean) => undefined as void, cutAfter: (b: number | undefined, thenStall = false) => void ((cutAt = b), (sent = 0), (stallAfterCut = thenStall)), cuts: 0 };
  const server = createServer((client) => {
    sockets.add(client);
    client.once('close', () => sockets.delete(client));
    if (stalled) return void client.on('error', () => undefined);
    const up = connect(port, '127.0.0.1');
    sockets.add(up);
    up.once('close', () => sockets.delete(up));
    client.on('data', (chunk: Buffer) => {
      sent += chunk.length;
      if (cutAt !== undefined && sent >= cutAt) {
        cutAt = undefined;
        r.cuts++;
        if (stallAfterCut) stalled = true;
        for (const s of sockets) s.destroy();
      }
    });
    client.pipe(up).pipe(client);
    client.on('error', () => up.destroy());
    up.on('error', () => client.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => {
    for (const s of sockets) s.destroy();
    return new Promise<void>((r) => server.close(() => r()));
  });
  r.endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  r.stall = (on) => {
    stalled = on;
    // Connections kept alive from before would still go through.
    if (on) for (const s of sockets) s.destroy();
  };
  return r;
}

test('s3: a connection to the bucket cut in the middle of an upload leaves no object; the upload is made again', async (t) => {
  const w = await world(t, 12 * MiB);
  if (!w) return;
  const cut = await relay(t, Number(new URL(w.weed.endpoint).port));
  cut.cutAfter(6 * MiB);
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: w.registry.url }], storage: w.s3({ endpoint: cut.endpoint }) });
  const data = w.img.blobs[1]!.data;
  assert.ok((await fetchBody(blobUrl(proxy, w.layer))).body!.equals(data));
  await until('the upload is cut', () => cut.cuts === 1, 30_000);
  assert.equal(await w.head(w.layer), undefined, 'nothing of it in the bucket');
  await uploaded(proxy, w);
  assert.equal((await w.head(w.layer))?.size, data.length);
  const again = await fetchBody(blobUrl(proxy, w.layer));
  assert.deepEqual([again.headers['x-cache'], again.body!.equals(data)], ['HIT', true]);
});

test('s3: a bucket that stops answering costs a warm read its idle timeout and a 503, never a hang or a 500', async (t) => {
  const w = await world(t);
  if (!w) return;
  const slow = await relay(t, Number(new URL(w.weed.endpoint).port));
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: w.registry.url }], storage: w.s3({ endpoint: slow.endpoint }), timeouts: { blobIdle: '1s' } });
  assert.equal((await fetchBody(blobUrl(proxy, w.layer))).status, 200);
  await uploaded(proxy, w);
  slow.stall(true);
  const started = Date.now();
  const r = await fetchBody(blobUrl(proxy, w.layer));
  assert.deepEqual([r.status, ociError(r).code], [503, 'UNAVAILABLE']);
  assert.match(ociError(r).message, /^the cache's bucket could not be read: /);
  assert.ok(Date.now() - started < 15_000, 'within the idle timeout and its retries');
  slow.stall(false);
  const again = await fetchBody(blobUrl(proxy, w.layer));
  assert.deepEqual([again.status, again.headers['x-cache'], again.body!.equals(w.img.blobs[1]!.data)], [200, 'HIT', true]);
});

test('s3: the README Helm values mount the credentials Secret where the rendered config reads it, and that config pulls through a bucket', async (t) => {
  const { helmBinary, render } = await import('./helpers/helm.js');
  const { readmeSnippet } = await import('./helpers/readme.js');
  const { parse } = await import('yaml');
  if (!helmBinary(t)) return;
  const w = await world(t);
  if (!w) return;
  const values = join(tempDir(t, 'values'), 'values.yaml');
  writeFileSync(values, readmeSnippet('helm-s3-values.yaml'));
  const { docs, configText } = await render(['-f', values]);
  const pod = docs.find((d) => d.kind === 'StatefulSet')!.spec.template.spec;
  const storage = parse(configText).storage;
  assert.deepEqual(storage.s3, { bucket: 'ocicache', region: 'eu-west-1', prefix: 'cache/', credentialsFile: '/etc/ocicache/s3/credentials' });
  const volume = pod.volumes.find((v: { name: string }) => v.name === 's3-credentials');
  assert.deepEqual(volume.secret, { secretName: 'ocicache-s3', items: [{ key: 'credentials', path: 'credentials' }] });
  const mount = pod.containers[0].volumeMounts.find((m: { name: string }) => m.name === 's3-credentials');
  assert.equal(`${mount.mountPath}/credentials`, storage.s3.credentialsFile);
  // The pod, here: the Secret's file where the mount puts it; SeaweedFS stands in for the region's S3.
  const s3 = (w.s3() as { s3: { bucket: string; endpoint: string; credentialsFile: string } }).s3;
  const { root: _chartRoot, ...rendered } = storage;
  const proxy = await startProxy(t, {
    upstreams: [{ name: 'docker.io', url: w.registry.url }],
    storage: { ...rendered, s3: { ...storage.s3, bucket: s3.bucket, endpoint: s3.endpoint, credentialsFile: s3.credentialsFile, prefix: 'ocicache/' } },
  });
  assert.equal((await fetchBody(blobUrl(proxy, w.layer))).status, 200);
  await uploaded(proxy, w);
});

test('s3: a blob above the single-PUT limit goes as a multipart upload, visible only once completed; one that fails is never visible and is aborted at the next start', async (t) => {
  const w = await world(t, 64 * 1024);
  if (!w) return;
  const { Bucket } = await import('../src/storage/bucket.js');
  const { buildS3Config } = await import('../src/core/s3-config.js');
  const { ListMultipartUploadsCommand } = await import('@aws-sdk/client-s3');
  const data = randomBytes(13 * MiB);
  const digest = `sha256:${(await import('node:crypto')).createHash('sha256').update(data).digest('hex')}`;
  const file = join(tempDir(t, 'multipart'), 'blob');
  writeFileSync(file, data);
  const cut = await relay(t, Number(new URL(w.weed.endpoint).port));
  const config = buildS3Config({ ...(w.s3({ endpoint: cut.endpoint }) as Record<string, unknown>) })!;
  // Parts of 5 MiB (S3's smallest) above 5 MiB, instead of 64 MiB parts above 5 GiB.
  const bucket = new Bucket(config, { connect: 1000, idle: 1000 }, { above: 5 * MiB, partSize: 5 * MiB });
  t.after(() => bucket.close());
  const admin = new S3Client({ endpoint: w.weed.endpoint, region: 'us-east-1', forcePathStyle: true, credentials: { accessKeyId: 'admin-key', secretAccessKey: 'admin-secret' } });
  t.after(() => admin.destroy());
  const uploads = async (): Promise<number> => ((await admin.send(new ListMultipartUploadsCommand({ Bucket: config.bucket }))).Uploads ?? []).length;
  const origin = { upstream: 'docker.io', name: 'team/app' };

  // The bucket goes away after the first part: the upload fails, and so does its abort.
  cut.cutAfter(8 * MiB, true);
  await assert.rejects(bucket.put(digest, file, data.length, origin));
  cut.stall(false);
  assert.equal(await w.head(digest), undefined, 'nothing visible');
  assert.equal(await uploads(), 1, 'an incomplete upload is left');
  assert.equal(await bucket.abortStaleUploads(Date.now() + 1000), 1, 'the next start aborts it');
  assert.equal(await uploads(), 0);

  await bucket.put(digest, file, data.length, origin);
  assert.deepEqual(await w.head(digest), { size: data.length, metadata: { upstream: 'docker.io', repository: 'team/app' } });
  const part = await bucket.get(digest, 7 * MiB, 7 * MiB + 99);
  const chunks: Buffer[] = [];
  for await (const c of part!) chunks.push(c as Buffer);
  assert.ok(Buffer.concat(chunks).equals(data.subarray(7 * MiB, 7 * MiB + 100)));
});
