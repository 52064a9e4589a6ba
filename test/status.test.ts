/**
 * The status page at `/`, as an operator sees it: rendered by headless Chromium (Debian's
 * chromium driven by playwright-core), with a screenshot kept in .test-artifacts/status.png.
 */
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { chromium } from 'playwright-core';
import { startDistribution } from './helpers/distribution.js';
import { fetchComplete, pullImage, startProxy } from './helpers/proxy.js';
import { image, OCI_MANIFEST, Pusher } from './helpers/seed.js';
import { freePort, need, until } from './helpers/tools.js';
import { formatBytes } from '../src/core/units.js';
import { version } from '../src/version.js';

test('status page: version, upstream states, cache size and limit, hit ratio, most pulled images', async (t) => {
  const browserPath = need(t, 'chromium', 'apt-get install chromium');
  const registry = await startDistribution(t);
  if (!browserPath || !registry) return;
  const app = image({ 'app.txt': Buffer.from('status page\n') });
  const tool = image({ 'tool.txt': Buffer.from('another image\n') });
  const pusher = new Pusher({ url: registry.url });
  await pusher.pushImage('team/app', 'v1', app);
  await pusher.pushImage('team/tool', 'v1', tool);
  const proxy = await startProxy(t, {
    storage: { maxSize: '1GiB' },
    upstreams: [
      { name: 'docker.io', url: registry.url },
      { name: 'quay.io', url: registry.url, offline: true },
      { name: 'ghcr.io', url: `http://127.0.0.1:${await freePort()}`, breakerFailures: 1, breakerCooldown: '1h' },
    ],
  });
  // team/app pulled three times (the blobs are hits after the first), team/tool's manifest once.
  // A pull ends with the last byte sent, and the blob is renamed into place and indexed just after:
  // the next pull waits for that, or it would join the fill (a miss) instead of reading the file.
  for (let i = 0; i < 3; i++) {
    await pullImage(proxy.url, 'team/app', 'v1');
    await until('the pulled blobs indexed', () => app.blobs.every((b) => proxy.app.services.db.blobHeldBy('docker.io', 'team/app', b.descriptor.digest)));
  }
  await fetchComplete(`${proxy.url}/v2/team/tool/manifests/v1?ns=docker.io`, { accept: OCI_MANIFEST });
  await fetchComplete(`${proxy.url}/v2/team/x/manifests/v1?ns=ghcr.io`, { accept: OCI_MANIFEST }); // unreachable: opens the breaker
  // A request is counted once its response has finished on the server, which on a loaded machine
  // may come after the client has read the last byte: wait (briefly) until all ten are counted.
  await until('the ten docker.io requests counted', async () => {
    const text = (await fetchComplete(`${proxy.url}/metrics`)).body.toString();
    const counts = [...text.matchAll(/^ocicache_cache_requests_total\{upstream="docker\.io",kind="(?:manifest|blob)",result="[a-z]+"\} (\d+)$/gm)];
    return counts.reduce((n, m) => n + Number(m[1]), 0) >= 10;
  });

  const browser = await chromium.launch({ executablePath: browserPath, args: ['--no-sandbox'] });
  t.after(() => browser.close());
  const page = await browser.newPage({ viewport: { width: 1000, height: 800 } });
  const res = await page.goto(`${proxy.url}/`);
  assert.equal(res?.status(), 200);
  assert.equal(res?.headers()['content-type'], 'text/html; charset=utf-8');
  assert.equal(await page.textContent('h1'), `ocicache ${version()}`);
  const states = await page.$$eval('#upstreams tbody tr', (rows) => rows.map((r) => [...r.querySelectorAll('td')].map((td) => td.textContent)));
  assert.deepEqual(
    states.map(([name, , state]) => [name, state]),
    [
      ['docker.io', 'ok'],
      ['quay.io', 'serving from the cache only'],
      ['ghcr.io', 'breaker open: failing fast'],
    ],
  );
  const size = app.blobs.reduce((n, b) => n + b.data.length, 0);
  assert.equal(await page.textContent('#disk'), `${formatBytes(size)} in ${app.blobs.length} blobs (0.0% of 1.00 GiB)`);
  // 3 app manifests (miss, hit, hit) + 6 app blobs (2 misses, 4 hits) + 1 tool manifest (miss): 6 hits of 10.
  assert.equal(await page.textContent('#hit-ratio'), '60.0% of manifest and blob requests since start');
  const top = await page.$$eval('#top-images tbody tr', (rows) => rows.map((r) => [...r.querySelectorAll('td')].map((td) => td.textContent)));
  assert.deepEqual(top, [
    ['docker.io/team/app', '3'],
    ['docker.io/team/tool', '1'],
  ]);
  const dir = join(process.cwd(), '.test-artifacts');
  mkdirSync(dir, { recursive: true });
  await page.screenshot({ path: join(dir, 'status.png'), fullPage: true });
});
