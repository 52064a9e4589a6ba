/**
 * A programmable upstream for what a real registry cannot be made to do: resets mid-blob, wrong
 * bytes, hangs, 5xx, 429, redirects to another origin. Never a stand-in for the real registry.
 */
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { createServer as createTcpServer, type AddressInfo, type Server, type Socket } from 'node:net';
import { startProxy, type Proxy, type ProxyOptions } from './proxy.js';
import type { Scope } from './tools.js';

export type Handler = (req: IncomingMessage, res: ServerResponse) => void;

export interface FakeUpstream {
  url: string;
  host: string;
  /** method + path (with query) of every request, in order */
  requests: Array<{ method: string; url: string; headers: IncomingMessage['headers'] }>;
  connections: number;
  /** Route by exact path (without query); unmatched paths get 404 MANIFEST_UNKNOWN. */
  route(path: string, handler: Handler): void;
  count(method: string, path: string): number;
}

export async function startFakeUpstream(t: Scope): Promise<FakeUpstream> {
  const routes = new Map<string, Handler>();
  const sockets = new Set<Socket>();
  const fake: FakeUpstream = {
    url: '',
    host: '',
    requests: [],
    connections: 0,
    route: (path, handler) => routes.set(path, handler),
    count: (method, path) => fake.requests.filter((r) => r.method === method && r.url.split('?')[0] === path).length,
  };
  const server = createServer((req, res) => {
    fake.requests.push({ method: req.method ?? '', url: req.url ?? '', headers: req.headers });
    const handler = routes.get((req.url ?? '').split('?')[0]!);
    if (handler) return handler(req, res);
    res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}');
  });
  server.on('connection', (s: Socket) => {
    fake.connections++;
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  const { port } = server.address() as AddressInfo;
  fake.host = `127.0.0.1:${port}`;
  fake.url = `http://${fake.host}`;
  return fake;
}

/**
 * A fake upstream named fake.example and a proxy pointed at it. `upstream` adds to that upstream's
 * config; `options` are the rest of ProxyOptions (env, clock, ...), their `timeouts` laid over
 * short ones (manifest and blobIdle 1s) so that a fault shows quickly.
 */
export async function startProxyWithFake(t: Scope, upstream: Record<string, unknown> = {}, options: Omit<ProxyOptions, 'upstreams'> = {}): Promise<{ fake: FakeUpstream; proxy: Proxy }> {
  const fake = await startFakeUpstream(t);
  const proxy = await startProxy(t, { ...options, upstreams: [{ name: 'fake.example', url: fake.url, ...upstream }], timeouts: { manifest: '1s', blobIdle: '1s', ...options.timeouts } });
  return { fake, proxy };
}

/** Serves `body` as a blob, optionally misbehaving after `cutAt` bytes. */
export function blobHandler(body: Buffer, fault?: { cutAt: number; how: 'reset' | 'end-chunked' | 'stall' }): Handler {
  return (req, res) => {
    if (req.method === 'HEAD') {
      res.writeHead(200, { 'content-length': String(body.length), 'content-type': 'application/octet-stream' }).end();
      return;
    }
    if (!fault) {
      res.writeHead(200, { 'content-length': String(body.length), 'content-type': 'application/octet-stream' }).end(body);
      return;
    }
    if (fault.how === 'end-chunked') {
      // Valid HTTP (chunked, no length) that simply ends early: only the digest check catches it.
      res.writeHead(200, { 'content-type': 'application/octet-stream' });
      res.end(body.subarray(0, fault.cutAt));
      return;
    }
    res.writeHead(200, { 'content-length': String(body.length), 'content-type': 'application/octet-stream' });
    res.write(body.subarray(0, fault.cutAt), () => {
      if (fault.how === 'reset') setTimeout(() => res.socket?.destroy(), 20);
    });
  };
}

/** A TCP listener that counts connections: where the cache must never connect. */
export async function startTrap(t: Scope, address: string): Promise<{ host: string; connections: number }> {
  const trap = { host: '', connections: 0 };
  const server: Server = createTcpServer((s) => {
    trap.connections++;
    s.destroy();
  });
  await new Promise<void>((r) => server.listen(0, address, r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  trap.host = `${address}:${(server.address() as { port: number }).port}`;
  return trap;
}

