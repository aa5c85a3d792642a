//! Credit-based flow control of an RDMA connection, without any verbs: a
//! peer may send a data message only into a receive buffer it knows is
//! posted, so a fast sender never overruns a slow reader (no receiver-not-
//! ready retries) and a peer that sends beyond its credits is caught.
//!
//! Each side posts [`WINDOW`](super::WINDOW) data buffers and grants the peer
//! that many credits. A data message uses one; the reader returns credits
//! once it has copied a buffer out and posted it again, in the immediate
//! value of every message it sends, or in a message of its own (no payload)
//! when half the window is waiting to be returned or the peer has none left.
//! Those credit-only messages land in buffers of their own (posted beside
//! the data window), which are posted again at once and never counted.

/// What a peer did wrong; the connection ends with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Violation {
    /// A data message arrived when the peer had no credit left.
    Overrun,
    /// The peer returned more credits than it was ever given.
    Overcredit {
        /// Credits returned in that message.
        returned: u32,
    },
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Overrun => write!(f, "the peer sent beyond its credits"),
            Self::Overcredit { returned } => write!(
                f,
                "the peer returned {returned} credits, more than this side ever used"
            ),
        }
    }
}

/// Both directions' credit counts of one connection.
#[derive(Debug, Clone)]
pub(crate) struct Credits {
    window: u32,
    /// Data messages this side may still send.
    send: u32,
    /// Buffers read and posted again, not yet returned to the peer.
    unreturned: u32,
    /// Data messages the peer may still send (as this side counts them).
    peer: u32,
}

impl Credits {
    /// Both sides start with `window` credits.
    pub(crate) fn new(window: u32) -> Self {
        Self {
            window,
            send: window,
            unreturned: 0,
            peer: window,
        }
    }

    /// True if a data message may be sent now.
    pub(crate) fn can_send(&self) -> bool {
        self.send > 0
    }

    /// Takes a credit for a data message; returns the credits to carry in
    /// it. Call only when [`can_send`](Self::can_send).
    pub(crate) fn send_data(&mut self) -> u32 {
        debug_assert!(self.send > 0, "sending without a credit");
        self.send -= 1;
        self.take_unreturned()
    }

    /// The credits a credit-only message carries (all waiting ones).
    pub(crate) fn take_unreturned(&mut self) -> u32 {
        let n = self.unreturned;
        self.peer += n;
        self.unreturned = 0;
        n
    }

    /// A message arrived carrying `returned` credits, with a payload
    /// (`data`) or without (a credit-only message).
    pub(crate) fn received(&mut self, returned: u32, data: bool) -> Result<(), Violation> {
        // Everything this side sent and the peer has not yet returned.
        let outstanding = self.window - self.send;
        if returned > outstanding {
            return Err(Violation::Overcredit { returned });
        }
        self.send += returned;
        if data {
            if self.peer == 0 {
                return Err(Violation::Overrun);
            }
            self.peer -= 1;
        }
        Ok(())
    }

    /// A data buffer was read out and posted again.
    pub(crate) fn freed(&mut self) {
        self.unreturned += 1;
    }

    /// True if credits should go back now in a message of their own: half
    /// the window waits, or the peer has none left and some wait.
    pub(crate) fn update_due(&self) -> bool {
        self.unreturned >= self.window.div_ceil(2) || (self.unreturned > 0 && self.peer == 0)
    }

    /// Data messages this side may still send.
    #[cfg(test)]
    pub(crate) fn available(&self) -> u32 {
        self.send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two ends exchanging messages, the reader consuming at its own pace:
    /// neither overruns the other and the credits always come back.
    #[test]
    fn a_window_of_messages_flows_both_ways_and_credits_return() {
        let mut a = Credits::new(4);
        let mut b = Credits::new(4);
        // a sends half its window; b reads one: nothing due yet.
        for _ in 0..2 {
            let carried = a.send_data();
            b.received(carried, true).unwrap();
        }
        b.freed();
        assert!(!b.update_due());
        // The second read makes half the window: due.
        b.freed();
        assert!(b.update_due());
        let back = b.take_unreturned();
        assert_eq!(back, 2);
        a.received(back, false).unwrap();
        assert_eq!(a.available(), 4);
        // a uses its whole window; b reads it all and answers with data:
        // the credits ride along.
        while a.can_send() {
            let carried = a.send_data();
            b.received(carried, true).unwrap();
        }
        assert_eq!(a.available(), 0);
        for _ in 0..4 {
            b.freed();
        }
        let carried = b.send_data();
        assert_eq!(carried, 4);
        a.received(carried, true).unwrap();
        assert_eq!(a.available(), 4);
        assert!(!b.update_due());
    }

    #[test]
    fn an_overrun_and_an_overcredit_are_caught() {
        let mut b = Credits::new(2);
        b.received(0, true).unwrap();
        b.received(0, true).unwrap();
        assert_eq!(b.received(0, true), Err(Violation::Overrun));
        let mut a = Credits::new(2);
        a.send_data();
        assert_eq!(
            a.received(2, false),
            Err(Violation::Overcredit { returned: 2 })
        );
        a.received(1, false).unwrap();
    }

    #[test]
    fn a_starved_peer_gets_its_credit_back_at_once() {
        let mut b = Credits::new(8);
        for _ in 0..8 {
            b.received(0, true).unwrap();
        }
        b.freed();
        assert!(b.update_due(), "peer has no credit and one waits");
        assert_eq!(b.take_unreturned(), 1);
        assert!(!b.update_due());
    }
}
