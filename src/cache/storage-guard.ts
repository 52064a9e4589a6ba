/**
 * Whether storage can take more right now, and what to do when it cannot. A full or failing disk
 * (ENOSPC, EROFS, EIO, SQLITE_FULL, ...) never ends the process: new blobs stream through
 * uncached, manifests are served without being stored, access times wait in memory, and caching
 * resumes by itself as soon as space returns.
 *
 * - Room: a fill reserves its announced size until it ends, so concurrent fills cannot together
 *   overrun storage.minFree (each checked alone would).
 * - The index's reserve: a small file kept under the storage root. When something else fills the
 *   filesystem, SQLite's next write fails; the reserve is then deleted and the write tried once
 *   more, so access times and evictions (which free space) still reach the index. It is made
 *   again once space returns.
 */
import type { Clock } from '../core/clock.js';
import type { Config } from '../core/config.js';
import type { Logger } from '../core/logger.js';
import { isStorageError, type BlobStore } from '../storage/blob-store.js';
import type { Metrics } from '../telemetry/metrics.js';

/** How long caching stays off after a storage error before it is tried again. */
const RETRY_STORAGE_MS = 30_000;
/** Size of the index's reserve file: room for many transactions of SQLite's write-ahead log. */
export const INDEX_RESERVE_BYTES = 4 * 1024 * 1024;

/** Space a fill in flight may still need: its announced size less what it has written. */
export interface Room {
  /** Bytes of the room already on disk (the fill's `written`); set once the fill exists. */
  written: () => number;
  release(): void;
}

export class StorageGuard {
  /** Until when caching is off after a storage write error (0: not blocked). */
  private downUntil = 0;
  /** Caching is off (low space or a write error); logged once per episode. */
  private down = false;
  private readonly rooms = new Set<{ size: number; room: Room }>();
  private reserveHeld = false;

  constructor(
    private readonly config: Pick<Config, 'storage'>,
    private readonly store: BlobStore,
    private readonly metrics: Metrics,
    private readonly log: Logger,
    private readonly now: Clock,
    /** Called when free space runs low, so eviction can make room. */
    private readonly onLowSpace: () => void = () => undefined,
  ) {}

  /** Makes the index's reserve file when there is room for it; never throws. */
  async holdReserve(): Promise<void> {
    if (this.reserveHeld) return;
    try {
      await this.store.writeReserve(INDEX_RESERVE_BYTES);
      this.reserveHeld = true;
    } catch (err) {
      if (!isStorageError(err)) this.log.warn({ err: (err as Error).message }, 'could not write the index reserve file');
    }
  }

  /**
   * Room for a new blob of `size` bytes (undefined: unknown), counted against free space until
   * released; undefined while storage is failing or too full: the blob then streams through
   * uncached. Free space is checked on every fill (statfs is cheap), so caching resumes as soon
   * as space returns.
   */
  async reserve(size: number | undefined): Promise<Room | undefined> {
    if (this.now() < this.downUntil) return undefined;
    let free: number;
    try {
      free = await this.store.freeBytes();
    } catch (err) {
      this.failed(err as Error);
      return undefined;
    }
    // From here to the end nothing awaits: the check and the reservation are one step.
    const need = (size ?? 0) + this.config.storage.minFree + this.outstanding();
    if (free < need) {
      this.degraded(Object.assign(new Error(`${free} bytes free on the cache filesystem, below storage.minFree plus the blobs being written`), { code: 'ENOSPC' }));
      this.onLowSpace();
      return undefined;
    }
    if (this.down) {
      this.down = false;
      this.downUntil = 0;
      this.metrics.storageWritable.set(1);
      this.log.info({ free }, 'storage writable again: caching resumed');
      void this.holdReserve();
    }
    const entry: { size: number; room: Room } = { size: size ?? 0, room: { written: () => 0, release: () => undefined } };
    entry.room.release = () => void this.rooms.delete(entry);
    this.rooms.add(entry);
    return entry.room;
  }

  /** Whether the filesystem still has storage.minFree free; downloads under way check it as they grow. */
  async enoughRoom(): Promise<boolean> {
    try {
      return (await this.store.freeBytes()) >= this.config.storage.minFree;
    } catch {
      // statfs failing says nothing about the fill's own writes: those fail on their own.
      return true;
    }
  }

  private outstanding(): number {
    let bytes = 0;
    for (const { size, room } of this.rooms) bytes += Math.max(0, size - room.written());
    return bytes;
  }

  /**
   * Runs an index write; true when it was made. A storage error releases the index's reserve and
   * tries once more; if it still fails, caching is turned off for a while and false is returned:
   * the caller goes on without the write. Other errors are thrown.
   */
  write(what: string, fn: () => unknown): boolean {
    try {
      fn();
      return true;
    } catch (err) {
      if (!isStorageError(err)) throw err;
      if (this.reserveHeld) {
        this.reserveHeld = false;
        this.store.dropReserve();
        try {
          fn();
          return true;
        } catch (again) {
          if (!isStorageError(again)) throw again;
          err = again;
        }
      }
      if (!this.down) this.log.warn({ err: (err as Error).message, code: (err as NodeJS.ErrnoException).code, what }, 'index write failed: storage full or unwritable');
      this.failed(err as Error);
      return false;
    }
  }

  /** A write failed with ENOSPC, EROFS and the like: stop caching for a while; pulls go on uncached. */
  failed(err: Error): void {
    this.downUntil = this.now() + RETRY_STORAGE_MS;
    this.degraded(err);
  }

  private degraded(err: Error): void {
    this.metrics.storageErrors.inc({ code: (err as NodeJS.ErrnoException).code ?? 'unknown' });
    if (this.down) return;
    this.down = true;
    this.metrics.storageWritable.set(0);
    this.log.warn({ err: err.message, code: (err as NodeJS.ErrnoException).code }, 'storage full or unwritable: serving blobs without caching them');
  }
}
