/**
 * A worker hands what it does not answer itself to the coordinator (http/cluster.ts) over a Unix
 * socket only the group can reach: the request as the client sent it, with the client's address
 * and scheme in X-Forwarded-For and X-Forwarded-Proto, which the coordinator trusts because only
 * workers connect to it. Without server.trustProxy the client's own X-Forwarded-* headers are
 * replaced, so the coordinator sees what a single process would have seen.
 */
import { Agent, request, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http';
import type { TLSSocket } from 'node:tls';
import { OciError } from '../core/errors.js';

/** RFC 9110 §7.6.1: hop-by-hop fields, never forwarded. */
const HOP_BY_HOP = new Set(['connection', 'keep-alive', 'proxy-connection', 'transfer-encoding', 'te', 'trailer', 'upgrade', 'proxy-authorization', 'proxy-authenticate']);

export function endToEnd(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const out: IncomingHttpHeaders = {};
  for (const [k, v] of Object.entries(headers)) if (!HOP_BY_HOP.has(k) && v !== undefined) out[k] = v;
  return out;
}

/**
 * A worker's request to follow a fill (value `1`), and the coordinator's answer that it may: the
 * fill's temp file, the bytes to send and the request line's fields, as a query string
 * (http/worker.ts). Never taken from a client: forwardedHeaders replaces it.
 */
export const FOLLOW = 'x-ocicache-follow';

export function forwardedHeaders(req: IncomingMessage, trustProxy: boolean): IncomingHttpHeaders {
  const headers = endToEnd(req.headers);
  delete headers[FOLLOW];
  // The body as Node's parser framed it, framed again the same way (chunked when the client sent
  // no length): bytes sent without framing on a shared connection to the coordinator would be
  // parsed there as a request of their own (request smuggling, RFC 9112 §11.2).
  if (req.headers['transfer-encoding'] !== undefined) {
    delete headers['content-length'];
    headers['transfer-encoding'] = 'chunked';
  }
  const address = req.socket.remoteAddress ?? '';
  const scheme = (req.socket as TLSSocket).encrypted ? 'https' : 'http';
  if (trustProxy) {
    const xff = req.headers['x-forwarded-for'];
    headers['x-forwarded-for'] = xff ? `${Array.isArray(xff) ? xff.join(', ') : xff}, ${address}` : address;
    headers['x-forwarded-proto'] ??= scheme;
  } else {
    headers['x-forwarded-for'] = address;
    headers['x-forwarded-proto'] = scheme;
    delete headers['x-forwarded-host'];
  }
  return headers;
}

export class Forwarder {
  private readonly agent = new Agent({ keepAlive: true, maxSockets: Infinity });

  constructor(
    private readonly socketPath: string,
    private readonly trustProxy: boolean,
  ) {}

  /**
   * The coordinator's answer, streamed to the client; a client that leaves ends the exchange.
   * With `follow`, a GET asks to follow a fill, and an answer that allows it goes to `follow`,
   * which then owns both the answer and the response.
   */
  forward(req: IncomingMessage, res: ServerResponse, follow?: (answer: IncomingMessage) => void): void {
    // A client gone during an earlier await has no 'close' left to end the exchange.
    if (req.socket.destroyed) return;
    const headers = forwardedHeaders(req, this.trustProxy);
    if (follow && req.method === 'GET') headers[FOLLOW] = '1';
    const up = request({ socketPath: this.socketPath, agent: this.agent, method: req.method, path: req.url, headers });
    // Once handed to `follow`, the response is not this exchange's: an error after that ends the
    // answer, which fails the follower, and nothing is written here.
    let handed = false;
    up.on('response', (answer) => {
      if (follow && answer.headers[FOLLOW] !== undefined) {
        handed = true;
        return follow(answer);
      }
      res.writeHead(answer.statusCode ?? 502, answer.statusMessage, endToEnd(answer.headers));
      answer.pipe(res);
      answer.on('aborted', () => res.destroy());
      answer.on('error', () => res.destroy());
    });
    up.on('error', () => {
      if (handed) return;
      if (res.headersSent) {
        res.destroy();
        return;
      }
      const body = JSON.stringify(new OciError('UNAVAILABLE', 'the cache is restarting: try again').toJSON());
      res.writeHead(503, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), 'docker-distribution-api-version': 'registry/2.0', 'retry-after': '1' });
      res.end(body);
    });
    res.on('close', () => {
      if (!res.writableFinished) up.destroy();
    });
    req.pipe(up);
  }

  close(): void {
    this.agent.destroy();
  }
}
