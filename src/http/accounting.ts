/**
 * Request accounting, for both request paths (Fastify's and the warm manifest path before it):
 * which responses are in flight (shutdown drains them), and for each answered request the one
 * request log line, the metrics and the status page's counts. A response a client or a failed
 * fill cut short is never counted as answered: it gets a warning instead.
 */
import type { ServerResponse } from 'node:http';
import type { FastifyReply, FastifyRequest } from 'fastify';
import type { CacheResult } from '../core/cache-result.js';
import type { RequestLine } from '../telemetry/log-stream.js';
import type { Metrics } from '../telemetry/metrics.js';
import { onResponseGone } from './response-gone.js';
import type { Stats } from './status.js';

/** What a request under /v2 was about, filled in by the routes as they learn it. */
export interface RequestContext {
  kind: string;
  upstream?: string;
  name?: string;
  reference?: string;
  cache?: CacheResult;
  /** bytes of body sent or being streamed, read when the response ends */
  bytes: () => number;
  /** A worker answers the client and accounts for the request (a fill it follows): not counted here. */
  handedOff?: boolean;
}

declare module 'fastify' {
  interface FastifyRequest {
    oci: RequestContext | null;
  }
}

/** A finished request, for the one place that logs and counts it: the request line's own fields (client and user: the audit), and what the routes learned. */
export interface Finished extends Pick<RequestLine, 'reqId' | 'method' | 'url' | 'status' | 'client' | 'user'> {
  ctx: RequestContext | null;
  ms: number;
  /** Body bytes by Content-Length, for answers that are not content: errors, /v2/, the status page */
  bytes?: number;
  /** Answered by a route that probes and scrapers poll: logged only when it fails */
  polled?: boolean;
}

/**
 * Routes that probes, scrapers and the status page's own refresh poll every few seconds: counted
 * in the metrics, logged only when they fail, so they do not drown the pulls in the log.
 */
const POLLED = new Set(['/', '/healthz', '/readyz', '/metrics']);

/** Body bytes of an answer by its Content-Length: 0 for HEAD, and for a streamed answer without one (admin prefetch's progress lines). */
export function sentBytes(req: FastifyRequest, reply: FastifyReply): number {
  const length = req.method === 'HEAD' ? 0 : Number(reply.getHeader('content-length') ?? 0);
  return Number.isFinite(length) ? length : 0;
}

export class Accounting {
  private inflight = 0;
  private drained: (() => void) | undefined;
  private lastReqId = 0;

  constructor(
    private readonly metrics: Metrics,
    private readonly stats: Stats,
    /** Writes the request log line (or drops it when the level is above info). */
    private readonly logRequest: (line: RequestLine) => void,
    /** Writes the warning for a response cut short. */
    private readonly warn: (obj: object, msg: string) => void,
    /** Before the number: a worker's (`w2-`), so ids stay unique in a group's log. */
    private readonly idPrefix = '',
  ) {}

  /** Request ids for both paths, in the format of Fastify's default genReqId. */
  readonly nextReqId = (): string => `req-${this.idPrefix}${(this.lastReqId = (this.lastReqId + 1) & 0x7fffffff).toString(36)}`;

  /**
   * Counts a response as in flight until it is finished or its connection closed (drain() waits
   * for them), then tells `gone` which of the two it was.
   */
  track(res: ServerResponse, gone: (completed: boolean) => void): void {
    this.inflight++;
    onResponseGone(res, () => {
      if (--this.inflight === 0) this.drained?.();
      gone(res.writableFinished);
    });
  }

  /** Resolves when no response is in flight, or after `ms`. */
  async drain(ms: number): Promise<void> {
    if (this.inflight === 0) return;
    await new Promise<void>((resolve) => {
      this.drained = resolve;
      setTimeout(resolve, ms).unref();
    });
  }

  /**
   * Tracks a response answered outside Fastify (a worker's hits and the fills it follows) and
   * accounts for it once it is gone: `f` is logged and counted when sent, warned about when cut short.
   */
  trackAnswer(res: ServerResponse, f: Finished, start: number): void {
    this.track(res, (completed) => {
      if (!completed) return this.aborted(f);
      f.ms = performance.now() - start;
      this.finished(f);
    });
  }

  /** Tracks a response of Fastify's and accounts for it once it is gone: completed ones are logged by onResponse (finishedReply). */
  trackReply(req: FastifyRequest, reply: FastifyReply): void {
    this.track(reply.raw, (completed) => completed || req.oci?.handedOff || this.aborted({ reqId: req.id, method: req.method, url: req.url, ctx: req.oci }));
  }

  /** Fastify's onResponse: the request was answered. */
  finishedReply(req: FastifyRequest, reply: FastifyReply): void {
    if (req.oci?.handedOff) return;
    const polled = !req.oci && POLLED.has(req.routeOptions.url ?? '');
    this.finished({ reqId: req.id, method: req.method, url: req.url, status: reply.statusCode, client: req.ip, user: req.identity?.user, ctx: req.oci, ms: reply.elapsedTime, bytes: sentBytes(req, reply), polled });
  }

  /** A response a client or a failed fill cut short: never counted as answered, so said here. */
  aborted({ reqId, method, url, ctx }: Omit<Finished, 'ms' | 'status'>): void {
    if (ctx) this.warn({ reqId, method, url, upstream: ctx.upstream, name: ctx.name, reference: ctx.reference, cache: ctx.cache, bytes: ctx.bytes() }, 'response aborted');
  }

  /** Metrics, status page counts and the request log line of an answered request. */
  finished({ reqId, method, url, status, client, user, ctx, ms, bytes: sent, polled }: Finished): void {
    this.metrics.httpDuration.observe([ctx?.kind ?? 'other', method, String(status)], ms / 1000);
    // The log's bytes are the body sent, error envelopes included; served bytes count content only.
    const bytes = ctx && ctx.cache !== 'error' ? ctx.bytes() : (sent ?? 0);
    if (!ctx) {
      // Answers outside the API's kinds are logged too (/v2/, refused writes, bad names, admin).
      if (!polled || status >= 500) this.logRequest({ reqId, method, url, status, client, user, bytes, durationMs: Math.round(ms) });
      return;
    }
    if (ctx.upstream && ctx.cache) {
      this.metrics.cacheRequests.inc([ctx.upstream, ctx.kind, ctx.cache]);
      this.stats.record(ctx.upstream, ctx.kind, ctx.cache, ctx.name, ctx.reference !== undefined && !ctx.reference.includes(':'), method);
      if (bytes > 0 && ctx.cache !== 'error' && (ctx.kind === 'manifest' || ctx.kind === 'blob')) this.metrics.servedBytes.inc([ctx.upstream, ctx.cache === 'hit' ? 'cache' : 'upstream'], bytes);
    }
    this.logRequest({ reqId, method, url, status, client, user, upstream: ctx.upstream, name: ctx.name, reference: ctx.reference, cache: ctx.cache, bytes, durationMs: Math.round(ms) });
  }
}
