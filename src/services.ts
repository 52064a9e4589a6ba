/**
 * Opens a cache directory and builds the services over it: the one place that wires the blob
 * store, the index, the upstream client, the lifecycle and the registry. Used by the server
 * (app.ts) and by the one-shot commands (gc, verify, prefetch) so they share one code path.
 */
import { join } from 'node:path';
import { BlobStore } from './blob-store.js';
import type { Config } from './config.js';
import { Db } from './db.js';
import { Lifecycle, type LifecycleLog } from './lifecycle.js';
import { Metrics } from './metrics.js';
import { UpstreamIndex } from './reference.js';
import { Registry } from './registry.js';
import { UpstreamClient } from './upstream.js';

export interface Services {
  config: Config;
  metrics: Metrics;
  blobs: BlobStore;
  db: Db;
  upstream: UpstreamClient;
  upstreams: UpstreamIndex;
  lifecycle: Lifecycle;
  registry: Registry;
  /** Finishes fills (up to `graceMs`), flushes access times, closes connections and the index. */
  close(graceMs: number): Promise<void>;
}

export interface OpenOptions {
  /**
   * Delete tmp/ leftovers (fills a crash interrupted). Only the server does this at start-up: a
   * one-shot command must not delete the temp files of a server running on the same directory.
   */
  sweep: boolean;
}

export async function openCache(config: Config, log: LifecycleLog, options: OpenOptions): Promise<Services> {
  const metrics = new Metrics();
  const blobs = new BlobStore(config.storage.root);
  const removed = await blobs.init(options.sweep);
  if (removed > 0) log.info({ removed }, 'removed temp files left by an earlier run');
  const db = new Db(join(config.storage.root, 'index.db'));
  const upstream = new UpstreamClient(config, metrics);
  const lifecycle = new Lifecycle(config, db, blobs, metrics, log, (dropped) => registry.forgetManifests(dropped));
  const registry = new Registry(config, db, blobs, upstream, lifecycle, metrics, log);
  return {
    config,
    metrics,
    blobs,
    db,
    upstream,
    upstreams: new UpstreamIndex(config),
    lifecycle,
    registry,
    close: async (graceMs) => {
      await registry.close(graceMs);
      await lifecycle.close();
      await upstream.close();
      db.close();
    },
  };
}
