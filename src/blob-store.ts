/**
 * Content-addressed blob files. Layout under the storage root:
 *
 *   blobs/<algorithm>/<hex[0:2]>/<hex>   complete blobs, verified against their name, read-only
 *   tmp/<random>                         fills in progress; whatever is here at start-up was left
 *                                        by a crash and is deleted
 *   index.db                             the SQLite index (db.ts)
 *
 * A fill writes the upstream body into a temp file while hashing it; readers tail that growing
 * file, so one upstream GET serves every concurrent client and a client that leaves never stops
 * the fill (distribution learned this in commit e0bac4837). Only after the digest and size check
 * is the file fsync'd and renamed into place: nothing partial or wrong is ever under blobs/.
 */
import { createHash, randomBytes, type Hash } from 'node:crypto';
import { EventEmitter } from 'node:events';
import { mkdir, open, readdir, rename, rm, stat, statfs, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { OciError } from './errors.js';
import { checkDigest } from './reference.js';

const READ_CHUNK = 256 * 1024;
/** How far disk writes may lag behind the network per fill before the upstream is paused (memory bound). */
const WRITE_WINDOW = 4 * 1024 * 1024;
/**
 * Bytes already on disk a fill keeps in memory for readers a little behind the network. Without
 * it, a reader that fell behind the disk writer re-read every chunk from the temp file: a second
 * copy, a buffer and a thread-pool round trip per 256 KiB (bench figures 3 and 4).
 */
const RETAIN_WINDOW = 16 * 1024 * 1024;

export class BlobStore {
  readonly blobsDir: string;
  readonly tmpDir: string;
  /** Unlinks in progress: a fill of the same digest must not rename into place before one ends. */
  private readonly removing = new Map<string, Promise<void>>();

  constructor(readonly root: string) {
    this.blobsDir = join(root, 'blobs');
    this.tmpDir = join(root, 'tmp');
  }

  /** Creates the layout and (with `sweep`) removes temp files a crash left behind. */
  async init(sweep = true): Promise<number> {
    await mkdir(this.blobsDir, { recursive: true });
    await mkdir(this.tmpDir, { recursive: true });
    if (!sweep) return 0;
    const leftovers = await readdir(this.tmpDir);
    await Promise.all(leftovers.map((f) => rm(join(this.tmpDir, f), { force: true, recursive: true })));
    return leftovers.length;
  }

  /** Path of a blob. Refuses anything but a canonical digest: a name must never leave blobs/. */
  path(digest: string): string {
    checkDigest(digest);
    const [algorithm, hex] = digest.split(':') as [string, string];
    return join(this.blobsDir, algorithm, hex.slice(0, 2), hex);
  }

  async stat(digest: string): Promise<number | undefined> {
    try {
      return (await stat(this.path(digest))).size;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
  }

  /** Opens a cached blob; the handle is the caller's to stream or close. */
  async open(digest: string): Promise<{ handle: FileHandle; size: number } | undefined> {
    let handle: FileHandle;
    try {
      handle = await open(this.path(digest), 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw err;
    }
    try {
      return { handle, size: (await handle.stat()).size };
    } catch (err) {
      await handle.close();
      throw err;
    }
  }

  async createFill(digest: string, size: number | undefined): Promise<Fill> {
    const tmpPath = join(this.tmpDir, `${digest.replace(':', '-')}.${randomBytes(6).toString('hex')}`);
    const handle = await open(tmpPath, 'w+', 0o644);
    return new Fill(digest, size, tmpPath, this.path(digest), handle, () => this.removing.get(digest));
  }

  /**
   * Deletes a blob file. Readers that already opened it keep reading (POSIX unlink semantics), so
   * eviction never cuts off a running download.
   */
  async remove(digest: string): Promise<void> {
    const p = unlink(this.path(digest)).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
    const tracked = p.finally(() => {
      if (this.removing.get(digest) === tracked) this.removing.delete(digest);
    });
    this.removing.set(digest, tracked);
    return tracked;
  }

  /** Bytes free for this (non-root) process on the cache's filesystem. */
  async freeBytes(): Promise<number> {
    const s = await statfs(this.root);
    return s.bavail * s.bsize;
  }

  /** Every file under blobs/ with the digest its name claims; `canonical` when it sits where path(digest) says. */
  async *files(): AsyncGenerator<{ digest: string; path: string; canonical: boolean }> {
    for (const algorithm of await readdir(this.blobsDir).catch(() => [] as string[])) {
      const algDir = join(this.blobsDir, algorithm);
      for (const prefix of await readdir(algDir).catch(() => [] as string[])) {
        for (const hex of await readdir(join(algDir, prefix)).catch(() => [] as string[])) {
          yield { digest: `${algorithm}:${hex}`, path: join(algDir, prefix, hex), canonical: hex.slice(0, 2) === prefix };
        }
      }
    }
  }
}

/** filling → verified (digest and size checked: the last byte may go out) → committed (renamed into place), or failed. */
type FillState = 'filling' | 'verified' | 'committed' | 'failed';

/**
 * One blob being written from upstream. Emits 'progress' whenever `written` grows or the state
 * changes. Owned by the registry; clients only ever hold a reader.
 */
export class Fill extends EventEmitter {
  /** Bytes on disk in the temp file. */
  written = 0;
  /** Bytes received and hashed, in order: on disk, or still in `chunks` past `written`. */
  received = 0;
  /** Received chunks from offset `memStart` on: the tail not yet written, and up to RETAIN_WINDOW before it. */
  private chunks: Buffer[] = [];
  /** Offset of each chunk in `chunks`, for lookups by position. */
  private offsets: number[] = [];
  private memStart = 0;
  /** Index in `chunks` of the first chunk not yet handed to the writer loop. */
  private unwritten = 0;
  private pendingBytes = 0;
  /** Readers' positions, so retained chunks go only once every reader has passed them. */
  private readonly readers = new Set<TailReader>();
  private writing: Promise<void> | undefined;
  private writeError: Error | undefined;
  private windowWaiters: Array<(err?: Error | null) => void> = [];
  state: FillState = 'filling';
  error: Error | undefined;
  private readonly hash: Hash;

  constructor(
    readonly digest: string,
    /** from the upstream's Content-Length; undefined when it sent none */
    readonly size: number | undefined,
    readonly tmpPath: string,
    readonly finalPath: string,
    private handle: FileHandle | undefined,
    private readonly removal: () => Promise<void> | undefined = () => undefined,
  ) {
    super();
    this.setMaxListeners(0);
    this.hash = createHash(digest.split(':')[0]!);
  }

  /**
   * The sink to pipe the upstream body into. Each chunk is hashed and handed to readers from
   * memory at once; a writer loop puts it on disk behind them. Readers are never held up by the
   * disk unless it falls more than WRITE_WINDOW behind the network (then the upstream is paused).
   */
  sink(): Writable {
    return new Writable({
      highWaterMark: 1024 * 1024,
      write: (chunk: Buffer, _enc, cb) => {
        if (this.writeError) return cb(this.writeError);
        if (this.state !== 'filling') return cb(new Error('fill is closed'));
        if (this.size !== undefined && this.received + chunk.length > this.size) {
          return cb(new OciError('UNKNOWN', `upstream sent more than the ${this.size} bytes it announced`, { status: 502 }));
        }
        this.hash.update(chunk);
        this.chunks.push(chunk);
        this.offsets.push(this.received);
        this.pendingBytes += chunk.length;
        this.received += chunk.length;
        this.emit('progress');
        this.pumpWrites();
        if (this.pendingBytes < WRITE_WINDOW) return cb();
        this.windowWaiters.push(cb);
      },
      final: (cb) => {
        this.flushed().then(() => cb(), cb);
      },
    });
  }

  /** Writes pending chunks in order, one positional writev at a time. */
  private pumpWrites(): void {
    if (this.writing || this.unwritten >= this.chunks.length) return;
    this.writing = (async () => {
      try {
        while (this.unwritten < this.chunks.length) {
          if (!this.handle) throw new Error('fill is closed');
          const batch = this.chunks.slice(this.unwritten, this.unwritten + 64);
          let total = 0;
          for (const b of batch) total += b.length;
          const { bytesWritten } = await this.handle.writev(batch, this.written);
          // A short write to a regular file means the filesystem is full.
          if (bytesWritten !== total) throw Object.assign(new Error(`short write to ${this.tmpPath}: ${bytesWritten} of ${total} bytes`), { code: 'ENOSPC' });
          if (this.state === 'failed') return;
          this.unwritten += batch.length;
          this.pendingBytes -= total;
          this.written += total;
          this.trim();
          if (this.pendingBytes < WRITE_WINDOW) this.releaseWindow();
        }
      } catch (err) {
        this.writeError = err as Error;
        this.releaseWindow();
      } finally {
        this.writing = undefined;
      }
    })();
  }

  private releaseWindow(): void {
    const waiters = this.windowWaiters;
    this.windowWaiters = [];
    for (const cb of waiters) cb(this.writeError);
  }

  /** Resolves when everything received is on disk. */
  private async flushed(): Promise<void> {
    for (;;) {
      this.pumpWrites();
      if (!this.writing) break;
      await this.writing;
    }
    if (this.writeError) throw this.writeError;
  }

  /** Up to `max` received bytes at `pos` that are still in memory, or undefined (not received yet, or only on disk). */
  fromMemory(pos: number, max: number): Buffer | undefined {
    if (pos < this.memStart || pos >= this.received) return undefined;
    // The last chunk starting at or before pos.
    let lo = 0;
    let hi = this.offsets.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.offsets[mid]! <= pos) lo = mid;
      else hi = mid - 1;
    }
    const b = this.chunks[lo]!;
    const from = pos - this.offsets[lo]!;
    return b.subarray(from, from + Math.min(max, b.length - from));
  }

  /** Drops retained chunks that are on disk and either every reader has passed or exceed RETAIN_WINDOW. */
  trim(): void {
    let slowest = Infinity;
    for (const r of this.readers) slowest = Math.min(slowest, r.position);
    let drop = 0;
    let retained = this.written - this.memStart;
    while (drop < this.unwritten) {
      const end = this.offsets[drop]! + this.chunks[drop]!.length;
      if (end > slowest && retained <= RETAIN_WINDOW) break;
      retained -= this.chunks[drop]!.length;
      drop++;
    }
    if (drop === 0) return;
    this.chunks.splice(0, drop);
    this.offsets.splice(0, drop);
    this.unwritten -= drop;
    this.memStart = this.offsets[0] ?? this.written;
  }

  /** Readers register so trim() knows how far behind the slowest is. */
  track(reader: TailReader): void {
    this.readers.add(reader);
  }

  untrack(reader: TailReader): void {
    if (this.readers.delete(reader)) this.trim();
  }

  /** Verifies digest and size, makes the bytes durable, and renames the file into place. */
  async commit(): Promise<number> {
    await this.flushed();
    const actual = `${this.digest.split(':')[0]}:${this.hash.digest('hex')}`;
    if (this.size !== undefined && this.written !== this.size) {
      throw new OciError('UNKNOWN', `upstream body ended after ${this.written} of ${this.size} bytes`, { status: 502 });
    }
    if (actual !== this.digest) {
      throw new OciError('UNKNOWN', `upstream content for ${this.digest} hashes to ${actual}`, { status: 502 });
    }
    this.state = 'verified';
    this.emit('progress');
    await this.handle!.datasync();
    await this.handle!.close();
    this.handle = undefined;
    await mkdir(join(this.finalPath, '..'), { recursive: true });
    await this.removal()?.catch(() => undefined);
    await rename(this.tmpPath, this.finalPath);
    this.state = 'committed';
    this.emit('progress');
    return this.written;
  }

  /** Removes the temp file and fails every reader: a client must never see a complete-looking wrong body. */
  async fail(err: Error): Promise<void> {
    if (this.state === 'committed' || this.state === 'failed') return;
    this.state = 'failed';
    this.error = err;
    this.emit('progress');
    this.chunks = [];
    this.offsets = [];
    this.unwritten = 0;
    this.memStart = this.received;
    this.pendingBytes = 0;
    this.writeError ??= err;
    this.releaseWindow();
    const handle = this.handle;
    this.handle = undefined;
    await this.writing?.catch(() => undefined);
    await handle?.close().catch(() => undefined);
    await rm(this.tmpPath, { force: true });
  }

  /**
   * Bytes readers may send now. While filling, the blob's last byte is held back until the digest
   * is checked, so a client never receives a complete-looking body with the wrong content.
   */
  get deliverable(): number {
    if (this.state !== 'filling' || this.size === undefined) return this.received;
    return Math.min(this.received, this.size - 1);
  }

  /** Resolves once the blob is committed; rejects with the fill's error if it fails. */
  settled(): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (this.state === 'committed') resolve();
        else if (this.state === 'failed') reject(this.error ?? new Error('fill failed'));
        else return void this.once('progress', check);
      };
      check();
    });
  }

  /** A stream of bytes [start, end] (end inclusive, default: to the end) that tails the fill. */
  reader(start = 0, end?: number): TailReader {
    return new TailReader(this, start, end);
  }
}

/** Reads a fill's temp file up to what has been written, waiting for more; errors if the fill fails. */
export class TailReader extends Readable {
  bytesRead = 0;
  private handle: FileHandle | undefined;
  private pos: number;
  private waiting = false;
  private readonly onProgress = (): void => {
    this.waiting = false;
    this.pump();
  };

  constructor(
    private readonly fill: Fill,
    start: number,
    private readonly end: number | undefined,
  ) {
    super({ highWaterMark: READ_CHUNK });
    this.pos = start;
    fill.track(this);
  }

  /** The next byte this reader will send. */
  get position(): number {
    return this.pos;
  }

  override _construct(cb: (err?: Error | null) => void): void {
    const tryOpen = (path: string): Promise<FileHandle> => open(path, 'r');
    tryOpen(this.fill.tmpPath)
      .catch((err: NodeJS.ErrnoException) => {
        // Renamed into place between our creation and this open: read the final file.
        if (err.code === 'ENOENT' && this.fill.state === 'committed') return tryOpen(this.fill.finalPath);
        throw this.fill.error ?? err;
      })
      .then((h) => {
        this.handle = h;
        cb();
      }, cb);
  }

  override _read(): void {
    this.pump();
  }

  private pump(): void {
    if (this.destroyed || this.waiting || !this.handle) return;
    const fill = this.fill;
    if (fill.state === 'failed') {
      this.destroy(fill.error ?? new Error('fill failed'));
      return;
    }
    const limit = this.end !== undefined ? this.end + 1 : fill.state === 'filling' ? Infinity : fill.received;
    if (this.pos >= limit) {
      this.push(null);
      return;
    }
    const available = Math.min(fill.deliverable, limit) - this.pos;
    if (available > 0) {
      // Still in the fill's memory (not on disk yet, or retained for readers like this one): no copy, no syscall.
      const mem = fill.fromMemory(this.pos, Math.min(available, READ_CHUNK));
      if (mem) {
        this.pos += mem.length;
        this.bytesRead += mem.length;
        this.push(mem);
        return;
      }
    }
    if (available > 0 && this.pos < fill.written) {
      const n = Math.min(available, READ_CHUNK, fill.written - this.pos);
      const buf = Buffer.allocUnsafe(n);
      const at = this.pos;
      this.pos += n;
      this.handle.read(buf, 0, n, at).then(
        ({ bytesRead }) => {
          if (bytesRead !== n) return this.destroy(new Error(`short read of ${fill.tmpPath}`));
          this.bytesRead += n;
          this.push(buf);
        },
        (err: Error) => this.destroy(err),
      );
      return;
    }
    if (fill.state !== 'filling' && available <= 0) {
      // Fewer bytes than the range asked for: the blob is shorter than announced.
      this.destroy(new Error('blob ended before the requested range'));
    } else {
      this.waiting = true;
      fill.once('progress', this.onProgress);
    }
  }

  override _destroy(err: Error | null, cb: (err?: Error | null) => void): void {
    this.fill.off('progress', this.onProgress);
    this.fill.untrack(this);
    const h = this.handle;
    this.handle = undefined;
    if (h) h.close().then(() => cb(err), () => cb(err));
    else cb(err);
  }
}
