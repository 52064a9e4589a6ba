/**
 * The upstream Gate (src/upstream/gate.ts) with a test clock: the circuit breaker, a 429's
 * Retry-After, offline mode, the concurrency queue and the request-rate pacing. No upstream and
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

/** The error acquire() refuses with, as code, status, message and headers. */
async function refusal(g: Gate): Promise<{ code: string; status: number; message: string; headers: Record<string, string> }> {
  try {
    const permit = await g.acquire();
    permit.release();
  } catch (err) {
    assert.ok(err instanceof OciError, String(err));
    return { code: err.code, status: err.status, message: err.message, headers: err.headers };
  }
  assert.fail('acquire() was not refused');
}

/** One request through the gate with the given outcome. */
async function call(g: Gate, outcome: 'ok' | 'failed'): Promise<void> {
  const permit = await g.acquire();
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

test("a 429's Retry-After keeps the upstream quiet for that long (seconds or an HTTP date), bounded", async (t) => {
  const date = (ms: number): string => new Date(START + ms).toUTCString();
  const cases = [
    { what: 'seconds', header: '5', seconds: 5 },
    { what: 'seconds with spaces', header: ' 12 ', seconds: 12 },
    { what: 'an HTTP date', header: date(7000), seconds: 7 },
    { what: 'no header: the default', header: undefined, seconds: 30 },
    { what: 'unparseable: the default', header: 'soon', seconds: 30 },
    { what: 'days: capped at an hour', header: '999999', seconds: 3600 },
    { what: 'a date far ahead: capped at an hour', header: date(86_400_000), seconds: 3600 },
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
