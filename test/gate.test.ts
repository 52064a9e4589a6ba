/**
 * The upstream Gate (src/upstream/gate.ts) with a test clock: the circuit breaker, a 429's
 * Retry-After (for one repository or the whole upstream, capped by maxRetryAfter), offline mode,
 * the concurrency queue and the request-rate pacing. No upstream and
 * no sleeping: time moves when the test says so (the clock; Node's mock timers for the queue
 * timeout and pacing, which wait with setTimeout).
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { setImmediate as tick } from 'node:timers/promises';
import { buildConfig } from '../src/core/config.js';
import { OciError } from '../src/core/errors.js';
import { Gate, type Permit } from '../src/upstream/gate.js';
import { Metrics } from '../src/telemetry/metrics.js';
import { metric, testClock, type TestClock } from './helpers/proxy.js';

/** A whole second, so HTTP dates (second resolution) line up with the clock. */
const START = Date.UTC(2030, 0, 1, 12, 0, 0);

function gate(upstream: Record<string, unknown> = {}, options: { offline?: boolean; queueTimeout?: number } = {}): { gate: Gate; clock: TestClock; metrics: Metrics } {
  const config = buildConfig({ storage: { root: '/nonexistent' }, upstreams: [{ name: 'fake.example', url: 'http://127.0.0.1:9', ...upstream }] }, {});
  const clock = testClock(START);
  const metrics = new Metrics();
  return { gate: new Gate(config.upstreams[0]!, options.offline ?? false, options.queueTimeout ?? 1000, metrics, clock), clock, metrics };
}

async function sample(metrics: Metrics, name: string, labels: Record<string, string> = {}): Promise<number> {
  return metric(await metrics.registry.metrics(), name, { upstream: 'fake.example', ...labels });
}

/** The error acquire() (for `repository`) refuses with, as code, status, message and headers. */
async function refusal(g: Gate, repository?: string): Promise<{ code: string; status: number; message: string; headers: Record<string, string> }> {
  try {
    const permit = await g.acquire(repository);
    permit.release();
  } catch (err) {
    assert.ok(err instanceof OciError, String(err));
    return { code: err.code, status: err.status, message: err.message, headers: err.headers };
  }
  assert.fail('acquire() was not refused');
}

/** One request (for `repository`) through the gate with the given outcome. */
async function call(g: Gate, outcome: 'ok' | 'failed' | 'cancelled', repository?: string): Promise<void> {
  const permit = await g.acquire(repository);
  permit.done(outcome);
  permit.release();
}

/** Whether a promise has settled by the next turn of the event loop. */
async function settled(p: Promise<unknown>): Promise<boolean> {
  let done = false;
  p.then(
    () => (done = true),
    () => (done = true),
  );
  await tick();
  return done;
}

test('breaker: opens after breakerFailures consecutive failures and refuses with Retry-After until the cool-down', async () => {
  const { gate: g, clock, metrics } = gate({ breakerFailures: 3, breakerCooldown: '10s' });
  await call(g, 'failed');
  await call(g, 'failed');
  await call(g, 'ok'); // a success in between starts the count again
  await call(g, 'failed');
  await call(g, 'failed');
  assert.equal(g.state, 'closed', 'two in a row are not three');
  assert.equal(await sample(metrics, 'ocicache_upstream_breaker_state'), 0);
  await call(g, 'failed');
  assert.equal(g.state, 'open');
  assert.equal(await sample(metrics, 'ocicache_upstream_breaker_state'), 1);

  for (const [elapsed, seconds] of [[0, 10], [2500, 8], [9000, 1], [9999, 1]] as const) {
    clock.advance(START + elapsed - clock()); // the breaker opened at START
    assert.deepEqual(await refusal(g), {
      code: 'UNAVAILABLE',
      status: 503,
      message: `upstream fake.example is failing: circuit open, next try in ${seconds}s`,
      headers: { 'retry-after': String(seconds) },
    }, `${elapsed} ms into the cool-down`);
  }
  assert.equal(await sample(metrics, 'ocicache_upstream_refused_total', { reason: 'breaker' }), 4);
});

test('breaker: after the cool-down exactly one probe goes out; its outcome closes or re-opens the breaker', async (t) => {
  for (const outcome of ['ok', 'failed'] as const) {
    await t.test(`probe ${outcome}`, async () => {
      const { gate: g, clock, metrics } = gate({ breakerFailures: 2, breakerCooldown: '30s' });
      await call(g, 'failed');
      await call(g, 'failed');
      assert.equal(g.state, 'open');
      clock.advance(30_000);
      const probe = await g.acquire();
      assert.equal(g.state, 'half-open');
      assert.equal(await sample(metrics, 'ocicache_upstream_breaker_state'), 2);
      assert.deepEqual(await refusal(g), {
        code: 'UNAVAILABLE',
        status: 503,
        message: 'upstream fake.example is failing: circuit half-open, a probe is under way',
        headers: {},
      });
      probe.done(outcome);
      probe.done(outcome === 'ok' ? 'failed' : 'ok'); // only the first report counts
      probe.release();
      if (outcome === 'ok') {
        assert.equal(g.state, 'closed');
        assert.equal(await sample(metrics, 'ocicache_upstream_breaker_state'), 0);
        await call(g, 'failed');
        assert.equal(g.state, 'closed', 'the failure count started again');
      } else {
        assert.equal(g.state, 'open');
        assert.equal(await sample(metrics, 'ocicache_upstream_breaker_state'), 1);
        assert.equal((await refusal(g)).message, 'upstream fake.example is failing: circuit open, next try in 30s', 'a full cool-down again');
        clock.advance(30_000);
        await call(g, 'ok');
        assert.equal(g.state, 'closed');
      }
    });
  }
});

test('breaker: breakerFailures 0 never opens', async () => {
  const { gate: g } = gate({ breakerFailures: 0 });
  for (let i = 0; i < 50; i++) await call(g, 'failed');
  assert.equal(g.state, 'closed');
});

test("an upstream-wide 429's Retry-After keeps the upstream quiet for that long (seconds or an HTTP date), at most maxRetryAfter", async (t) => {
  const date = (ms: number): string => new Date(START + ms).toUTCString();
  const cases = [
    { what: 'seconds', header: '5', seconds: 5 },
    { what: 'seconds with spaces', header: ' 12 ', seconds: 12 },
    { what: 'an HTTP date', header: date(7000), seconds: 7 },
    { what: 'no header: the default', header: undefined, seconds: 30 },
    { what: 'unparseable: the default', header: 'soon', seconds: 30 },
    { what: 'days: capped at maxRetryAfter (60s by default)', header: '999999', seconds: 60 },
    { what: 'a date far ahead: capped at maxRetryAfter', header: date(86_400_000), seconds: 60 },
    { what: 'zero', header: '0', seconds: 0 },
    { what: 'a date in the past', header: date(-60_000), seconds: 0 },
  ];
  for (const c of cases) {
    await t.test(c.what, async () => {
      const { gate: g, clock, metrics } = gate();
      g.rateLimited(c.header);
      assert.equal(await sample(metrics, 'ocicache_upstream_rate_limited_total'), 1);
      assert.equal(g.retryAfterSeconds, c.seconds);
      if (c.seconds > 0) {
        assert.deepEqual(await refusal(g), {
          code: 'TOOMANYREQUESTS',
          status: 429,
          message: `upstream fake.example asked to wait ${c.seconds}s (Retry-After)`,
          headers: { 'retry-after': String(c.seconds) },
        });
        clock.advance(c.seconds * 1000 - 1);
        assert.deepEqual((await refusal(g)).headers, { 'retry-after': '1' }, 'one millisecond before the end');
        assert.equal(await sample(metrics, 'ocicache_upstream_refused_total', { reason: 'retry_after' }), 2);
        clock.advance(1);
      }
      assert.equal(g.retryAfterSeconds, 0);
      await call(g, 'ok');
    });
  }
});

test('a shorter Retry-After does not cut a longer one short', async () => {
  const { gate: g, clock } = gate();
  g.rateLimited('60');
  clock.advance(10_000);
  g.rateLimited('1');
  assert.equal(g.retryAfterSeconds, 50);
  clock.advance(49_999);
  assert.equal((await refusal(g)).code, 'TOOMANYREQUESTS');
  clock.advance(1);
  await call(g, 'ok');
});

test("a repository's 429 keeps that repository quiet, not the others and not the upstream", async () => {
  const { gate: g, clock, metrics } = gate();
  assert.equal(g.rateLimited('30', 'team/app'), 30, 'the seconds requests for it now wait');
  assert.equal(g.retryAfterSeconds, 0, 'the upstream is not blocked (the status page says so)');
  assert.equal(g.retryAfterFor('team/app'), 30);
  assert.equal(g.retryAfterFor('team/other'), 0);
  assert.deepEqual(await refusal(g, 'team/app'), {
    code: 'TOOMANYREQUESTS',
    status: 429,
    message: 'upstream fake.example asked to wait 30s for team/app (Retry-After)',
    headers: { 'retry-after': '30' },
  });
  await call(g, 'ok', 'team/other');
  await call(g, 'ok');
  clock.advance(29_999);
  assert.deepEqual((await refusal(g, 'team/app')).headers, { 'retry-after': '1' });
  clock.advance(1);
  await call(g, 'ok', 'team/app');
  assert.equal(await sample(metrics, 'ocicache_upstream_rate_limited_total'), 1);
  assert.equal(await sample(metrics, 'ocicache_upstream_refused_total', { reason: 'retry_after' }), 2);
});

test('an upstream-wide 429 refuses every repository with the upstream-wide message; the longer of both waits counts', async () => {
  const { gate: g, clock } = gate();
  g.rateLimited('10', 'team/app');
  assert.equal(g.rateLimited('20'), 20);
  for (const repository of ['team/app', 'team/other', undefined]) {
    assert.deepEqual(await refusal(g, repository), {
      code: 'TOOMANYREQUESTS',
      status: 429,
      message: 'upstream fake.example asked to wait 20s (Retry-After)',
      headers: { 'retry-after': '20' },
    }, String(repository));
  }
  assert.equal(g.retryAfterFor('team/app'), 20);
  clock.advance(20_000);
  await call(g, 'ok', 'team/app');
  // The repository's own wait is no longer than the upstream's: both are over.
  g.rateLimited('40', 'team/app');
  g.rateLimited('5');
  assert.equal(g.retryAfterFor('team/app'), 40, "the repository's longer wait stands");
  assert.equal(g.retryAfterFor('team/other'), 5);
});

test('maxRetryAfter caps how long a 429 blocks, for a repository and for the upstream; 0 blocks nothing', async (t) => {
  const cases = [
    { maxRetryAfter: '1h', header: '999999', seconds: 3600 },
    { maxRetryAfter: '5s', header: '30', seconds: 5 },
    { maxRetryAfter: '5s', header: undefined, seconds: 5 },
    { maxRetryAfter: '2m', header: '30', seconds: 30 },
    { maxRetryAfter: '0s', header: '30', seconds: 0 },
  ];
  for (const c of cases) {
    for (const repository of ['team/app', undefined]) {
      await t.test(`maxRetryAfter ${c.maxRetryAfter}, Retry-After ${c.header}, ${repository ?? 'upstream-wide'}`, async () => {
        const { gate: g, clock } = gate({ maxRetryAfter: c.maxRetryAfter });
        assert.equal(g.rateLimited(c.header, repository), c.seconds);
        assert.equal(g.retryAfterFor('team/app'), c.seconds);
        if (c.seconds > 0) {
          assert.equal((await refusal(g, 'team/app')).headers['retry-after'], String(c.seconds));
          clock.advance(c.seconds * 1000);
        }
        await call(g, 'ok', 'team/app');
      });
    }
  }
});

test('maxRetryAfter: set in upstreamDefaults, overridden per upstream, validated with the key named', () => {
  const build = (defaults: Record<string, unknown>, upstream: Record<string, unknown> = {}) =>
    buildConfig({ storage: { root: '/nonexistent' }, upstreamDefaults: defaults, upstreams: [{ name: 'a.example', url: 'http://127.0.0.1:9', ...upstream }, { name: 'b.example', url: 'http://127.0.0.1:9' }] }, {});
  assert.deepEqual(build({}).upstreams.map((u) => u.maxRetryAfter), [60_000, 60_000], 'default 60s');
  assert.deepEqual(build({ maxRetryAfter: '10m' }, { maxRetryAfter: '0s' }).upstreams.map((u) => u.maxRetryAfter), [0, 600_000]);
  assert.throws(() => build({ maxRetryAfter: 'soon' }), { message: 'config: upstreamDefaults.maxRetryAfter: expected a duration such as 30s, 5m or 24h, got "soon"' });
  assert.throws(() => build({}, { maxRetryAfter: -1 }), { message: 'config: upstreams[0].maxRetryAfter: expected a duration such as 30s, 5m or 24h, got -1' });
});

test("a permit reported 'cancelled' neither counts for the breaker nor holds a half-open breaker's probe", async () => {
  const { gate: g, clock } = gate({ breakerFailures: 2, breakerCooldown: '10s' });
  await call(g, 'failed');
  await call(g, 'cancelled');
  assert.equal(g.state, 'closed');
  await call(g, 'failed');
  assert.equal(g.state, 'open', 'the cancelled request neither reset nor added to the count');
  clock.advance(10_000);
  await call(g, 'cancelled');
  assert.equal(g.state, 'half-open');
  const probe = await g.acquire(); // not refused: the cancelled probe let go
  probe.done('ok');
  probe.release();
  assert.equal(g.state, 'closed');
});

test('offline, globally or for the upstream, refuses everything', async (t) => {
  const cases = [
    { what: 'global offline', upstream: {}, offline: true },
    { what: 'upstream offline', upstream: { offline: true }, offline: false },
  ];
  for (const c of cases) {
    await t.test(c.what, async () => {
      const { gate: g, metrics } = gate(c.upstream, { offline: c.offline });
      assert.equal(g.offline, true);
      assert.equal(await sample(metrics, 'ocicache_upstream_offline'), 1);
      assert.deepEqual(await refusal(g), { code: 'UNAVAILABLE', status: 503, message: 'upstream fake.example is offline: serving from the cache only', headers: {} });
      assert.equal(await sample(metrics, 'ocicache_upstream_refused_total', { reason: 'offline' }), 1);
    });
  }
  const { gate: online, metrics } = gate();
  assert.equal(online.offline, false);
  assert.equal(await sample(metrics, 'ocicache_upstream_offline'), 0);
});

test('maxConcurrent: more requests wait in line for a slot, and give up after the queue timeout', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { gate: g, metrics } = gate({ maxConcurrent: 2 }, { queueTimeout: 5000 });
  const a = await g.acquire();
  const b = await g.acquire();
  const c = g.acquire();
  const d = g.acquire();
  assert.equal(await settled(c), false, 'two in flight: the third waits');
  a.release();
  a.release(); // idempotent: one slot freed, not two
  assert.equal(await settled(c), true, 'the third gets the freed slot');
  assert.equal(await settled(d), false, 'the fourth still waits');
  const third: Permit = await c;

  t.mock.timers.tick(4999);
  assert.equal(await settled(d), false);
  t.mock.timers.tick(1);
  await assert.rejects(d, (err: OciError) => {
    assert.deepEqual([err.code, err.status, err.message], ['UNAVAILABLE', 503, 'upstream fake.example: 2 requests in flight, waited too long for a slot']);
    return true;
  });
  assert.equal(await sample(metrics, 'ocicache_upstream_refused_total', { reason: 'queue_timeout' }), 1);

  b.release();
  third.release();
  const e = await g.acquire();
  const f = await g.acquire();
  e.release();
  f.release();
});

test('maxRequestsPerSecond: a burst of one second’s worth, then one per interval', async (t) => {
  t.mock.timers.enable({ apis: ['setTimeout'] });
  const { gate: g, clock } = gate({ maxRequestsPerSecond: 4 });
  // The burst: four at once.
  for (let i = 0; i < 4; i++) await call(g, 'ok');
  // The fifth waits one interval (250 ms).
  const fifth = call(g, 'ok');
  assert.equal(await settled(fifth), false);
  t.mock.timers.tick(249);
  assert.equal(await settled(fifth), false);
  t.mock.timers.tick(1);
  await fifth;
  // A second later by the clock the budget is back: four more at once.
  clock.advance(1250);
  for (let i = 0; i < 4; i++) assert.equal(await settled(call(g, 'ok')), true, `request ${i + 1} after a quiet second`);
  const next = call(g, 'ok');
  assert.equal(await settled(next), false);
  t.mock.timers.tick(250);
  await next;
});
