/**
 * Opens a cache directory and builds the services over it: the one place that wires the blob
 * store, the index, the upstream client, the lifecycle and the manifest and blob decisions. Used
 * by the server (http/app.ts) and by the one-shot commands (gc, verify, prefetch), so they share
 * one code path.
 */
import { join } from 'node:path';
import { UpstreamIndex } from '../core/api-path.js';
import { systemClock, type Clock } from '../core/clock.js';
import type { Network } from '../upstream/exchange.js';
import type { Config } from '../core/config.js';
import type { Logger } from '../core/logger.js';
import { BlobStore } from '../storage/blob-store.js';
import { Bucket, describe } from '../storage/bucket.js';
import { ConfigError } from '../core/config-error.js';
import { Db } from '../storage/db.js';
import { CacheLock } from '../storage/lock.js';
import { Metrics } from '../telemetry/metrics.js';
import { UpstreamClient } from '../upstream/client.js';
import { Blobs } from './blobs.js';
import { Keeper } from './keep.js';
import { Lifecycle } from './lifecycle.js';
import { Manifests } from './manifests.js';
import { RemoteBlobs } from './remote-blobs.js';
import { Uploads } from './uploads.js';

export interface Services {
  config: Config;
  metrics: Metrics;
  store: BlobStore;
  db: Db;
  upstream: UpstreamClient;
  upstreams: UpstreamIndex;
  lifecycle: Lifecycle;
  manifests: Manifests;
  blobs: Blobs;
  /** The keep list: started by the server (start()), idle in one-shot commands. */
  keeper: Keeper;
  /** storage.backend s3: the bucket, and the uploads of what fills left on local disk (started by the server). */
  remote: RemoteBlobs | undefined;
  /** Finishes fills (up to `graceMs`), flushes access times, closes connections and the index. */
  close(graceMs: number): Promise<void>;
}

export interface OpenOptions {
  /**
   * Delete tmp/ leftovers (fills a crash interrupted). Only the server does this at start-up: a
   * one-shot command must not delete the temp files of a server running on the same directory.
   */
  sweep: boolean;
  /** The time; tests pass their own to move it forward (default: the system's). */
  clock?: Clock;
  /** How upstreams are reached (DNS lookup, extra trust anchors); the system's by default. */
  network?: Network;
}

export async function openCache(config: Config, log: Logger, options: OpenOptions): Promise<Services> {
  const clock = options.clock ?? systemClock;
  const metrics = new Metrics(config.server.replica);
  const store = new BlobStore(config.storage.root, config.cache.fillMemory);
  await store.createLayout();
  // Before anything is swept or opened: a second process on a live directory is refused here.
  const lock = CacheLock.acquire(config.storage.root);
  let db: Db;
  try {
    const removed = await store.init(options.sweep);
    if (removed > 0) log.info({ removed }, 'removed temp files left by an earlier run');
    db = new Db(join(config.storage.root, 'index.db'), { manifestMemory: config.cache.manifestMemory });
  } catch (err) {
    lock.release();
    throw err;
  }
  const upstream = new UpstreamClient(config, metrics, clock, options.network);
  for (const u of config.upstreams) {
    if (u.tls?.insecure) log.warn({ upstream: u.name, url: u.url.origin }, `upstream ${u.name} is insecure: its TLS certificate is NOT verified, so anyone on the path to ${u.url.host} can serve anything as it (set caFile instead)`);
  }
  let bucket: Bucket | undefined;
  if (config.storage.s3) {
    bucket = new Bucket(config.storage.s3, { connect: config.timeouts.connect, idle: config.timeouts.blobIdle });
    try {
      await checkBucket(bucket, log);
    } catch (err) {
      bucket.close();
      await upstream.close();
      db.close();
      lock.release();
      throw err;
    }
  }
  const lifecycle = new Lifecycle(config, db, store, metrics, log, clock, bucket);
  const remote = bucket && new RemoteBlobs(bucket, new Uploads(bucket, store, db, metrics, log, clock), db, lifecycle, metrics, log);
  const blobs = new Blobs(config, store, db, upstream, lifecycle, metrics, log, remote);
  const manifests = new Manifests(db, lifecycle.guard, upstream, log, clock);
  const upstreams = new UpstreamIndex(config);
  let keeper: Keeper;
  try {
    keeper = new Keeper({ manifests, blobs, upstreams, metrics, db, log }, config.keep, config.storage.maxSize, clock);
  } catch (err) {
    await upstream.close();
    db.close();
    lock.release();
    throw err;
  }
  return {
    config,
    metrics,
    store,
    db,
    upstream,
    upstreams,
    lifecycle,
    manifests,
    blobs,
    keeper,
    remote,
    close: async (graceMs) => {
      await keeper.close();
      await blobs.close(graceMs);
      await remote?.uploads.close(graceMs);
      bucket?.close();
      await lifecycle.close();
      await upstream.close();
      db.close();
      lock.release();
    },
  };
}

/**
 * At start-up: a bucket that refuses these credentials or does not exist is a configuration error
 * (refused, naming the key); one that cannot be reached now is not (the cache serves from local
 * disk and upstreams, and writes to the bucket once it is back).
 */
async function checkBucket(bucket: Bucket, log: Logger): Promise<void> {
  try {
    await bucket.check();
  } catch (err) {
    const status = (err as { $metadata?: { httpStatusCode?: number } }).$metadata?.httpStatusCode;
    if (status === 403 || status === 404 || status === 301 || status === 400) {
      throw new ConfigError('storage.s3.bucket', `${bucket.config.bucket} at ${bucket.config.endpoint?.origin ?? `AWS ${bucket.config.region}`} cannot be used: ${describe(err)}`);
    }
    log.warn({ bucket: bucket.config.bucket, err: describe(err) }, 'the bucket cannot be reached now; blobs stay on local disk until it can');
  }
}
