/**
 * Blob decisions: serve from disk, or start (or join) the one fill that downloads a blob from its
 * upstream while every waiting client tails it; resume broken downloads with Range; stream
 * through uncached when storage is full. Routes and prefetch call this; this calls the upstream
 * client, the blob store and the lifecycle.
 */
import type { FileHandle } from 'node:fs/promises';
import { basename } from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Target } from '../core/api-path.js';
import { parseRange, type ByteRange } from '../core/byte-range.js';
import type { CacheResult } from '../core/cache-result.js';
import type { Config } from '../core/config.js';
import { OciError } from '../core/errors.js';
import type { Logger } from '../core/logger.js';
import { countBytes, discard, skipBytes } from '../core/streams.js';
import { isStorageError, type BlobStore } from '../storage/blob-store.js';
import { DigestGuard } from '../storage/digest-guard.js';
import type { Db } from '../storage/db.js';
import type { Fill } from '../storage/fill.js';
import { progressLines } from '../storage/fill-progress.js';
import type { Metrics } from '../telemetry/metrics.js';
import type { BlobResponse, UpstreamClient } from '../upstream/client.js';
import { transportError } from '../upstream/responses.js';
import type { Lifecycle } from './lifecycle.js';
import type { RemoteBlobs } from './remote-blobs.js';

export interface BlobResult {
  size: number | undefined;
  range: ByteRange | undefined;
  /** present for GET of a blob being filled or passed through; the route hands it to the client, which owns it from then on */
  stream: (Readable & { bytesRead: number }) | undefined;
  /** present for GET of a cached blob: bytes [start, end) of an open file; the route owns it and calls `done` once */
  file?: { handle: FileHandle; start: number; end: number; done: () => Promise<void> };
  /** present for a `followed` GET of a blob being filled: the fill's temp file (under tmp/) and the bytes [start, to) the worker sends from it (`to` unknown: to its end) */
  followed?: { file: string; start: number; to: number | undefined };
  /** present for GET of a blob in the bucket with storage.s3.redirect: where the client gets it (307) */
  redirect?: string;
  cache: CacheResult;
}

/** Thrown to every waiter of a fill that could not start (storage full, or a blob above storage.maxBlobSize): each streams through instead. */
class StorageUnavailable extends Error {}

/** How often a download under way checks that the filesystem still has storage.minFree free. */
const ROOM_CHECK_MS = 1000;

/** The upstream's body ended before the size it announced: the transfer broke, so it may be resumed. */
class BodyEndedEarly extends Error {}

/** A cached blob opened and pinned against eviction until `release`. */
interface Opened {
  handle: FileHandle;
  size: number;
  release: () => void;
}

/** Fills are keyed by upstream too: a 404 from one upstream must not answer a request meant for another. */
function fillKey(target: Target, digest: string): string {
  return `${target.upstream.name}\n${digest}`;
}

export class Blobs {
  /** Fills by fillKey, with the repository whose request started each. */
  private readonly fills = new Map<string, { name: string; fill: Promise<Fill> }>();
  private readonly fillsDone = new Set<Promise<void>>();
  private readonly fillAbort = new AbortController();

  constructor(
    private readonly config: Pick<Config, 'timeouts' | 'storage'>,
    private readonly store: BlobStore,
    private readonly db: Db,
    private readonly upstream: UpstreamClient,
    private readonly lifecycle: Lifecycle,
    private readonly metrics: Metrics,
    private readonly log: Logger,
    /** storage.backend s3: the bucket that holds the cache's blobs (local disk holds fills and what waits for the bucket). */
    private readonly remote?: RemoteBlobs,
  ) {}

  /** The size of a cached blob: on local disk, or in the bucket. */
  private async cachedSize(digest: string): Promise<number | undefined> {
    return (await this.store.stat(digest)) ?? (await this.remote?.size(digest));
  }

  /** Size of a blob; a HEAD never downloads one, and tells nobody what is cached for another repository. */
  async head(target: Target, digest: string): Promise<BlobResult> {
    const size = await this.cachedSize(digest);
    const cache = size === undefined ? 'fetch' : await this.confirm(target, digest);
    if (cache !== 'fetch') return { size, range: undefined, stream: undefined, cache };
    const head = await this.upstream.headBlob(target, digest);
    return { size: head.size, range: undefined, stream: undefined, cache: 'miss' };
  }

  /**
   * Whether this repository may be served the cached copy of `digest`. A digest proves the bytes,
   * not that the client's repository, or upstream, has them: without this, a private layer once
   * cached would be served under any name.
   * - 'hit': the index knows the repository holds it (fetched or confirmed there before);
   * - 'revalidated': another repository of the same upstream served these bytes, and the
   *   upstream has just confirmed this one with a HEAD (remembered). An upstream is the
   *   authority on its own repositories;
   * - 'fetch': no repository of this upstream ever served these bytes. Its HEAD is no proof (a
   *   hostile upstream would answer 200 for any digest): the blob is fetched from it, as if not
   *   cached, and verified.
   * Throws the upstream's answer to the HEAD (BLOB_UNKNOWN, DENIED, ...) when it does not confirm.
   */
  private async confirm(target: Target, digest: string): Promise<'hit' | 'revalidated' | 'fetch'> {
    const { upstream, name } = target;
    if (this.db.blobHeldBy(upstream.name, name, digest)) return 'hit';
    if (!this.db.fromUpstream('blob', upstream.name, digest)) return 'fetch';
    return this.vouch(target, digest);
  }

  /** The upstream confirms with a HEAD that this repository holds a blob it serves: remembered. */
  private async vouch(target: Target, digest: string): Promise<'revalidated'> {
    await this.upstream.headBlob(target, digest);
    this.lifecycle.guard.write('blob repository', () => this.db.markBlobIn(target.upstream.name, target.name, digest));
    return 'revalidated';
  }

  /**
   * A blob from disk, tailing the (shared) fill from upstream, or straight through when storage is
   * full. `followed`: a worker of a group asks, and reads a fill's temp file itself (http/worker.ts);
   * the stream is then the fill's progress (storage/fill-progress.ts), not its bytes.
   */
  async get(target: Target, digest: string, rangeHeader: string | undefined, followed = false): Promise<BlobResult> {
    const opened = await this.openPinned(digest);
    if (opened) {
      let cache: CacheResult | 'fetch';
      try {
        cache = await this.confirm(target, digest);
      } catch (err) {
        opened.release();
        await opened.handle.close().catch(() => undefined);
        throw err;
      }
      if (cache !== 'fetch') return this.fromFile(target, digest, opened, rangeHeader, cache);
      opened.release();
      await opened.handle.close().catch(() => undefined);
    } else if (this.remote) {
      const held = await this.fromBucket(target, digest, rangeHeader);
      if (held) return held;
    }
    let fill: Fill;
    try {
      fill = await this.fillFor(target, digest);
    } catch (err) {
      if (err instanceof StorageUnavailable) return this.uncached(target, digest);
      throw err;
    }
    if (fill.state === 'committed') {
      const again = await this.openPinned(digest);
      if (again) return this.fromFile(target, digest, again, rangeHeader);
    }
    // Without a Content-Length from upstream the size is unknown until the end: ignore Range (RFC 9110 §14.2).
    const range = fill.size === undefined ? undefined : parseRange(rangeHeader, fill.size);
    // With a known size the stream ends at the last byte, not when the file is later renamed into place.
    const end = range?.end ?? (fill.size === undefined ? undefined : fill.size - 1);
    const reader = followed ? progressLines(fill) : fill.reader(range?.start ?? 0, end);
    const release = this.lifecycle.pin(digest);
    reader.once('close', release);
    return { size: fill.size, range, stream: reader, followed: followed ? { file: basename(fill.tmpPath), start: range?.start ?? 0, to: end === undefined ? undefined : end + 1 } : undefined, cache: 'miss' };
  }

  /** Makes sure a blob is in the cache, through the same shared fill as client pulls (prefetch). */
  async ensure(target: Target, digest: string): Promise<{ size: number; result: 'cached' | 'fetched' }> {
    const size = await this.cachedSize(digest);
    if (size !== undefined) {
      this.lifecycle.touch(digest, size, target.upstream.name);
      return { size, result: 'cached' };
    }
    let fill: Fill;
    try {
      fill = await this.fillFor(target, digest);
    } catch (err) {
      if (err instanceof StorageUnavailable) throw new OciError('UNAVAILABLE', 'storage is full or unwritable: nothing can be prefetched');
      throw err;
    }
    await fill.settled();
    return { size: fill.received, result: 'fetched' };
  }

  /** Lets running fills finish for up to `graceMs`, then aborts the rest (their temp files are removed). */
  async close(graceMs: number): Promise<void> {
    const all = Promise.allSettled([...this.fillsDone]);
    const timer = setTimeout(() => this.fillAbort.abort(new Error('shutting down')), graceMs);
    await all;
    clearTimeout(timer);
  }

  /** Opens a cached blob, pinned first so eviction cannot slip in between the open and the pin. */
  private async openPinned(digest: string): Promise<Opened | undefined> {
    const release = this.lifecycle.pin(digest);
    try {
      const opened = await this.store.open(digest);
      if (opened) return { ...opened, release };
    } catch (err) {
      release();
      throw err;
    }
    release();
    return undefined;
  }

  private fromFile(target: Target, digest: string, opened: Opened, rangeHeader: string | undefined, cache: CacheResult = 'hit'): BlobResult {
    const { handle, size, release } = opened;
    let range: ByteRange | undefined;
    try {
      range = parseRange(rangeHeader, size);
    } catch (err) {
      release();
      void handle.close();
      throw err;
    }
    this.lifecycle.touch(digest, size, target.upstream.name);
    const done = async (): Promise<void> => {
      release();
      await handle.close().catch(() => undefined);
    };
    return { size, range, stream: undefined, file: { handle, start: range?.start ?? 0, end: range ? range.end + 1 : size, done }, cache };
  }

  /**
   * A blob in the bucket, for a repository allowed to see it: a stream of the range asked for, or a
   * presigned URL (storage.s3.redirect). undefined when the bucket does not have it (then it is
   * fetched); the bucket's errors are the client's 503, never a 500.
   */
  private async fromBucket(target: Target, digest: string, rangeHeader: string | undefined): Promise<BlobResult | undefined> {
    const remote = this.remote!;
    const size = await remote.size(digest);
    if (size === undefined) return undefined;
    const cache = await this.confirm(target, digest);
    if (cache === 'fetch') return undefined;
    const range = parseRange(rangeHeader, size);
    this.lifecycle.touch(digest, size, target.upstream.name);
    if (remote.redirect) return { size, range: undefined, stream: undefined, redirect: await remote.presign(digest), cache };
    const release = this.lifecycle.pin(digest);
    let body: Readable | undefined;
    try {
      body = await remote.read(digest, range?.start ?? 0, range ? range.end : size - 1);
    } catch (err) {
      release();
      throw new OciError('UNAVAILABLE', `the cache's bucket could not be read: ${(err as Error).message}`, { status: 503 });
    }
    if (!body) {
      release();
      return undefined;
    }
    const counted = countBytes(body);
    counted.once('close', release);
    return { size, range, stream: counted, cache };
  }

  /** Storage is full or failing: stream the blob from upstream without caching, still verifying it. */
  private async uncached(target: Target, digest: string): Promise<BlobResult> {
    const res = await this.upstream.getBlob(target, digest, AbortSignal.timeout(this.config.timeouts.fill));
    const guard = new DigestGuard(digest, res.size);
    // The guard owns the upstream body from here: a client that leaves destroys both.
    pipeline(res.body, guard).catch(() => undefined);
    this.metrics.uncachedBlobs.inc({ upstream: target.upstream.name });
    return { size: res.size, range: undefined, stream: guard, cache: 'passthrough' };
  }

  /**
   * The running fill of this blob from this upstream, or a new one. A fill another repository
   * started is joined only once this repository is confirmed to hold the blob too.
   */
  private async fillFor(target: Target, digest: string): Promise<Fill> {
    const key = fillKey(target, digest);
    const running = this.fills.get(key);
    // A fill of this upstream started for another repository is joined once the upstream
    // confirms this one holds the blob too: the fill shows it serves these bytes.
    if (running && running.name !== target.name && !this.db.blobHeldBy(target.upstream.name, target.name, digest)) await this.vouch(target, digest);
    const joined = this.fills.get(key);
    if (joined) return joined.fill;
    const fill = this.startFill(target, digest, key);
    this.fills.set(key, { name: target.name, fill });
    fill.catch(() => this.fills.delete(key));
    return fill;
  }

  private async startFill(target: Target, digest: string, key: string): Promise<Fill> {
    const upstream = target.upstream.name;
    const signal = AbortSignal.any([this.fillAbort.signal, AbortSignal.timeout(this.config.timeouts.fill)]);
    const res = await this.upstream.getBlob(target, digest, signal);
    const tooLarge = res.size !== undefined && res.size > this.config.storage.maxBlobSize;
    const room = tooLarge ? undefined : await this.lifecycle.guard.reserve(res.size);
    let fill: Fill;
    try {
      if (!room) throw new StorageUnavailable();
      fill = await this.store.createFill(digest, res.size, this.config.storage.maxBlobSize);
    } catch (err) {
      room?.release();
      discard(res.body);
      if (isStorageError(err)) this.lifecycle.guard.failed(err as Error);
      if (err instanceof StorageUnavailable || isStorageError(err)) throw new StorageUnavailable();
      throw err;
    }
    room.written = () => fill.written;
    // Something else may fill the filesystem meanwhile, or a download of unknown size may grow:
    // stop before the disk is full rather than at ENOSPC, when the index could no longer be written.
    const roomCheck = setInterval(() => {
      void this.lifecycle.guard.enoughRoom().then((ok) => {
        if (!ok) {
          const err = Object.assign(new Error(`less than storage.minFree free on the cache filesystem: download of ${digest} stopped`), { code: 'ENOSPC' });
          void fill.fail(err, forClients(target, err));
        }
      });
    }, ROOM_CHECK_MS).unref();
    this.metrics.fillsInFlight.inc();
    const release = this.lifecycle.pin(digest);
    const done = this.download(target, fill, res, signal)
      .then(() => fill.commit())
      .then(
        (size) => {
          this.lifecycle.added(digest, size, upstream, target.name);
          this.remote?.uploads.add(digest, size, { upstream, name: target.name });
          this.metrics.upstreamBytes.inc({ upstream }, size);
        },
        async (err: Error) => {
          if (isStorageError(err)) this.lifecycle.guard.failed(err);
          this.metrics.fillFailures.inc({ upstream, reason: err instanceof OciError ? 'invalid' : isStorageError(err) ? 'storage' : 'transport' });
          this.log.warn({ upstream, digest, bytes: fill.received, err: err.message }, 'blob fill failed; nothing cached');
          await fill.fail(err, forClients(target, err));
        },
      )
      .finally(() => {
        clearInterval(roomCheck);
        room.release();
        release();
        this.metrics.fillsInFlight.dec();
        this.fills.delete(key);
        this.fillsDone.delete(done);
      });
    this.fillsDone.add(done);
    return fill;
  }

  /**
   * Copies the upstream body into the fill. When the connection breaks (reset, truncation, idle
   * timeout) it resumes with Range from the bytes received, up to blobRetries times with backoff;
   * an upstream that answers 200 instead of 206 is read from the start and the known bytes skipped.
   * The fill hashes every byte once, in order, so the digest still covers the whole blob.
   */
  private async download(target: Target, fill: Fill, first: BlobResponse, signal: AbortSignal): Promise<void> {
    const upstream = target.upstream;
    let res: BlobResponse | undefined = first;
    for (let attempt = 0; ; attempt++) {
      try {
        if (!res) {
          res = await this.upstream.getBlob(target, fill.digest, signal, fill.received);
          if (res.size !== undefined && res.size !== fill.size) {
            discard(res.body);
            throw new OciError('UNKNOWN', `upstream ${upstream.name} changed the size of ${fill.digest} from ${fill.size} to ${res.size}`, { status: 502 });
          }
          this.metrics.blobResumes.inc({ upstream: upstream.name, how: res.start === fill.received ? 'range' : 'restart' });
        }
        const skip = fill.received - res.start;
        const body = res.body;
        res = undefined;
        if (skip > 0) await pipeline(body, skipBytes(skip), fill.sink());
        else await pipeline(body, fill.sink());
        if (fill.size === undefined || fill.received === fill.size) return;
        throw new BodyEndedEarly(`upstream body ended after ${fill.received} of ${fill.size} bytes`);
      } catch (err) {
        if (res) discard(res.body);
        res = undefined;
        // Every byte arrived and only the connection's end failed: the digest check decides.
        if (fill.size !== undefined && fill.received === fill.size) return;
        if (!resumable(err, signal) || fill.size === undefined || attempt >= upstream.blobRetries) throw err;
        this.log.warn({ upstream: upstream.name, digest: fill.digest, at: fill.received, of: fill.size, attempt: attempt + 1, err: (err as Error).message }, 'blob download broke; resuming');
        await sleep(Math.min(250 * 2 ** attempt, 5000), undefined, { signal });
      }
    }
  }
}

/**
 * Worth another try: a broken transfer (an early end, a reset, an idle timeout), or the upstream
 * briefly unavailable or rate limiting. Not: wrong content (the fill refuses it), refusals,
 * shutdown or the fill deadline, a full disk.
 */
function resumable(err: unknown, signal: AbortSignal): boolean {
  if (signal.aborted || isStorageError(err)) return false;
  if (err instanceof BodyEndedEarly) return true;
  if (err instanceof OciError) return err.code === 'UNAVAILABLE' || err.code === 'TOOMANYREQUESTS';
  // Anything else came from the transport (undici, the socket): the transfer broke.
  return true;
}

/** What the clients reading a failed fill are told: an upstream or storage failure, never a 500. */
function forClients(target: Target, err: Error): OciError {
  if (err instanceof OciError) return err;
  if (isStorageError(err)) return new OciError('UNAVAILABLE', 'the cache could not store this blob (storage full or failing): a retry streams it through uncached', { cause: err });
  return transportError(target.upstream, err);
}
