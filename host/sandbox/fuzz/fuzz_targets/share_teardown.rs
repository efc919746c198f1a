//! Fuzz target: see husk_sandbox::fuzzing::fuzz_share_teardown.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    husk_sandbox::fuzzing::fuzz_share_teardown(data);
});
