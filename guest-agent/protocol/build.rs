//! Generates the protobuf messages and the ttrpc service from `proto/agent.proto` (pure Rust:
//! no `protoc` needed).

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

fn main() -> std::io::Result<()> {
    println!("cargo:rerun-if-changed=proto/agent.proto");
    let out_dir = std::path::PathBuf::from(
        std::env::var_os("OUT_DIR").ok_or_else(|| std::io::Error::other("OUT_DIR is not set"))?,
    );
    Codegen::new()
        .out_dir(&out_dir)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;
    // The generated files start with inner attributes (`#![allow(..)]`), which `include!` cannot
    // take inside a module: drop them; src/lib.rs sets the allowances on the wrapping modules.
    for name in ["agent.rs", "agent_ttrpc.rs"] {
        let path = out_dir.join(name);
        let text = std::fs::read_to_string(&path)?;
        let kept: Vec<&str> = text
            .lines()
            .filter(|line| {
                let t = line.trim_start();
                !t.starts_with("#![") && !t.starts_with("//!")
            })
            .collect();
        std::fs::write(&path, kept.join("\n"))?;
    }
    Ok(())
}
