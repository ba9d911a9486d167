#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshgate::fuzz_targets::h1_framing(data));
