/**
 * The one error handler: every error answer in the spec's envelope (core/errors.ts), with the
 * API version header. Fastify's own 4xx errors (bad URL, bad header, ...) are put in the spec's
 * vocabulary; anything that is not an OciError is a bug, logged and answered 500 UNKNOWN.
 */
import type { FastifyReply, FastifyRequest } from 'fastify';
import { OciError, type ErrorCode } from '../core/errors.js';

const FASTIFY_STATUS_CODE: Record<number, ErrorCode> = { 400: 'NAME_INVALID', 404: 'NAME_UNKNOWN', 405: 'UNSUPPORTED', 413: 'SIZE_INVALID', 415: 'UNSUPPORTED' };

export function onError(err: Error & { statusCode?: number }, req: FastifyRequest, reply: FastifyReply): FastifyReply {
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
