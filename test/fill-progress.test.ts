/**
 * A fill followed from another process (src/storage/fill-progress.ts): the coordinator's progress
 * lines, read back by a worker's FollowedFill, say how far the fill's temp file may be read, as a
 * TailReader beside the fill reads it. Pinned on a real BlobStore: the follower gets the verified
 * blob, never a complete-looking body when the fill fails or the lines stop, and anything but
 * progress lines fails it.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { PassThrough, Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import test, { type TestContext } from 'node:test';
import { BlobStore } from '../src/storage/blob-store.js';
import { FollowedFill, progressLines } from '../src/storage/fill-progress.js';
import { sha256 } from './helpers/seed.js';
import { tempDir } from './helpers/tools.js';

/** Reads bytes [start, end) as a worker does: as far as `until` allows, waiting for more. */
async function read(fill: FollowedFill, start: number, end: number): Promise<{ body: Buffer; error: string | undefined }> {
  const chunks: Buffer[] = [];
  const handle = await fill.open();
  try {
    for (let pos = start; pos < end; ) {
      const to = Math.min(end, await fill.until(pos));
      if (to <= pos) break;
      const buf = Buffer.alloc(to - pos);
      await handle.read(buf, 0, buf.length, pos);
      chunks.push(buf);
      pos = to;
    }
    return { body: Buffer.concat(chunks), error: undefined };
  } catch (err) {
    return { body: Buffer.concat(chunks), error: (err as Error).message };
  } finally {
    await handle.close();
  }
}

/** A fill in a fresh store, its lines carried over a pipe (as over the coordinator's socket) to a follower. */
async function followed(t: TestContext, data: Buffer, announced: string, size: number | undefined = data.length) {
  const store = new BlobStore(tempDir(t, 'follow'));
  await store.init();
  const fill = await store.createFill(announced, size);
  t.after(() => fill.fail(new Error('test over')));
  const wire = new PassThrough();
  progressLines(fill).pipe(wire);
  return { fill, follower: new FollowedFill(fill.tmpPath, fill.finalPath, wire) };
}

test('a follower reads the blob as the fill writes it, and the final file once the fill is renamed into place', async (t) => {
  const data = randomBytes(3 * 1024 * 1024 + 7);
  const { fill, follower } = await followed(t, data, sha256(data));
  const reading = read(follower, 0, data.length);
  await pipeline(Readable.from([data.subarray(0, 1000), data.subarray(1000, 2_000_000), data.subarray(2_000_000)]), fill.sink());
  await fill.commit();
  const { body, error } = await reading;
  assert.equal(error, undefined);
  assert.ok(body.equals(data));

  // A follower that opens only after the rename (it had not heard of it yet) reads the final file.
  const late = new FollowedFill(fill.tmpPath, fill.finalPath, Readable.from([`verified ${data.length} ${data.length}\n`, `committed ${data.length} ${data.length}\n`]));
  const again = await read(late, 10, 20);
  assert.equal(again.error, undefined);
  assert.ok(again.body.equals(data.subarray(10, 20)));
});

test('a follower of a fill whose digest does not match fails before the last byte: never a complete-looking body', async (t) => {
  const data = randomBytes(512 * 1024);
  const { fill, follower } = await followed(t, data, sha256('something else'));
  const reading = read(follower, 0, data.length);
  await pipeline(Readable.from([data]), fill.sink());
  await assert.rejects(fill.commit());
  await fill.fail(new Error('digest mismatch'));
  const { body, error } = await reading;
  assert.equal(error, 'the fill failed');
  assert.ok(body.length < data.length, `${body.length} of ${data.length} bytes`);
});

test('a range of a fill in progress: the follower reads exactly those bytes', async (t) => {
  const data = randomBytes(1024 * 1024);
  const { fill, follower } = await followed(t, data, sha256(data));
  const reading = read(follower, 300_000, 600_001);
  await pipeline(Readable.from([data]), fill.sink());
  await fill.commit();
  const { body, error } = await reading;
  assert.equal(error, undefined);
  assert.ok(body.equals(data.subarray(300_000, 600_001)));
});

test('a blob of unknown size (no Content-Length upstream): the follower reads to where the verified fill ended', async (t) => {
  const data = randomBytes(700_000);
  const { fill, follower } = await followed(t, data, sha256(data), undefined);
  const reading = read(follower, 0, Infinity);
  await pipeline(Readable.from([data.subarray(0, 100_000), data.subarray(100_000)]), fill.sink());
  await fill.commit();
  const { body, error } = await reading;
  assert.equal(error, undefined);
  assert.ok(body.equals(data));
});

const LINES: Array<{ what: string; lines: string[]; state: string; failure?: string; written?: number }> = [
  { what: 'progress', lines: ['filling 10 9\n'], state: 'filling', written: 10 },
  { what: 'several lines in one chunk: the last counts', lines: ['filling 1 1\nfilling 5 5\nverified 8 8\n'], state: 'verified', written: 8 },
  { what: 'a line split across chunks', lines: ['filling 10 1', '0\n'], state: 'filling', written: 10 },
  { what: 'committed, then the end', lines: ['committed 4 4\n'], state: 'committed', written: 4 },
  { what: 'the fill failed', lines: ['failed 4 3\n'], state: 'failed', failure: 'the fill failed' },
  { what: 'an unknown state', lines: ['done 4 4\n'], state: 'failed', failure: 'not a progress line' },
  { what: 'a negative count', lines: ['filling -1 0\n'], state: 'failed', failure: 'not a progress line' },
  { what: 'a missing count', lines: ['filling 1\n'], state: 'failed', failure: 'not a progress line' },
  { what: 'a count too many', lines: ['filling 1 1 1\n'], state: 'failed', failure: 'not a progress line' },
  { what: 'a line without end', lines: ['x'.repeat(300)], state: 'failed', failure: 'not a progress line' },
];

for (const c of LINES) {
  test(`a followed fill's lines: ${c.what}`, async () => {
    const wire = new PassThrough();
    const fill = new FollowedFill('/nonexistent/tmp', '/nonexistent/final', wire);
    for (const l of c.lines) wire.write(l);
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(fill.state, c.state);
    assert.equal(fill.failure?.message, c.failure);
    if (c.written !== undefined) assert.equal(fill.written, c.written);
  });
}

test('lines that stop before the fill ended (the coordinator went away) fail the follower', async () => {
  for (const end of ['end', 'destroy'] as const) {
    const wire = new PassThrough();
    const fill = new FollowedFill('/nonexistent/tmp', '/nonexistent/final', wire);
    wire.write('verified 9 9\n');
    if (end === 'end') wire.end();
    else wire.destroy(new Error('socket hang up'));
    await new Promise((resolve) => wire.once('close', resolve));
    assert.equal(fill.state, 'failed', end);
    assert.match(fill.failure?.message ?? '', end === 'end' ? /ended the fill's progress before the fill ended/ : /socket hang up/);
  }
});
