/**
 * Content-addressed blob files. Layout under the storage root:
 *
 *   blobs/<algorithm>/<hex[0:2]>/<hex>   complete blobs, verified against their name, read-only
 *   tmp/<random>                         fills in progress (fill.ts); whatever is here at start-up
 *                                        was left by a crash and is deleted
 *   index.db                             the SQLite index (db.ts)
 *   lock                                 held by the process that has the cache open (lock.ts)
 *   index.reserve                        zeros kept so the index can still be written when
 *                                        something else fills the filesystem (cache/storage-guard.ts)
 *
 * A file appears under blobs/ only by a fill's rename after its digest was verified, so a name
 * there is a promise about the bytes.
 */
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, rmSync } from 'node:fs';
import { mkdir, open, readdir, rm, stat, statfs, unlink, writeFile, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { splitDigest, type Algorithm } from '../core/digest.js';
import { FillMemory } from './fill-memory.js';
import { Fill } from './fill.js';

/** File-system errors that mean "cannot cache now" (full, read-only, failing disk) rather than a bug. */
const STORAGE_ERRORS = new Set(['ENOSPC', 'EDQUOT', 'EROFS', 'EACCES', 'EPERM', 'EIO']);
/** SQLite's result codes for the same; better-sqlite3 reports extended codes (SQLITE_IOERR_WRITE, ...). */
const SQLITE_STORAGE_ERRORS = /^SQLITE_(FULL|IOERR|READONLY|CANTOPEN)/;

/** Whether `err` says the disk or the index cannot be written now: full, read-only or failing. */
export function isStorageError(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException | undefined)?.code ?? '';
  return STORAGE_ERRORS.has(code) || SQLITE_STORAGE_ERRORS.test(code);
}

/** The digest of a file's content. */
export async function digestOfFile(path: string, algorithm: Algorithm): Promise<string> {
  const hash = createHash(algorithm);
  await pipeline(createReadStream(path, { highWaterMark: 1024 * 1024 }), hash);
  return `${algorithm}:${hash.digest('hex')}`;
}

export class BlobStore {
  readonly blobsDir: string;
  readonly tmpDir: string;
  private readonly reservePath: string;
  private readonly fillMemory: FillMemory;
  /** Unlinks in progress: a fill of the same digest must not rename into place before one ends. */
  private readonly removing = new Map<string, Promise<void>>();

  /**
   * `fillMemory`: memory all fills share for clients a little behind and for their write
   * windows (fill.ts FillMemory); clients further behind read the temp file.
   */
  constructor(
    readonly root: string,
    fillMemory = 8 * 1024 * 1024,
  ) {
    this.fillMemory = new FillMemory(fillMemory);
    this.blobsDir = join(root, 'blobs');
    this.tmpDir = join(root, 'tmp');
    this.reservePath = join(root, 'index.reserve');
  }

  /** Creates the directories of the layout. */
  async createLayout(): Promise<void> {
    await mkdir(this.blobsDir, { recursive: true });
    await mkdir(this.tmpDir, { recursive: true });
  }

  /** Creates the layout and (with `sweep`) removes temp files a crash left behind. */
  async init(sweep = true): Promise<number> {
    await this.createLayout();
    if (!sweep) return 0;
    const leftovers = await readdir(this.tmpDir);
    await Promise.all(leftovers.map((f) => rm(join(this.tmpDir, f), { force: true, recursive: true })));
    return leftovers.length;
  }

  /** Path of a blob. Refuses anything but a canonical digest: a name must never leave blobs/. */
  path(digest: string): string {
    const { algorithm, hex } = splitDigest(digest);
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

  /** A fill of `digest` into a new temp file; `limit`: the most bytes it may take when `size` is unknown. */
  async createFill(digest: string, size: number | undefined, limit?: number): Promise<Fill> {
    const tmpPath = join(this.tmpDir, `${digest.replace(':', '-')}.${randomBytes(6).toString('hex')}`);
    const handle = await open(tmpPath, 'w+', 0o644);
    return new Fill(digest, size, tmpPath, this.path(digest), handle, () => this.removing.get(digest), this.fillMemory, limit);
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

  /** Writes the index's reserve file (`bytes` of zeros); a partial one is removed. */
  async writeReserve(bytes: number): Promise<void> {
    try {
      await writeFile(this.reservePath, Buffer.alloc(bytes));
    } catch (err) {
      await rm(this.reservePath, { force: true });
      throw err;
    }
  }

  /** Deletes the reserve file, synchronously: it makes room for an index write about to be retried. */
  dropReserve(): void {
    rmSync(this.reservePath, { force: true });
  }

  /** Bytes of downloads on disk that fills still keep in memory for readers behind them. */
  get retainedBytes(): number {
    return this.fillMemory.retained;
  }

  /** Whether the file of `digest` is being deleted right now. */
  isRemoving(digest: string): boolean {
    return this.removing.has(digest);
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

