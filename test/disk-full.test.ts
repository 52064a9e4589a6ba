/**
 * A filesystem at 100 %, filled by something else while the cache runs (a real tmpfs, a real
 * registry): the process never exits, hits keep being served, new manifests and blobs are served
 * without being stored, access times wait in memory, and everything is written once space returns.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { appendFileSync, existsSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import Database from 'better-sqlite3';
import { startDistribution } from './helpers/distribution.js';
import { blobFile, metric, metricsText, pullImage, startProxy, testClock, type Proxy } from './helpers/proxy.js';
import { image, Pusher } from './helpers/seed.js';
import { mountTmpfs, needRoot, until } from './helpers/tools.js';

const MiB = 1024 * 1024;

/** Appends to `file` until the filesystem refuses even a page more. */
function fillUp(file: string): void {
  for (const chunk of [MiB, 4096]) {
    const bytes = Buffer.alloc(chunk);
    for (;;) {
      try {
        appendFileSync(file, bytes);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOSPC') throw err;
        break;
      }
    }
  }
}

async function pull(proxy: Proxy, name: string): Promise<string[]> {
  const { manifest, blobs } = await pullImage(proxy.url, name, 'v1');
  assert.equal(manifest.status, 200, name);
  for (const b of blobs) assert.equal(b.sha256, b.digest);
  return [manifest, ...blobs].map((r) => String(r.headers['x-cache']));
}

test('disk at 100%: the process keeps serving, stores nothing, and catches up when space returns', async (t) => {
  if (!needRoot(t, 'mounting a small tmpfs')) return;
  const registry = await startDistribution(t);
  if (!registry) return;
  const first = image({ 'a.bin': randomBytes(256 * 1024) });
  const second = image({ 'b.bin': randomBytes(256 * 1024) });
  const push = new Pusher({ url: registry.url });
  await push.pushImage('team/first', 'v1', first);
  await push.pushImage('team/second', 'v1', second);

  const root = mountTmpfs(t, '24m');
  const clock = testClock();
  const proxy = await startProxy(t, { root, clock, upstreams: [{ name: 'docker.io', url: registry.url, tagTtl: '1h' }], storage: { minFree: '1MiB' } });
  assert.deepEqual(await pull(proxy, 'team/first'), ['MISS', 'MISS', 'MISS']);
  const layer = first.blobs[1]!.descriptor.digest;
  // The last byte reaches the client just before the fill's rename.
  await until('the layer is cached', () => existsSync(blobFile(root, layer)));
  assert.ok(existsSync(join(root, 'index.reserve')), 'the index keeps a reserve');

  // Something else takes every byte. The first index write that fails gets the reserve.
  const filler = join(root, 'other-data.bin');
  fillUp(filler);
  clock.advance(60_000);
  assert.deepEqual(await pull(proxy, 'team/first'), ['HIT', 'HIT', 'HIT']);
  proxy.app.services.lifecycle.flush();
  // And now that is gone too: index writes fail from here on.
  fillUp(filler);
  const usedAt = clock() + 60_000;
  clock.advance(60_000);
  assert.deepEqual(await pull(proxy, 'team/first'), ['HIT', 'HIT', 'HIT'], 'hits are served on a full disk');
  proxy.app.services.lifecycle.flush();
  // The 5 s flush timer would have thrown out of the event loop here, ending the process.
  assert.deepEqual(await pull(proxy, 'team/second'), ['PASSTHROUGH', 'PASSTHROUGH', 'PASSTHROUGH'], 'a new image is served, verified, not stored');
  let text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_storage_writable'), 0);
  assert.ok(metric(text, 'ocicache_storage_errors_total', { code: 'SQLITE_FULL' }) >= 1);
  assert.equal(existsSync(blobFile(root, second.blobs[1]!.descriptor.digest)), false);

  // Space returns: caching resumes by itself, and the access times kept in memory reach the index.
  rmSync(filler);
  clock.advance(31_000);
  assert.deepEqual(await pull(proxy, 'team/second'), ['MISS', 'MISS', 'MISS']);
  assert.deepEqual(await pull(proxy, 'team/second'), ['HIT', 'HIT', 'HIT']);
  proxy.app.services.lifecycle.flush();
  text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_storage_writable'), 1);
  const db = new Database(join(root, 'index.db'), { readonly: true });
  try {
    const row = db.prepare('SELECT last_access FROM blobs WHERE digest = ?').get(layer) as { last_access: number };
    assert.equal(row.last_access, usedAt, 'the use while the disk was full was written later');
  } finally {
    db.close();
  }
  assert.ok(existsSync(join(root, 'index.reserve')), 'the reserve is made again');
});
