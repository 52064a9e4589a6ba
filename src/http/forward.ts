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

function endToEnd(headers: IncomingHttpHeaders): IncomingHttpHeaders {
  const out: IncomingHttpHeaders = {};
  for (const [k, v] of Object.entries(headers)) if (!HOP_BY_HOP.has(k) && v !== undefined) out[k] = v;
  return out;
}

export function forwardedHeaders(req: IncomingMessage, trustProxy: boolean): IncomingHttpHeaders {
  const headers = endToEnd(req.headers);
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

  /** The coordinator's answer, streamed to the client; a client that leaves ends the exchange. */
  forward(req: IncomingMessage, res: ServerResponse): void {
    // A client gone during an earlier await has no 'close' left to end the exchange.
    if (req.socket.destroyed) return;
    const up = request({ socketPath: this.socketPath, agent: this.agent, method: req.method, path: req.url, headers: forwardedHeaders(req, this.trustProxy) });
    up.on('response', (answer) => {
      res.writeHead(answer.statusCode ?? 502, answer.statusMessage, endToEnd(answer.headers));
      answer.pipe(res);
      answer.on('aborted', () => res.destroy());
      answer.on('error', () => res.destroy());
    });
    up.on('error', () => {
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
