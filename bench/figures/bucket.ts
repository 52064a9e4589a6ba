/**
 * Figure 9: the warm blob (8 streams) from three caches of the same blob: on disk, in an S3 bucket
 * streamed through the cache, and in the bucket with storage.s3.redirect (loadgen follows the 307
 * to SeaweedFS, as clients do), alternating within each round. SeaweedFS on loopback stands in for
 * S3: what is measured is the cache's share, not a cloud's.
 */
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { startSeaweed } from '../../test/helpers/seaweed.js';
import { fail, kill, loadgen, log, median, P, pairedRatio, scope, settle, startOcicache, work } from '../harness.js';

export async function bucketFigure(upstreamUrl: string, blobPath: string): Promise<{ disk: number; stream: number; redirect: number; streamRatio: number; redirectRatio: number }> {
  const weed = await startSeaweed(scope);
  if (!weed) fail('figure 9: .tools/weed is missing (scripts/build-weed.sh)');
  await weed.createBucket('bench');
  const credentialsFile = join(work, 'aws-credentials');
  writeFileSync(credentialsFile, '[default]\naws_access_key_id = bench\naws_secret_access_key = bench\n');
  const s3 = (prefix: string, redirect: boolean): Record<string, unknown> => ({ backend: 's3', s3: { endpoint: weed.endpoint, bucket: 'bench', prefix, redirect, credentialsFile } });
  const caches = { disk: await startOcicache(upstreamUrl), stream: await startOcicache(upstreamUrl, undefined, s3('stream/', false)), redirect: await startOcicache(upstreamUrl, undefined, s3('redirect/', true)) };
  const digest = blobPath.slice(blobPath.lastIndexOf('/') + 1);
  const local = (root: string): string => join(root, 'blobs', 'sha256', digest.slice(7, 9), digest.slice(7));
  for (const [k, c] of Object.entries(caches)) {
    await loadgen(['-url', c.url + blobPath, '-c', '1', '-n', '1', '-follow']);
    // In the bucket once its local copy is gone (cache/uploads.ts).
    for (const end = Date.now() + 120_000; k !== 'disk' && existsSync(local(c.root)); await sleep(100)) if (Date.now() > end) fail(`figure 9: the ${k} cache did not write the blob to the bucket`);
  }
  const mibps = { disk: [] as number[], stream: [] as number[], redirect: [] as number[] };
  const order = Object.keys(caches) as Array<keyof typeof caches>;
  for (let i = 0; i < P.rounds; i++) {
    for (const k of i % 2 ? [...order].reverse() : order) {
      await settle();
      mibps[k].push((await loadgen(['-url', caches[k].url + blobPath, '-c', '8', '-n', String(8 * P.blobsPerStream), '-follow'])).mibps);
    }
  }
  for (const c of Object.values(caches)) await kill(c.child);
  await weed.kill();
  const result = { disk: Math.round(median(mibps.disk)), stream: Math.round(median(mibps.stream)), redirect: Math.round(median(mibps.redirect)), streamRatio: pairedRatio(mibps.stream, mibps.disk), redirectRatio: pairedRatio(mibps.redirect, mibps.disk) };
  log(`figure 9: warm blob ${result.disk} MiB/s from disk, ${result.stream} streamed from the bucket, ${result.redirect} redirected to it`);
  return result;
}

