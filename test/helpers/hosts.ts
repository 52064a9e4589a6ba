/**
 * "Other hosts" for the trust tests: HTTP(S) servers on chosen loopback addresses (127.0.0.1 is
 * one host, 127.0.0.2 another) that record every request and the Authorization it carried, a
 * self-signed certificate for any set of names (openssl), and a DNS lookup that maps test names
 * to those addresses, for the upstream client's `network` option.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { isIP, type AddressInfo, type LookupFunction, type Socket } from 'node:net';
import { join } from 'node:path';
import { networkInterfaces } from 'node:os';
import { need, tempDir, type Scope } from './tools.js';

export type Handler = (req: IncomingMessage, res: ServerResponse) => void;

export interface Host {
  /** scheme://address:port */
  url: string;
  port: number;
  /** Every request: method, path with query, and its Authorization header. */
  requests: Array<{ method: string; url: string; authorization: string | undefined }>;
  connections: number;
  /** Route by exact path (without query); unmatched paths get 404. */
  route(path: string, handler: Handler): void;
}

export interface Certificate {
  key: Buffer;
  cert: Buffer;
}

/** A self-signed certificate for `names` (DNS names and IP addresses), or undefined when openssl is missing outside CI. */
export function selfSigned(t: Scope, names: string[]): Certificate | undefined {
  const openssl = need(t, 'openssl', 'apt-get install openssl');
  if (!openssl) return undefined;
  const dir = tempDir(t, 'tls');
  const san = names.map((n) => (isIP(n) ? `IP:${n}` : `DNS:${n}`)).join(',');
  const r = spawnSync(openssl, ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', join(dir, 'key.pem'), '-out', join(dir, 'cert.pem'), '-subj', '/CN=ocicache-test', '-days', '2', '-addext', `subjectAltName=${san}`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`openssl failed: ${r.stderr}`);
  return { key: readFileSync(join(dir, 'key.pem')), cert: readFileSync(join(dir, 'cert.pem')) };
}

/** A recording server on `address` (HTTPS with `tls`). */
export async function startHost(t: Scope, address: string, tls?: Certificate): Promise<Host> {
  const routes = new Map<string, Handler>();
  const sockets = new Set<Socket>();
  const host: Host = { url: '', port: 0, requests: [], connections: 0, route: (path, handler) => void routes.set(path, handler) };
  const handle: Handler = (req, res) => {
    host.requests.push({ method: req.method ?? '', url: req.url ?? '', authorization: req.headers.authorization });
    const handler = routes.get((req.url ?? '').split('?')[0]!);
    if (handler) return handler(req, res);
    res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}');
  };
  const server: Server = tls ? createHttpsServer({ key: tls.key, cert: tls.cert }, handle) : createHttpServer(handle);
  server.on(tls ? 'secureConnection' : 'connection', (s: Socket) => {
    host.connections++;
    sockets.add(s);
    s.once('close', () => sockets.delete(s));
  });
  await new Promise<void>((resolve) => server.listen(0, address, resolve));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((resolve) => server.close(() => resolve()));
  });
  host.port = (server.address() as AddressInfo).port;
  host.url = `${tls ? 'https' : 'http'}://${address.includes(':') ? `[${address}]` : address}:${host.port}`;
  return host;
}

/** A DNS lookup answering `names` (name → address) and failing for anything else, as net.connect calls it. */
export function fakeLookup(names: Record<string, string>): LookupFunction {
  return (hostname, options, callback) => {
    const address = names[hostname.toLowerCase()];
    if (address === undefined) return callback(Object.assign(new Error(`getaddrinfo ENOTFOUND ${hostname}`), { code: 'ENOTFOUND' }), '');
    const family = isIP(address);
    if (options.all) callback(null, [{ address, family }]);
    else callback(null, address, family);
  };
}

/** An address of this machine that is not loopback (an IPv4 one if there is one), or undefined. */
export function outsideAddress(): string | undefined {
  const all = Object.values(networkInterfaces()).flatMap((list) => list ?? []).filter((a) => !a.internal && !a.address.startsWith('fe80'));
  return (all.find((a) => a.family === 'IPv4') ?? all[0])?.address;
}
