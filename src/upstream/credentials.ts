/**
 * An upstream's credentials at the moment they are needed: written in the config (auth.username
 * with a password from an env variable or a file), or found at run time the way Docker finds them:
 * - a Docker config file (`auths`, `credHelpers`, `credsStore`; a kubernetes.io/dockerconfigjson
 *   pull secret is such a file), checked for changes at most once a second, so a rotated secret
 *   is used at once;
 * - a docker-credential-helpers program: `docker-credential-<name> get`, the server on stdin, JSON
 *   `{"Username", "Secret"}` on stdout (https://github.com/docker/docker-credential-helpers).
 * What a file or helper gave is kept for credentials.ttl, or until the upstream refuses it
 * (invalidate): then it is fetched again, once per refusal. A secret that says when it expires (a
 * JWT's `exp`, RFC 7519 §4.1.4: Azure's ACR refresh tokens, OIDC ID tokens) is kept no longer
 * than EXPIRY_MARGIN before that. A helper that hangs is killed after
 * credentials.helperTimeout; one that fails is the upstream's authentication failure (DENIED),
 * never a crash.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import type { Clock } from '../core/clock.js';
import { fileStamp } from '../core/file-stamp.js';
import type { Config, UpstreamAuth, UpstreamConfig } from '../core/config.js';
import type { CredentialSource } from '../core/upstream-config.js';
import { OciError } from '../core/errors.js';
import { SingleFlight } from '../core/single-flight.js';

const FILE_CHECK_MS = 1000;
/** A secret that says when it expires is fetched again this long before (clocks differ; a pull takes time). */
const EXPIRY_MARGIN = 30_000;
/** ...but kept at least this long: a source that only has nearly expired secrets must not be asked per request. */
const MIN_KEEP = 1000;
const JWT = /^[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]*$/;

/** When `secret` expires (ms since the epoch), if it says so: a JWT with a numeric `exp`. */
export function secretExpiry(secret: string): number | undefined {
  const payload = JWT.exec(secret)?.[1];
  if (payload === undefined) return undefined;
  try {
    const exp = (JSON.parse(Buffer.from(payload, 'base64url').toString('utf8')) as { exp?: unknown }).exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}
const MAX_HELPER_OUTPUT = 64 * 1024;
/** What the helpers print when they hold nothing for the server: anonymous, as Docker treats it. */
const NOT_FOUND = /credentials not found/i;

interface DockerConfig {
  auths?: Record<string, { auth?: string; username?: string; password?: string; identitytoken?: string }>;
  credHelpers?: Record<string, string>;
  credsStore?: string;
}

/** Docker Hub's registry hosts: its credentials are filed under its v1 index URL (docker login writes them there). */
const DOCKER_HUB = new Set(['registry-1.docker.io', 'index.docker.io', 'docker.io', 'registry.hub.docker.com']);

/**
 * The keys a Docker config may file an upstream's credentials under, most specific first: only
 * forms of the host its URL names. Its name and aliases are what clients call it, not where the
 * credentials go: an upstream named docker.io that points at a mirror must not get Docker Hub's.
 */
function serverKeys(upstream: UpstreamConfig): string[] {
  const h = upstream.url.host;
  const keys = [h, `https://${h}`, `http://${h}`, `https://${h}/v1/`, `https://${h}/v2/`];
  if (DOCKER_HUB.has(upstream.url.hostname)) keys.push('https://index.docker.io/v1/', 'index.docker.io', 'docker.io');
  return keys;
}

/** The environment a helper runs with: ours, less our own secrets (the admin token and the like). */
function helperEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('OCICACHE_')));
}

export class Credentials {
  private readonly memo = new Map<string, { auth: UpstreamAuth | undefined; until: number; stamp: string }>();
  private readonly flights = new SingleFlight<UpstreamAuth | undefined>();
  private readonly files = new Map<string, { checkedAt: number; stamp: string; config: DockerConfig | Error }>();

  constructor(
    private readonly options: Config['credentials'],
    private readonly now: Clock,
  ) {}

  /** The credentials to present to `upstream` now; undefined: none (anonymous). */
  get(upstream: UpstreamConfig): Promise<UpstreamAuth | undefined> {
    if (!Credentials.dynamic(upstream)) return Promise.resolve(upstream.auth);
    const source = upstream.credentials;
    const stamp = 'dockerConfig' in source ? this.file(source.dockerConfig).stamp : '';
    const known = this.memo.get(upstream.name);
    if (known && known.stamp === stamp && this.now() < known.until) return Promise.resolve(known.auth);
    return this.flights.do(upstream.name, async () => {
      const auth = 'helper' in source ? await this.helper(upstream, source.helper) : await this.fromFile(upstream, source.dockerConfig);
      this.memo.set(upstream.name, { auth, until: this.keepUntil(auth), stamp });
      return auth;
    });
  }

  /** credentials.ttl from now, or less when the secret expires sooner. */
  private keepUntil(auth: UpstreamAuth | undefined): number {
    const now = this.now();
    const expiry = auth && secretExpiry(auth.password);
    const until = now + this.options.ttl;
    return expiry === undefined ? until : Math.min(until, Math.max(now + MIN_KEEP, expiry - EXPIRY_MARGIN));
  }

  /** How much longer what get() last gave for `upstream` is used, in ms; 0 when it must be fetched again. */
  remaining(upstream: UpstreamConfig): number {
    const known = this.memo.get(upstream.name);
    return known ? Math.max(0, known.until - this.now()) : 0;
  }

  /** The upstream refused what get() gave: the next get() fetches them again. */
  invalidate(upstream: UpstreamConfig): void {
    this.memo.delete(upstream.name);
  }

  /** Whether credentials for `upstream` are found at run time (and so may change). */
  static dynamic(upstream: UpstreamConfig): upstream is UpstreamConfig & { credentials: CredentialSource } {
    return !upstream.auth && upstream.credentials !== undefined;
  }

  private file(path: string): { stamp: string; config: DockerConfig | Error } {
    const known = this.files.get(path);
    const now = this.now();
    if (known && now - known.checkedAt < FILE_CHECK_MS) return known;
    let stamp: string;
    try {
      stamp = fileStamp(path);
    } catch (err) {
      stamp = `missing:${(err as NodeJS.ErrnoException).code}`;
    }
    if (known && known.stamp === stamp) {
      known.checkedAt = now;
      return known;
    }
    let config: DockerConfig | Error;
    try {
      const parsed = JSON.parse(readFileSync(path, 'utf8')) as unknown;
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Error('not a JSON object');
      config = parsed as DockerConfig;
    } catch (err) {
      config = new Error(`cannot use ${path}: ${(err as Error).message}`);
    }
    const entry = { checkedAt: now, stamp, config };
    this.files.set(path, entry);
    return entry;
  }

  /** Docker's order: a credHelpers entry for the server, else credsStore, else auths. */
  private async fromFile(upstream: UpstreamConfig, path: string): Promise<UpstreamAuth | undefined> {
    const { config } = this.file(path);
    if (config instanceof Error) throw new OciError('DENIED', `credentials for upstream ${upstream.name}: ${config.message}`);
    const keys = serverKeys(upstream);
    const helper = keys.map((k) => config.credHelpers?.[k]).find((h) => typeof h === 'string');
    if (helper) return this.helper(upstream, helper);
    if (typeof config.credsStore === 'string' && config.credsStore !== '') return this.helper(upstream, config.credsStore);
    const entry = keys.map((k) => config.auths?.[k]).find((e) => e !== undefined);
    if (!entry) return undefined;
    if (entry.identitytoken) throw new OciError('DENIED', `credentials for upstream ${upstream.name} in ${path} are an identity token (OAuth refresh), which ocicache does not exchange: use a password or token`);
    if (typeof entry.username === 'string' && typeof entry.password === 'string') return { username: entry.username, password: entry.password };
    if (typeof entry.auth === 'string') {
      const decoded = Buffer.from(entry.auth, 'base64').toString('utf8');
      const colon = decoded.indexOf(':');
      if (colon > 0) return { username: decoded.slice(0, colon), password: decoded.slice(colon + 1) };
    }
    throw new OciError('DENIED', `credentials for upstream ${upstream.name} in ${path}: the entry has no usable auth (base64 user:password) or username and password`);
  }

  /** Runs docker-credential-<name> get for the upstream's server. */
  private helper(upstream: UpstreamConfig, name: string): Promise<UpstreamAuth | undefined> {
    const program = `docker-credential-${name}`;
    const fail = (why: string): OciError => new OciError('DENIED', `credential helper ${program} for upstream ${upstream.name} ${why}`);
    if (!/^[A-Za-z0-9][A-Za-z0-9_.-]*$/.test(name)) return Promise.reject(fail('has an invalid name'));
    // Docker asks helpers for Docker Hub by its v1 index URL, for others by host.
    const server = DOCKER_HUB.has(upstream.url.hostname) ? 'https://index.docker.io/v1/' : upstream.url.host;
    return new Promise((resolve, reject) => {
      let settled = false;
      let timer: NodeJS.Timeout | undefined;
      const done = (f: () => void): void => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        f();
      };
      const child = spawn(program, ['get'], { stdio: ['pipe', 'pipe', 'pipe'], env: helperEnv() });
      // First: a spawn that fails (ENOENT, EMFILE) reports it here, with no stdio to read.
      child.once('error', (e: NodeJS.ErrnoException) => done(() => reject(fail(e.code === 'ENOENT' ? 'is not on PATH' : `could not run: ${e.message}`))));
      let out = '';
      let err = '';
      child.stdout?.setEncoding('utf8');
      child.stderr?.setEncoding('utf8');
      child.stdout?.on('data', (d: string) => {
        out += d;
        if (out.length > MAX_HELPER_OUTPUT) child.kill('SIGKILL');
      });
      child.stderr?.on('data', (d: string) => {
        if (err.length < MAX_HELPER_OUTPUT) err += d;
      });
      child.stdin?.on('error', () => undefined);
      timer = setTimeout(() => {
        child.kill('SIGKILL');
        done(() => reject(fail(`did not answer within ${this.options.helperTimeout} ms`)));
      }, this.options.helperTimeout);
      child.once('close', (code) => {
        done(() => {
          if (code !== 0) {
            if (NOT_FOUND.test(out) || NOT_FOUND.test(err)) return resolve(undefined);
            return reject(fail(`failed (exit ${code}): ${(out || err).trim().slice(0, 200)}`));
          }
          let json: { Username?: unknown; Secret?: unknown };
          try {
            json = JSON.parse(out) as typeof json;
          } catch {
            return reject(fail('printed no JSON'));
          }
          if (typeof json.Username !== 'string' || typeof json.Secret !== 'string' || json.Secret === '') return reject(fail('printed no Username and Secret'));
          if (json.Username === '<token>') return reject(fail('gave an identity token (OAuth refresh), which ocicache does not exchange'));
          resolve({ username: json.Username, password: json.Secret });
        });
      });
      child.stdin?.end(`${server}\n`);
    });
  }
}
