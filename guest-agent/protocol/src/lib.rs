//! The agent API shared by the host components and `husk-agent`.

/// Version of the agent API; host and guest refuse to talk across different major versions.
pub const API_VERSION: u32 = 1;
