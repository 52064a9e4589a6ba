/**
 * The admin API under /admin: POST /admin/prefetch (NDJSON progress), POST /admin/gc and
 * GET /admin/keep. Off
 * unless admin.tokenEnv or admin.tokenFile is configured; every call needs that bearer token.
 */
import { createHash, timingSafeEqual } from 'node:crypto';
import { PassThrough } from 'node:stream';
import type { FastifyInstance, FastifyRequest } from 'fastify';
import { OciError } from '../core/errors.js';
import { prefetch } from '../cache/prefetch.js';
import type { Services } from '../cache/services.js';

const sha256 = (s: string): Buffer => createHash('sha256').update(s).digest();

function checkToken(req: FastifyRequest, token: string | undefined): void {
  if (token === undefined) throw new OciError('DENIED', 'the admin API is off: set admin.tokenEnv or admin.tokenFile in the config');
  const m = /^Bearer (.+)$/i.exec(req.headers.authorization ?? '');
  // Equal-length digests: the comparison takes the same time whatever the guess (config.ts refuses empty tokens).
  if (!m || !timingSafeEqual(sha256(m[1]!), sha256(token))) {
    throw new OciError('UNAUTHORIZED', 'admin token required', { headers: { 'www-authenticate': 'Bearer realm="ocicache-admin"' } });
  }
}

function stringList(value: unknown, key: string): string[] | undefined {
  if (value === undefined) return undefined;
  if (!Array.isArray(value) || !value.every((v) => typeof v === 'string' && v !== '')) throw new OciError('UNSUPPORTED', `${key} must be a list of strings`, { status: 400 });
  return value as string[];
}

export function registerAdmin(app: FastifyInstance, s: Services): void {
  const running = new Set<Promise<unknown>>();
  const stop = new AbortController();
  app.register(async (admin) => {
    // Before the body is read: nobody without the token gets even a JSON parser.
    admin.addHook('onRequest', async (req) => checkToken(req, s.config.admin.token));
    // Shutdown stops prefetches between blobs (the fills they started finish or abort with the rest).
    admin.addHook('preClose', async () => {
      stop.abort(new Error('shutting down'));
      await Promise.allSettled([...running]);
    });
    admin.addContentTypeParser('application/json', { parseAs: 'string', bodyLimit: 1024 * 1024 }, (_req, body, done) => {
      try {
        done(null, JSON.parse(body as string));
      } catch {
        done(new OciError('UNSUPPORTED', 'request body is not valid JSON', { status: 400 }), undefined);
      }
    });

    // Body: {"references": ["docker.io/library/alpine:3.20", ...], "platforms": ["linux/amd64"], "withReferrers": true}.
    admin.post('/admin/prefetch', async (req, reply) => {
      const body = (req.body ?? {}) as { references?: unknown; platforms?: unknown; withReferrers?: unknown };
      const refs = stringList(body.references, 'references');
      if (!refs || refs.length === 0) throw new OciError('UNSUPPORTED', 'references must list at least one image', { status: 400 });
      const platforms = stringList(body.platforms, 'platforms');
      if (body.withReferrers !== undefined && typeof body.withReferrers !== 'boolean') throw new OciError('UNSUPPORTED', 'withReferrers must be true or false', { status: 400 });
      const withReferrers = body.withReferrers === true;
      const out = new PassThrough();
      req.log.info({ reqId: req.id, references: refs, platforms, withReferrers }, 'prefetch started');
      // Progress as it happens, one JSON object per line; the work goes on if the caller leaves.
      const task = prefetch(s, refs, { platforms, withReferrers, signal: stop.signal }, (e) => {
        if (!out.destroyed) out.write(`${JSON.stringify(e)}\n`);
      }).then(
        (summary) => {
          req.log.info({ reqId: req.id, ...summary }, 'prefetch finished');
          out.end();
        },
        (err: Error) => out.destroy(err),
      );
      running.add(task);
      void task.finally(() => running.delete(task));
      return reply.type('application/x-ndjson').send(out);
    });

    // The keep list: every entry, what it resolved to, how its last refresh went (ocicache kept --server).
    admin.get('/admin/keep', async () => ({ entries: s.keeper.entries() }));

    admin.post('/admin/gc', async () => {
      return { ...(await s.lifecycle.pass('gc')), limit: s.config.storage.maxSize ?? null };
    });
  });
}
