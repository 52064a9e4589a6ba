/**
 * Blobs in an S3-compatible bucket (`storage.backend: s3`), through the AWS SDK v3 client. Keys
 * mirror the disk layout: `<prefix>blobs/<algorithm>/<hex[0:2]>/<hex>`. An object is written only
 * from a local file whose digest was already verified (cache/uploads.ts), in one PUT, so it
 * appears whole or not at all; for a sha256 digest the PUT carries the digest as its
 * `x-amz-checksum-sha256` and the server refuses other bytes (BadDigest). Blobs above a single
 * PUT's limit go as a multipart upload, visible only once completed. Each object records which
 * upstream repository the bytes were fetched from (metadata), so that another replica sharing the
 * bucket adopts it under the same rules as its own fills (cache/blobs.ts).
 */
import { open } from 'node:fs/promises';
import type { Readable } from 'node:stream';
import {
  AbortMultipartUploadCommand,
  DeleteObjectCommand,
  GetObjectCommand,
  HeadBucketCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  S3ServiceException,
} from '@aws-sdk/client-s3';
import { fromIni } from '@aws-sdk/credential-providers';
import { Upload } from '@aws-sdk/lib-storage';
import { getSignedUrl } from '@aws-sdk/s3-request-presigner';
import { isDigest, splitDigest } from '../core/digest.js';
import type { S3Config } from '../core/s3-config.js';

/** A single PUT takes at most 5 GiB (S3's limit); larger blobs go as multipart uploads of PART bytes. */
const MAX_PUT = 5 * 1024 ** 3;
const PART = 64 * 1024 * 1024;

/** Who fetched an object's bytes from which upstream repository (its metadata). */
export interface Origin {
  upstream: string;
  name: string;
}

export interface BucketTimeouts {
  /** Connecting to the S3 endpoint. */
  connect: number;
  /** A request with no bytes moving for this long fails (a slow or hung server). */
  idle: number;
}

/** A bucket error that means "not there" (404 NoSuchKey / NotFound). */
export function isMissing(err: unknown): boolean {
  return err instanceof S3ServiceException && (err.$metadata.httpStatusCode === 404 || err.name === 'NoSuchKey' || err.name === 'NotFound');
}

/** A short description of a bucket error for logs and clients: the server's code and status, never the request's credentials. */
export function describe(err: unknown): string {
  if (!(err instanceof S3ServiceException)) return (err as Error).message;
  const status = err.$metadata.httpStatusCode;
  // An answer without a body (HEAD) has no code of its own: name it by its status.
  if (err.name === 'Unknown' || err.name === 'UnknownError' || /^\d+$/.test(err.name)) {
    return `${STATUS_NAMES[status ?? 0] ?? 'error'} (${status ?? 'no status'})`;
  }
  return `${err.name} (${status ?? 'no status'})${err.message && err.message !== err.name && err.message !== 'UnknownError' ? `: ${err.message}` : ''}`;
}

const STATUS_NAMES: Record<number, string> = { 301: 'the bucket is in another region', 400: 'BadRequest', 403: 'AccessDenied', 404: 'NotFound' };

export class Bucket {
  private readonly client: S3Client;

  constructor(
    readonly config: S3Config,
    timeouts: BucketTimeouts,
    /** Above this size a blob goes as a multipart upload of `partSize` parts (tests lower both). */
    private readonly multipart = { above: MAX_PUT, partSize: PART },
  ) {
    this.client = new S3Client({
      region: config.region,
      endpoint: config.endpoint?.href,
      forcePathStyle: config.forcePathStyle,
      credentials: config.credentialsFile ? fromIni({ filepath: config.credentialsFile, configFilepath: config.credentialsFile, profile: config.profile }) : undefined,
      // The checksum sent is the blob's own sha256 (put); nothing else is computed per request.
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: { connectionTimeout: timeouts.connect, socketTimeout: timeouts.idle },
      maxAttempts: 3,
    });
  }

  key(digest: string): string {
    const { algorithm, hex } = splitDigest(digest);
    return `${this.config.prefix}blobs/${algorithm}/${hex.slice(0, 2)}/${hex}`;
  }

  /** Whether the bucket can be reached and read with these credentials; throws the server's answer otherwise. */
  async check(): Promise<void> {
    await this.client.send(new HeadBucketCommand({ Bucket: this.config.bucket }));
  }

  /** An object's size and origin; undefined when it is not there. */
  async head(digest: string): Promise<{ size: number; origin: Origin | undefined } | undefined> {
    try {
      const r = await this.client.send(new HeadObjectCommand({ Bucket: this.config.bucket, Key: this.key(digest) }));
      const upstream = r.Metadata?.upstream;
      const name = r.Metadata?.repository;
      return { size: r.ContentLength ?? 0, origin: upstream && name ? { upstream, name } : undefined };
    } catch (err) {
      if (isMissing(err)) return undefined;
      throw err;
    }
  }

  /** Bytes [start, end] (inclusive) of an object; undefined when it is not there. The stream is the caller's. */
  async get(digest: string, start: number, end: number, signal?: AbortSignal): Promise<Readable | undefined> {
    try {
      const r = await this.client.send(new GetObjectCommand({ Bucket: this.config.bucket, Key: this.key(digest), Range: `bytes=${start}-${end}` }), { abortSignal: signal });
      return r.Body as Readable;
    } catch (err) {
      if (isMissing(err)) return undefined;
      throw err;
    }
  }

  /**
   * Writes a verified local file as the object of `digest`, with its origin. The file is opened
   * first: one deleted meanwhile (evicted) is ENOENT here, and one deleted during the upload is
   * still read to its end.
   */
  async put(digest: string, path: string, size: number, origin: Origin): Promise<void> {
    const target = { Bucket: this.config.bucket, Key: this.key(digest), ContentType: 'application/octet-stream', Metadata: { upstream: origin.upstream, repository: origin.name } };
    const { algorithm, hex } = splitDigest(digest);
    const handle = await open(path, 'r');
    const body = handle.createReadStream({ highWaterMark: 1024 * 1024, autoClose: true });
    // A read error fails the request (the SDK listens too); it must never be an uncaught exception.
    body.on('error', () => undefined);
    try {
      if (size <= this.multipart.above) {
        await this.client.send(new PutObjectCommand({ ...target, Body: body, ContentLength: size, ...(algorithm === 'sha256' ? { ChecksumSHA256: Buffer.from(hex, 'hex').toString('base64') } : {}) }));
      } else {
        // One part in memory at a time; an upload that fails is aborted (leavePartsOnError: false).
        await new Upload({ client: this.client, params: { ...target, Body: body }, partSize: this.multipart.partSize, queueSize: 1, leavePartsOnError: false }).done();
      }
    } finally {
      body.destroy();
      await handle.close().catch(() => undefined);
    }
  }

  async remove(digest: string): Promise<void> {
    await this.client.send(new DeleteObjectCommand({ Bucket: this.config.bucket, Key: this.key(digest) }));
  }

  /** A URL that GETs the object without credentials until it expires (storage.s3.redirect). */
  presign(digest: string): Promise<string> {
    return getSignedUrl(this.client, new GetObjectCommand({ Bucket: this.config.bucket, Key: this.key(digest) }), { expiresIn: Math.round(this.config.redirectTtl / 1000) });
  }

  /** Every object under the prefix that names a blob, with its size. */
  async *objects(): AsyncGenerator<{ digest: string; size: number }> {
    const base = `${this.config.prefix}blobs/`;
    let token: string | undefined;
    do {
      const page = await this.client.send(new ListObjectsV2Command({ Bucket: this.config.bucket, Prefix: base, ContinuationToken: token }));
      for (const o of page.Contents ?? []) {
        const [algorithm, , hex] = (o.Key ?? '').slice(base.length).split('/');
        const digest = `${algorithm}:${hex}`;
        if (isDigest(digest) && o.Key === this.key(digest)) yield { digest, size: o.Size ?? 0 };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  /** Aborts multipart uploads under the prefix started before `before` (ms): what a crash mid-upload left. */
  async abortStaleUploads(before: number): Promise<number> {
    let aborted = 0;
    let keyMarker: string | undefined;
    let uploadIdMarker: string | undefined;
    do {
      const page = await this.client.send(new ListMultipartUploadsCommand({ Bucket: this.config.bucket, Prefix: this.config.prefix, KeyMarker: keyMarker, UploadIdMarker: uploadIdMarker }));
      for (const u of page.Uploads ?? []) {
        if (!u.Key || !u.UploadId || (u.Initiated && u.Initiated.getTime() >= before)) continue;
        await this.client.send(new AbortMultipartUploadCommand({ Bucket: this.config.bucket, Key: u.Key, UploadId: u.UploadId }));
        aborted++;
      }
      keyMarker = page.IsTruncated ? page.NextKeyMarker : undefined;
      uploadIdMarker = page.IsTruncated ? page.NextUploadIdMarker : undefined;
    } while (keyMarker);
    return aborted;
  }

  close(): void {
    this.client.destroy();
  }
}
