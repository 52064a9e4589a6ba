/**
 * Upstream faults a real registry cannot produce. In each: the client gets a clear OCI error or
 * an aborted body (never a complete-looking wrong one), and nothing partial enters the cache.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readlinkSync } from 'node:fs';
import { connect, createServer } from 'node:net';
import { join } from 'node:path';
import test from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { request } from 'undici';
import { blobHandler, startFakeUpstream, startProxyWithFake, startTrap } from './helpers/fake-upstream.js';
import { blobFile, fetchBody, jsonBody, ociError, startProxy, type Proxy } from './helpers/proxy.js';
import { image, OCI_MANIFEST, sha256 } from './helpers/seed.js';
import { until } from './helpers/tools.js';

const tmpEmpty = (proxy: Proxy): boolean => readdirSync(join(proxy.root, 'tmp')).length === 0;

test('a blob whose upstream misbehaves mid-body (resuming off) is never cached, and the client sees the body cut', async (t) => {
  const cases = [
    { how: 'reset' as const, what: 'connection reset after 1 MiB' },
    { how: 'end-chunked' as const, what: 'chunked body that ends early' },
    { how: 'stall' as const, what: 'upstream stops sending (idle timeout)' },
  ];
  for (const c of cases) {
    await t.test(c.what, async (t) => {
      const { fake, proxy } = await startProxyWithFake(t, { blobRetries: 0 });
      const data = randomBytes(4 * 1024 * 1024);
      const digest = sha256(data);
      fake.route(`/v2/some/repo/blobs/${digest}`, blobHandler(data, { cutAt: 1024 * 1024, how: c.how }));
      const r = await fetchBody(`${proxy.url}/v2/some/repo/blobs/${digest}?ns=fake.example`);
      assert.ok(r.aborted || (r.body && r.body.length < data.length), 'the client must not get a complete-looking body');
      // The client is cut off as the fill fails; the temp file goes just after.
      await until('the failed fill to remove its temp file', () => tmpEmpty(proxy));
      assert.equal(existsSync(blobFile(proxy.root, digest)), false);
      assert.ok(tmpEmpty(proxy), 'temp file removed');
      // The upstream recovers: the next request fills and serves the right bytes.
      fake.route(`/v2/some/repo/blobs/${digest}`, blobHandler(data));
      const ok = await fetchBody(`${proxy.url}/v2/some/repo/blobs/${digest}?ns=fake.example`);
      assert.equal(ok.status, 200);
      assert.equal(sha256(ok.body!), digest);
      // The last bytes reach the client just before the fill's fsync and rename.
      await until('the fill to be committed', () => existsSync(blobFile(proxy.root, digest)));
      assert.ok(existsSync(blobFile(proxy.root, digest)));
    });
  }
});

test('wrong bytes for a digest: the client never gets a complete body and nothing is cached', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t);
  const data = randomBytes(2 * 1024 * 1024);
  const digest = sha256(data);
  fake.route(`/v2/some/repo/blobs/${digest}`, blobHandler(randomBytes(data.length)));
  const r = await fetchBody(`${proxy.url}/v2/some/repo/blobs/${digest}?ns=fake.example`);
  assert.ok(r.aborted, 'the connection is aborted rather than finishing a wrong body');
  await until('the failed fill to remove its temp file', () => tmpEmpty(proxy));
  assert.equal(existsSync(blobFile(proxy.root, digest)), false);
  assert.ok(tmpEmpty(proxy));
});

test('a wrong manifest for its digest is refused, not stored', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t);
  const img = image({ 'a.txt': Buffer.from('a') });
  fake.route(`/v2/some/repo/manifests/${img.digest}`, (_req, res) => {
    res.writeHead(200, { 'content-type': img.mediaType, 'docker-content-digest': img.digest }).end(Buffer.from(img.manifest.toString().replace('"a', '"b')));
  });
  const r = await fetchBody(`${proxy.url}/v2/some/repo/manifests/${img.digest}?ns=fake.example`);
  assert.equal(r.status, 502);
  assert.equal(ociError(r).code, 'UNKNOWN');
});

/** A media type with a line break: as a header it would smuggle a second one. */
const BAD_MEDIA_TYPE = 'application/x\r\nset-cookie: a=b';
const BAD_MEDIA_TYPE_MANIFEST = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: BAD_MEDIA_TYPE, layers: [] }));

test('a manifest whose mediaType field holds a line break is served with a clean Content-Type, on a miss and on a hit', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t);
  const body = BAD_MEDIA_TYPE_MANIFEST;
  const digest = sha256(body);
  // By tag for the HEAD, by digest for the GET that follows.
  for (const reference of ['v1', digest]) {
    fake.route(`/v2/some/repo/manifests/${reference}`, (req, res) => {
      res.writeHead(200, { 'content-type': 'application/json', 'docker-content-digest': digest, 'content-length': body.length }).end(req.method === 'HEAD' ? undefined : body);
    });
  }
  for (const cache of ['MISS', 'HIT', 'HIT']) {
    const r = await fetchBody(`${proxy.url}/v2/some/repo/manifests/v1?ns=fake.example`);
    assert.deepEqual([r.status, r.headers['content-type'], r.headers['x-cache'], r.headers['set-cookie']], [200, 'application/json', cache, undefined]);
    assert.deepEqual(r.body, body);
  }
});

test('a malformed media type stored by an older version is not served either', async (t) => {
  const { proxy } = await startProxyWithFake(t);
  const body = BAD_MEDIA_TYPE_MANIFEST;
  // As the index held it before mediaTypeOf refused such types: a fresh tag, so no upstream is asked.
  proxy.app.services.db.putManifest({ digest: sha256(body), mediaType: BAD_MEDIA_TYPE, body }, [], 'fake.example', 'some/legacy', 'v1', Date.now());
  for (const method of ['GET', 'HEAD'] as const) {
    const r = await fetchBody(`${proxy.url}/v2/some/legacy/manifests/v1?ns=fake.example`, {}, method);
    assert.deepEqual([r.status, r.headers['content-type'], r.headers['x-cache'], r.headers['set-cookie']], [200, OCI_MANIFEST, 'HIT', undefined], method);
  }
});

test('upstream status codes map to OCI errors', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t);
  const cases: Array<{ what: string; reply: (res: import('node:http').ServerResponse) => void; status: number; code: string; headers?: Record<string, string> }> = [
    { what: '500', reply: (res) => res.writeHead(500).end('boom'), status: 502, code: 'UNAVAILABLE' },
    { what: '503', reply: (res) => res.writeHead(503).end(), status: 502, code: 'UNAVAILABLE' },
    { what: '401 without a challenge we can answer', reply: (res) => res.writeHead(401).end(), status: 403, code: 'DENIED' },
    { what: '403', reply: (res) => res.writeHead(403).end(), status: 403, code: 'DENIED' },
    { what: '404', reply: (res) => res.writeHead(404).end(), status: 404, code: 'MANIFEST_UNKNOWN' },
    { what: 'hang (headers timeout)', reply: () => undefined, status: 504, code: 'UNAVAILABLE' },
    // Last: after a 429 the cache stays away from this upstream until Retry-After has passed.
    { what: '429 with Retry-After', reply: (res) => res.writeHead(429, { 'retry-after': '17' }).end('slow down'), status: 429, code: 'TOOMANYREQUESTS', headers: { 'retry-after': '17' } },
  ];
  for (const [i, c] of cases.entries()) {
    await t.test(c.what, async () => {
      fake.route(`/v2/case/${i}/manifests/latest`, (_req, res) => c.reply(res));
      const r = await fetchBody(`${proxy.url}/v2/case/${i}/manifests/latest?ns=fake.example`);
      assert.equal(r.status, c.status);
      assert.equal(ociError(r).code, c.code);
      for (const [k, v] of Object.entries(c.headers ?? {})) assert.equal(r.headers[k], v);
    });
  }
});

test('an unreachable upstream answers 503 UNAVAILABLE', async (t) => {
  const closed = createServer();
  await new Promise<void>((r) => closed.listen(0, '127.0.0.1', r));
  const port = (closed.address() as { port: number }).port;
  await new Promise<void>((r) => closed.close(() => r()));
  const proxy = await startProxy(t, { upstreams: [{ name: 'down.example', url: `http://127.0.0.1:${port}` }] });
  const r = await fetchBody(`${proxy.url}/v2/a/b/manifests/latest?ns=down.example`);
  assert.equal(r.status, 503);
  assert.deepEqual(jsonBody(r), { errors: [{ code: 'UNAVAILABLE', message: 'upstream down.example is unreachable' }] });
});

test('an oversized manifest is refused with MANIFEST_INVALID, as a 502: the upstream is at fault, not the client', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t);
  const huge = Buffer.alloc(4 * 1048 * 1048 + 1, 0x20);
  const serve: import('./helpers/fake-upstream.js').Handler = (req, res) => {
    res.writeHead(200, { 'content-type': OCI_MANIFEST, 'docker-content-digest': sha256(huge) });
    res.end(req.method === 'HEAD' ? undefined : huge);
  };
  fake.route('/v2/big/manifest/manifests/latest', serve);
  fake.route(`/v2/big/manifest/manifests/${sha256(huge)}`, serve);
  const r = await fetchBody(`${proxy.url}/v2/big/manifest/manifests/latest?ns=fake.example`);
  assert.equal(r.status, 502);
  assert.equal(ociError(r).code, 'MANIFEST_INVALID');
});

test('a blob 307 to another origin is followed without Authorization and the URL is not cached', async (t) => {
  const cdn = await startFakeUpstream(t);
  const data = randomBytes(300_000);
  const digest = sha256(data);
  let signature = 0;
  cdn.route('/signed/blob', (req, res) => {
    assert.equal(req.headers.authorization, undefined, 'the CDN must never see Authorization');
    blobHandler(data)(req, res);
  });
  // The password comes from the environment named in the config, never from the config itself.
  const { fake, proxy } = await startProxyWithFake(t, { auth: { username: 'u', passwordEnv: 'FAKE_PASSWORD' } }, { env: { FAKE_PASSWORD: 'p4ss' } });
  fake.route(`/v2/cdn/repo/blobs/${digest}`, (req, res) => {
    if (req.headers.authorization !== `Basic ${Buffer.from('u:p4ss').toString('base64')}`) {
      res.writeHead(401, { 'www-authenticate': 'Basic realm="fake"' }).end();
      return;
    }
    res.writeHead(307, { location: `${cdn.url}/signed/blob?sig=${++signature}` }).end();
  });
  const r = await fetchBody(`${proxy.url}/v2/cdn/repo/blobs/${digest}?ns=fake.example`);
  assert.equal(r.status, 200);
  assert.equal(sha256(r.body!), digest);
  assert.equal(cdn.requests.length, 1);
  assert.ok(cdn.requests.every((q) => q.headers.authorization === undefined));
  const again = await fetchBody(`${proxy.url}/v2/cdn/repo/blobs/${digest}?ns=fake.example`);
  assert.equal(sha256(again.body!), digest);
  assert.equal(cdn.requests.length, 1, 'the second pull comes from disk, not a cached redirect');
});

test('a client that disconnects does not abort the fill', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t, {}, { timeouts: { blobIdle: '5s' } });
  const data = randomBytes(3 * 1024 * 1024);
  const digest = sha256(data);
  fake.route(`/v2/slow/repo/blobs/${digest}`, (_req, res) => {
    res.writeHead(200, { 'content-length': String(data.length) });
    let off = 0;
    const drip = (): void => {
      if (off >= data.length) return void res.end();
      res.write(data.subarray(off, off + 256 * 1024));
      off += 256 * 1024;
      setTimeout(drip, 20);
    };
    drip();
  });
  const res = await request(`${proxy.url}/v2/slow/repo/blobs/${digest}?ns=fake.example`);
  for await (const _chunk of res.body) break; // read a little, then hang up
  res.body.destroy();
  await until('the fill to be committed', () => existsSync(blobFile(proxy.root, digest)));
  assert.ok(existsSync(blobFile(proxy.root, digest)), 'the fill finished and was committed');
  assert.equal(fake.count('GET', `/v2/slow/repo/blobs/${digest}`), 1);
});

test('cached blob bytes stay intact for concurrent readers, and readers that leave release the file', async (t) => {
  const { fake, proxy } = await startProxyWithFake(t);
  const data = randomBytes(33 * 1024 * 1024 + 123);
  const digest = sha256(data);
  const path = `/v2/some/repo/blobs/${digest}?ns=fake.example`;
  fake.route(`/v2/some/repo/blobs/${digest}`, blobHandler(data));
  assert.deepEqual((await fetchBody(`${proxy.url}${path}`)).body, data); // fills the cache
  const file = blobFile(proxy.root, digest);
  await until('the fill to be committed', () => existsSync(file));
  const openFds = (): number => readdirSync('/proc/self/fd').filter((fd) => {
    try {
      return readlinkSync(`/proc/self/fd/${fd}`) === file;
    } catch {
      return false; // closed while listing
    }
  }).length;

  // Responses share a pool of read buffers: two that hang up early must not corrupt the others.
  const quitter = async (): Promise<void> => {
    const res = await request(`${proxy.url}${path}`);
    assert.equal(res.headers['x-cache'], 'HIT');
    for await (const _chunk of res.body) break;
    res.body.destroy();
  };
  // Slow readers fill their sockets, so the server's writes wait in the kernel queue: a buffer
  // reused before its write completed would show up as wrong bytes here.
  const slow = async (): Promise<string> => {
    const res = await request(`${proxy.url}${path}`, { highWaterMark: 64 * 1024 });
    const chunks: Buffer[] = [];
    for await (const chunk of res.body) {
      chunks.push(chunk as Buffer);
      await sleep(2);
    }
    return sha256(Buffer.concat(chunks));
  };
  const results = await Promise.all([slow(), quitter(), slow(), quitter(), slow()]);
  for (const r of [results[0], results[2], results[4]]) assert.equal(r, digest);
  const ranges = [
    { range: 'bytes=3000000-3999999', from: 3000000, to: 4000000 },
    { range: `bytes=${data.length - 1048577}-`, from: data.length - 1048577, to: data.length },
    { range: 'bytes=0-0', from: 0, to: 1 },
  ];
  for (const c of ranges) {
    const r = await fetchBody(`${proxy.url}${path}`, { range: c.range });
    assert.equal(r.status, 206, c.range);
    assert.equal(r.headers['content-length'], String(c.to - c.from), c.range);
    assert.deepEqual(r.body, data.subarray(c.from, c.to), c.range);
  }
  await until('every reader to close the blob file', () => openFds() === 0);

  // Two pipelined requests on one connection that is never read, then dropped: the second
  // response, still queued, must let go of its file too (Node gives it no 'close' of its own).
  const sock = connect(Number(new URL(proxy.url).port), '127.0.0.1');
  await new Promise((r) => sock.once('connect', r));
  sock.write(`GET ${path} HTTP/1.1\r\nHost: x\r\n\r\nGET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`);
  await until('both responses to open the file', () => openFds() === 2);
  sock.destroy();
  await until('the dropped connection to release the file', () => openFds() === 0);
  assert.equal(fake.count('GET', `/v2/some/repo/blobs/${digest}`), 1);
});

test('an ns or path prefix that names no configured upstream is refused without a single packet to it', async (t) => {
  const trap = await startTrap(t, '127.0.0.1');
  const host = trap.host;
  const { proxy } = await startProxyWithFake(t);
  const cases = [
    { path: `/v2/library/alpine/manifests/latest?ns=${encodeURIComponent(host)}`, status: 404, code: 'NAME_UNKNOWN' },
    { path: `/v2/library/alpine/blobs/sha256:${'a'.repeat(64)}?ns=${host}`, status: 404, code: 'NAME_UNKNOWN' },
    { path: `/v2/${host}/library/alpine/manifests/latest`, status: 404, code: 'NAME_UNKNOWN' },
    { path: `/${host}/v2/library/alpine/manifests/latest`, status: 404, code: 'NAME_UNKNOWN' },
  ];
  for (const c of cases) {
    const r = await fetchBody(`${proxy.url}${c.path}`);
    assert.equal(r.status, c.status, c.path);
    assert.equal(ociError(r).code, c.code, c.path);
  }
  await sleep(50);
  assert.equal(trap.connections, 0);
});

test('a token realm outside the upstream is never dialled', async (t) => {
  const trap = await startTrap(t, '127.0.0.2');
  const { fake, proxy } = await startProxyWithFake(t);
  fake.route('/v2/x/y/manifests/latest', (_req, res) => {
    res.writeHead(401, { 'www-authenticate': `Bearer realm="http://${trap.host}/token",service="evil"` }).end();
  });
  const r = await fetchBody(`${proxy.url}/v2/x/y/manifests/latest?ns=fake.example`);
  assert.equal(r.status, 403);
  assert.equal(ociError(r).code, 'DENIED');
  assert.equal(trap.connections, 0);
});
