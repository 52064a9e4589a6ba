/**
 * A pass-through stream that checks a blob's digest on the way to the client, for blobs streamed
 * without caching (storage full). Like a fill, it holds back the last byte until the digest and
 * size are verified, so a client never receives a complete-looking body with the wrong content.
 */
import { Transform, type TransformCallback } from 'node:stream';
import { DigestVerifier } from '../core/digest.js';

export class DigestGuard extends Transform {
  bytesRead = 0;
  private readonly verifier: DigestVerifier;
  private held: Buffer | undefined;

  constructor(digest: string, size: number | undefined) {
    super();
    this.verifier = new DigestVerifier(digest, size);
  }

  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    try {
      this.verifier.update(chunk);
    } catch (err) {
      return cb(err as Error);
    }
    const out = this.held ? Buffer.concat([this.held, chunk]) : chunk;
    if (out.length === 0) return cb();
    this.held = out.subarray(out.length - 1);
    const send = out.subarray(0, out.length - 1);
    this.bytesRead += send.length;
    cb(null, send.length > 0 ? send : undefined);
  }

  override _flush(cb: TransformCallback): void {
    try {
      this.verifier.verify();
    } catch (err) {
      return cb(err as Error);
    }
    if (this.held) this.bytesRead += this.held.length;
    cb(null, this.held);
  }
}
