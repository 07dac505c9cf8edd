//! Fuzz target: the property `tollgate::fuzz_checks::canonical_args` checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tollgate::fuzz_checks::canonical_args(data));
