/**
 * Authorizing requests to upstreams: Basic credentials (credentials.ts finds them), or a bearer token fetched from the realm
 * a 401's challenge names (distribution token authentication), kept per (upstream, scope) until
 * it expires. One token fetch per scope at a time, shared by every request waiting for it, so it
 * has its own deadline (timeouts.manifest) rather than any one request's.
 */
import { LRUCache } from 'lru-cache';
import type { Dispatcher } from 'undici';
import type { Clock } from '../core/clock.js';
import type { UpstreamAuth, UpstreamConfig } from '../core/config.js';
import { OciError } from '../core/errors.js';
import { SingleFlight } from '../core/single-flight.js';
import type { Metrics } from '../telemetry/metrics.js';
import { Credentials } from './credentials.js';
import type { Exchanger } from './exchange.js';
import type { Gate } from './gate.js';
import { header, readLimited, statusError, transportError } from './responses.js';
import { realmAccess } from './trust.js';
import type { Challenge } from './www-authenticate.js';

/** Token endpoints say "expires_in"; without it a token lives 60 s (distribution token spec). */
const DEFAULT_TOKEN_SECONDS = 60;
const MAX_TOKEN_BODY = 1024 * 1024;

export class Authorizer {
  /** Authorization header values by (upstream, scope), kept until the token or the credentials expire. */
  private readonly cache;
  private readonly flights = new SingleFlight<string | undefined>();

  constructor(
    private readonly exchanger: Exchanger,
    /** timeouts.manifest: the whole token exchange, headers and body. */
    private readonly timeout: number,
    private readonly metrics: Metrics,
    private readonly gate: (upstream: string) => Gate,
    private readonly credentials: Credentials,
    now: Clock,
  ) {
    this.cache = new LRUCache<string, string>({ max: 10_000, ttlAutopurge: false, perf: { now } });
  }

  /** The upstream refused the credentials sent to it: credentials found at run time are fetched again at the next authorize(). */
  refused(upstream: UpstreamConfig): void {
    this.credentials.invalidate(upstream);
  }

  /** The Authorization value known for (upstream, scope), if any. */
  cached(upstream: UpstreamConfig, scope: string): string | undefined {
    return this.cache.get(key(upstream, scope));
  }

  /** The Authorization value answering a 401's challenges, or undefined when they can't be answered. */
  authorize(upstream: UpstreamConfig, challenges: Challenge[], scope: string): Promise<string | undefined> {
    const cacheKey = key(upstream, scope);
    return this.flights.do(cacheKey, () => this.answer(upstream, challenges, scope, cacheKey));
  }

  private async answer(upstream: UpstreamConfig, challenges: Challenge[], scope: string, cacheKey: string): Promise<string | undefined> {
    const bearer = challenges.find((c) => c.scheme === 'bearer');
    const basic = challenges.find((c) => c.scheme === 'basic');
    const auth = await this.credentials.get(upstream);
    const credentials = basicOf(auth);
    if (bearer?.params.realm) {
      let token: { value: string; ttl: number };
      try {
        token = await this.fetchToken(upstream, bearer, scope, credentials);
      } catch (err) {
        // Credentials found at run time may have been rotated since they were read: once more, fresh.
        if (!(err instanceof TokenRefused) || !Credentials.dynamic(upstream)) throw err;
        this.credentials.invalidate(upstream);
        const fresh = basicOf(await this.credentials.get(upstream));
        if (fresh === credentials) throw err;
        token = await this.fetchToken(upstream, bearer, scope, fresh);
      }
      this.cache.set(cacheKey, `Bearer ${token.value}`, { ttl: token.ttl });
      return `Bearer ${token.value}`;
    }
    if (basic && credentials) {
      // Credentials found at run time are sent only as long as credentials.ts keeps them (credentials.ttl, or less when
      // they say they expire sooner); a rotated secret is used after that, or at the first refusal.
      this.cache.set(cacheKey, credentials, { ttl: Credentials.dynamic(upstream) ? Math.max(1, this.credentials.remaining(upstream)) : 3_600_000 });
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
    // The realm is chosen by the upstream: credentials go only to its own origin, its tokenRealms
    // or a known pair; other realms are asked anonymously or not at all (trust.ts realmAccess).
    const withCredentials = credentials !== undefined;
    const access = realmAccess(upstream, realm, withCredentials);
    if ('refused' in access) throw new OciError('DENIED', `token realm ${realm.origin} of upstream ${upstream.name} is refused: ${access.refused}`);
    const service = challenge.params.service;
    if (service !== undefined) realm.searchParams.set('service', service);
    const scopes = new Set((challenge.params.scope ?? '').split(' ').filter(Boolean));
    scopes.add(scope);
    for (const s of [...scopes].sort()) realm.searchParams.append('scope', s);
    let res: Dispatcher.ResponseData;
    let text: Buffer;
    try {
      // Shared by every waiter for the scope: its own total deadline, no client's.
      // A redirect from the realm is judged as a realm would be; credentials never leave its origin.
      res = await this.exchanger.request(upstream, realm, access, (_from, to) => realmAccess(upstream, to, withCredentials), {
        method: 'GET',
        headers: { 'user-agent': 'ocicache' },
        authorization: credentials,
        signal: AbortSignal.timeout(this.timeout),
        headersTimeout: this.timeout,
        bodyTimeout: this.timeout,
        what: 'a token request',
      });
    } catch (err) {
      this.metrics.upstreamRequests.inc({ upstream: upstream.name, kind: 'token', status: 'error' });
      throw transportError(upstream, err);
    }
    this.metrics.upstreamRequests.inc({ upstream: upstream.name, kind: 'token', status: String(res.statusCode) });
    try {
      if (res.statusCode !== 200) {
        await res.body.dump();
        if (res.statusCode === 401 || res.statusCode === 403) throw new TokenRefused(upstream);
        // A token server serves every repository: its 429 holds for the whole upstream.
        const wait = res.statusCode === 429 ? this.gate(upstream.name).rateLimited(header(res.headers, 'retry-after')) : 0;
        throw statusError(upstream, 'token', res.statusCode, 'UNKNOWN', undefined, wait);
      }
      text = await readLimited(upstream, res.body, MAX_TOKEN_BODY, 'token response');
    } catch (err) {
      throw transportError(upstream, err);
    }
    let json: { token?: unknown; access_token?: unknown; expires_in?: unknown };
    try {
      json = JSON.parse(text.toString('utf8')) as typeof json;
    } catch {
      throw new OciError('UNKNOWN', `token server for ${upstream.name} sent an invalid answer`, { status: 502 });
    }
    const value = typeof json.access_token === 'string' && json.access_token ? json.access_token : json.token;
    if (typeof value !== 'string' || value === '') throw new OciError('UNKNOWN', `token server for ${upstream.name} sent no token`, { status: 502 });
    const seconds = typeof json.expires_in === 'number' && json.expires_in > 0 ? json.expires_in : DEFAULT_TOKEN_SECONDS;
    // Renew a little before expiry so an in-flight request never carries a dead token.
    return { value, ttl: Math.max(1000, (seconds - Math.min(30, seconds / 4)) * 1000) };
  }
}

/** The token server refused the credentials (401/403). */
class TokenRefused extends OciError {
  constructor(upstream: UpstreamConfig) {
    super('DENIED', `token server refused access to ${upstream.name}`);
  }
}

function basicOf(auth: UpstreamAuth | undefined): string | undefined {
  return auth ? `Basic ${Buffer.from(`${auth.username}:${auth.password}`).toString('base64')}` : undefined;
}

function key(upstream: UpstreamConfig, scope: string): string {
  return `${upstream.name}\n${scope}`;
}
