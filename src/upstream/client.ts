/**
 * Speaks the distribution API to upstream registries over one undici Agent that follows
 * redirects. Handles anonymous and credentialed bearer tokens and Basic auth, maps every upstream
 * failure to an OciError, and always consumes or destroys response bodies it does not hand on.
 */
import { LRUCache } from 'lru-cache';
import { Agent, interceptors, type Dispatcher } from 'undici';
import { systemClock, type Clock } from '../core/clock.js';
import type { Config, UpstreamConfig } from '../core/config.js';
import { OciError, type ErrorCode } from '../core/errors.js';
import { FULL_ACCEPT, MAX_MANIFEST_BYTES } from '../core/media-types.js';
import type { Metrics } from '../telemetry/metrics.js';
import type { Target } from '../core/api-path.js';
import { SingleFlight } from '../core/single-flight.js';
import { Gate } from './gate.js';
import { parseWwwAuthenticate, type Challenge } from './www-authenticate.js';

export type RequestKind = 'manifest' | 'blob' | 'tags' | 'referrers' | 'token';
type Body = Dispatcher.ResponseData['body'];
type Headers = Dispatcher.ResponseData['headers'];

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

/** Token endpoints say "expires_in"; without it a token lives 60 s (distribution token spec). */
const DEFAULT_TOKEN_SECONDS = 60;
const MAX_SMALL_BODY = MAX_MANIFEST_BYTES;

function header(headers: Headers, name: string): string | undefined {
  const v = headers[name];
  return Array.isArray(v) ? v[0] : v;
}

function contentLength(headers: Headers): number | undefined {
  const v = header(headers, 'content-length');
  return v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined;
}

/** Reads a small body whole, refusing anything above `limit` without buffering it. */
async function readLimited(body: Body, limit: number, what: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const chunk of body) {
    total += (chunk as Buffer).length;
    if (total > limit) {
      body.destroy();
      throw new OciError('MANIFEST_INVALID', `${what} exceeds ${limit} bytes`, { detail: { limit } });
    }
    chunks.push(chunk as Buffer);
  }
  return Buffer.concat(chunks, total);
}

/** Hosts share a trust boundary when equal, or when their last two DNS labels are (registry-1.docker.io, auth.docker.io). */
function sameSite(a: string, b: string): boolean {
  if (a === b) return true;
  if (/^[\d.]+$|:/.test(a) || /^[\d.]+$|:/.test(b)) return false;
  const site = (h: string): string => h.split('.').slice(-2).join('.');
  return site(a) === site(b);
}

export class UpstreamClient {
  private readonly dispatcher: Dispatcher;
  private readonly agent: Agent;
  /** Authorization header values by (upstream, scope), kept until the token expires. */
  private readonly authCache = new LRUCache<string, string>({ max: 10_000, ttlAutopurge: false });
  private readonly tokenFlights = new SingleFlight<string | undefined>();
  private readonly gates = new Map<string, Gate>();

  constructor(
    private readonly config: Pick<Config, 'timeouts' | 'upstreams' | 'offline'>,
    private readonly metrics: Metrics,
    now: Clock = systemClock,
  ) {
    for (const u of config.upstreams) this.gates.set(u.name, new Gate(u, config.offline, config.timeouts.manifest, metrics, now));
    this.agent = new Agent({ connect: { timeout: config.timeouts.connect }, keepAliveTimeout: 30_000, connections: 64 });
    // Cross-origin hops (a blob's 307 to a CDN or S3) lose Authorization in undici's redirect
    // handler (lib/handler/redirect-handler.js shouldRemoveHeader); S3 refuses requests carrying both.
    this.dispatcher = this.agent.compose(interceptors.redirect({ maxRedirections: 5 }));
  }

  async close(): Promise<void> {
    await this.agent.close();
  }

  /** The gate of an upstream: offline, breaker and rate-limit state (for the manifest decisions and the status page). */
  gate(upstream: string): Gate {
    return this.gates.get(upstream)!;
  }

  async getManifest(target: Target, reference: string, accept = FULL_ACCEPT): Promise<ManifestResponse> {
    const res = await this.send(target, 'manifest', 'GET', `manifests/${reference}`, { accept });
    await this.expectOk(res, target.upstream, 'manifest', 'MANIFEST_UNKNOWN');
    const announced = contentLength(res.headers);
    if (announced !== undefined && announced > MAX_MANIFEST_BYTES) {
      res.body.destroy();
      throw new OciError('MANIFEST_INVALID', `manifest of ${announced} bytes exceeds ${MAX_MANIFEST_BYTES} bytes`, { detail: { size: announced, limit: MAX_MANIFEST_BYTES } });
    }
    const body = await readLimited(res.body, MAX_MANIFEST_BYTES, 'manifest');
    return { body, contentType: header(res.headers, 'content-type'), digest: header(res.headers, 'docker-content-digest') };
  }

  async headManifest(target: Target, reference: string, accept = FULL_ACCEPT): Promise<HeadResponse> {
    const res = await this.send(target, 'manifest', 'HEAD', `manifests/${reference}`, { accept });
    await this.expectOk(res, target.upstream, 'manifest', 'MANIFEST_UNKNOWN');
    await res.body.dump();
    return { contentType: header(res.headers, 'content-type'), digest: header(res.headers, 'docker-content-digest'), size: contentLength(res.headers) };
  }

  async headBlob(target: Target, digest: string): Promise<HeadResponse> {
    const res = await this.send(target, 'blob', 'HEAD', `blobs/${digest}`, {});
    await this.expectOk(res, target.upstream, 'blob', 'BLOB_UNKNOWN');
    await res.body.dump();
    return { contentType: header(res.headers, 'content-type'), digest: header(res.headers, 'docker-content-digest'), size: contentLength(res.headers) };
  }

  /**
   * Starts a blob download, from byte `from` when resuming (RFC 9110 §14.2). `signal` is the
   * fill's own deadline, never a client's.
   */
  async getBlob(target: Target, digest: string, signal: AbortSignal, from = 0): Promise<BlobResponse> {
    const res = await this.send(target, 'blob', 'GET', `blobs/${digest}`, from > 0 ? { range: `bytes=${from}-` } : {}, undefined, signal);
    await this.expectOk(res, target.upstream, 'blob', 'BLOB_UNKNOWN');
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

  async listTags(target: Target, query: URLSearchParams): Promise<{ body: Buffer; hasNext: boolean }> {
    const res = await this.send(target, 'tags', 'GET', 'tags/list', { accept: 'application/json' }, query);
    await this.expectOk(res, target.upstream, 'tags', 'NAME_UNKNOWN');
    const body = await readLimited(res.body, MAX_SMALL_BODY, 'tag list');
    return { body, hasNext: /rel="?next"?/.test(header(res.headers, 'link') ?? '') };
  }

  /** Referrers pass through as they are; a 404 stays a 404 so clients use the tag schema fallback. */
  async getReferrers(target: Target, digest: string, query: URLSearchParams): Promise<{ body: Buffer; contentType: string | undefined; filtersApplied: string | undefined }> {
    const res = await this.send(target, 'referrers', 'GET', `referrers/${digest}`, { accept: 'application/vnd.oci.image.index.v1+json' }, query);
    await this.expectOk(res, target.upstream, 'referrers', 'MANIFEST_UNKNOWN');
    const body = await readLimited(res.body, MAX_MANIFEST_BYTES, 'referrers index');
    return { body, contentType: header(res.headers, 'content-type'), filtersApplied: header(res.headers, 'oci-filters-applied') };
  }

  /** One request, with a cached Authorization; on 401, authorize from the challenge and retry once. */
  private async send(
    target: Target,
    kind: RequestKind,
    method: 'GET' | 'HEAD',
    suffix: string,
    headers: Record<string, string>,
    query?: URLSearchParams,
    signal?: AbortSignal,
  ): Promise<Dispatcher.ResponseData> {
    const { upstream, name } = target;
    const url = new URL(upstream.url);
    url.pathname = `${url.pathname.replace(/\/+$/, '')}/v2/${name}/${suffix}`;
    url.search = query?.toString() ?? '';
    const scope = `repository:${name}:pull`;
    const cacheKey = `${upstream.name}\n${scope}`;
    let res = await this.dispatch(upstream, kind, url, method, headers, this.authCache.get(cacheKey), signal);
    if (res.statusCode !== 401) return res;
    const challenges = parseWwwAuthenticate(res.headers['www-authenticate']);
    await res.body.dump();
    const authorization = await this.tokenFlights.do(cacheKey, () => this.authorize(upstream, challenges, scope, cacheKey));
    if (authorization === undefined) throw new OciError('DENIED', `upstream ${upstream.name} requires authentication`);
    res = await this.dispatch(upstream, kind, url, method, headers, authorization, signal);
    return res;
  }

  private async dispatch(
    upstream: UpstreamConfig,
    kind: RequestKind,
    url: URL,
    method: 'GET' | 'HEAD',
    headers: Record<string, string>,
    authorization: string | undefined,
    signal: AbortSignal | undefined,
  ): Promise<Dispatcher.ResponseData> {
    const isBlob = kind === 'blob';
    const gate = this.gates.get(upstream.name)!;
    const permit = await gate.acquire();
    try {
      const res = await this.dispatcher.request({
        origin: url.origin,
        path: url.pathname + url.search,
        method,
        headers: { 'user-agent': 'ocicache', ...headers, ...(authorization ? { authorization } : {}) },
        signal,
        headersTimeout: this.config.timeouts.manifest,
        bodyTimeout: isBlob ? this.config.timeouts.blobIdle : this.config.timeouts.manifest,
      });
      this.metrics.upstreamRequests.inc({ upstream: upstream.name, kind, status: String(res.statusCode) });
      permit.done(res.statusCode >= 500 ? 'failed' : 'ok');
      // The slot is held until the body is finished: a blob download counts as one request in flight.
      res.body.once('close', permit.release);
      if (res.body.destroyed) permit.release();
      this.recordRateLimit(gate, res);
      return res;
    } catch (err) {
      permit.done('failed');
      permit.release();
      this.metrics.upstreamRequests.inc({ upstream: upstream.name, kind, status: 'error' });
      throw transportError(upstream, err);
    }
  }

  /** 429 → honour Retry-After; Docker Hub's ratelimit-* headers ("100;w=21600") → gauges. */
  private recordRateLimit(gate: Gate, res: Dispatcher.ResponseData): void {
    const name = gate.upstream.name;
    if (res.statusCode === 429) gate.rateLimited(header(res.headers, 'retry-after'));
    const limit = /^\s*(\d+)/.exec(header(res.headers, 'ratelimit-limit') ?? '');
    const remaining = /^\s*(\d+)/.exec(header(res.headers, 'ratelimit-remaining') ?? '');
    if (limit) this.metrics.ratelimitLimit.set({ upstream: name }, Number(limit[1]));
    if (remaining) this.metrics.ratelimitRemaining.set({ upstream: name }, Number(remaining[1]));
  }

  /** Returns the Authorization value to use, or undefined when the challenge can't be answered. */
  private async authorize(upstream: UpstreamConfig, challenges: Challenge[], scope: string, cacheKey: string): Promise<string | undefined> {
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    const basic = challenges.find((c) => c.scheme === 'basic');
    const credentials = upstream.auth ? `Basic ${Buffer.from(`${upstream.auth.username}:${upstream.auth.password}`).toString('base64')}` : undefined;
    if (bearer?.params.realm) {
      const token = await this.fetchToken(upstream, bearer, scope, credentials);
      this.authCache.set(cacheKey, `Bearer ${token.value}`, { ttl: token.ttl });
      return `Bearer ${token.value}`;
    }
    if (basic && credentials) {
      this.authCache.set(cacheKey, credentials, { ttl: 3_600_000 });
      return credentials;
    }
    return undefined;
  }

  private async fetchToken(upstream: UpstreamConfig, challenge: Challenge, scope: string, credentials: string | undefined): Promise<{ value: string; ttl: number }> {
    let realm: URL;
    try {
      realm = new URL(challenge.params.realm!);
    } catch {
      throw new OciError('DENIED', `upstream ${upstream.name} sent an invalid token realm`);
    }
    // The realm is chosen by the upstream: dial it, and send it credentials, only inside the
    // upstream's trust boundary (distribution registry/proxy/proxyauth.go realmAllowed).
    const allowed =
      upstream.tokenRealms.includes(realm.origin) ||
      (sameSite(realm.hostname, upstream.url.hostname) && (realm.protocol === 'https:' || realm.hostname === upstream.url.hostname));
    if (!allowed || (realm.protocol !== 'https:' && realm.protocol !== 'http:')) {
      throw new OciError('DENIED', `token realm ${realm.origin} is outside upstream ${upstream.name}; list it in upstreams[].tokenRealms to trust it`);
    }
    const service = challenge.params.service;
    if (service !== undefined) realm.searchParams.set('service', service);
    const scopes = new Set((challenge.params.scope ?? '').split(' ').filter(Boolean));
    scopes.add(scope);
    for (const s of [...scopes].sort()) realm.searchParams.append('scope', s);
    let res: Dispatcher.ResponseData;
    try {
      res = await this.dispatcher.request({
        origin: realm.origin,
        path: realm.pathname + realm.search,
        method: 'GET',
        headers: { 'user-agent': 'ocicache', ...(credentials ? { authorization: credentials } : {}) },
        headersTimeout: this.config.timeouts.manifest,
        bodyTimeout: this.config.timeouts.manifest,
      });
    } catch (err) {
      this.metrics.upstreamRequests.inc({ upstream: upstream.name, kind: 'token', status: 'error' });
      throw transportError(upstream, err);
    }
    this.metrics.upstreamRequests.inc({ upstream: upstream.name, kind: 'token', status: String(res.statusCode) });
    if (res.statusCode !== 200) {
      await res.body.dump();
      if (res.statusCode === 401 || res.statusCode === 403) throw new OciError('DENIED', `token server refused access to ${upstream.name}`);
      throw statusError(upstream, 'token', res.statusCode, res.headers, 'UNKNOWN');
    }
    let json: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      json = JSON.parse((await readLimited(res.body, 1024 * 1024, 'token response')).toString('utf8')) as typeof json;
    } catch {
      throw new OciError('UNKNOWN', `token server for ${upstream.name} sent an invalid answer`, { status: 502 });
    }
    const value = typeof json.access_token === 'string' && json.access_token ? json.access_token : json.token;
    if (typeof value !== 'string' || value === '') throw new OciError('UNKNOWN', `token server for ${upstream.name} sent no token`, { status: 502 });
    const seconds = typeof json.expires_in === 'number' && json.expires_in > 0 ? json.expires_in : DEFAULT_TOKEN_SECONDS;
    // Renew a little before expiry so an in-flight request never carries a dead token.
    return { value, ttl: Math.max(1000, (seconds - Math.min(30, seconds / 4)) * 1000) };
  }

  private async expectOk(res: Dispatcher.ResponseData, upstream: UpstreamConfig, kind: RequestKind, notFound: ErrorCode): Promise<void> {
    if (res.statusCode >= 200 && res.statusCode < 300) return;
    let code: string | undefined;
    let message: string | undefined;
    if (res.statusCode === 404) {
      // Keep the upstream's own *_UNKNOWN code when it sent a proper OCI envelope.
      try {
        const json = JSON.parse((await readLimited(res.body, 64 * 1024, 'error body')).toString('utf8')) as { errors?: Array<{ code?: string; message?: string }> };
        code = json.errors?.[0]?.code;
        message = json.errors?.[0]?.message;
      } catch {
        /* not JSON: use the default code */
      }
    } else {
      await res.body.dump().catch(() => undefined);
    }
    const keep = code === 'NAME_UNKNOWN' || code === 'MANIFEST_UNKNOWN' || code === 'BLOB_UNKNOWN' ? (code as ErrorCode) : notFound;
    throw statusError(upstream, kind, res.statusCode, res.headers, keep, message);
  }
}

function statusError(upstream: UpstreamConfig | undefined, kind: string, status: number, headers: Headers, notFound: ErrorCode, message?: string): OciError {
  const from = upstream ? ` ${upstream.name}` : '';
  if (status === 404) return new OciError(notFound, message);
  if (status === 401 || status === 403) return new OciError('DENIED', `upstream${from} refused access (${status})`);
  if (status === 429) {
    const retryAfter = header(headers, 'retry-after');
    return new OciError('TOOMANYREQUESTS', `upstream${from} is rate limiting`, { headers: retryAfter ? { 'retry-after': retryAfter } : {} });
  }
  if (status >= 500) return new OciError('UNAVAILABLE', `upstream${from} failed with ${status} for ${kind}`, { status: 502 });
  return new OciError('UNKNOWN', `upstream${from} answered ${status} for ${kind}`, { status: 502 });
}

const TIMEOUT_CODES = new Set(['UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_HEADERS_TIMEOUT', 'UND_ERR_BODY_TIMEOUT', 'ETIMEDOUT', 'ABORT_ERR', 'TimeoutError']);

function transportError(upstream: UpstreamConfig, err: unknown): OciError {
  if (err instanceof OciError) return err;
  const e = err as { code?: string; name?: string; message?: string };
  const timedOut = TIMEOUT_CODES.has(e.code ?? '') || TIMEOUT_CODES.has(e.name ?? '');
  return new OciError('UNAVAILABLE', `upstream ${upstream.name} ${timedOut ? 'timed out' : 'is unreachable'}`, {
    status: timedOut ? 504 : 503,
    cause: err,
  });
}
