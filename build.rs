//! Compiles the gRPC service definitions (`proto/`) with a protoc that the build brings itself
//! (the `protoc-bin-vendored` crate): no system install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(&["proto/grpc_service.proto"], &["proto"])?;
    Ok(())
}
