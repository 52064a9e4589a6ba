/**
 * Blob hits for a worker process (http/worker.ts): a blob on local disk that this repository is
 * known to hold (blob_repos), opened for reading. Nothing else is decided here: a blob the index
 * does not place in this repository, one only in the bucket, or a bad Range goes to the
 * coordinator, whose Blobs (blobs.ts) decides and answers. A file the coordinator evicts while a
 * worker reads it stays readable through the open handle (unlink keeps the inode), so no pin is
 * needed across processes.
 */
import type { FileHandle } from 'node:fs/promises';
import type { Target } from '../core/api-path.js';
import { parseRange, type ByteRange } from '../core/byte-range.js';
import type { BlobStore } from '../storage/blob-store.js';
import type { Db } from '../storage/db.js';

export interface BlobHit {
  size: number;
  range: ByteRange | undefined;
  /** Bytes [start, end) of the open file; the caller closes it. */
  handle: FileHandle;
  start: number;
  end: number;
}

export async function openBlobHit(db: Db, store: BlobStore, target: Target, digest: string, rangeHeader: string | undefined): Promise<BlobHit | undefined> {
  if (!db.blobHeldBy(target.upstream.name, target.name, digest)) return undefined;
  const opened = await store.open(digest);
  if (!opened) return undefined;
  let range: ByteRange | undefined;
  try {
    range = parseRange(rangeHeader, opened.size);
  } catch {
    await opened.handle.close();
    return undefined;
  }
  return { size: opened.size, range, handle: opened.handle, start: range?.start ?? 0, end: range ? range.end + 1 : opened.size };
}
