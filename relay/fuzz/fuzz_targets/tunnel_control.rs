//! The tunnel's control messages as the relay handles them, with clients, channels and
//! device-VM connections coming and going: see `vfu_relay_fuzz::control`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vfu_relay_fuzz::control::run(data));
