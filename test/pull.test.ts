/**
 * Pulling through ocicache from real upstreams: distribution registries seeded by the test,
 * configured as docker.io and ghcr.io, so every routing mode and cache path runs for real.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { startDistribution } from './helpers/distribution.js';
import { fetchComplete, jsonBody, metric, metricsText, ociError, startProxy } from './helpers/proxy.js';
import { artifact, DOCKER_MANIFEST, FULL_ACCEPT, image, multiArch, OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST, Pusher, randomLayer, sha256 } from './helpers/seed.js';

const WASM_CONFIG = 'application/vnd.wasm.config.v1+json';
const WASM_LAYER = 'application/vnd.wasm.content.layer.v1+wasm';

test('pull through two real upstreams', async (t) => {
  const hub = await startDistribution(t);
  const ghcr = await startDistribution(t);
  if (!hub || !ghcr) return;
  const hubPush = new Pusher({ url: hub.url });
  const ghcrPush = new Pusher({ url: ghcr.url });

  const alpine = multiArch([{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }], 'alpine');
  await hubPush.pushMultiArch('library/alpine', '3.20', alpine);
  // Same repository name and tag on two upstreams, different content.
  const hubApp = image({ 'who.txt': Buffer.from('docker.io team/app\n') });
  const ghcrApp = image({ 'who.txt': Buffer.from('ghcr.io team/app\n') });
  await hubPush.pushImage('team/app', 'v1', hubApp);
  await ghcrPush.pushImage('team/app', 'v1', ghcrApp);
  const bigLayer = randomLayer(64 * 1024 * 1024);
  const bigImage = artifact(OCI_CONFIG, Buffer.from('{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'), [[OCI_LAYER_TAR, bigLayer]]);
  await hubPush.pushImage('big/layer', 'latest', bigImage);
  const wasm = artifact(WASM_CONFIG, Buffer.from('{"architecture":"wasm","os":"wasip1"}'), [[WASM_LAYER, Buffer.from('\0asm\x01\0\0\0 a wasm module')]]);
  await hubPush.pushImage('wasm/hello', 'v1', wasm);
  for (const tag of ['a1', 'b2', 'c3', 'd4', 'e5']) await hubPush.pushImage('team/tags', tag, image({ [`${tag}.txt`]: Buffer.from(tag) }));

  const proxy = await startProxy(t, {
    defaultUpstream: 'docker.io',
    upstreams: [
      { name: 'docker.io', url: hub.url, aliases: ['index.docker.io', 'registry-1.docker.io'], dockerHubLibrary: true },
      { name: 'ghcr.io', url: ghcr.url },
    ],
  });
  const P = proxy.url;
  const bigDigest = sha256(bigLayer);

  await t.test('GET and HEAD /v2/ answer 200 {} with the API version header', async () => {
    for (const method of ['GET', 'HEAD'] as const) {
      const r = await fetchComplete(`${P}/v2/`, {}, method);
      assert.equal(r.status, 200);
      assert.equal(r.headers['docker-distribution-api-version'], 'registry/2.0');
      assert.equal(r.body.toString(), method === 'GET' ? '{}' : '');
    }
  });

  await t.test('a multi-arch index by tag: exact bytes and complete headers on GET and HEAD', async () => {
    const url = `${P}/v2/library/alpine/manifests/3.20?ns=docker.io`;
    const g = await fetchComplete(url, { accept: FULL_ACCEPT });
    assert.equal(g.status, 200);
    assert.deepEqual(g.body, alpine.index);
    assert.equal(g.headers['content-type'], OCI_INDEX);
    assert.equal(g.headers['docker-content-digest'], alpine.digest);
    assert.equal(g.headers['content-length'], String(alpine.index.length));
    assert.equal(g.headers['oci-namespace'], 'docker.io');
    assert.equal(g.headers['content-encoding'], undefined);
    const h = await fetchComplete(url, { accept: FULL_ACCEPT }, 'HEAD');
    assert.equal(h.status, 200);
    assert.equal(h.body.length, 0);
    for (const k of ['content-type', 'content-length', 'docker-content-digest', 'oci-namespace']) assert.equal(h.headers[k], g.headers[k], k);
    assert.equal(h.headers['x-cache'], 'HIT');
    for (const img of alpine.images) {
      const m = await fetchComplete(`${P}/v2/library/alpine/manifests/${img.digest}?ns=docker.io`, { accept: `${OCI_MANIFEST}, */*` });
      assert.equal(m.status, 200);
      assert.deepEqual(m.body, img.manifest);
      for (const b of img.blobs) {
        const r = await fetchComplete(`${P}/v2/library/alpine/blobs/${b.descriptor.digest}?ns=docker.io`);
        assert.equal(r.status, 200);
        assert.deepEqual(r.body, b.data);
        assert.equal(r.headers['docker-content-digest'], b.descriptor.digest);
      }
    }
  });

  await t.test('every way of naming the upstream reaches the same content', async () => {
    const paths = [
      '/v2/library/alpine/manifests/3.20?ns=docker.io', // containerd mirror
      '/v2/library/alpine/manifests/3.20?ns=index.docker.io', // alias
      '/v2/alpine/manifests/3.20?ns=docker.io', // one segment gets library/
      '/v2/docker.io/library/alpine/manifests/3.20', // podman/CRI-O prefix mirror
      '/v2/docker.io/library/alpine/manifests/3.20?ns=docker.io', // containerd override_path
      '/docker.io/v2/library/alpine/manifests/3.20?ns=docker.io', // containerd host URL with a path
      '/docker.io/library/alpine/manifests/3.20?ns=docker.io', // k3s endpoint with a path (no /v2)
      '/v2/library/alpine/manifests/3.20', // Docker registry-mirrors: the default upstream
    ];
    for (const path of paths) {
      const r = await fetchComplete(`${P}${path}`, { accept: FULL_ACCEPT });
      assert.equal(r.status, 200, path);
      assert.equal(r.headers['docker-content-digest'], alpine.digest, path);
      assert.equal(r.headers['oci-namespace'], 'docker.io', path);
    }
  });

  await t.test('the same name on two upstreams is never confused, cold or warm, in any order', async () => {
    for (let round = 0; round < 2; round++) {
      for (const [ns, img] of [['ghcr.io', ghcrApp], ['docker.io', hubApp]] as const) {
        const r = await fetchComplete(`${P}/v2/team/app/manifests/v1?ns=${ns}`, { accept: FULL_ACCEPT });
        assert.equal(r.status, 200);
        assert.equal(r.headers['docker-content-digest'], img.digest, `${ns} round ${round}`);
        assert.deepEqual(r.body, img.manifest);
        assert.equal(r.headers['x-cache'], round === 0 ? 'MISS' : 'HIT');
        const prefixed = await fetchComplete(`${P}/v2/${ns}/team/app/manifests/v1`, { accept: FULL_ACCEPT });
        assert.equal(prefixed.headers['docker-content-digest'], img.digest);
      }
    }
    // docker.io's manifest is cached, but ghcr.io never had it: asked under ghcr.io, the cache checks first.
    const cross = await fetchComplete(`${P}/v2/team/app/manifests/${hubApp.digest}?ns=ghcr.io`, { accept: FULL_ACCEPT });
    assert.equal(cross.status, 404);
    assert.equal(ociError(cross).code, 'MANIFEST_UNKNOWN');
  });

  await t.test('a 64 MiB layer streams whole, then from disk, with ranges', async () => {
    const url = `${P}/v2/big/layer/blobs/${bigDigest}?ns=docker.io`;
    const ranged = await fetchComplete(url, { range: 'bytes=1000-1999' });
    assert.equal(ranged.status, 206);
    assert.equal(ranged.headers['content-range'], `bytes 1000-1999/${bigLayer.length}`);
    assert.deepEqual(ranged.body, bigLayer.subarray(1000, 2000));
    const full = await fetchComplete(url);
    assert.equal(full.status, 200);
    assert.equal(full.headers['content-length'], String(bigLayer.length));
    assert.equal(sha256(full.body), bigDigest);
    const suffix = await fetchComplete(url, { range: 'bytes=-10' });
    assert.equal(suffix.status, 206);
    assert.deepEqual(suffix.body, bigLayer.subarray(bigLayer.length - 10));
    const open = await fetchComplete(url, { range: `bytes=${bigLayer.length - 5}-` });
    assert.deepEqual(open.body, bigLayer.subarray(bigLayer.length - 5));
    const bad = await fetchComplete(url, { range: `bytes=${bigLayer.length}-` });
    assert.equal(bad.status, 416);
    assert.equal(bad.headers['content-range'], `bytes */${bigLayer.length}`);
    assert.equal(ociError(bad).code, 'RANGE_INVALID');
    const gets = hub.accessLog.filter((l) => l.startsWith(`GET /v2/big/layer/blobs/${bigDigest}`));
    assert.equal(gets.length, 1, `one upstream GET for all of that, saw ${gets.join('; ')}`);
  });

  await t.test('HEAD of a cold blob asks upstream with HEAD and downloads nothing', async () => {
    const cold = image({ 'cold.txt': Buffer.from('never downloaded by a HEAD') });
    await hubPush.pushImage('head/only', 'v1', cold);
    const b = cold.blobs[1]!;
    const h = await fetchComplete(`${P}/v2/head/only/blobs/${b.descriptor.digest}?ns=docker.io`, {}, 'HEAD');
    assert.equal(h.status, 200);
    assert.equal(h.headers['content-length'], String(b.data.length));
    assert.equal(h.headers['docker-content-digest'], b.descriptor.digest);
    assert.equal(hub.accessLog.filter((l) => l.startsWith(`GET /v2/head/only/blobs/`)).length, 0);
    assert.equal(existsSync(join(proxy.root, 'blobs', 'sha256', b.descriptor.digest.slice(7, 9), b.descriptor.digest.slice(7))), false);
  });

  await t.test('32 concurrent requests for one cold blob make one upstream GET', async () => {
    const img = image({ 'herd.bin': Buffer.alloc(8 * 1024 * 1024, 7) });
    await hubPush.pushImage('herd/image', 'v1', img);
    const b = img.blobs[1]!;
    const bodies = await Promise.all(Array.from({ length: 32 }, () => fetchComplete(`${P}/v2/herd/image/blobs/${b.descriptor.digest}?ns=docker.io`)));
    for (const r of bodies) {
      assert.equal(r.status, 200);
      assert.equal(sha256(r.body), b.descriptor.digest);
    }
    const gets = hub.accessLog.filter((l) => l.startsWith(`GET /v2/herd/image/blobs/${b.descriptor.digest}`));
    assert.equal(gets.length, 1);
  });

  await t.test('an OCI artifact with wasm media types passes through untouched', async () => {
    const m = await fetchComplete(`${P}/v2/wasm/hello/manifests/v1?ns=docker.io`, { accept: OCI_MANIFEST });
    assert.equal(m.status, 200);
    assert.deepEqual(m.body, wasm.manifest);
    const parsed = jsonBody(m);
    assert.equal(parsed.config.mediaType, WASM_CONFIG);
    assert.equal(parsed.layers[0].mediaType, WASM_LAYER);
    for (const b of wasm.blobs) {
      const r = await fetchComplete(`${P}/v2/wasm/hello/blobs/${b.descriptor.digest}?ns=docker.io`);
      assert.deepEqual(r.body, b.data);
    }
  });

  await t.test('a client whose Accept lacks the cached type is not handed it', async () => {
    // Cached as an OCI index; a schema2-only client gets what the upstream gives it: distribution says 404.
    const r = await fetchComplete(`${P}/v2/library/alpine/manifests/3.20?ns=docker.io`, { accept: DOCKER_MANIFEST });
    assert.notEqual(r.headers['content-type'], OCI_INDEX);
    assert.equal(r.status, 404);
    const any = await fetchComplete(`${P}/v2/library/alpine/manifests/3.20?ns=docker.io`, { accept: '*/*' });
    assert.equal(any.headers['docker-content-digest'], alpine.digest);
  });

  await t.test('tags/list pages with n, last and a Link in the client\'s own path shape', async () => {
    const first = await fetchComplete(`${P}/v2/team/tags/tags/list?n=2&ns=docker.io`);
    assert.equal(first.status, 200);
    assert.deepEqual(jsonBody(first), { name: 'team/tags', tags: ['a1', 'b2'] });
    assert.equal(first.headers.link, '</v2/team/tags/tags/list?n=2&last=b2&ns=docker.io>; rel="next"');
    assert.equal(first.headers['x-cache'], 'PASSTHROUGH');
    const next = await fetchComplete(`${P}/v2/team/tags/tags/list?n=2&last=b2&ns=docker.io`);
    assert.deepEqual(jsonBody(next).tags, ['c3', 'd4']);
    const prefixed = await fetchComplete(`${P}/v2/docker.io/team/tags/tags/list?n=4`);
    assert.equal(prefixed.headers.link, '</v2/docker.io/team/tags/tags/list?n=4&last=d4>; rel="next"');
    const all = await fetchComplete(`${P}/v2/team/tags/tags/list?ns=docker.io`);
    assert.deepEqual(jsonBody(all).tags, ['a1', 'b2', 'c3', 'd4', 'e5']);
    assert.equal(all.headers.link, undefined);
  });

  await t.test('referrers: the upstream\'s 404 stays a 404 (clients fall back to tag schema)', async () => {
    const r = await fetchComplete(`${P}/v2/library/alpine/referrers/${alpine.digest}?ns=docker.io`);
    assert.equal(r.status, 404);
    assert.ok(ociError(r).code.endsWith('_UNKNOWN'));
  });

  await t.test('metrics count hits and misses by upstream, with no repository label', async () => {
    const text = await metricsText(proxy);
    assert.ok(metric(text, 'ocicache_cache_requests_total', { upstream: 'docker.io', kind: 'blob', result: 'hit' }) > 0);
    assert.ok(metric(text, 'ocicache_cache_requests_total', { upstream: 'ghcr.io', kind: 'manifest', result: 'miss' }) > 0);
    assert.ok(metric(text, 'ocicache_served_bytes_total', { upstream: 'docker.io', source: 'cache' }) > 0);
    assert.ok(metric(text, 'ocicache_served_bytes_total', { upstream: 'docker.io' }) >= bigLayer.length);
    assert.ok(metric(text, 'ocicache_upstream_requests_total', { upstream: 'docker.io', kind: 'blob', status: '200' }) > 0);
    // The four tag lists above, each asked of the upstream.
    assert.equal(metric(text, 'ocicache_cache_requests_total', { upstream: 'docker.io', kind: 'tags', result: 'passthrough' }), 4);
    assert.doesNotMatch(text, /name="team\/app"|library\/alpine/);
  });

  await t.test('with the upstream gone, cached content is still served from disk', async () => {
    await hub.stop();
    const m = await fetchComplete(`${P}/v2/library/alpine/manifests/${alpine.digest}?ns=docker.io`, { accept: FULL_ACCEPT });
    assert.equal(m.status, 200);
    assert.equal(m.headers['x-cache'], 'HIT');
    const b = await fetchComplete(`${P}/v2/big/layer/blobs/${bigDigest}?ns=docker.io`, { range: 'bytes=0-15' });
    assert.deepEqual(b.body, bigLayer.subarray(0, 16));
    const tag = await fetchComplete(`${P}/v2/library/alpine/manifests/3.20?ns=docker.io`, { accept: FULL_ACCEPT });
    assert.equal(tag.status, 200);
    const cold = await fetchComplete(`${P}/v2/never/seen/manifests/v1?ns=docker.io`);
    assert.equal(cold.status, 503);
    assert.equal(ociError(cold).code, 'UNAVAILABLE');
    const hex = bigDigest.slice(7);
    assert.equal(createHash('sha256').update(bigLayer).digest('hex'), hex);
    assert.ok(readdirSync(join(proxy.root, 'blobs', 'sha256', hex.slice(0, 2))).includes(hex));
    assert.deepEqual(readdirSync(join(proxy.root, 'tmp')), []);
  });
});
