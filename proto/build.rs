//! Generates the tonic/prost code for `proto/flotilla/v1/*.proto` with protox, a pure-Rust
//! protobuf compiler, so that building needs nothing but cargo (no system `protoc`). The
//! encoded descriptor set is written next to the code for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/flotilla/v1/coordinator.proto", "proto/flotilla/v1/job.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("flotilla_descriptor.bin"), prost::Message::encode_to_vec(&descriptors))?;
    // Decode errors are INVALID_ARGUMENT (see `src/codec.rs`).
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::FlotillaCodec")
        // Its `Debug` is written by hand (`src/lib.rs`): it holds the data-plane secret.
        .skip_debug([".flotilla.v1.Assignment"])
        .compile_fds(descriptors)?;
    Ok(())
}
