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
    let fds = protox::compile(&files, [&proto_dir])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
