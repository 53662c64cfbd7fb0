//! The RPCs this server answers, read once from the compiled protobuf descriptors, so metrics
//! and logs name a call by its service and method while a path nobody serves cannot mint new
//! label values, and the health service can list every service.

use std::collections::HashMap;
use std::sync::OnceLock;

use prost::Message;

/// One RPC's names, as the metrics label them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rpc {
    /// `/package.Service/Method`.
    pub full: &'static str,
    pub service: &'static str,
    pub method: &'static str,
}

/// What an unserved path is counted as.
const OTHER: Rpc = Rpc {
    full: "other",
    service: "other",
    method: "other",
};

/// The services whose every call needs a token, and the public ones (health, reflection).
pub struct Services {
    rpcs: HashMap<&'static str, Rpc>,
    /// The key server's own services, by full name.
    pub own: Vec<&'static str>,
}

fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| {
        let mut rpcs = HashMap::new();
        let mut own = Vec::new();
        for (set, ours) in [
            (keyserver_proto::pb::FILE_DESCRIPTOR_SET, true),
            (tonic_health::pb::FILE_DESCRIPTOR_SET, false),
            (tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET, false),
            (tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET, false),
        ] {
            let set = prost_types::FileDescriptorSet::decode(set)
                .expect("the compiled descriptor sets decode");
            for file in set.file {
                for service in &file.service {
                    // Names live as long as the process: the set is fixed at build time.
                    let service_name: &'static str =
                        format!("{}.{}", file.package(), service.name()).leak();
                    if ours {
                        own.push(service_name);
                    }
                    for method in &service.method {
                        let full: &'static str =
                            format!("/{service_name}/{}", method.name()).leak();
                        let method: &'static str = method.name().to_owned().leak();
                        rpcs.insert(
                            full,
                            Rpc {
                                full,
                                service: service_name,
                                method,
                            },
                        );
                    }
                }
            }
        }
        own.sort_unstable();
        Services { rpcs, own }
    })
}

/// The RPC a request path names, or "other".
pub fn rpc(path: &str) -> Rpc {
    services().rpcs.get(path).copied().unwrap_or(OTHER)
}

/// The key server's own services (not health or reflection), by full name.
pub fn own_services() -> &'static [&'static str] {
    &services().own
}

/// Whether a call needs no token and no database: health checks and reflection.
pub fn is_public(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_is_known_and_unknown_paths_fold_into_one_label() {
        assert_eq!(
            own_services(),
            [
                "keyserver.v1.AuditService",
                "keyserver.v1.KeyService",
                "keyserver.v1.MasterKeyService",
                "keyserver.v1.SafetyNumberService",
                "keyserver.v1.SessionService",
            ]
        );
        let fetch = rpc("/keyserver.v1.KeyService/FetchPreKeyBundle");
        assert_eq!(
            (fetch.service, fetch.method),
            ("keyserver.v1.KeyService", "FetchPreKeyBundle")
        );
        assert_eq!(rpc("/keyserver.v1.KeyService/Nope"), OTHER);
        assert_eq!(rpc("/grpc.health.v1.Health/Check").method, "Check");
        assert!(is_public("/grpc.health.v1.Health/Watch"));
        assert!(is_public(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        ));
        assert!(!is_public("/keyserver.v1.KeyService/FetchPreKeyBundle"));
    }
}
