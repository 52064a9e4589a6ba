/**
 * server.workers > 1: one coordinator and N workers (Node's cluster module).
 *
 * The coordinator is this process: the whole cache as a single process runs it (http/app.ts), on
 * a Unix socket in a private directory instead of the port. It alone talks to upstreams, fills
 * blobs (so 32 requests for one cold blob in any workers still make one upstream GET, and every
 * waiter streams while it downloads), evicts, writes the index and holds the cache lock.
 * The workers (src/worker.ts → http/worker.ts) share the port, answer hits with every core, send
 * blob misses from the fill's temp file as this process reports it written (routes.ts,
 * sendFollowed), and forward the rest.
 *
 * - Connections are handed to workers in turn by this process (cluster's round-robin), so the
 *   port closes with it: a group killed with kill -9 leaves nothing holding the port.
 * - A worker that dies is replaced; one that cannot start stops the group.
 * - A worker exits when the coordinator is gone (its IPC channel closes): a worker alone cannot
 *   fill or evict. Crash safety is the single process's: fills rename into place when verified.
 * - /metrics (answered by the coordinator) sums the workers' request counters and histograms into
 *   its own; process metrics are summed over the group (prom-client's aggregators), but the
 *   start time, which is this process's. The status page adds the workers' counts, sent each second.
 * - The group's log has one writer: workers' lines reach stdout through this process, whole
 *   (telemetry/log-relay.ts).
 * - SIGTERM: workers stop taking connections and finish what they have (hits, and requests
 *   forwarded here); then the coordinator drains as a single process does.
 */
import cluster, { type Worker } from 'node:cluster';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { extname, join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance } from 'fastify';
import { AggregatorRegistry } from 'prom-client';
import type { Config } from '../core/config.js';
import { relayLines } from '../telemetry/log-relay.js';
import { WORKER_METRICS, type MetricsJson } from '../telemetry/metrics.js';
import { buildApp } from './app.js';
import { CONFIG_ENV, SOCKET_ENV, TOKEN_KEY_ENV, type ToCoordinator, type ToWorker } from './worker.js';

/** A worker's metrics that do not come within this are left out of the scrape. */
const METRICS_WAIT_MS = 2000;
/** Replacements faster than this many per minute mean a worker cannot run: the group stops. */
const MAX_RESTARTS_PER_MINUTE = 20;

export interface Group {
  app: FastifyInstance;
  /** SIGTERM's work: drains the workers, then the coordinator; resolves when all are closed. */
  stop(): Promise<void>;
}

export async function startGroup(config: Config, configText: string): Promise<Group> {
  const dir = mkdtempSync(join(tmpdir(), 'ocicache-'));
  const socketPath = join(dir, 'coordinator.sock');
  const env: NodeJS.ProcessEnv = { [SOCKET_ENV]: socketPath, [CONFIG_ENV]: configText };
  if (config.access && config.access.tokenKeyFile === undefined) {
    // Tokens from /token (the coordinator's) must verify in every worker: one random key for the
    // group, in the private directory, instead of one per process.
    const tokenKeyFile = join(dir, 'token.key');
    writeFileSync(tokenKeyFile, randomBytes(32), { mode: 0o600 });
    config = { ...config, access: { ...config.access, tokenKeyFile } };
    env[TOKEN_KEY_ENV] = tokenKeyFile;
  }
  // Only workers connect here: they name the client (X-Forwarded-*), they end TLS, and they
  // enforce the connection limits.
  const inner: Config = { ...config, server: { ...config.server, tls: undefined, trustProxy: true, maxConnections: 0, maxConnectionsPerAddress: 0 } };
  const app = await buildApp(inner, { coordinator: true });
  // Workers run their own entry (src/worker.ts): the hit path's modules, not the whole cache's.
  // Their stdout is a pipe to this process, which passes their lines on whole (log-relay.ts).
  cluster.setupPrimary({ exec: fileURLToPath(new URL(`../worker${extname(fileURLToPath(import.meta.url))}`, import.meta.url)), stdio: ['ignore', 'pipe', 'inherit', 'ipc'] });
  const { lifecycle, metrics } = app.services;
  await app.listen({ path: socketPath });

  let stopping = false;
  let nextId = 0;
  const waiting = new Map<number, (share: MetricsJson) => void>();
  // Counters must never go backwards (Prometheus reads a drop as a reset): a worker that does not
  // answer in time counts with its last share, and a dead worker's last counts stay in `retired`.
  const last = new Map<number, MetricsJson>();
  let retired: MetricsJson = [];
  metrics.peers = async () => {
    const asked = Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined && w.isConnected());
    const shares = asked.map(
      (w) =>
        new Promise<MetricsJson>((resolve) => {
          const id = ++nextId;
          const timer = setTimeout(() => {
            waiting.delete(id);
            resolve(last.get(w.id) ?? []);
          }, METRICS_WAIT_MS);
          waiting.set(id, (share) => {
            clearTimeout(timer);
            waiting.delete(id);
            last.set(w.id, share);
            resolve(share);
          });
          w.send({ t: 'metrics', id } satisfies ToWorker);
        }),
    );
    return [retired, ...(await Promise.all(shares))];
  };
  const retire = (id: number): void => {
    const share = last.get(id)?.filter((m) => WORKER_METRICS.has(m.name));
    last.delete(id);
    if (share?.length) retired = (AggregatorRegistry.aggregate([retired, share] as never).getMetricsAsArray() as unknown as Array<{ get(): MetricsJson[number] }>).map((m) => m.get());
  };

  const restarts: number[] = [];
  /** Workers that got as far as listening: one that exits before is one that cannot start. */
  const everListened = new Set<number>();
  let failed: ((err: Error) => void) | undefined;
  /** Each worker's log, passed on until its pipe closes. */
  const logs = new Set<Promise<void>>();
  const fork = (): Worker => {
    const worker = cluster.fork(env);
    const log = relayLines(worker.process.stdout!, app.logSink).finally(() => logs.delete(log));
    logs.add(log);
    worker.on('message', (m: ToCoordinator) => {
      if (m.t === 'touch') for (const [digest, size, upstream, at] of m.blobs) lifecycle.touch(digest, size, upstream, at);
      else if (m.t === 'stats') app.stats.add(m.batch);
      else if (m.t === 'metrics') waiting.get(m.id)?.(m.share as MetricsJson);
    });
    return worker;
  };
  cluster.on('exit', (worker, code, signal) => {
    retire(worker.id);
    const listened = everListened.delete(worker.id);
    if (stopping) return;
    app.log.warn({ worker: worker.id, pid: worker.process.pid, code, signal }, listened ? 'a worker died: starting another' : 'a worker could not start');
    const now = Date.now();
    restarts.push(now);
    while (restarts[0]! < now - 60_000) restarts.shift();
    if (!listened || restarts.length > MAX_RESTARTS_PER_MINUTE) failed?.(new Error(`workers keep exiting (the last: code ${code}, signal ${signal}); see their log lines`));
    else fork();
  });
  cluster.on('listening', (worker) => void everListened.add(worker.id));

  const stop = async (): Promise<void> => {
    stopping = true;
    // One shutdownTimeout for the whole group, as for a single process (systemd's and Kubernetes'
    // stop timeouts are set from it): the coordinator drains in what the workers left of it.
    const deadline = Date.now() + config.server.shutdownTimeout;
    const workers = Object.values(cluster.workers ?? {}).filter((w): w is Worker => w !== undefined);
    await Promise.all(
      workers.map(
        (w) =>
          new Promise<void>((resolve) => {
            if (w.isDead()) return resolve();
            w.once('exit', () => resolve());
            // Past its own drain (shutdownTimeout), a worker that still has not gone is killed.
            setTimeout(() => w.process.kill('SIGKILL'), config.server.shutdownTimeout + 2000).unref();
            w.send({ t: 'drain' } satisfies ToWorker);
          }),
      ),
    );
    await app.drain(Math.max(1000, deadline - Date.now()));
    // The workers' last lines, before this process's own last ones.
    await Promise.race([Promise.all(logs), sleep(Math.max(100, deadline - Date.now()), undefined, { ref: false })]);
    await app.close();
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    await new Promise<void>((resolve, reject) => {
      failed = reject;
      let up = 0;
      cluster.on('listening', (_worker, address) => {
        if (++up !== config.server.workers) return;
        // As a single process says it (Fastify's line), with the port the workers share.
        const host = address.address?.includes(':') ? `[${address.address}]` : (address.address ?? config.server.host);
        app.log.info(`Server listening at ${config.server.tls ? 'https' : 'http'}://${host}:${address.port}`);
        resolve();
      });
      for (let i = 0; i < config.server.workers; i++) fork();
    });
  } catch (err) {
    await stop();
    throw err;
  }
  failed = (err) => {
    app.log.error({ err }, 'stopping: the workers cannot run');
    void stop().finally(() => process.exit(1));
  };
  return { app, stop };
}
