/**
 * Knowing when a response is over (src/http/response-gone.ts), which every in-flight count rests
 * on: a client that hangs up mid-body is one end of one response, never two. Counted twice, the
 * accounting's in-flight count went below zero and a later drain (SIGTERM) waited its whole
 * shutdownTimeout for a count that could never reach zero again.
 */
import assert from 'node:assert/strict';
import { createServer, type ServerResponse } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import test, { type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { Accounting } from '../src/http/accounting.js';
import { onResponseGone } from '../src/http/response-gone.js';
import { Stats } from '../src/http/status.js';
import { Metrics } from '../src/telemetry/metrics.js';

/** A server whose every response sends its head and 64 KiB, then waits; `onResponse` sees each. */
async function holdingServer(t: TestContext, onResponse: (res: ServerResponse) => void): Promise<number> {
  const server = createServer((_req, res) => {
    onResponse(res);
    res.writeHead(200, { 'content-length': String(1024 * 1024) });
    res.write(Buffer.alloc(64 * 1024));
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => new Promise<void>((resolve) => server.close(() => resolve())));
  return (server.address() as AddressInfo).port;
}

/** A client that asks, takes the first bytes of the answer and hangs up. */
async function hangUpMidBody(port: number): Promise<void> {
  await new Promise<void>((resolve, reject) => {
    const socket = connect(port, '127.0.0.1', () => socket.write('GET /blob HTTP/1.1\r\nHost: test\r\n\r\n'));
    socket.once('data', () => {
      socket.destroy();
      resolve();
    });
    socket.once('error', reject);
  });
}

test('a client that hangs up mid-body ends its response once', async (t) => {
  let calls = 0;
  let seen!: ServerResponse;
  const port = await holdingServer(t, (res) => {
    seen = res;
    onResponseGone(res, () => calls++);
  });
  await hangUpMidBody(port);
  await new Promise((resolve) => seen.once('close', resolve));
  await sleep(50);
  assert.equal(calls, 1);
});

test('after a client hung up mid-body, nothing is in flight: a drain returns at once', async (t) => {
  const accounting = new Accounting(new Metrics(), new Stats(), () => undefined, () => undefined);
  let seen!: ServerResponse;
  const port = await holdingServer(t, (res) => {
    seen = res;
    accounting.track(res, () => undefined);
  });
  await hangUpMidBody(port);
  await new Promise((resolve) => seen.once('close', resolve));
  await sleep(50);
  // A count gone below zero never reaches zero again: the drain would wait for its whole time.
  const drained = await Promise.race([accounting.drain(60_000).then(() => 'drained'), sleep(2000).then(() => 'still waiting')]);
  assert.equal(drained, 'drained');
});
