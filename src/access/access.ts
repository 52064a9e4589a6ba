/**
 * Access control: who a client is (Basic credentials checked against htpasswd, a bearer token
 * from our /token endpoint, or a verified client certificate) and whether the access rules let
 * them read a repository of an upstream. http/ asks here before handing a request to cache/; cache/ never knows who asked.
 *
 * Both questions have a synchronous answer for the warm path (http/warm-path.ts) once the work
 * behind them was done: a verified password or token is remembered (htpasswd.ts, tokens.ts) and a
 * decision per (identity, upstream, repository) is kept in a small memo. Anything not known
 * synchronously is left to the Fastify path, which does the asynchronous checks.
 */
import type { AccessConfig } from '../core/access-config.js';
import type { Metrics } from '../telemetry/metrics.js';
import { LRUCache } from 'lru-cache';
import { compileGlobs } from './glob.js';
import { Htpasswd } from './htpasswd.js';
import { readTokenKey, Tokens, type Issued } from './tokens.js';

export interface Identity {
  /** The authenticated user; undefined: anonymous. */
  readonly user: string | undefined;
  /** Whether the client sent credentials at all (an anonymous token counts): /v2/ answers 401 only to those that did not. */
  readonly presented: boolean;
}

export const NO_CREDENTIALS: Identity = Object.freeze({ user: undefined, presented: false });
const ANONYMOUS_TOKEN: Identity = Object.freeze({ user: undefined, presented: true });

/** Why a request was refused, the label of ocicache_access_denied_total (bounded on purpose). */
export type Denial = 'unauthenticated' | 'forbidden' | 'bad_credentials';

interface Rule {
  upstreams: ReadonlySet<string> | undefined;
  repository: (name: string) => boolean;
  anonymous: boolean;
  authenticated: boolean;
  /** Users named directly or through a group. */
  users: ReadonlySet<string>;
}

const DECISIONS = 10_000;

type Credentials = { basic: [string, string] } | { bearer: string } | null | undefined;

/**
 * The user a TLS client certificate names (http/ reads it from the connection): its subject's CN
 * when the certificate was verified against server.tls.clientCaFile; null for a certificate that
 * was presented but not verified, or names no single CN; undefined when none was presented.
 */
export type CertificateUser = string | null | undefined;

/** Users for a setup without htpasswd (clientCertificates alone): nobody has a password. */
const NO_PASSWORDS: Pick<Htpasswd, 'has' | 'verifiedSync' | 'verify'> = { has: () => false, verifiedSync: () => false, verify: async () => false };

/** The credentials of an Authorization header: undefined when absent, null when malformed or of another scheme. */
function credentials(header: string | undefined): Credentials {
  if (header === undefined || header === '') return undefined;
  const space = header.indexOf(' ');
  const scheme = header.slice(0, space).toLowerCase();
  const value = header.slice(space + 1).trim();
  if (space > 0 && scheme === 'bearer' && value !== '') return { bearer: value };
  if (space > 0 && scheme === 'basic') {
    const decoded = Buffer.from(value, 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon > 0) return { basic: [decoded.slice(0, colon), decoded.slice(colon + 1)] };
  }
  return null;
}

export class Access {
  /** The configured token URL; undefined: http/ derives it from each request's Host. */
  readonly realm: string | undefined;
  /** Whether http/ should pass the client certificate's user (access.clientCertificates). */
  readonly certificates: boolean;
  private readonly htpasswd: Pick<Htpasswd, 'has' | 'verifiedSync' | 'verify'>;
  private readonly tokens: Tokens;
  private readonly rules: Rule[];
  private readonly decisions = new LRUCache<string, boolean>({ max: DECISIONS });

  constructor(
    config: AccessConfig,
    private readonly metrics: Metrics,
    warn: (obj: object, msg: string) => void,
    now: () => number = Date.now,
  ) {
    this.realm = config.realm;
    this.certificates = config.clientCertificates;
    this.htpasswd = config.htpasswd === undefined ? NO_PASSWORDS : new Htpasswd(config.htpasswd, warn, now, (stale) => metrics.htpasswdStale.set(stale ? 1 : 0));
    this.tokens = new Tokens(readTokenKey(config.tokenKeyFile), config.tokenTtl, now);
    this.rules = config.rules.map((r) => {
      const users = new Set<string>();
      for (const a of r.allow) {
        if (a.startsWith('group:')) for (const u of config.groups[a.slice(6)] ?? []) users.add(u);
        else users.add(a);
      }
      return {
        upstreams: r.upstreams === '*' ? undefined : new Set(r.upstreams),
        repository: compileGlobs(r.repositories),
        anonymous: r.allow.includes('anonymous'),
        authenticated: r.allow.includes('authenticated'),
        users,
      };
    });
  }

  /**
   * Who sent this Authorization header, when known without asynchronous work: the identity; null
   * for credentials known to be bad; undefined when only identify() can tell.
   */
  identifySync(header: string | undefined, certificate?: CertificateUser): Identity | null | undefined {
    if (this.certificates && certificate === null) return null;
    const c = credentials(header);
    if (c === undefined) return this.withCertificate(NO_CREDENTIALS, certificate);
    if (c === null) return null;
    if ('basic' in c) return this.htpasswd.verifiedSync(c.basic[0], c.basic[1]) ? { user: c.basic[0], presented: true } : undefined;
    const t = this.tokens.verifiedSync(c.bearer);
    if (t === undefined || t === null) return t;
    return this.withCertificate(this.tokenIdentity(t.user), certificate);
  }

  /**
   * Who sent this request; null: bad credentials (wrong password, not our token, expired, a client
   * certificate that was not verified). A user named by the Authorization header comes first; a
   * client certificate names the user otherwise (an anonymous token included, which clients that
   * always follow the challenge hold).
   */
  async identify(header: string | undefined, certificate?: CertificateUser): Promise<Identity | null> {
    if (this.certificates && certificate === null) return null;
    const c = credentials(header);
    if (c === undefined) return this.withCertificate(NO_CREDENTIALS, certificate);
    if (c === null) return null;
    if ('basic' in c) return (await this.htpasswd.verify(c.basic[0], c.basic[1])) ? { user: c.basic[0], presented: true } : null;
    const t = await this.tokens.verify(c.bearer);
    return t === null ? null : this.withCertificate(this.tokenIdentity(t.user), certificate);
  }

  private withCertificate(id: Identity | null, certificate: CertificateUser): Identity | null {
    if (id === null || id.user !== undefined || !this.certificates || !certificate) return id;
    return { user: certificate, presented: true };
  }

  /** A token's user must still be in htpasswd: removing a user revokes their tokens (within a second). */
  private tokenIdentity(user: string | undefined): Identity | null {
    if (user === undefined) return ANONYMOUS_TOKEN;
    return this.htpasswd.has(user) ? { user, presented: true } : null;
  }

  /** Basic credentials for /token: the user, or null when wrong. */
  async login(header: string | undefined): Promise<Identity | null> {
    const c = credentials(header);
    if (c === undefined) return NO_CREDENTIALS;
    if (c === null || !('basic' in c)) return null;
    return (await this.htpasswd.verify(c.basic[0], c.basic[1])) ? { user: c.basic[0], presented: true } : null;
  }

  issue(identity: Identity): Promise<Issued> {
    return this.tokens.issue(identity.user);
  }

  /** Whether the rules let `identity` read repository `name` of `upstream` (its own name, e.g. library/alpine). First match wins; none: no. */
  allowed(identity: Identity, upstream: string, name: string): boolean {
    const key = `${identity.user ?? ''}\0${upstream}\0${name}`;
    let ok = this.decisions.get(key);
    if (ok === undefined) {
      ok = this.decide(identity.user, upstream, name);
      this.decisions.set(key, ok);
    }
    return ok;
  }

  private decide(user: string | undefined, upstream: string, name: string): boolean {
    for (const r of this.rules) {
      if (r.upstreams && !r.upstreams.has(upstream)) continue;
      if (!r.repository(name)) continue;
      return r.anonymous || (user !== undefined && (r.authenticated || r.users.has(user)));
    }
    return false;
  }

  /** Counts a refused request. */
  denied(reason: Denial): void {
    this.metrics.accessDenied.inc({ reason });
  }
}
