//! Compiles our OpAMP `.proto` files with a pure-Rust compiler (protox), so no
//! `protoc` is needed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/opamp/v1/opamp.proto", "proto/opamp/v1/anyvalue.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    Ok(())
}
