/**
 * One `Range: bytes=…` request header against a blob of known size (RFC 9110 §14.1.2).
 * Multi-range requests are answered with the whole blob (200), which RFC 9110 §14.2 allows and
 * containers/image accepts for its chunked pulls (docs/clients.md, "Range requests").
 */
import { OciError } from './errors.js';

export interface ByteRange {
  start: number;
  /** inclusive */
  end: number;
}

/** Returns undefined to serve the whole blob, a range for a 206, or throws RANGE_INVALID (416). */
export function parseRange(header: string | undefined, size: number): ByteRange | undefined {
  if (header === undefined) return undefined;
  const m = /^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$/i.exec(header);
  if (!m) {
    // Another unit or several ranges: ignoring Range is always permitted (RFC 9110 §14.2).
    if (/^\s*bytes\s*=/i.test(header) && header.includes(',')) return undefined;
    if (!/^\s*bytes\s*=/i.test(header)) return undefined;
    throw unsatisfiable(size, 'malformed Range header');
  }
  const [, first, last] = m as unknown as [string, string, string];
  if (first === '' && last === '') throw unsatisfiable(size, 'malformed Range header');
  let start: number;
  let end: number;
  if (first === '') {
    // suffix range: the last N bytes
    const n = Number(last);
    if (n === 0) throw unsatisfiable(size, 'empty suffix range');
    start = Math.max(0, size - n);
    end = size - 1;
  } else {
    start = Number(first);
    end = last === '' ? size - 1 : Math.min(Number(last), size - 1);
    if (last !== '' && Number(last) < start) throw unsatisfiable(size, 'range end before start');
  }
  if (start >= size || !Number.isSafeInteger(start)) throw unsatisfiable(size, `range starts at or after the blob's end (${size} bytes)`);
  return { start, end };
}

function unsatisfiable(size: number, message: string): OciError {
  return new OciError('RANGE_INVALID', message, { headers: { 'content-range': `bytes */${size}` } });
}

export function contentRange(range: ByteRange, size: number): string {
  return `bytes ${range.start}-${range.end}/${size}`;
}
