/**
 * The time, in milliseconds since the epoch. Everything that decides by time (tag freshness, the
 * breaker's cool-down, Retry-After, access times, expiry) takes one of these instead of calling
 * Date.now(), so tests can move time forward instead of sleeping.
 */
export type Clock = () => number;

export const systemClock: Clock = Date.now;
