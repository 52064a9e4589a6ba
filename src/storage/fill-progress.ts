/**
 * A fill followed from another process of a group (http/cluster.ts). The coordinator owns every
 * fill; a worker whose client waits for one reads the fill's temp file itself, by what the
 * coordinator tells it of the fill's progress, so the blob's bytes go from the page cache to the
 * client once instead of through the coordinator, a socket and the worker.
 *
 * The coordinator sends `progressLines(fill)`: one line per change, `<state> <written>
 * <deliverable>\n` (what a TailReader reads of the fill: bytes on disk, and what may be sent),
 * ending after `committed` or `failed`. The worker reads them into a `FollowedFill`, which says how far the file may be read:
 * only what is on disk, and the last byte only once the digest is verified, as a TailReader beside
 * the fill sends it.
 */
import { EventEmitter } from 'node:events';
import { open, type FileHandle } from 'node:fs/promises';
import { Readable } from 'node:stream';
import type { Tailed } from './tail-reader.js';

type State = Tailed['state'];
const STATES = new Set<State>(['filling', 'verified', 'committed', 'failed']);
/** A progress line is a few dozen bytes; anything longer is not one. */
const MAX_LINE = 256;

function line(fill: Tailed): string {
  return `${fill.state} ${fill.written} ${fill.deliverable}\n`;
}

/**
 * The coordinator's side: the fill's progress as lines, at most one per turn of the event loop
 * (a fill emits 'progress' per chunk received and per write), ending once the fill is committed
 * or failed. `bytesRead` is 0: this stream carries no blob bytes.
 */
export function progressLines(fill: Tailed): Readable & { bytesRead: number } {
  let scheduled: NodeJS.Immediate | undefined;
  let last = '';
  const send = (): void => {
    scheduled = undefined;
    if (out.destroyed) return;
    const now = line(fill);
    if (now !== last) out.push((last = now));
    if (fill.state === 'committed' || fill.state === 'failed') out.push(null);
    else fill.once('progress', onProgress);
  };
  const onProgress = (): void => {
    scheduled ??= setImmediate(send);
  };
  const out = Object.assign(
    new Readable({
      read: () => undefined,
      destroy: (err, cb) => {
        fill.off('progress', onProgress);
        if (scheduled) clearImmediate(scheduled);
        cb(err);
      },
    }),
    { bytesRead: 0 },
  );
  send();
  return out;
}

/**
 * The worker's side: the fill as the coordinator's lines tell it. `open` finds its file and
 * `until` says how far it may be read; nothing is held in memory. The follower fails when the
 * lines stop before the fill ended (the coordinator went away) or are not progress lines.
 */
export class FollowedFill extends EventEmitter {
  state: State = 'filling';
  written = 0;
  deliverable = 0;
  failure: Error | undefined;
  private buffered = '';

  constructor(
    readonly tmpPath: string,
    readonly finalPath: string,
    lines: Readable,
  ) {
    super();
    this.setMaxListeners(0);
    lines.setEncoding('latin1');
    lines.on('data', (chunk: string) => this.take(chunk));
    // 'close' comes after 'end' and after 'error': lines that stop before the fill ended fail it.
    lines.on('error', (err: Error) => this.fail(err.message));
    lines.on('close', () => this.fail('the coordinator ended the fill\'s progress before the fill ended'));
  }

  /**
   * The fill's file: the temp file, or the final one once renamed into place (this process may
   * not have heard of the rename yet; a name under blobs/ promises its bytes).
   */
  async open(): Promise<FileHandle> {
    try {
      return await open(this.tmpPath, 'r');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      return open(this.finalPath, 'r').catch(() => {
        throw this.failure ?? err;
      });
    }
  }

  /**
   * Resolves with the end (exclusive) of the bytes that may be sent from `pos`: on disk, and short
   * of the last byte until the digest is verified. Waits while there are none yet; resolves with
   * `pos` itself once the fill ended there (the end of a blob of unknown size). Rejects when the
   * fill failed.
   */
  until(pos: number): Promise<number> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (this.state === 'failed') return reject(this.failure);
        const to = Math.min(this.deliverable, this.written);
        if (to > pos) return resolve(to);
        if (this.state !== 'filling') return to === pos ? resolve(pos) : reject(new Error('blob ended before the requested range'));
        this.once('progress', check);
      };
      check();
    });
  }

  private take(chunk: string): void {
    if (this.state === 'committed' || this.state === 'failed') return;
    this.buffered += chunk;
    const cut = this.buffered.lastIndexOf('\n');
    if (cut < 0) {
      if (this.buffered.length > MAX_LINE) this.fail('not a progress line');
      return;
    }
    const lines = this.buffered.slice(0, cut).split('\n');
    this.buffered = this.buffered.slice(cut + 1);
    const [state, ...counts] = lines[lines.length - 1]!.split(' ');
    const [written, deliverable] = counts.map(Number);
    if (!STATES.has(state as State) || counts.length !== 2 || ![written, deliverable].every((n) => Number.isSafeInteger(n) && n! >= 0)) {
      return this.fail('not a progress line');
    }
    this.written = written!;
    this.deliverable = deliverable!;
    if (state === 'failed') return this.fail('the fill failed');
    this.state = state as State;
    this.emit('progress');
  }

  private fail(message: string): void {
    if (this.state === 'committed' || this.state === 'failed') return;
    this.state = 'failed';
    this.failure = new Error(message);
    this.emit('progress');
  }
}
