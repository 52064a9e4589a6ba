/**
 * Figure 6: the index at scale. An index filled with P.tags tags, each naming its own small
 * manifest, the way the cache stores them; then the cache's start-up time on it and the latency
 * of tag lookups spread over all of it (one connection: latency, not queueing).
 */
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Database from 'better-sqlite3';
import { Db } from '../../src/storage/db.js';
import { OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST, sha256 } from '../../test/helpers/seed.js';
import { kill, loadgen, log, P, settle, startOcicache, work } from '../harness.js';

export async function indexFigure(upstreamUrl: string, accept: string): Promise<{ tags: number; lookupP99us: number; lookupP50us: number; startMs: number }> {
  log(`filling an index with ${P.tags} tags and manifests`);
  const t0 = Date.now();
  const bigRoot = join(work, 'index-at-scale');
  fillIndex(bigRoot, P.tags);
  log(`index filled in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
  await settle();
  const scaled = await startOcicache(upstreamUrl, bigRoot);
  const urls = Array.from({ length: 20_000 }, () => {
    const i = Math.floor(Math.random() * P.tags);
    return `${scaled.url}/v2/org${i % 1000}/app${Math.floor(i / 1000) % 100}/manifests/v${i}`;
  });
  const urlFile = join(work, 'tag-urls.txt');
  writeFileSync(urlFile, urls.join('\n'));
  const lookup = await loadgen(['-urlfile', urlFile, '-c', '1', '-d', P.duration, '-H', accept]);
  await kill(scaled.child);
  return { tags: P.tags, lookupP99us: lookup.p99us, lookupP50us: lookup.p50us, startMs: scaled.startMs };
}

/** Fills an index with `n` tags, each pointing to its own small manifest, the way the cache stores them. */
function fillIndex(root: string, n: number): void {
  mkdirSync(root, { recursive: true });
  new Db(join(root, 'index.db')).close(); // creates the schema
  const db = new Database(join(root, 'index.db'));
  db.pragma('journal_mode = WAL');
  db.pragma('synchronous = OFF');
  const putManifest = db.prepare('INSERT INTO manifests (digest, media_type, body, size, created_at) VALUES (?, ?, ?, ?, ?)');
  const putRepo = db.prepare('INSERT INTO manifest_repos (upstream, name, digest) VALUES (?, ?, ?)');
  const putTag = db.prepare('INSERT INTO tags (upstream, name, tag, digest, checked_at) VALUES (?, ?, ?, ?, ?)');
  const putRef = db.prepare('INSERT OR IGNORE INTO refs (parent, child) VALUES (?, ?)');
  const layer = sha256('layer');
  const now = Date.now() + 365 * 86_400_000; // checked "in the future": fresh for the whole run
  const batch = db.transaction((from: number, to: number) => {
    for (let i = from; i < to; i++) {
      const config = sha256(`config ${i}`);
      const body = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: OCI_CONFIG, digest: config, size: 100 }, layers: [{ mediaType: OCI_LAYER_TAR, digest: layer, size: 1000 }] }));
      const digest = sha256(body);
      const name = `org${i % 1000}/app${Math.floor(i / 1000) % 100}`;
      putManifest.run(digest, OCI_MANIFEST, body, body.length, now);
      putRepo.run('docker.io', name, digest);
      putTag.run('docker.io', name, `v${i}`, digest, now);
      putRef.run(digest, config);
    }
  });
  for (let i = 0; i < n; i += 50_000) batch(i, Math.min(n, i + 50_000));
  db.close();
}
