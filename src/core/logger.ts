/** The slice of pino the modules below http/ log with, so they depend on no logging library. */
export interface Logger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}
