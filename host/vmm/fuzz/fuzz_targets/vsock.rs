//! Fuzz target: see husk_vmm::fuzzing::fuzz_vsock.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    husk_vmm::fuzzing::fuzz_vsock(data);
});
