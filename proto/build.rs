//! Generates the v1 protocol code with a vendored `protoc` (never the system one).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto/syncmesh_v1.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["proto/syncmesh_v1.proto"], &["proto"])?;
    Ok(())
}
