/**
 * The cache decisions: what to serve from disk or SQLite, when to ask the upstream, and what to
 * do when it fails. Routes call this; this calls the upstream client, the blob store and the db.
 */
import type { FileHandle } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { LRUCache } from 'lru-cache';
import type { BlobStore, Fill } from './blob-store.js';
import type { Config } from './config.js';
import type { Db, ManifestRecord, TagRecord } from './db.js';
import { DigestGuard } from './digest-guard.js';
import { OciError, isUpstreamUnavailable } from './errors.js';
import { isStorageError, type Lifecycle } from './lifecycle.js';
import { accepts, childrenOf, digestOf, isMediaType, mediaTypeOf } from './manifest.js';
import type { CacheResult, Metrics } from './metrics.js';
import { parseRange, type ByteRange } from './range.js';
import { isDigest, type Target } from './reference.js';
import { SingleFlight } from './single-flight.js';
import type { BlobResponse, UpstreamClient } from './upstream.js';

/** Thrown to every waiter of a fill that could not start because storage is full: each streams through instead. */
class StorageUnavailable extends Error {}

export interface ManifestResult {
  digest: string;
  mediaType: string;
  size: number;
  /** undefined for HEAD answers that never fetched the body */
  body: Buffer | undefined;
  cache: CacheResult;
}

export interface BlobResult {
  size: number | undefined;
  range: ByteRange | undefined;
  /** present for GET of a blob being filled or passed through; the route hands it to the client, which owns it from then on */
  stream: (Readable & { bytesRead: number }) | undefined;
  /** present for GET of a cached blob: bytes [start, end) of an open file; the route owns it and calls `done` once */
  file?: { handle: FileHandle; start: number; end: number; done: () => Promise<void> };
  cache: CacheResult;
}

export interface TagList {
  tags: string[];
  hasNext: boolean;
  cache: CacheResult;
}

/** The slice of pino the registry logs with (Fastify's logger is one). */
export interface Log {
  warn(obj: object, msg: string): void;
}

type TagResult = { manifest: ManifestRecord; cache: CacheResult };

function manifestResult(manifest: ManifestRecord, cache: CacheResult, wantBody: boolean): ManifestResult {
  return { digest: manifest.digest, mediaType: manifest.mediaType, size: manifest.body.length, body: wantBody ? manifest.body : undefined, cache };
}

export class Registry {
  private readonly manifestMemory: LRUCache<string, ManifestRecord>;
  private readonly tagFlights = new SingleFlight<TagResult>();
  private readonly fills = new Map<string, Promise<Fill>>();
  private readonly fillsDone = new Set<Promise<void>>();
  private readonly fillAbort = new AbortController();
  private readonly lastWarned = new Map<string, number>();
  /** Recently used tag rows. SQLite stays the truth; a tag whose manifest was evicted misses in loadManifest and revalidates. */
  private readonly tagMemory = new LRUCache<string, TagRecord>({ max: 100_000 });

  constructor(
    private readonly config: Pick<Config, 'timeouts' | 'cache'>,
    private readonly db: Db,
    private readonly blobs: BlobStore,
    private readonly upstream: UpstreamClient,
    private readonly lifecycle: Lifecycle,
    private readonly metrics: Metrics,
    private readonly log: Log,
  ) {
    this.manifestMemory = new LRUCache({ maxSize: Math.max(1, config.cache.manifestMemory), sizeCalculation: (m) => m.body.length + 200 });
  }

  /** During an outage every request would warn: one line per upstream and message every 30 s (the metrics count them all). */
  private warnOnce(upstream: string, obj: object, msg: string): void {
    const key = `${upstream}\n${msg}`;
    const now = Date.now();
    if ((this.lastWarned.get(key) ?? 0) > now - 30_000) return;
    this.lastWarned.set(key, now);
    this.log.warn(obj, msg);
  }

  /** Eviction dropped these manifests from SQLite: forget them in memory too. */
  forgetManifests(digests: string[]): void {
    for (const d of digests) this.manifestMemory.delete(d);
  }

  // ---- manifests -------------------------------------------------------------------------

  /**
   * A manifest by tag or digest, negotiated against the client's Accept. A hit that needs no
   * upstream (a fresh tag, or a digest this repository is known to hold) is answered without a
   * promise: it is the warm path of every pull (bench figure 2).
   */
  getManifest(target: Target, reference: string, accept: string | undefined, wantBody: boolean): ManifestResult | Promise<ManifestResult> {
    const hit = this.hit(target, reference);
    if (!hit) return this.fetchOrRevalidate(target, reference, isDigest(reference), accept, wantBody);
    return this.negotiate({ manifest: hit, cache: 'hit' }, target, reference, accept, wantBody);
  }

  /** getManifest's answer when it is a hit in a type the client accepts; undefined when it would need the upstream. */
  cachedManifest(target: Target, reference: string, accept: string | undefined, wantBody: boolean): ManifestResult | undefined {
    const hit = this.hit(target, reference);
    return hit && accepts(accept, hit.mediaType) ? manifestResult(hit, 'hit', wantBody) : undefined;
  }

  /** Everything but a hit: the upstream is asked (HEAD for a known digest or a stale tag, GET for new content). */
  private async fetchOrRevalidate(target: Target, reference: string, byDigest: boolean, accept: string | undefined, wantBody: boolean): Promise<ManifestResult> {
    const found = byDigest ? await this.manifestByDigest(target, reference) : await this.manifestByTag(target, reference);
    return this.negotiate(found, target, reference, accept, wantBody);
  }

  /** Never hands a client a type it did not ask for: the upstream then negotiates with its Accept. */
  private negotiate({ manifest, cache }: TagResult, target: Target, reference: string, accept: string | undefined, wantBody: boolean): ManifestResult | Promise<ManifestResult> {
    if (!accepts(accept, manifest.mediaType)) return this.passthrough(target, reference, accept, wantBody);
    return manifestResult(manifest, cache, wantBody);
  }

  /** A manifest served without asking the upstream: a fresh tag, or a digest this repository is known to hold. */
  private hit(target: Target, reference: string): ManifestRecord | undefined {
    return isDigest(reference) ? this.digestHit(target, reference) : this.freshTag(target, reference);
  }

  /** The manifest of a digest cached and known to be in this repository on this upstream. */
  private digestHit(target: Target, digest: string): ManifestRecord | undefined {
    const cached = this.loadManifest(digest);
    return cached && this.db.isSeenIn(target.upstream.name, target.name, digest) ? cached : undefined;
  }

  /** The manifest of a tag checked within the upstream's tagTtl. */
  private freshTag(target: Target, tag: string): ManifestRecord | undefined {
    const row = this.getTag(target, tag);
    const manifest = row && this.loadManifest(row.digest);
    return manifest && Date.now() - row.checkedAt < target.upstream.tagTtl ? manifest : undefined;
  }

  private loadManifest(digest: string): ManifestRecord | undefined {
    let m = this.manifestMemory.get(digest);
    if (!m) {
      m = this.db.getManifest(digest);
      if (!m) return undefined;
      // Stored before mediaTypeOf refused malformed types: never let one reach a header.
      if (!isMediaType(m.mediaType)) m = { ...m, mediaType: mediaTypeOf(m.body, undefined) };
      this.manifestMemory.set(digest, m);
    }
    return m;
  }

  private async manifestByDigest(target: Target, digest: string): Promise<TagResult> {
    const { upstream, name } = target;
    const cached = this.loadManifest(digest);
    if (cached) {
      // Cached for another repository or upstream: the digest proves the bytes, not that this
      // repository holds them. Ask before serving (HEAD is free on Docker Hub).
      await this.upstream.headManifest(target, digest);
      this.db.markSeenIn(upstream.name, name, digest);
      return { manifest: cached, cache: 'revalidated' };
    }
    return { manifest: await this.fetchManifest(target, digest, digest), cache: 'miss' };
  }

  /** GETs a manifest, verifies its bytes against `expected` (or the upstream's digest header), and stores it. */
  private async fetchManifest(target: Target, reference: string, expected: string | undefined, tag?: string, accept?: string): Promise<ManifestRecord> {
    const res = await this.upstream.getManifest(target, reference, accept);
    const claimed = expected ?? (res.digest && isDigest(res.digest) ? res.digest : undefined);
    const digest = digestOf(res.body, claimed?.split(':')[0] ?? 'sha256');
    if (claimed !== undefined && digest !== claimed) {
      throw new OciError('UNKNOWN', `upstream ${target.upstream.name} sent manifest bytes hashing to ${digest} for ${claimed}`, { status: 502 });
    }
    const manifest = { digest, mediaType: mediaTypeOf(res.body, res.contentType), body: res.body };
    const now = Date.now();
    this.db.putManifest(manifest, childrenOf(res.body), target.upstream.name, target.name, tag, now);
    if (tag !== undefined) this.tagMemory.set(tagKey(target, tag), { digest, checkedAt: now });
    this.manifestMemory.set(digest, manifest);
    return manifest;
  }

  /** A tag's row, from memory when recently used: a warm tag lookup never touches SQLite. */
  private getTag(target: Target, tag: string): TagRecord | undefined {
    const key = tagKey(target, tag);
    let row = this.tagMemory.get(key);
    if (!row) {
      row = this.db.getTag(target.upstream.name, target.name, tag);
      if (row) this.tagMemory.set(key, row);
    }
    return row;
  }

  private putTag(target: Target, tag: string, digest: string): void {
    const now = Date.now();
    this.db.putTag(target.upstream.name, target.name, tag, digest, now);
    this.tagMemory.set(tagKey(target, tag), { digest, checkedAt: now });
  }

  private async manifestByTag(target: Target, tag: string): Promise<TagResult> {
    const { upstream } = target;
    const row = this.getTag(target, tag);
    const manifest = row && this.loadManifest(row.digest);
    // Offline by choice: the cached tag is the answer, with no warning per request.
    if (manifest && this.upstream.gate(upstream.name).offline) return { manifest, cache: 'stale' };
    return this.tagFlights.do(tagKey(target, tag), () => this.revalidateTag(target, tag));
  }

  /** HEAD the tag upstream; GET only when the digest is new. Serve stale when the upstream is down. */
  private async revalidateTag(target: Target, tag: string): Promise<TagResult> {
    const { upstream, name } = target;
    const row = this.getTag(target, tag);
    try {
      const head = await this.upstream.headManifest(target, tag);
      const digest = head.digest && isDigest(head.digest) ? head.digest : undefined;
      const known = digest && this.loadManifest(digest);
      if (digest && known) {
        this.putTag(target, tag, digest);
        return { manifest: known, cache: row?.digest === digest ? 'revalidated' : 'miss' };
      }
      // By digest when the HEAD named one (Docker Hub counts either GET as a pull; this one is verifiable).
      return { manifest: await this.fetchManifest(target, digest ?? tag, digest, tag), cache: 'miss' };
    } catch (err) {
      const stale = row && isUpstreamUnavailable(err) ? this.loadManifest(row.digest) : undefined;
      if (stale) {
        this.warnOnce(upstream.name, { upstream: upstream.name, name, reference: tag, digest: stale.digest, err: (err as Error).message }, 'upstream unavailable, serving stale tag');
        return { manifest: stale, cache: 'stale' };
      }
      if (row && err instanceof OciError && err.status === 404) {
        this.db.deleteTag(upstream.name, name, tag);
        this.tagMemory.delete(tagKey(target, tag));
      }
      throw err;
    }
  }

  private async passthrough(target: Target, reference: string, accept: string | undefined, wantBody: boolean): Promise<ManifestResult> {
    if (!wantBody) {
      const head = await this.upstream.headManifest(target, reference, accept);
      if (head.digest && isDigest(head.digest) && head.size !== undefined && head.contentType) {
        return { digest: head.digest, mediaType: mediaTypeOf(Buffer.alloc(0), head.contentType), size: head.size, body: undefined, cache: 'passthrough' };
      }
    }
    const m = await this.fetchManifest(target, reference, isDigest(reference) ? reference : undefined, undefined, accept);
    return manifestResult(m, 'passthrough', wantBody);
  }

  // ---- blobs -----------------------------------------------------------------------------

  /** Size of a blob; a HEAD never downloads one. */
  async headBlob(target: Target, digest: string): Promise<BlobResult> {
    const size = await this.blobs.stat(digest);
    if (size !== undefined) return { size, range: undefined, stream: undefined, cache: 'hit' };
    const head = await this.upstream.headBlob(target, digest);
    return { size: head.size, range: undefined, stream: undefined, cache: 'miss' };
  }

  /** A blob stream from disk, tailing the (shared) fill from upstream, or straight through when storage is full. */
  async getBlob(target: Target, digest: string, rangeHeader: string | undefined): Promise<BlobResult> {
    const opened = await this.openPinned(digest);
    if (opened) return this.fromFile(target, digest, opened, rangeHeader);
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
    const reader = fill.reader(range?.start ?? 0, end);
    const release = this.lifecycle.pin(digest);
    reader.once('close', release);
    return { size: fill.size, range, stream: reader, cache: 'miss' };
  }

  /** Opens a cached blob, pinned first so eviction cannot slip in between the open and the pin. */
  private async openPinned(digest: string): Promise<{ handle: FileHandle; size: number; release: () => void } | undefined> {
    const release = this.lifecycle.pin(digest);
    try {
      const opened = await this.blobs.open(digest);
      if (opened) return { ...opened, release };
    } catch (err) {
      release();
      throw err;
    }
    release();
    return undefined;
  }

  private fromFile(target: Target, digest: string, opened: { handle: FileHandle; size: number; release: () => void }, rangeHeader: string | undefined): BlobResult {
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
    return { size, range, stream: undefined, file: { handle, start: range?.start ?? 0, end: range ? range.end + 1 : size, done }, cache: 'hit' };
  }

  /** Makes sure a blob is in the cache, through the same shared fill as client pulls (prefetch). */
  async ensureBlob(target: Target, digest: string): Promise<{ size: number; result: 'cached' | 'fetched' }> {
    const size = await this.blobs.stat(digest);
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

  /** Storage is full or failing: stream the blob from upstream without caching, still verifying it. */
  private async uncached(target: Target, digest: string): Promise<BlobResult> {
    const res = await this.upstream.getBlob(target, digest, AbortSignal.timeout(this.config.timeouts.fill));
    const guard = new DigestGuard(digest, res.size);
    // The guard owns the upstream body from here: a client that leaves destroys both.
    pipeline(res.body, guard).catch(() => undefined);
    this.metrics.uncachedBlobs.inc({ upstream: target.upstream.name });
    return { size: res.size, range: undefined, stream: guard, cache: 'passthrough' };
  }

  private async fillFor(target: Target, digest: string): Promise<Fill> {
    // Keyed by upstream too: a 404 from one upstream must not answer a request meant for another.
    const key = `${target.upstream.name}\n${digest}`;
    let fill = this.fills.get(key);
    if (!fill) {
      fill = this.startFill(target, digest);
      this.fills.set(key, fill);
      fill.catch(() => this.fills.delete(key));
    }
    return fill;
  }

  private async startFill(target: Target, digest: string): Promise<Fill> {
    const upstream = target.upstream.name;
    const signal = AbortSignal.any([this.fillAbort.signal, AbortSignal.timeout(this.config.timeouts.fill)]);
    const res = await this.upstream.getBlob(target, digest, signal);
    let fill: Fill;
    try {
      if (!(await this.lifecycle.canCache(res.size))) throw new StorageUnavailable();
      fill = await this.blobs.createFill(digest, res.size);
    } catch (err) {
      res.body.destroy();
      if (isStorageError(err)) this.lifecycle.storageFailed(err as Error);
      if (err instanceof StorageUnavailable || isStorageError(err)) throw new StorageUnavailable();
      throw err;
    }
    this.metrics.fillsInFlight.inc();
    const release = this.lifecycle.pin(digest);
    const done = this.download(target, fill, res, signal)
      .then(() => fill.commit())
      .then(
        (size) => {
          this.lifecycle.added(digest, size, upstream);
          this.metrics.upstreamBytes.inc({ upstream }, size);
        },
        async (err: Error) => {
          if (isStorageError(err)) this.lifecycle.storageFailed(err);
          this.metrics.fillFailures.inc({ upstream, reason: err instanceof OciError ? 'invalid' : isStorageError(err) ? 'storage' : 'transport' });
          this.log.warn({ upstream, digest, bytes: fill.received, err: err.message }, 'blob fill failed; nothing cached');
          await fill.fail(err);
        },
      )
      .finally(() => {
        release();
        this.metrics.fillsInFlight.dec();
        this.fills.delete(`${upstream}\n${digest}`);
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
            res.body.destroy();
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
        throw Object.assign(new Error(`upstream body ended after ${fill.received} of ${fill.size} bytes`), { code: 'UND_ERR_RES_CONTENT_LENGTH_MISMATCH' });
      } catch (err) {
        res?.body.destroy();
        res = undefined;
        // Every byte arrived and only the connection's end failed: the digest check decides.
        if (fill.size !== undefined && fill.received === fill.size) return;
        if (!resumable(err, signal) || fill.size === undefined || attempt >= upstream.blobRetries) throw err;
        this.log.warn({ upstream: upstream.name, digest: fill.digest, at: fill.received, of: fill.size, attempt: attempt + 1, err: (err as Error).message }, 'blob download broke; resuming');
        await sleep(Math.min(250 * 2 ** attempt, 5000), undefined, { signal });
      }
    }
  }

  /** Lets running fills finish for up to `graceMs`, then aborts the rest (their temp files are removed). */
  async close(graceMs: number): Promise<void> {
    const all = Promise.allSettled([...this.fillsDone]);
    const timer = setTimeout(() => this.fillAbort.abort(new Error('shutting down')), graceMs);
    await all;
    clearTimeout(timer);
  }

  // ---- tags and referrers ----------------------------------------------------------------

  /** The upstream's tag list; from the tags this cache knows when the upstream is unreachable. */
  async listTags(target: Target, n: number | undefined, last: string | undefined): Promise<TagList> {
    const query = new URLSearchParams();
    if (n !== undefined) query.set('n', String(n));
    if (last !== undefined) query.set('last', last);
    try {
      const res = await this.upstream.listTags(target, query);
      let tags: unknown;
      try {
        tags = (JSON.parse(res.body.toString('utf8')) as { tags?: unknown }).tags ?? [];
      } catch {
        throw new OciError('UNKNOWN', `upstream ${target.upstream.name} sent an invalid tag list`, { status: 502 });
      }
      if (!Array.isArray(tags) || !tags.every((t) => typeof t === 'string')) {
        throw new OciError('UNKNOWN', `upstream ${target.upstream.name} sent an invalid tag list`, { status: 502 });
      }
      if (res.hasNext) return { tags: [...(tags as string[])].sort(), hasNext: true, cache: 'passthrough' };
      // A last or only page; or an upstream that ignores n and last (distribution 2.8 does, and does not sort).
      return { ...paginate(tags as string[], n, last), cache: 'passthrough' };
    } catch (err) {
      if (!isUpstreamUnavailable(err)) throw err;
      const known = this.db.listTags(target.upstream.name, target.name);
      if (known.length === 0) throw err;
      this.warnOnce(target.upstream.name, { upstream: target.upstream.name, name: target.name, err: (err as Error).message }, 'upstream unavailable, listing cached tags');
      return { ...paginate(known, n, last), cache: 'stale' };
    }
  }

  async getReferrers(target: Target, digest: string, artifactType: string | undefined): Promise<{ body: Buffer; contentType: string; filtersApplied: string | undefined }> {
    const query = new URLSearchParams();
    if (artifactType !== undefined) query.set('artifactType', artifactType);
    const res = await this.upstream.getReferrers(target, digest, query);
    return { body: res.body, contentType: res.contentType ?? 'application/vnd.oci.image.index.v1+json', filtersApplied: res.filtersApplied };
  }
}

/**
 * Worth another try: a broken transfer, or the upstream briefly unavailable or rate limiting.
 * Not: wrong content (the fill refuses it), refusals, shutdown or the fill deadline, a full disk.
 */
function resumable(err: unknown, signal: AbortSignal): boolean {
  if (signal.aborted || isStorageError(err)) return false;
  if (err instanceof OciError) return err.code === 'UNAVAILABLE' || err.code === 'TOOMANYREQUESTS';
  return true;
}

function tagKey(target: Target, tag: string): string {
  return `${target.upstream.name}\n${target.name}\n${tag}`;
}

/** Drops the first `n` bytes of a stream (a 200 answer to a resume repeats what the fill already has). */
function skipBytes(n: number): (source: AsyncIterable<Buffer>) => AsyncGenerator<Buffer> {
  return async function* (source) {
    let left = n;
    for await (const chunk of source) {
      if (left >= chunk.length) {
        left -= chunk.length;
        continue;
      }
      yield left > 0 ? chunk.subarray(left) : chunk;
      left = 0;
    }
  };
}

/** One page of a tag list: lexically sorted, after `last`, at most `n` (spec: "Listing Tags"). */
function paginate(all: string[], n: number | undefined, last: string | undefined): { tags: string[]; hasNext: boolean } {
  const after = [...all].sort().filter((t) => last === undefined || t > last);
  const tags = n === undefined ? after : after.slice(0, n);
  return { tags, hasNext: tags.length < after.length };
}
