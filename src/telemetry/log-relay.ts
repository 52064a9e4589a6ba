/**
 * A group's log on one stdout (http/cluster.ts). Each worker writes its JSON lines to a pipe of
 * its own, read by the coordinator, which passes them on whole through its own log writer: the
 * group's stdout has one writer. Processes writing one stdout directly could cut each other's
 * lines: a pipe takes a write whole only up to PIPE_BUF (4096 bytes on Linux; POSIX write(2),
 * "Pipes and FIFOs"), and a longer line waiting for room in a full pipe is taken in parts.
 */
import type { Readable } from 'node:stream';

/** A line this long with no newline yet is passed on as a line of its own rather than held on to. */
export const MAX_LINE = 1024 * 1024;
const NEWLINE = 0x0a;

/** Where relayed lines go: this process's log output. */
export interface LineSink {
  /** false: the output is behind (more waits for it than its high-water mark). */
  write(lines: Buffer): boolean;
  /** Calls `fn` once the output has caught up. */
  onDrain(fn: () => void): void;
}

/**
 * Reads `from` and writes whole lines only to `to` (each write ending in a newline), holding a
 * line's beginning until its end arrives. While `to` is behind, `from` is paused: a stalled
 * stdout backs up into the worker's own pipe and writer, not into this process. What is left
 * when `from` ends gets a newline. Resolves once `from` is closed (ended, or failed: a read error
 * ends the relay) and everything read has been passed on.
 */
export function relayLines(from: Readable, to: LineSink): Promise<void> {
  let held: Buffer[] = [];
  let heldBytes = 0;
  let paused = false;
  const release = (tail: Buffer): void => {
    const lines = held.length === 0 ? tail : Buffer.concat([...held, tail]);
    held = [];
    heldBytes = 0;
    if (to.write(lines) || paused) return;
    paused = true;
    from.pause();
    to.onDrain(() => {
      paused = false;
      from.resume();
    });
  };
  from.on('data', (chunk: Buffer) => {
    const end = chunk.lastIndexOf(NEWLINE) + 1;
    if (end > 0) release(chunk.subarray(0, end));
    if (end === chunk.length) return;
    const rest = chunk.subarray(end);
    held.push(rest);
    heldBytes += rest.length;
    if (heldBytes > MAX_LINE) release(Buffer.from('\n'));
  });
  // A pipe that fails is closed right after: 'close' below ends the relay.
  from.on('error', () => undefined);
  return new Promise<void>((resolve) => {
    from.once('close', () => {
      if (heldBytes > 0) release(Buffer.from('\n'));
      resolve();
    });
  });
}
