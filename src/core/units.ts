/** Sizes and durations as operators write them in the config (512MiB, 30s) and read them in output (24.0 MiB). */

const DURATION_UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const SIZE_UNITS: Record<string, number> = { B: 1, KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, TiB: 1024 ** 4, KB: 1e3, MB: 1e6, GB: 1e9, TB: 1e12 };

/** Milliseconds from `30s`, `5m`, `24h`, `250ms` or a number of seconds; undefined when it is none of these. */
export function parseDuration(value: unknown): number | undefined {
  if (typeof value === 'number' && Number.isFinite(value) && value >= 0) return value * 1000;
  const m = typeof value === 'string' ? /^(\d+(?:\.\d+)?)(ms|s|m|h|d)$/.exec(value.trim()) : null;
  return m ? Math.round(Number(m[1]) * DURATION_UNITS[m[2]!]!) : undefined;
}

/** Bytes from `512MiB`, `50GiB`, `1GB` or a whole number of bytes; undefined when it is none of these. */
export function parseSize(value: unknown): number | undefined {
  if (typeof value === 'number' && Number.isInteger(value) && value >= 0) return value;
  const m = typeof value === 'string' ? /^(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)$/.exec(value.trim()) : null;
  return m ? Math.round(Number(m[1]) * SIZE_UNITS[m[2]!]!) : undefined;
}

/** Byte counts for people: 512 B, 64.0 KiB, 24.0 MiB, 1.50 GiB. */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 ** 2) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}
