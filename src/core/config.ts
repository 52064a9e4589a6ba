/**
 * Configuration: a YAML file (config/default.yaml documents every key), a short list of env
 * overrides, and validation that names the bad key. The result is plain frozen data with
 * durations in milliseconds and sizes in bytes.
 */
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml } from 'yaml';
import { parseDuration, parseSize } from './units.js';
import { buildAccessConfig, type AccessConfig } from './access-config.js';
import { ConfigError } from './config-error.js';

export interface UpstreamAuth {
  username: string;
  /** Resolved secret; read from passwordEnv or passwordFile at start-up, never from the config text. */
  password: string;
}

export interface UpstreamConfig {
  /** The key clients use (`ns=<name>`, `/v2/<name>/…`), e.g. `docker.io`. */
  name: string;
  url: URL;
  aliases: string[];
  /** Docker Hub's rule: a one-segment name means `library/<name>`. */
  dockerHubLibrary: boolean;
  tagTtl: number;
  auth?: UpstreamAuth;
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
}

/** The per-upstream knobs that `upstreamDefaults` sets for all and each upstream may override. */
const POLICY_KEYS = ['offline', 'maxAge', 'maxConcurrent', 'maxRequestsPerSecond', 'breakerFailures', 'breakerCooldown', 'blobRetries', 'maxRetryAfter'] as const;
type Policy = Pick<UpstreamConfig, (typeof POLICY_KEYS)[number]>;

export interface Config {
  server: {
    host: string;
    port: number;
    shutdownTimeout: number;
    trustProxy: boolean;
    /** A client must send its request line and headers within this; then the whole request within requestTimeout. */
    headersTimeout: number;
    requestTimeout: number;
    /** A connection on which nothing moves (a client that reads nothing, or sends nothing) is closed after this. */
    idleTimeout: number;
    /** Open connections at most, in all and from one client address; 0: no limit. */
    maxConnections: number;
    maxConnectionsPerAddress: number;
  };
  log: { level: string };
  storage: {
    root: string;
    /** Bytes of blobs to keep; undefined: unbounded. */
    maxSize: number | undefined;
    /** Eviction starts above highWatermark percent of maxSize and stops at lowWatermark percent (as in the YAML). */
    highWatermark: number;
    lowWatermark: number;
    /** Free space to leave on the filesystem: below it new blobs stream through uncached, and downloads under way stop. */
    minFree: number;
    /** Larger blobs stream through uncached; a download without a size is cut off here. */
    maxBlobSize: number;
  };
  /** notFoundTtl: how long an upstream 404 for a manifest or blob is remembered; 0: not at all. */
  /** fillMemory: bytes of downloads in progress kept in memory for clients a little behind, across all fills. */
  cache: { tagTtl: number; manifestMemory: number; fillMemory: number; notFoundTtl: number };
  /** Serve only from the cache, for every upstream. */
  offline: boolean;
  /** Bearer token for /admin/*; undefined disables the admin API. */
  admin: { token: string | undefined };
  timeouts: { connect: number; manifest: number; blobIdle: number; fill: number };
  defaultUpstream?: string;
  upstreams: UpstreamConfig[];
  /** Client authentication and authorisation (access-config.ts); undefined: off, everything is served to anyone. */
  access?: AccessConfig;
}

export { ConfigError };

export const DEFAULT_CONFIG_FILE = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'config', 'default.yaml');

/** The env overrides, all of them. Kept short on purpose: everything else belongs in the file. */
export const ENV_OVERRIDES = {
  OCICACHE_HOST: 'server.host',
  OCICACHE_PORT: 'server.port',
  OCICACHE_LOG_LEVEL: 'log.level',
  OCICACHE_STORAGE_ROOT: 'storage.root',
  OCICACHE_DEFAULT_UPSTREAM: 'defaultUpstream',
  OCICACHE_OFFLINE: 'offline',
} as const;

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];
const HOST_KEY = /^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$/;
/** A redirect host: a name or IPv4 address, `*.` and a domain, or a bracketed IPv6 address; never a port. */
const REDIRECT_HOST = /^((\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])$/;

function duration(value: unknown, key: string): number {
  const ms = parseDuration(value);
  if (ms === undefined) throw new ConfigError(key, `expected a duration such as 30s, 5m or 24h, got ${JSON.stringify(value)}`);
  return ms;
}

function size(value: unknown, key: string): number {
  const bytes = parseSize(value);
  if (bytes === undefined) throw new ConfigError(key, `expected a size such as 512MiB or 50GiB, got ${JSON.stringify(value)}`);
  return bytes;
}

type Obj = Record<string, unknown>;

function section(parent: Obj, key: string, path: string, allowed: string[]): Obj {
  const value = parent[key] ?? {};
  if (typeof value !== 'object' || Array.isArray(value) || value === null) throw new ConfigError(path, 'must be a mapping');
  for (const k of Object.keys(value)) {
    if (!allowed.includes(k)) throw new ConfigError(`${path}.${k}`, `unknown key (known: ${allowed.join(', ')})`);
  }
  return value as Obj;
}

function str(o: Obj, key: string, path: string, fallback?: string): string {
  const v = o[key] ?? fallback;
  if (typeof v !== 'string' || v === '') throw new ConfigError(`${path}.${key}`, 'must be a non-empty string');
  return v;
}

function bool(o: Obj, key: string, path: string, fallback: boolean): boolean {
  const v = o[key] ?? fallback;
  if (typeof v !== 'boolean') throw new ConfigError(path ? `${path}.${key}` : key, 'must be true or false');
  return v;
}

function int(o: Obj, key: string, path: string, fallback: number, min = 0): number {
  const v = o[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min) throw new ConfigError(`${path}.${key}`, `must be a whole number >= ${min}`);
  return v;
}

function percent(o: Obj, key: string, path: string, fallback: number): number {
  const v = o[key] ?? fallback;
  if (typeof v !== 'number' || !(v > 0 && v <= 100)) throw new ConfigError(`${path}.${key}`, 'must be a percentage above 0 and at most 100');
  return v;
}

function policy(o: Obj, path: string, base: Policy): Policy {
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

function hostKey(value: unknown, path: string): string {
  if (typeof value !== 'string' || !HOST_KEY.test(value.toLowerCase())) {
    throw new ConfigError(path, `must be a registry host name such as docker.io or registry.example.com:5000, got ${JSON.stringify(value)}`);
  }
  return value.toLowerCase();
}

function readSecret(o: Obj, path: string, env: NodeJS.ProcessEnv, field = 'password'): string {
  if (o[field] !== undefined) throw new ConfigError(`${path}.${field}`, `secrets are never written in the config: use ${field}Env or ${field}File`);
  const fromEnv = o[`${field}Env`];
  const fromFile = o[`${field}File`];
  if (typeof fromEnv === 'string') {
    const v = env[fromEnv];
    if (!v || v.trim() === '') throw new ConfigError(`${path}.${field}Env`, `environment variable ${fromEnv} is not set`);
    return v;
  }
  if (typeof fromFile === 'string') {
    let v: string;
    try {
      v = readFileSync(fromFile, 'utf8').replace(/\r?\n$/, '');
    } catch (err) {
      throw new ConfigError(`${path}.${field}File`, `cannot read ${fromFile}: ${(err as Error).message}`);
    }
    // An empty secret would compare equal to an empty guess.
    if (v.trim() === '') throw new ConfigError(`${path}.${field}File`, `${fromFile} is empty`);
    return v;
  }
  throw new ConfigError(path, `needs ${field}Env or ${field}File`);
}

function upstream(raw: unknown, i: number, defaults: { tagTtl: number; policy: Policy }, env: NodeJS.ProcessEnv, needs: SecretNeeds): UpstreamConfig {
  const path = `upstreams[${i}]`;
  if (typeof raw !== 'object' || raw === null || Array.isArray(raw)) throw new ConfigError(path, 'must be a mapping');
  const o = section({ u: raw }, 'u', path, ['name', 'url', 'aliases', 'dockerHubLibrary', 'tagTtl', 'auth', 'tokenRealms', 'redirectHosts', ...POLICY_KEYS]);
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
  if (o.auth !== undefined) {
    const a = section(o, 'auth', `${path}.auth`, ['username', 'password', 'passwordEnv', 'passwordFile']);
    auth = { username: str(a, 'username', `${path}.auth`), password: needs.upstreamAuth ? readSecret(a, `${path}.auth`, env) : '' };
  }
  return {
    name,
    url,
    aliases: aliases.map((a, j) => hostKey(a, `${path}.aliases[${j}]`)),
    dockerHubLibrary: bool(o, 'dockerHubLibrary', path, false),
    tagTtl: o.tagTtl === undefined ? defaults.tagTtl : duration(o.tagTtl, `${path}.tagTtl`),
    auth,
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
  };
}

function applyEnv(doc: Obj, env: NodeJS.ProcessEnv): void {
  for (const [name, key] of Object.entries(ENV_OVERRIDES)) {
    const value = env[name];
    if (value === undefined) continue;
    const [head, tail] = key.split('.') as [string, string | undefined];
    if (tail === undefined) {
      doc[head] = value === '' ? undefined : head === 'offline' ? ['1', 'true', 'yes'].includes(value.toLowerCase()) : value;
      continue;
    }
    const sec = (doc[head] ??= {}) as Obj;
    sec[tail] = key === 'server.port' ? Number(value) : value;
  }
}

/**
 * Which secrets a command needs. `serve` needs all; `prefetch` only upstream credentials; `gc`
 * and `verify` none, so an operator can run them without the server's environment. A secret that
 * is not needed is still validated in shape but not read.
 */
export interface SecretNeeds {
  upstreamAuth: boolean;
  adminToken: boolean;
}

const ALL_SECRETS: SecretNeeds = { upstreamAuth: true, adminToken: true };

/** Parse and validate a config document; pure apart from reading credential files. */
export function buildConfig(doc: unknown, env: NodeJS.ProcessEnv = process.env, needs: SecretNeeds = ALL_SECRETS): Config {
  const root = section({ root: doc ?? {} }, 'root', '(top level)', [
    'server', 'log', 'storage', 'cache', 'timeouts', 'offline', 'upstreamDefaults', 'admin', 'defaultUpstream', 'upstreams', 'access',
  ]);
  applyEnv(root, env);
  const server = section(root, 'server', 'server', ['host', 'port', 'shutdownTimeout', 'trustProxy', 'headersTimeout', 'requestTimeout', 'idleTimeout', 'maxConnections', 'maxConnectionsPerAddress']);
  const log = section(root, 'log', 'log', ['level']);
  const storage = section(root, 'storage', 'storage', ['root', 'maxSize', 'highWatermark', 'lowWatermark', 'minFree', 'maxBlobSize']);
  const admin = section(root, 'admin', 'admin', ['token', 'tokenEnv', 'tokenFile']);
  const defaultPolicy = policy(section(root, 'upstreamDefaults', 'upstreamDefaults', [...POLICY_KEYS]), 'upstreamDefaults', {
    offline: false,
    maxAge: undefined,
    maxConcurrent: 32,
    maxRequestsPerSecond: 0,
    breakerFailures: 5,
    breakerCooldown: 30_000,
    blobRetries: 5,
    maxRetryAfter: 60_000,
  });
  const highWatermark = percent(storage, 'highWatermark', 'storage', 90);
  const lowWatermark = percent(storage, 'lowWatermark', 'storage', 80);
  if (lowWatermark >= highWatermark) throw new ConfigError('storage.lowWatermark', 'must be below storage.highWatermark');
  const cache = section(root, 'cache', 'cache', ['tagTtl', 'manifestMemory', 'fillMemory', 'notFoundTtl']);
  const timeouts = section(root, 'timeouts', 'timeouts', ['connect', 'manifest', 'blobIdle', 'fill']);

  const headersTimeout = duration(server.headersTimeout ?? '10s', 'server.headersTimeout');
  const requestTimeout = duration(server.requestTimeout ?? '30s', 'server.requestTimeout');
  if (headersTimeout === 0 || requestTimeout < headersTimeout) throw new ConfigError('server.requestTimeout', 'must be at least server.headersTimeout, and neither may be 0');
  const port = server.port ?? 5000;
  if (typeof port !== 'number' || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new ConfigError('server.port', `must be a port number 0-65535, got ${JSON.stringify(server.port)}`);
  }
  const level = str(log, 'level', 'log', 'info');
  if (!LOG_LEVELS.includes(level)) throw new ConfigError('log.level', `must be one of ${LOG_LEVELS.join(', ')}`);
  const tagTtl = duration(cache.tagTtl ?? '5m', 'cache.tagTtl');

  if (!Array.isArray(root.upstreams) || root.upstreams.length === 0) throw new ConfigError('upstreams', 'must list at least one upstream');
  const upstreams = root.upstreams.map((u, i) => upstream(u, i, { tagTtl, policy: defaultPolicy }, env, needs));
  const seen = new Map<string, string>();
  for (const [i, u] of upstreams.entries()) {
    for (const key of [u.name, ...u.aliases]) {
      const other = seen.get(key);
      if (other !== undefined) throw new ConfigError(`upstreams[${i}]`, `${key} is already used by ${other}`);
      seen.set(key, u.name);
    }
  }
  let defaultUpstream: string | undefined;
  if (root.defaultUpstream !== undefined && root.defaultUpstream !== null) {
    const key = hostKey(root.defaultUpstream, 'defaultUpstream');
    defaultUpstream = seen.get(key);
    if (defaultUpstream === undefined) throw new ConfigError('defaultUpstream', `${key} is not the name or alias of a configured upstream`);
  }

  return Object.freeze({
    server: {
      host: str(server, 'host', 'server', '0.0.0.0'),
      port,
      shutdownTimeout: duration(server.shutdownTimeout ?? '30s', 'server.shutdownTimeout'),
      trustProxy: bool(server, 'trustProxy', 'server', false),
      headersTimeout,
      requestTimeout,
      idleTimeout: duration(server.idleTimeout ?? '2m', 'server.idleTimeout'),
      maxConnections: int(server, 'maxConnections', 'server', 4096),
      maxConnectionsPerAddress: int(server, 'maxConnectionsPerAddress', 'server', 256),
    },
    log: { level },
    storage: {
      root: resolve(str(storage, 'root', 'storage', './data')),
      maxSize: storage.maxSize === undefined || storage.maxSize === null ? undefined : size(storage.maxSize, 'storage.maxSize'),
      highWatermark,
      lowWatermark,
      minFree: size(storage.minFree ?? '256MiB', 'storage.minFree'),
      maxBlobSize: size(storage.maxBlobSize ?? '32GiB', 'storage.maxBlobSize'),
    },
    cache: {
      tagTtl,
      manifestMemory: size(cache.manifestMemory ?? '64MiB', 'cache.manifestMemory'),
      fillMemory: size(cache.fillMemory ?? '16MiB', 'cache.fillMemory'),
      notFoundTtl: duration(cache.notFoundTtl ?? '30s', 'cache.notFoundTtl'),
    },
    offline: bool({ offline: root.offline }, 'offline', '', false),
    admin: { token: Object.keys(admin).length === 0 || !needs.adminToken ? undefined : readSecret(admin, 'admin', env, 'token') },
    timeouts: {
      connect: duration(timeouts.connect ?? '10s', 'timeouts.connect'),
      manifest: duration(timeouts.manifest ?? '30s', 'timeouts.manifest'),
      blobIdle: duration(timeouts.blobIdle ?? '60s', 'timeouts.blobIdle'),
      fill: duration(timeouts.fill ?? '30m', 'timeouts.fill'),
    },
    defaultUpstream,
    upstreams,
    access: root.access === undefined || root.access === null ? undefined : buildAccessConfig(root.access, upstreams),
  });
}

/** Read a config file (the embedded default when none is given) and apply env overrides. */
export function loadConfig(file: string | undefined, env: NodeJS.ProcessEnv = process.env, needs: SecretNeeds = ALL_SECRETS): Config {
  file ||= env.OCICACHE_CONFIG || DEFAULT_CONFIG_FILE;
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(file, `cannot read config file: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (err) {
    throw new ConfigError(file, `not valid YAML: ${(err as Error).message}`);
  }
  return buildConfig(doc, env, needs);
}
