/**
 * Cached blob bytes from a file to an HTTP response through reused buffers. Node has no sendfile
 * for sockets, so every byte is copied through user space; doing it with two pooled 1 MiB buffers
 * per response, each reused only once the socket has taken its last write, means no allocation
 * and no garbage per chunk. A stream per response would allocate a fresh 1 MiB buffer per read,
 * which V8 collects only after tens of MiB of them pile up: slower, and more memory (README,
 * Performance).
 */
import type { FileHandle } from 'node:fs/promises';
import type { ServerResponse } from 'node:http';
import { onResponseGone } from './response-gone.js';

const CHUNK = 1024 * 1024;
/**
 * A file still being written arrives a network read at a time, and a client that stops reading
 * holds both buffers: smaller ones for it (64 such clients held 128 MiB with 1 MiB buffers).
 */
const GROWING_CHUNK = 256 * 1024;
/** Idle buffers of each size kept for the next responses; more are allocated under load and left to the GC. */
const MAX_POOLED = 16;
const pools = new Map<number, Buffer[]>([
  [CHUNK, []],
  [GROWING_CHUNK, []],
]);

function take(size: number): Buffer {
  return pools.get(size)!.pop() ?? Buffer.allocUnsafeSlow(size);
}

/** Resolves true once the socket has taken `chunk`, false if the response failed or closed first. */
function write(res: ServerResponse, chunk: Buffer, closed: Promise<false>): Promise<boolean> {
  return Promise.race([new Promise<boolean>((resolve) => res.write(chunk, (err) => resolve(!err))), closed]);
}

/**
 * Sends bytes [start, end) of `handle` as the body of `res` (headers already written) and ends it.
 * Reading the next chunk overlaps writing the previous one. Resolves when the body is handed to
 * the socket or the client has gone; rejects on a read error, after destroying the response so
 * the client sees a short body, never a wrong one. `sent` counts the bytes the socket has taken.
 *
 * `until`, for a file still being written (a fill a worker follows, storage/fill-progress.ts):
 * resolves with how far it may be read from a position, waiting for more; `pos` itself ends the
 * body there (a blob of unknown size, `end` Infinity), and a rejection fails it as a read error.
 */
export async function sendFileRange(res: ServerResponse, handle: FileHandle, start: number, end: number, sent: (bytes: number) => void, until?: (pos: number) => Promise<number>): Promise<void> {
  // Write callbacks never come for a response whose client left: its closing ends the waits.
  let unwatch!: () => void;
  const closed = new Promise<false>((resolve) => (unwatch = onResponseGone(res, () => resolve(false))));
  const size = until ? GROWING_CHUNK : CHUNK;
  const buffers = [take(size), take(size)];
  const writes: Array<Promise<boolean>> = [Promise.resolve(true), Promise.resolve(true)];
  let reusable = false;
  try {
    let i = 0;
    for (let pos = start; pos < end; i ^= 1) {
      // The buffer is free again only once the socket took the write made from it.
      if (!(await writes[i])) return;
      const limit = until ? Math.min(end, await until(pos)) : end;
      if (limit <= pos) break;
      const n = Math.min(size, limit - pos);
      const { bytesRead } = await handle.read(buffers[i]!, 0, n, pos);
      if (bytesRead === 0) throw new Error(`cached blob file ended at ${pos} of ${end} bytes`);
      pos += bytesRead;
      writes[i] = write(res, buffers[i]!.subarray(0, bytesRead), closed).then((ok) => {
        if (ok) sent(bytesRead);
        return ok;
      });
    }
    const done = await Promise.all(writes);
    if (!done.every(Boolean)) return;
    reusable = true;
    res.end();
  } catch (err) {
    res.destroy();
    throw err;
  } finally {
    unwatch();
    // Buffers a write may still hold (the client left mid-write) are left to the GC.
    const pool = pools.get(size)!;
    if (reusable) for (const b of buffers) if (pool.length < MAX_POOLED) pool.push(b);
  }
}
