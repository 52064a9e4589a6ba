/**
 * The one error handler: every error answer in the spec's envelope (core/errors.ts), with the
 * API version header. Fastify's own 4xx errors (bad URL, bad header, ...) are put in the spec's
 * vocabulary; anything that is not an OciError is a bug, logged and answered 500 UNKNOWN. Routes
 * that do not exist and requests Node refuses before any route get the envelope too.
 */
import type { Socket } from 'node:net';
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

/** Fastify's not-found handler: a method no route serves is refused as a write is; an unknown path is NAME_UNKNOWN. */
export function onNotFound(req: FastifyRequest, reply: FastifyReply): FastifyReply {
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    return onError(new OciError('UNSUPPORTED', `${req.method.slice(0, 20)} is not supported: this registry is a read-only cache`, { headers: { allow: 'GET, HEAD' } }), req, reply);
  }
  return onError(new OciError('NAME_UNKNOWN', 'no such endpoint'), req, reply);
}

/** What Node's parser refused, by its error code: answered before any request object exists. */
const CLIENT_ERRORS: Record<string, { status: number; code: ErrorCode; message: string; headers?: string }> = {
  HPE_HEADER_OVERFLOW: { status: 431, code: 'UNSUPPORTED', message: 'request headers are too large' },
  HPE_INVALID_METHOD: { status: 405, code: 'UNSUPPORTED', message: 'unknown method: this registry is a read-only cache', headers: 'Allow: GET, HEAD\r\n' },
  ERR_HTTP_REQUEST_TIMEOUT: { status: 408, code: 'UNSUPPORTED', message: 'the request was not received in time' },
};
const REASONS: Record<number, string> = { 400: 'Bad Request', 405: 'Method Not Allowed', 408: 'Request Timeout', 431: 'Request Header Fields Too Large' };

/** Fastify's clientErrorHandler: a request Node could not parse gets the spec's envelope, then the connection is closed. */
export function onClientError(err: NodeJS.ErrnoException, socket: Socket): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return;
  const e = CLIENT_ERRORS[err.code ?? ''] ?? { status: 400, code: 'UNSUPPORTED', message: 'malformed HTTP request' };
  const body = JSON.stringify(new OciError(e.code, e.message).toJSON());
  if (socket.writable) {
    socket.write(
      `HTTP/1.1 ${e.status} ${REASONS[e.status]}\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
        `Docker-Distribution-Api-Version: registry/2.0\r\n${e.headers ?? ''}Connection: close\r\n\r\n${body}`,
    );
  }
  socket.destroy(err);
}
