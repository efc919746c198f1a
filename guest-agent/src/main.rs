//! `husk-agent`: PID 1 inside the microVM.

fn main() {
    eprintln!(
        "husk-agent {}: not implemented yet",
        husk_agent_protocol::API_VERSION
    );
    std::process::exit(2);
}
