/**
 * One blob being written from upstream, and the readers that tail it.
 *
 * A fill writes the upstream body into a temp file while hashing it; readers tail that growing
 * file, so one upstream GET serves every concurrent client, and a client that leaves never stops
 * the fill: the download is shared, so one client's disconnect must not cancel it for the others
 * or for the cache. Only after the digest and size check is the file fsync'd and renamed into
 * place: nothing partial or wrong is ever under blobs/. Until then the blob's last byte is held
 * back from every reader, so no client receives a complete-looking body with the wrong content.
 */
import { EventEmitter } from 'node:events';
import { mkdir, rename, rm, type FileHandle } from 'node:fs/promises';
import { dirname } from 'node:path';
import { Writable } from 'node:stream';
import { DigestVerifier } from '../core/digest.js';
import { OciError } from '../core/errors.js';
import { FillMemory } from './fill-memory.js';
import { TailReader } from './tail-reader.js';

export { TailReader };

/**
 * Bytes already on disk a fill keeps in memory for readers a little behind the network, so such
 * a reader takes them from memory instead of reading the temp file back (a copy, a buffer and a
 * thread-pool round trip per chunk).
 */
const RETAIN_WINDOW = 16 * 1024 * 1024;
/** What the sink queues while the write window is full, before the upstream is paused: about one chunk. */
const SINK_QUEUE = 64 * 1024;

/** filling → verified (digest and size checked: the last byte may go out) → committed (renamed into place), or failed. */
type FillState = 'filling' | 'verified' | 'committed' | 'failed';

/**
 * One blob being written from upstream. Emits 'progress' whenever `written` grows or the state
 * changes. Owned by the blob decisions (cache/blobs.ts); clients only ever hold a reader.
 */
export class Fill extends EventEmitter {
  /** Bytes on disk in the temp file. */
  written = 0;
  /** Received chunks from offset `memStart` on: the tail not yet written, and up to RETAIN_WINDOW before it. */
  private chunks: Buffer[] = [];
  /** Offset of each chunk in `chunks`, for lookups by position. */
  private offsets: number[] = [];
  private memStart = 0;
  /** What this fill has counted in memory.retained. */
  private counted = 0;
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
  /** What readers fail with (what their clients are told); `error` when none was given. */
  private readerError: Error | undefined;
  private readonly verifier: DigestVerifier;

  constructor(
    readonly digest: string,
    /** from the upstream's Content-Length; undefined when it sent none */
    readonly size: number | undefined,
    readonly tmpPath: string,
    readonly finalPath: string,
    private handle: FileHandle | undefined,
    private readonly removal: () => Promise<void> | undefined = () => undefined,
    private readonly memory = new FillMemory(RETAIN_WINDOW),
    /** Most bytes a fill of unknown size may receive (storage.maxBlobSize). */
    private readonly limit = Number.MAX_SAFE_INTEGER,
  ) {
    super();
    this.setMaxListeners(0);
    this.verifier = new DigestVerifier(digest, size);
    this.memory.fills++;
  }

  /** This fill writes no more: its write window goes back to the others. */
  private finished(): void {
    if (this.state === 'committed' || this.state === 'failed') return;
    this.memory.fills--;
  }

  /** Bytes received and hashed, in order: on disk, or still in `chunks` past `written`. */
  get received(): number {
    return this.verifier.received;
  }

  /**
   * The sink to pipe the upstream body into. Each chunk is hashed and handed to readers from
   * memory at once; a writer loop puts it on disk behind them. Readers are never held up by the
   * disk unless it falls more than the write window behind the network (then the upstream is paused).
   */
  sink(): Writable {
    return new Writable({
      highWaterMark: SINK_QUEUE,
      write: (chunk: Buffer, _enc, cb) => {
        if (this.writeError) return cb(this.writeError);
        if (this.state !== 'filling') return cb(new Error('fill is closed'));
        const at = this.received;
        if (this.size === undefined && at + chunk.length > this.limit) {
          return cb(new OciError('UNKNOWN', `upstream sent more than storage.maxBlobSize (${this.limit} bytes) without announcing a size`, { status: 502 }));
        }
        try {
          this.verifier.update(chunk);
        } catch (err) {
          return cb(err as Error);
        }
        this.chunks.push(chunk);
        this.offsets.push(at);
        this.addPending(chunk.length);
        this.emit('progress');
        this.pumpWrites();
        if (this.pendingBytes < this.memory.writeWindow) return cb();
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
          this.addPending(-total);
          this.written += total;
          this.trim();
          if (this.pendingBytes < this.memory.writeWindow) this.releaseWindow();
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

  /**
   * Drops retained chunks that are on disk and that every reader has passed, or that exceed
   * RETAIN_WINDOW or the memory shared by all fills.
   */
  trim(): void {
    let slowest = Infinity;
    for (const r of this.readers) slowest = Math.min(slowest, r.position);
    let drop = 0;
    let retained = this.written - this.memStart;
    while (drop < this.unwritten) {
      const end = this.offsets[drop]! + this.chunks[drop]!.length;
      if (end > slowest && retained <= RETAIN_WINDOW && this.memory.mayRetain(retained - this.counted)) break;
      retained -= this.chunks[drop]!.length;
      drop++;
    }
    if (drop > 0) {
      this.chunks.splice(0, drop);
      this.offsets.splice(0, drop);
      this.unwritten -= drop;
      this.memStart = this.offsets[0] ?? this.written;
    }
    this.count();
  }

  /** Received bytes not yet on disk, here and in the budget all fills share. */
  private addPending(bytes: number): void {
    this.pendingBytes += bytes;
    this.memory.pending += bytes;
  }

  /** Brings this fill's share of the retained bytes up to date: on-disk bytes still in memory. */
  private count(): void {
    const retained = Math.max(0, this.written - this.memStart);
    this.memory.retained += retained - this.counted;
    this.counted = retained;
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
    this.verifier.verify();
    this.state = 'verified';
    this.emit('progress');
    await this.handle!.datasync();
    await this.handle!.close();
    this.handle = undefined;
    await mkdir(dirname(this.finalPath), { recursive: true });
    await this.removal()?.catch(() => undefined);
    await rename(this.tmpPath, this.finalPath);
    this.finished();
    this.state = 'committed';
    this.emit('progress');
    return this.written;
  }

  /** Removes the temp file and fails every reader: a client must never see a complete-looking wrong body. */
  async fail(err: Error, forReaders: Error = err): Promise<void> {
    if (this.state === 'committed' || this.state === 'failed') return;
    this.finished();
    this.state = 'failed';
    this.error = err;
    this.readerError = forReaders;
    this.emit('progress');
    this.chunks = [];
    this.offsets = [];
    this.unwritten = 0;
    this.memStart = this.received;
    this.count();
    this.addPending(-this.pendingBytes);
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

  /** What a reader of this failed fill fails with. */
  get failure(): Error | undefined {
    return this.readerError ?? this.error;
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
