/**
 * Wiring: opens the cache, builds the Fastify instance and plugs in the routes, the warm manifest
 * path, the accounting, the one error handler, the operational endpoints, the admin API and the
 * status page. The only file that knows every module; each decision lives in the module it names.
 */
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { Access } from '../access/access.js';
import { openCache, type Services } from '../cache/services.js';
import type { Clock } from '../core/clock.js';
import type { Config } from '../core/config.js';
import type { Network } from '../upstream/exchange.js';
import { OciError } from '../core/errors.js';
import type { RequestLine } from '../telemetry/log-stream.js';
import type { LineSink } from '../telemetry/log-relay.js';
import { makeLogger, type LoggerOption } from '../telemetry/logger.js';
import { version } from '../version.js';
import { registerAccess } from './access-guard.js';
import { Accounting, sentBytes } from './accounting.js';
import { registerAdmin } from './admin.js';
import { onClientError, onError, onNotFound } from './error-handler.js';
import { registerProbes } from './probes.js';
import { registerRoutes } from './routes.js';
import { createHttpServer } from './server.js';
import { registerStatus, Stats } from './status.js';
import { warmManifests } from './warm-path.js';

declare module 'fastify' {
  interface FastifyInstance {
    /** Stops taking requests (readyz fails, new requests get 503) and waits for running ones, up to `ms`. */
    drain(ms: number): Promise<void>;
    readonly services: Services;
    /** The status page's counts: a coordinator adds its workers' (http/cluster.ts). */
    readonly stats: Stats;
    /** Where whole log lines of another process (a worker's: telemetry/log-relay.ts) go: this one's log output. */
    readonly logSink: LineSink;
  }
}

export interface AppOptions {
  /** pino options (with `stream`), true or false; defaults to JSON logs at config.log.level on our batched stdout writer */
  logger?: LoggerOption;
  /** The time, for tests that move it forward (default: the system's). */
  clock?: Clock;
  /** How upstreams are reached: the DNS lookup and extra trust anchors (default: the system's). */
  network?: Network;
  /** The coordinator of a group of workers (http/cluster.ts): workers follow its fills. */
  coordinator?: boolean;
}

export async function buildApp(config: Config, options: AppOptions = {}): Promise<FastifyInstance> {
  const { log, logStream } = makeLogger(config, options.logger);
  const services = await openCache(config, log, { sweep: true, clock: options.clock, network: options.network });
  const stats = new Stats();
  const logRequest = (line: RequestLine): void => {
    if (!logStream) log.info(line, 'request');
    else if (log.isLevelEnabled('info')) logStream.request(line);
  };
  const accounting = new Accounting(services.metrics, stats, logRequest, (obj, msg) => log.warn(obj, msg));
  let closing = false;
  let access: Access | undefined;
  try {
    // Reads the htpasswd file and the token key: a bad one stops the start (ConfigError).
    access = config.access && new Access(config.access, services.metrics, (obj, msg) => log.warn(obj, msg), options.clock);
  } catch (err) {
    await services.close(0);
    throw err;
  }
  const warm = warmManifests({ ...services, accounting, access, trustProxy: config.server.trustProxy, open: () => !closing, error: (obj, msg) => log.error(obj, msg) });

  let app: FastifyInstance;
  try {
    app = Fastify({
      serverFactory: (handler) => createHttpServer(config.server, warm, handler, { info: (obj, msg) => log.info(obj, msg), warn: (obj, msg) => log.warn(obj, msg) }),
      genReqId: accounting.nextReqId,
      loggerInstance: log as FastifyBaseLogger,
      // One log line per request, written by the accounting with the cache fields; no child logger
      // per request either: those lines carry reqId themselves.
      logController: new LogController({ disableRequestLogging: true }),
      childLoggerFactory: (logger) => logger,
      exposeHeadRoutes: false,
      return503OnClosing: true,
      trustProxy: config.server.trustProxy,
      bodyLimit: 1024 * 1024,
      // Idle keep-alive sockets must not hold shutdown for keepAliveTimeout; in-flight requests are
      // drained first by drain() (see cli.ts), so by close() only idle or stuck sockets remain.
      forceCloseConnections: true,
      routerOptions: { ignoreTrailingSlash: true },
      clientErrorHandler: onClientError,
      // A path Fastify cannot decode (bad percent-encoding, e.g. /v2/%zz/manifests/x) is answered
      // before routing, past every hook: here it gets the spec's envelope and is counted and logged.
      frameworkErrors: (err, req, reply) => {
        const start = performance.now();
        accounting.track(reply.raw, () => accounting.finished({ reqId: req.id, method: req.method, url: req.url, status: reply.statusCode, client: req.ip, ctx: null, ms: performance.now() - start, bytes: sentBytes(req, reply) }));
        onError(err, req, reply);
      },
    });
  } catch (err) {
    await services.close(0);
    throw err;
  }
  services.lifecycle.start();
  services.keeper.start();
  services.remote?.start(services.config.storage.s3!.staleUploads);
  app.decorate('services', services);
  app.decorate('stats', stats);
  const logSink: LineSink = logStream
    ? { write: (lines) => logStream.lines(lines), onDrain: (fn) => logStream.onDrain(fn) }
    : { write: (lines) => process.stdout.write(lines), onDrain: (fn) => void process.stdout.once('drain', fn) };
  app.decorate('logSink', logSink);

  // We never read request bodies (every write is refused), so don't parse them either.
  app.removeAllContentTypeParsers();
  app.addContentTypeParser('*', (_req, _payload, done) => done(null, undefined));
  app.setErrorHandler(onError);
  app.setNotFoundHandler(onNotFound);

  // Callback-style hooks: no promise per request on the hot path.
  app.addHook('onRequest', (req, reply, done) => {
    // Probes still get their own answers: /healthz ok, /readyz "not ready: shutting down".
    if (closing && req.routeOptions.url !== '/healthz' && req.routeOptions.url !== '/readyz') return done(new OciError('UNAVAILABLE', 'shutting down'));
    accounting.trackReply(req, reply);
    done();
  });
  app.addHook('onResponse', (req, reply, done) => {
    accounting.finishedReply(req, reply);
    done();
  });

  // Its hook runs after the one above (shutdown, accounting) and before every route handler.
  const guard = registerAccess(app, access);
  registerRoutes(app, { ...services, access: guard, followers: options.coordinator });
  registerAdmin(app, services);
  registerStatus(app, services, stats, version(), access);
  registerProbes(app, services, () => closing);

  app.decorate('drain', async (ms: number): Promise<void> => {
    closing = true;
    await accounting.drain(ms);
  });
  app.addHook('preClose', async () => {
    closing = true;
  });
  app.addHook('onClose', async () => {
    await services.close(config.server.shutdownTimeout);
  });
  return app;
}
