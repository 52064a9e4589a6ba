/**
 * The server's stdout log (src/telemetry/log-stream.ts): the hand-formatted request line says exactly what pino
 * would, lines keep their order whoever formats them, and nothing batched is lost when the
 * process ends: flushed, exiting, or crashing.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import test from 'node:test';
import { pino } from 'pino';
import { LogStream, type RequestLine } from '../src/telemetry/log-stream.js';
import { tempDir } from './helpers/tools.js';

const SRC = join(import.meta.dirname, '..', 'src', 'telemetry', 'log-stream.ts');
/** A lost flush callback shows as a hang: fail instead. */
const T = { timeout: 30_000 };

/** A LogStream writing to a file of its own, its flush as a promise, and ways to read that file back. */
function fileStream(t: import('node:test').TestContext): { stream: LogStream; path: string; flushed: () => Promise<void>; lines: () => Promise<Array<Record<string, unknown>>>; raw: () => Promise<string> } {
  const path = join(tempDir(t, 'log'), 'log');
  const fd = openSync(path, 'w');
  const stream = new LogStream(fd);
  const flushed = (): Promise<void> => new Promise<void>((resolve, reject) => stream.flush((err) => (err ? reject(err) : resolve())));
  t.after(async () => {
    await flushed();
    closeSync(fd);
  });
  const raw = async (): Promise<string> => {
    await flushed();
    return readFileSync(path, 'utf8');
  };
  return { stream, path, flushed, raw, lines: async () => (await raw()).trimEnd().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>) };
}

test('the request line is the line pino writes for the same fields, key for key', T, async (t) => {
  const base: RequestLine = { reqId: 'req-1', method: 'GET', url: '/v2/library/alpine/manifests/3.20', status: 200, upstream: 'docker.io', name: 'library/alpine', reference: '3.20', cache: 'hit', bytes: 1234, durationMs: 0 };
  const cases: Array<[string, RequestLine]> = [
    ['a cached manifest', base],
    ['no upstream fields (a request outside /v2)', { reqId: 'req-2', method: 'HEAD', url: '/v2/', status: 200, bytes: 0, durationMs: 3 }],
    ['quotes, backslashes and control characters in the URL', { ...base, url: '/v2/a"b\\c/manifests/x\u0001\u001f\u007f' }],
    // Node hands the request target over as latin1: bytes 0x80-0xff arrive as U+0080-U+00FF.
    ['bytes past ASCII in the URL', { ...base, url: '/v2/caf\u00c3\u00a9/manifests/\u00ff' }],
    ['quotes, backslashes, control and non-ASCII characters in every string field', { ...base, url: '/v2/\u2028/manifests/x', reqId: 'req-"1', method: 'G\\ET', upstream: 'a"b', name: 'n\n', reference: 'r\t', cache: '\u2028' }],
    ['a long URL', { ...base, url: `/v2/${'a/'.repeat(4000)}manifests/x` }],
    ['an error answer', { ...base, status: 404, cache: 'error', bytes: 0, durationMs: 1200 }],
    // The audit fields: the client's address and the authenticated user, in the order accounting.ts builds them.
    ['client and user', { reqId: 'req-3', method: 'GET', url: '/v2/team/app/manifests/v1', status: 200, client: '10.0.0.7', user: 'alice', upstream: 'docker.io', name: 'team/app', reference: 'v1', cache: 'hit', bytes: 1, durationMs: 0 }],
    ['an anonymous client refused (no user)', { reqId: 'req-4', method: 'GET', url: '/v2/', status: 401, client: '::ffff:127.0.0.1', bytes: 80, durationMs: 0 }],
    ['quotes and non-ASCII in client and user', { reqId: 'req-5', method: 'GET', url: '/v2/', status: 200, client: 'a"b\\c', user: 'j\u00f6rg\n', bytes: 2, durationMs: 0 }],
  ];
  for (const [name, fields] of cases) {
    const ours = fileStream(t);
    ours.stream.request(fields);
    let theirs = '';
    pino({ level: 'info' }, { write: (s: string) => (theirs += s) }).info(fields, 'request');
    const strip = (line: string): string => line.replace(/"time":\d+,/, '');
    assert.equal(strip(await ours.raw()), strip(theirs), name);
  }
});

test('lines keep their order: pino lines, request lines and lines longer than a batch', T, async (t) => {
  const { stream, lines } = fileStream(t);
  const log = pino({ level: 'info' }, stream);
  const line: RequestLine = { reqId: 'req-1', method: 'GET', url: '/v2/x/manifests/y', status: 200, bytes: 0, durationMs: 0 };
  const want: string[] = [];
  for (let i = 0; i < 3000; i++) {
    if (i % 3 === 0) stream.request({ ...line, reqId: `req-${i}` });
    else if (i % 500 === 1) log.info({ i, filler: 'x'.repeat(40_000) }, `long ${i}`);
    else log.info({ i }, `line ${i}`);
    want.push(i % 3 === 0 ? `req-${i}` : String(i));
  }
  assert.deepEqual(
    (await lines()).map((l) => (l.msg === 'request' ? l.reqId : String(l.i))),
    want,
  );
});

test('request lines queued back to back come out whole and in order, long ones too', T, async (t) => {
  const { stream, lines } = fileStream(t);
  const log = pino({ level: 'info' }, stream);
  // 1,000 in a row: queues of 32 formatted in turn, batches filling up in the middle of one, and
  // every 97th line longer than a third of a batch, which goes out on its own.
  const url = (i: number): string => (i % 97 === 0 ? `/v2/${'a/'.repeat(12_000)}manifests/${i}` : `/v2/x/manifests/${i}`);
  for (let i = 0; i < 1000; i++) stream.request({ reqId: `req-${i}`, method: 'GET', url: url(i), status: 200, bytes: i, durationMs: 0 });
  log.info('after');
  const got = await lines();
  assert.equal(got.length, 1001);
  assert.deepEqual(
    got.slice(0, 1000).map((l) => [l.reqId, l.url, l.bytes]),
    Array.from({ length: 1000 }, (_, i) => [`req-${i}`, url(i), i]),
  );
  assert.equal(got[1000]!.msg, 'after');
});

test('flush calls back once everything written before it is in the file', T, async (t) => {
  const { stream, path, flushed } = fileStream(t);
  const log = pino({ level: 'info' }, stream);
  for (let i = 0; i < 5000; i++) log.info({ i }, 'before flush');
  await flushed();
  assert.equal(readFileSync(path, 'utf8').trimEnd().split('\n').length, 5000);
});

test('batched lines reach stdout however the process ends', T, async (t) => {
  const endings: Array<[string, string]> = [
    ['the event loop runs dry', ''],
    ['process.exit()', 'process.exit(0);'],
    ['an uncaught exception', "setImmediate(() => { throw new Error('boom'); });"],
  ];
  for (const [name, ending] of endings) {
    await t.test(name, () => {
      const script = `import { pino } from 'pino';
import { LogStream } from ${JSON.stringify(SRC)};
const stream = new LogStream();
pino({ level: 'info' }, stream).info('from pino');
for (let i = 0; i < 40; i++) stream.request({ reqId: 'req-' + i, method: 'GET', url: '/v2/', status: 200, bytes: 0, durationMs: 0 });
${ending}`;
      const child = spawnSync(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { cwd: join(import.meta.dirname, '..'), encoding: 'utf8', timeout: 20_000 });
      const msgs = child.stdout.trimEnd().split('\n').map((l) => (JSON.parse(l) as { msg: string }).msg);
      // 40: one queue of 32 formatted, 8 still queued when the process ends.
      assert.deepEqual(msgs, ['from pino', ...Array<string>(40).fill('request')], child.stderr);
    });
  }
});
