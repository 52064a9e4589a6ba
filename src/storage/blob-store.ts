/**
 * Content-addressed blob files. Layout under the storage root:
 *
 *   blobs/<algorithm>/<hex[0:2]>/<hex>   complete blobs, verified against their name, read-only
 *   tmp/<random>                         fills in progress (fill.ts); whatever is here at start-up
 *                                        was left by a crash and is deleted
 *   index.db                             the SQLite index (db.ts)
 *
 * A file appears under blobs/ only by a fill's rename after its digest was verified, so a name
 * there is a promise about the bytes.
 */
import { randomBytes } from 'node:crypto';
import { mkdir, open, readdir, rm, stat, statfs, unlink, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { splitDigest } from '../core/digest.js';
import { Fill } from './fill.js';

/** Storage errors that mean "cannot cache now" (full, read-only, failing disk) rather than a bug. */
const STORAGE_ERRORS = new Set(['ENOSPC', 'EDQUOT', 'EROFS', 'EACCES', 'EPERM', 'EIO']);

export function isStorageError(err: unknown): boolean {
  return STORAGE_ERRORS.has((err as NodeJS.ErrnoException | undefined)?.code ?? '');
}

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

