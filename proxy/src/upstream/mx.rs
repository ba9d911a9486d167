//! Istio's TCP metadata exchange on an upstream byte stream (istio-wire.md §2.5), once the
//! sidecar chose ALPN `istio-peer-exchange`: our preamble goes first (written as soon as the
//! connection is up, so a server-speaks-first protocol is not kept waiting), and the sidecar's
//! own preamble, which precedes anything its app sends, is read and dropped before the client
//! sees a byte. A stream that does not start with the magic is passed through as it is, as
//! Envoy's filter does.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::telemetry::MX_MAGIC;

/// Larger than any real node's metadata by far; past it the peer is not speaking the exchange.
const MAX_PEER_METADATA: usize = 64 * 1024;

/// A stream after the exchange's preamble was sent, dropping the peer's from what it reads.
pub struct Exchanging<S> {
    inner: S,
    read: ReadState,
}

enum ReadState {
    /// The first 8 bytes: magic and length.
    Header {
        buf: [u8; 8],
        got: usize,
    },
    /// The peer's metadata, not wanted.
    Skip(usize),
    /// Not the exchange after all: replay what was read as data.
    Replay {
        buf: [u8; 8],
        at: usize,
        len: usize,
    },
    Data,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Exchanging<S> {
    pub async fn start(mut inner: S, preamble: &[u8]) -> io::Result<Exchanging<S>> {
        inner.write_all(preamble).await?;
        inner.flush().await?;
        Ok(Exchanging {
            inner,
            read: ReadState::Header { buf: [0; 8], got: 0 },
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Exchanging<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            match &mut this.read {
                ReadState::Data => return Pin::new(&mut this.inner).poll_read(cx, out),
                ReadState::Header { buf, got } => {
                    let mut rb = ReadBuf::new(&mut buf[*got..]);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        if *got == 0 {
                            return Poll::Ready(Ok(()));
                        }
                        // Too short to be the exchange: the peer's bytes, passed on as Envoy
                        // does with a stream it cannot read a preamble from, then the end.
                        let len = *got;
                        this.read = ReadState::Replay { buf: *buf, at: 0, len };
                        continue;
                    }
                    *got += n;
                    if *got < 8 {
                        continue;
                    }
                    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
                    let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                    this.read = if magic != MX_MAGIC {
                        tracing::debug!("upstream did not answer the metadata exchange; passing its bytes through");
                        ReadState::Replay {
                            buf: *buf,
                            at: 0,
                            len: 8,
                        }
                    } else if len > MAX_PEER_METADATA {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("upstream metadata-exchange preamble of {len} bytes"),
                        )));
                    } else {
                        ReadState::Skip(len)
                    };
                }
                ReadState::Skip(0) => this.read = ReadState::Data,
                ReadState::Skip(left) => {
                    let mut scratch = [0u8; 1024];
                    let want = (*left).min(scratch.len());
                    let mut rb = ReadBuf::new(&mut scratch[..want]);
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "upstream closed inside its metadata-exchange preamble",
                        )));
                    }
                    *left -= n;
                }
                ReadState::Replay { buf, at, len } => {
                    let n = (*len - *at).min(out.remaining());
                    out.put_slice(&buf[*at..*at + n]);
                    *at += n;
                    if *at == *len {
                        this.read = ReadState::Data;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Exchanging<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn through(peer_sends: Vec<u8>) -> io::Result<(Vec<u8>, Vec<u8>)> {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut s = Exchanging::start(ours, b"PREAMBLE").await?;
        theirs.write_all(&peer_sends).await?;
        drop(theirs.shutdown().await);
        let mut got = Vec::new();
        let r = s.read_to_end(&mut got).await;
        let mut sent = vec![0u8; 8];
        theirs.read_exact(&mut sent).await?;
        r.map(|_| (got, sent))
    }

    fn preamble(meta: &[u8]) -> Vec<u8> {
        let mut p = MX_MAGIC.to_be_bytes().to_vec();
        p.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        p.extend_from_slice(meta);
        p
    }

    #[tokio::test]
    async fn peer_preamble_dropped_and_ours_sent_first() {
        let mut peer = preamble(&[7u8; 3000]);
        peer.extend_from_slice(b"hello from the app");
        let (got, sent) = through(peer).await.unwrap();
        assert_eq!(got, b"hello from the app");
        assert_eq!(sent, b"PREAMBLE");
    }

    #[tokio::test]
    async fn no_magic_passes_through() {
        let (got, _) = through(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()).await.unwrap();
        assert_eq!(got, b"SSH-2.0-OpenSSH_9.2\r\n");
    }

    #[tokio::test]
    async fn short_or_oversized_preambles_are_errors() {
        // Cut inside the preamble's body: an error (the bytes were not data).
        assert!(through(preamble(&[1; 10])[..12].to_vec()).await.is_err());
        // Fewer than 8 bytes in all: not a preamble, passed through.
        assert_eq!(through(b"OK\n".to_vec()).await.unwrap().0, b"OK\n");
        let mut huge = MX_MAGIC.to_be_bytes().to_vec();
        huge.extend_from_slice(&(1u32 << 20).to_be_bytes());
        assert!(through(huge).await.is_err());
        // A peer that says nothing at all: a clean end.
        assert_eq!(through(Vec::new()).await.unwrap().0, b"");
    }
}
