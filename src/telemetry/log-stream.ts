/**
 * The server's log on stdout: JSON lines, written asynchronously in batches.
 *
 * pino formats every line but one; LogStream batches them. Lines are encoded straight into one
 * 64 KiB buffer, which goes to sonic-boom (pino's asynchronous writer) when full, after 250 ms, on
 * flush, and before the process exits. The request line, one per answered request, is always the
 * same twelve fields (some optional) and is formatted here: cheaper per line than pino's generic serialiser, on the
 * warm path of every pull (README, Performance, "Why the warm path looks the way it does").
 *
 * Request lines are queued and formatted QUEUE at a time, not one per request: formatted in a
 * batch, a line costs less than between requests (same section).
 * Queued lines reach the batch before any later line, so the order of lines is kept; none waits
 * longer than the 250 ms a batch may wait anyway.
 */
import { writeSync } from 'node:fs';
import { hostname } from 'node:os';
import { pino } from 'pino';

/** Batch size. A line longer than a third of it (UTF-8 takes up to 3 bytes per UTF-16 unit) goes on its own. */
const BATCH = 64 * 1024;
const LONG_LINE = BATCH / 3;
/** Request lines queued before they are formatted. */
const QUEUE = 32;

/** sonic-boom sets `destroyed` once ended; its types leave it out. */
type Destination = ReturnType<typeof pino.destination> & { readonly destroyed?: boolean };

export class LogStream {
  private buf = Buffer.allocUnsafe(BATCH);
  /** buf[0, handed) went to sonic-boom, which still holds it: never written again. buf[handed, used) is the batch. */
  private handed = 0;
  private used = 0;
  private readonly dest: Destination;
  private readonly base = `,"pid":${process.pid},"hostname":${JSON.stringify(hostname())}`;
  /** Request lines not formatted yet, with the time each was logged. */
  private times: number[] = [];
  private queued: RequestLine[] = [];
  /** Relays waiting for stdout to catch up (onDrain). */
  private drainWaiters: Array<() => void> = [];

  constructor(private readonly fd = 1) {
    // Ours run first: pino ends its destination on 'beforeExit' and flushes it on 'exit'.
    process.prependListener('beforeExit', () => this.handOff());
    process.prependListener('exit', () => this.flushSync());
    // minLength 1, not 0: with 0, sonic-boom's flush(cb) calls back before the write in flight ends.
    this.dest = pino.destination({ dest: fd, sync: false, minLength: 1, contentMode: 'buffer' });
    setInterval(() => this.handOff(), 250).unref();
  }

  /** pino's interface: one serialised line, newline included. */
  write(line: string): boolean {
    this.format();
    this.append(line);
    return true;
  }

  private append(line: string): void {
    if (line.length > LONG_LINE) {
      this.handOff();
      this.send(Buffer.from(line));
      return;
    }
    if (this.used + line.length * 3 > BATCH) {
      this.handOff();
      this.buf = Buffer.allocUnsafe(BATCH);
      this.handed = this.used = 0;
    }
    this.used += this.buf.write(line, this.used);
  }

  /**
   * Whole lines another process wrote (a worker's: log-relay.ts), passed on as they are, after
   * what is batched here. false: more waits for stdout than sonic-boom's high-water mark.
   */
  lines(bytes: Buffer): boolean {
    this.handOff();
    return this.send(bytes);
  }

  /** Calls `fn` once everything handed to sonic-boom has been written (one listener for every relay that waits). */
  onDrain(fn: () => void): void {
    if (this.dest.destroyed) return fn();
    if (this.drainWaiters.push(fn) > 1) return;
    this.dest.once('drain', () => {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const f of waiters) f();
    });
  }

  /** The request line, field for field what `log.info(fields, 'request')` writes (test/log.test.ts compares them). */
  request(f: RequestLine): void {
    this.times.push(Date.now());
    if (this.queued.push(f) >= QUEUE) this.format();
  }

  /** The queued request lines into the batch. */
  private format(): void {
    if (this.queued.length === 0) return;
    const { times, queued } = this;
    // Swapped out first: append() may hand off, and handOff() formats.
    this.times = [];
    this.queued = [];
    for (let i = 0; i < queued.length; i++) this.append(this.line(times[i]!, queued[i]!));
  }

  private line(time: number, f: RequestLine): string {
    let line = `{"level":30,"time":${time}${this.base},"reqId":${quote(f.reqId)},"method":${quote(f.method)},"url":${quote(f.url)},"status":${f.status}`;
    if (f.client !== undefined) line += `,"client":${quote(f.client)}`;
    if (f.user !== undefined) line += `,"user":${quote(f.user)}`;
    if (f.upstream !== undefined) line += `,"upstream":${quote(f.upstream)}`;
    if (f.name !== undefined) line += `,"name":${quote(f.name)}`;
    if (f.reference !== undefined) line += `,"reference":${quote(f.reference)}`;
    if (f.cache !== undefined) line += `,"cache":${quote(f.cache)}`;
    return `${line},"bytes":${f.bytes},"durationMs":${f.durationMs},"msg":"request"}\n`;
  }

  /**
   * Hands the batch to sonic-boom as a slice of buf, whose writes stay asynchronous. Slices of one
   * buffer, not a buffer each: with stdout stalled, what waits is the log, not 64 KiB per hand-off.
   */
  private handOff(): void {
    this.format();
    if (this.used === this.handed) return;
    this.send(this.buf.subarray(this.handed, this.used));
    this.handed = this.used;
  }

  /** To sonic-boom; once pino has ended it (at 'beforeExit'), straight to the file descriptor. */
  private send(bytes: Buffer): boolean {
    if (!this.dest.destroyed) return this.dest.write(bytes as unknown as string);
    writeAll(this.fd, bytes);
    return true;
  }

  /** pino's logger.flush(cb) calls this: everything written so far reaches the file descriptor, then cb. */
  flush(cb?: (err?: Error) => void): void {
    this.handOff();
    this.dest.flush(cb);
  }

  /**
   * Everything written so far, synchronously: what sonic-boom holds, then the batch (handing it
   * off would start an asynchronous write). Runs at exit, so it never throws.
   */
  flushSync(): void {
    this.format();
    try {
      if (!this.dest.destroyed) this.dest.flushSync();
    } catch {
      // EPIPE or EAGAIN on the way out: the batch below is still tried.
    }
    const rest = this.buf.subarray(this.handed, this.used);
    this.handed = this.used;
    writeAll(this.fd, rest);
  }
}

/** Printable ASCII but `"` and `\\`: JSON leaves these as they are. */
const NEEDS_ESCAPE = /[^\x20\x21\x23-\x5b\x5d-\x7e]/;

/**
 * A JSON string. Request fields are nearly always plain ASCII, which is quoted directly (cheaper
 * than JSON.stringify: README, Performance); anything else goes to JSON.stringify.
 */
function quote(v: string): string {
  return NEEDS_ESCAPE.test(v) ? JSON.stringify(v) : `"${v}"`;
}

const pause = new Int32Array(new SharedArrayBuffer(4));

/** Writes all of `bytes` synchronously, waiting out EAGAIN (a non-blocking pipe) for up to about 100 ms; never throws. */
function writeAll(fd: number, bytes: Buffer): void {
  let off = 0;
  for (let retries = 0; off < bytes.length; ) {
    try {
      off += writeSync(fd, bytes, off);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EAGAIN' || ++retries > 100) return;
      Atomics.wait(pause, 0, 0, 1);
    }
  }
}

export interface RequestLine {
  reqId: string;
  method: string;
  url: string;
  status: number;
  /** The client's address (server.trustProxy honoured) and the authenticated user (absent: anonymous): the audit fields. */
  client?: string;
  user?: string;
  upstream?: string;
  name?: string;
  reference?: string;
  cache?: string;
  bytes: number;
  durationMs: number;
}
