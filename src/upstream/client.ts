/**
 * Speaks the distribution API to upstream registries, following redirects only where trust.ts
 * allows (exchange.ts). Every request passes the upstream's gate; 401s are answered with tokens or
 * Basic auth (tokens.ts); recent 404s are answered from memory (not-found.ts). Maps every upstream
 * failure to an OciError (responses.ts), and always consumes or destroys response bodies it does
 * not hand on.
 */
import type { Dispatcher } from 'undici';
import { systemClock, type Clock } from '../core/clock.js';
import type { Config, UpstreamConfig } from '../core/config.js';
import { OciError, type ErrorCode } from '../core/errors.js';
import { FULL_ACCEPT, MAX_MANIFEST_BYTES } from '../core/media-types.js';
import type { Metrics } from '../telemetry/metrics.js';
import type { Target } from '../core/api-path.js';
import { Exchanger, type Network } from './exchange.js';
import { Gate } from './gate.js';
import { NotFoundMemory } from './not-found.js';
import { contentLength, header, notAManifest, readLimited, statusError, tooLarge, transportError, untilAborted, type Body } from './responses.js';
import { Credentials } from './credentials.js';
import { Authorizer } from './tokens.js';
import { checkNamespace, parentUnreachable } from './parent.js';
import { redirectRule } from './trust.js';
import { parseWwwAuthenticate, type Challenge } from './www-authenticate.js';

export type RequestKind = 'manifest' | 'blob' | 'tags' | 'referrers' | 'token';

export interface ManifestResponse {
  body: Buffer;
  contentType: string | undefined;
  digest: string | undefined;
}

export interface HeadResponse {
  contentType: string | undefined;
  digest: string | undefined;
  size: number | undefined;
}

export interface BlobResponse {
  /** The caller owns this stream: it must be consumed or destroyed. */
  body: Body;
  /** The whole blob's size (from Content-Length, or Content-Range on a 206). */
  size: number | undefined;
  /** Where the body starts in the blob: `from` on a 206, 0 when the upstream ignored Range. */
  start: number;
}

/**
 * What bounds one exchange with the upstream. `signal()` aborts it: the total deadline of a small
 * exchange, made when its first request goes out (waiting for the gate's slot or pace is the
 * gate's own limit), or a fill's own deadline. `client` is the part of it that fires when the
 * client left (only for requests no other client shares): such an end is no fault of the upstream's.
 */
interface Bounds {
  repository: string;
  signal(): AbortSignal | undefined;
  client?: AbortSignal;
}

/** One request to an upstream: its kind, method, the part of the repository's API, headers and query. */
interface Ask {
  kind: RequestKind;
  method: 'GET' | 'HEAD';
  suffix: string;
  headers: Record<string, string>;
  query?: URLSearchParams;
}

/** How a small exchange's answer is checked: the code of its 404, and the key it is remembered by (NotFoundMemory). */
interface Expect {
  notFound: ErrorCode;
  remember?: string;
}

const MAX_SMALL_BODY = MAX_MANIFEST_BYTES;
const MAX_ERROR_BODY = 64 * 1024;

export class UpstreamClient {
  private readonly exchanger: Exchanger;
  private readonly auth: Authorizer;
  private readonly gates = new Map<string, Gate>();
  private readonly notFound: NotFoundMemory;

  /** With parent.fallback: the same API without the parent, for when the parent cannot be reached. */
  private readonly direct: UpstreamClient | undefined;
  /** When the parent last failed in transport, per upstream (parent.ts parentUnreachable). */
  private readonly parentFailedAt = new Map<string, number>();

  constructor(
    private readonly config: Pick<Config, 'timeouts' | 'upstreams' | 'offline' | 'cache' | 'credentials'>,
    private readonly metrics: Metrics,
    private readonly now: Clock = systemClock,
    /** The DNS lookup and extra TLS trust anchors; the system's unless a test gives others. */
    network: Network = {},
  ) {
    const direct = config.upstreams.flatMap((u) => (u.direct ? [u.direct] : []));
    this.direct = direct.length > 0 ? new UpstreamClient({ ...config, upstreams: direct }, metrics, now, network) : undefined;
    this.notFound = new NotFoundMemory(config.cache.notFoundTtl, now, metrics);
    for (const u of config.upstreams) this.gates.set(u.name, new Gate(u, config.offline, config.timeouts.manifest, metrics, now));
    // Redirects are followed hop by hop as trust.ts redirectRule says. Cross-origin hops (a blob's
    // 307 to a CDN or S3) lose Authorization (exchange.ts); S3 refuses requests carrying both.
    this.exchanger = new Exchanger(config.timeouts.connect, network);
    this.auth = new Authorizer(this.exchanger, config.timeouts.manifest, metrics, (name) => this.gate(name), new Credentials(config.credentials, now), now);
  }

  async close(): Promise<void> {
    await this.exchanger.close();
    await this.direct?.close();
  }

  /** The gate of an upstream: offline, breaker and rate-limit state (for the manifest decisions and the status page). */
  gate(upstream: string): Gate {
    return this.gates.get(upstream)!;
  }

  /*
   * Every exchange but a blob download (manifests, tag lists, referrers, HEADs) is bounded in
   * total by timeouts.manifest from its first request on: headers and body, both tries of a 401
   * and the wait for a token. An upstream trickling a body cannot hold a connection and a gate
   * slot for longer; the deadline is a failure for the breaker. Tag lists and referrers, asked
   * for one client, also end when `signal` (that client leaving) fires; manifests are shared
   * between clients by single-flight (cache/manifests.ts), so only the deadline ends them.
   */

  async getManifest(target: Target, reference: string, accept = FULL_ACCEPT): Promise<ManifestResponse> {
    const expect = { notFound: 'MANIFEST_UNKNOWN' as const, remember: this.notFound.key(target, `manifest ${accept}`, reference) };
    return this.small(target, { kind: 'manifest', method: 'GET', suffix: `manifests/${reference}`, headers: { accept } }, expect, undefined, async (res) => {
      const announced = contentLength(res.headers);
      if (announced !== undefined && announced > MAX_MANIFEST_BYTES) {
        res.body.on('error', () => undefined).destroy();
        throw tooLarge(target.upstream, 'manifest', MAX_MANIFEST_BYTES, 'MANIFEST_INVALID', announced);
      }
      const body = await readLimited(target.upstream, res.body, MAX_MANIFEST_BYTES, 'manifest', 'MANIFEST_INVALID');
      const contentType = header(res.headers, 'content-type');
      // Served under the cache's origin with this type: never stored unless it is a manifest's (responses.ts).
      const refused = notAManifest(target.upstream, body, contentType);
      if (refused) throw refused;
      return { body, contentType, digest: header(res.headers, 'docker-content-digest') };
    });
  }

  async headManifest(target: Target, reference: string, accept = FULL_ACCEPT): Promise<HeadResponse> {
    const expect = { notFound: 'MANIFEST_UNKNOWN' as const, remember: this.notFound.key(target, `manifest ${accept}`, reference) };
    return this.small(target, { kind: 'manifest', method: 'HEAD', suffix: `manifests/${reference}`, headers: { accept } }, expect, undefined, async (res) => {
      const head = await headResponse(res);
      const refused = notAManifest(target.upstream, undefined, head.contentType);
      if (refused) throw refused;
      return head;
    });
  }

  async headBlob(target: Target, digest: string): Promise<HeadResponse> {
    const expect = { notFound: 'BLOB_UNKNOWN' as const, remember: this.notFound.key(target, 'blob', digest) };
    return this.small(target, { kind: 'blob', method: 'HEAD', suffix: `blobs/${digest}`, headers: {} }, expect, undefined, headResponse);
  }

  /**
   * Starts a blob download, from byte `from` when resuming (RFC 9110 §14.2). `signal` is the
   * fill's own deadline, never a client's. The gate hears how it went at the headers: a body that
   * breaks later is the fill's to resume (cache/blobs.ts).
   */
  async getBlob(target: Target, digest: string, signal: AbortSignal, from = 0): Promise<BlobResponse> {
    const expect = { notFound: 'BLOB_UNKNOWN' as const, remember: this.notFound.key(target, 'blob', digest) };
    this.notFound.check(target.upstream.name, expect.remember);
    const bounds = { repository: target.name, signal: () => signal };
    const res = await this.send(target, { kind: 'blob', method: 'GET', suffix: `blobs/${digest}`, headers: from > 0 ? { range: `bytes=${from}-` } : {} }, bounds, async (r) => {
      await this.expectOk(r, target, 'blob', expect);
      return r;
    });
    if (res.statusCode === 206) {
      const m = /^bytes (\d+)-(\d+)\/(\d+|\*)$/.exec(header(res.headers, 'content-range') ?? '');
      if (!m || Number(m[1]) !== from) {
        res.body.destroy();
        throw new OciError('UNAVAILABLE', `upstream ${target.upstream.name} answered a resume from ${from} with Content-Range ${JSON.stringify(header(res.headers, 'content-range'))}`, { status: 502 });
      }
      return { body: res.body, size: m[3] === '*' ? undefined : Number(m[3]), start: from };
    }
    return { body: res.body, size: contentLength(res.headers), start: 0 };
  }

  /** `signal`: the client left; the request is its alone, so it ends with it. */
  async listTags(target: Target, query: URLSearchParams, signal?: AbortSignal): Promise<{ body: Buffer; hasNext: boolean }> {
    return this.small(target, { kind: 'tags', method: 'GET', suffix: 'tags/list', headers: { accept: 'application/json' }, query }, { notFound: 'NAME_UNKNOWN' }, signal, async (res) => {
      const body = await readLimited(target.upstream, res.body, MAX_SMALL_BODY, 'tag list');
      return { body, hasNext: /rel="?next"?/.test(header(res.headers, 'link') ?? '') };
    });
  }

  /** Referrers pass through as they are; a 404 stays a 404 so clients use the tag schema fallback. `signal`: as for listTags. */
  async getReferrers(
    target: Target,
    digest: string,
    query: URLSearchParams,
    signal?: AbortSignal,
  ): Promise<{ body: Buffer; contentType: string | undefined; filtersApplied: string | undefined }> {
    const accept = { accept: 'application/vnd.oci.image.index.v1+json' };
    return this.small(target, { kind: 'referrers', method: 'GET', suffix: `referrers/${digest}`, headers: accept, query }, { notFound: 'MANIFEST_UNKNOWN' }, signal, async (res) => {
      // A referrers answer is an image index: refused as a manifest would be.
      const body = await readLimited(target.upstream, res.body, MAX_MANIFEST_BYTES, 'referrers index', 'MANIFEST_INVALID');
      return { body, contentType: header(res.headers, 'content-type'), filtersApplied: header(res.headers, 'oci-filters-applied') };
    });
  }

  /**
   * One exchange that is not a blob download: checked against the 404s remembered, sent (send),
   * its status checked (expectOk) and its body read (`read`), all within timeouts.manifest and,
   * with `client`, until the client leaves.
   */
  private async small<T>(
    target: Target,
    ask: Ask,
    expect: Expect,
    client: AbortSignal | undefined,
    read: (res: Dispatcher.ResponseData) => Promise<T>,
  ): Promise<T> {
    if (expect.remember !== undefined) this.notFound.check(target.upstream.name, expect.remember);
    let signal: AbortSignal | undefined;
    const start = (): AbortSignal => {
      const deadline = AbortSignal.timeout(this.config.timeouts.manifest);
      return client ? AbortSignal.any([deadline, client]) : deadline;
    };
    const bounds: Bounds = { repository: target.name, signal: () => (signal ??= start()), client };
    return this.send(target, ask, bounds, async (res) => {
      await this.expectOk(res, target, ask.kind, expect);
      return read(res);
    });
  }

  /**
   * One request, with a cached Authorization; on 401, authorize from the challenge and retry once.
   * `read` runs on the final answer under the gate's permit (see dispatch).
   */
  private async send<T>(target: Target, ask: Ask, bounds: Bounds, read: (res: Dispatcher.ResponseData) => Promise<T>): Promise<T> {
    const direct = target.upstream.direct;
    if (!direct || !this.direct) return this.sendOnce(target, ask, bounds, read);
    try {
      return await this.sendOnce(target, ask, bounds, read);
    } catch (err) {
      // The upstream itself, through a client with gates of its own (parent.ts).
      const name = target.upstream.name;
      if (err instanceof OciError && err.cause !== undefined) this.parentFailedAt.set(name, this.now());
      const spent = bounds.client?.aborted || bounds.signal()?.aborted;
      if (spent || !parentUnreachable(err, this.gate(name), this.parentFailedAt.get(name), this.now())) throw err;
      this.metrics.parentFallbacks.inc({ upstream: target.upstream.name });
      return this.direct.send({ ...target, upstream: direct }, ask, bounds, read);
    }
  }

  private async sendOnce<T>(target: Target, ask: Ask, bounds: Bounds, read: (res: Dispatcher.ResponseData) => Promise<T>): Promise<T> {
    const { upstream, name } = target;
    const { kind, method, suffix, headers, query } = ask;
    const url = new URL(upstream.url);
    url.pathname = `${url.pathname.replace(/\/+$/, '')}/v2/${name}/${suffix}`;
    const search = new URLSearchParams(query);
    // Through a parent cache: the distribution spec's registry proxying, the upstream named by ns.
    if (upstream.viaParent) search.set('ns', upstream.name);
    url.search = search.toString();
    const scope = `repository:${name}:pull`;
    // A parent's answer must say it is this upstream's before anything reads it (parent.ts).
    const answer = upstream.viaParent
      ? (res: Dispatcher.ResponseData): Promise<T> => {
          checkNamespace(upstream, res);
          return read(res);
        }
      : read;
    type First = { value: T } | { challenges: Challenge[] };
    const sent = this.auth.cached(upstream, scope);
    const first = await this.dispatch(upstream, kind, url, method, headers, sent, bounds, async (res): Promise<First> => {
      if (res.statusCode !== 401) return { value: await answer(res) };
      await res.body.dump();
      return { challenges: parseWwwAuthenticate(res.headers['www-authenticate']) };
    });
    if (!('challenges' in first)) return first.value;
    // Basic credentials refused: fetched again (once) if found at run time. A 401 to a bearer token
    // is no verdict on them (Docker Hub answers it for a repository that does not exist): a new
    // token is fetched, and the token server judges the credentials (tokens.ts).
    if (sent?.startsWith('Basic ')) this.auth.refused(upstream);
    // The token fetch is shared by every request for this scope and has its own deadline; each
    // waiter still gives up at its own.
    const token = this.auth.authorize(upstream, first.challenges, scope);
    const signal = bounds.signal();
    let authorization: string | undefined;
    try {
      authorization = signal ? await untilAborted(token, signal) : await token;
    } catch (err) {
      throw transportError(upstream, err, bounds.client?.aborted);
    }
    if (authorization === undefined) throw new OciError('DENIED', `upstream ${upstream.name} requires authentication`);
    return this.dispatch(upstream, kind, url, method, headers, authorization, bounds, answer);
  }

  /**
   * One request through the gate. The permit is reported once `read` is done with the answer: for
   * a small exchange that is after its whole body, so a body that breaks or times out counts as a
   * failure for the breaker; a blob's `read` returns at the headers and hands the body on. The
   * concurrency slot is held until the body is closed, whoever reads it.
   */
  private async dispatch<T>(
    upstream: UpstreamConfig,
    kind: RequestKind,
    url: URL,
    method: 'GET' | 'HEAD',
    headers: Record<string, string>,
    authorization: string | undefined,
    bounds: Bounds,
    read: (res: Dispatcher.ResponseData) => Promise<T>,
  ): Promise<T> {
    const gate = this.gates.get(upstream.name)!;
    const permit = await gate.acquire(bounds.repository);
    const signal = bounds.signal();
    const client = bounds.client;
    if (signal?.aborted) {
      // The deadline passed or the client left before this request went out: the upstream is not to blame.
      permit.done('cancelled');
      permit.release();
      throw transportError(upstream, signal.reason, client?.aborted);
    }
    let res: Dispatcher.ResponseData;
    try {
      res = await this.exchanger.request(upstream, url, { restrict: false }, (from, to) => redirectRule(upstream, kind, from, to), {
        method,
        headers: { 'user-agent': 'ocicache', ...headers },
        authorization,
        signal,
        headersTimeout: this.config.timeouts.manifest,
        bodyTimeout: kind === 'blob' ? this.config.timeouts.blobIdle : this.config.timeouts.manifest,
        what: `a ${kind === 'tags' ? 'tag list' : kind} request`,
      });
    } catch (err) {
      // An OciError is a redirect refused (exchange.ts): the upstream answered, wrongly.
      permit.done(err instanceof OciError ? 'ok' : client?.aborted ? 'cancelled' : 'failed');
      permit.release();
      this.metrics.upstreamRequests.inc({ upstream: upstream.name, kind, status: err instanceof OciError ? 'redirect_refused' : 'error' });
      throw transportError(upstream, err, client?.aborted);
    }
    this.metrics.upstreamRequests.inc({ upstream: upstream.name, kind, status: String(res.statusCode) });
    res.body.once('close', permit.release);
    if (res.body.destroyed) permit.release();
    gate.observe(res.statusCode, res.headers, bounds.repository);
    const answered = res.statusCode >= 500 ? 'failed' : 'ok';
    try {
      const value = await read(res);
      permit.done(answered);
      return value;
    } catch (err) {
      // An OciError judged the answer (its status, an oversize body): the upstream did answer.
      // Anything else broke the transfer: a reset, an abort, the deadline.
      permit.done(err instanceof OciError ? answered : client?.aborted ? 'cancelled' : 'failed');
      res.body.on('error', () => undefined).destroy();
      throw transportError(upstream, err, client?.aborted);
    }
  }

  /**
   * Throws the OciError for a non-2xx answer, its body read or dumped. A 404 is remembered under
   * `expect.remember` (NotFoundMemory), a 2xx forgets it.
   */
  private async expectOk(res: Dispatcher.ResponseData, target: Target, kind: RequestKind, expect: Expect): Promise<void> {
    if (res.statusCode >= 200 && res.statusCode < 300) {
      if (expect.remember !== undefined) this.notFound.forget(expect.remember);
      return;
    }
    let code: string | undefined;
    let message: string | undefined;
    if (res.statusCode === 404) {
      // Keep the upstream's own *_UNKNOWN code when it sent a proper OCI envelope.
      let text: Buffer | undefined;
      try {
        text = await readLimited(target.upstream, res.body, MAX_ERROR_BODY, 'error body');
      } catch (err) {
        if (!(err instanceof OciError)) throw err; // a broken transfer; too long is merely no envelope
      }
      try {
        const json = JSON.parse(text?.toString('utf8') ?? '') as { errors?: Array<{ code?: string; message?: string }> };
        code = json.errors?.[0]?.code;
        message = json.errors?.[0]?.message;
      } catch {
        /* not JSON: use the default code */
      }
    } else {
      await res.body.dump();
    }
    const keep = code === 'NAME_UNKNOWN' || code === 'MANIFEST_UNKNOWN' || code === 'BLOB_UNKNOWN' ? (code as ErrorCode) : expect.notFound;
    const retryAfter = res.statusCode === 429 ? this.gate(target.upstream.name).retryAfterFor(target.name) : 0;
    const err = statusError(target.upstream, kind, res.statusCode, keep, message, retryAfter);
    if (res.statusCode === 404 && expect.remember !== undefined) this.notFound.remember(expect.remember, err);
    throw err;
  }
}

/** A HEAD's answer: its headers are the descriptor. */
async function headResponse(res: Dispatcher.ResponseData): Promise<HeadResponse> {
  await res.body.dump();
  return { contentType: header(res.headers, 'content-type'), digest: header(res.headers, 'docker-content-digest'), size: contentLength(res.headers) };
}
