//! `husk`: husk's OCI runtime: a runc-compatible command line that runs each container in its own microVM.

fn main() {
    eprintln!("husk: not implemented yet");
    std::process::exit(2);
}
