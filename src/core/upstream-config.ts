/**
 * The `upstreams` section: one registry each, with its policy (`upstreamDefaults` sets it for all),
 * credentials and TLS trust. Validated here with messages naming the bad key.
 */
import { readFileSync } from 'node:fs';
import { createSecureContext } from 'node:tls';
import { bool, duration, hostKey, int, readSecret, section, str, type Obj, type SecretNeeds } from './config-values.js';
import { ConfigError } from './config-error.js';

export interface UpstreamAuth {
  username: string;
  /** Resolved secret; read from passwordEnv or passwordFile at start-up, never from the config text. */
  password: string;
}

/**
 * Credentials found at run time rather than written in the config: a Docker config file (the
 * format of a kubernetes.io/dockerconfigjson pull secret: `auths`, `credHelpers`, `credsStore`),
 * re-read when it changes, or a docker-credential-helpers program (`docker-credential-<helper> get`).
 * upstream/credentials.ts reads them.
 */
export type CredentialSource = { dockerConfig: string } | { helper: string };

export interface UpstreamConfig {
  /** The key clients use (`ns=<name>`, `/v2/<name>/…`), e.g. `docker.io`. */
  name: string;
  url: URL;
  aliases: string[];
  /** Docker Hub's rule: a one-segment name means `library/<name>`. */
  dockerHubLibrary: boolean;
  tagTtl: number;
  /** Credentials written in the config (password from an env variable or a file), read at start-up. */
  auth?: UpstreamAuth;
  /** Credentials found at run time (auth.dockerConfig, auth.helper, or the top-level credentials.dockerConfig). */
  credentials?: CredentialSource;
  /** Extra token realm origins that may receive this upstream's credentials. */
  tokenRealms: string[];
  /** Hosts (`registry.example.com`, `*.example.com`) its manifests, tag lists and referrers may be redirected to, and any redirect may reach at any address. */
  redirectHosts: string[];
  /** Serve only from the cache; send nothing to this upstream. */
  offline: boolean;
  /** Blobs last used through this upstream longer ago than this are expired; undefined: never. */
  maxAge: number | undefined;
  /** Requests to this upstream at once; more wait in line. */
  maxConcurrent: number;
  /** Requests per second to this upstream; 0: unlimited. */
  maxRequestsPerSecond: number;
  /** Consecutive transport failures that open the circuit breaker; 0: never. */
  breakerFailures: number;
  breakerCooldown: number;
  /** Times a broken blob download is resumed with Range before the fill fails. */
  blobRetries: number;
  /** The longest a 429 keeps requests away, whatever its Retry-After says; 0: a 429 blocks nothing. */
  maxRetryAfter: number;
  /** TLS towards this upstream (caFile, clientCertFile and clientKeyFile, insecure); undefined: Node's defaults. */
  tls: UpstreamTls | undefined;
  /**
   * Reached through a parent cache (the `parent` section): `url`, `auth` and `tls` are then the
   * parent's, every request carries `ns=<name>`, and answers must say `OCI-Namespace: <name>`.
   */
  viaParent: boolean;
  /** With a parent and parent.fallback: the upstream as it is reached without the parent. */
  direct?: UpstreamConfig;
}

export interface UpstreamTls {
  /** PEM text of caFile: trusted in addition to Node's default roots, never instead of them. */
  ca: string | undefined;
  /** PEM client certificate and key, presented to the upstream's own origin and its tokenRealms only. */
  cert: string | undefined;
  key: string | undefined;
  /** The upstream's certificate is not verified (logged at start-up, shown on the status page). */
  insecure: boolean;
}

/** The per-upstream knobs that `upstreamDefaults` sets for all and each upstream may override. */
export const POLICY_KEYS = ['offline', 'maxAge', 'maxConcurrent', 'maxRequestsPerSecond', 'breakerFailures', 'breakerCooldown', 'blobRetries', 'maxRetryAfter'] as const;
export type Policy = Pick<UpstreamConfig, (typeof POLICY_KEYS)[number]>;

/** A redirect host: a name or IPv4 address, `*.` and a domain, or a bracketed IPv6 address; never a port. */
const REDIRECT_HOST = /^((\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])$/;

export function policy(o: Obj, path: string, base: Policy): Policy {
  const has = (k: string): boolean => o[k] !== undefined && o[k] !== null;
  const rps = o.maxRequestsPerSecond ?? base.maxRequestsPerSecond;
  if (typeof rps !== 'number' || !(rps >= 0)) throw new ConfigError(`${path}.maxRequestsPerSecond`, 'must be a number >= 0 (0: unlimited)');
  return {
    offline: bool(o, 'offline', path, base.offline),
    maxAge: has('maxAge') ? duration(o.maxAge, `${path}.maxAge`) : base.maxAge,
    maxConcurrent: int(o, 'maxConcurrent', path, base.maxConcurrent, 1),
    maxRequestsPerSecond: rps,
    breakerFailures: int(o, 'breakerFailures', path, base.breakerFailures),
    breakerCooldown: has('breakerCooldown') ? duration(o.breakerCooldown, `${path}.breakerCooldown`) : base.breakerCooldown,
    blobRetries: int(o, 'blobRetries', path, base.blobRetries),
    maxRetryAfter: has('maxRetryAfter') ? duration(o.maxRetryAfter, `${path}.maxRetryAfter`) : base.maxRetryAfter,
  };
}

const TLS_KEYS = ['caFile', 'clientCertFile', 'clientKeyFile', 'insecure'];

function pemFile(o: Obj, key: string, path: string, read: boolean): string | undefined {
  if (o[key] === undefined || o[key] === null) return undefined;
  const file = str(o, key, path);
  if (!read) return '';
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(`${path}.${key}`, `cannot read ${file}: ${(err as Error).message}`);
  }
  if (!text.includes('-----BEGIN ')) throw new ConfigError(`${path}.${key}`, `${file} holds no PEM data`);
  return text;
}

/**
 * caFile, clientCertFile + clientKeyFile, insecure. The files are read (and the pair checked to
 * match) only when `read` (upstream credentials are needed), like the passwords.
 */
function upstreamTls(o: Obj, path: string, url: URL, read: boolean): UpstreamTls | undefined {
  const insecure = bool(o, 'insecure', path, false);
  const ca = pemFile(o, 'caFile', path, read);
  const cert = pemFile(o, 'clientCertFile', path, read);
  const key = pemFile(o, 'clientKeyFile', path, read);
  if (ca === undefined && cert === undefined && key === undefined && !insecure) return undefined;
  if (url.protocol !== 'https:') throw new ConfigError(path, 'caFile, clientCertFile, clientKeyFile and insecure apply to an https url only');
  if ((cert === undefined) !== (key === undefined)) throw new ConfigError(`${path}.${cert === undefined ? 'clientCertFile' : 'clientKeyFile'}`, 'clientCertFile and clientKeyFile go together');
  if (read) {
    try {
      if (ca !== undefined) createSecureContext({ ca });
    } catch (err) {
      throw new ConfigError(`${path}.caFile`, `not a PEM certificate bundle: ${(err as Error).message}`);
    }
    try {
      if (cert !== undefined) createSecureContext({ cert, key });
    } catch (err) {
      throw new ConfigError(`${path}.clientKeyFile`, `not a PEM key matching clientCertFile: ${(err as Error).message}`);
    }
  }
  return { ca, cert, key, insecure };
}

/** A username and its password from passwordEnv or passwordFile (read only when `needs` says so). */
function staticAuth(a: Obj, path: string, env: NodeJS.ProcessEnv, needs: SecretNeeds): UpstreamAuth {
  return { username: str(a, 'username', path), password: needs.upstreamAuth ? readSecret(a, path, env) : '' };
}

/** auth.dockerConfig or auth.helper (or the same keys of the top-level `credentials`); undefined when neither is set. */
export function credentialSource(a: Obj, path: string): CredentialSource | undefined {
  if (a.dockerConfig !== undefined && a.helper !== undefined) throw new ConfigError(path, 'dockerConfig or helper, not both');
  if (a.dockerConfig !== undefined) return { dockerConfig: str(a, 'dockerConfig', path) };
  if (a.helper !== undefined) {
    const helper = str(a, 'helper', path);
    // The program is docker-credential-<helper>, found on PATH: a name, never a path or arguments.
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(helper)) throw new ConfigError(`${path}.helper`, `must be a helper name such as ecr-login (docker-credential-ecr-login on PATH), got ${JSON.stringify(helper)}`);
    return { helper };
  }
  return undefined;
}

export function upstream(
  raw: unknown,
  i: number,
  defaults: { tagTtl: number; policy: Policy; credentials?: CredentialSource },
  env: NodeJS.ProcessEnv,
  needs: SecretNeeds,
): UpstreamConfig {
  const path = `upstreams[${i}]`;
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new ConfigError(path, 'must be a mapping');
  const o = section({ u: raw }, 'u', path, ['name', 'url', 'aliases', 'dockerHubLibrary', 'tagTtl', 'auth', 'tokenRealms', 'redirectHosts', ...TLS_KEYS, ...POLICY_KEYS]);
  const name = hostKey(o.name, `${path}.name`);
  let url: URL;
  try {
    url = new URL(str(o, 'url', path));
  } catch {
    throw new ConfigError(`${path}.url`, `must be an absolute http(s) URL, got ${JSON.stringify(o.url)}`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new ConfigError(`${path}.url`, 'must use http or https');
  if (url.username || url.password) throw new ConfigError(`${path}.url`, 'must not contain credentials: use auth');
  const aliases = o.aliases ?? [];
  if (!Array.isArray(aliases)) throw new ConfigError(`${path}.aliases`, 'must be a list of host names');
  const tokenRealms = o.tokenRealms ?? [];
  if (!Array.isArray(tokenRealms)) throw new ConfigError(`${path}.tokenRealms`, 'must be a list of URLs');
  const redirectHosts = o.redirectHosts ?? [];
  if (!Array.isArray(redirectHosts)) throw new ConfigError(`${path}.redirectHosts`, 'must be a list of host names');
  let auth: UpstreamAuth | undefined;
  let credentials: CredentialSource | undefined = defaults.credentials;
  if (o.auth !== undefined) {
    const a = section(o, 'auth', `${path}.auth`, ['username', 'password', 'passwordEnv', 'passwordFile', 'dockerConfig', 'helper']);
    const found = credentialSource(a, `${path}.auth`);
    if (found) {
      if (a.username !== undefined || a.passwordEnv !== undefined || a.passwordFile !== undefined || a.password !== undefined) {
        throw new ConfigError(`${path}.auth`, 'username and a password, dockerConfig, or helper: one of them');
      }
      credentials = found;
    } else {
      credentials = undefined;
      auth = staticAuth(a, `${path}.auth`, env, needs);
    }
  }
  return {
    name,
    url,
    aliases: aliases.map((a, j) => hostKey(a, `${path}.aliases[${j}]`)),
    dockerHubLibrary: bool(o, 'dockerHubLibrary', path, false),
    tagTtl: o.tagTtl === undefined ? defaults.tagTtl : duration(o.tagTtl, `${path}.tagTtl`),
    auth,
    ...(credentials ? { credentials } : {}),
    tokenRealms: tokenRealms.map((r, j) => {
      try {
        return new URL(String(r)).origin;
      } catch {
        throw new ConfigError(`${path}.tokenRealms[${j}]`, 'must be an absolute URL');
      }
    }),
    redirectHosts: redirectHosts.map((h, j) => {
      if (typeof h !== 'string' || !REDIRECT_HOST.test(h.toLowerCase())) {
        throw new ConfigError(`${path}.redirectHosts[${j}]`, `must be a host name such as cdn.example.com or *.example.com (no scheme or port), got ${JSON.stringify(h)}`);
      }
      return h.toLowerCase();
    }),
    ...policy(o, path, defaults.policy),
    tls: upstreamTls(o, path, url, needs.upstreamAuth),
    viaParent: false,
  };
}

/** The `parent` section: another ocicache (or fleet) that this one asks for every upstream. */
export interface ParentConfig {
  url: URL;
  /** Credentials for the parent's own access control; never an upstream's. */
  auth?: UpstreamAuth;
  tls: UpstreamTls | undefined;
  /** When the parent cannot be reached (refused, down, its breaker open), ask the upstream itself, without credentials. */
  fallback: boolean;
}

export function parentConfig(raw: unknown, env: NodeJS.ProcessEnv, needs: SecretNeeds): ParentConfig | undefined {
  if (raw === undefined || raw === null) return undefined;
  const o = section({ parent: raw }, 'parent', 'parent', ['url', 'auth', 'fallback', ...TLS_KEYS]);
  let url: URL;
  try {
    url = new URL(str(o, 'url', 'parent'));
  } catch {
    throw new ConfigError('parent.url', `must be an absolute http(s) URL, got ${JSON.stringify(o.url)}`);
  }
  if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new ConfigError('parent.url', 'must use http or https');
  if (url.username || url.password || url.search) throw new ConfigError('parent.url', 'must be the parent\'s base URL: no credentials (use auth), no query');
  const auth = o.auth === undefined ? undefined : staticAuth(section(o, 'auth', 'parent.auth', ['username', 'password', 'passwordEnv', 'passwordFile']), 'parent.auth', env, needs);
  return { url, auth, tls: upstreamTls(o, 'parent', url, needs.upstreamAuth), fallback: bool(o, 'fallback', 'parent', false) };
}

/**
 * An upstream as a cache with a parent reaches it: through the parent, with the parent's
 * credentials and trust. It may hold no credentials of its own (the parent does), and what the
 * upstream's redirects and token realms would allow is the parent's business.
 */
export function throughParent(u: UpstreamConfig, i: number, parent: ParentConfig): UpstreamConfig {
  if (u.auth !== undefined || u.credentials !== undefined) throw new ConfigError(`upstreams[${i}].auth`, 'a cache with a parent holds no upstream credentials (the parent does): remove auth');
  if (u.tls !== undefined) throw new ConfigError(`upstreams[${i}]`, 'caFile, clientCertFile, clientKeyFile and insecure are the parent\'s with a parent: set them under parent');
  return { ...u, url: parent.url, auth: parent.auth, tls: parent.tls, tokenRealms: [], redirectHosts: [], viaParent: true, ...(parent.fallback ? { direct: u } : {}) };
}
