/**
 * The operational endpoints: /healthz (the process answers), /readyz (the index and the temp
 * directory work, and the server is not shutting down) and /metrics (Prometheus). Each answers
 * HEAD too: some load balancers probe with it.
 */
import { access, constants } from 'node:fs/promises';
import type { FastifyInstance } from 'fastify';
import type { Services } from '../cache/services.js';

export function registerProbes(app: FastifyInstance, s: Pick<Services, 'db' | 'store' | 'metrics'>, closing: () => boolean): void {
  app.get('/healthz', { exposeHeadRoute: true }, async () => ({ status: 'ok' }));
  app.get('/readyz', { exposeHeadRoute: true }, async (_req, reply) => {
    try {
      if (closing()) throw new Error('shutting down');
      s.db.ping();
      await access(s.store.tmpDir, constants.W_OK);
      return { status: 'ready' };
    } catch (err) {
      return reply.code(503).send({ status: 'not ready', reason: (err as Error).message });
    }
  });
  app.get('/metrics', { exposeHeadRoute: true }, async (_req, reply) => reply.type(s.metrics.registry.contentType).send(await s.metrics.text()));
}
