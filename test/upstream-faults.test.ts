/**
 * Hostile and limited upstreams, from the client's side: bodies trickled or cut mid-way, oversize
 * answers, 429s for one repository or for the whole upstream, and upstream 404s remembered for
 * cache.notFoundTtl. The faults come from the fake upstream; the 404 memory is counted on the
 * real registry's access log. Time moves with the proxy's test clock where the code decides by it.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';
import { buildConfig } from '../src/core/config.js';
import { MAX_MANIFEST_BYTES } from '../src/core/media-types.js';
import { Metrics } from '../src/telemetry/metrics.js';
import { UpstreamClient } from '../src/upstream/client.js';
import { startDistribution } from './helpers/distribution.js';
import { startProxyWithFake, type FakeUpstream, type Handler } from './helpers/fake-upstream.js';
import { jsonBody, metric, metricsText, startProxy, testClock } from './helpers/proxy.js';
import { image, OCI_CONFIG, OCI_INDEX, OCI_MANIFEST, Pusher, sha256 } from './helpers/seed.js';
import { until } from './helpers/tools.js';

function manifest(label: string): Buffer {
  return Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: OCI_MANIFEST, config: { mediaType: OCI_CONFIG, digest: sha256('{}'), size: 2 }, layers: [], annotations: { label } }));
}

/** Serves a manifest whole (no body for a HEAD). */
function serve(body: Buffer, type = OCI_MANIFEST): Handler {
  return (req, res) => {
    res.writeHead(200, { 'content-type': type, 'docker-content-digest': sha256(body), 'content-length': String(body.length) });
    res.end(req.method === 'HEAD' ? undefined : body);
  };
}

/** Sends `body` one byte every 50 ms: never idle long enough for an idle timeout. `closed()`: the connection was let go. */
function trickle(body: Buffer, type = 'application/json'): { handler: Handler; closed: () => boolean } {
  let closed = false;
  const handler: Handler = (req, res) => {
    res.once('close', () => (closed = true));
    res.writeHead(200, { 'content-type': type, 'content-length': String(body.length) });
    if (req.method === 'HEAD') return void res.end();
    let at = 0;
    const timer = setInterval(() => (at < body.length ? res.write(body.subarray(at, ++at)) : res.end()), 50);
    res.once('close', () => clearInterval(timer));
  };
  return { handler, closed: () => closed };
}

/** Sends half of `body`, then resets the connection. */
function reset(body: Buffer, type = 'application/json'): Handler {
  return (_req, res) => {
    res.writeHead(200, { 'content-type': type, 'content-length': String(body.length) });
    res.write(body.subarray(0, body.length >> 1), () => setTimeout(() => res.socket?.destroy(), 20));
  };
}

/** A request to the proxy that fails the test if no answer comes within 5 s (long after timeouts.manifest, 1 s). */
async function ask(url: string, method: 'GET' | 'HEAD' = 'GET', headers: Record<string, string> = {}): Promise<{ status: number; headers: Record<string, unknown>; body: Buffer; ms: number }> {
  const started = Date.now();
  const res = await request(url, { method, headers, headersTimeout: 5000, bodyTimeout: 5000 });
  const body = Buffer.from(await res.body.arrayBuffer());
  return { status: res.statusCode, headers: res.headers, body, ms: Date.now() - started };
}

const error = (code: string, message: string, detail?: unknown): unknown => ({ errors: [{ code, message, ...(detail === undefined ? {} : { detail }) }] });
const TIMED_OUT = error('UNAVAILABLE', 'upstream fake.example timed out');
const UNREACHABLE = error('UNAVAILABLE', 'upstream fake.example is unreachable');
const DIGEST = sha256('not served by this test');

/** Where each kind of small exchange is asked for, at the proxy and at the upstream. */
const KINDS = [
  { kind: 'manifest', proxy: `/v2/slow/app/manifests/${DIGEST}`, upstream: `/v2/slow/app/manifests/${DIGEST}` },
  { kind: 'tag list', proxy: '/v2/slow/app/tags/list', upstream: '/v2/slow/app/tags/list' },
  { kind: 'referrers', proxy: `/v2/slow/app/referrers/${DIGEST}`, upstream: `/v2/slow/app/referrers/${DIGEST}` },
];

/** The upstream asks for a bearer token from `/token` on itself, then serves `path` with `then`. */
function withToken(fake: FakeUpstream, path: string, token: Handler, then: Handler): void {
  fake.route('/token', token);
  fake.route(path, (req, res) => {
    if (req.headers.authorization === 'Bearer t0k') return then(req, res);
    res.writeHead(401, { 'www-authenticate': `Bearer realm="${fake.url}/token",service="fake"` }).end();
  });
}

const TOKEN: Handler = (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"token":"t0k"}');

test('a trickled body is given up at timeouts.manifest in total, releasing the connection and the slot', async (t) => {
  const slow = (): ReturnType<typeof trickle> => trickle(Buffer.alloc(1000, 0x20));
  const cases: Array<{ what: string; proxy: string; setup: (fake: FakeUpstream) => () => boolean }> = [
    ...KINDS.map((k) => ({
      what: `${k.kind} body`,
      proxy: k.proxy,
      setup: (fake: FakeUpstream) => {
        const s = slow();
        fake.route(k.upstream, s.handler);
        return s.closed;
      },
    })),
    {
      what: 'token body',
      proxy: KINDS[0]!.proxy,
      setup: (fake) => {
        const s = trickle(Buffer.from(`{"token":"t0k"${' '.repeat(1000)}}`));
        withToken(fake, KINDS[0]!.upstream, s.handler, serve(manifest('x')));
        return s.closed;
      },
    },
    {
      what: 'two tries of a 401, each within the deadline, together over it',
      proxy: KINDS[0]!.proxy,
      setup: (fake) => {
        let closed = false;
        fake.route('/token', TOKEN);
        fake.route(KINDS[0]!.upstream, (req, res) => {
          if (req.headers.authorization !== 'Bearer t0k') {
            setTimeout(() => res.writeHead(401, { 'www-authenticate': `Bearer realm="${fake.url}/token",service="fake"` }).end(), 700);
            return;
          }
          res.once('close', () => (closed = true));
          setTimeout(() => serve(manifest('x'))(req, res), 700);
        });
        return () => closed;
      },
    },
  ];
  for (const c of cases) {
    await t.test(c.what, async (t) => {
      const { fake, proxy } = await startProxyWithFake(t, { maxConcurrent: 1 });
      const closed = c.setup(fake);
      const r = await ask(`${proxy.url}${c.proxy}?ns=fake.example`);
      assert.deepEqual([r.status, jsonBody(r)], [504, TIMED_OUT]);
      assert.ok(r.ms < 2500, `answered after ${r.ms} ms`);
      await until('the upstream connection to be let go', closed, 1000);
      // The only slot is free again: a healthy request goes out at once.
      fake.route('/v2/fine/app/tags/list', (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"name":"fine/app","tags":["a"]}'));
      const fine = await ask(`${proxy.url}/v2/fine/app/tags/list?ns=fake.example`);
      assert.deepEqual([fine.status, jsonBody(fine)], [200, { name: 'fine/app', tags: ['a'] }]);
    });
  }
});

test('a tag list or referrers request ends upstream when its client leaves, and the breaker does not count it', async (t) => {
  for (const k of KINDS.slice(1)) {
    await t.test(k.kind, async (t) => {
      // A deadline far away: only the client leaving can end the upstream request this soon.
      const { fake, proxy } = await startProxyWithFake(t, { maxConcurrent: 1, breakerFailures: 1 }, { timeouts: { manifest: '30s' } });
      const s = trickle(Buffer.alloc(1000, 0x20));
      fake.route(k.upstream, s.handler);
      const controller = new AbortController();
      const pending = request(`${proxy.url}${k.proxy}?ns=fake.example`, { signal: controller.signal }).catch(() => undefined);
      await until('the upstream request', () => fake.count('GET', k.upstream) === 1);
      controller.abort();
      await pending;
      await until('the upstream connection to be let go', s.closed, 2000);
      assert.equal(metric(await metricsText(proxy), 'ocicache_upstream_breaker_state', { upstream: 'fake.example' }), 0, 'closed');
      fake.route('/v2/fine/app/tags/list', (_req, res) => res.writeHead(200, { 'content-type': 'application/json' }).end('{"name":"fine/app","tags":[]}'));
      assert.equal((await ask(`${proxy.url}/v2/fine/app/tags/list?ns=fake.example`)).status, 200, 'the slot is free and the breaker closed');
    });
  }
});

test('a body cut mid-way is 503 UNAVAILABLE, never 500', async (t) => {
  const body = Buffer.alloc(2000, 0x20);
  const cases = [
    ...KINDS.map((k) => ({ what: `${k.kind} body`, proxy: k.proxy, setup: (fake: FakeUpstream) => fake.route(k.upstream, reset(body)) })),
    { what: 'token body', proxy: KINDS[0]!.proxy, setup: (fake: FakeUpstream) => withToken(fake, KINDS[0]!.upstream, reset(body), serve(manifest('x'))) },
  ];
  for (const c of cases) {
    await t.test(c.what, async (t) => {
      const { fake, proxy } = await startProxyWithFake(t);
      c.setup(fake);
      const r = await ask(`${proxy.url}${c.proxy}?ns=fake.example`);
      assert.deepEqual([r.status, jsonBody(r)], [503, UNREACHABLE]);
    });
  }
});

test('bodies cut or trickled count as failures for the breaker', async (t) => {
  for (const how of ['reset', 'trickle'] as const) {
    await t.test(how, async (t) => {
      const { fake, proxy } = await startProxyWithFake(t, { breakerFailures: 2, breakerCooldown: '30s' });
      const paths = [sha256('a'), sha256('b'), sha256('c')].map((d) => `/v2/slow/app/manifests/${d}`);
      for (const p of paths) fake.route(p, how === 'reset' ? reset(Buffer.alloc(2000, 0x20)) : trickle(Buffer.alloc(1000, 0x20)).handler);
      for (const p of paths.slice(0, 2)) assert.equal((await ask(`${proxy.url}${p}?ns=fake.example`)).status, how === 'reset' ? 503 : 504);
      const refused = await ask(`${proxy.url}${paths[2]}?ns=fake.example`);
      assert.deepEqual([refused.status, jsonBody(refused)], [503, error('UNAVAILABLE', 'upstream fake.example is failing: circuit open, next try in 30s')]);
      assert.equal(fake.count('GET', paths[2]!), 0, 'nothing sent while the breaker is open');
    });
  }
});

test('a cached tag past its TTL whose new manifest is cut mid-body is served STALE', async (t) => {
  const clock = testClock();
  const { fake, proxy } = await startProxyWithFake(t, { tagTtl: '1m' }, { clock });
  const [v1, v2] = [manifest('v1'), manifest('v2')];
  fake.route('/v2/app/manifests/latest', serve(v1));
  fake.route(`/v2/app/manifests/${sha256(v1)}`, serve(v1));
  const url = `${proxy.url}/v2/app/manifests/latest?ns=fake.example`;
  assert.deepEqual([(await ask(url)).status, (await ask(url)).headers['x-cache']], [200, 'HIT']);
  // The tag moves; fetching the new manifest breaks half-way.
  fake.route('/v2/app/manifests/latest', serve(v2));
  fake.route(`/v2/app/manifests/${sha256(v2)}`, reset(v2, OCI_MANIFEST));
  clock.advance(60_000);
  const r = await ask(url);
  assert.deepEqual([r.status, r.headers['x-cache'], r.body], [200, 'STALE', v1]);
  assert.equal(fake.count('GET', `/v2/app/manifests/${sha256(v2)}`), 1);
});

test('oversize upstream answers are 502: the upstream is at fault, not the client', async (t) => {
  const limit = MAX_MANIFEST_BYTES;
  const huge = Buffer.alloc(limit + 1, 0x20);
  const chunked: Handler = (_req, res) => {
    res.writeHead(200, { 'content-type': OCI_MANIFEST });
    res.write(huge.subarray(0, 1024 * 1024));
    res.end(huge.subarray(1024 * 1024));
  };
  const cases = [
    { what: 'manifest, announced', handler: serve(huge), at: KINDS[0]!, expected: error('MANIFEST_INVALID', `upstream fake.example sent a manifest larger than ${limit} bytes`, { size: limit + 1, limit }) },
    { what: 'manifest, chunked', handler: chunked, at: KINDS[0]!, expected: error('MANIFEST_INVALID', `upstream fake.example sent a manifest larger than ${limit} bytes`, { limit }) },
    { what: 'tag list', handler: serve(huge, 'application/json'), at: KINDS[1]!, expected: error('UNKNOWN', `upstream fake.example sent a tag list larger than ${limit} bytes`, { limit }) },
    { what: 'referrers', handler: serve(huge, OCI_INDEX), at: KINDS[2]!, expected: error('MANIFEST_INVALID', `upstream fake.example sent a referrers index larger than ${limit} bytes`, { limit }) },
  ];
  const { fake, proxy } = await startProxyWithFake(t);
  for (const c of cases) {
    await t.test(c.what, async () => {
      fake.route(c.at.upstream, c.handler);
      const r = await ask(`${proxy.url}${c.at.proxy}?ns=fake.example`);
      assert.deepEqual([r.status, jsonBody(r)], [502, c.expected]);
    });
  }
});

test('a 429 blocks its repository, or the whole upstream when the answer says so, for Retry-After capped at maxRetryAfter', async (t) => {
  const limited = (headers: Record<string, string>): Handler => (_req, res) =>
    res.writeHead(429, { 'content-type': 'application/json', ...headers }).end('{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}');
  const cases = [
    { what: 'a 429 for one repository', upstream: {}, setup: (fake: FakeUpstream, path: string) => fake.route(path, limited({ 'retry-after': '30' })), seconds: 30, wide: false },
    {
      what: 'Docker Hub\'s pull limit: ratelimit-remaining 0',
      upstream: {},
      setup: (fake: FakeUpstream, path: string) => fake.route(path, limited({ 'retry-after': '30', 'ratelimit-limit': '100;w=21600', 'ratelimit-remaining': '0;w=21600' })),
      seconds: 30,
      wide: true,
    },
    {
      what: 'a 429 with quota left (ratelimit-remaining 7): the repository only',
      upstream: {},
      setup: (fake: FakeUpstream, path: string) => fake.route(path, limited({ 'retry-after': '30', 'ratelimit-remaining': '7;w=21600' })),
      seconds: 30,
      wide: false,
    },
    { what: 'a 429 from the token endpoint', upstream: {}, setup: (fake: FakeUpstream, path: string) => withToken(fake, path, limited({ 'retry-after': '30' }), serve(manifest('a'))), seconds: 30, wide: true },
    { what: 'Retry-After: 3600, capped at the default 60s', upstream: {}, setup: (fake: FakeUpstream, path: string) => fake.route(path, limited({ 'retry-after': '3600' })), seconds: 60, wide: false },
    { what: 'maxRetryAfter: 5s', upstream: { maxRetryAfter: '5s' }, setup: (fake: FakeUpstream, path: string) => fake.route(path, limited({ 'retry-after': '3600' })), seconds: 5, wide: false },
  ];
  for (const c of cases) {
    await t.test(c.what, async (t) => {
      const clock = testClock();
      const { fake, proxy } = await startProxyWithFake(t, c.upstream, { clock });
      const a = `/v2/team/a/manifests/${sha256('a')}`;
      const b = manifest('b');
      const bPath = `/v2/team/b/manifests/${sha256(b)}`;
      c.setup(fake, a);
      fake.route(bPath, serve(b));
      const first = await ask(`${proxy.url}${a}?ns=fake.example`);
      assert.deepEqual([first.status, first.headers['retry-after'], jsonBody(first)], [429, String(c.seconds), error('TOOMANYREQUESTS', 'upstream fake.example is rate limiting')]);
      const asked = fake.requests.length;
      const again = await ask(`${proxy.url}${a}?ns=fake.example`);
      const wait = c.wide ? `upstream fake.example asked to wait ${c.seconds}s (Retry-After)` : `upstream fake.example asked to wait ${c.seconds}s for team/a (Retry-After)`;
      assert.deepEqual([again.status, again.headers['retry-after'], jsonBody(again)], [429, String(c.seconds), error('TOOMANYREQUESTS', wait)]);
      const other = await ask(`${proxy.url}${bPath}?ns=fake.example`);
      if (c.wide) {
        assert.deepEqual([other.status, jsonBody(other)], [429, error('TOOMANYREQUESTS', wait)]);
        assert.equal(fake.requests.length, asked, 'nothing goes upstream');
      } else {
        assert.deepEqual([other.status, other.body], [200, b], 'another repository is served');
        assert.equal(fake.requests.length, asked + 1);
      }
      const status = (await ask(proxy.url)).body.toString();
      assert.match(status, c.wide ? new RegExp(`class="limited">rate limited: waiting ${c.seconds}s<`) : /class="ok">ok</, 'the status page shows upstream-wide blocks');
      const text = await metricsText(proxy);
      assert.equal(metric(text, 'ocicache_upstream_rate_limited_total', { upstream: 'fake.example' }), 1);
      assert.equal(metric(text, 'ocicache_upstream_refused_total', { upstream: 'fake.example', reason: 'retry_after' }), c.wide ? 2 : 1);
      // Once the wait is over, the repository is asked again.
      clock.advance(c.seconds * 1000);
      const before = fake.requests.length;
      await ask(`${proxy.url}${a}?ns=fake.example`);
      assert.ok(fake.requests.length > before, 'asked upstream again');
    });
  }
});

test("an upstream's 404 is remembered for cache.notFoundTtl: a client looping on a missing reference costs one upstream request", async (t) => {
  const registry = await startDistribution(t);
  if (!registry) return;
  const pusher = new Pusher({ url: registry.url });
  await pusher.pushImage('team/app', 'v1', image({ 'a.txt': Buffer.from('a') }));
  const missing = sha256('missing');
  const MANIFEST_UNKNOWN = error('MANIFEST_UNKNOWN', 'manifest unknown');
  const BLOB_UNKNOWN = error('BLOB_UNKNOWN', 'blob unknown to registry');
  const cases = [
    { what: 'manifest by tag, GET and HEAD', path: '/v2/team/app/manifests/nope', body: MANIFEST_UNKNOWN },
    { what: 'manifest by digest, GET and HEAD', path: `/v2/team/app/manifests/${missing}`, body: MANIFEST_UNKNOWN },
    { what: 'blob, GET and HEAD', path: `/v2/team/app/blobs/${missing}`, body: BLOB_UNKNOWN },
    // distribution answers MANIFEST_UNKNOWN here, not NAME_UNKNOWN: the remembered answer is whatever the upstream said.
    { what: 'a repository the upstream does not know', path: `/v2/team/none/manifests/${missing}`, body: MANIFEST_UNKNOWN },
  ];
  const clock = testClock();
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: registry.url }], clock });
  const upstreamCount = (path: string): number => registry.accessLog.filter((l) => l.split(' ')[1]!.split('?')[0] === path).length;
  for (const c of cases) {
    await t.test(c.what, async () => {
      const at = `${proxy.url}${c.path}?ns=docker.io`;
      for (const method of ['GET', 'GET', 'HEAD', 'GET', 'HEAD'] as const) {
        const r = await ask(at, method);
        assert.equal(r.status, 404, method);
        if (method === 'GET') assert.deepEqual(jsonBody(r), c.body);
      }
      await until('the upstream request in the access log', () => upstreamCount(c.path) === 1);
      await sleep(100);
      assert.equal(upstreamCount(c.path), 1, 'one upstream request for five answers');
      clock.advance(30_000); // the default notFoundTtl
      assert.deepEqual(jsonBody(await ask(at)), c.body);
      await until('the upstream asked again once notFoundTtl has passed', () => upstreamCount(c.path) === 2);
    });
  }
  assert.equal(metric(await metricsText(proxy), 'ocicache_upstream_refused_total', { upstream: 'docker.io', reason: 'not_found_cached' }), 4 * cases.length);

  await t.test('a tag pushed after its 404 is served once notFoundTtl has passed', async () => {
    const at = `${proxy.url}/v2/team/app/manifests/late?ns=docker.io`;
    assert.equal((await ask(at)).status, 404);
    await pusher.pushImage('team/app', 'late', image({ 'late.txt': Buffer.from('late') }));
    assert.equal((await ask(at)).status, 404, 'remembered');
    clock.advance(29_999);
    assert.equal((await ask(at)).status, 404, 'still remembered');
    clock.advance(1);
    assert.equal((await ask(at)).status, 200);
  });

  await t.test('notFoundTtl 0 remembers nothing', async (t) => {
    const uncached = await startProxy(t, { upstreams: [{ name: 'docker.io', url: registry.url }], cache: { notFoundTtl: '0s' } });
    const path = '/v2/team/app/manifests/never';
    for (let i = 0; i < 3; i++) assert.equal((await ask(`${uncached.url}${path}?ns=docker.io`)).status, 404);
    await until('three upstream requests', () => upstreamCount(path) === 3);
  });
});

test('a successful answer forgets a remembered 404 for the same key', async (t) => {
  const { fake } = await startProxyWithFake(t);
  const config = buildConfig({ storage: { root: '/nonexistent' }, upstreams: [{ name: 'fake.example', url: fake.url }] }, {});
  const client = new UpstreamClient(config, new Metrics(), testClock());
  t.after(() => client.close());
  const target = { upstream: config.upstreams[0]!, name: 'team/app' };
  const body = manifest('v1');
  let release = (): void => undefined;
  let found = false;
  fake.route('/v2/team/app/manifests/v1', (req, res) => {
    if (req.method === 'HEAD') return found ? serve(body)(req, res) : void res.writeHead(404).end();
    // The GET was sent before the 404 and answers after it: the tag exists after all.
    release = () => serve(body)(req, res);
  });
  const get = client.getManifest(target, 'v1');
  await until('the GET upstream', () => fake.count('GET', '/v2/team/app/manifests/v1') === 1);
  await assert.rejects(client.headManifest(target, 'v1'), { code: 'MANIFEST_UNKNOWN' });
  await assert.rejects(client.headManifest(target, 'v1'), { code: 'MANIFEST_UNKNOWN' });
  assert.equal(fake.count('HEAD', '/v2/team/app/manifests/v1'), 1, 'the second 404 was remembered');
  release();
  assert.deepEqual((await get).body, body);
  found = true;
  assert.equal((await client.headManifest(target, 'v1')).digest, sha256(body), 'asked again');
  assert.equal(fake.count('HEAD', '/v2/team/app/manifests/v1'), 2);
});

test('cache.notFoundTtl: a duration, 30s by default, validated with the key named', () => {
  const build = (cache: Record<string, unknown>) => buildConfig({ storage: { root: '/nonexistent' }, cache, upstreams: [{ name: 'a.example', url: 'http://127.0.0.1:9' }] }, {});
  assert.equal(build({}).cache.notFoundTtl, 30_000);
  assert.equal(build({ notFoundTtl: '0s' }).cache.notFoundTtl, 0);
  assert.throws(() => build({ notFoundTtl: 'briefly' }), { message: 'config: cache.notFoundTtl: expected a duration such as 30s, 5m or 24h, got "briefly"' });
});
