//! Fuzz target: see husk_agent_protocol::fuzzing::fuzz_agent_responses.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    husk_agent_protocol::fuzzing::fuzz_agent_responses(data);
});
