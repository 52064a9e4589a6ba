/**
 * Manifest hits answered from Node's request event, before Fastify: the warm path of every pull.
 * Fastify's routing, reply object and hooks cost a measurable share of such an answer (README,
 * Performance). Anything else (a miss, a type the client did not accept, any parse error,
 * shutdown) returns false having written nothing, and Fastify handles the request from the start.
 * Headers and accounting come from the same functions as on the Fastify path.
 */
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { Access } from '../access/access.js';
import type { ManifestHits, ManifestResult } from '../cache/manifest-hits.js';
import { parseV2Path, splitUrl, type ParsedPath, type UpstreamIndex } from '../core/api-path.js';
import type { Accounting, RequestContext } from './accounting.js';
import { answerManifest } from './manifest-answer.js';
import { certificateUser } from './tls.js';

export interface WarmDeps {
  manifests: { hits: ManifestHits };
  upstreams: UpstreamIndex;
  accounting: Accounting;
  /** false once shutdown began: Fastify then answers 503 */
  open: () => boolean;
  /** For failures of the accounting itself, which runs in an event listener. */
  error: (obj: object, msg: string) => void;
  /** Access control; undefined: off. */
  access?: Access;
  /** server.trustProxy: the client address is then X-Forwarded-For's first, as Fastify's req.ip. */
  trustProxy: boolean;
}

/** The client's address for the log, as Fastify's req.ip finds it (proxy-addr trusting every hop). */
export function clientAddress(req: IncomingMessage, trustProxy: boolean): string {
  const xff = trustProxy ? req.headers['x-forwarded-for'] : undefined;
  const first = (Array.isArray(xff) ? xff[0] : xff)?.split(',')[0]?.trim();
  return first || (req.socket.remoteAddress ?? '');
}

/** A request the warm path may answer: its target, and the user the access rules know it as. */
export interface WarmRequest {
  parsed: Extract<ParsedPath, { target: unknown }>;
  user: string | undefined;
}

/**
 * A GET or HEAD of `kind` (a manifest, or a blob in a worker: http/worker.ts) that may be answered
 * from the cache alone. undefined when the path is not one of that kind, or when access control
 * cannot say synchronously that this client may read it: a cached answer goes only to a client the
 * rules let read it, and only what is known synchronously is decided here (remembered credentials,
 * the decision memo); anything else (a first password or token, bad credentials, a refusal) goes
 * the full way, which checks, answers and counts it.
 */
export function warmRequest(req: IncomingMessage, kind: 'manifest' | 'blob', upstreams: UpstreamIndex, access: Access | undefined): WarmRequest | undefined {
  const { method, url = '/' } = req;
  if ((method !== 'GET' && method !== 'HEAD') || !url.includes(kind === 'manifest' ? '/manifests/' : '/blobs/')) return undefined;
  let parsed: ParsedPath;
  try {
    const { path, query } = splitUrl(url);
    parsed = parseV2Path(path, query.get('ns') ?? undefined, upstreams);
  } catch {
    return undefined;
  }
  if (parsed.kind !== kind) return undefined;
  if (!access) return { parsed, user: undefined };
  const id = access.identifySync(req.headers.authorization, access.certificates ? certificateUser(req.socket) : undefined);
  if (!id || !access.allowed(id, parsed.target.upstream.name, parsed.target.name)) return undefined;
  return { parsed, user: id.user };
}

export function warmManifests(deps: WarmDeps): (req: IncomingMessage, res: ServerResponse) => boolean {
  const { manifests, upstreams, accounting, access } = deps;
  return (req, res) => {
    const start = performance.now();
    if (!deps.open()) return false;
    const asked = warmRequest(req, 'manifest', upstreams, access);
    if (!asked) return false;
    const { parsed, user } = asked;
    // warmRequest let only a GET or HEAD through.
    const method = req.method as 'GET' | 'HEAD';
    const url = req.url!;
    let m: ManifestResult | undefined;
    let ctx: RequestContext;
    try {
      m = manifests.hits.cached(parsed.target, parsed.reference, req.headers.accept, method === 'GET');
      if (!m) return false;
      ctx = { kind: 'manifest', upstream: parsed.target.upstream.name, name: parsed.target.name, reference: parsed.reference, bytes: () => 0 };
      // Node validates every header before it writes anything.
      res.writeHead(200, answerManifest(ctx, m, method === 'HEAD'));
    } catch {
      // writeHead set these before it threw; Fastify's own writeHead would keep the message ("404 OK").
      res.statusCode = 200;
      res.statusMessage = '';
      return false;
    }
    const f = { reqId: accounting.nextReqId(), method, url, status: 200, client: clientAddress(req, deps.trustProxy), user, ctx, ms: 0 };
    // As on the Fastify path: in flight until sent, logged and counted once it was.
    accounting.track(res, (completed) => {
      try {
        if (!completed) return accounting.aborted(f);
        f.ms = performance.now() - start;
        accounting.finished(f);
      } catch (err) {
        deps.error({ reqId: f.reqId, err }, 'logging a response failed');
      }
    });
    res.end(m.body);
    return true;
  };
}
