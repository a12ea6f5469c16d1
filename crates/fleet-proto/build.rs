//! Compiles `proto/*.proto` with protox (a protobuf compiler in Rust), so that
//! `cargo build` works on machines without protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<PathBuf> =
        ["imageserver.proto", "unpacker.proto"].iter().map(|f| proto_dir.join(f)).filter(|p| p.exists()).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    let mut compiler = protox::Compiler::new([&proto_dir])?;
    compiler.include_imports(true).include_source_info(true).open_files(&files)?;
    // The encoded descriptors, for gRPC server reflection (grpcurl and
    // other tools that work without our .proto files).
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("fleet_descriptor.bin"), compiler.encode_file_descriptor_set())?;
    tonic_prost_build::configure().bytes(".").compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}
