/**
 * The Node HTTP server under Fastify, hostile by default: what a client holds is bounded by
 * configuration, never by how slowly it sends or reads.
 * - headers and the request within server.headersTimeout / requestTimeout (slow-header clients);
 * - a connection on which nothing moves for server.idleTimeout is closed: a client that stops
 *   reading a blob frees its socket, its buffers and its pin on the blob;
 * - at most server.maxConnections connections, and maxConnectionsPerAddress from one address;
 *   requests on connections over the per-address limit are answered 503 in the spec's envelope
 *   and the connection closed (Node closes those over maxConnections outright).
 * Manifest hits go to the warm path (warm-path.ts) before Fastify sees the request.
 * With server.replica every answer names it (X-Ocicache-Replica).
 * With server.tls it is an HTTPS server with the same limits (tls.ts: the files, their reload and
 * client certificates); Fastify's req.protocol then says https (it reads socket.encrypted).
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import type { Socket } from 'node:net';
import type { TLSSocket } from 'node:tls';
import type { Config } from '../core/config.js';
import { OciError } from '../core/errors.js';
import { httpsOptions, watchTls, type TlsLog } from './tls.js';

/** Names the replica that answered (server.replica). */
export const REPLICA_HEADER = 'x-ocicache-replica';

/** How often Node checks connections against headersTimeout and requestTimeout. */
const CHECK_INTERVAL_MS = 1000;

export function createHttpServer(
  config: Config['server'],
  warm: (req: IncomingMessage, res: ServerResponse) => boolean,
  handler: (req: IncomingMessage, res: ServerResponse) => void,
  log: TlsLog,
): Server {
  let over: WeakSet<Socket> | undefined;
  const options = { headersTimeout: config.headersTimeout, requestTimeout: config.requestTimeout, connectionsCheckingInterval: CHECK_INTERVAL_MS };
  const replica = config.replica;
  const listener = (req: IncomingMessage, res: ServerResponse): void => {
    // Which replica of a fleet answered, on every answer: the way to see where a balancer hashed a request.
    if (replica !== undefined) res.setHeader(REPLICA_HEADER, replica);
    if (over?.has(req.socket)) refuse(res, config.maxConnectionsPerAddress);
    else if (!warm(req, res)) handler(req, res);
  };
  let server: Server;
  if (config.tls) {
    const https = createHttpsServer({ ...options, ...httpsOptions(config.tls) }, listener);
    // A TLS 1.2 renegotiation could swap the client certificate after the first handshake (and
    // Node never resets `authorized`): no connection renegotiates here, so none changes who it is.
    // (An attempt is an error on the socket, and the HTTP server closes the connection.)
    https.on('secureConnection', (socket: TLSSocket) => socket.disableRenegotiation());
    watchTls(https, config.tls, log);
    // An https.Server is a tls.Server with http.Server's request handling: everything below applies as is.
    server = https as unknown as Server;
  } else {
    server = createServer(options, listener);
  }
  // Idle keep-alive connections close sooner than idleTimeout; a response in progress that moves
  // no byte for idleTimeout (the client stopped reading) is destroyed.
  server.keepAliveTimeout = Math.min(75_000, config.idleTimeout);
  server.setTimeout(config.idleTimeout, (socket: Socket) => socket.destroy());
  if (config.maxConnections > 0) server.maxConnections = config.maxConnections;
  if (config.maxConnectionsPerAddress > 0) over = limitPerAddress(server, config.maxConnectionsPerAddress, config.tls ? 'secureConnection' : 'connection');
  return server;
}

/** Connections over maxConnectionsPerAddress: their requests are answered 503 and the connection closed. */
/** Over HTTPS counted at `secureConnection`: requests arrive on the TLS socket, not on the TCP one under it. */
function limitPerAddress(server: Server, limit: number, event: 'connection' | 'secureConnection'): WeakSet<Socket> {
  const open = new Map<string, number>();
  const over = new WeakSet<Socket>();
  server.on(event, (socket: Socket) => {
    const address = socket.remoteAddress ?? '';
    const n = (open.get(address) ?? 0) + 1;
    if (n > limit) {
      over.add(socket);
      return;
    }
    open.set(address, n);
    socket.once('close', () => {
      const left = (open.get(address) ?? 1) - 1;
      if (left > 0) open.set(address, left);
      else open.delete(address);
    });
  });
  return over;
}

function refuse(res: ServerResponse, limit: number): void {
  const body = JSON.stringify(new OciError('UNAVAILABLE', `too many connections from ${res.req.socket.remoteAddress}: at most ${limit} at once`).toJSON());
  res.shouldKeepAlive = false;
  res.writeHead(503, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'docker-distribution-api-version': 'registry/2.0', 'retry-after': '1' });
  res.end(body);
}
