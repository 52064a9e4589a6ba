/**
 * Coalesces concurrent calls by key: while one call for a key runs, later callers get the same
 * promise (distribution's `inflight` map in registry/proxy, keyed and typed).
 */
export class SingleFlight<T> {
  private readonly running = new Map<string, Promise<T>>();

  get size(): number {
    return this.running.size;
  }

  do(key: string, fn: () => Promise<T>): Promise<T> {
    const existing = this.running.get(key);
    if (existing) return existing;
    const p = fn().finally(() => this.running.delete(key));
    this.running.set(key, p);
    return p;
  }
}
