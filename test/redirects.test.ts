/**
 * Redirects from upstreams (docs/upstreams.md, "Tokens, redirects and credentials"), with real
 * servers on loopback addresses that count as other hosts: the upstream on 127.0.0.1, an
 * "internal" host on 127.0.0.2. Manifests, tag lists and referrers follow a redirect only to the
 * upstream's own host and its redirectHosts; blob downloads follow any host, without
 * Authorization, never from HTTPS to HTTP and never from an upstream elsewhere to loopback. A
 * manifest answer that is not a manifest type is refused and not stored. The rules themselves are
 * unit-tested in test/upstream-trust.test.ts.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import test from 'node:test';
import { buildConfig } from '../src/core/config.js';
import { OciError } from '../src/core/errors.js';
import { Metrics } from '../src/telemetry/metrics.js';
import { UpstreamClient } from '../src/upstream/client.js';
import { blobHandler, startProxyWithFake, type Handler } from './helpers/fake-upstream.js';
import { fakeLookup, outsideAddress, selfSigned, startHost } from './helpers/hosts.js';
import { fetchBody, jsonBody, ociError, startProxy } from './helpers/proxy.js';
import { OCI_INDEX, OCI_MANIFEST, sha256 } from './helpers/seed.js';

const manifest = (label: string): Buffer =>
  Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: sha256('{}'), size: 2 }, layers: [], annotations: { label } }));
const GOOD = manifest('from the upstream');
const INTERNAL = manifest('from an internal host');
const SUBJECT = sha256('a subject');
const index = (label: string): Buffer => Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: [], annotations: { label } }));

function serve(body: Buffer, type: string, extra: Record<string, string> = {}): Handler {
  return (req, res) => res.writeHead(200, { 'content-type': type, 'content-length': String(body.length), ...extra }).end(req.method === 'HEAD' ? undefined : body);
}
const serveManifest = (body: Buffer): Handler => serve(body, OCI_MANIFEST, { 'docker-content-digest': sha256(body) });
const redirectTo = (base: string): Handler => (req, res) => res.writeHead(307, { location: `${base}${req.url ?? '/'}` }).end();

/** The paths of a tag's manifest (HEAD by tag, then GET by digest), its tag list and referrers. */
function routeAll(host: { route(path: string, h: Handler): void }, handlers: { manifest: (body: Buffer) => Handler; tags: Handler; referrers: Handler }, body: Buffer): void {
  for (const reference of ['latest', sha256(body)]) host.route(`/v2/team/app/manifests/${reference}`, handlers.manifest(body));
  host.route('/v2/team/app/tags/list', handlers.tags);
  host.route(`/v2/team/app/referrers/${SUBJECT}`, handlers.referrers);
}

test('manifests, tag lists and referrers redirected to a host the upstream may not send them to: 502, not dialled, nothing cached', async (t) => {
  const internal = await startHost(t, '127.0.0.2');
  routeAll(internal, { manifest: serveManifest, tags: serve(Buffer.from('{"name":"team/app","tags":["internal"]}'), 'application/json'), referrers: serve(index('internal'), OCI_INDEX) }, INTERNAL);
  const { fake, proxy } = await startProxyWithFake(t);
  const redirect = redirectTo(internal.url);
  routeAll(fake, { manifest: () => redirect, tags: redirect, referrers: redirect }, INTERNAL);
  const paths = { manifest: '/v2/team/app/manifests/latest', tags: '/v2/team/app/tags/list', referrers: `/v2/team/app/referrers/${SUBJECT}` };
  for (const [kind, path] of Object.entries(paths)) {
    const r = await fetchBody(`${proxy.url}${path}?ns=fake.example`, { accept: kind === 'manifest' ? OCI_MANIFEST : OCI_INDEX });
    assert.equal(r.status, 502, kind);
    assert.equal(ociError(r).code, 'UNKNOWN', kind);
    assert.match(ociError(r).message, /redirectHosts/, kind);
  }
  assert.deepEqual(internal.requests, [], 'the internal host was never asked');

  // The upstream behaves: what it serves now is what the client gets, nothing left from the redirect.
  routeAll(fake, { manifest: serveManifest, tags: serve(Buffer.from('{"name":"team/app","tags":["latest"]}'), 'application/json'), referrers: serve(index('upstream'), OCI_INDEX) }, GOOD);
  const m = await fetchBody(`${proxy.url}${paths.manifest}?ns=fake.example`, { accept: OCI_MANIFEST });
  assert.deepEqual([m.status, m.headers['x-cache'], m.body], [200, 'MISS', GOOD]);
  assert.deepEqual(jsonBody(await fetchBody(`${proxy.url}${paths.tags}?ns=fake.example`)).tags, ['latest']);
  assert.deepEqual(jsonBody(await fetchBody(`${proxy.url}${paths.referrers}?ns=fake.example`)).annotations, { label: 'upstream' });
  assert.deepEqual(internal.requests, []);
});

test('a host listed in redirectHosts is followed for manifests, and never gets the Authorization', async (t) => {
  const internal = await startHost(t, '127.0.0.2');
  routeAll(internal, { manifest: serveManifest, tags: serve(Buffer.from('{"name":"team/app","tags":["v1"]}'), 'application/json'), referrers: serve(index('internal'), OCI_INDEX) }, INTERNAL);
  const { fake, proxy } = await startProxyWithFake(t, { redirectHosts: ['127.0.0.2'], auth: { username: 'u', passwordEnv: 'PASSWORD' } }, { env: { PASSWORD: 'p4ss' } });
  const basic = `Basic ${Buffer.from('u:p4ss').toString('base64')}`;
  const guarded = (req: Parameters<Handler>[0], res: Parameters<Handler>[1]): void => {
    if (req.headers.authorization !== basic) return void res.writeHead(401, { 'www-authenticate': 'Basic realm="fake"' }).end();
    redirectTo(internal.url)(req, res);
  };
  routeAll(fake, { manifest: () => guarded, tags: guarded, referrers: guarded }, INTERNAL);
  const m = await fetchBody(`${proxy.url}/v2/team/app/manifests/latest?ns=fake.example`, { accept: OCI_MANIFEST });
  assert.deepEqual([m.status, m.body], [200, INTERNAL]);
  assert.deepEqual(jsonBody(await fetchBody(`${proxy.url}/v2/team/app/tags/list?ns=fake.example`)).tags, ['v1']);
  assert.equal((await fetchBody(`${proxy.url}/v2/team/app/referrers/${SUBJECT}?ns=fake.example`)).status, 200);
  assert.ok(internal.requests.length >= 3);
  assert.ok(internal.requests.every((q) => q.authorization === undefined), 'Authorization stays with the upstream\'s origin');
});

test('a manifest answered as text/html is refused (502) and not stored', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t);
  const html = Buffer.from('<html><script>alert(document.cookie)</script></html>');
  const digest = sha256(html);
  fake.route(`/v2/team/page/manifests/${digest}`, serve(html, 'text/html', { 'docker-content-digest': digest }));
  fake.route('/v2/team/page/manifests/latest', serve(html, 'text/html; charset=utf-8', { 'docker-content-digest': digest }));
  // And a JSON body whose mediaType field says text/html: what the cache would have served it as.
  const disguised = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: 'text/html' }));
  fake.route(`/v2/team/page/manifests/${sha256(disguised)}`, serve(disguised, 'application/json', { 'docker-content-digest': sha256(disguised) }));
  for (const reference of [digest, 'latest', sha256(disguised)]) {
    const r = await fetchBody(`${proxy.url}/v2/team/page/manifests/${reference}?ns=fake.example`, { accept: '*/*' });
    assert.equal(r.status, 502, reference);
    assert.equal(ociError(r).code, 'MANIFEST_INVALID', reference);
  }
  // The upstream forgets it: nothing was stored to answer from.
  fake.route(`/v2/team/page/manifests/${digest}`, (_req, res) => res.writeHead(404).end());
  assert.equal((await fetchBody(`${proxy.url}/v2/team/page/manifests/${digest}?ns=fake.example`, { accept: '*/*' })).status, 404);
  for (const reference of ['latest', sha256(GOOD)]) fake.route(`/v2/team/page/manifests/${reference}`, serveManifest(GOOD));
  const ok = await fetchBody(`${proxy.url}/v2/team/page/manifests/latest?ns=fake.example`, { accept: OCI_MANIFEST });
  assert.deepEqual([ok.status, ok.headers['x-cache'], ok.body], [200, 'MISS', GOOD]);
});

test('a blob redirected to another host is followed without Authorization', async (t) => {
  const cdn = await startHost(t, '127.0.0.2');
  const data = randomBytes(200_000);
  const digest = sha256(data);
  cdn.route('/signed/blob', blobHandler(data));
  const { fake, proxy } = await startProxyWithFake(t, { auth: { username: 'u', passwordEnv: 'PASSWORD' } }, { env: { PASSWORD: 'p4ss' } });
  fake.route(`/v2/team/app/blobs/${digest}`, (req, res) => {
    if (!req.headers.authorization) return void res.writeHead(401, { 'www-authenticate': 'Basic realm="fake"' }).end();
    res.writeHead(307, { location: `${cdn.url}/signed/blob?sig=1` }).end();
  });
  const r = await fetchBody(`${proxy.url}/v2/team/app/blobs/${digest}?ns=fake.example`);
  assert.equal(r.status, 200);
  assert.equal(sha256(r.body!), digest);
  assert.equal(cdn.requests.length, 1);
  assert.equal(cdn.requests[0]!.authorization, undefined);
});

test('a 401 from a host the upstream redirected to is a 502: no token is fetched and nothing is sent again', async (t) => {
  const cdn = await startHost(t, '127.0.0.2');
  const digest = sha256(randomBytes(64));
  const { fake, proxy } = await startProxyWithFake(t, { auth: { username: 'u', passwordEnv: 'PASSWORD' } }, { env: { PASSWORD: 'p4ss' } });
  const realm = `${fake.url}/token`;
  // The CDN names the upstream's own realm, which would get the upstream's credentials.
  cdn.route('/signed/blob', (_req, res) => res.writeHead(401, { 'www-authenticate': `Bearer realm="${realm}",service="fake",scope="repository:team/app:pull,push"` }).end());
  fake.route('/token', (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"token":"t"}'));
  fake.route(`/v2/team/app/blobs/${digest}`, (req, res) => {
    if (!req.headers.authorization) return void res.writeHead(401, { 'www-authenticate': 'Basic realm="fake"' }).end();
    res.writeHead(307, { location: `${cdn.url}/signed/blob?sig=1` }).end();
  });
  const r = await fetchBody(`${proxy.url}/v2/team/app/blobs/${digest}?ns=fake.example`);
  assert.equal(r.status, 502);
  assert.deepEqual(ociError(r), { code: 'UNKNOWN', message: `upstream fake.example redirected a blob request to ${cdn.url}, which is refused: it answered 401, and only the upstream itself may ask for credentials` });
  assert.deepEqual(fake.requests.map((q) => q.url.split('?')[0]), [`/v2/team/app/blobs/${digest}`, `/v2/team/app/blobs/${digest}`], 'no token fetched, nothing sent again');
  assert.equal(cdn.requests.length, 1);
});

test('a blob redirected from an upstream off loopback to a loopback address is refused, as an address and as localhost', async (t) => {
  const address = outsideAddress();
  if (!address) return t.skip('this machine has no address but loopback');
  const upstream = await startHost(t, address);
  const target = await startHost(t, '127.0.0.2');
  const local = await startHost(t, '127.0.0.1');
  const data = randomBytes(10_000);
  const digest = sha256(data);
  for (const host of [target, local, upstream]) host.route('/blob', blobHandler(data));
  const proxy = await startProxy(t, { upstreams: [{ name: 'outside.example', url: upstream.url, blobRetries: 0 }], timeouts: { manifest: '2s' } });
  const ask = (): Promise<{ status: number; body?: Buffer }> => fetchBody(`${proxy.url}/v2/team/app/blobs/${digest}?ns=outside.example`);
  for (const [where, location] of [['127.0.0.2', `${target.url}/blob`], ['localhost', `http://localhost:${local.port}/blob`]]) {
    upstream.route(`/v2/team/app/blobs/${digest}`, (_req, res) => res.writeHead(307, { location }).end());
    const r = await ask();
    assert.equal(r.status, 502, where);
  }
  assert.equal(target.connections + local.connections, 0, 'no connection to loopback');
  // A redirect to the upstream's own host is followed.
  upstream.route(`/v2/team/app/blobs/${digest}`, (_req, res) => res.writeHead(307, { location: `${upstream.url}/blob` }).end());
  const ok = await ask();
  assert.equal(ok.status, 200);
  assert.equal(sha256(ok.body!), digest);
});

test('upstream client: a blob redirect from HTTPS to HTTP is refused, to HTTPS followed; a name resolving to loopback is refused', async (t) => {
  const address = outsideAddress();
  const tls = selfSigned(t, ['127.0.0.1', '127.0.0.2', 'registry.example.com', 'cdn.example.net']);
  if (!tls) return;
  const data = randomBytes(10_000);
  const digest = sha256(data);
  const registry = await startHost(t, '127.0.0.1', tls);
  const secureCdn = await startHost(t, '127.0.0.2', tls);
  const plainCdn = await startHost(t, '127.0.0.2');
  for (const host of [secureCdn, plainCdn]) host.route('/blob', blobHandler(data));
  const client = (url: string, lookup?: Record<string, string>): { c: UpstreamClient; target: { upstream: ReturnType<typeof buildConfig>['upstreams'][0]; name: string } } => {
    const config = buildConfig({ storage: { root: '/nonexistent' }, upstreams: [{ name: 'tls.example', url }] }, {});
    const c = new UpstreamClient(config, new Metrics(), Date.now, { ca: tls.cert, ...(lookup ? { lookup: fakeLookup(lookup) } : {}) });
    t.after(() => c.close());
    return { c, target: { upstream: config.upstreams[0]!, name: 'team/app' } };
  };
  const { c, target } = client(registry.url);
  const get = async (ci = c, tg = target): Promise<Buffer> => {
    const res = await ci.getBlob(tg, digest, AbortSignal.timeout(5000));
    return Buffer.from(await res.body.arrayBuffer());
  };
  registry.route(`/v2/team/app/blobs/${digest}`, (_req, res) => res.writeHead(307, { location: `${plainCdn.url}/blob` }).end());
  await assert.rejects(get(), (err: unknown) => err instanceof OciError && err.status === 502 && /HTTPS to HTTP/.test(err.message));
  assert.equal(plainCdn.connections, 0);
  registry.route(`/v2/team/app/blobs/${digest}`, (_req, res) => res.writeHead(307, { location: `${secureCdn.url}/blob` }).end());
  assert.equal(sha256(await get()), digest);

  // An upstream off loopback, by name; its blob sent to a name that resolves to loopback.
  if (!address) return t.skip('this machine has no address but loopback');
  const outside = await startHost(t, address, tls);
  outside.route(`/v2/team/app/blobs/${digest}`, (_req, res) => res.writeHead(307, { location: `https://cdn.example.net:${secureCdn.port}/blob` }).end());
  const named = client(`https://registry.example.com:${outside.port}`, { 'registry.example.com': address, 'cdn.example.net': '127.0.0.2' });
  const before = secureCdn.connections;
  await assert.rejects(get(named.c, named.target), (err: unknown) => err instanceof OciError && err.status === 502 && /loopback/.test(err.message));
  assert.equal(secureCdn.connections, before, 'the name was resolved and refused before any connection');
});
