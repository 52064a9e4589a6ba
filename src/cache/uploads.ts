/**
 * With `storage.backend: s3`, a fill still lands on local disk (storage/fill.ts: verified, then
 * renamed under blobs/), and is served from there at once. This writes each such file to the
 * bucket, then deletes the local copy: the bucket holds the cache, the local disk only what is
 * being fetched or waits for the bucket. When the bucket cannot take it (down, slow, refusing),
 * the file stays on disk and is served from there, and is tried again with backoff; at start-up,
 * every local blob file with an index row is queued again (a crash or a restart left it).
 */
import type { Clock } from '../core/clock.js';
import type { Logger } from '../core/logger.js';
import type { BlobStore } from '../storage/blob-store.js';
import { describe, type Bucket, type Origin } from '../storage/bucket.js';
import type { Db } from '../storage/db.js';
import type { Metrics } from '../telemetry/metrics.js';

/** Uploads at once: each holds a socket and a file; multipart ones one part in memory. */
const CONCURRENT = 2;
const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 5 * 60_000;

interface Pending {
  digest: string;
  size: number;
  origin: Origin | undefined;
  attempts: number;
  /** Not before (ms). */
  at: number;
  running: boolean;
}

export class Uploads {
  private readonly queue = new Map<string, Pending>();
  private running = 0;
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  private readonly active = new Set<Promise<void>>();

  constructor(
    private readonly bucket: Bucket,
    private readonly store: BlobStore,
    private readonly db: Db,
    private readonly metrics: Metrics,
    private readonly log: Logger,
    private readonly now: Clock,
  ) {}

  /** A verified blob is in place on local disk: write it to the bucket. */
  add(digest: string, size: number, origin: Origin | undefined): void {
    if (this.closed || this.queue.has(digest)) return;
    this.queue.set(digest, { digest, size, origin, attempts: 0, at: 0, running: false });
    this.report();
    this.pump();
  }

  /** Queues every local blob file the index knows: left by a crash, a restart, or a bucket that was down. */
  async requeue(): Promise<number> {
    let n = 0;
    for await (const file of this.store.files()) {
      if (this.closed) break;
      if (!file.canonical || !this.db.hasBlob(file.digest)) continue;
      const size = await this.store.stat(file.digest);
      if (size === undefined) continue;
      this.add(file.digest, size, this.db.originOf(file.digest));
      n++;
    }
    return n;
  }

  get pending(): number {
    return this.queue.size;
  }

  private pump(): void {
    if (this.closed) return;
    const now = this.now();
    for (const p of this.queue.values()) {
      if (this.running >= CONCURRENT) return;
      if (p.at > now || p.running) continue;
      p.running = true;
      p.attempts++;
      this.running++;
      const task = this.upload(p).finally(() => {
        this.running--;
        this.active.delete(task);
        this.pump();
      });
      this.active.add(task);
    }
    this.schedule();
  }

  /** Wakes the queue when the next retry is due. */
  private schedule(): void {
    clearTimeout(this.timer);
    const due = [...this.queue.values()].filter((p) => !p.running).map((p) => p.at);
    if (due.length === 0 || this.closed) return;
    this.timer = setTimeout(() => this.pump(), Math.max(0, Math.min(...due) - this.now())).unref();
  }

  private async upload(p: Pending): Promise<void> {
    try {
      // Evicted while it waited: nothing to write.
      if (!this.db.hasBlob(p.digest)) {
        this.queue.delete(p.digest);
        return;
      }
      const there = await this.bucket.head(p.digest);
      // Another replica wrote the same verified bytes (a digest names them): nothing to write.
      if (there?.size !== p.size) {
        await this.bucket.put(p.digest, this.store.path(p.digest), p.size, p.origin ?? { upstream: '', name: '' });
        this.metrics.bucketRequests.inc({ op: 'put', result: 'ok' });
      }
      this.queue.delete(p.digest);
      // Readers that opened the local file keep reading it; the next ones read the bucket.
      await this.store.remove(p.digest).catch((err: Error) => this.log.warn({ digest: p.digest, err: err.message }, 'could not delete a local blob file after writing it to the bucket'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        // The local file went (evicted) before it could be written: nothing to write.
        this.queue.delete(p.digest);
        return;
      }
      this.metrics.bucketRequests.inc({ op: 'put', result: 'error' });
      p.at = this.now() + Math.min(RETRY_MAX_MS, RETRY_MIN_MS * 2 ** Math.min(p.attempts - 1, 16));
      this.log.warn({ digest: p.digest, size: p.size, attempt: p.attempts, err: describe(err) }, 'could not write a blob to the bucket; it is served from local disk and tried again');
    } finally {
      p.running = false;
      this.report();
    }
  }

  private report(): void {
    this.metrics.uploadsPending.set(this.queue.size);
  }

  /** Stops taking new uploads and waits for those running (up to `graceMs`); what is left is queued again at the next start. */
  async close(graceMs: number): Promise<void> {
    this.closed = true;
    clearTimeout(this.timer);
    await Promise.race([Promise.allSettled([...this.active]), new Promise((r) => setTimeout(r, graceMs).unref())]);
  }
}
