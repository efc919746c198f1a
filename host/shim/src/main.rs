//! `containerd-shim-husk-v2`: containerd shim v2 for husk: one microVM per pod.

fn main() {
    eprintln!("containerd-shim-husk-v2: not implemented yet");
    std::process::exit(2);
}
