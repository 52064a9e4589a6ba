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

export function warmManifests(deps: WarmDeps): (req: IncomingMessage, res: ServerResponse) => boolean {
  const { manifests, upstreams, accounting, access } = deps;
  return (req, res) => {
    const start = performance.now();
    const { method, url = '/' } = req;
    if ((method !== 'GET' && method !== 'HEAD') || !url.includes('/manifests/') || !deps.open()) return false;
    let parsed: ParsedPath;
    let m: ManifestResult | undefined;
    let ctx: RequestContext;
    let user: string | undefined;
    try {
      const { path, query } = splitUrl(url);
      parsed = parseV2Path(path, query.get('ns') ?? undefined, upstreams);
      if (parsed.kind !== 'manifest') return false;
      if (access) {
        // A cached manifest is served only to a client the rules let read it. Only what is known
        // synchronously is decided here (remembered credentials, the decision memo); anything else
        // (a first password or token, bad credentials, a refusal) goes to the Fastify path, which
        // checks, answers and counts it.
        const id = access.identifySync(req.headers.authorization, access.certificates ? certificateUser(req.socket) : undefined);
        if (!id || !access.allowed(id, parsed.target.upstream.name, parsed.target.name)) return false;
        user = id.user;
      }
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
