/** The generated message types and service descriptors, for calls beyond the helpers. */
export * from './gen/keyserver/v1/audit_service_pb.js';
export * from './gen/keyserver/v1/key_service_pb.js';
export * from './gen/keyserver/v1/master_key_service_pb.js';
export * from './gen/keyserver/v1/safety_number_service_pb.js';
export * from './gen/keyserver/v1/session_service_pb.js';
