//! A broken RDMA peer for the rig's tests: connects to `rdma:HOST:PORT`
//! and sends one-byte messages without regard to its credits, each
//! claiming to return CLAIM credits it was never given (a receiver that
//! counts must end the connection at the first). Prints `overrun: N of M
//! messages, then: WHY` once the connection ends, or `overrun: not
//! stopped` and exits 1 if the receiver took them all.
//!
//! Usage: rdma-overrun HOST:PORT [MESSAGES [CLAIM]]

use std::time::Duration;

use cio_transports::rdma::RdmaStream;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(addr) = args.next().and_then(|a| a.parse().ok()) else {
        eprintln!("usage: rdma-overrun HOST:PORT [MESSAGES [CLAIM]]");
        std::process::exit(2);
    };
    let messages: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(10_000);
    let claim: u32 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1000);
    let stream = match RdmaStream::connect(addr, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rdma-overrun: connecting to {addr}: {e}");
            std::process::exit(2);
        }
    };
    match stream.send_ignoring_credits(messages, claim, Duration::from_secs(30)) {
        Ok(n) if n < messages => {
            use std::io::Read;
            let conn = cio_transports::Conn::Rdma(Box::new(stream));
            let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 64];
            let why = match (&conn).read(&mut buf) {
                Ok(0) => "end of stream".to_string(),
                Ok(n) => format!("{n} bytes"),
                Err(e) => e.to_string(),
            };
            println!("overrun: {n} of {messages} messages, then: {why}");
        }
        Ok(_) => {
            println!("overrun: not stopped");
            std::process::exit(1);
        }
        Err(e) => {
            println!("overrun: sending failed: {e}");
        }
    }
}
