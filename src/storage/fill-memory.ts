/**
 * The memory all fills share (cache.fillMemory), so that memory follows configuration, never the
 * number or the speed of clients.
 */

/**
 * How far disk writes may lag behind the network per fill before the upstream is paused: at most
 * this, and less when many fills share the FillMemory (never less than MIN_WRITE_WINDOW).
 */
const WRITE_WINDOW = 4 * 1024 * 1024;
export const MIN_WRITE_WINDOW = 256 * 1024;

/**
 * What all fills share: the chunks on disk they keep for readers behind (at most `limit` in all:
 * a reader further behind, or one that stopped reading, reads the temp file instead), and the
 * write windows (`limit` split among the fills, at least MIN_WRITE_WINDOW each).
 */
export class FillMemory {
  /** Bytes on disk that fills still keep in memory for readers behind them. */
  retained = 0;
  /** Fills in progress. */
  fills = 0;
  constructor(readonly limit: number) {}

  /** How far one fill's disk writes may lag behind the network now. */
  get writeWindow(): number {
    return Math.max(MIN_WRITE_WINDOW, Math.min(WRITE_WINDOW, this.limit / Math.max(1, this.fills)));
  }
}
