/**
 * The one error a bad configuration raises, naming the key at fault. In a file of its own so
 * config.ts and the sections it delegates to (access-config.ts) share it without an import cycle.
 */
export class ConfigError extends Error {
  constructor(key: string, problem: string) {
    super(`config: ${key}: ${problem}`);
    this.name = 'ConfigError';
  }
}
