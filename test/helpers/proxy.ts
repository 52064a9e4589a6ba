/** Starts ocicache in-process on a loopback port the kernel picks, with a fresh cache directory. */
import { createHash } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { request } from 'undici';
import { buildApp } from '../../src/http/app.js';
import type { Clock } from '../../src/core/clock.js';
import type { Network } from '../../src/upstream/exchange.js';
import { buildConfig, type Config } from '../../src/core/config.js';
import { OCI_MANIFEST } from './seed.js';
import type { Scope } from './tools.js';

export interface Proxy {
  url: string;
  host: string;
  root: string;
  app: FastifyInstance;
  config: Config;
}

export interface ProxyOptions {
  upstreams: Array<Record<string, unknown>>;
  defaultUpstream?: string;
  cache?: Record<string, unknown>;
  storage?: Record<string, unknown>;
  /** server.* keys over the test defaults (loopback, a port the kernel picks, 2 s shutdown) */
  server?: Record<string, unknown>;
  admin?: Record<string, unknown>;
  /** The `access` section (client authentication and rules); default: off. */
  access?: Record<string, unknown>;
  /** The `parent` section (a parent cache for every upstream); default: none. */
  parent?: Record<string, unknown>;
  /** The `credentials` section (Docker config and helper settings); default: none. */
  credentials?: Record<string, unknown>;
  /** The `keep` section (images never evicted); default: none. */
  keep?: Record<string, unknown>;
  timeouts?: Record<string, unknown>;
  root?: string;
  env?: NodeJS.ProcessEnv;
  /** pino options, e.g. {level: 'info', stream} to read the log; default: no log (OCICACHE_TEST_LOG=debug shows it) */
  logger?: Record<string, unknown>;
  /** The proxy's time (testClock()): tests move it forward instead of sleeping. Default: the system's. */
  clock?: Clock;
  /** How the proxy reaches upstreams: a DNS lookup for names the tests give (helpers/hosts.ts fakeLookup). */
  network?: Network;
}

/** A clock that starts at the system's time and moves only when told to. */
export interface TestClock {
  (): number;
  advance(ms: number): void;
}

export function testClock(start = Date.now()): TestClock {
  let now = start;
  return Object.assign(() => now, { advance: (ms: number) => void (now += ms) });
}

export async function startProxy(t: Scope, options: ProxyOptions): Promise<Proxy> {
  const root = options.root ?? mkdtempSync(join(tmpdir(), 'ocicache-cache-'));
  const config = buildConfig(
    {
      server: { host: '127.0.0.1', port: 0, shutdownTimeout: '2s', ...options.server },
      log: { level: 'silent' },
      storage: { root, ...options.storage },
      admin: options.admin,
      cache: options.cache,
      timeouts: options.timeouts,
      defaultUpstream: options.defaultUpstream,
      upstreams: options.upstreams,
      access: options.access,
      parent: options.parent,
      credentials: options.credentials,
      keep: options.keep,
    },
    options.env ?? {},
  );
  const app = await buildApp(config, { logger: options.logger ?? (process.env.OCICACHE_TEST_LOG ? { level: process.env.OCICACHE_TEST_LOG } : false), clock: options.clock, network: options.network });
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.after(async () => {
    await app.close();
    // A cache directory this helper made is removed; one passed in belongs to the test.
    if (!options.root) rmSync(root, { recursive: true, force: true });
  });
  const { port } = app.server.address() as AddressInfo;
  return { url: `http://127.0.0.1:${port}`, host: `127.0.0.1:${port}`, root, app, config };
}

/** Reads one counter or gauge sample from /metrics text, e.g. metric(text, 'ocicache_x_total', {kind: 'blob'}). */
export function metric(text: string, name: string, labels: Record<string, string> = {}): number {
  let total = 0;
  for (const line of text.split('\n')) {
    if (!line.startsWith(name)) continue;
    const m = /^([a-z_]+)(\{[^}]*\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries([...(m[2] ?? '').matchAll(/(\w+)="([^"]*)"/g)].map((x) => [x[1], x[2]]));
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) total += Number(m[3]);
  }
  return total;
}

/** Where a blob lives in a cache directory (src/storage/blob-store.ts layout). */
export function blobFile(root: string, digest: string): string {
  const [algorithm, hex] = digest.split(':') as [string, string];
  return join(root, 'blobs', algorithm, hex.slice(0, 2), hex);
}

export async function metricsText(proxy: Proxy): Promise<string> {
  return (await request(`${proxy.url}/metrics`)).body.text();
}

/** A response read to its end. */
export interface Fetched {
  status: number;
  headers: Record<string, unknown>;
  body: Buffer;
}

/** A request that reports whether the body arrived complete or the connection was cut (then `aborted`, and no body). */
export async function fetchBody(url: string, headers: Record<string, string> = {}, method: 'GET' | 'HEAD' = 'GET'): Promise<Omit<Fetched, 'body'> & { body?: Buffer; aborted?: Error }> {
  const res = await request(url, { headers, method });
  try {
    return { status: res.statusCode, headers: res.headers, body: Buffer.from(await res.body.arrayBuffer()) };
  } catch (err) {
    return { status: res.statusCode, headers: res.headers, aborted: err as Error };
  }
}

/** A request whose body must arrive whole: it rejects if the connection is cut. */
export async function fetchComplete(url: string, headers: Record<string, string> = {}, method: 'GET' | 'HEAD' = 'GET'): Promise<Fetched> {
  const { aborted, body, ...rest } = await fetchBody(url, headers, method);
  if (aborted) throw aborted;
  return { ...rest, body: body! };
}

/** A response's body parsed as JSON (`any`, as JSON.parse gives, unless the caller names the shape). */
export function jsonBody<T = any>(r: { body?: Buffer }): T {
  return JSON.parse(r.body!.toString()) as T;
}

/** The first error of an OCI error body ({errors: [{code, message}]}). */
export function ociError(r: { body?: Buffer }): { code: string; message: string } {
  return jsonBody<{ errors: Array<{ code: string; message: string }> }>(r).errors[0]!;
}

/** One blob of a pullImage: the digest the manifest names, and the digest of what arrived. */
export interface PulledBlob {
  digest: string;
  status: number;
  headers: Record<string, unknown>;
  sha256: string;
}

/**
 * Pulls an image the way a client does: the manifest by tag (Accept: OCI_MANIFEST), then its
 * config and layers in order, each hashed as it streams. No blobs unless the manifest is a 200;
 * rejects if a connection is cut.
 */
export async function pullImage(base: string, name: string, tag: string, ns = 'docker.io'): Promise<{ manifest: Fetched; blobs: PulledBlob[] }> {
  const manifest = await fetchComplete(`${base}/v2/${name}/manifests/${tag}?ns=${ns}`, { accept: OCI_MANIFEST });
  const blobs: PulledBlob[] = [];
  if (manifest.status !== 200) return { manifest, blobs };
  const desc = jsonBody<{ config: { digest: string }; layers: Array<{ digest: string }> }>(manifest);
  for (const { digest } of [desc.config, ...desc.layers]) {
    const res = await request(`${base}/v2/${name}/blobs/${digest}?ns=${ns}`);
    const hash = createHash('sha256');
    for await (const chunk of res.body) hash.update(chunk as Buffer);
    blobs.push({ digest, status: res.statusCode, headers: res.headers, sha256: `sha256:${hash.digest('hex')}` });
  }
  return { manifest, blobs };
}
