/**
 * How many CPUs this process may use: the scheduler's affinity (os.availableParallelism), capped by
 * a cgroup CPU quota (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), as a
 * container's `resources.limits.cpu` sets it. A quota of 1.5 CPUs counts as 2: a worker per
 * started CPU, never fewer than one.
 */
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';

function read(path: string): string | undefined {
  try {
    return readFileSync(path, 'utf8').trim();
  } catch {
    return undefined;
  }
}

/** The quota in CPUs, or undefined when there is none (or no cgroup file to say so). */
export function cgroupQuota(root = '/sys/fs/cgroup'): number | undefined {
  const v2 = read(`${root}/cpu.max`);
  if (v2 !== undefined) {
    const [quota, period] = v2.split(/\s+/);
    return quota === 'max' || !quota || !period ? undefined : Number(quota) / Number(period);
  }
  const quota = Number(read(`${root}/cpu/cpu.cfs_quota_us`) ?? -1);
  const period = Number(read(`${root}/cpu/cpu.cfs_period_us`) ?? 0);
  return quota > 0 && period > 0 ? quota / period : undefined;
}

export function availableCpus(root?: string): number {
  const quota = cgroupQuota(root);
  const cpus = availableParallelism();
  return Math.max(1, quota === undefined || !Number.isFinite(quota) ? cpus : Math.min(cpus, Math.ceil(quota)));
}
