/**
 * Wiring: builds the services from config, the Fastify instance, the one error handler, and the
 * operational endpoints. The only file that knows every module.
 */
import { access, constants } from 'node:fs/promises';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import Fastify, { LogController, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { OciError, type ErrorCode } from './errors.js';
import { registerAdmin } from './admin.js';
import { LogStream, type RequestLine } from './log.js';
import { onResponseGone } from './response-gone.js';
import { registerRoutes, warmManifests, type Finished } from './routes.js';
import { openCache, type Services } from './services.js';
import { registerStatus, Stats } from './status.js';
import { version } from './version.js';

declare module 'fastify' {
  interface FastifyInstance {
    drain(ms: number): Promise<void>;
    readonly services: Services;
  }
}

export interface AppOptions {
  /** pino options or false; defaults to JSON logs at config.log.level */
  logger?: boolean | Record<string, unknown>;
}

/**
 * Routes that probes, scrapers and the status page's own refresh poll every few seconds: counted
 * in the metrics, logged only when they fail, so they do not drown the pulls in the log.
 */
const POLLED = new Set(['/', '/healthz', '/readyz', '/metrics']);

/** Body bytes of an answer by its Content-Length: 0 for HEAD, and for a streamed answer without one (admin prefetch's progress lines). */
function sentBytes(req: FastifyRequest, reply: FastifyReply): number {
  const length = req.method === 'HEAD' ? 0 : Number(reply.getHeader('content-length') ?? 0);
  return Number.isFinite(length) ? length : 0;
}

/** Fastify's own 4xx errors (bad URL, bad header, …) in the spec's vocabulary. */
const FASTIFY_STATUS_CODE: Record<number, ErrorCode> = { 400: 'NAME_INVALID', 404: 'NAME_UNKNOWN', 405: 'UNSUPPORTED', 413: 'SIZE_INVALID', 415: 'UNSUPPORTED' };

export async function buildApp(config: Config, options: AppOptions = {}): Promise<FastifyInstance> {
  // Set once the services exist; until then every request goes to Fastify.
  let warm: ((req: IncomingMessage, res: ServerResponse) => boolean) | undefined;
  // One sequence for both paths, in the format of Fastify's default genReqId.
  let lastReqId = 0;
  const nextReqId = (): string => `req-${(lastReqId = (lastReqId + 1) & 0x7fffffff).toString(36)}`;
  // Our own stdout writer unless the caller brought a logger (tests read theirs).
  const logStream = options.logger === undefined ? new LogStream() : undefined;
  const app = Fastify({
    serverFactory: (handler) => {
      const server = createServer((req, res) => {
        if (!warm?.(req, res)) handler(req, res);
      });
      // Blob downloads may legitimately take long; idle connections are still reaped by keepAliveTimeout.
      // (Fastify applies its own timeout options only to servers it creates.)
      server.requestTimeout = 0;
      server.setTimeout(0);
      server.keepAliveTimeout = 75_000;
      return server;
    },
    genReqId: nextReqId,
    // Asynchronous, batched stdout (log.ts): lines go out 64 KiB at a time or every 250 ms, so
    // the per-request log line costs no write (and thread-pool hop) of its own. cli.ts flushes
    // before exit.
    logger: options.logger ?? {
      level: config.log.level,
      redact: ['req.headers.authorization'],
      stream: logStream,
    },
    // One log line per request, written by our onResponse hook with the cache fields.
    logController: new LogController({ disableRequestLogging: true }),
    // No pino child logger per request: the lines we write carry reqId themselves. With the
    // buffered stdout above and the callback-style hooks below, a cached manifest answer went from
    // 40-50 to about 33 us of user CPU on the bench VM (bench figure 2).
    childLoggerFactory: (logger) => logger,
    exposeHeadRoutes: false,
    return503OnClosing: true,
    trustProxy: config.server.trustProxy,
    bodyLimit: 1024 * 1024,
    // Idle keep-alive sockets must not hold shutdown for keepAliveTimeout; in-flight requests are
    // drained first by drain() (see cli.ts), so by close() only idle or stuck sockets remain.
    forceCloseConnections: true,
    routerOptions: { ignoreTrailingSlash: true },
    // A path Fastify cannot decode (bad percent-encoding, e.g. /v2/%zz/manifests/x) is answered
    // before routing, past every hook, in Fastify's own format. Here it gets the spec's envelope
    // (400 NAME_INVALID) and is counted and logged like any other answer.
    frameworkErrors: (err, req, reply) => {
      const start = performance.now();
      track(reply.raw, () => finished({ reqId: req.id, method: req.method, url: req.url, status: reply.statusCode, ctx: null, ms: performance.now() - start, bytes: sentBytes(req, reply) }));
      onError(err, req, reply);
    },
  });

  const services = await openCache(config, app.log, { sweep: true });
  const { metrics, blobs, db, registry, upstreams, lifecycle } = services;
  lifecycle.start();
  app.decorate('services', services);
  const stats = new Stats();
  let closing = false;
  let inflight = 0;
  let drained: (() => void) | undefined;

  // We never read request bodies (every write is refused), so don't parse them either.
  app.removeAllContentTypeParsers();
  app.addContentTypeParser('*', (_req, _payload, done) => done(null, undefined));

  app.setErrorHandler(onError);

  /** The one error handler: every error answer in the spec's envelope (errors.ts). */
  function onError(err: Error & { statusCode?: number }, req: FastifyRequest, reply: FastifyReply): FastifyReply {
    let oci: OciError;
    if (err instanceof OciError) {
      oci = err;
    } else if (err.statusCode !== undefined && err.statusCode < 500) {
      oci = new OciError(FASTIFY_STATUS_CODE[err.statusCode] ?? 'UNSUPPORTED', err.message, { status: err.statusCode });
    } else {
      req.log.error({ reqId: req.id, err }, 'unexpected error');
      oci = new OciError('UNKNOWN');
    }
    if (req.oci) req.oci.cache = 'error';
    if (oci.status >= 500 && err instanceof OciError) req.log.warn({ reqId: req.id, code: oci.code, err: oci.message, cause: (oci.cause as Error | undefined)?.message }, 'upstream error');
    reply.code(oci.status).headers(oci.headers).header('docker-distribution-api-version', 'registry/2.0');
    if (req.method === 'HEAD') return reply.send();
    return reply.type('application/json').send(JSON.stringify(oci.toJSON()));
  }

  /**
   * Counts a response as in flight until it is finished or its connection closed (drain() waits
   * for them), then tells `gone` which of the two it was.
   */
  const track = (res: ServerResponse, gone: (completed: boolean) => void): void => {
    inflight++;
    onResponseGone(res, () => {
      if (--inflight === 0) drained?.();
      gone(res.writableFinished);
    });
  };

  /** A response a client or a failed fill cut short: never counted as answered, so said here. */
  const aborted = ({ reqId, method, url, ctx }: Omit<Finished, 'ms' | 'status'>): void => {
    if (ctx) app.log.warn({ reqId, method, url, upstream: ctx.upstream, name: ctx.name, reference: ctx.reference, cache: ctx.cache, bytes: ctx.bytes() }, 'response aborted');
  };

  // Callback-style hooks: no promise per request on the hot path.
  app.addHook('onRequest', (req, reply, done) => {
    // Probes still get their own answers: /healthz ok, /readyz "not ready: shutting down".
    if (closing && req.routeOptions.url !== '/healthz' && req.routeOptions.url !== '/readyz') return done(new OciError('UNAVAILABLE', 'shutting down'));
    // onResponse logs completed responses.
    track(reply.raw, (completed) => completed || aborted({ reqId: req.id, method: req.method, url: req.url, ctx: req.oci }));
    done();
  });

  /** Metrics, status page counts and the request log line of every answered request, on both paths. */
  const finished = ({ reqId, method, url, status, ctx, ms, bytes: sent, polled }: Finished): void => {
    metrics.httpDuration.observe([ctx?.kind ?? 'other', method, String(status)], ms / 1000);
    // The log's bytes are the body sent, error envelopes included; served bytes count content only.
    const bytes = ctx && ctx.cache !== 'error' ? ctx.bytes() : (sent ?? 0);
    if (!ctx) {
      // Answers outside the API's kinds are logged too (/v2/, refused writes, bad names, admin).
      if (!polled || status >= 500) logRequest({ reqId, method, url, status, bytes, durationMs: Math.round(ms) });
      return;
    }
    if (ctx.upstream && ctx.cache) {
      metrics.cacheRequests.inc([ctx.upstream, ctx.kind, ctx.cache]);
      stats.record(ctx.upstream, ctx.kind, ctx.cache, ctx.name, ctx.reference !== undefined && !ctx.reference.includes(':'), method);
      if (bytes > 0 && ctx.cache !== 'error' && (ctx.kind === 'manifest' || ctx.kind === 'blob')) metrics.servedBytes.inc([ctx.upstream, ctx.cache === 'hit' ? 'cache' : 'upstream'], bytes);
    }
    logRequest({ reqId, method, url, status, upstream: ctx.upstream, name: ctx.name, reference: ctx.reference, cache: ctx.cache, bytes, durationMs: Math.round(ms) });
  };
  const logRequest = (line: RequestLine): void => {
    if (!logStream) app.log.info(line, 'request');
    else if ((app.log as Logger).isLevelEnabled('info')) logStream.request(line);
  };

  app.addHook('onResponse', (req, reply, done) => {
    const polled = !req.oci && POLLED.has(req.routeOptions.url ?? '');
    finished({ reqId: req.id, method: req.method, url: req.url, status: reply.statusCode, ctx: req.oci, ms: reply.elapsedTime, bytes: sentBytes(req, reply), polled });
    done();
  });

  registerRoutes(app, { registry, upstreams, metrics });
  warm = warmManifests({
    registry,
    upstreams,
    open: () => !closing,
    reqId: nextReqId,
    // As on the Fastify path: in flight until sent, logged and counted once it was.
    sent: (res, f, start) =>
      track(res, (completed) => {
        try {
          if (!completed) return aborted(f);
          f.ms = performance.now() - start;
          finished(f);
        } catch (err) {
          // Fastify catches what its onResponse hooks throw; this runs in an event listener.
          app.log.error({ reqId: f.reqId, err }, 'logging a response failed');
        }
      }),
  });
  registerAdmin(app, services);
  registerStatus(app, services, stats, version());

  // HEAD too: some load balancers probe with it (the API's routes answer HEAD explicitly, so
  // exposeHeadRoutes is off globally).
  app.get('/healthz', { exposeHeadRoute: true }, async () => ({ status: 'ok' }));
  app.get('/readyz', { exposeHeadRoute: true }, async (_req, reply) => {
    try {
      if (closing) throw new Error('shutting down');
      db.ping();
      await access(blobs.tmpDir, constants.W_OK);
      return { status: 'ready' };
    } catch (err) {
      return reply.code(503).send({ status: 'not ready', reason: (err as Error).message });
    }
  });
  app.get('/metrics', { exposeHeadRoute: true }, async (_req, reply) => reply.type(metrics.registry.contentType).send(await metrics.registry.metrics()));

  /** Stops taking requests (readyz fails, new requests get 503) and waits for running ones, up to `ms`. */
  app.decorate('drain', async (ms: number): Promise<void> => {
    closing = true;
    if (inflight === 0) return;
    await new Promise<void>((resolve) => {
      drained = resolve;
      setTimeout(resolve, ms).unref();
    });
  });
  app.addHook('preClose', async () => {
    closing = true;
  });
  app.addHook('onClose', async () => {
    await services.close(config.server.shutdownTimeout);
  });
  return app;
}
