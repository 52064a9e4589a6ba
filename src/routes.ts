/**
 * The HTTP surface. One wildcard route per method group; the path is parsed by reference.ts
 * from the raw URL, because find-my-way params decode %2F and cap length at 100 (protocol.md §10).
 * HEAD handlers are explicit: Fastify's generated HEAD runs the GET and zeroes Content-Length,
 * and containerd builds its descriptor from the HEAD alone (protocol.md §1.7).
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { OciError } from './errors.js';
import type { CacheResult, Metrics } from './metrics.js';
import { sendFileRange } from './file-response.js';
import { contentRange } from './range.js';
import { parseV2Path, type ParsedPath, type UpstreamIndex } from './reference.js';
import type { BlobResult, ManifestResult, Registry } from './registry.js';

export interface RequestContext {
  kind: string;
  upstream?: string;
  name?: string;
  reference?: string;
  cache?: CacheResult;
  /** bytes of body sent or being streamed, read when the response ends */
  bytes: () => number;
}

declare module 'fastify' {
  interface FastifyRequest {
    oci: RequestContext | null;
  }
}

export interface RouteDeps {
  registry: Registry;
  upstreams: UpstreamIndex;
  metrics: Metrics;
}

const API_VERSION = { 'docker-distribution-api-version': 'registry/2.0' };

function splitUrl(raw: string): { path: string; query: URLSearchParams } {
  const q = raw.indexOf('?');
  return q < 0 ? { path: raw, query: new URLSearchParams() } : { path: raw.slice(0, q), query: new URLSearchParams(raw.slice(q + 1)) };
}

function optionalInt(query: URLSearchParams, key: string): number | undefined {
  const v = query.get(key);
  if (v === null) return undefined;
  if (!/^\d{1,9}$/.test(v)) throw new OciError('PAGINATION_NUMBER_INVALID', `${key} must be a non-negative integer`);
  return Number(v);
}

function readOnly(): OciError {
  return new OciError('UNSUPPORTED', 'this registry is a read-only cache', { headers: { allow: 'GET, HEAD' } });
}

/** All headers of a manifest answer. One literal: spreading objects into a header set took 3 us per call on Node 20 (micro-benchmark). */
function manifestHeaders(m: ManifestResult, upstream: string): Record<string, string> {
  return {
    'docker-distribution-api-version': 'registry/2.0',
    'oci-namespace': upstream,
    'content-type': m.mediaType,
    'content-length': String(m.size),
    'docker-content-digest': m.digest,
    etag: `"${m.digest}"`,
    'x-cache': m.cache.toUpperCase(),
  };
}

/** A finished request, for the one place that logs and counts it (app.ts). */
export interface Finished {
  reqId: string;
  method: string;
  url: string;
  status: number;
  ctx: RequestContext | null;
  ms: number;
  /** Body bytes by Content-Length, for answers that are not content: errors, /v2/, the status page */
  bytes?: number;
  /** Answered by a route that probes and scrapers poll (app.ts): logged only when it fails */
  polled?: boolean;
}

export interface WarmDeps {
  registry: Registry;
  upstreams: UpstreamIndex;
  /** false once shutdown began: Fastify then answers 503 */
  open: () => boolean;
  reqId: () => string;
  /** `res` was answered (`f.ms` still to be measured from `start`): count it in flight, log it once sent. */
  sent: (res: ServerResponse, f: Finished, start: number) => void;
}

/**
 * Manifest hits answered from Node's request event, before Fastify: the warm path of every pull
 * (bench figure 2). Fastify's routing, reply object and hooks were about a sixth of the CPU of
 * such an answer (A/B in the README's Performance section). Returns false, having written
 * nothing, for anything else (a miss, a type the client did not accept, any parse error,
 * shutdown), and Fastify then handles the request from the start. Same headers and body as
 * sendManifest (test/warm-path.test.ts compares the two).
 */
export function warmManifests(deps: WarmDeps): (req: IncomingMessage, res: ServerResponse) => boolean {
  const { registry, upstreams } = deps;
  return (req, res) => {
    const start = performance.now();
    const { method, url = '/' } = req;
    if ((method !== 'GET' && method !== 'HEAD') || !url.includes('/manifests/') || !deps.open()) return false;
    let parsed: ParsedPath;
    let m: ManifestResult | undefined;
    try {
      const { path, query } = splitUrl(url);
      parsed = parseV2Path(path, query.get('ns') ?? undefined, upstreams);
      if (parsed.kind !== 'manifest') return false;
      m = registry.cachedManifest(parsed.target, parsed.reference, req.headers.accept, method === 'GET');
      if (!m) return false;
      // Node validates every header before it writes anything.
      res.writeHead(200, manifestHeaders(m, parsed.target.upstream.name));
    } catch {
      // writeHead set these before it threw; Fastify's own writeHead would keep the message ("404 OK").
      res.statusCode = 200;
      res.statusMessage = '';
      return false;
    }
    const upstream = parsed.target.upstream.name;
    const bytes = m.body ? m.size : 0;
    const ctx: RequestContext = { kind: 'manifest', upstream, name: parsed.target.name, reference: parsed.reference, cache: m.cache, bytes: () => bytes };
    deps.sent(res, { reqId: deps.reqId(), method, url, status: 200, ctx, ms: 0 }, start);
    res.end(m.body);
    return true;
  };
}

export function registerRoutes(app: FastifyInstance, deps: RouteDeps): void {
  const { registry, upstreams } = deps;

  app.decorateRequest('oci', null);

  app.route({
    method: ['GET', 'HEAD'],
    url: '/*',
    // Not async: a warm manifest is answered synchronously (registry.getManifest). Errors thrown
    // here reach the error handler as rejections do; a returned promise is awaited by Fastify.
    handler: (req, reply): Promise<FastifyReply> | undefined => {
      const { path, query } = splitUrl(req.raw.url ?? '/');
      reply.headers(API_VERSION);
      const parsed = parseV2Path(path, query.get('ns') ?? undefined, upstreams);
      if (parsed.kind === 'base') {
        reply.type('application/json').send('{}');
        return undefined;
      }
      if (parsed.kind === 'upload') throw readOnly();
      // A tag list's "reference" is the literal `list` of its path: not one to log.
      const reference = parsed.kind === 'tags' ? undefined : parsed.reference;
      const ctx: RequestContext = { kind: parsed.kind, upstream: parsed.target.upstream.name, name: parsed.target.name, reference, bytes: () => 0 };
      req.oci = ctx;
      // The spec's answer to dependency confusion: say which upstream this content is from.
      reply.header('oci-namespace', parsed.target.upstream.name);
      const head = req.method === 'HEAD';
      switch (parsed.kind) {
        case 'manifest':
          return sendManifest(req, reply, parsed, head);
        case 'blob':
          return sendBlob(req, reply, parsed, head);
        case 'tags':
          return sendTags(req, reply, parsed, query, head);
        case 'referrers':
          return sendReferrers(req, reply, parsed, query, head);
      }
      // Unreachable while the switch covers every kind; a new kind must not leave a request hanging.
      throw new Error(`no handler for ${(parsed as { kind: string }).kind}`);
    },
  });

  function sendManifest(req: FastifyRequest, reply: FastifyReply, p: Extract<ParsedPath, { target: unknown }>, head: boolean): Promise<FastifyReply> | undefined {
    const m = registry.getManifest(p.target, p.reference, req.headers.accept, !head);
    if (m instanceof Promise) return m.then((r) => manifestReply(req, reply, r, head));
    manifestReply(req, reply, m, head);
    return undefined;
  }

  function manifestReply(req: FastifyRequest, reply: FastifyReply, m: ManifestResult, head: boolean): FastifyReply {
    req.oci!.cache = m.cache;
    req.oci!.bytes = () => (head ? 0 : m.size);
    reply.headers(manifestHeaders(m, req.oci!.upstream!));
    return head ? reply.send() : reply.send(m.body);
  }

  async function sendBlob(req: FastifyRequest, reply: FastifyReply, p: Extract<ParsedPath, { target: unknown }>, head: boolean): Promise<FastifyReply> {
    const b: BlobResult = head ? await registry.headBlob(p.target, p.reference) : await registry.getBlob(p.target, p.reference, req.headers.range);
    req.oci!.cache = b.cache;
    req.oci!.bytes = () => b.stream?.bytesRead ?? 0;
    reply.headers({
      'content-type': 'application/octet-stream',
      'docker-content-digest': p.reference,
      'accept-ranges': 'bytes',
      etag: `"${p.reference}"`,
      'x-cache': b.cache.toUpperCase(),
    });
    if (b.range && b.size !== undefined) {
      reply.code(206).header('content-range', contentRange(b.range, b.size));
      reply.header('content-length', String(b.range.end - b.range.start + 1));
    } else if (b.size !== undefined) {
      reply.header('content-length', String(b.size));
    }
    if (b.file) return sendFile(req, reply, b.file);
    return head || !b.stream ? reply.send() : reply.send(b.stream);
  }

  /**
   * A cached blob: written to the socket by file-response.ts with reused buffers, past Fastify's
   * send (hijacked; onResponse still runs on 'finish'). The headers set on the reply go out as is.
   */
  async function sendFile(req: FastifyRequest, reply: FastifyReply, file: NonNullable<BlobResult['file']>): Promise<FastifyReply> {
    let bytes = 0;
    req.oci!.bytes = () => bytes;
    reply.hijack();
    try {
      reply.raw.writeHead(reply.statusCode, reply.getHeaders() as Record<string, string>);
      await sendFileRange(reply.raw, file.handle, file.start, file.end, (n) => (bytes += n));
    } catch (err) {
      req.log.warn({ reqId: req.id, url: req.url, err: (err as Error).message }, 'reading a cached blob failed');
    } finally {
      await file.done();
    }
    return reply;
  }

  /** A tag list or a referrers index: in the log and the metrics with its cache result, like manifests and blobs. */
  function listed(req: FastifyRequest, reply: FastifyReply, cache: CacheResult, body: string | Buffer, head: boolean): void {
    req.oci!.cache = cache;
    const bytes = head ? 0 : Buffer.byteLength(body);
    req.oci!.bytes = () => bytes;
    reply.header('x-cache', cache.toUpperCase());
  }

  async function sendTags(req: FastifyRequest, reply: FastifyReply, p: Extract<ParsedPath, { target: unknown }>, query: URLSearchParams, head: boolean): Promise<FastifyReply> {
    const n = optionalInt(query, 'n');
    const last = query.get('last') ?? undefined;
    const list = await registry.listTags(p.target, n, last);
    const body = JSON.stringify({ name: p.clientName, tags: list.tags });
    const lastTag = list.tags[list.tags.length - 1];
    if (list.hasNext && lastTag !== undefined) {
      // Rebuilt for the client's own path shape; clients use only path and query of Link (protocol.md §3).
      const next = new URLSearchParams();
      if (n !== undefined) next.set('n', String(n));
      next.set('last', lastTag);
      const ns = query.get('ns');
      if (ns !== null) next.set('ns', ns);
      reply.header('link', `<${p.clientRoot}/${p.clientName}/tags/list?${next.toString()}>; rel="next"`);
    }
    reply.headers({ 'content-type': 'application/json', 'content-length': String(Buffer.byteLength(body)) });
    listed(req, reply, list.cache, body, head);
    return head ? reply.send() : reply.send(body);
  }

  async function sendReferrers(req: FastifyRequest, reply: FastifyReply, p: Extract<ParsedPath, { target: unknown }>, query: URLSearchParams, head: boolean): Promise<FastifyReply> {
    const r = await registry.getReferrers(p.target, p.reference, query.get('artifactType') ?? undefined);
    // Never cached: referrers are always asked of the upstream (registry.getReferrers).
    listed(req, reply, 'passthrough', r.body, head);
    reply.headers({ 'content-type': r.contentType, 'content-length': String(r.body.length) });
    if (r.filtersApplied !== undefined) reply.header('oci-filters-applied', r.filtersApplied);
    return head ? reply.send() : reply.send(r.body);
  }

  // Everything that writes: distribution's proxy mode answers 405 UNSUPPORTED (protocol.md §5.8).
  app.route({
    method: ['POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'],
    url: '/*',
    handler: async () => {
      throw readOnly();
    },
  });
}
