/**
 * The headers of a blob answer, for the Fastify route (routes.ts) and a worker's hit (worker.ts),
 * so both answer alike: distribution-spec "Pulling blobs", with Range per RFC 9110 §14.
 */
import type { ByteRange } from '../core/byte-range.js';
import { contentRange } from '../core/byte-range.js';
import type { CacheResult } from '../core/cache-result.js';

export function blobHeaders(upstream: string, digest: string, cache: CacheResult, size: number | undefined, range: ByteRange | undefined): Record<string, string> {
  const headers: Record<string, string> = {
    'docker-distribution-api-version': 'registry/2.0',
    // The spec's answer to dependency confusion: which upstream this content is from.
    'oci-namespace': upstream,
    'content-type': 'application/octet-stream',
    'docker-content-digest': digest,
    'accept-ranges': 'bytes',
    etag: `"${digest}"`,
    'x-cache': cache.toUpperCase(),
  };
  if (range && size !== undefined) {
    headers['content-range'] = contentRange(range, size);
    headers['content-length'] = String(range.end - range.start + 1);
  } else if (size !== undefined) {
    headers['content-length'] = String(size);
  }
  return headers;
}
