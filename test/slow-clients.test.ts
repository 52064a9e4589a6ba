/**
 * Clients hold only what configuration allows: a client that sends its headers slowly, one that
 * opens too many connections, and one that stops reading a blob are each cut off with the spec's
 * envelope where an answer is still possible.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect, type Socket } from 'node:net';
import test from 'node:test';
import { blobHandler, startProxyWithFake } from './helpers/fake-upstream.js';
import { fetchComplete, startProxy, type Proxy } from './helpers/proxy.js';
import { sha256 } from './helpers/seed.js';
import { until } from './helpers/tools.js';

/** A raw connection to the proxy that records what it receives and whether the server closed it. */
function open(proxy: Proxy): { socket: Socket; received: () => string; closed: () => boolean } {
  const socket = connect(Number(new URL(proxy.url).port), '127.0.0.1');
  let raw = '';
  let closed = false;
  socket.on('data', (d: Buffer) => (raw += d.toString('latin1')));
  socket.on('error', () => undefined);
  socket.on('close', () => (closed = true));
  return { socket, received: () => raw, closed: () => closed };
}

const upstreams = [{ name: 'docker.io', url: 'http://127.0.0.1:9' }];

test('a client that sends its headers too slowly gets 408 and is disconnected', async (t) => {
  const proxy = await startProxy(t, { upstreams, server: { headersTimeout: '1s', requestTimeout: '1s' } });
  const c = open(proxy);
  t.after(() => c.socket.destroy());
  c.socket.write('GET /v2/ HTTP/1.1\r\nHost: x\r\n');
  await until('the server closes the connection', c.closed, 10_000);
  const [head, body] = c.received().split('\r\n\r\n') as [string, string];
  assert.equal(head.split('\r\n')[0], 'HTTP/1.1 408 Request Timeout');
  assert.deepEqual(JSON.parse(body), { errors: [{ code: 'UNSUPPORTED', message: 'the request was not received in time' }] });
});

test('connections over maxConnectionsPerAddress are answered 503 and closed; the others are served', async (t) => {
  const proxy = await startProxy(t, { upstreams, server: { maxConnectionsPerAddress: 3 } });
  const held = [open(proxy), open(proxy), open(proxy)];
  t.after(() => held.forEach((c) => c.socket.destroy()));
  for (const c of held) c.socket.write('GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n');
  await until('the three are answered', () => held.every((c) => c.received().includes('\r\n\r\n{}')));
  const extra = open(proxy);
  t.after(() => extra.socket.destroy());
  extra.socket.write('GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n');
  await until('the fourth is closed', extra.closed);
  const [head, body] = extra.received().split('\r\n\r\n') as [string, string];
  const lines = head.split('\r\n');
  assert.equal(lines[0], 'HTTP/1.1 503 Service Unavailable');
  assert.ok(lines.includes('Connection: close') && lines.includes('retry-after: 1'), head);
  assert.deepEqual(JSON.parse(body), { errors: [{ code: 'UNAVAILABLE', message: 'too many connections from 127.0.0.1: at most 3 at once' }] });
  // One of the three leaves: there is room again.
  held[0]!.socket.destroy();
  await until('a new connection is served', async () => (await fetchComplete(`${proxy.url}/v2/`)).status === 200);
});

test('a client that stops reading a blob is disconnected after idleTimeout, cached or filling', async (t) => {
  const lines: Array<Record<string, unknown>> = [];
  const { fake, proxy } = await startProxyWithFake(t, {}, { server: { idleTimeout: '1s' }, logger: { level: 'info', stream: { write: (s: string) => lines.push(JSON.parse(s) as Record<string, unknown>) } } });
  const data = randomBytes(64 * 1024 * 1024);
  const digest = sha256(data);
  const path = `/v2/some/repo/blobs/${digest}?ns=fake.example`;
  fake.route(`/v2/some/repo/blobs/${digest}`, blobHandler(data));
  for (const state of ['filling', 'cached']) {
    await t.test(state, async () => {
      const c = open(proxy);
      t.after(() => c.socket.destroy());
      c.socket.write(`GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`);
      await until('the first bytes arrive', () => c.received().includes('\r\n\r\n'));
      // Reads nothing more: the kernel's buffers fill and the server's writes stall.
      c.socket.pause();
      const aborted = (): boolean => lines.some((l) => l.msg === 'response aborted' && l.url === path && l.cache === (state === 'filling' ? 'miss' : 'hit'));
      await until('the server gives up on the client that reads nothing', aborted, 15_000);
      assert.match(c.received(), /^HTTP\/1\.1 200 OK\r\n/);
    });
    // The fill went on without the client.
    if (state === 'filling') await until('the blob is cached', async () => (await fetchComplete(`${proxy.url}${path}`)).headers['x-cache'] === 'HIT', 15_000);
  }
});
