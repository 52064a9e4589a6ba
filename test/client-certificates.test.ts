/**
 * Client certificates as identities (access.clientCertificates, server.tls.clientCertificates):
 * a certificate verified against clientCaFile names its holder by its subject's CN, and the access
 * rules apply to that user as to an htpasswd user. Certificates are made by openssl at run time;
 * the clients are undici, skopeo (--src-cert-dir) and containerd (hosts.toml `ca` and `client`).
 */
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { once } from 'node:events';
import { test, type TestContext } from 'node:test';
import { connect as tlsConnect, TLSSocket } from 'node:tls';
import { Agent, request } from 'undici';
import { buildConfig } from '../src/core/config.js';
import { run, startContainerd } from './helpers/daemons.js';
import { startDistribution } from './helpers/distribution.js';
import { certDir, pki, tlsAgent, type Pair, type Pki } from './helpers/pki.js';
import { localSnippet } from './helpers/readme.js';
import { startProxy, type Proxy } from './helpers/proxy.js';
import { image, OCI_MANIFEST, Pusher, type Image } from './helpers/seed.js';
import { exec, need } from './helpers/tools.js';

interface World {
  p: Pki;
  proxy: Proxy;
  port: number;
  ca: Pair;
  /** Client certificates: CN=alice (allowed team/*), CN=bob (allowed nothing), CN=mallory from a CA the proxy does not trust. */
  alice: Pair;
  bob: Pair;
  mallory: Pair;
  img: Image;
  log: string[];
}

/**
 * A registry with docker.io/team/app:v1 and a proxy serving HTTPS that asks for client
 * certificates (`optional`: clients without one may use a password instead).
 */
async function world(t: TestContext): Promise<World | undefined> {
  const p = await pki(t);
  const htpasswdBin = need(t, 'htpasswd', 'apt-get install apache2-utils');
  if (!p || !htpasswdBin) return undefined;
  const registry = await startDistribution(t);
  if (!registry) return undefined;
  const img = image({ 'hello.txt': Buffer.from('hello, certificate holder') });
  await new Pusher({ url: registry.url }).pushImage('team/app', 'v1', img);
  const ca = await p.ca('ca');
  const server = await p.leaf(ca, 'server', 0x1001);
  const alice = await p.leaf(ca, 'alice', 0x2001);
  const bob = await p.leaf(ca, 'bob', 0x2002);
  const mallory = await p.leaf(await p.ca('other-ca'), 'mallory', 0x2003);
  const htpasswd = join(p.dir, 'htpasswd');
  assert.equal((await exec(htpasswdBin, ['-Bbc', htpasswd, 'carol', 'PASSWORD'])).code, 0);
  const log: string[] = [];
  const proxy = await startProxy(t, {
    server: { tls: { certFile: server.crt, keyFile: server.key, clientCaFile: ca.crt, clientCertificates: 'optional' } },
    upstreams: [{ name: 'docker.io', url: registry.url }],
    access: { htpasswd, clientCertificates: true, rules: [{ upstreams: ['docker.io'], repositories: ['team/*'], allow: ['alice', 'carol'] }] },
    logger: { level: 'info', stream: { write: (line: string) => void log.push(line) } },
  });
  return { p, proxy, port: (proxy.app.server.address() as AddressInfo).port, ca, alice, bob, mallory, img, log };
}

test('a verified client certificate names the user: its CN is matched by the rules like an htpasswd user', async (t) => {
  const w = await world(t);
  if (!w) return;
  const agent = (cert?: Pair): Agent => tlsAgent(t, w.ca, cert);
  const manifest = `https://127.0.0.1:${w.port}/v2/team/app/manifests/v1?ns=docker.io`;
  const get = async (a: Agent, headers: Record<string, string> = {}): Promise<{ status: number; body: string; challenge: unknown }> => {
    const res = await request(manifest, { dispatcher: a, headers: { accept: OCI_MANIFEST, ...headers } });
    return { status: res.statusCode, body: await res.body.text(), challenge: res.headers['www-authenticate'] };
  };
  const challenge = `Bearer realm="https://127.0.0.1:${w.port}/token",service="ocicache",scope="repository:team/app:pull"`;
  const cases: Array<[string, Agent, Record<string, string>, number, string | undefined]> = [
    ['alice by her certificate alone', agent(w.alice), {}, 200, undefined],
    ['bob by his certificate: known, and not allowed', agent(w.bob), {}, 403, '{"errors":[{"code":"DENIED","message":"bob may not read team/app"}]}'],
    ['no certificate, no password: the challenge', agent(), {}, 401, '{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'],
    ['no certificate, carol\'s password', agent(), { authorization: `Basic ${Buffer.from('carol:PASSWORD').toString('base64')}` }, 200, undefined],
    ['a certificate from a CA the proxy does not trust', agent(w.mallory), {}, 401, '{"errors":[{"code":"UNAUTHORIZED","message":"invalid credentials"}]}'],
    // A password names a user ahead of the certificate.
    ['bob\'s certificate with carol\'s password', agent(w.bob), { authorization: `Basic ${Buffer.from('carol:PASSWORD').toString('base64')}` }, 200, undefined],
  ];
  for (const [what, a, headers, status, body] of cases) {
    const r = await get(a, headers);
    assert.equal(r.status, status, `${what}: ${r.body}`);
    if (body !== undefined) assert.equal(r.body, body, what);
    if (status === 401 && what.startsWith('no certificate')) assert.equal(r.challenge, challenge, what);
    if (status === 200) assert.equal(JSON.parse(r.body).config.digest, w.img.blobs[0]!.descriptor.digest, what);
  }
  // The base endpoint: a certificate holder is authenticated, so no challenge.
  const base = await request(`https://127.0.0.1:${w.port}/v2/`, { dispatcher: agent(w.bob) });
  assert.equal(base.statusCode, 200);
  await base.body.dump();
  // The request log names the user, whichever way they were identified.
  const users = w.log.map((l) => JSON.parse(l) as { user?: string; url?: string }).filter((l) => l.url?.startsWith('/v2/team/app/manifests')).map((l) => l.user ?? '-');
  assert.deepEqual(users, ['alice', 'bob', '-', 'carol', '-', 'carol']);
});

test('access.clientCertificates is validated: it needs a client CA, and then htpasswd is optional', async (t) => {
  const p = await pki(t);
  if (!p) return;
  const ca = await p.ca('ca');
  const server = await p.leaf(ca, 'server', 0x1001);
  const base = { upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:9' }] };
  const rules = [{ upstreams: ['*'], repositories: ['**'], allow: ['alice'] }];
  const cases: Array<[string, unknown, string | undefined]> = [
    ['without server.tls', { ...base, access: { clientCertificates: true, rules } }, 'config: access.clientCertificates: needs server.tls with clientCaFile: only a certificate checked against those CAs may name a user'],
    ['without clientCaFile', { ...base, server: { tls: { certFile: server.crt, keyFile: server.key } }, access: { clientCertificates: true, rules } }, 'config: access.clientCertificates: needs server.tls with clientCaFile: only a certificate checked against those CAs may name a user'],
    ['neither htpasswd nor certificates', { ...base, access: { rules } }, 'config: access.htpasswd: is required (unless clientCertificates: true): the path of an htpasswd file with bcrypt entries (htpasswd -B)'],
    ['not a boolean', { ...base, access: { clientCertificates: 'yes', rules } }, 'config: access.clientCertificates: must be true or false'],
    ['server.tls.clientCertificates without a CA', { ...base, server: { tls: { certFile: server.crt, keyFile: server.key, clientCertificates: 'optional' } } }, 'config: server.tls.clientCertificates: needs server.tls.clientCaFile, the CAs client certificates are checked against'],
    ['server.tls.clientCertificates misspelt', { ...base, server: { tls: { certFile: server.crt, keyFile: server.key, clientCaFile: ca.crt, clientCertificates: 'maybe' } } }, 'config: server.tls.clientCertificates: must be required or optional, got "maybe"'],
    ['certificates alone', { ...base, server: { tls: { certFile: server.crt, keyFile: server.key, clientCaFile: ca.crt } }, access: { clientCertificates: true, rules } }, undefined],
  ];
  for (const [what, doc, message] of cases) {
    if (message === undefined) assert.equal(buildConfig(doc, {}).access?.htpasswd, undefined, what);
    else assert.throws(() => buildConfig(doc, {}), { message }, what);
  }
});

test('skopeo and containerd pull as the user their client certificate names (--src-cert-dir; hosts.toml ca and client)', async (t) => {
  const skopeo = need(t, 'skopeo', 'apt-get install skopeo');
  if (!skopeo) return;
  const c = await startContainerd(t);
  if (!c) return;
  const w = await world(t);
  if (!w) return;
  // skopeo: a cert dir with the CA and alice's pair, then bob's.
  const policy = join(w.p.dir, 'policy.json');
  writeFileSync(policy, JSON.stringify({ default: [{ type: 'insecureAcceptAnything' }] }));
  const ref = `docker://127.0.0.1:${w.port}/docker.io/team/app:v1`;
  const asAlice = await exec(skopeo, ['--policy', policy, 'copy', '--preserve-digests', '--src-cert-dir', certDir(join(w.p.dir, 'alice.d'), w.ca, w.alice), ref, `oci:${join(w.p.dir, 'out')}:v1`]);
  assert.equal(asAlice.code, 0, asAlice.stderr);
  const index = JSON.parse(readFileSync(join(w.p.dir, 'out', 'index.json'), 'utf8')) as { manifests: Array<{ digest: string }> };
  assert.equal(index.manifests[0]!.digest, w.img.digest);
  const asBob = await exec(skopeo, ['--policy', policy, 'inspect', '--raw', '--cert-dir', certDir(join(w.p.dir, 'bob.d'), w.ca, w.bob), ref]);
  assert.notEqual(asBob.code, 0);
  assert.match(asBob.stderr, /denied|bob may not read team\/app/i);

  // containerd: the README's hosts.toml with the proxy's CA and a client pair; `server` becomes a dead port, so only the cache can answer.
  const snippet = localSnippet('containerd-hosts-cert.toml', `127.0.0.1:${w.port}`);
  assert.match(snippet, /^server = "http:\/\/127\.0\.0\.1:1"$/m);
  const hostsDir = (who: string, pair: Pair): string => {
    const d = join(c.dir, `certs-${who}.d`);
    mkdirSync(join(d, 'docker.io'), { recursive: true });
    const toml = snippet.replace('/etc/containerd/certs.d/cache-ca.crt', w.ca.crt).replace('/etc/containerd/certs.d/node.crt', pair.crt).replace('/etc/containerd/certs.d/node.key', pair.key);
    writeFileSync(join(d, 'docker.io', 'hosts.toml'), toml);
    return d;
  };
  await run(c.ctr, ['--address', c.socket, '--namespace', 'alice', 'images', 'pull', '--hosts-dir', hostsDir('alice', w.alice), 'docker.io/team/app:v1']);
  const ls = await run(c.ctr, ['--address', c.socket, '--namespace', 'alice', 'images', 'ls']);
  assert.ok(ls.split('\n').some((l) => l.startsWith('docker.io/team/app:v1 ') && l.includes(w.img.digest)), ls);
  const bob = await exec(c.ctr, ['--address', c.socket, '--namespace', 'bob', 'images', 'pull', '--hosts-dir', hostsDir('bob', w.bob), 'docker.io/team/app:v1']);
  assert.notEqual(bob.code, 0);
  assert.match(bob.stderr + bob.stdout, /403|denied|bob may not read/i);
  const seen = new Set(w.log.map((l) => (JSON.parse(l) as { user?: string }).user).filter(Boolean));
  assert.deepEqual([...seen].sort(), ['alice', 'bob']);
});

test('a TLS 1.2 client cannot renegotiate, and a certificate whose check failed names nobody, even when `authorized` says otherwise', async (t) => {
  const w = await world(t);
  if (!w) return;
  // Renegotiating could present another certificate after the first handshake: it is refused.
  const socket = tlsConnect({ host: '127.0.0.1', port: w.port, ca: readFileSync(w.ca.crt), cert: readFileSync(w.alice.crt), key: readFileSync(w.alice.key), maxVersion: 'TLSv1.2' });
  t.after(() => socket.destroy());
  await once(socket, 'secureConnect');
  socket.on('error', () => undefined);
  socket.resume();
  const closed = new Promise<boolean>((resolve) => {
    socket.once('close', () => resolve(true));
    setTimeout(() => resolve(false), 5000).unref();
  });
  socket.renegotiate({ rejectUnauthorized: false }, () => undefined);
  assert.equal(await closed, true, 'the server closed the connection that tried to renegotiate');
  // What Node leaves after a renegotiation with a certificate that failed its check: authorized still true, the error set.
  const { certificateUser } = await import('../src/http/tls.js');
  const swapped = Object.assign(Object.create(TLSSocket.prototype) as TLSSocket, { authorized: true, authorizationError: new Error('DEPTH_ZERO_SELF_SIGNED_CERT'), getPeerCertificate: () => ({ subject: { CN: 'admin' } }) });
  assert.equal(certificateUser(swapped), null);
});
