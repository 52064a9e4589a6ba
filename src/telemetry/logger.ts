/**
 * The process's pino logger: JSON at config.log.level on the batched stdout writer
 * (log-stream.ts), which also formats the request line, or what a test passes instead.
 */
import { pino, type Logger } from 'pino';
import type { Config } from '../core/config.js';
import { LogStream } from './log-stream.js';

/** pino options (with `stream`), true (pino's defaults) or false (silent); undefined: the batched stdout writer. */
export type LoggerOption = boolean | Record<string, unknown> | undefined;

export function makeLogger(config: Config, option: LoggerOption): { log: Logger; logStream: LogStream | undefined } {
  const redact = ['req.headers.authorization'];
  if (option === undefined) {
    const logStream = new LogStream(1);
    return { log: pino({ level: config.log.level, redact }, logStream), logStream };
  }
  if (option === false) return { log: pino({ level: 'silent' }), logStream: undefined };
  const { stream, ...rest } = (option === true ? {} : option) as { stream?: { write(line: string): void } };
  return { log: stream ? pino({ redact, ...rest }, stream) : pino({ redact, ...rest }), logStream: undefined };
}
