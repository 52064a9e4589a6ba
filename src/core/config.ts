/**
 * Configuration: a YAML file (config/default.yaml documents every key), a short list of env
 * overrides, and validation that names the bad key. The result is plain frozen data with
 * durations in milliseconds and sizes in bytes.
 */
import { readFileSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parse as parseYaml } from 'yaml';
import { buildAccessConfig, type AccessConfig } from './access-config.js';
import { buildKeepConfig, type KeepConfig } from './keep-config.js';
import { buildS3Config, type S3Config } from './s3-config.js';
import { ConfigError } from './config-error.js';
import { bool, duration, hostKey, int, percent, readSecret, section, size, str, type Obj, type SecretNeeds } from './config-values.js';
import { availableCpus } from './cpus.js';
import { credentialSource, parentConfig, POLICY_KEYS, policy, throughParent, upstream, type ParentConfig, type UpstreamConfig } from './upstream-config.js';

export type { UpstreamAuth, UpstreamConfig, UpstreamTls } from './upstream-config.js';
export type { SecretNeeds } from './config-values.js';

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
    /** Serve HTTPS (http/tls.ts); undefined: plain HTTP. */
    tls: ServerTls | undefined;
    /** This replica's name in a fleet: sent as X-Ocicache-Replica, shown on the status page and in ocicache_replica_info. */
    replica: string | undefined;
    /** Processes answering clients (http/cluster.ts); 1: one process does everything. 'auto' is resolved at load. */
    workers: number;
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
    /** `backend: s3`: blobs in a bucket (the root keeps the index and the fills' temp files); undefined: on disk under the root. */
    s3: S3Config | undefined;
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
  /**
   * Credentials found at run time (upstream/credentials.ts): a helper gets helperTimeout to answer,
   * and what a file or helper gave is used for ttl, or until the upstream refuses it.
   */
  credentials: { helperTimeout: number; ttl: number };
  /** Images never evicted, fetched at start-up and refreshed (cache/keep.ts); undefined: none. */
  keep: KeepConfig | undefined;
  /** Another ocicache asked for every upstream (upstream-config.ts throughParent); undefined: the upstreams themselves. */
  parent: ParentConfig | undefined;
  /** Client authentication and authorisation (access-config.ts); undefined: off, everything is served to anyone. */
  access?: AccessConfig;
}

export { ConfigError };

export interface ServerTls {
  /** PEM files, read when the server starts and again whenever they change (checked every reloadInterval). */
  certFile: string;
  keyFile: string;
  /** Client certificates are checked against the CAs in this PEM bundle; undefined: none asked for. */
  clientCaFile: string | undefined;
  /** With clientCaFile: `required` refuses a client without a certificate from those CAs at the handshake; `optional` lets it in to authenticate otherwise. */
  clientCertificates: 'required' | 'optional';
  reloadInterval: number;
}

function serverTls(server: Obj): ServerTls | undefined {
  if (server.tls === undefined || server.tls === null) return undefined;
  const tls = section(server, 'tls', 'server.tls', ['certFile', 'keyFile', 'clientCaFile', 'clientCertificates', 'reloadInterval']);
  const clientCaFile = tls.clientCaFile === undefined || tls.clientCaFile === null ? undefined : str(tls, 'clientCaFile', 'server.tls');
  const clientCertificates = tls.clientCertificates ?? 'required';
  if (clientCertificates !== 'required' && clientCertificates !== 'optional') {
    throw new ConfigError('server.tls.clientCertificates', `must be required or optional, got ${JSON.stringify(clientCertificates)}`);
  }
  if (tls.clientCertificates !== undefined && clientCaFile === undefined) {
    throw new ConfigError('server.tls.clientCertificates', 'needs server.tls.clientCaFile, the CAs client certificates are checked against');
  }
  const reloadInterval = duration(tls.reloadInterval ?? '5s', 'server.tls.reloadInterval');
  if (reloadInterval < 100) throw new ConfigError('server.tls.reloadInterval', 'must be at least 100ms');
  return { certFile: str(tls, 'certFile', 'server.tls'), keyFile: str(tls, 'keyFile', 'server.tls'), clientCaFile, clientCertificates, reloadInterval };
}

/** server.replica: a header value and a metric label, so a short plain name (a pod name, a host name). */
function replicaName(value: unknown): string | undefined {
  if (value === undefined || value === null || value === '') return undefined;
  if (typeof value !== 'string' || !/^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/.test(value)) {
    throw new ConfigError('server.replica', `must be a name of letters, digits, '.', '_' and '-' (at most 63), got ${JSON.stringify(value)}`);
  }
  return value;
}

function accessConfig(raw: unknown, upstreams: UpstreamConfig[], tls: ServerTls | undefined): AccessConfig | undefined {
  if (raw === undefined || raw === null) return undefined;
  const access = buildAccessConfig(raw, upstreams);
  if (access.clientCertificates && tls?.clientCaFile === undefined) {
    throw new ConfigError('access.clientCertificates', 'needs server.tls with clientCaFile: only a certificate checked against those CAs may name a user');
  }
  return access;
}

export const DEFAULT_CONFIG_FILE = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'config', 'default.yaml');

/** The env overrides, all of them. Kept short on purpose: everything else belongs in the file. */
export const ENV_OVERRIDES = {
  OCICACHE_HOST: 'server.host',
  OCICACHE_PORT: 'server.port',
  OCICACHE_LOG_LEVEL: 'log.level',
  OCICACHE_STORAGE_ROOT: 'storage.root',
  OCICACHE_DEFAULT_UPSTREAM: 'defaultUpstream',
  OCICACHE_OFFLINE: 'offline',
  OCICACHE_REPLICA: 'server.replica',
  OCICACHE_WORKERS: 'server.workers',
} as const;

/**
 * server.workers: a number, or 'auto' (the default) for the CPUs this process may use
 * (core/cpus.ts). With access.clientCertificates, auto is 1: a certificate is checked where TLS
 * ends, and only a single process carries it to the access rules (README, "Using every core").
 */
function workerCount(value: unknown, root: Obj): number {
  const certificates = ((root.access as Obj | undefined)?.clientCertificates ?? false) === true;
  if (value === undefined || value === null || value === 'auto') return certificates ? 1 : Math.min(availableCpus(), MAX_WORKERS);
  if (typeof value !== 'number' || !Number.isInteger(value) || value < 1 || value > MAX_WORKERS) {
    throw new ConfigError('server.workers', `must be 'auto' or a whole number from 1 to ${MAX_WORKERS}, got ${JSON.stringify(value)}`);
  }
  if (value > 1 && certificates) throw new ConfigError('server.workers', 'must be 1 with access.clientCertificates (the certificate is checked in the process that ends TLS)');
  return value;
}

const MAX_WORKERS = 64;

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

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
    sec[tail] = key === 'server.port' || (key === 'server.workers' && value !== 'auto') ? Number(value) : value;
  }
}

const ALL_SECRETS: SecretNeeds = { upstreamAuth: true, adminToken: true };

/** Parse and validate a config document; pure apart from reading credential files. */
export function buildConfig(doc: unknown, env: NodeJS.ProcessEnv = process.env, needs: SecretNeeds = ALL_SECRETS): Config {
  const root = section({ root: doc ?? {} }, 'root', '(top level)', [
    'server', 'log', 'storage', 'cache', 'timeouts', 'offline', 'upstreamDefaults', 'admin', 'defaultUpstream', 'upstreams', 'access', 'parent', 'credentials', 'keep',
  ]);
  applyEnv(root, env);
  const server = section(root, 'server', 'server', ['host', 'port', 'shutdownTimeout', 'trustProxy', 'headersTimeout', 'requestTimeout', 'idleTimeout', 'maxConnections', 'maxConnectionsPerAddress', 'tls', 'replica', 'workers']);
  const log = section(root, 'log', 'log', ['level']);
  const storage = section(root, 'storage', 'storage', ['root', 'maxSize', 'highWatermark', 'lowWatermark', 'minFree', 'maxBlobSize', 'backend', 's3']);
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
  const credentialsSection = section(root, 'credentials', 'credentials', ['dockerConfig', 'helper', 'helperTimeout', 'ttl']);
  const parent = parentConfig(root.parent, env, needs);
  const defaultCredentials = credentialSource(credentialsSection, 'credentials');
  if (parent && defaultCredentials) throw new ConfigError('credentials', 'a cache with a parent holds no upstream credentials (the parent does): remove credentials.dockerConfig and credentials.helper');
  const upstreams = root.upstreams.map((u, i) => upstream(u, i, { tagTtl, policy: defaultPolicy, credentials: defaultCredentials }, env, needs)).map((u, i) => (parent ? throughParent(u, i, parent) : u));
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

  const tls = serverTls(server);
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
      tls,
      replica: replicaName(server.replica),
      workers: workerCount(server.workers, root),
    },
    log: { level },
    storage: {
      root: resolve(str(storage, 'root', 'storage', './data')),
      maxSize: storage.maxSize === undefined || storage.maxSize === null ? undefined : size(storage.maxSize, 'storage.maxSize'),
      highWatermark,
      lowWatermark,
      minFree: size(storage.minFree ?? '256MiB', 'storage.minFree'),
      maxBlobSize: size(storage.maxBlobSize ?? '32GiB', 'storage.maxBlobSize'),
      s3: buildS3Config(storage),
    },
    cache: {
      tagTtl,
      manifestMemory: size(cache.manifestMemory ?? '64MiB', 'cache.manifestMemory'),
      fillMemory: size(cache.fillMemory ?? '8MiB', 'cache.fillMemory'),
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
    credentials: {
      helperTimeout: duration(credentialsSection.helperTimeout ?? '10s', 'credentials.helperTimeout'),
      ttl: duration(credentialsSection.ttl ?? '10m', 'credentials.ttl'),
    },
    parent,
    keep: buildKeepConfig(root.keep),
    access: accessConfig(root.access, upstreams, tls),
  });
}

/** Read a config file (the embedded default when none is given) and apply env overrides. */
export function loadConfig(file: string | undefined, env: NodeJS.ProcessEnv = process.env, needs: SecretNeeds = ALL_SECRETS): Config {
  const source = readConfigFile(file, env);
  return configFromText(source.file, source.text, env, needs);
}

/** The config file's path (--config, $OCICACHE_CONFIG or the embedded default) and text. */
export function readConfigFile(file: string | undefined, env: NodeJS.ProcessEnv = process.env): { file: string; text: string } {
  file ||= env.OCICACHE_CONFIG || DEFAULT_CONFIG_FILE;
  try {
    return { file, text: readFileSync(file, 'utf8') };
  } catch (err) {
    throw new ConfigError(file, `cannot read config file: ${(err as Error).message}`);
  }
}

/** A config from its YAML text; `file` names it in errors. */
export function configFromText(file: string, text: string, env: NodeJS.ProcessEnv = process.env, needs: SecretNeeds = ALL_SECRETS): Config {
  let doc: unknown;
  try {
    doc = parseYaml(text);
  } catch (err) {
    throw new ConfigError(file, `not valid YAML: ${(err as Error).message}`);
  }
  return buildConfig(doc, env, needs);
}
