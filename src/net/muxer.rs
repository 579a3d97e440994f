//! Yamux for TCP and relayed connections, with stream windows that agree with the frame limit.
//!
//! The Yamux implementation refuses a data frame whose body is over 1 MiB by closing the whole
//! connection, yet by default it grows a stream's receive window far beyond 1 MiB. Peers whose
//! Yamux writes frames as large as the window they were granted (js-libp2p does) then lose the
//! connection on their first large transfer. libp2p's Yamux upgrade cannot bound the windows, so
//! this module is that upgrade with one setting changed: the connection's total window is the
//! guaranteed 256 KiB per stream plus 768 KiB to share, so no stream's window ever exceeds 1 MiB
//! (protocol/README.md §2). It also bounds the memory a connection can hold in stream buffers.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::{future, io, iter};

use libp2p::core::muxing::{StreamMuxer, StreamMuxerEvent};
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};

/// The largest data frame body the Yamux implementation accepts, and so the largest window a
/// stream may grant.
pub const MAX_FRAME_BODY: usize = 1024 * 1024;
/// The window every stream starts with (the Yamux specification's default).
pub const INITIAL_WINDOW: usize = 256 * 1024;
/// Streams open at once on one connection, at most (sync, pairing, handoff, identify, hole
/// punching, AutoNAT and, on a relay, up to 16 circuits per device need far fewer).
pub const MAX_STREAMS: usize = 128;
/// Inbound streams held for the swarm while it is busy elsewhere; more are reset.
const MAX_QUEUED_INBOUND: usize = 64;

/// The `/yamux/1.0.0` upgrade with bounded windows.
#[derive(Debug, Clone)]
pub struct Yamux {
    config: yamux::Config,
}

impl Default for Yamux {
    fn default() -> Self {
        let mut config = yamux::Config::default();
        // Streams first: yamux checks the total against the current stream count.
        config
            .set_max_num_streams(MAX_STREAMS)
            .set_max_connection_receive_window(Some(
                MAX_STREAMS * INITIAL_WINDOW + (MAX_FRAME_BODY - INITIAL_WINDOW),
            ));
        Yamux { config }
    }
}

impl UpgradeInfo for Yamux {
    type Info = &'static str;
    type InfoIter = iter::Once<Self::Info>;

    fn protocol_info(&self) -> Self::InfoIter {
        iter::once("/yamux/1.0.0")
    }
}

impl<C> InboundConnectionUpgrade<C> for Yamux
where
    C: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_inbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ready(Ok(Muxer::new(io, self.config, yamux::Mode::Server)))
    }
}

impl<C> OutboundConnectionUpgrade<C> for Yamux
where
    C: futures::AsyncRead + futures::AsyncWrite + Send + Unpin + 'static,
{
    type Output = Muxer<C>;
    type Error = io::Error;
    type Future = future::Ready<Result<Self::Output, Self::Error>>;

    fn upgrade_outbound(self, io: C, _: Self::Info) -> Self::Future {
        future::ready(Ok(Muxer::new(io, self.config, yamux::Mode::Client)))
    }
}

/// One Yamux connection as a libp2p stream muxer.
pub struct Muxer<C> {
    connection: yamux::Connection<C>,
    /// Inbound streams that arrived while the swarm polled the connection for other work.
    queued_inbound: VecDeque<yamux::Stream>,
    inbound_waker: Option<Waker>,
}

impl<C> Muxer<C>
where
    C: futures::AsyncRead + futures::AsyncWrite + Unpin + 'static,
{
    fn new(io: C, config: yamux::Config, mode: yamux::Mode) -> Self {
        Muxer {
            connection: yamux::Connection::new(io, config, mode),
            queued_inbound: VecDeque::new(),
            inbound_waker: None,
        }
    }

    fn next_inbound(&mut self, cx: &mut Context<'_>) -> Poll<Result<yamux::Stream, MuxerError>> {
        match self.connection.poll_next_inbound(cx) {
            Poll::Ready(Some(Ok(stream))) => Poll::Ready(Ok(stream)),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Err(MuxerError(e))),
            Poll::Ready(None) => Poll::Ready(Err(MuxerError(yamux::ConnectionError::Closed))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The connection failed or closed.
#[derive(Debug, thiserror::Error)]
#[error("yamux: {0}")]
pub struct MuxerError(yamux::ConnectionError);

impl From<MuxerError> for io::Error {
    fn from(e: MuxerError) -> Self {
        match e.0 {
            yamux::ConnectionError::Io(e) => e,
            other => io::Error::other(other),
        }
    }
}

impl<C> StreamMuxer for Muxer<C>
where
    C: futures::AsyncRead + futures::AsyncWrite + Unpin + 'static,
{
    type Substream = yamux::Stream;
    type Error = MuxerError;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        if let Some(stream) = self.queued_inbound.pop_front() {
            return Poll::Ready(Ok(stream));
        }
        match self.next_inbound(cx) {
            Poll::Pending => {
                self.inbound_waker = Some(cx.waker().clone());
                Poll::Pending
            }
            ready => ready,
        }
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        self.connection.poll_new_outbound(cx).map_err(MuxerError)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.connection.poll_close(cx).map_err(MuxerError)
    }

    /// Drives the connection (frames of existing streams, window updates, pings); inbound
    /// streams that arrive meanwhile wait for `poll_inbound`, up to a bound.
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        let this = &mut *self;
        let stream = match this.next_inbound(cx) {
            Poll::Ready(Ok(stream)) => stream,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        if this.queued_inbound.len() < MAX_QUEUED_INBOUND {
            this.queued_inbound.push_back(stream);
            if let Some(waker) = this.inbound_waker.take() {
                waker.wake();
            }
        } else {
            tracing::debug!("too many inbound Yamux streams waiting; dropping one");
            drop(stream);
        }
        // More frames may be ready: ask to be polled again.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_stream_window_can_exceed_the_frame_limit() {
        // yamux grows a stream's window up to what the connection's total leaves once every
        // stream has its initial window: 1 MiB at most.
        let total = MAX_STREAMS * INITIAL_WINDOW + (MAX_FRAME_BODY - INITIAL_WINDOW);
        assert_eq!(
            total - MAX_STREAMS * INITIAL_WINDOW + INITIAL_WINDOW,
            MAX_FRAME_BODY
        );
        // The configuration is accepted (yamux asserts the total covers the initial windows).
        let _ = Yamux::default();
    }
}
