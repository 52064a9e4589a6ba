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
import test, { type TestContext } from 'node:test';
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

async function world(t: TestContext, layerBytes = 3 * MiB): Promise<World | undefined> {
  const weed = await startSeaweed(t, { identities: [CACHE] });
  if (!weed) return undefined;
  await weed.createBucket('cache');
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
    s3: (extra = {}) => ({ backend: 's3', s3: { endpoint: weed.endpoint, bucket: 'cache', prefix: 'ocicache/', credentialsFile: creds, ...extra } }),
    async objects() {
      const r = await admin.send(new ListObjectsV2Command({ Bucket: 'cache', Prefix: 'ocicache/' }));
      return (r.Contents ?? []).map((o) => ({ key: o.Key!, size: o.Size! }));
    },
    async head(digest) {
      try {
        const r = await admin.send(new HeadObjectCommand({ Bucket: 'cache', Key: key(digest) }));
        return { size: r.ContentLength!, metadata: r.Metadata ?? {} };
      } catch {
        return undefined;
      }
    },
    blobGets: () => registry.accessLog.filter((l) => l.startsWith(`GET /v2/team/app/blobs/${layer}`)).length,
  };
}

const blobUrl = (proxy: Proxy, digest: string, name = 'team/app'): string => `${proxy.url}/v2/${name}/blobs/${digest}?ns=docker.io`;

async function uploaded(proxy: Proxy): Promise<void> {
  await until('uploads to the bucket', async () => metric(await metricsText(proxy), 'ocicache_uploads_pending') === 0, 30_000);
}

test('s3: 32 cold requests make one upstream GET and stream; the blob is written to the bucket once verified and leaves local disk; warm reads and ranges come from the bucket', async (t) => {
  const w = await world(t);
  if (!w) return;
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: w.registry.url }], storage: w.s3() });
  const data = w.img.blobs[1]!.data;
  const cold = await Promise.all(Array.from({ length: 32 }, () => fetchBody(blobUrl(proxy, w.layer))));
  assert.ok(cold.every((r) => r.status === 200 && r.body!.equals(data)), 'every client got the whole blob');
  assert.equal(w.blobGets(), 1, 'one upstream GET');
  await uploaded(proxy);
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
