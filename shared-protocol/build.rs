//! Compiles `proto/vigil/v1/*.proto` with protox (a pure-Rust protobuf
//! compiler), so no `protoc` is needed on the build machine or when
//! cross-compiling the agent.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/vigil/v1/vigil.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    prost_build::Config::new()
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
