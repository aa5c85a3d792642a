//! What the tests of the `cio` binary share: running it, and a backend for
//! it to talk to.
#![allow(dead_code)]

use std::process::{Command, Output};
use std::sync::Arc;

use cio_backend::models::{Edu, Memory};
use cio_backend::usb::{CdcAcmEcho, UsbProvider};
use cio_backend::{Limits, Server, ServerConfig, ServerHandle};
use cio_transports::Psk;

/// Runs the `cio` binary with `args`.
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cio"))
        .args(args)
        .output()
        .expect("running cio")
}

/// Runs `cio`: whether it succeeded, and what it printed (stdout, then
/// stderr).
pub fn cio(args: &[&str]) -> (bool, String) {
    let out = run(args);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// A backend on an ephemeral loopback port serving edu0, a 64 KiB mem0
/// and the emulated USB serial port emu-1.
pub fn backend(psk: Option<Psk>) -> ServerHandle {
    Server::bind(ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        psk,
        devices: vec![
            Box::new(Edu::new("edu0")),
            Box::new(Memory::new("mem0", 1 << 16).unwrap()),
        ],
        limits: Limits::default(),
        usb: Arc::new(UsbProvider::new(vec![], vec![Arc::new(CdcAcmEcho)])),
        security: Default::default(),
    })
    .unwrap()
    .spawn()
    .unwrap()
}
