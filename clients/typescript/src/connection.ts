/**
 * One connection to a key server: a gRPC (HTTP/2) transport with the caller's bearer token on
 * every call, and a typed client for each service, generated from the server's `proto/`.
 */
import { createClient, type Client, type Interceptor } from '@connectrpc/connect';
import { createGrpcTransport } from '@connectrpc/connect-node';

import { AuditService } from './gen/keyserver/v1/audit_service_pb.js';
import { KeyService } from './gen/keyserver/v1/key_service_pb.js';
import { MasterKeyService } from './gen/keyserver/v1/master_key_service_pb.js';
import { SafetyNumberService } from './gen/keyserver/v1/safety_number_service_pb.js';
import { SessionService } from './gen/keyserver/v1/session_service_pb.js';

/** Where the server is and who is calling. */
export interface ConnectOptions {
  /** `http://host:port`, or `https://host:port` for a server with TLS. */
  url: string;
  /**
   * The bearer token, or a function returning the current one (called before every call, so a
   * backend can hand out fresh tokens without reconnecting).
   */
  token: string | (() => string | Promise<string>);
  /** PEM of the certificate authority that signed an `https://` server's certificate. */
  caCert?: string | Buffer;
  /** Deadline of each call in milliseconds (default 10 s). */
  timeoutMs?: number;
}

/** Typed clients of every service of one key server. */
export interface Keyserver {
  keys: Client<typeof KeyService>;
  sessions: Client<typeof SessionService>;
  safetyNumbers: Client<typeof SafetyNumberService>;
  masterKeys: Client<typeof MasterKeyService>;
  audit: Client<typeof AuditService>;
}

/** Opens a connection; calls go out over one HTTP/2 session, opened on first use. */
export function connect(options: ConnectOptions): Keyserver {
  const url = new URL(options.url);
  if (url.protocol !== 'http:' && url.protocol !== 'https:') {
    throw new Error(
      `the key server URL must start with http:// or https://, got "${options.url}"`,
    );
  }
  const { token } = options;
  const bearer: Interceptor = (next) => async (request) => {
    const current = typeof token === 'function' ? await token() : token;
    request.header.set('authorization', `Bearer ${current}`);
    return next(request);
  };
  const transport = createGrpcTransport({
    baseUrl: url.origin,
    interceptors: [bearer],
    defaultTimeoutMs: options.timeoutMs ?? 10_000,
    nodeOptions: options.caCert === undefined ? {} : { ca: options.caCert },
  });
  return {
    keys: createClient(KeyService, transport),
    sessions: createClient(SessionService, transport),
    safetyNumbers: createClient(SafetyNumberService, transport),
    masterKeys: createClient(MasterKeyService, transport),
    audit: createClient(AuditService, transport),
  };
}
