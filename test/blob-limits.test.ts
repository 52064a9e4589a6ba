/**
 * Blobs the cache will not hold: one announced above storage.maxBlobSize streams through uncached
 * (verified), one of unknown size that grows past it is cut off, and a download stops when the
 * filesystem falls below storage.minFree, before the disk is full.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { startProxyWithFake } from './helpers/fake-upstream.js';
import { blobFile, fetchBody, metric, metricsText } from './helpers/proxy.js';
import { sha256 } from './helpers/seed.js';
import { mountTmpfs, needRoot, until } from './helpers/tools.js';

const MiB = 1024 * 1024;

test('a blob announced above storage.maxBlobSize is served through, verified, and not cached', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t, {}, { storage: { maxBlobSize: '1MiB' } });
  const data = randomBytes(2 * MiB);
  const digest = sha256(data);
  fake.route(`/v2/some/repo/blobs/${digest}`, (_req, res) => res.writeHead(200, { 'content-length': String(data.length) }).end(data));
  for (let i = 0; i < 2; i++) {
    const r = await fetchBody(`${proxy.url}/v2/some/repo/blobs/${digest}?ns=fake.example`);
    assert.equal(r.status, 200);
    assert.equal(r.headers['x-cache'], 'PASSTHROUGH');
    assert.equal(sha256(r.body!), digest);
  }
  assert.equal(existsSync(blobFile(proxy.root, digest)), false);
});

/** An upstream blob body without a length that never ends; `stopped` once the proxy hangs up. */
function endless(): { handler: (req: import('node:http').IncomingMessage, res: import('node:http').ServerResponse) => void; stopped: () => boolean } {
  let stopped = false;
  const chunk = randomBytes(64 * 1024);
  return {
    stopped: () => stopped,
    handler: (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      const pump = (): void => {
        while (!res.destroyed && res.write(chunk));
        if (!res.destroyed) res.once('drain', pump);
      };
      res.once('close', () => (stopped = true));
      pump();
    },
  };
}

test('a blob of unknown size is cut off at storage.maxBlobSize: the client sees a short body, nothing stays on disk', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t, { blobRetries: 0 }, { storage: { maxBlobSize: '4MiB' } });
  const digest = sha256('never ends');
  const upstream = endless();
  fake.route(`/v2/some/repo/blobs/${digest}`, upstream.handler);
  const r = await fetchBody(`${proxy.url}/v2/some/repo/blobs/${digest}?ns=fake.example`);
  assert.ok(r.aborted ?? (r.body!.length <= 4 * MiB), 'the body is cut');
  await until('the upstream connection is closed', upstream.stopped);
  await until('the temp file is removed', () => readdirSync(join(proxy.root, 'tmp')).length === 0);
  assert.equal(existsSync(blobFile(proxy.root, digest)), false);
  assert.equal(metric(await metricsText(proxy), 'ocicache_fill_failures_total', { upstream: 'fake.example', reason: 'invalid' }), 1);
});

test('a download stops when the filesystem falls below storage.minFree, before it is full', async (t) => {
  if (!needRoot(t, 'mounting a small tmpfs')) return;
  const root = mountTmpfs(t, '32m');
  const { fake, proxy } = await startProxyWithFake(t, { blobRetries: 0 }, { root, storage: { minFree: '8MiB' } });
  const digest = sha256('grows until the disk is nearly full');
  const upstream = endless();
  fake.route(`/v2/some/repo/blobs/${digest}`, upstream.handler);
  const r = await fetchBody(`${proxy.url}/v2/some/repo/blobs/${digest}?ns=fake.example`);
  assert.ok(r.aborted, 'the client sees the download cut off');
  await until('the upstream connection is closed', upstream.stopped);
  await until('the temp file is removed', () => readdirSync(join(root, 'tmp')).length === 0);
  const text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_fill_failures_total', { upstream: 'fake.example', reason: 'storage' }), 1);
  assert.equal(metric(text, 'ocicache_storage_errors_total', { code: 'ENOSPC' }), 1);
  // The index could still be written all along: the server answers and its index works.
  assert.equal((await fetchBody(`${proxy.url}/readyz`)).status, 200);
});
