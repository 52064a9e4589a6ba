/**
 * Flaky and failing upstreams: resumed blob downloads, the circuit breaker, Retry-After, limits
 * on concurrency and rate, Docker Hub's rate-limit headers, offline mode.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import type { IncomingMessage, ServerResponse } from 'node:http';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { startDistribution } from './helpers/distribution.js';
import { until } from './helpers/tools.js';
import { blobHandler, startProxyWithFake, startTrap } from './helpers/fake-upstream.js';
import { blobFile, fetchBody, jsonBody, metric, metricsText, ociError, pullImage, startProxy, testClock, type Proxy } from './helpers/proxy.js';
import { image, OCI_CONFIG, OCI_MANIFEST, Pusher, randomLayer, sha256 } from './helpers/seed.js';

/** startProxyWithFake's options here: a stalled upstream is given up on after 300 ms. */
const quickIdle = { timeouts: { blobIdle: '300ms' } };

/** Serves a blob, honouring `Range: bytes=N-` unless told not to. */
function rangeBlob(data: Buffer, honourRange: boolean): (req: IncomingMessage, res: ServerResponse) => void {
  return (req, res) => {
    const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
    if (m && honourRange) {
      const from = Number(m[1]);
      res.writeHead(206, { 'content-length': String(data.length - from), 'content-range': `bytes ${from}-${data.length - 1}/${data.length}` });
      res.end(data.subarray(from));
      return;
    }
    blobHandler(data)(req, res);
  };
}

test('a broken blob download resumes and the client gets the whole, verified blob', async (t) => {
  const cases = [
    { what: 'reset mid-blob, upstream honours Range', fault: 'reset' as const, honourRange: true, how: 'range' },
    { what: 'upstream stalls (idle timeout), then honours Range', fault: 'stall' as const, honourRange: true, how: 'range' },
    { what: 'reset mid-blob, upstream ignores Range (200 from the start)', fault: 'reset' as const, honourRange: false, how: 'restart' },
    { what: 'reset mid-blob, the first reconnect gets a 503, the next one resumes', fault: 'reset' as const, honourRange: true, how: 'range', blip: true },
  ];
  for (const c of cases) {
    await t.test(c.what, async (t) => {
      const { fake, proxy } = await startProxyWithFake(t, {}, quickIdle);
      const data = randomBytes(3 * 1024 * 1024);
      const digest = sha256(data);
      const path = `/v2/flaky/repo/blobs/${digest}`;
      let calls = 0;
      fake.route(path, (req, res) => {
        const n = calls++;
        if (n === 0) return blobHandler(data, { cutAt: 1024 * 1024, how: c.fault })(req, res);
        if (n === 1 && c.blip) return void res.writeHead(503).end();
        rangeBlob(data, c.honourRange)(req, res);
      });
      const r = await fetchBody(`${proxy.url}${path}?ns=fake.example`);
      assert.equal(r.status, 200);
      assert.equal(r.aborted, undefined);
      assert.equal(sha256(r.body!), digest);
      const gets = fake.requests.filter((q) => q.method === 'GET' && q.url.startsWith(path));
      assert.equal(gets.length, c.blip ? 3 : 2);
      assert.equal(gets[0]!.headers.range, undefined);
      assert.match(String(gets.at(-1)!.headers.range), /^bytes=[1-9]\d*-$/, 'the resume asks for the bytes after those received');
      await until('blob committed', () => existsSync(blobFile(proxy.root, digest)));
      assert.equal(metric(await metricsText(proxy), 'ocicache_blob_resumes_total', { upstream: 'fake.example', how: c.how }), 1);
    });
  }
});

test('a blob download that keeps breaking gives up after blobRetries, caching nothing', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t, { blobRetries: 2 }, quickIdle);
  const data = randomBytes(2 * 1024 * 1024);
  const digest = sha256(data);
  const path = `/v2/flaky/repo/blobs/${digest}`;
  fake.route(path, blobHandler(data, { cutAt: 512 * 1024, how: 'reset' }));
  const r = await fetchBody(`${proxy.url}${path}?ns=fake.example`);
  assert.ok(r.aborted || r.body!.length < data.length, 'the client must not get a complete-looking body');
  await until('the fill to give up', async () => metric(await metricsText(proxy), 'ocicache_fill_failures_total', { upstream: 'fake.example' }) === 1);
  assert.equal(fake.count('GET', path), 3, 'first try and two resumes');
  assert.equal(existsSync(blobFile(proxy.root, digest)), false);
});

test('circuit breaker: opens after consecutive failures, serves cached tags, fails fast, probes after the cool-down', async (t) => {
  // tagTtl 0: every request asks the upstream. The cool-down passes by advancing the proxy's clock.
  const clock = testClock();
  const { fake, proxy } = await startProxyWithFake(t, { breakerFailures: 3, breakerCooldown: '1s', tagTtl: '0ms' }, { ...quickIdle, clock });
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: OCI_CONFIG, digest: sha256('{}'), size: 2 }, layers: [] }));
  const digest = sha256(manifest);
  let down = false;
  const serveManifest = (req: IncomingMessage, res: ServerResponse): void => {
    if (down) return void res.socket?.destroy();
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'docker-content-digest': digest, 'content-length': String(manifest.length) });
    res.end(req.method === 'HEAD' ? undefined : manifest);
  };
  fake.route('/v2/app/manifests/v1', serveManifest);
  fake.route(`/v2/app/manifests/${digest}`, serveManifest);
  fake.route(`/v2/app/blobs/${sha256('missing')}`, (_req, res) => res.socket?.destroy());
  const tagUrl = `${proxy.url}/v2/app/manifests/v1?ns=fake.example`;
  assert.equal((await fetchBody(tagUrl)).status, 200);

  down = true;
  for (let i = 0; i < 3; i++) {
    const r = await fetchBody(tagUrl);
    assert.equal(r.status, 200, 'the cached tag is served while the upstream fails');
    assert.equal(r.headers['x-cache'], 'STALE');
  }
  const text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_upstream_breaker_state', { upstream: 'fake.example' }), 1, 'open');
  const before = fake.requests.length;
  const stale = await fetchBody(tagUrl);
  assert.equal(stale.status, 200);
  assert.equal(stale.headers['x-cache'], 'STALE');
  const uncached = await fetchBody(`${proxy.url}/v2/app/blobs/${sha256('missing')}?ns=fake.example`);
  assert.equal(uncached.status, 503);
  assert.equal(ociError(uncached).code, 'UNAVAILABLE');
  assert.match(ociError(uncached).message, /circuit open/);
  assert.equal(fake.requests.length, before, 'an open breaker sends nothing upstream');

  // Half-open: after the cool-down one probe goes out; it fails, so the breaker opens again.
  clock.advance(1100);
  assert.equal((await fetchBody(tagUrl)).headers['x-cache'], 'STALE');
  assert.equal(fake.requests.length, before + 1, 'one probe');
  assert.equal(metric(await metricsText(proxy), 'ocicache_upstream_breaker_state', { upstream: 'fake.example' }), 1);
  assert.equal((await fetchBody(tagUrl)).headers['x-cache'], 'STALE');
  assert.equal(fake.requests.length, before + 1, 'open again: no second probe');

  // The upstream recovers: the next probe closes the breaker.
  down = false;
  clock.advance(1100);
  assert.equal((await fetchBody(tagUrl)).headers['x-cache'], 'REVALIDATED');
  assert.equal(metric(await metricsText(proxy), 'ocicache_upstream_breaker_state', { upstream: 'fake.example' }), 0, 'closed');
});

test("a 429's Retry-After is honoured: nothing goes upstream until it passes, cached tags are still served", async (t) => {
  // tagTtl 0: every request asks the upstream. Retry-After passes by advancing the proxy's clock.
  const clock = testClock();
  const { fake, proxy } = await startProxyWithFake(t, { tagTtl: '0ms' }, { ...quickIdle, clock });
  const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: OCI_CONFIG, digest: sha256('{}'), size: 2 }, layers: [] }));
  const digest = sha256(manifest);
  let limited = false;
  const serve = (req: IncomingMessage, res: ServerResponse): void => {
    if (limited) return void res.writeHead(429, { 'retry-after': '2', 'content-type': 'application/json' }).end('{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}');
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'docker-content-digest': digest, 'ratelimit-limit': '100;w=21600', 'ratelimit-remaining': '76;w=21600' });
    res.end(req.method === 'HEAD' ? undefined : manifest);
  };
  fake.route('/v2/app/manifests/v1', serve);
  fake.route(`/v2/app/manifests/${digest}`, serve);
  const tagUrl = `${proxy.url}/v2/app/manifests/v1?ns=fake.example`;
  assert.equal((await fetchBody(tagUrl)).status, 200);
  let text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_upstream_ratelimit_limit', { upstream: 'fake.example' }), 100);
  assert.equal(metric(text, 'ocicache_upstream_ratelimit_remaining', { upstream: 'fake.example' }), 76);

  limited = true;
  const first = await fetchBody(tagUrl);
  assert.equal(first.status, 200);
  assert.equal(first.headers['x-cache'], 'STALE');
  const seen = fake.requests.length;
  for (let i = 0; i < 5; i++) assert.equal((await fetchBody(tagUrl)).headers['x-cache'], 'STALE');
  const blob = await fetchBody(`${proxy.url}/v2/app/blobs/${sha256('x')}?ns=fake.example`);
  assert.equal(blob.status, 429);
  assert.deepEqual(ociError(blob).code, 'TOOMANYREQUESTS');
  assert.match(String(blob.headers['retry-after']), /^[12]$/);
  assert.equal(fake.requests.length, seen, 'no request to the upstream before Retry-After passes');
  text = await metricsText(proxy);
  assert.equal(metric(text, 'ocicache_upstream_rate_limited_total', { upstream: 'fake.example' }), 1);
  assert.ok(metric(text, 'ocicache_upstream_refused_total', { upstream: 'fake.example', reason: 'retry_after' }) >= 6);

  limited = false;
  clock.advance(2100);
  assert.equal((await fetchBody(tagUrl)).headers['x-cache'], 'REVALIDATED');
  assert.equal(fake.requests.length, seen + 1);
});

test('per-upstream limits: maxConcurrent requests in flight, maxRequestsPerSecond', async (t) => {
  await t.test('maxConcurrent: 2', async (t) => {
    const { fake, proxy } = await startProxyWithFake(t, { maxConcurrent: 2 }, { timeouts: { manifest: '10s', blobIdle: '10s' } });
    let inFlight = 0;
    let peak = 0;
    const blobs = Array.from({ length: 6 }, () => randomBytes(64 * 1024));
    for (const data of blobs) {
      fake.route(`/v2/app/blobs/${sha256(data)}`, (req, res) => {
        peak = Math.max(peak, ++inFlight);
        res.once('close', () => inFlight--);
        setTimeout(() => blobHandler(data)(req, res), 150);
      });
    }
    const results = await Promise.all(blobs.map((d) => fetchBody(`${proxy.url}/v2/app/blobs/${sha256(d)}?ns=fake.example`)));
    results.forEach((r, i) => assert.equal(sha256(r.body!), sha256(blobs[i]!)));
    assert.equal(peak, 2);
  });
  await t.test('maxRequestsPerSecond: 4', async (t) => {
    const { fake, proxy } = await startProxyWithFake(t, { maxRequestsPerSecond: 4 }, quickIdle);
    const at: number[] = [];
    for (let i = 0; i < 10; i++) {
      fake.route(`/v2/app/manifests/t${i}`, (_req, res) => {
        at.push(Date.now());
        res.writeHead(404, { 'content-type': 'application/json' }).end('{"errors":[{"code":"MANIFEST_UNKNOWN","message":"no"}]}');
      });
    }
    await Promise.all(Array.from({ length: 10 }, (_, i) => fetchBody(`${proxy.url}/v2/app/manifests/t${i}?ns=fake.example`)));
    assert.equal(at.length, 10);
    // A burst of one second's worth (4), then one every 250 ms: the 10th is at least 1.25 s after the first.
    assert.ok(at[9]! - at[0]! >= 1200, `10 requests spread over ${at[9]! - at[0]!} ms`);
  });
});

test('offline mode, global and per upstream, serves the cache and connects to nothing', async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const img = image({ 'hello.txt': Buffer.from('offline\n'), 'big.bin': randomLayer(256 * 1024) });
  await new Pusher({ url: registry.url }).pushImage('team/app', 'v1', img);
  const other = image({ 'other.txt': Buffer.from('never pulled\n') });
  await new Pusher({ url: registry.url }).pushImage('team/other', 'v1', other);

  const online = await startProxy(t, { upstreams: [{ name: 'docker.io', url: registry.url }] });
  /** The statuses of team/app:v1's manifest, config and layers. */
  const pull = async (proxy: Proxy, ns: string): Promise<number[]> => {
    const { manifest, blobs } = await pullImage(proxy.url, 'team/app', 'v1', ns);
    return [manifest, ...blobs].map((r) => r.status);
  };
  assert.deepEqual(await pull(online, 'docker.io'), [200, 200, 200, 200]);
  await online.app.close();

  for (const c of [
    { what: 'global offline: true', env: { OCICACHE_OFFLINE: 'true' }, upstream: {} },
    { what: 'per upstream offline: true', env: {}, upstream: { offline: true } },
  ]) {
    await t.test(c.what, async (t) => {
      // The upstream's address is now a listener that counts connections: there must be none.
      const trap = await startTrap(t, '127.0.0.1');
      const proxy = await startProxy(t, { root: online.root, env: c.env, upstreams: [{ name: 'docker.io', url: `http://${trap.host}`, tagTtl: '0ms', ...c.upstream }] });
      assert.deepEqual(await pull(proxy, 'docker.io'), [200, 200, 200, 200], 'cached content is served');
      const m = await fetchBody(`${proxy.url}/v2/team/app/manifests/v1?ns=docker.io`, { accept: OCI_MANIFEST });
      assert.equal(m.headers['x-cache'], 'STALE');
      const missing = await fetchBody(`${proxy.url}/v2/team/other/manifests/v1?ns=docker.io`);
      assert.equal(missing.status, 503);
      assert.deepEqual(jsonBody(missing), { errors: [{ code: 'UNAVAILABLE', message: 'upstream docker.io is offline: serving from the cache only' }] });
      assert.equal(metric(await metricsText(proxy), 'ocicache_upstream_offline', { upstream: 'docker.io' }), 1);
      await sleep(100);
      assert.equal(trap.connections, 0, 'no connection to the upstream');
    });
  }
});
