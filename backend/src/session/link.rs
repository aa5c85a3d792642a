//! The connection that currently carries a session: the socket, the
//! partial frame being received, and what the poll loop knows about it.

use std::io;
use std::time::{Duration, Instant};

use cio_transports::{Conn, FrameReader, OutQueue, Received, Resolve};

/// A session's connection.
pub(crate) struct Link {
    pub(crate) conn: Conn,
    /// The peer's address, for logs.
    pub(crate) peer: String,
    pub(crate) reader: FrameReader,
    /// The socket may have bytes we have not read.
    pub(crate) read_pending: bool,
    /// The peer shut its side down (or the socket failed).
    pub(crate) peer_closing: bool,
    /// When the last bytes came in.
    pub(crate) last_rx: Instant,
}

impl Link {
    /// A link over `conn`, nothing received yet.
    pub(crate) fn new(conn: Conn) -> Self {
        let peer = conn.peer();
        Self {
            conn,
            peer,
            reader: FrameReader::new(),
            read_pending: true,
            peer_closing: false,
            last_rx: Instant::now(),
        }
    }

    /// A link over `conn` continuing a resumed session: the first frame
    /// must carry sequence number `next_seq`.
    pub(crate) fn resumed(conn: Conn, next_seq: u64) -> Self {
        Self {
            reader: FrameReader::starting_at(next_seq),
            ..Self::new(conn)
        }
    }

    /// Receives what the socket has without blocking; large `DmaData`
    /// payloads go straight into the region `resolve` names.
    pub(crate) fn recv(&mut self, resolve: Resolve<'_>) -> io::Result<Received> {
        let got = self.reader.recv(&self.conn, None, resolve)?;
        if got.bytes > 0 {
            self.last_rx = Instant::now();
        }
        Ok(got)
    }
}

/// Writes everything `out` holds to `conn`, blocking for at most `wait`
/// each time the socket is full: for the last frames on a connection, or
/// the ones that must be out before anything else happens on it.
pub(crate) fn flush_blocking(out: &mut OutQueue, conn: &Conn, wait: Duration) -> io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(wait))?;
    out.write_to(conn, Some(wait)).map(|_| ())
}
