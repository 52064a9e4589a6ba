/**
 * A worker of a group (http/cluster.ts): answers the hits of the warm path with every core, and
 * hands everything else to the coordinator, which owns the upstreams, fills, eviction and every
 * index write. A hit here is exactly what the single process answers without a write: a manifest
 * by a fresh tag or by a digest this repository holds (cache/manifest-hits.ts), a blob on local
 * disk this repository holds (cache/blob-hits.ts), for a client the access rules let read it.
 * Same headers (manifest-answer.ts, blob-answer.ts), same request line, same metrics (summed into
 * the coordinator's /metrics).
 *
 * The index is read through its own SQLite connection (query_only). A tag row is trusted in
 * memory for TAG_ROW_TTL_MS at most, since the coordinator may move or drop it meanwhile: a worker
 * answers from what the index said at most that long ago. Blob reads are reported to the
 * coordinator in batches (access times for eviction, as Lifecycle.touch records its own).
 */
import cluster from 'node:cluster';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Access } from '../access/access.js';
import { openBlobHit } from '../cache/blob-hits.js';
import { ManifestHits } from '../cache/manifest-hits.js';
import { UpstreamIndex } from '../core/api-path.js';
import { systemClock } from '../core/clock.js';
import { configFromText, type Config } from '../core/config.js';
import { BlobStore } from '../storage/blob-store.js';
import { FollowedFill } from '../storage/fill-progress.js';
import { Db } from '../storage/db.js';
import { makeLogger } from '../telemetry/logger.js';
import { Metrics, workerShare } from '../telemetry/metrics.js';
import { Accounting, type RequestContext } from './accounting.js';
import { blobHeaders } from './blob-answer.js';
import { sendFileRange } from './file-response.js';
import { endToEnd, FOLLOW, Forwarder } from './forward.js';
import { createHttpServer } from './server.js';
import { Stats, type StatsBatch } from './status.js';
import { certificateUser } from './tls.js';
import { clientAddress, warmManifests, warmRequest } from './warm-path.js';

export const TAG_ROW_TTL_MS = 1000;
/** How often blob reads (access times, for eviction) and the status page's counts go to the coordinator. */
const REPORT_INTERVAL_MS = 1000;

/** Messages between the coordinator and its workers (over the cluster's IPC channel). */
export type ToWorker = { t: 'metrics'; id: number } | { t: 'drain' };
export type ToCoordinator =
  | { t: 'metrics'; id: number; share: unknown }
  | { t: 'touch'; blobs: Array<[digest: string, size: number, upstream: string, at: number]> }
  | { t: 'stats'; batch: StatsBatch }
  | { t: 'drained' };

/**
 * What a worker gets from its coordinator, in its environment: the socket, the config text the
 * coordinator read (a worker started later must not read a file edited since), and the token key.
 */
export const SOCKET_ENV = 'OCICACHE_COORDINATOR_SOCKET';
export const CONFIG_ENV = 'OCICACHE_COORDINATOR_CONFIG';
export const TOKEN_KEY_ENV = 'OCICACHE_COORDINATOR_TOKEN_KEY_FILE';

/** In a worker: the coordinator's socket and config (the same file text, the same token key). */
export function workerSetup(env: NodeJS.ProcessEnv): { socketPath: string; config: Config } {
  const config = configFromText('the coordinator\'s config', env[CONFIG_ENV] ?? '', env);
  const tokenKeyFile = env[TOKEN_KEY_ENV];
  return { socketPath: env[SOCKET_ENV] ?? '', config: tokenKeyFile && config.access ? { ...config, access: { ...config.access, tokenKeyFile } } : config };
}

export async function runWorker(config: Config, socketPath: string): Promise<void> {
  const { log, logStream } = makeLogger(config, undefined);
  const warn = (obj: object, msg: string): void => log.warn(obj, msg);
  const metrics = new Metrics(config.server.replica);
  // The status page's counts, sent to the coordinator each second and cleared.
  const stats = new Stats();
  const accounting = new Accounting(metrics, stats, (line) => log.isLevelEnabled('info') && logStream?.request(line), warn, `w${cluster.worker?.id ?? 0}-`);
  // The workers share cache.manifestMemory between them (each holds what its own clients ask for), beside the coordinator's.
  const db = new Db(join(config.storage.root, 'index.db'), { reader: true, manifestMemory: Math.ceil(config.cache.manifestMemory / config.server.workers) });
  const store = new BlobStore(config.storage.root, config.cache.fillMemory);
  const hits = new ManifestHits(db, systemClock, TAG_ROW_TTL_MS);
  const upstreams = new UpstreamIndex(config);
  const access = config.access && new Access(config.access, metrics, warn);
  const forwarder = new Forwarder(socketPath, config.server.trustProxy);
  const trustProxy = config.server.trustProxy;
  let closing = false;
  const send = (m: ToCoordinator): void => void process.send?.(m);

  const touched = new Map<string, [string, number, string, number]>();
  const touch = (digest: string, size: number, upstream: string): void => void touched.set(`${upstream}\n${digest}`, [digest, size, upstream, Date.now()]);
  const report = (): void => {
    const batch = stats.take();
    if (batch.results.length > 0) send({ t: 'stats', batch });
    if (touched.size === 0) return;
    send({ t: 'touch', blobs: [...touched.values()] });
    touched.clear();
  };
  setInterval(report, REPORT_INTERVAL_MS).unref();

  const warm = warmManifests({ manifests: { hits }, upstreams, accounting, access, trustProxy, open: () => !closing, error: (obj, msg) => log.error(obj, msg) });

  /** Who the client is, when only the asynchronous check can tell (a first password): remembered for identifySync. */
  const learn = async (req: IncomingMessage): Promise<boolean> => {
    if (!access) return false;
    const certificate = access.certificates ? certificateUser(req.socket) : undefined;
    if (access.identifySync(req.headers.authorization, certificate) !== undefined) return false;
    return (await access.identify(req.headers.authorization, certificate).catch(() => null)) !== null;
  };

  /** A blob hit answered here; false: nothing was written. */
  const blob = async (req: IncomingMessage, res: ServerResponse): Promise<boolean> => {
    const start = performance.now();
    const asked = closing ? undefined : warmRequest(req, 'blob', upstreams, access);
    if (!asked) return false;
    const { parsed, user } = asked;
    // warmRequest let only a GET or HEAD through.
    const method = req.method as 'GET' | 'HEAD';
    const url = req.url!;
    const hit = await openBlobHit(db, store, parsed.target, parsed.reference, method === 'GET' ? req.headers.range : undefined).catch(() => undefined);
    if (!hit) return false;
    if (req.socket.destroyed) {
      // Gone while the file was opened: nothing to answer, and no 'close' left to wait for.
      await hit.handle.close().catch(() => undefined);
      return true;
    }
    let bytes = 0;
    const ctx: RequestContext = { kind: 'blob', upstream: parsed.target.upstream.name, name: parsed.target.name, reference: parsed.reference, cache: 'hit', bytes: () => bytes };
    const f = { reqId: accounting.nextReqId(), method, url, status: hit.range ? 206 : 200, client: clientAddress(req, trustProxy), user, ctx, ms: 0 };
    accounting.trackAnswer(res, f, start);
    touch(parsed.reference, hit.size, parsed.target.upstream.name);
    try {
      res.writeHead(f.status, blobHeaders(parsed.target.upstream.name, parsed.reference, 'hit', hit.size, hit.range));
      if (method === 'HEAD') res.end();
      else await sendFileRange(res, hit.handle, hit.start, hit.end, (n) => (bytes += n));
    } catch (err) {
      log.warn({ reqId: f.reqId, url, err: (err as Error).message }, 'reading a cached blob failed');
      res.destroy();
    } finally {
      await hit.handle.close().catch(() => undefined);
    }
    return true;
  };

  /**
   * A fill the coordinator lets this worker follow (Forwarder.forward): its temp file is sent as
   * the coordinator reports it written (storage/fill-progress.ts), through the same pooled buffers
   * as a hit, and the request is accounted for here (the coordinator counts it not).
   */
  const follow = async (req: IncomingMessage, res: ServerResponse, answer: IncomingMessage, start: number): Promise<void> => {
    const fields = new URLSearchParams(String(answer.headers[FOLLOW]));
    const digest = String(answer.headers['docker-content-digest']);
    let bytes = 0;
    const ctx: RequestContext = { kind: 'blob', upstream: String(answer.headers['oci-namespace']), name: fields.get('name') ?? undefined, reference: digest, cache: 'miss', bytes: () => bytes };
    const f = { reqId: accounting.nextReqId(), method: 'GET', url: req.url!, status: answer.statusCode ?? 200, client: clientAddress(req, trustProxy), user: fields.get('user') || undefined, ctx, ms: 0 };
    // Tracked before any await: a client that leaves meanwhile is seen, and counted as cut short.
    accounting.trackAnswer(res, f, start);
    let fill: FollowedFill | undefined;
    let handle: FileHandle | undefined;
    try {
      const file = fields.get('file') ?? '';
      // Only a name in tmp/: what the coordinator sends never names a path of its own choosing.
      if (!/^[\w][\w.-]*$/.test(file)) throw new Error(`not a fill's file: ${file}`);
      const offset = (key: string): number | undefined => {
        const v = fields.get(key);
        if (!v) return undefined;
        if (!/^\d{1,15}$/.test(v)) throw new Error(`not an offset: ${key}=${v}`);
        return Number(v);
      };
      const from = offset('start') ?? 0;
      const to = offset('to') ?? Infinity;
      fill = new FollowedFill(join(store.tmpDir, file), store.path(digest), answer);
      handle = await fill.open();
      const headers = endToEnd(answer.headers);
      delete headers[FOLLOW];
      if (fields.get('length')) headers['content-length'] = fields.get('length')!;
      res.writeHead(f.status, headers);
      // A failed fill (or the coordinator gone) cuts the client off: never a complete-looking wrong body.
      await sendFileRange(res, handle, from, to, (n) => (bytes += n), (pos) => fill!.until(pos));
    } catch (err) {
      log.warn({ reqId: f.reqId, url: req.url, err: (err as Error).message }, 'sending a blob being downloaded failed');
      res.destroy();
    } finally {
      // Done with the fill (a range may end long before it does): the coordinator then lets go of it.
      if (fill?.state !== 'committed') answer.destroy();
      await handle?.close().catch(() => undefined);
    }
  };

  const handle = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const start = performance.now();
    // In flight from the start, as hits are: a draining worker waits for it, and a client that
    // leaves during an await below is seen (its 'close' is not missed).
    accounting.track(res, () => undefined);
    try {
      if ((await learn(req)) && warm(req, res)) return;
      if (await blob(req, res)) return;
    } catch (err) {
      log.error({ err, url: req.url }, 'a worker failed to answer a hit');
      if (res.headersSent) return void res.destroy();
    }
    forwarder.forward(req, res, (answer) => void follow(req, res, answer, start));
  };

  const server = createHttpServer(config.server, warm, (req, res) => void handle(req, res), { info: (obj, msg) => log.info(obj, msg), warn });
  process.on('message', (m: ToWorker) => {
    if (m.t === 'metrics') {
      void workerShare(metrics.registry).then((share) => send({ t: 'metrics', id: m.id, share }));
    } else if (m.t === 'drain') {
      // Stop taking connections; answer what is in flight (hits here, the rest through the
      // coordinator, which drains after its workers), then go.
      closing = true;
      server.close();
      server.closeIdleConnections();
      void accounting.drain(config.server.shutdownTimeout).then(() => {
        report();
        send({ t: 'drained' });
        log.flush?.();
        setTimeout(() => process.exit(0), 50);
      });
    }
  });
  // The coordinator is gone (killed, or crashed): a worker alone cannot fill or evict.
  process.on('disconnect', () => process.exit(1));
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: config.server.host, port: config.server.port }, resolve);
  });
}
