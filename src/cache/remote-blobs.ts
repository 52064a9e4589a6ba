/**
 * Reading blobs held in the S3 bucket (`storage.backend: s3`) for cache/blobs.ts: their size
 * from the index, or from the bucket when another replica sharing it wrote the object (adopted:
 * indexed under the upstream repository its metadata names, so the same rules decide who may be
 * served it as for a blob fetched here); their bytes as a stream, or a presigned URL to redirect
 * the client to. An object that went missing (another replica evicted it, a bucket lifecycle rule
 * expired it) drops its index row, and the blob is fetched again like any miss.
 */
import type { Readable } from 'node:stream';
import type { Logger } from '../core/logger.js';
import { describe, type Bucket } from '../storage/bucket.js';
import type { Db } from '../storage/db.js';
import type { Metrics } from '../telemetry/metrics.js';
import type { Lifecycle } from './lifecycle.js';
import type { Uploads } from './uploads.js';

export class RemoteBlobs {
  constructor(
    readonly bucket: Bucket,
    readonly uploads: Uploads,
    private readonly db: Db,
    private readonly lifecycle: Lifecycle,
    private readonly metrics: Metrics,
    private readonly log: Logger,
  ) {}

  /**
   * The server's start: aborts multipart uploads a crash left (older than `staleAfter`: another
   * replica may be uploading now), and queues the local blob files that wait for the bucket.
   */
  start(staleAfter: number): void {
    void (async () => {
      await this.lifecycle.orphansAdopted;
      const queued = await this.uploads.requeue();
      if (queued > 0) this.log.info({ queued }, 'blobs on local disk queued for the bucket');
      const aborted = await this.bucket.abortStaleUploads(Date.now() - staleAfter);
      if (aborted > 0) this.log.info({ aborted }, 'aborted multipart uploads an earlier run left in the bucket');
    })().catch((err: Error) => this.log.warn({ err: describe(err) }, 'cleaning up the bucket at start-up failed'));
  }

  get redirect(): boolean {
    return this.bucket.config.redirect;
  }

  /**
   * The size of a blob in the bucket: the index's, or the object's when another replica wrote it
   * (then adopted). undefined: not in the bucket, or the bucket cannot be asked now (the blob is
   * then fetched from its upstream as if it were not cached).
   */
  async size(digest: string): Promise<number | undefined> {
    const known = this.db.blobSize(digest);
    if (known !== undefined) return known;
    let found: Awaited<ReturnType<Bucket['head']>>;
    try {
      found = await this.bucket.head(digest);
    } catch (err) {
      this.failed('head', digest, err);
      return undefined;
    }
    this.metrics.bucketRequests.inc({ op: 'head', result: found ? 'ok' : 'missing' });
    // An object without its origin was not written by ocicache: it proves nothing about who serves these bytes.
    if (!found?.origin) return undefined;
    this.lifecycle.added(digest, found.size, found.origin.upstream, found.origin.name);
    this.log.info({ digest, size: found.size, upstream: found.origin.upstream }, 'adopted a blob another replica wrote to the bucket');
    return found.size;
  }

  /** Bytes [start, end] of a blob in the bucket; undefined when the object is gone (its row is dropped). */
  async read(digest: string, start: number, end: number): Promise<Readable | undefined> {
    let body: Readable | undefined;
    try {
      body = await this.bucket.get(digest, start, end);
    } catch (err) {
      this.failed('get', digest, err);
      throw err;
    }
    this.metrics.bucketRequests.inc({ op: 'get', result: body ? 'ok' : 'missing' });
    if (!body) {
      this.log.warn({ digest }, 'a blob the index holds is no longer in the bucket (evicted by another replica or a lifecycle rule); fetching it again');
      this.lifecycle.lost(digest);
    }
    return body;
  }

  presign(digest: string): Promise<string> {
    return this.bucket.presign(digest);
  }

  private failed(op: string, digest: string, err: unknown): void {
    this.metrics.bucketRequests.inc({ op, result: 'error' });
    this.log.warn({ digest, op, err: describe(err) }, 'the bucket could not be asked');
  }
}
