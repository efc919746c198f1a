//! `husk-vmm`: boots one microVM.

fn main() {
    eprintln!("husk-vmm: not implemented yet");
    std::process::exit(2);
}
