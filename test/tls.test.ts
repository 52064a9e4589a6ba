/**
 * TLS (server.tls; upstreams[].caFile, clientCertFile, clientKeyFile, insecure): certificates made
 * by the real openssl at run time, the proxy serving HTTPS to undici and skopeo, its certificate
 * reloaded from the files, client certificates required, and upstreams behind TLS with a private
 * CA and a client certificate of their own (a TLS front in this process, in front of a real
 * distribution registry).
 */
import assert from 'node:assert/strict';
import { X509Certificate } from 'node:crypto';
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { connect as netConnect, type AddressInfo } from 'node:net';
import { join } from 'node:path';
import { test, type TestContext } from 'node:test';
import { connect as tlsConnect, createServer as createTlsServer, type TLSSocket } from 'node:tls';
import { createServer as createHttpsServer } from 'node:https';
import { Agent, request } from 'undici';
import { buildConfig } from '../src/core/config.js';
import { Exchanger } from '../src/upstream/exchange.js';
import { redirectRule } from '../src/upstream/trust.js';
import { startDistribution, type Distribution } from './helpers/distribution.js';
import { startProxy, type Proxy } from './helpers/proxy.js';
import { image, Pusher, type Image } from './helpers/seed.js';
import { certDir, pki, tlsAgent, type Pair } from './helpers/pki.js';
import { exec, need, tempDir, until } from './helpers/tools.js';

const serialOf = (file: string): string => new X509Certificate(readFileSync(file)).serialNumber;

/** The serial number of the certificate a new TLS connection to `port` is shown. */
function peerSerial(port: number, ca: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const socket: TLSSocket = tlsConnect({ host: '127.0.0.1', port, ca: readFileSync(ca) }, () => {
      const serial = socket.getPeerCertificate().serialNumber;
      socket.end();
      resolve(serial);
    });
    socket.once('error', reject);
  });
}

function httpsPort(proxy: Proxy): number {
  return (proxy.app.server.address() as AddressInfo).port;
}

function logSink(): { lines: string[]; stream: { write(line: string): void } } {
  const lines: string[] = [];
  return { lines, stream: { write: (line: string) => void lines.push(line) } };
}

test('the proxy serves HTTPS: trusted with its CA, refused without it', async (t) => {
  const p = await pki(t);
  if (!p) return;
  const ca = await p.ca('ca');
  const server = await p.leaf(ca, 'server', 0x1001);
  const proxy = await startProxy(t, { server: { tls: { certFile: server.crt, keyFile: server.key } }, upstreams: [{ name: 'example.com', url: 'http://127.0.0.1:9' }] });
  const url = `https://127.0.0.1:${httpsPort(proxy)}/v2/`;
  const trusting = tlsAgent(t, ca);
  const res = await request(url, { dispatcher: trusting });
  assert.equal(res.statusCode, 200);
  await res.body.dump();
  await assert.rejects(request(url), /self[- ]signed|unable to (get|verify)/i);
  // Plain HTTP to the HTTPS port gets nothing served.
  const plain = await request(`http://127.0.0.1:${httpsPort(proxy)}/v2/`).then((r) => r.statusCode, () => 0);
  assert.notEqual(plain, 200);
});

test('server.tls: a changed pair is picked up without a restart; a broken one keeps the old', async (t) => {
  const p = await pki(t);
  if (!p) return;
  const ca = await p.ca('ca');
  const first = await p.leaf(ca, 'first', 0x1001);
  const second = await p.leaf(ca, 'second', 0x2002);
  const certFile = join(p.dir, 'tls.crt');
  const keyFile = join(p.dir, 'tls.key');
  writeFileSync(certFile, readFileSync(first.crt));
  writeFileSync(keyFile, readFileSync(first.key));
  const log = logSink();
  const proxy = await startProxy(t, { server: { tls: { certFile, keyFile, reloadInterval: '100ms' } }, upstreams: [{ name: 'example.com', url: 'http://127.0.0.1:9' }], logger: { level: 'info', stream: log.stream } });
  const port = httpsPort(proxy);
  assert.equal(await peerSerial(port, ca.crt), serialOf(first.crt));

  // Replaced as a Kubernetes secret or cert-manager would: new files renamed into place.
  writeFileSync(`${keyFile}.new`, readFileSync(second.key));
  writeFileSync(`${certFile}.new`, readFileSync(second.crt));
  renameSync(`${keyFile}.new`, keyFile);
  renameSync(`${certFile}.new`, certFile);
  await until('the new certificate', async () => (await peerSerial(port, ca.crt)) === serialOf(second.crt), 5000);
  assert.ok(log.lines.some((l) => l.includes('TLS certificate reloaded')));

  // A broken certificate file (half written): the second pair stays in use, and it says so.
  writeFileSync(certFile, '-----BEGIN CERTIFICATE-----\nnot a certificate\n');
  await until('the warning', () => log.lines.some((l) => l.includes('TLS certificate not reloaded')), 5000);
  assert.equal(await peerSerial(port, ca.crt), serialOf(second.crt));
  const trusting = tlsAgent(t, ca);
  const res = await request(`https://127.0.0.1:${port}/v2/`, { dispatcher: trusting });
  assert.equal(res.statusCode, 200);
  await res.body.dump();
  // A key that does not match the certificate is refused the same way.
  writeFileSync(certFile, readFileSync(first.crt));
  writeFileSync(keyFile, readFileSync(second.key));
  await until('the second warning', () => log.lines.filter((l) => l.includes('TLS certificate not reloaded')).length >= 2, 5000);
  assert.equal(await peerSerial(port, ca.crt), serialOf(second.crt));
});

test('server.tls.clientCaFile: a client without a certificate from that CA cannot connect', async (t) => {
  const p = await pki(t);
  if (!p) return;
  const ca = await p.ca('ca');
  const clientCa = await p.ca('client-ca');
  const otherCa = await p.ca('other-ca');
  const server = await p.leaf(ca, 'server', 0x1001);
  const client = await p.leaf(clientCa, 'client', 0x3003);
  const stranger = await p.leaf(otherCa, 'stranger', 0x4004);
  const proxy = await startProxy(t, { server: { tls: { certFile: server.crt, keyFile: server.key, clientCaFile: clientCa.crt } }, upstreams: [{ name: 'example.com', url: 'http://127.0.0.1:9' }] });
  const url = `https://127.0.0.1:${httpsPort(proxy)}/v2/`;
  const agent = (cert?: Pair): Agent => tlsAgent(t, ca, cert);
  await assert.rejects(request(url, { dispatcher: agent() }));
  await assert.rejects(request(url, { dispatcher: agent(stranger) }));
  const res = await request(url, { dispatcher: agent(client) });
  assert.equal(res.statusCode, 200);
  await res.body.dump();
});

/** A TLS front on loopback in front of `registry`: the upstream as an HTTPS registry with its own certificate. */
async function tlsFront(t: TestContext, registry: Distribution, server: { crt: string; key: string }, clientCa?: string): Promise<{ url: string; clientCerts: string[] }> {
  const clientCerts: string[] = [];
  const [host, port] = registry.host.split(':') as [string, string];
  const front = createTlsServer(
    { cert: readFileSync(server.crt), key: readFileSync(server.key), ...(clientCa ? { ca: readFileSync(clientCa), requestCert: true, rejectUnauthorized: true } : {}) },
    (socket) => {
      const peer = socket.getPeerCertificate();
      if (peer && peer.subject) clientCerts.push(String(peer.subject.CN));
      const back = netConnect(Number(port), host);
      socket.pipe(back).pipe(socket);
      socket.on('error', () => back.destroy());
      back.on('error', () => socket.destroy());
    },
  );
  front.on('tlsClientError', () => undefined);
  await new Promise<void>((r) => front.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => front.close(() => r())));
  return { url: `https://127.0.0.1:${(front.address() as AddressInfo).port}`, clientCerts };
}

async function seeded(t: TestContext): Promise<{ registry: Distribution; img: Image } | undefined> {
  const registry = await startDistribution(t);
  if (!registry) return undefined;
  const img = image({ 'hello.txt': Buffer.from('hello over TLS') });
  await new Pusher({ url: registry.url }).pushImage('team/app', 'v1', img);
  return { registry, img };
}

async function getManifest(proxy: Proxy): Promise<{ status: number; text: string }> {
  const res = await request(`${proxy.url}/v2/private.example/team/app/manifests/v1`, { headers: { accept: 'application/vnd.oci.image.manifest.v1+json' } });
  return { status: res.statusCode, text: await res.body.text() };
}

test('an upstream with a private CA: refused without caFile, served with it, and with insecure (said loudly)', async (t) => {
  const p = await pki(t);
  if (!p) return;
  const world = await seeded(t);
  if (!world) return;
  const ca = await p.ca('upstream-ca');
  const front = await tlsFront(t, world.registry, await p.leaf(ca, 'upstream', 0x5005));

  const without = await startProxy(t, { upstreams: [{ name: 'private.example', url: front.url }] });
  const refused = await getManifest(without);
  assert.ok(refused.status === 502 || refused.status === 503, `status ${refused.status}`);
  assert.match(refused.text, /TLS certificate was not accepted.*caFile/);

  const trusted = await startProxy(t, { upstreams: [{ name: 'private.example', url: front.url, caFile: ca.crt }] });
  const ok = await getManifest(trusted);
  assert.equal(ok.status, 200, ok.text);
  assert.equal(ok.text, world.img.manifest.toString());

  const log = logSink();
  const insecure = await startProxy(t, { upstreams: [{ name: 'private.example', url: front.url, insecure: true }], logger: { level: 'warn', stream: log.stream } });
  assert.ok(log.lines.some((l) => l.includes('private.example') && l.includes('is insecure')), log.lines.join('\n'));
  assert.equal((await getManifest(insecure)).status, 200);
  const status = await request(`${insecure.url}/`);
  assert.match(await status.body.text(), /insecure: TLS not verified/);
  const plainStatus = await request(`${trusted.url}/`);
  assert.doesNotMatch(await plainStatus.body.text(), /insecure: TLS not verified/);
});

test('an upstream that requires a client certificate gets clientCertFile and clientKeyFile', async (t) => {
  const p = await pki(t);
  if (!p) return;
  const world = await seeded(t);
  if (!world) return;
  const ca = await p.ca('upstream-ca');
  const clientCa = await p.ca('client-ca');
  const client = await p.leaf(clientCa, 'ocicache-client', 0x6006);
  const front = await tlsFront(t, world.registry, await p.leaf(ca, 'upstream', 0x5005), clientCa.crt);

  const without = await startProxy(t, { upstreams: [{ name: 'private.example', url: front.url, caFile: ca.crt }] });
  const refused = await getManifest(without);
  assert.ok(refused.status === 502 || refused.status === 503, `status ${refused.status}: ${refused.text}`);

  const withCert = await startProxy(t, { upstreams: [{ name: 'private.example', url: front.url, caFile: ca.crt, clientCertFile: client.crt, clientKeyFile: client.key }] });
  const ok = await getManifest(withCert);
  assert.equal(ok.status, 200, ok.text);
  assert.ok(front.clientCerts.includes('ocicache-client'));
});

test('a redirect to another host gets neither the upstream CA alone nor its client certificate', async (t) => {
  const p = await pki(t);
  if (!p) return;
  const ca = await p.ca('upstream-ca');
  const clientCa = await p.ca('client-ca');
  const client = await p.leaf(clientCa, 'ocicache-client', 0x6006);
  const leaf = await p.leaf(ca, 'upstream', 0x5005);
  const seen: Record<string, boolean> = {};
  // One HTTPS server answering both as the upstream (127.0.0.1) and as a "CDN" (localhost): it
  // asks for a client certificate but accepts a connection without one, and records which got one.
  const server = createHttpsServer({ cert: readFileSync(leaf.crt), key: readFileSync(leaf.key), ca: readFileSync(clientCa.crt), requestCert: true, rejectUnauthorized: false }, (req, res) => {
    const host = String(req.headers.host).split(':')[0]!;
    seen[host] = (req.socket as TLSSocket).getPeerCertificate().subject !== undefined;
    if (host === '127.0.0.1') {
      res.writeHead(307, { location: `https://localhost:${(server.address() as AddressInfo).port}/blob` });
      res.end();
    } else {
      res.end('blob');
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  const port = (server.address() as AddressInfo).port;
  // A CDN the upstream chose (restricted to public and loopback-like addresses), and one the operator listed in redirectHosts.
  const tlsKeys = { url: `https://127.0.0.1:${port}`, caFile: ca.crt, clientCertFile: client.crt, clientKeyFile: client.key };
  const config = buildConfig({ upstreams: [{ name: 'private.example', ...tlsKeys }, { name: 'listed.example', ...tlsKeys, redirectHosts: ['localhost'] }] }, {});
  const lookup = ((_host: string, options: { all?: boolean }, cb: (...a: unknown[]) => void) =>
    options.all ? cb(null, [{ address: '127.0.0.1', family: 4 }]) : cb(null, '127.0.0.1', 4)) as never;
  for (const upstream of config.upstreams) {
    for (const k of Object.keys(seen)) delete seen[k];
    const send = async (exchanger: Exchanger): Promise<unknown> => {
      t.after(() => exchanger.close());
      const res = await exchanger.request(upstream, new URL(`https://127.0.0.1:${port}/v2/x/blobs/sha256:0`), { restrict: false }, (from, to) => redirectRule(upstream, 'blob', from, to), {
        method: 'GET', headers: {}, headersTimeout: 5000, bodyTimeout: 5000, what: 'a blob request',
      });
      return res.body.text();
    };
    // With Node's default roots only for the CDN, the private CA's certificate there is refused...
    await assert.rejects(send(new Exchanger(5000, { lookup })), /self[- ]signed|unable to (get|verify)/i);
    assert.equal(seen['127.0.0.1'], true, 'the upstream itself got the client certificate');
    assert.equal(seen.localhost, undefined);
    // ...and trusted through the process-wide anchors (as NODE_EXTRA_CA_CERTS would), it still gets no client certificate.
    assert.equal(await send(new Exchanger(5000, { lookup, ca: readFileSync(ca.crt) })), 'blob');
    assert.equal(seen.localhost, false);
  }
});

test('skopeo pulls from the HTTPS proxy with a client certificate (--src-cert-dir)', async (t) => {
  const skopeo = need(t, 'skopeo', 'apt-get install skopeo');
  if (!skopeo) return;
  const p = await pki(t);
  if (!p) return;
  const world = await seeded(t);
  if (!world) return;
  const ca = await p.ca('ca');
  const server = await p.leaf(ca, 'server', 0x1001);
  const client = await p.leaf(ca, 'client', 0x3003);
  const proxy = await startProxy(t, { server: { tls: { certFile: server.crt, keyFile: server.key, clientCaFile: ca.crt } }, upstreams: [{ name: 'private.example', url: world.registry.url }] });
  const certs = certDir(join(p.dir, 'certs.d'), ca, client);
  const none = certDir(join(p.dir, 'none.d'), ca);
  const policy = join(p.dir, 'policy.json');
  writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }));
  const ref = `docker://127.0.0.1:${httpsPort(proxy)}/private.example/team/app:v1`;
  const refused = await exec(skopeo, ['--policy', policy, 'inspect', '--raw', '--cert-dir', none, ref]);
  assert.notEqual(refused.code, 0);
  const out = join(p.dir, 'out');
  const r = await exec(skopeo, ['--policy', policy, 'copy', '--preserve-digests', '--src-cert-dir', certs, ref, `oci:${out}:v1`]);
  assert.equal(r.code, 0, r.stderr);
  const index = JSON.parse(readFileSync(join(out, 'index.json'), 'utf8')) as { manifests: Array<{ digest: string }> };
  assert.equal(index.manifests[0]!.digest, world.img.digest);
});

test('TLS settings are validated, naming the key', async (t) => {
  const p = await pki(t);
  if (!p) return;
  const ca = await p.ca('ca');
  const leaf = await p.leaf(ca, 'leaf', 0x1001);
  const other = await p.leaf(ca, 'other', 0x1002);
  const up = (extra: Record<string, unknown>): unknown => ({ upstreams: [{ name: 'private.example', url: 'https://127.0.0.1:9', ...extra }] });
  const bad = (doc: unknown, message: RegExp): void => assert.throws(() => buildConfig(doc, {}), message);
  bad({ ...(up({}) as object), server: { tls: { certFile: leaf.crt } } }, /config: server\.tls\.keyFile: must be a non-empty string/);
  bad({ ...(up({}) as object), server: { tls: { certFile: leaf.crt, keyFile: leaf.key, cafile: 'x' } } }, /config: server\.tls\.cafile: unknown key/);
  bad({ ...(up({}) as object), server: { tls: { certFile: leaf.crt, keyFile: leaf.key, reloadInterval: '10ms' } } }, /config: server\.tls\.reloadInterval: must be at least 100ms/);
  bad(up({ caFile: join(p.dir, 'missing.crt') }), /config: upstreams\[0\]\.caFile: cannot read/);
  bad(up({ caFile: leaf.key.replace('.key', '.ext') }), /config: upstreams\[0\]\.caFile: .* holds no PEM data/);
  bad(up({ clientCertFile: leaf.crt }), /config: upstreams\[0\]\.clientKeyFile: clientCertFile and clientKeyFile go together/);
  bad(up({ clientCertFile: leaf.crt, clientKeyFile: other.key }), /config: upstreams\[0\]\.clientKeyFile: not a PEM key matching clientCertFile/);
  bad(up({ insecure: 'yes' }), /config: upstreams\[0\]\.insecure: must be true or false/);
  bad({ upstreams: [{ name: 'plain.example', url: 'http://127.0.0.1:9', caFile: ca.crt }] }, /config: upstreams\[0\]: caFile, clientCertFile, clientKeyFile and insecure apply to an https url only/);
  // gc and verify need no upstream secrets: the files are not read then.
  assert.equal(buildConfig(up({ clientCertFile: '/nonexistent.crt', clientKeyFile: '/nonexistent.key' }), {}, { upstreamAuth: false, adminToken: false }).upstreams[0]!.tls?.cert, '');
  // A pair that does not load stops the start, naming the key.
  const { loadTls } = await import('../src/http/tls.js');
  assert.throws(() => loadTls({ certFile: leaf.crt, keyFile: other.key, clientCaFile: undefined, clientCertificates: 'required', reloadInterval: 5000 }), /config: server\.tls\.keyFile: cannot use/);
  assert.throws(() => loadTls({ certFile: join(p.dir, 'none.crt'), keyFile: leaf.key, clientCaFile: undefined, clientCertificates: 'required', reloadInterval: 5000 }), /config: server\.tls\.certFile: cannot read/);
});

test('over HTTPS the token realm derived from the request says https', async (t) => {
  const htpasswdBin = need(t, 'htpasswd', 'apt-get install apache2-utils');
  const p = await pki(t);
  if (!p || !htpasswdBin) return;
  const ca = await p.ca('ca');
  const leaf = await p.leaf(ca, 'server', 0x1001);
  const htpasswd = join(p.dir, 'htpasswd');
  assert.equal((await exec(htpasswdBin, ['-Bbc', htpasswd, 'alice', 'PASSWORD'])).code, 0);
  const { buildApp } = await import('../src/http/app.js');
  const root = tempDir(t, 'tls-cache');
  const config = buildConfig(
    {
      server: { host: '127.0.0.1', port: 0, shutdownTimeout: '1s', tls: { certFile: leaf.crt, keyFile: leaf.key } },
      storage: { root },
      upstreams: [{ name: 'example.com', url: 'http://127.0.0.1:9' }],
      access: { htpasswd, rules: [{ upstreams: ['*'], repositories: ['**'], allow: ['authenticated'] }] },
    },
    {},
  );
  const app = await buildApp(config, { logger: false });
  await app.listen({ host: '127.0.0.1', port: 0 });
  t.after(() => app.close());
  const port = (app.server.address() as AddressInfo).port;
  const trusting = tlsAgent(t, ca);
  const res = await request(`https://127.0.0.1:${port}/v2/`, { dispatcher: trusting });
  await res.body.dump();
  assert.equal(res.statusCode, 401);
  assert.match(String(res.headers['www-authenticate']), new RegExp(`realm="https://127\\.0\\.0\\.1:${port}/token"`));
});
