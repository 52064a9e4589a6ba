/**
 * `storage.backend: s3` and its `storage.s3` section: blobs in an S3-compatible bucket
 * (storage/s3-blobs.ts). The local root still holds the index, the lock and the fills' temp
 * files. Validated here with messages naming the bad key.
 */
import { ConfigError } from './config-error.js';
import { bool, duration, section, str, type Obj } from './config-values.js';

export interface S3Config {
  /** The S3 API's URL for a server other than AWS (SeaweedFS, MinIO, Ceph); undefined: AWS's for the region. */
  endpoint: URL | undefined;
  region: string;
  bucket: string;
  /** Prepended to every key (`ocicache/`): several caches may share a bucket under different prefixes. */
  prefix: string;
  /** Bucket in the path rather than the host name: most servers other than AWS need it. */
  forcePathStyle: boolean;
  /** A shared credentials file (INI, as ~/.aws/credentials, a mounted Secret); undefined: the SDK's default chain (environment, web identity, instance role). */
  credentialsFile: string | undefined;
  /** Its profile (default: `default`). */
  profile: string | undefined;
  /** Warm blobs answered with a 307 to a presigned URL, so their bytes do not pass through the cache. */
  redirect: boolean;
  /** How long a presigned URL is valid. */
  redirectTtl: number;
  /** Whether this cache deletes blobs from the bucket (maxSize, maxAge). Off for all but one replica of a shared bucket. */
  evict: boolean;
  /** Multipart uploads under the prefix older than this are aborted at start-up (a crash mid-upload leaves them). */
  staleUploads: number;
}

const BUCKET = /^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/;
const PREFIX = /^([A-Za-z0-9!_.*'()-]+\/)*$/;

export function buildS3Config(storage: Obj): S3Config | undefined {
  const backend = storage.backend ?? 'disk';
  if (backend !== 'disk' && backend !== 's3') throw new ConfigError('storage.backend', `must be disk or s3, got ${JSON.stringify(backend)}`);
  if (backend === 'disk') {
    if (storage.s3 !== undefined) throw new ConfigError('storage.s3', 'is set but storage.backend is not s3');
    return undefined;
  }
  const s3 = section(storage, 's3', 'storage.s3', ['endpoint', 'region', 'bucket', 'prefix', 'forcePathStyle', 'credentialsFile', 'profile', 'redirect', 'redirectTtl', 'evict', 'staleUploads']);
  const bucket = str(s3, 'bucket', 'storage.s3');
  if (!BUCKET.test(bucket)) throw new ConfigError('storage.s3.bucket', `must be an S3 bucket name (3-63 of a-z, 0-9, . and -), got ${JSON.stringify(bucket)}`);
  let endpoint: URL | undefined;
  if (s3.endpoint !== undefined) {
    try {
      endpoint = new URL(str(s3, 'endpoint', 'storage.s3'));
    } catch {
      throw new ConfigError('storage.s3.endpoint', `must be a URL such as https://s3.example.com, got ${JSON.stringify(s3.endpoint)}`);
    }
    if (!/^https?:$/.test(endpoint.protocol) || endpoint.pathname !== '/' || endpoint.search || endpoint.username) {
      throw new ConfigError('storage.s3.endpoint', `must be an http(s) URL with no path, query or credentials, got ${JSON.stringify(s3.endpoint)}`);
    }
  }
  const prefix = s3.prefix === undefined ? '' : str(s3, 'prefix', 'storage.s3');
  if (!PREFIX.test(prefix)) throw new ConfigError('storage.s3.prefix', `must be path segments ending in / such as ocicache/, got ${JSON.stringify(prefix)}`);
  const redirectTtl = duration(s3.redirectTtl ?? '5m', 'storage.s3.redirectTtl');
  // SigV4 presigned URLs live at most 7 days.
  if (redirectTtl < 1000 || redirectTtl > 7 * 86_400_000) throw new ConfigError('storage.s3.redirectTtl', 'must be between 1s and 7d');
  return {
    endpoint,
    region: str(s3, 'region', 'storage.s3', 'us-east-1'),
    bucket,
    prefix,
    forcePathStyle: bool(s3, 'forcePathStyle', 'storage.s3', endpoint !== undefined),
    credentialsFile: s3.credentialsFile === undefined ? undefined : str(s3, 'credentialsFile', 'storage.s3'),
    profile: s3.profile === undefined ? undefined : str(s3, 'profile', 'storage.s3'),
    redirect: bool(s3, 'redirect', 'storage.s3', false),
    redirectTtl,
    evict: bool(s3, 'evict', 'storage.s3', true),
    staleUploads: duration(s3.staleUploads ?? '24h', 'storage.s3.staleUploads'),
  };
}
