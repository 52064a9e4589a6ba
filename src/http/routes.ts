/**
 * The HTTP surface. One wildcard route per method group; the path is parsed by core/api-path.ts
 * from the raw URL, because find-my-way params decode %2F and cap length at 100 (docs/clients.md,
 * "Raw paths, not router parameters").
 * HEAD handlers are explicit: Fastify's generated HEAD runs the GET and zeroes Content-Length,
 * and containerd builds its descriptor from the HEAD alone (docs/clients.md, "A HEAD is a descriptor").
 */
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { BlobResult, Blobs } from '../cache/blobs.js';
import type { ManifestResult, Manifests } from '../cache/manifests.js';
import { parseV2Path, splitUrl, type ParsedPath, type UpstreamIndex } from '../core/api-path.js';
import type { CacheResult } from '../core/cache-result.js';
import { OciError } from '../core/errors.js';
import type { AccessGuard } from './access-guard.js';
import type { RequestContext } from './accounting.js';
import { blobHeaders } from './blob-answer.js';
import { FOLLOW } from './forward.js';
import { sendFileRange } from './file-response.js';
import { answerManifest } from './manifest-answer.js';
import { clientGone } from './response-gone.js';

export interface RouteDeps {
  manifests: Manifests;
  blobs: Blobs;
  upstreams: UpstreamIndex;
  /** Access control (access-guard.ts); undefined: off. */
  access?: AccessGuard;
  /** The coordinator of a group (http/cluster.ts): every request comes from a worker, which may follow a fill itself. */
  followers?: boolean;
}

const API_VERSION = { 'docker-distribution-api-version': 'registry/2.0' };

function optionalInt(query: URLSearchParams, key: string): number | undefined {
  const v = query.get(key);
  if (v === null) return undefined;
  if (!/^\d{1,9}$/.test(v)) throw new OciError('PAGINATION_NUMBER_INVALID', `${key} must be a non-negative integer`);
  return Number(v);
}

function readOnly(): OciError {
  return new OciError('UNSUPPORTED', 'this registry is a read-only cache', { headers: { allow: 'GET, HEAD' } });
}

export function registerRoutes(app: FastifyInstance, deps: RouteDeps): void {
  const { manifests, blobs, upstreams } = deps;

  app.decorateRequest('oci', null);

  app.route({
    method: ['GET', 'HEAD'],
    url: '/*',
    // Not async: a manifest hit is answered synchronously (manifests.get). Errors thrown
    // here reach the error handler as rejections do; a returned promise is awaited by Fastify.
    handler: (req, reply): Promise<FastifyReply> | undefined => {
      const { path, query } = splitUrl(req.raw.url ?? '/');
      reply.headers(API_VERSION);
      const parsed = parseV2Path(path, query.get('ns') ?? undefined, upstreams);
      if (parsed.kind === 'base') {
        deps.access?.base(req);
        reply.type('application/json').send('{}');
        return undefined;
      }
      if (parsed.kind === 'upload') throw readOnly();
      // A tag list's "reference" is the literal `list` of its path: not one to log.
      const reference = parsed.kind === 'tags' ? undefined : parsed.reference;
      const ctx: RequestContext = { kind: parsed.kind, upstream: parsed.target.upstream.name, name: parsed.target.name, reference, bytes: () => 0 };
      // Before anything reaches cache/: a refused request costs no upstream call. Before req.oci is
      // set, too: a refusal is logged with its URL and status but not counted as a cache error.
      deps.access?.check(req, parsed.target.upstream.name, parsed.target.name, parsed.clientName);
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
    const m = manifests.get(p.target, p.reference, req.headers.accept, !head);
    if (m instanceof Promise) return m.then((r) => manifestReply(req, reply, r, head));
    manifestReply(req, reply, m, head);
    return undefined;
  }

  function manifestReply(req: FastifyRequest, reply: FastifyReply, m: ManifestResult, head: boolean): FastifyReply {
    reply.headers(answerManifest(req.oci!, m, head));
    return head ? reply.send() : reply.send(m.body);
  }

  async function sendBlob(req: FastifyRequest, reply: FastifyReply, p: Extract<ParsedPath, { target: unknown }>, head: boolean): Promise<FastifyReply> {
    const follow = !head && deps.followers === true && req.headers[FOLLOW] === '1';
    const b: BlobResult = head ? await blobs.head(p.target, p.reference) : await blobs.get(p.target, p.reference, req.headers.range, follow);
    req.oci!.cache = b.cache;
    if (b.followed) return sendFollowed(req, reply, p, b, b.followed);
    req.oci!.bytes = () => b.stream?.bytesRead ?? 0;
    // In the bucket, with storage.s3.redirect: the client fetches it there (distribution-spec, "Pulling blobs": 307).
    if (b.redirect) return reply.code(307).headers(blobHeaders(p.target.upstream.name, p.reference, b.cache, undefined, undefined)).header('location', b.redirect).send();
    reply.headers(blobHeaders(p.target.upstream.name, p.reference, b.cache, b.size, b.range));
    if (b.range && b.size !== undefined) reply.code(206);
    if (b.file) return sendFile(req, reply, b.file);
    return head || !b.stream ? reply.send() : reply.send(b.stream);
  }

  /**
   * A fill a worker follows: the blob's headers, with its length and the request line's fields in
   * FOLLOW, and the fill's progress as the body (storage/fill-progress.ts). The worker sends the
   * bytes, and accounts for the request: this answer is not the client's, so it is not counted here.
   */
  function sendFollowed(req: FastifyRequest, reply: FastifyReply, p: Extract<ParsedPath, { target: unknown }>, b: BlobResult, followed: NonNullable<BlobResult['followed']>): FastifyReply {
    req.oci!.handedOff = true;
    const { 'content-length': length, ...headers } = blobHeaders(p.target.upstream.name, p.reference, b.cache, b.size, b.range);
    const fields = { file: followed.file, start: String(followed.start), to: String(followed.to ?? ''), length: length ?? '', user: req.identity?.user ?? '', name: p.target.name };
    reply.headers(headers).header(FOLLOW, new URLSearchParams(fields).toString());
    if (b.range) reply.code(206);
    return reply.send(b.stream);
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
    const gone = clientGone(reply.raw);
    const list = await manifests.listTags(p.target, n, last, gone.signal).finally(gone.done);
    const body = JSON.stringify({ name: p.clientName, tags: list.tags });
    const lastTag = list.tags[list.tags.length - 1];
    if (list.hasNext && lastTag !== undefined) {
      // Relative, in the client's own path shape, so following it comes back through this cache to
      // the same upstream (docs/clients.md, "Tag list pagination and Link").
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
    const gone = clientGone(reply.raw);
    const r = await manifests.getReferrers(p.target, p.reference, query.get('artifactType') ?? undefined, gone.signal).finally(gone.done);
    // Always asked of the upstream; the last answer is served (stale) only when it cannot be asked.
    listed(req, reply, r.cache, r.body, head);
    reply.headers({ 'content-type': r.contentType, 'content-length': String(r.body.length) });
    if (r.filtersApplied !== undefined) reply.header('oci-filters-applied', r.filtersApplied);
    return head ? reply.send() : reply.send(r.body);
  }

  // Everything that writes: 405 UNSUPPORTED, as distribution's proxy mode answers
  // (docs/upstreams.md, "Read-only, like distribution's proxy mode").
  app.route({
    method: ['POST', 'PUT', 'PATCH', 'DELETE', 'OPTIONS'],
    url: '/*',
    handler: async () => {
      throw readOnly();
    },
  });
}
