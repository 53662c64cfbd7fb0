//! Compiles `keyserver/v1/*.proto` with protox (pure Rust, no system protoc) and keeps the
//! descriptor set so the server can offer gRPC reflection.

use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "keyserver/v1/key_service.proto",
        "keyserver/v1/session_service.proto",
        "keyserver/v1/audit_service.proto",
        "keyserver/v1/safety_number_service.proto",
        "keyserver/v1/master_key_service.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("keyserver_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
