/**
 * The memory all fills share (cache.fillMemory), so that memory follows configuration, never the
 * number or the speed of clients.
 */

/**
 * How far disk writes may lag behind the network per fill before the upstream is paused: at most
 * this, and less when many fills share the FillMemory (never less than MIN_WRITE_WINDOW).
 */
const WRITE_WINDOW = 4 * 1024 * 1024;
const MIN_WRITE_WINDOW = 256 * 1024;

/**
 * What all fills share, one budget of `limit` bytes: the write windows (chunks received but not yet
 * on disk: `limit` split among the fills, at least MIN_WRITE_WINDOW each), and in what those leave,
 * the chunks already on disk that fills keep for readers a little behind. A reader further behind,
 * or one that stopped reading, reads the temp file instead.
 */
export class FillMemory {
  /** Bytes on disk that fills still keep in memory for readers behind them. */
  retained = 0;
  /** Bytes received by all fills and not yet on disk. */
  pending = 0;
  /** Fills in progress. */
  fills = 0;
  constructor(readonly limit: number) {}

  /** Whether `bytes` more may be kept for readers behind, besides what is kept already. */
  mayRetain(bytes: number): boolean {
    return this.retained + this.pending + bytes <= this.limit;
  }

  /** How far one fill's disk writes may lag behind the network now. */
  get writeWindow(): number {
    return Math.max(MIN_WRITE_WINDOW, Math.min(WRITE_WINDOW, this.limit / Math.max(1, this.fills)));
  }
}
