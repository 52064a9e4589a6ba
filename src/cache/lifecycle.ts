/**
 * Bounded disk: tracks blob use without a SQLite write per request, keeps the blobs on disk under
 * storage.maxSize with high/low watermarks, and expires blobs by age per upstream. Index writes go
 * through the StorageGuard: on a full disk they wait in memory instead of failing a request.
 *
 * Eviction is least-recently-used and reference-aware: Db.dropBlob removes the manifests that point
 * to a blob in the same transaction as the blob's row, before the file is unlinked. A blob that a
 * client is reading or a fill is writing is pinned and skipped; a reader that opened a file before
 * it was unlinked still reads it to the end.
 */
import { rm, stat } from 'node:fs/promises';
import type { Clock } from '../core/clock.js';
import type { Config } from '../core/config.js';
import { isDigest, splitDigest } from '../core/digest.js';
import type { Logger } from '../core/logger.js';
import { digestOfFile, type BlobStore } from '../storage/blob-store.js';
import type { BlobAccess, BlobRow, Db, Dropped } from '../storage/db.js';
import type { Metrics } from '../telemetry/metrics.js';
import { describe, type Bucket } from '../storage/bucket.js';
import { StorageGuard } from './storage-guard.js';

export type EvictionReason = 'size' | 'age' | 'gc';

export interface PassResult {
  blobs: number;
  bytes: number;
  manifests: number;
  tags: number;
  /** bytes of blobs after the pass */
  used: number;
  /** index rows pointing at nothing, deleted (gc passes only) */
  danglingRows: number;
}

/** How often batched access times reach SQLite. A crash loses at most this much LRU precision. */
const FLUSH_MS = 5_000;
/** How often expiry by age runs (when any upstream has a maxAge). */
const EXPIRY_MS = 10 * 60_000;
/** Referrers whose config and layers add up to more are not kept with their subject: signatures and SBOMs are small. */
const REFERRER_MAX_BYTES = 16 * 1024 * 1024;
/** What one pass spares for referrers' subjects: a share of storage.maxSize, at least the minimum. */
const SUBJECT_CAP_SHARE = 0.05;
const SUBJECT_CAP_MIN = 64 * 1024 * 1024;

export class Lifecycle {
  private pending = new Map<string, BlobAccess>();
  private readonly pins = new Map<string, number>();
  private used = 0;
  private running: Promise<PassResult> | undefined;
  private timers: NodeJS.Timeout[] = [];
  private lastSoon = 0;
  /** For the pass running: blobs of referrers with when their subject was last used, and the bytes spared for that so far. */
  private inherited = new Map<string, number>();
  private sparedForSubjects = 0;
  private rerun = false;
  private soonTimer: NodeJS.Timeout | undefined;
  /** Settles once start() has indexed the blob files a crash left without a row. */
  orphansAdopted: Promise<number> = Promise.resolve(0);
  /** Whether storage can take more; every index write of the cache goes through it. */
  readonly guard: StorageGuard;
  /** Blobs in place whose index row a storage error held back: written by the next flush. */
  private closed = false;
  private readonly unindexed = new Map<string, { size: number; upstream: string; name: string; at: number }>();

  constructor(
    private readonly config: Pick<Config, 'storage' | 'upstreams'>,
    private readonly db: Db,
    private readonly store: BlobStore,
    private readonly metrics: Metrics,
    private readonly log: Logger,
    private readonly now: Clock,
    /** storage.backend s3: blobs are deleted from the bucket too, when storage.s3.evict says this cache may. */
    private readonly bucket?: Bucket,
  ) {
    // Low on space: a size pass may make room.
    this.guard = new StorageGuard(config, store, metrics, log, now, () => {
      if (config.storage.maxSize !== undefined) void this.pass('size').catch(() => undefined);
    });
    this.used = db.usage().bytes;
    this.report();
  }

  /**
   * Starts the background flush and expiry timers, holds the index's reserve, and adopts orphaned
   * blob files in the background; the server calls this, one-shot commands don't.
   */
  start(): void {
    void this.guard.holdReserve();
    this.orphansAdopted = this.adoptOrphans().catch((err: Error) => {
      this.log.warn({ err: err.message }, 'adopting blob files without an index row failed');
      return 0;
    });
    this.timers.push(
      setInterval(() => {
        try {
          this.flush();
        } catch (err) {
          this.log.warn({ err: (err as Error).message }, 'writing access times failed');
        }
      }, FLUSH_MS).unref(),
    );
    if (this.config.upstreams.some((u) => u.maxAge !== undefined)) {
      this.timers.push(setInterval(() => void this.pass('age').catch((err: Error) => this.log.warn({ err: err.message }, 'expiry pass failed')), EXPIRY_MS).unref());
    }
    this.schedule();
  }

  get usedBytes(): number {
    return this.used;
  }

  /**
   * A blob was served from the cache: remember when, in memory only. A use recorded just as the
   * blob was evicted is harmless: the flush only updates rows that exist (Db.touchBlobs).
   */
  touch(digest: string, size: number, upstream: string, at = this.now()): void {
    this.pending.set(`${digest}\n${upstream}`, { digest, size, upstream, at });
  }

  /** A verified blob fetched from (upstream, name) entered the cache (its file is in place). */
  added(digest: string, size: number, upstream: string, name: string): void {
    this.unindexed.set(digest, { size, upstream, name, at: this.now() });
    this.indexAdded();
    this.report();
    this.schedule();
  }

  /** Index rows of blobs in place; what a storage error holds back stays queued (the file is served meanwhile). */
  private indexAdded(): void {
    for (const [digest, { size, upstream, name, at }] of this.unindexed) {
      const known = this.db.hasBlob(digest);
      if (!this.guard.write('blob row', () => this.db.putBlob(digest, size, upstream, name, at))) return;
      this.unindexed.delete(digest);
      if (!known) this.used += size;
    }
  }

  /**
   * Indexes verified blob files that have no row: a crash between a fill's rename and its index
   * write leaves them, served but outside maxSize. Only a fill puts files under blobs/, so one that
   * does not hash to its name was damaged since, and is deleted. Returns how many were adopted.
   */
  async adoptOrphans(): Promise<number> {
    let adopted = 0;
    // Looked up again right before each write: a fill or an eviction may have got there meanwhile.
    const orphan = (digest: string): boolean => !this.db.hasBlob(digest) && !this.pins.has(digest) && !this.store.isRemoving(digest);
    for await (const file of this.store.files()) {
      if (this.closed) break;
      if (!file.canonical || !isDigest(file.digest) || !orphan(file.digest)) continue;
      const actual = await digestOfFile(file.path, splitDigest(file.digest).algorithm).catch(() => undefined);
      const st = await stat(file.path).catch(() => undefined);
      if (!actual || !st || !orphan(file.digest)) continue;
      if (actual !== file.digest) {
        this.log.warn({ digest: file.digest, actual }, 'deleted a blob file that does not hash to its name');
        await rm(file.path, { force: true });
        continue;
      }
      if (!this.guard.write('adopted blob', () => this.db.adoptBlob(file.digest, st.size, Math.round(st.mtimeMs)))) break;
      this.used += st.size;
      adopted++;
    }
    if (adopted > 0) {
      this.log.info({ adopted }, 'indexed blob files that a crash left without an index row');
      this.report();
      this.schedule();
    }
    return adopted;
  }

  /** A blob the index holds is gone from storage (the bucket lost it): its row and the manifests that need it go. */
  lost(digest: string): void {
    const size = this.db.blobSize(digest);
    if (size === undefined) return;
    if (!this.guard.write('lost blob', () => this.db.dropBlob(digest))) return;
    this.used -= size;
    this.report();
  }

  /** Keeps a blob from eviction until the returned function is called. */
  pin(digest: string): () => void {
    this.pins.set(digest, (this.pins.get(digest) ?? 0) + 1);
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const n = (this.pins.get(digest) ?? 1) - 1;
      if (n > 0) return void this.pins.set(digest, n);
      this.pins.delete(digest);
      // A pass may have skipped this blob while it was pinned: look again.
      if (this.overHigh()) this.scheduleSoon();
    };
  }

  /** Runs schedule() soon, at most once a second, for pin releases and passes that need a rerun. */
  private scheduleSoon(): void {
    if (this.soonTimer) return;
    this.soonTimer = setTimeout(() => {
      this.soonTimer = undefined;
      this.schedule();
    }, Math.max(0, this.lastSoon + 1000 - Date.now())).unref();
    this.lastSoon = Date.now();
  }

  /**
   * Writes batched access times, and the rows of blobs not indexed yet, to SQLite. On a storage
   * error they stay queued for the next flush.
   */
  flush(): void {
    if (this.unindexed.size > 0) this.indexAdded();
    if (this.pending.size === 0) return;
    const batch = this.pending;
    this.pending = new Map();
    if (this.guard.write('access times', () => this.db.touchBlobs(batch.values()))) return;
    for (const [key, access] of batch) if (!this.pending.has(key)) this.pending.set(key, access);
  }

  /** Starts a size pass when usage is above the high watermark (one at a time). */
  private overHigh(): boolean {
    const max = this.config.storage.maxSize;
    return max !== undefined && this.used > (max * this.config.storage.highWatermark) / 100;
  }

  private schedule(): void {
    if (!this.overHigh()) return;
    if (this.running) {
      // Something changed during the pass (a blob added, one unpinned): look again after it.
      this.rerun = true;
      return;
    }
    void this.pass('size').catch((err: Error) => this.log.warn({ err: err.message }, 'eviction pass failed'));
  }

  /**
   * One pass: expire by age, then evict least recently used blobs down to the low watermark when
   * above the high one ('gc' evicts whenever above the low one, and prunes dangling index rows).
   * Passes never overlap.
   */
  pass(reason: EvictionReason): Promise<PassResult> {
    // An explicit gc must not be answered by a size pass that stops at the high watermark.
    if (this.running && reason === 'gc') return this.running.catch(() => undefined).then(() => this.pass('gc'));
    this.running ??= this.runPass(reason).finally(() => {
      this.running = undefined;
      if (this.rerun) {
        this.rerun = false;
        this.scheduleSoon();
      }
    });
    return this.running;
  }

  private async runPass(reason: EvictionReason): Promise<PassResult> {
    this.flush();
    this.inherited = this.db.subjects.any() ? this.db.subjects.inheritedAccess(REFERRER_MAX_BYTES) : new Map();
    this.sparedForSubjects = 0;
    const result: PassResult = { blobs: 0, bytes: 0, manifests: 0, tags: 0, used: 0, danglingRows: 0 };
    this.used = this.db.usage().bytes;
    const now = this.now();
    const cutoffs: Record<string, number> = {};
    for (const u of this.config.upstreams) if (u.maxAge !== undefined) cutoffs[u.name] = now - u.maxAge;
    if (Object.keys(cutoffs).length > 0) {
      await this.evict(this.db.expiredBlobs(cutoffs, Number.MIN_SAFE_INTEGER), reason === 'gc' ? 'gc' : 'age', result);
    }
    const max = this.config.storage.maxSize;
    if (max !== undefined) {
      const high = (max * this.config.storage.highWatermark) / 100;
      const low = (max * this.config.storage.lowWatermark) / 100;
      if (this.used > high || (reason === 'gc' && this.used > low)) {
        await this.evict(this.lruUntil(this.used - low), reason === 'gc' ? 'gc' : 'size', result);
      }
    }
    if (reason === 'gc') this.guard.write('dangling rows', () => (result.danglingRows = this.db.pruneDangling()));
    result.used = this.used;
    if (result.blobs > 0) this.log.info({ reason, ...result }, 'evicted blobs');
    return result;
  }

  /**
   * Not evicted now: pinned (being read or filled); kept (the keep list's images are never evicted
   * or expired); or a referrer's blob whose subject was used since it was (it is as recent as its
   * subject, storage/subjects.ts: its access time moves up to the subject's, and a later look finds
   * it in its new place in the line), within the pass's cap on bytes spared that way.
   */
  private spared(row: BlobRow): boolean {
    if (this.pins.has(row.digest) || this.db.protectsKept(row.digest)) return true;
    const at = this.inherited.get(row.digest);
    if (at === undefined || at <= row.lastAccess || this.sparedForSubjects + row.size > this.subjectCap()) return false;
    this.sparedForSubjects += row.size;
    this.db.subjects.touch(row.digest, at);
    this.inherited.delete(row.digest);
    return true;
  }

  /** The most bytes one pass spares for referrers' subjects: what clients can make the cache fetch must not crowd out the rest. */
  private subjectCap(): number {
    const max = this.config.storage.maxSize;
    return max === undefined ? SUBJECT_CAP_MIN : Math.max(SUBJECT_CAP_MIN, max * SUBJECT_CAP_SHARE);
  }

  /** Least recently used blobs not spared, adding up to at least `bytes`. */
  private lruUntil(bytes: number): BlobRow[] {
    const out: BlobRow[] = [];
    let total = 0;
    for (let limit = 1024; total < bytes; limit *= 4) {
      out.length = 0;
      total = 0;
      const rows = this.db.oldestBlobs(limit);
      for (const row of rows) {
        if (this.spared(row)) continue;
        out.push(row);
        total += row.size;
        if (total >= bytes) break;
      }
      if (rows.length < limit) break;
    }
    return out;
  }

  private async evict(rows: BlobRow[], reason: EvictionReason, result: PassResult): Promise<void> {
    for (const row of rows) {
      if (this.spared(row)) continue;
      // Rows first, in one transaction with the manifests that point to the blob; then the file.
      // A crash in between leaves a verified file without a row, which is adopted or swept later.
      let dropped: Dropped = { manifests: [], tags: 0 };
      if (!this.guard.write('eviction', () => (dropped = this.db.dropBlob(row.digest)))) break;
      this.used -= row.size;
      try {
        await this.store.remove(row.digest);
      } catch (err) {
        // The index no longer names it; `ocicache verify` adopts or deletes the file later.
        this.log.warn({ digest: row.digest, err: (err as Error).message }, 'could not delete an evicted blob file');
      }
      if (this.bucket?.config.evict) {
        try {
          await this.bucket.remove(row.digest);
          this.metrics.bucketRequests.inc({ op: 'delete', result: 'ok' });
        } catch (err) {
          // Left in the bucket: a lifecycle rule, or adoption by the next replica that needs it, takes care of it.
          this.metrics.bucketRequests.inc({ op: 'delete', result: 'error' });
          this.log.warn({ digest: row.digest, err: describe(err) }, 'could not delete an evicted blob from the bucket');
        }
      }
      result.blobs++;
      result.bytes += row.size;
      result.manifests += dropped.manifests.length;
      result.tags += dropped.tags;
      this.metrics.evictions.inc({ reason });
      this.metrics.evictedBytes.inc({ reason }, row.size);
    }
    this.report();
  }

  private report(): void {
    this.metrics.diskUsed.set(this.used);
    this.metrics.diskLimit.set(this.config.storage.maxSize ?? 0);
  }

  /** Flushes access times and stops the timers and the adoption of orphans; waits for a running pass. */
  async close(): Promise<void> {
    this.closed = true;
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    clearTimeout(this.soonTimer);
    await this.running?.catch(() => undefined);
    this.flush();
  }
}
