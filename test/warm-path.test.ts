/**
 * Manifest hits are answered before Fastify (http/warm-path.ts); everything else goes
 * through it. Both paths must be indistinguishable to a client and to an operator: the same
 * status, headers and body, the same request log line, the same metrics. Each request below is
 * sent once over HTTP (the warm path when it is a hit) and once through app.inject (always
 * Fastify), and the two are compared.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';
import { startDistribution } from './helpers/distribution.js';
import { fetchComplete, metric, metricsText, startProxy } from './helpers/proxy.js';
import { DOCKER_MANIFEST, image, multiArch, OCI_INDEX, OCI_MANIFEST, Pusher, sha256 } from './helpers/seed.js';
import { until } from './helpers/tools.js';

/** Headers only a real connection has. */
const CONNECTION_HEADERS = ['date', 'connection', 'keep-alive'];

type Line = Record<string, unknown>;

test('a manifest hit answers the same on the warm path as through Fastify: headers, body, log line, metrics', async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const app = image({ 'app.txt': Buffer.from('warm path\n') });
  const platforms = multiArch([{ os: 'linux', architecture: 'amd64' }, { os: 'linux', architecture: 'arm64' }], 'warm');
  const push = new Pusher({ url: registry.url });
  await push.pushImage('team/app', 'v1', app);
  await push.pushMultiArch('team/multi', 'v1', platforms);

  const lines: Line[] = [];
  const proxy = await startProxy(t, {
    defaultUpstream: 'docker.io',
    // ghcr.io: the same registry with tags that are never fresh, so a tag always asks the upstream.
    upstreams: [
      { name: 'docker.io', url: registry.url },
      { name: 'ghcr.io', url: registry.url, tagTtl: '0ms' },
    ],
    logger: { level: 'info', stream: { write: (s: string) => lines.push(JSON.parse(s) as Line) } },
  });
  // Fill the cache: each manifest is a miss once.
  for (const path of ['/v2/team/app/manifests/v1', '/v2/team/multi/manifests/v1']) {
    const res = await request(proxy.url + path, { headers: { accept: `${OCI_MANIFEST}, ${OCI_INDEX}` } });
    assert.equal(res.headers['x-cache'], 'MISS');
    await res.body.dump();
  }

  const { manifests } = proxy.app.services;
  const getManifest = t.mock.method(manifests, 'get');
  // cache: the log's field; the x-cache header is the same in capitals on a 200.
  const cases: Array<{ name: string; method: 'GET' | 'HEAD'; path: string; accept: string; warm: boolean; status: number; cache: string }> = [
    { name: 'GET by tag', method: 'GET', path: '/v2/team/app/manifests/v1', accept: OCI_MANIFEST, warm: true, status: 200, cache: 'hit' },
    { name: 'HEAD by tag', method: 'HEAD', path: '/v2/team/app/manifests/v1', accept: OCI_MANIFEST, warm: true, status: 200, cache: 'hit' },
    { name: 'GET by digest, ns', method: 'GET', path: `/v2/team/app/manifests/${app.digest}?ns=docker.io`, accept: OCI_MANIFEST, warm: true, status: 200, cache: 'hit' },
    { name: 'HEAD by digest, host prefix', method: 'HEAD', path: `/v2/docker.io/team/app/manifests/${app.digest}`, accept: OCI_MANIFEST, warm: true, status: 200, cache: 'hit' },
    { name: 'index by tag', method: 'GET', path: '/v2/team/multi/manifests/v1', accept: `${OCI_INDEX}, ${OCI_MANIFEST}`, warm: true, status: 200, cache: 'hit' },
    { name: 'a stale tag asks the upstream', method: 'GET', path: '/v2/team/app/manifests/v1?ns=ghcr.io', accept: OCI_MANIFEST, warm: false, status: 200, cache: 'revalidated' },
    // Asked upstream with the client's Accept; distribution does not convert OCI manifests.
    { name: 'a type the client did not accept', method: 'GET', path: '/v2/team/app/manifests/v1', accept: DOCKER_MANIFEST, warm: false, status: 404, cache: 'error' },
  ];
  // The stale tag must be cached once on ghcr.io before it can be revalidated.
  await (await request(`${proxy.url}/v2/team/app/manifests/v1?ns=ghcr.io`, { headers: { accept: OCI_MANIFEST } })).body.dump();

  for (const c of cases) {
    await t.test(c.name, async () => {
      const before = getManifest.mock.callCount();
      const first = lines.length;
      const viaHttp = await fetchComplete(proxy.url + c.path, { accept: c.accept }, c.method);
      assert.equal(getManifest.mock.callCount() - before, c.warm ? 0 : 1, c.warm ? 'answered on the warm path' : 'answered by Fastify');
      const injected = await proxy.app.inject({ method: c.method, url: c.path, headers: { accept: c.accept } });
      assert.equal(getManifest.mock.callCount() - before, c.warm ? 1 : 2, 'inject always goes through Fastify');

      for (const h of CONNECTION_HEADERS) {
        delete viaHttp.headers[h];
        delete injected.headers[h];
      }
      assert.equal(viaHttp.status, c.status);
      assert.equal(viaHttp.headers['x-cache'], c.status === 200 ? c.cache.toUpperCase() : undefined);
      assert.deepEqual([injected.statusCode, injected.headers], [viaHttp.status, viaHttp.headers]);
      assert.deepEqual(injected.rawPayload, viaHttp.body);
      if (c.method === 'HEAD') assert.equal(viaHttp.body.length, 0);

      const logged = lines.slice(first).filter((l) => l.msg === 'request');
      assert.equal(logged.length, 2);
      const [a, b] = logged.map(({ reqId, time, durationMs, ...rest }) => {
        assert.match(String(reqId), /^req-[0-9a-z]+$/);
        assert.equal(typeof time, 'number');
        assert.equal(typeof durationMs, 'number');
        return rest;
      });
      assert.deepEqual(a, b);
      assert.deepEqual(a, {
        level: 30,
        pid: process.pid,
        hostname: a!.hostname,
        method: c.method,
        url: c.path,
        status: c.status,
        // The audit field: both paths find the same client address (light-my-request's is 127.0.0.1 too).
        client: '127.0.0.1',
        upstream: c.path.includes('ghcr.io') ? 'ghcr.io' : 'docker.io',
        name: c.path.split('/manifests/')[0]!.replace(/^\/v2\/(docker\.io\/)?/, ''),
        reference: c.path.split('/manifests/')[1]!.split('?')[0],
        cache: c.cache,
        bytes: c.method === 'HEAD' ? 0 : viaHttp.body.length,
        msg: 'request',
      });
    });
  }

  // One sequence of request ids across both paths.
  const ids = lines.filter((l) => l.msg === 'request').map((l) => l.reqId);
  assert.equal(new Set(ids).size, ids.length, `request ids repeat: ${ids.join(' ')}`);
  // Both paths count: every hit logged is a hit in the metrics and the bytes served match.
  const requests = lines.filter((l) => l.msg === 'request' && l.upstream === 'docker.io');
  const text = await metricsText(proxy);
  const hits = requests.filter((l) => l.cache === 'hit');
  assert.equal(metric(text, 'ocicache_cache_requests_total', { upstream: 'docker.io', kind: 'manifest', result: 'hit' }), hits.length);
  assert.equal(
    metric(text, 'ocicache_served_bytes_total', { upstream: 'docker.io', source: 'cache' }),
    hits.reduce((n, l) => n + Number(l.bytes), 0),
  );
  assert.equal(metric(text, 'ocicache_http_request_duration_seconds_count', { kind: 'manifest', method: 'HEAD', status: '200' }), 4);
});

test('shutdown waits for a manifest hit still being sent, and logs it once it was', async (t) => {
  const lines: Line[] = [];
  // Never dialled: the manifest is in the index with a fresh tag.
  const proxy = await startProxy(t, {
    upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:9' }],
    logger: { level: 'info', stream: { write: (s: string) => lines.push(JSON.parse(s) as Line) } },
  });
  // Far more than the socket buffers take while the client does not read.
  const body = Buffer.alloc(32 * 1024 * 1024, ' ');
  proxy.app.services.db.putManifest({ digest: sha256(body), mediaType: OCI_MANIFEST, body }, [], 'docker.io', 'big/app', 'v1', Date.now());
  const socket = connect(Number(new URL(proxy.url).port), '127.0.0.1');
  t.after(() => socket.destroy());
  socket.pause();
  socket.write('GET /v2/big/app/manifests/v1?ns=docker.io HTTP/1.1\r\nhost: cache\r\naccept: */*\r\n\r\n');
  // The response is under way once its first bytes arrive; then the client stops reading.
  let received = 0;
  await new Promise<void>((resolve) => {
    socket.once('data', (chunk: Buffer) => {
      received += chunk.length;
      socket.pause();
      resolve();
    });
    socket.resume();
  });
  let drained = false;
  const drain = proxy.app.drain(20_000).then(() => (drained = true));
  await sleep(500);
  assert.equal(drained, false, 'drain returned while the response was still being sent');
  assert.deepEqual(lines.filter((l) => l.msg === 'request'), [], 'logged before it was sent');

  socket.on('data', (chunk: Buffer) => (received += chunk.length));
  socket.resume();
  await drain;
  await until('the whole response and its log line', () => received > body.length && lines.some((l) => l.msg === 'request'));
  assert.ok(received > body.length, `received ${received} bytes`);
  const logged = lines.filter((l) => l.msg === 'request');
  assert.deepEqual(logged.map((l) => [l.status, l.cache, l.bytes]), [[200, 'hit', body.length]]);
});
