/**
 * Bad input from clients: each gets its OCI error envelope and a 4xx, never a 5xx, and none of
 * it reaches the upstream.
 */
import assert from 'node:assert/strict';
import { connect } from 'node:net';
import test from 'node:test';
import { getGlobalDispatcher, request } from 'undici';
import { startFakeUpstream } from './helpers/fake-upstream.js';
import { startProxy } from './helpers/proxy.js';

const HEX = 'a'.repeat(64);

test('bad requests get exact OCI errors and never touch the upstream', async (t) => {
  const fake = await startFakeUpstream(t);
  const lines: Array<Record<string, unknown>> = [];
  const proxy = await startProxy(t, {
    upstreams: [{ name: 'docker.io', url: fake.url, dockerHubLibrary: true }, { name: 'ghcr.io', url: fake.url }],
    logger: { level: 'info', stream: { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) } },
  });
  const logged = (): unknown[] => lines.filter((l) => l.msg === 'request').map((l) => [l.method, l.url, l.status, l.bytes]);
  const cases: Array<{ what: string; method?: string; path: string; headers?: Record<string, string>; status: number; code: string; message?: string }> = [
    { what: 'path traversal in the name', path: '/v2/../../etc/passwd/manifests/latest?ns=docker.io', status: 400, code: 'NAME_INVALID' },
    { what: 'encoded traversal', path: '/v2/library/%2e%2e/manifests/latest?ns=docker.io', status: 400, code: 'NAME_INVALID' },
    { what: 'bad percent-encoding (Fastify answers it before routing)', path: '/v2/library/%zz/manifests/latest?ns=docker.io', status: 400, code: 'NAME_INVALID' },
    { what: 'an encoded byte that is not UTF-8', path: '/v2/library/alpine/manifests/%E0%A4%A?ns=docker.io', status: 400, code: 'NAME_INVALID' },
    { what: 'encoded slash', path: '/v2/library%2Falpine/manifests/latest?ns=docker.io', status: 400, code: 'NAME_INVALID' },
    { what: 'upper-case name', path: '/v2/Library/Alpine/manifests/latest?ns=docker.io', status: 400, code: 'NAME_INVALID' },
    { what: 'empty name component', path: '/v2/library//alpine/manifests/latest?ns=docker.io', status: 400, code: 'NAME_INVALID' },
    { what: 'name too long', path: `/v2/${'a'.repeat(256)}/manifests/latest?ns=docker.io`, status: 400, code: 'NAME_INVALID' },
    { what: 'invalid tag', path: '/v2/library/alpine/manifests/-bad?ns=docker.io', status: 400, code: 'TAG_INVALID' },
    { what: 'tag too long', path: `/v2/library/alpine/manifests/${'t'.repeat(129)}?ns=docker.io`, status: 400, code: 'TAG_INVALID' },
    { what: 'malformed digest', path: '/v2/library/alpine/blobs/sha256:xyz?ns=docker.io', status: 400, code: 'DIGEST_INVALID', message: 'invalid digest "sha256:xyz"' },
    { what: 'short sha256', path: `/v2/library/alpine/blobs/sha256:${HEX.slice(1)}?ns=docker.io`, status: 400, code: 'DIGEST_INVALID' },
    { what: 'upper-case hex', path: `/v2/library/alpine/blobs/sha256:${HEX.toUpperCase()}?ns=docker.io`, status: 400, code: 'DIGEST_INVALID' },
    { what: 'unsupported algorithm', path: `/v2/library/alpine/blobs/md5:${'b'.repeat(32)}?ns=docker.io`, status: 400, code: 'DIGEST_INVALID', message: `unsupported digest md5:${'b'.repeat(32)}: only sha256 and sha512 are accepted` },
    { what: 'tag where a blob digest belongs', path: '/v2/library/alpine/blobs/latest?ns=docker.io', status: 400, code: 'DIGEST_INVALID' },
    { what: 'referrers with a tag', path: '/v2/library/alpine/referrers/latest?ns=docker.io', status: 400, code: 'DIGEST_INVALID' },
    { what: 'unknown ns', path: '/v2/library/alpine/manifests/latest?ns=quay.io', status: 404, code: 'NAME_UNKNOWN', message: 'ns "quay.io" is not a configured upstream of this cache' },
    { what: 'ns with CRLF', path: '/v2/library/alpine/manifests/latest?ns=evil%0d%0ahost', status: 404, code: 'NAME_UNKNOWN' },
    { what: 'no upstream named and no default', path: '/v2/library/alpine/manifests/latest', status: 404, code: 'NAME_UNKNOWN', message: 'no upstream named: send ?ns=<registry>, or put a configured registry first in the path (/v2/<registry>/<name>/…)' },
    { what: 'ns and path prefix disagree', path: '/docker.io/v2/library/alpine/manifests/latest?ns=ghcr.io', status: 400, code: 'NAME_INVALID' },
    { what: 'unknown endpoint', path: '/v2/_catalog?ns=docker.io', status: 404, code: 'NAME_UNKNOWN' },
    { what: 'bad n', path: '/v2/library/alpine/tags/list?n=-1&ns=docker.io', status: 400, code: 'PAGINATION_NUMBER_INVALID' },
    { what: 'upload start', method: 'POST', path: '/v2/library/alpine/blobs/uploads/?ns=docker.io', status: 405, code: 'UNSUPPORTED' },
    { what: 'upload status', path: '/v2/library/alpine/blobs/uploads/abc?ns=docker.io', status: 405, code: 'UNSUPPORTED' },
    { what: 'manifest push', method: 'PUT', path: '/v2/library/alpine/manifests/latest?ns=docker.io', status: 405, code: 'UNSUPPORTED' },
    { what: 'manifest delete', method: 'DELETE', path: `/v2/library/alpine/manifests/sha256:${HEX}?ns=docker.io`, status: 405, code: 'UNSUPPORTED' },
    { what: 'blob patch', method: 'PATCH', path: '/v2/library/alpine/blobs/uploads/x', status: 405, code: 'UNSUPPORTED' },
    { what: 'TRACE', method: 'TRACE', path: '/v2/', status: 405, code: 'UNSUPPORTED', message: 'TRACE is not supported: this registry is a read-only cache' },
    { what: 'PROPFIND', method: 'PROPFIND', path: '/v2/library/alpine/manifests/latest?ns=docker.io', status: 405, code: 'UNSUPPORTED', message: 'PROPFIND is not supported: this registry is a read-only cache' },
  ];
  for (const c of cases) {
    // The raw path, as sent: a URL parser would resolve the `..` before it left the client.
    const res = await getGlobalDispatcher().request({
      origin: proxy.url,
      path: c.path,
      method: (c.method ?? 'GET') as 'GET',
      headers: c.headers,
      body: c.method === 'PUT' || c.method === 'POST' || c.method === 'PATCH' ? '{"x":1}' : undefined,
    });
    const text = await res.body.text();
    assert.equal(res.statusCode, c.status, `${c.what}: ${text}`);
    assert.equal(res.headers['content-type'], 'application/json; charset=utf-8', c.what);
    assert.equal(res.headers['docker-distribution-api-version'], 'registry/2.0', c.what);
    const body = JSON.parse(text) as { errors: Array<{ code: string; message: string }> };
    assert.equal(body.errors.length, 1, c.what);
    assert.equal(body.errors[0]!.code, c.code, c.what);
    if (c.message) assert.equal(body.errors[0]!.message, c.message, c.what);
    if (c.status === 405) assert.equal(res.headers.allow, 'GET, HEAD');
    // Each answer is in the request log, with the bytes of its error body.
    assert.deepEqual(logged().at(-1), [c.method ?? 'GET', c.path, c.status, Buffer.byteLength(text)], c.what);
  }
  assert.equal(logged().length, cases.length);
  // HEAD errors carry the status and no body.
  const head = await request(`${proxy.url}/v2/library/alpine/manifests/-bad?ns=docker.io`, { method: 'HEAD' });
  assert.equal(head.statusCode, 400);
  assert.equal((await head.body.text()).length, 0);
  assert.deepEqual(logged().at(-1), ['HEAD', '/v2/library/alpine/manifests/-bad?ns=docker.io', 400, 0]);
  assert.equal(fake.requests.length, 0, 'no bad request reached the upstream');
});

test('requests Node refuses before any route get the envelope and the connection is closed', async (t) => {
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:9' }] });
  const cases = [
    { what: 'a method Node does not know', head: 'BREW /v2/ HTTP/1.1\r\nHost: x\r\n', status: '405 Method Not Allowed', allow: true, body: { errors: [{ code: 'UNSUPPORTED', message: 'unknown method: this registry is a read-only cache' }] } },
    { what: 'headers over 16 KiB', head: `GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(17 * 1024)}\r\n`, status: '431 Request Header Fields Too Large', allow: false, body: { errors: [{ code: 'UNSUPPORTED', message: 'request headers are too large' }] } },
    { what: 'a header line without a colon', head: 'GET /v2/ HTTP/1.1\r\nHost: x\r\nno colon here\r\n', status: '400 Bad Request', allow: false, body: { errors: [{ code: 'UNSUPPORTED', message: 'malformed HTTP request' }] } },
  ];
  for (const c of cases) {
    await t.test(c.what, async () => {
      const socket = connect(Number(new URL(proxy.url).port), '127.0.0.1');
      socket.end(`${c.head}\r\n`);
      let raw = '';
      for await (const chunk of socket) raw += (chunk as Buffer).toString();
      const [head, body] = raw.split('\r\n\r\n') as [string, string];
      const lines = head.split('\r\n');
      assert.equal(lines[0], `HTTP/1.1 ${c.status}`);
      assert.ok(lines.includes('Content-Type: application/json'), head);
      assert.ok(lines.includes('Docker-Distribution-Api-Version: registry/2.0'), head);
      assert.equal(lines.includes('Allow: GET, HEAD'), c.allow, head);
      assert.deepEqual(JSON.parse(body), c.body);
    });
  }
});

test('the request log has every answer but what probes, scrapers and the status page poll, unless it fails', async (t) => {
  const lines: Array<Record<string, unknown>> = [];
  const proxy = await startProxy(t, {
    upstreams: [{ name: 'docker.io', url: 'http://127.0.0.1:9' }],
    logger: { level: 'info', stream: { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) } },
  });
  const polls: Array<[string, string, number]> = [
    ['GET', '/v2/', 200],
    ['GET', '/healthz', 200],
    ['HEAD', '/healthz', 200],
    ['GET', '/healthz/', 200],
    ['HEAD', '/readyz', 200],
    ['GET', '/metrics', 200],
    ['HEAD', '/metrics', 200],
    ['GET', '/', 200],
    ['HEAD', '/', 200],
    ['POST', '/healthz', 405],
  ];
  for (const [method, path, status] of polls) {
    const res = await request(`${proxy.url}${path}`, { method: method as 'GET' });
    await res.body.dump();
    assert.equal(res.statusCode, status, `${method} ${path}`);
  }
  // Shutting down: liveness holds, readiness says why it fails, and that failure is logged.
  await proxy.app.drain(0);
  const alive = await request(`${proxy.url}/healthz/`);
  await alive.body.dump();
  assert.equal(alive.statusCode, 200);
  const notReady = await request(`${proxy.url}/readyz`);
  const notReadyBody = await notReady.body.text();
  assert.equal(notReady.statusCode, 503);
  assert.deepEqual(JSON.parse(notReadyBody), { status: 'not ready', reason: 'shutting down' });
  assert.deepEqual(
    lines.filter((l) => l.msg === 'request').map((l) => [l.method, l.url, l.status, l.bytes]),
    [
      ['GET', '/v2/', 200, 2],
      ['POST', '/healthz', 405, Buffer.byteLength('{"errors":[{"code":"UNSUPPORTED","message":"this registry is a read-only cache"}]}')],
      ['GET', '/readyz', 503, Buffer.byteLength(notReadyBody)],
    ],
  );
});

test('a malformed Range on a cached blob answers 416 with the size', async (t) => {
  const fake = await startFakeUpstream(t);
  const proxy = await startProxy(t, { upstreams: [{ name: 'docker.io', url: fake.url }] });
  const data = Buffer.from('0123456789');
  const { createHash } = await import('node:crypto');
  const digest = `sha256:${createHash('sha256').update(data).digest('hex')}`;
  const { blobHandler } = await import('./helpers/fake-upstream.js');
  fake.route(`/v2/r/blobs/${digest}`, blobHandler(data));
  const url = `${proxy.url}/v2/r/blobs/${digest}?ns=docker.io`;
  await (await request(url)).body.text();
  for (const range of ['bytes=20-', 'bytes=abc', 'bytes=5-2', 'bytes=-0']) {
    const r = await request(url, { headers: { range } });
    assert.equal(r.statusCode, 416, range);
    assert.equal(r.headers['content-range'], 'bytes */10', range);
    assert.equal(JSON.parse(await r.body.text()).errors[0].code, 'RANGE_INVALID');
  }
  const whole = await request(url, { headers: { range: 'bytes=0-1,4-5' } });
  assert.equal(whole.statusCode, 200, 'several ranges: the whole blob');
  assert.equal(await whole.body.text(), '0123456789');
});
