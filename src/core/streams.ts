/**
 * Small stream helpers for bodies the cache passes on: each takes ownership of what it is given.
 */
import { Transform, type Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';

/** A stream that counts the bytes its reader took (the route logs and meters `bytesRead`); it owns `body` from here. */
export function countBytes(body: Readable): Transform & { bytesRead: number } {
  const out: Transform & { bytesRead: number } = Object.assign(
    new Transform({
      transform(chunk: Buffer, _enc, cb) {
        out.bytesRead += chunk.length;
        cb(null, chunk);
      },
    }),
    { bytesRead: 0 },
  );
  pipeline(body, out).catch(() => undefined);
  return out;
}

/** Drops an upstream body unread. undici errors a body destroyed before its end, and here nobody else listens. */
export function discard(body: Readable): void {
  body.on('error', () => undefined);
  body.destroy();
}

/** Drops the first `n` bytes of a stream (a 200 answer to a resume repeats what the fill already has). */
export function skipBytes(n: number): (source: AsyncIterable<Buffer>) => AsyncGenerator<Buffer> {
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
