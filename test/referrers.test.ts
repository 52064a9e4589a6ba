/**
 * Listings pass through: referrers and tag lists, logged and counted with their cache result.
 * Debian's distribution 2.8 has no referrers endpoint (it answers 404, which test/pull.test.ts
 * covers), so the upstream that has one is the fake.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { request } from 'undici';
import { startFakeUpstream } from './helpers/fake-upstream.js';
import { fetchBody, metric, metricsText, startProxy } from './helpers/proxy.js';
import { OCI_INDEX, OCI_MANIFEST, sha256 } from './helpers/seed.js';

const SUBJECT = `sha256:${'a'.repeat(64)}`;

test('referrers pass through with their filter header; they and tag lists are logged and counted as passthrough', async (t) => {
  const fake = await startFakeUpstream(t);
  const index = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: [{ mediaType: OCI_MANIFEST, digest: `sha256:${'b'.repeat(64)}`, size: 123, artifactType: 'application/spdx+json' }] }));
  fake.route('/v2/library/alpine/tags/list', (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"name":"library/alpine","tags":["3.20"]}'));
  fake.route(`/v2/library/alpine/referrers/${SUBJECT}`, (req, res) => {
    const headers: Record<string, string> = { 'content-type': OCI_INDEX, 'content-length': String(index.length) };
    if (req.url?.includes('artifactType=')) headers['oci-filters-applied'] = 'artifactType';
    res.writeHead(200, headers).end(index);
  });
  const lines: Array<Record<string, unknown>> = [];
  const proxy = await startProxy(t, {
    upstreams: [{ name: 'docker.io', url: fake.url, dockerHubLibrary: true }],
    logger: { level: 'info', stream: { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) } },
  });
  const path = `/v2/library/alpine/referrers/${SUBJECT}?ns=docker.io&artifactType=application%2Fspdx%2Bjson`;

  const get = await request(`${proxy.url}${path}`);
  assert.equal(get.statusCode, 200);
  assert.deepEqual(Buffer.from(await get.body.arrayBuffer()), index);
  const head = await request(`${proxy.url}${path}`, { method: 'HEAD' });
  await head.body.dump();
  for (const [what, res] of [['GET', get], ['HEAD', head]] as const) {
    assert.equal(res.statusCode, 200, what);
    assert.equal(res.headers['content-type'], OCI_INDEX, what);
    assert.equal(res.headers['content-length'], String(index.length), what);
    assert.equal(res.headers['oci-filters-applied'], 'artifactType', what);
    assert.equal(res.headers['oci-namespace'], 'docker.io', what);
    assert.equal(res.headers['x-cache'], 'PASSTHROUGH', what);
  }
  // Never cached: each request asked the upstream, with the client's filter.
  assert.deepEqual(
    fake.requests.map((r) => [r.method, r.url]),
    [
      ['GET', `/v2/library/alpine/referrers/${SUBJECT}?artifactType=application%2Fspdx%2Bjson`],
      ['GET', `/v2/library/alpine/referrers/${SUBJECT}?artifactType=application%2Fspdx%2Bjson`],
    ],
  );
  // A tag list too; its path's literal `list` is not logged as a reference.
  const tags = await request(`${proxy.url}/v2/library/alpine/tags/list?ns=docker.io`);
  const tagsBody = await tags.body.text();
  assert.equal(tags.statusCode, 200);
  assert.equal(tags.headers['x-cache'], 'PASSTHROUGH');

  assert.deepEqual(
    lines.filter((l) => l.msg === 'request').map((l) => [l.method, l.status, l.upstream, l.name, 'reference' in l ? l.reference : 'none', l.cache, l.bytes]),
    [
      ['GET', 200, 'docker.io', 'library/alpine', SUBJECT, 'passthrough', index.length],
      ['HEAD', 200, 'docker.io', 'library/alpine', SUBJECT, 'passthrough', 0],
      ['GET', 200, 'docker.io', 'library/alpine', 'none', 'passthrough', Buffer.byteLength(tagsBody)],
    ],
  );
  const text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_cache_requests_total', { upstream: 'docker.io', kind: 'referrers', result: 'passthrough' }), 2);
  assert.equal(metric(text, 'ocicache_cache_requests_total', { upstream: 'docker.io', kind: 'tags', result: 'passthrough' }), 1);
  // Served bytes are blob and manifest bytes only.
  assert.equal(metric(text, 'ocicache_served_bytes_total', { upstream: 'docker.io' }), 0);
});

test('referrers are remembered per subject and filter and served STALE when the upstream cannot be asked; forgotten with their subject', async (t) => {
  const fake = await startFakeUpstream(t);
  const subject = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: `sha256:${'c'.repeat(64)}`, size: 2 }, layers: [] }));
  const subjectDigest = sha256(subject);
  const signatures = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: [{ mediaType: OCI_MANIFEST, digest: `sha256:${'d'.repeat(64)}`, size: 321, artifactType: 'application/vnd.dev.cosign.artifact.sig.v1+json' }] }));
  let up = true;
  fake.route(`/v2/team/app/referrers/${subjectDigest}`, (req, res) => {
    if (!up) return void req.socket.destroy();
    res.writeHead(200, { 'content-type': OCI_INDEX, 'content-length': String(signatures.length) }).end(signatures);
  });
  fake.route(`/v2/team/app/manifests/${subjectDigest}`, (req, res) => {
    if (!up) return void req.socket.destroy();
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'content-length': String(subject.length), 'docker-content-digest': subjectDigest }).end(req.method === 'HEAD' ? undefined : subject);
  });
  const proxy = await startProxy(t, { upstreams: [{ name: 'fake.example', url: fake.url, breakerFailures: 0 }], timeouts: { manifest: '1s' } });
  const referrers = (filter = ''): Promise<{ status: number; headers: Record<string, unknown>; body?: Buffer }> =>
    fetchBody(`${proxy.url}/v2/team/app/referrers/${subjectDigest}?ns=fake.example${filter}`);
  assert.equal((await fetchBody(`${proxy.url}/v2/team/app/manifests/${subjectDigest}?ns=fake.example`, { accept: OCI_MANIFEST })).status, 200);
  const fresh = await referrers();
  assert.deepEqual([fresh.status, fresh.headers['x-cache'], fresh.body], [200, 'PASSTHROUGH', signatures]);

  up = false;
  const stale = await referrers();
  assert.deepEqual([stale.status, stale.headers['x-cache'], stale.headers['content-type'], stale.body], [200, 'STALE', OCI_INDEX, signatures]);
  // Another filter was never asked: nothing to serve for it.
  assert.equal((await referrers('&artifactType=application%2Fspdx%2Bjson')).status, 503);

  // The subject's manifest dropped (as eviction drops it): its referrers go with it.
  proxy.app.services.db.dropManifest(subjectDigest);
  assert.equal((await referrers()).status, 503);
});

test('what clients ask for cannot grow the referrers memory: only for a cached subject, at most 16 filters each', async (t) => {
  const fake = await startFakeUpstream(t);
  const subject = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: 'application/vnd.oci.image.config.v1+json', digest: `sha256:${'e'.repeat(64)}`, size: 2 }, layers: [] }));
  const cached = sha256(subject);
  const uncached = `sha256:${'f'.repeat(64)}`;
  const empty = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_INDEX, manifests: [] }));
  let up = true;
  for (const d of [cached, uncached]) {
    fake.route(`/v2/team/app/referrers/${d}`, (req, res) => {
      if (!up) return void req.socket.destroy();
      res.writeHead(200, { 'content-type': OCI_INDEX, 'content-length': String(empty.length) }).end(empty);
    });
  }
  fake.route(`/v2/team/app/manifests/${cached}`, (req, res) => res.writeHead(200, { 'content-type': OCI_MANIFEST, 'content-length': String(subject.length), 'docker-content-digest': cached }).end(req.method === 'HEAD' ? undefined : subject));
  const proxy = await startProxy(t, { upstreams: [{ name: 'fake.example', url: fake.url, breakerFailures: 0 }], timeouts: { manifest: '1s' } });
  const referrers = (d: string, filter = ''): Promise<{ status: number; headers: Record<string, unknown> }> => fetchBody(`${proxy.url}/v2/team/app/referrers/${d}?ns=fake.example${filter}`);
  assert.equal((await fetchBody(`${proxy.url}/v2/team/app/manifests/${cached}?ns=fake.example`, { accept: OCI_MANIFEST })).status, 200);
  const filters = Array.from({ length: 20 }, (_, i) => `&artifactType=application%2Fx.test${i}`);
  for (const f of ['', ...filters]) assert.equal((await referrers(cached, f)).status, 200);
  assert.equal((await referrers(uncached)).status, 200);

  up = false;
  // The unfiltered list and the first 15 filters were remembered; the rest, and the uncached subject, were not.
  assert.equal((await referrers(cached)).headers['x-cache'], 'STALE');
  const remembered = [];
  for (const f of filters) remembered.push((await referrers(cached, f)).status);
  assert.deepEqual(remembered, [...Array(15).fill(200), ...Array(5).fill(503)]);
  assert.equal((await referrers(uncached)).status, 503);
});
