/**
 * Digests (`algorithm:hex`, image-spec descriptor.md#digests): the one place that parses,
 * formats and checks them. Only sha256 and sha512 are accepted: a digest names a file under
 * blobs/ and a cache key, so anything else is refused before it reaches either.
 */
import { createHash, type Hash } from 'node:crypto';
import { OciError } from './errors.js';

export type Algorithm = 'sha256' | 'sha512';

/** Canonical form of the two registered algorithms: lower-case hex of the exact length. */
const DIGEST = /^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$/;
/** image-spec descriptor.md digest grammar: well-formed, but maybe an algorithm we do not support. */
const DIGEST_SHAPE = /^[a-z0-9]+([+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$/;

export function isDigest(value: string): boolean {
  return DIGEST.test(value);
}

/** Returns `value` when it is a canonical sha256 or sha512 digest; throws DIGEST_INVALID otherwise. */
export function checkDigest(value: string): string {
  if (DIGEST.test(value)) return value;
  const algorithm = value.split(':')[0];
  if (DIGEST_SHAPE.test(value) && algorithm !== 'sha256' && algorithm !== 'sha512') throw new OciError('DIGEST_INVALID', `unsupported digest ${value.slice(0, 150)}: only sha256 and sha512 are accepted`);
  throw new OciError('DIGEST_INVALID', `invalid digest ${JSON.stringify(value.slice(0, 150))}`);
}

/** The two halves of a checked digest. */
export function splitDigest(digest: string): { algorithm: Algorithm; hex: string } {
  checkDigest(digest);
  const colon = digest.indexOf(':');
  return { algorithm: digest.slice(0, colon) as Algorithm, hex: digest.slice(colon + 1) };
}

/** The digest of `bytes` with `algorithm`. */
export function digestOf(bytes: Uint8Array, algorithm: Algorithm = 'sha256'): string {
  return `${algorithm}:${createHash(algorithm).update(bytes).digest('hex')}`;
}

/**
 * Checks a stream of bytes against the digest and size it is supposed to have, chunk by chunk.
 * Every byte from an upstream passes one of these before a client may see the last byte or the
 * cache may keep the file. The errors are upstream faults (502): the client asked for a digest.
 */
export class DigestVerifier {
  /** Bytes hashed so far. */
  received = 0;
  private readonly hash: Hash;
  private readonly algorithm: Algorithm;

  constructor(
    readonly digest: string,
    /** the size the upstream announced; undefined when it sent none */
    readonly size: number | undefined,
  ) {
    this.algorithm = splitDigest(digest).algorithm;
    this.hash = createHash(this.algorithm);
  }

  /** Hashes `chunk`; throws when it would take the bytes past the announced size. */
  update(chunk: Uint8Array): void {
    if (this.size !== undefined && this.received + chunk.length > this.size) {
      throw new OciError('UNKNOWN', `upstream sent more than the ${this.size} bytes it announced`, { status: 502 });
    }
    this.hash.update(chunk);
    this.received += chunk.length;
  }

  /** Call once, at the end: throws unless every announced byte arrived and they hash to the digest. */
  verify(): void {
    if (this.size !== undefined && this.received !== this.size) {
      throw new OciError('UNKNOWN', `upstream body ended after ${this.received} of ${this.size} bytes`, { status: 502 });
    }
    const actual = `${this.algorithm}:${this.hash.digest('hex')}`;
    if (actual !== this.digest) throw new OciError('UNKNOWN', `upstream content for ${this.digest} hashes to ${actual}`, { status: 502 });
  }
}

/**
 * The subject a tag of the referrers tag schema names: `sha256-<hex>` (distribution-spec
 * "Referrers Tag Schema", an index of the referrers) and cosign's `sha256-<hex>.sig`, `.att` and
 * `.sbom` (a signature, attestation or SBOM of that manifest). undefined for any other tag.
 */
export function subjectOfTag(tag: string): string | undefined {
  const m = /^(sha256|sha512)-([a-f0-9]{64}|[a-f0-9]{128})(\.[A-Za-z0-9_-]+)?$/.exec(tag);
  if (!m) return undefined;
  const digest = `${m[1]}:${m[2]}`;
  return isDigest(digest) ? digest : undefined;
}
