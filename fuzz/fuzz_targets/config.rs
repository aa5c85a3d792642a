//! ciod's TOML config and the trust files: nothing panics on any text.
#![no_main]

use cio_backend::access::Access;
use cio_backend::FileConfig;
use cio_transports::{AuthorizedClients, KnownBackends};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = toml::from_str::<FileConfig>(text) {
        let _ = cfg.specs();
        let _ = cfg.release_policies();
        let _ = Access::new(cfg.access.clone());
    }
    let _ = AuthorizedClients::parse(text);
    let _ = KnownBackends::parse(text);
});
