/** Starts ocicache in-process on a loopback port the kernel picks, with a fresh cache directory. */
import { mkdtempSync, rmSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { TestContext } from 'node:test';
import type { FastifyInstance } from 'fastify';
import { request } from 'undici';
import { buildApp } from '../../src/app.js';
import { buildConfig, type Config } from '../../src/config.js';

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
  admin?: Record<string, unknown>;
  timeouts?: Record<string, unknown>;
  root?: string;
  env?: NodeJS.ProcessEnv;
  /** pino options, e.g. {level: 'info', stream} to read the log; default: no log (OCICACHE_TEST_LOG=debug shows it) */
  logger?: Record<string, unknown>;
}

export async function startProxy(t: TestContext, options: ProxyOptions): Promise<Proxy> {
  const root = options.root ?? mkdtempSync(join(tmpdir(), 'ocicache-cache-'));
  const config = buildConfig(
    {
      server: { host: '127.0.0.1', port: 0, shutdownTimeout: '2s' },
      log: { level: 'silent' },
      storage: { root, ...options.storage },
      admin: options.admin,
      cache: options.cache,
      timeouts: options.timeouts,
      defaultUpstream: options.defaultUpstream,
      upstreams: options.upstreams,
    },
    options.env ?? {},
  );
  const app = await buildApp(config, { logger: options.logger ?? (process.env.OCICACHE_TEST_LOG ? { level: process.env.OCICACHE_TEST_LOG } : false) });
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

/** Where a blob lives in a cache directory (src/blob-store.ts layout). */
export function blobFile(root: string, digest: string): string {
  const [algorithm, hex] = digest.split(':') as [string, string];
  return join(root, 'blobs', algorithm, hex.slice(0, 2), hex);
}

export async function metricsText(proxy: Proxy): Promise<string> {
  return (await request(`${proxy.url}/metrics`)).body.text();
}

/** A request that reports whether the body arrived complete or the connection was cut. */
export async function fetchBody(url: string, headers: Record<string, string> = {}, method: 'GET' | 'HEAD' = 'GET'): Promise<{ status: number; headers: Record<string, unknown>; body?: Buffer; aborted?: Error }> {
  const res = await request(url, { headers, method });
  try {
    return { status: res.statusCode, headers: res.headers, body: Buffer.from(await res.body.arrayBuffer()) };
  } catch (err) {
    return { status: res.statusCode, headers: res.headers, aborted: err as Error };
  }
}
