/**
 * A pass-through stream that checks a blob's digest on the way to the client, for blobs streamed
 * without caching (storage full). Like a fill, it holds back the last byte until the digest and
 * size are verified, so a client never receives a complete-looking body with the wrong content.
 */
import { createHash, type Hash } from 'node:crypto';
import { Transform, type TransformCallback } from 'node:stream';
import { OciError } from './errors.js';

export class DigestGuard extends Transform {
  bytesRead = 0;
  private readonly hash: Hash;
  private held: Buffer | undefined;
  private seen = 0;

  constructor(
    private readonly digest: string,
    private readonly size: number | undefined,
  ) {
    super();
    this.hash = createHash(digest.split(':')[0]!);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.hash.update(chunk);
    this.seen += chunk.length;
    if (this.size !== undefined && this.seen > this.size) return cb(new OciError('UNKNOWN', `upstream sent more than the ${this.size} bytes it announced`, { status: 502 }));
    const out = this.held ? Buffer.concat([this.held, chunk]) : chunk;
    if (out.length === 0) return cb();
    this.held = out.subarray(out.length - 1);
    const send = out.subarray(0, out.length - 1);
    this.bytesRead += send.length;
    cb(null, send.length > 0 ? send : undefined);
  }

  override _flush(cb: TransformCallback): void {
    const actual = `${this.digest.split(':')[0]}:${this.hash.digest('hex')}`;
    if (this.size !== undefined && this.seen !== this.size) return cb(new OciError('UNKNOWN', `upstream body ended after ${this.seen} of ${this.size} bytes`, { status: 502 }));
    if (actual !== this.digest) return cb(new OciError('UNKNOWN', `upstream content for ${this.digest} hashes to ${actual}`, { status: 502 }));
    if (this.held) this.bytesRead += this.held.length;
    cb(null, this.held);
  }
}
