/**
 * Tag freshness against a real registry: within tagTtl no upstream call; after it one HEAD,
 * coalesced; a new digest is fetched by digest; an upstream 404 is authoritative; an upstream
 * that is down leaves cached tags served (stale) and listed.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { request } from 'undici';
import { startDistribution } from './helpers/distribution.js';
import { fetchComplete, ociError, startProxy, testClock } from './helpers/proxy.js';
import { image, OCI_INDEX, OCI_MANIFEST, Pusher } from './helpers/seed.js';
import { until } from './helpers/tools.js';

const ACCEPT = `${OCI_MANIFEST}, ${OCI_INDEX}`;

test('tags are revalidated with one HEAD after tagTtl and served stale when the upstream is down', async (t) => {
  const upstream = await startDistribution(t);
  if (!upstream) return;
  const push = new Pusher({ url: upstream.url });
  const v1 = image({ 'v.txt': Buffer.from('first\n') });
  const v2 = image({ 'v.txt': Buffer.from('second\n') });
  await push.pushImage('app/web', 'stable', v1);
  await push.pushImage('app/web', 'gone', v1);
  // Time moves only when the test says so: tagTtl passes by advancing the proxy's clock.
  const clock = testClock();
  const proxy = await startProxy(t, { clock, upstreams: [{ name: 'quay.io', url: upstream.url, tagTtl: '1s' }] });
  const url = (tag: string) => `${proxy.url}/v2/app/web/manifests/${tag}?ns=quay.io`;
  // What the cache asked (the test's own PUTs and DELETEs are left out).
  const manifestRequests = () => upstream.accessLog.filter((l) => /^(GET|HEAD) \/v2\/app\/web\/manifests\//.test(l));
  // Access-log lines arrive through a pipe, in the order the upstream answered: once a request
  // of the test's own is logged, so is every request the cache made before it.
  let marks = 0;
  const logged = async (): Promise<void> => {
    const mark = `/v2/test-mark-${++marks}/tags/list`;
    await (await request(`${upstream.url}${mark}`)).body.dump();
    await until(`the upstream to log ${mark}`, () => upstream.accessLog.some((l) => l.startsWith(`GET ${mark} `)));
  };

  const first = await fetchComplete(url('stable'), { accept: ACCEPT });
  assert.equal(first.headers['docker-content-digest'], v1.digest);
  assert.equal(first.headers['x-cache'], 'MISS');
  await logged();
  const seen = manifestRequests().length;
  assert.deepEqual(manifestRequests().map((l) => l.split(' ').slice(0, 2).join(' ')), ['HEAD /v2/app/web/manifests/stable', `GET /v2/app/web/manifests/${v1.digest}`]);

  await push.pushImage('app/web', 'stable', v2);
  const within = await fetchComplete(url('stable'), { accept: ACCEPT });
  assert.equal(within.headers['x-cache'], 'HIT');
  assert.equal(within.headers['docker-content-digest'], v1.digest, 'within tagTtl the cached digest is served without asking');
  await logged();
  assert.equal(manifestRequests().length, seen);

  clock.advance(1100);
  const moved = await Promise.all(Array.from({ length: 10 }, () => fetchComplete(url('stable'), { accept: ACCEPT })));
  for (const r of moved) assert.equal(r.headers['docker-content-digest'], v2.digest);
  await logged();
  const after = manifestRequests().slice(seen).map((l) => l.split(' ').slice(0, 2).join(' '));
  assert.deepEqual(after, ['HEAD /v2/app/web/manifests/stable', `GET /v2/app/web/manifests/${v2.digest}`], 'ten requests, one HEAD, one GET by digest');

  clock.advance(1100);
  const same = await fetchComplete(url('stable'), { accept: ACCEPT }, 'HEAD');
  assert.equal(same.headers['x-cache'], 'REVALIDATED');
  assert.equal(same.headers['docker-content-digest'], v2.digest);

  // The upstream says the tag is gone: that is authoritative.
  await fetchComplete(url('gone'), { accept: ACCEPT });
  const del = await request(`${upstream.url}/v2/app/web/manifests/${v1.digest}`, { method: 'DELETE' });
  await del.body.dump();
  assert.equal(del.statusCode, 202);
  clock.advance(1100);
  const gone = await fetchComplete(url('gone'), { accept: ACCEPT });
  assert.equal(gone.status, 404);
  assert.equal(ociError(gone).code, 'MANIFEST_UNKNOWN');

  // The upstream goes down: cached tags are still served, and listed.
  await upstream.stop();
  clock.advance(1100);
  const stale = await fetchComplete(url('stable'), { accept: ACCEPT });
  assert.equal(stale.status, 200);
  assert.equal(stale.headers['x-cache'], 'STALE');
  assert.equal(stale.headers['docker-content-digest'], v2.digest);
  const list = await request(`${proxy.url}/v2/app/web/tags/list?ns=quay.io`);
  assert.equal(list.statusCode, 200);
  assert.equal(list.headers['x-cache'], 'STALE');
  assert.deepEqual(await list.body.json(), { name: 'app/web', tags: ['stable'] });
  const unknown = await fetchComplete(url('never-pulled'), { accept: ACCEPT });
  assert.equal(unknown.status, 503);
});
