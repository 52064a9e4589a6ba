/**
 * A reader of a blob being filled (fill.ts): it sends what the fill has received as it arrives,
 * from memory where the fill still holds it, else from the temp file, and waits for more; it
 * fails when the fill fails. It knows a fill only through `Tailed`, so this file and fill.ts do
 * not import each other.
 */
import type { EventEmitter } from 'node:events';
import { open, type FileHandle } from 'node:fs/promises';
import { Readable } from 'node:stream';

/** Bytes read from disk at a time, and a reader's buffer: what a client that stops reading holds. */
const READ_CHUNK = 64 * 1024;

/** What a reader needs of the fill it tails (a Fill). */
export interface Tailed extends Pick<EventEmitter, 'once' | 'off'> {
  readonly tmpPath: string;
  readonly finalPath: string;
  readonly state: 'filling' | 'verified' | 'committed' | 'failed';
  readonly written: number;
  readonly received: number;
  /** Bytes readers may send now (the last one is held back until the digest is checked). */
  readonly deliverable: number;
  readonly failure: Error | undefined;
  fromMemory(pos: number, max: number): Buffer | undefined;
  track(reader: TailReader): void;
  untrack(reader: TailReader): void;
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
    private readonly fill: Tailed,
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
        throw this.fill.failure ?? err;
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
      this.destroy(fill.failure ?? new Error('fill failed'));
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
