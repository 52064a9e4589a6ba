/**
 * Sending one request to an upstream and following its redirects, one hop at a time, each hop
 * judged by the caller's rule (trust.ts) before anything is sent to it. undici's own redirect
 * handler would follow any host and scheme; here a refused hop is the upstream's error (502) and
 * its target is never dialled. Authorization is dropped at the first hop to another origin and
 * never comes back. Hosts the operator named go through one agent; hosts an upstream chose
 * (`restrict`) through agents whose DNS lookup keeps only public addresses and the upstream's own
 * kind (addresses.ts), so the check holds for the address actually connected to, and an IP literal
 * is checked before any lookup. An upstream with TLS options (caFile, a client certificate,
 * insecure) has an agent of its own, used only for its own origin and its tokenRealms: a redirect
 * elsewhere (a CDN) is verified against Node's default roots and never gets the client certificate.
 */
import type { LookupFunction } from 'node:net';
import { rootCertificates } from 'node:tls';
import { Agent, type Dispatcher } from 'undici';
import type { UpstreamConfig } from '../core/config.js';
import { OciError } from '../core/errors.js';
import { filteredLookup, literalKind, systemLookup, UpstreamAddressKinds, type AddressKind } from './addresses.js';
import { header } from './responses.js';
import type { Hop } from './trust.js';

/** How the cache reaches the network: the DNS lookup and extra TLS trust anchors (tests, embedding); the system's by default. */
export interface Network {
  lookup?: LookupFunction;
  ca?: string | Buffer | Array<string | Buffer>;
}

export interface Exchange {
  method: 'GET' | 'HEAD';
  headers: Record<string, string>;
  authorization?: string;
  signal?: AbortSignal;
  headersTimeout: number;
  bodyTimeout: number;
  /** What is asked, for messages: "a manifest request". */
  what: string;
}

const REDIRECT_STATUSES = new Set([301, 302, 303, 307, 308]);
/** As undici's redirect handler was configured before (maxRedirections 5). */
const MAX_REDIRECTS = 5;

export class Exchanger {
  private readonly agent: Agent;
  private readonly restricted = new Map<string, Agent>();
  /** Per upstream name, for upstreams with TLS options. */
  private readonly own = new Map<string, Agent>();
  private readonly upstreamKinds: UpstreamAddressKinds;

  constructor(
    private readonly connectTimeout: number,
    private readonly network: Network = {},
  ) {
    this.agent = this.newAgent(network.lookup);
    this.upstreamKinds = new UpstreamAddressKinds(network.lookup);
  }

  async close(): Promise<void> {
    await Promise.all([this.agent, ...this.restricted.values(), ...this.own.values()].map((a) => a.close()));
  }

  /**
   * Sends the request to `url` (dialled as `first` says) and follows up to MAX_REDIRECTS
   * redirects, each as `next(from, to)` says. Returns the first answer that is not a redirect
   * (a 3xx without Location included); the caller owns its body. Throws an OciError (502) for a
   * refused hop, and what undici throws for a failed one.
   */
  async request(upstream: UpstreamConfig, url: URL, first: Hop, next: (from: URL, to: URL) => Hop, x: Exchange): Promise<Dispatcher.ResponseData> {
    let at = url;
    let hop = first;
    let authorization = x.authorization;
    for (let redirects = 0; ; redirects++) {
      const dispatcher = await this.dispatcherFor(upstream, at, hop, x.what, redirects > 0);
      let res: Dispatcher.ResponseData;
      try {
        res = await dispatcher.request({
          origin: at.origin,
          path: at.pathname + at.search,
          method: x.method,
          headers: { ...x.headers, ...(authorization ? { authorization } : {}) },
          signal: x.signal,
          headersTimeout: x.headersTimeout,
          bodyTimeout: x.bodyTimeout,
        });
      } catch (err) {
        if ((err as { code?: string }).code === 'ERR_OCICACHE_ADDRESS_REFUSED') throw refused(upstream, x.what, at, (err as Error).message, redirects > 0);
        throw err;
      }
      const location = REDIRECT_STATUSES.has(res.statusCode) ? header(res.headers, 'location') : undefined;
      if (location === undefined) {
        // A challenge is the upstream's to make: one from a host it redirected to (a CDN, a bucket)
        // would have the proxy fetch tokens and resend the upstream's credentials on a third party's say.
        if (res.statusCode === 401 && at.origin !== url.origin) {
          await res.body.dump().catch(() => undefined);
          throw refused(upstream, x.what, at, 'it answered 401, and only the upstream itself may ask for credentials', true);
        }
        return res;
      }
      await res.body.dump().catch(() => undefined);
      if (redirects >= MAX_REDIRECTS) throw Object.assign(new Error(`more than ${MAX_REDIRECTS} redirects`), { code: 'ERR_OCICACHE_TOO_MANY_REDIRECTS' });
      let to: URL;
      try {
        to = new URL(location, at);
      } catch {
        throw refused(upstream, x.what, undefined, `Location ${JSON.stringify(location.slice(0, 200))} is not a URL`, true);
      }
      hop = at.protocol === 'https:' && to.protocol === 'http:' ? { refused: 'a redirect from HTTPS to HTTP is never followed' } : next(at, to);
      // Credentials are for the origin they were meant for (undici's and Go's redirect handlers do the same).
      if (to.origin !== at.origin) authorization = undefined;
      at = to;
    }
  }

  /** The agent for one hop, or the OciError refusing it: by the rule, then by the host's literal address. */
  private async dispatcherFor(upstream: UpstreamConfig, url: URL, hop: Hop, what: string, redirected: boolean): Promise<Dispatcher> {
    if ('refused' in hop) throw refused(upstream, what, url, hop.refused, redirected);
    if (!hop.restrict) return upstream.tls && (url.origin === upstream.url.origin || upstream.tokenRealms.includes(url.origin)) ? this.ownAgent(upstream) : this.agent;
    const allowed = await this.upstreamKinds.allowed(upstream.url.hostname);
    const literal = literalKind(url.hostname);
    if (literal !== undefined && !allowed.has(literal)) throw refused(upstream, what, url, `a ${literal} address, and the upstream is not on one`, redirected);
    const key = [...allowed].sort().join(',');
    let agent = this.restricted.get(key);
    if (!agent) this.restricted.set(key, (agent = this.newAgent(filteredLookup(this.network.lookup ?? systemLookup, allowed as ReadonlySet<AddressKind>))));
    return agent;
  }

  /** The agent for the upstream's own origin and token realms: its CA added to the default roots, its client certificate, insecure. */
  private ownAgent(upstream: UpstreamConfig): Agent {
    let agent = this.own.get(upstream.name);
    if (agent) return agent;
    const tls = upstream.tls!;
    const extra = this.network.ca === undefined ? [] : Array.isArray(this.network.ca) ? this.network.ca : [this.network.ca];
    const ca = tls.ca !== undefined ? [...rootCertificates, tls.ca, ...extra] : this.network.ca;
    const connect = {
      timeout: this.connectTimeout,
      ...(this.network.lookup ? { lookup: this.network.lookup } : {}),
      ...(ca ? { ca } : {}),
      ...(tls.cert !== undefined ? { cert: tls.cert, key: tls.key } : {}),
      rejectUnauthorized: !tls.insecure,
    };
    this.own.set(upstream.name, (agent = new Agent({ connect, keepAliveTimeout: 30_000, connections: 64 })));
    return agent;
  }

  private newAgent(lookup: LookupFunction | undefined): Agent {
    const connect = { timeout: this.connectTimeout, ...(lookup ? { lookup } : {}), ...(this.network.ca ? { ca: this.network.ca } : {}) };
    return new Agent({ connect, keepAliveTimeout: 30_000, connections: 64 });
  }
}

/** A hop not taken: the upstream's fault, so 502, and not "unavailable" enough to resume a blob over (cache/blobs.ts). */
function refused(upstream: UpstreamConfig, what: string, to: URL | undefined, reason: string, redirected: boolean): OciError {
  const where = to ? `${redirected ? 'redirected' : 'sent'} ${what} to ${to.origin}` : `redirected ${what}`;
  return new OciError('UNKNOWN', `upstream ${upstream.name} ${where}, which is refused: ${reason}`, { status: 502 });
}
