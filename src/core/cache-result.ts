/**
 * How a request was answered, in the `X-Cache` header, the request log and the metrics:
 * - hit: from the cache, no upstream asked;
 * - miss: fetched from the upstream and cached;
 * - revalidated: cached, and the upstream confirmed it is still current (a HEAD);
 * - stale: cached, served because the upstream is unavailable or offline;
 * - passthrough: relayed without caching (tag lists, referrers, a type the cache does not hold,
 *   or a blob streamed while storage is full);
 * - error: answered with an error.
 */
export type CacheResult = 'hit' | 'miss' | 'stale' | 'revalidated' | 'passthrough' | 'error';
