//! Fuzz target: see husk_vmm::fuzzing::fuzz_fs.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    husk_vmm::fuzzing::fuzz_fs(data);
});
