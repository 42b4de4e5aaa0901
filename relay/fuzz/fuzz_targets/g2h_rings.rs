//! What the device VM writes into the tunnel's virtqueues, through the relay's
//! vhost-user backend: see `vfu_relay_fuzz::rings`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| vfu_relay_fuzz::rings::run(data));
