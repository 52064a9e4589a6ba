/**
 * A cached blob is served only to a repository known to hold it: one whose manifest points to it,
 * or whose upstream confirms it (one HEAD, remembered). Before, a private layer once cached was
 * served as a HIT under any upstream and any name, and a HEAD told anyone what was cached.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import test from 'node:test';
import { startDistribution } from './helpers/distribution.js';
import { startFakeUpstream } from './helpers/fake-upstream.js';
import { fetchBody, fetchComplete, ociError, pullImage, startProxy } from './helpers/proxy.js';
import { image, OCI_MANIFEST, Pusher, sha256 } from './helpers/seed.js';
import { until } from './helpers/tools.js';

test('a cached blob is served only to repositories known or confirmed to hold it', async (t) => {
  const privateRegistry = await startDistribution(t);
  const publicRegistry = await startDistribution(t);
  if (!privateRegistry || !publicRegistry) return;
  const secret = image({ 'secret.bin': randomBytes(64 * 1024) });
  const push = new Pusher({ url: privateRegistry.url });
  await push.pushImage('team/secret', 'v1', secret);
  // The same layer, pushed to another repository of the same registry: that one holds it too.
  await push.pushImage('team/also', 'v1', secret);
  const proxy = await startProxy(t, {
    upstreams: [
      { name: 'private.example', url: privateRegistry.url },
      { name: 'public.example', url: publicRegistry.url },
    ],
  });
  const pulled = await pullImage(proxy.url, 'team/secret', 'v1', 'private.example');
  assert.deepEqual(pulled.blobs.map((b) => b.headers['x-cache']), ['MISS', 'MISS']);
  const layer = secret.blobs[1]!.descriptor.digest;
  const blob = (name: string, ns: string): string => `${proxy.url}/v2/${name}/blobs/${layer}?ns=${ns}`;
  await until('the layer is cached', async () => (await fetchComplete(blob('team/secret', 'private.example'))).headers['x-cache'] === 'HIT');

  /** What a registry was asked about the layer, in order. */
  const asked = (registry: typeof privateRegistry): string[] => registry.accessLog.filter((l) => l.includes(`/blobs/${layer}`)).map((l) => l.split(' ').slice(0, 2).join(' '));
  // Another upstream's HEAD is no proof it has the bytes: the blob is fetched from it (a GET).
  // Another repository of the same upstream: the upstream is asked (a HEAD).
  const cases = [
    { what: 'another upstream', name: 'someone/else', ns: 'public.example', registry: publicRegistry, method: 'GET' },
    { what: 'another repository of the same upstream', name: 'team/other', ns: 'private.example', registry: privateRegistry, method: 'HEAD' },
  ];
  for (const c of cases) {
    await t.test(`${c.what}: the upstream is asked (${c.method}), and its 404 is the answer`, async () => {
      const before = asked(c.registry).length;
      for (const method of ['GET', 'HEAD'] as const) {
        const r = await fetchBody(blob(c.name, c.ns), {}, method);
        assert.equal(r.status, 404, method);
        assert.equal(r.headers['x-cache'], undefined);
        if (method === 'GET') assert.deepEqual(ociError(r), { code: 'BLOB_UNKNOWN', message: 'blob unknown to registry' });
      }
      // One request: the upstream's 404 is remembered for cache.notFoundTtl.
      await until('the upstream access log has the request', () => asked(c.registry).length > before);
      assert.deepEqual(asked(c.registry).slice(before), [`${c.method} /v2/${c.name}/blobs/${layer}`]);
    });
  }

  await t.test('a repository the upstream confirms is served from the cache, and remembered', async () => {
    const first = await fetchComplete(blob('team/also', 'private.example'));
    assert.equal(first.status, 200);
    assert.equal(first.headers['x-cache'], 'REVALIDATED');
    await until('the confirmation is logged upstream', () => asked(privateRegistry).includes(`HEAD /v2/team/also/blobs/${layer}`));
    const seen = asked(privateRegistry).length;
    const again = await fetchComplete(blob('team/also', 'private.example'));
    assert.equal(again.headers['x-cache'], 'HIT');
    const head = await fetchBody(blob('team/also', 'private.example'), {}, 'HEAD');
    assert.equal(head.headers['x-cache'], 'HIT');
    // A marker request: the registry logs in order, so nothing was asked between.
    await fetchBody(`${privateRegistry.url}/v2/marker/blobs/${layer}`);
    await until('the marker is logged', () => privateRegistry.accessLog.some((l) => l.includes('/v2/marker/')));
    assert.deepEqual(asked(privateRegistry).slice(seen), [`GET /v2/marker/blobs/${layer}`]);
  });
});

test('a manifest naming a cached private digest (subject, or a layer) does not make its repository hold it', async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const secret = image({ 'secret.bin': randomBytes(32 * 1024) });
  const push = new Pusher({ url: registry.url });
  await push.pushImage('team/secret', 'v1', secret);
  const layer = secret.blobs[1]!.descriptor.digest;
  // Someone who may push to attacker/x points a manifest's subject at the private layer's digest.
  const cfg = Buffer.from('{}');
  await push.pushBlob('attacker/x', cfg);
  const pointer = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.empty.v1+json', digest: sha256(cfg), size: cfg.length }, layers: [], subject: secret.blobs[1]!.descriptor }));
  await push.pushManifest('attacker/x', 'v1', pointer, OCI_MANIFEST);
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: registry.url }] });
  await pullImage(proxy.url, 'team/secret', 'v1');
  await until('the layer is cached', async () => (await fetchComplete(`${proxy.url}/v2/team/secret/blobs/${layer}?ns=docker.io`)).headers['x-cache'] === 'HIT');
  assert.equal((await fetchComplete(`${proxy.url}/v2/attacker/x/manifests/v1?ns=docker.io`, { accept: OCI_MANIFEST })).status, 200);
  const r = await fetchBody(`${proxy.url}/v2/attacker/x/blobs/${layer}?ns=docker.io`);
  assert.equal(r.status, 404);
  assert.deepEqual(ociError(r), { code: 'BLOB_UNKNOWN', message: 'blob unknown to registry' });
});

test("a hostile upstream's HEAD does not vouch for bytes another upstream served", async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const secret = image({ 'secret.bin': randomBytes(32 * 1024) });
  await new Pusher({ url: registry.url }).pushImage('team/secret', 'v1', secret);
  const layer = secret.blobs[1]!.descriptor;
  const fake = await startFakeUpstream(t);
  // Claims to have every blob and every manifest, but cannot send their bytes.
  fake.route(`/v2/evil/x/blobs/${layer.digest}`, (req, res) => {
    if (req.method === 'HEAD') return void res.writeHead(200, { 'content-length': String(layer.size) }).end();
    res.writeHead(200, { 'content-length': String(layer.size) }).end(Buffer.alloc(layer.size));
  });
  fake.route(`/v2/evil/x/manifests/${secret.digest}`, (req, res) => {
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'docker-content-digest': secret.digest, 'content-length': '2' }).end(req.method === 'HEAD' ? undefined : '{}');
  });
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: registry.url }, { name: 'evil.example', url: fake.url }] });
  await pullImage(proxy.url, 'team/secret', 'v1');
  await until('the layer is cached', async () => (await fetchComplete(`${proxy.url}/v2/team/secret/blobs/${layer.digest}?ns=docker.io`)).headers['x-cache'] === 'HIT');

  const blob = await fetchBody(`${proxy.url}/v2/evil/x/blobs/${layer.digest}?ns=evil.example`);
  assert.ok(blob.aborted ?? !blob.body!.equals(secret.blobs[1]!.data), 'the private bytes never reach a client of the hostile upstream');
  const manifest = await fetchBody(`${proxy.url}/v2/evil/x/manifests/${secret.digest}?ns=evil.example`, { accept: OCI_MANIFEST });
  assert.equal(manifest.status, 502);
  assert.equal(ociError(manifest).code, 'UNKNOWN');
  assert.ok(fake.count('GET', `/v2/evil/x/blobs/${layer.digest}`) > 0, 'the blob was asked of the hostile upstream itself');
});
