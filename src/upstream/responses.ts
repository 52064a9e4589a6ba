/**
 * Reading upstream answers: headers, small bodies within a limit, and the one mapping of upstream
 * statuses and transport failures to OciError, for the registry client and its token fetches.
 */
import type { Dispatcher } from 'undici';
import type { UpstreamConfig } from '../core/config.js';
import { OciError, type ErrorCode } from '../core/errors.js';
import { DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED, mediaTypeOf, OCI_INDEX, OCI_MANIFEST, stripParams } from '../core/media-types.js';

export type Body = Dispatcher.ResponseData['body'];
export type Headers = Dispatcher.ResponseData['headers'];

export function header(headers: Headers, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

export function contentLength(headers: Headers): number | undefined {
  const v = header(headers, 'content-length');
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined;
}

/**
 * An upstream body above what the cache accepts: the upstream's fault, never the client's, so 502.
 * `code` says what was refused: MANIFEST_INVALID for a manifest or a referrers index (an image
 * index), so the client learns what was wrong; UNKNOWN for anything else. Like any upstream
 * fault it lets a cached tag be served STALE (core/errors.ts isUpstreamUnavailable).
 */
export function tooLarge(upstream: UpstreamConfig, what: string, limit: number, code: ErrorCode, size?: number): OciError {
  return new OciError(code, `upstream ${upstream.name} sent a ${what} larger than ${limit} bytes`, { status: 502, detail: size === undefined ? { limit } : { size, limit } });
}

/**
 * What a manifest may be served as: the manifest types, the OCI artifact manifest of the image-spec
 * 1.1 release candidates, and application/json (registries that answer it for an OCI manifest
 * without a mediaType field). Anything else (text/html from a login page or a hostile redirect)
 * would be stored and served with that type from the cache's own origin.
 */
const MANIFEST_TYPES: ReadonlySet<string> = new Set([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_SCHEMA1_SIGNED, DOCKER_SCHEMA1, 'application/vnd.oci.artifact.manifest.v1+json', 'application/json']);

/**
 * The error refusing a manifest answer whose type, as the cache would serve it (mediaTypeOf: the
 * Content-Type, else the body's mediaType field), is not a manifest type; undefined when it is. A
 * HEAD has no body: its Content-Type may be absent, text/plain (schema 1, as containerd reads it)
 * or a manifest type. MANIFEST_INVALID and 502, as for an oversized manifest (tooLarge).
 */
export function notAManifest(upstream: UpstreamConfig, body: Buffer | undefined, contentType: string | undefined): OciError | undefined {
  const type = body ? mediaTypeOf(body, contentType) : stripParams(contentType);
  if (MANIFEST_TYPES.has(type) || (!body && (type === '' || type === 'text/plain'))) return undefined;
  return new OciError('MANIFEST_INVALID', `upstream ${upstream.name} answered a manifest request with ${JSON.stringify(type.slice(0, 100))}, which is not a manifest type`, { status: 502 });
}

/**
 * Reads a small body whole, refusing anything above `limit` without buffering it (tooLarge). A
 * transport failure while reading (reset, abort, deadline) is thrown as it came: the caller maps
 * it with transportError and reports it to the breaker.
 */
export async function readLimited(upstream: UpstreamConfig, body: Body, limit: number, what: string, code: ErrorCode = 'UNKNOWN'): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of body) {
    total += (chunk as Buffer).length;
    if (total > limit) {
      body.on('error', () => undefined).destroy();
      throw tooLarge(upstream, what, limit, code);
    }
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks, total);
}

/**
 * An upstream's error status as the OciError a client gets. `retryAfter`: the seconds the gate now
 * keeps requests away after a 429 (what the client is told to wait), 0 for none.
 */
export function statusError(upstream: UpstreamConfig, kind: string, status: number, notFound: ErrorCode, message?: string, retryAfter = 0): OciError {
  if (status === 404) return new OciError(notFound, message);
  if (status === 401 || status === 403) return new OciError('DENIED', `upstream ${upstream.name} refused access (${status})`);
  if (status === 429) {
    return new OciError('TOOMANYREQUESTS', `upstream ${upstream.name} is rate limiting`, { headers: retryAfter > 0 ? { 'retry-after': String(retryAfter) } : {} });
  }
  if (status >= 500) return new OciError('UNAVAILABLE', `upstream ${upstream.name} failed with ${status} for ${kind}`, { status: 502 });
  return new OciError('UNKNOWN', `upstream ${upstream.name} answered ${status} for ${kind}`, { status: 502 });
}

const TIMEOUT_CODES = new Set(['UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'ETIMEDOUT', 'ABORT_ERR', 'TimeoutError']);

/**
 * Any failure to get an answer, before the headers or while reading the body: UNAVAILABLE, 504 when
 * it timed out, else 503. `clientGone`: the request was cancelled because its client left; said so,
 * as nobody is waiting for the answer but the log.
 */
/** OpenSSL's and Node's verification failures: the upstream answered, with a certificate we do not trust. */
function isCertificateError(code: string | undefined): boolean {
  return code !== undefined && (/CERT|SELF_SIGNED|UNABLE_TO_(GET|VERIFY)/.test(code) || code === 'ERR_TLS_CERT_ALTNAME_INVALID');
}

export function transportError(upstream: UpstreamConfig, err: unknown, clientGone = false): OciError {
  if (err instanceof OciError) return err;
  if (clientGone) return new OciError('UNAVAILABLE', `request to upstream ${upstream.name} cancelled: the client went away`, { cause: err });
  const e = err as { code?: string; name?: string; message?: string };
  if (isCertificateError(e.code)) {
    return new OciError('UNAVAILABLE', `upstream ${upstream.name}'s TLS certificate was not accepted (${e.code}: ${e.message}); set upstreams[].caFile to its CA bundle`, { status: 502, cause: err });
  }
  const timedOut = TIMEOUT_CODES.has(e.code ?? '') || TIMEOUT_CODES.has(e.name ?? '');
  return new OciError('UNAVAILABLE', `upstream ${upstream.name} ${timedOut ? 'timed out' : 'is unreachable'}`, {
    status: timedOut ? 504 : 503,
    cause: err,
  });
}

/** `p`, or the signal's reason as soon as it aborts: a caller's deadline bounds its wait for a shared flight. */
export function untilAborted<T>(p: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) return Promise.reject(signal.reason as Error);
  return new Promise<T>((resolve, reject) => {
    const abort = (): void => reject(signal.reason as Error);
    signal.addEventListener('abort', abort, { once: true });
    p.then(
      (v) => {
        signal.removeEventListener('abort', abort);
        resolve(v);
      },
      (err: unknown) => {
        signal.removeEventListener('abort', abort);
        reject(err as Error);
      },
    );
  });
}
