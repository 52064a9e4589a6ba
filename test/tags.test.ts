/**
 * Tag freshness against a real registry: within tagTtl no upstream call; after it one HEAD,
 * coalesced; a new digest is fetched by digest; an upstream 404 is authoritative; an upstream
 * that is down leaves cached tags served (stale) and listed.
 */
import assert from 'node:assert/strict';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';
import { startDistribution } from './helpers/distribution.js';
import { startProxy } from './helpers/proxy.js';
import { image, Pusher } from './helpers/seed.js';

const ACCEPT = 'application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json';

async function manifest(url: string, method: 'GET' | 'HEAD' = 'GET') {
  const res = await request(url, { method, headers: { accept: ACCEPT } });
  const body = Buffer.from(await res.body.arrayBuffer());
  return { status: res.statusCode, digest: res.headers['docker-content-digest'], cache: res.headers['x-cache'], body };
}

test('tags are revalidated with one HEAD after tagTtl and served stale when the upstream is down', async (t) => {
  const upstream = await startDistribution(t);
  if (!upstream) return;
  const push = new Pusher({ url: upstream.url });
  const v1 = image({ 'v.txt': Buffer.from('first\n') });
  const v2 = image({ 'v.txt': Buffer.from('second\n') });
  await push.pushImage('app/web', 'stable', v1);
  await push.pushImage('app/web', 'gone', v1);
  const proxy = await startProxy(t, { upstreams: [{ name: 'quay.io', url: upstream.url, tagTtl: '1s' }] });
  const url = (tag: string) => `${proxy.url}/v2/app/web/manifests/${tag}?ns=quay.io`;
  // What the cache asked (the test's own PUTs and DELETEs are left out).
  const manifestRequests = () => upstream.accessLog.filter((l) => /^(GET|HEAD) \/v2\/app\/web\/manifests\//.test(l));

  const first = await manifest(url('stable'));
  assert.equal(first.digest, v1.digest);
  assert.equal(first.cache, 'MISS');
  await sleep(50); // access-log lines arrive through a pipe
  const seen = manifestRequests().length;
  assert.deepEqual(manifestRequests().map((l) => l.split(' ').slice(0, 2).join(' ')), ['HEAD /v2/app/web/manifests/stable', `GET /v2/app/web/manifests/${v1.digest}`]);

  await push.pushImage('app/web', 'stable', v2);
  const within = await manifest(url('stable'));
  assert.equal(within.cache, 'HIT');
  assert.equal(within.digest, v1.digest, 'within tagTtl the cached digest is served without asking');
  await sleep(50);
  assert.equal(manifestRequests().length, seen);

  await sleep(1100);
  const moved = await Promise.all(Array.from({ length: 10 }, () => manifest(url('stable'))));
  for (const r of moved) assert.equal(r.digest, v2.digest);
  await sleep(50);
  const after = manifestRequests().slice(seen).map((l) => l.split(' ').slice(0, 2).join(' '));
  assert.deepEqual(after, ['HEAD /v2/app/web/manifests/stable', `GET /v2/app/web/manifests/${v2.digest}`], 'ten requests, one HEAD, one GET by digest');

  await sleep(1100);
  const same = await manifest(url('stable'), 'HEAD');
  assert.equal(same.cache, 'REVALIDATED');
  assert.equal(same.digest, v2.digest);

  // The upstream says the tag is gone: that is authoritative.
  await manifest(url('gone'));
  const del = await request(`${upstream.url}/v2/app/web/manifests/${v1.digest}`, { method: 'DELETE' });
  await del.body.dump();
  assert.equal(del.statusCode, 202);
  await sleep(1100);
  const gone = await manifest(url('gone'));
  assert.equal(gone.status, 404);
  assert.equal(JSON.parse(gone.body.toString()).errors[0].code, 'MANIFEST_UNKNOWN');

  // The upstream goes down: cached tags are still served, and listed.
  await upstream.stop();
  await sleep(1100);
  const stale = await manifest(url('stable'));
  assert.equal(stale.status, 200);
  assert.equal(stale.cache, 'STALE');
  assert.equal(stale.digest, v2.digest);
  const list = await request(`${proxy.url}/v2/app/web/tags/list?ns=quay.io`);
  assert.equal(list.statusCode, 200);
  assert.equal(list.headers['x-cache'], 'STALE');
  assert.deepEqual(await list.body.json(), { name: 'app/web', tags: ['stable'] });
  const unknown = await manifest(url('never-pulled'));
  assert.equal(unknown.status, 503);
});
