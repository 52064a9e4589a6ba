/**
 * The coordinator's relay of its workers' log (src/telemetry/log-relay.ts): only whole lines
 * are passed on, however the pipe cuts them, and nothing read is lost when the pipe closes.
 */
import assert from 'node:assert/strict';
import { PassThrough } from 'node:stream';
import test from 'node:test';
import { MAX_LINE, relayLines } from '../src/telemetry/log-relay.js';

/** What `relayLines` passes on for `chunks`, written in turn, then the stream ended. */
async function relay(chunks: Array<string | Buffer>): Promise<string[]> {
  const from = new PassThrough();
  const out: string[] = [];
  const done = relayLines(from, { write: (lines) => out.push(lines.toString()) > 0, onDrain: () => undefined });
  for (const c of chunks) from.write(c);
  from.end();
  await done;
  return out;
}

test('only whole lines are passed on, however the chunks cut them', async () => {
  const cases: Array<[string, string[], string[]]> = [
    ['whole lines', ['{"a":1}\n{"b":2}\n'], ['{"a":1}\n{"b":2}\n']],
    ['a line cut in two', ['{"a":1}\n{"b"', ':2}\n'], ['{"a":1}\n', '{"b":2}\n']],
    ['a line over three chunks', ['{"a"', ':', '1}\n'], ['{"a":1}\n']],
    ['a chunk with no end of line, then one ending two lines', ['{"a":', '1}\n{"b":2}\n{"c"', ':3}\n'], ['{"a":1}\n{"b":2}\n', '{"c":3}\n']],
    ['an unfinished last line gets its newline when the pipe closes', ['{"a":1}\n{"b":'], ['{"a":1}\n', '{"b":\n']],
    ['nothing', [], []],
  ];
  for (const [what, chunks, expected] of cases) assert.deepEqual(await relay(chunks), expected, what);
});

test('a line longer than MAX_LINE is passed on as a line of its own instead of being held without bound', async () => {
  const part = 'x'.repeat(MAX_LINE / 2 + 1);
  const out = await relay([part, part, 'y\n']);
  assert.deepEqual(
    out.map((l) => l.length),
    [2 * part.length + 1, 2],
  );
  assert.equal(out[0], `${part}${part}\n`);
  assert.equal(out[1], 'y\n');
});

test('while the output is behind, the pipe is paused, and it resumes once the output caught up', async () => {
  const from = new PassThrough();
  const out: string[] = [];
  let behind = true;
  let caughtUp: (() => void) | undefined;
  const done = relayLines(from, {
    write: (lines) => {
      out.push(lines.toString());
      return !behind;
    },
    onDrain: (fn) => void (caughtUp = fn),
  });
  from.write('{"a":1}\n');
  await new Promise((r) => setImmediate(r));
  assert.equal(from.isPaused(), true, 'paused: what the worker writes next waits in its own pipe');
  from.write('{"b":2}\n');
  await new Promise((r) => setImmediate(r));
  assert.deepEqual(out, ['{"a":1}\n'], 'nothing more read while the output is behind');
  behind = false;
  caughtUp!();
  await new Promise((r) => setImmediate(r));
  assert.equal(from.isPaused(), false);
  from.end();
  await done;
  assert.deepEqual(out, ['{"a":1}\n', '{"b":2}\n']);
});

test('a pipe that fails ends the relay without an uncaught error, its unfinished line passed on', async () => {
  const from = new PassThrough();
  const out: string[] = [];
  const done = relayLines(from, { write: (lines) => out.push(lines.toString()) > 0, onDrain: () => undefined });
  from.write('{"a":1}\n{"b"');
  await new Promise((r) => setImmediate(r));
  from.destroy(new Error('read ECONNRESET'));
  await done;
  assert.deepEqual(out, ['{"a":1}\n', '{"b"\n']);
});
