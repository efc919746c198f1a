//! The agent API shared by the host components and `husk-agent`.

/// Version of the agent API; host and guest refuse to talk across different major versions.
pub const API_VERSION: u32 = 1;

/// The line `husk-agent` prints on the guest console once it runs as PID 1; tests and the
/// boot benchmark wait for it.
pub const BOOT_MARKER: &str = "husk-agent: started";
