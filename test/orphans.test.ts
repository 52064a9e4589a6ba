/**
 * What kill -9 can leave between a fill's rename and its index row: a verified blob file without
 * a row. The server indexes such files in the background at start-up, so they count against
 * maxSize again; a file that does not hash to its name is deleted instead.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import test from 'node:test';
import Database from 'better-sqlite3';
import { join } from 'node:path';
import { startDistribution } from './helpers/distribution.js';
import { blobFile, metric, metricsText, pullImage, startProxy } from './helpers/proxy.js';
import { image, Pusher } from './helpers/seed.js';
import { tempDir, until } from './helpers/tools.js';

test('blob files without an index row are adopted at start-up; a damaged one is deleted', async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const img = image({ 'a.bin': randomBytes(300 * 1024), 'b.bin': randomBytes(200 * 1024) });
  await new Pusher({ url: registry.url }).pushImage('team/app', 'v1', img);
  const root = tempDir(t, 'orphans');
  const upstreams = [{ name: 'docker.io', url: registry.url }];
  const first = await startProxy(t, { root, upstreams });
  const { blobs } = await pullImage(first.url, 'team/app', 'v1');
  const [config, good, damaged] = blobs.map((b) => b.digest) as [string, string, string];
  await until('every blob is indexed', async () => metric(await metricsText(first), 'ocicache_disk_used_bytes') === img.blobs.reduce((n, b) => n + b.data.length, 0));
  await first.app.close();

  // As if the process died right after two renames: the files are there, their rows are not.
  const db = new Database(join(root, 'index.db'));
  db.prepare('DELETE FROM blobs WHERE digest IN (?, ?)').run(good, damaged);
  db.close();
  writeFileSync(blobFile(root, damaged), randomBytes(200 * 1024));

  const second = await startProxy(t, { root, upstreams });
  const size = (d: string): number => img.blobs.find((b) => b.descriptor.digest === d)!.data.length;
  await until('the good orphan counts again', async () => metric(await metricsText(second), 'ocicache_disk_used_bytes') === size(config) + size(good));
  await until('the damaged one is gone', () => !existsSync(blobFile(root, damaged)));
  const index = new Database(join(root, 'index.db'), { readonly: true });
  try {
    assert.deepEqual((index.prepare('SELECT digest FROM blobs ORDER BY digest').pluck().all() as string[]), [config, good].sort());
  } finally {
    index.close();
  }
  // The damaged blob is fetched again, never served from the bad file.
  const again = await pullImage(second.url, 'team/app', 'v1');
  assert.deepEqual(again.blobs.map((b) => [b.sha256 === b.digest, b.headers['x-cache']]), [[true, 'HIT'], [true, 'HIT'], [true, 'MISS']]);
});
