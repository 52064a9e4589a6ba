/** The slice of pino the modules below the routes log with (Fastify's logger is one). */
export interface Logger {
  info(obj: object, msg: string): void;
  warn(obj: object, msg: string): void;
}
