//! A read buffer for relays that holds little while its side is idle.

use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};

/// Bytes read from one side at a time while bytes keep coming.
pub const BUSY_CHUNK_SIZE: usize = 16 * 1024;
/// Bytes read from one side at a time after it went quiet (statements and their answers
/// in OLTP traffic fit it).
pub const QUIET_CHUNK_SIZE: usize = 1024;
/// Bytes a read waits with: held inside the [`ReadBuffer`] itself, not on the heap, so an
/// idle session's reads hold no heap memory at all. Short messages (a `select` by key
/// and its answer) are read into it and need no other buffer.
pub const PROBE_SIZE: usize = 128;

/// A read buffer that is large only while its side is busy. A read waits with the
/// [`PROBE_SIZE`] bytes inside the buffer; when they fill, what else is ready is read
/// at once behind them into a [`QUIET_CHUNK_SIZE`] buffer, and a read that fills that
/// one brings in a [`BUSY_CHUNK_SIZE`] one for the next reads. A read that has to wait
/// gives both back, so idle sessions (most of them, on a busy proxy or agent) hold no
/// read buffer on the heap.
#[derive(Debug)]
pub struct ReadBuffer {
    probe: [u8; PROBE_SIZE],
    quiet: Vec<u8>,
    busy: Option<Vec<u8>>,
    /// The last read filled `quiet`.
    grow: bool,
    /// An error met after the probe had bytes: returned by the next read, after them.
    error: Option<std::io::Error>,
}

impl Default for ReadBuffer {
    fn default() -> Self {
        Self {
            probe: [0; PROBE_SIZE],
            quiet: Vec::new(),
            busy: None,
            grow: false,
            error: None,
        }
    }
}

/// Where the bytes of a read are.
enum Filled {
    Probe(usize),
    Quiet(usize),
    Busy(usize),
}

impl ReadBuffer {
    /// Reads once from `from`: the bytes read, empty at EOF.
    pub async fn read<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> std::io::Result<&[u8]> {
        if let Some(error) = self.error.take() {
            return Err(error);
        }
        if std::mem::take(&mut self.grow) && self.busy.is_none() {
            self.busy = Some(vec![0; BUSY_CHUNK_SIZE]);
        }
        let filled = std::future::poll_fn(|cx| {
            if let Some(busy) = &mut self.busy {
                let mut read = ReadBuf::new(busy);
                match Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Ready(result) => {
                        return Poll::Ready(result.map(|()| Filled::Busy(read.filled().len())));
                    }
                    // Nothing to read now: give the large buffer back; the next poll
                    // (after the wake this one registered) reads into the probe.
                    Poll::Pending => {
                        self.busy = None;
                        self.quiet = Vec::new();
                        return Poll::Pending;
                    }
                }
            }
            let mut probe = ReadBuf::new(&mut self.probe);
            match Pin::new(&mut *from).poll_read(cx, &mut probe) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {
                    // Waiting: hold nothing on the heap meanwhile.
                    self.quiet = Vec::new();
                    return Poll::Pending;
                }
            }
            let n = probe.filled().len();
            if n < PROBE_SIZE {
                return Poll::Ready(Ok(Filled::Probe(n)));
            }
            // The probe filled: read what else is ready behind its bytes, without waiting.
            if self.quiet.is_empty() {
                self.quiet = vec![0; QUIET_CHUNK_SIZE];
            }
            self.quiet[..PROBE_SIZE].copy_from_slice(&self.probe);
            let mut rest = ReadBuf::new(&mut self.quiet[PROBE_SIZE..]);
            match Pin::new(&mut *from).poll_read(cx, &mut rest) {
                Poll::Ready(Ok(())) => {}
                // The probe's bytes go first; the error comes with the next read.
                Poll::Ready(Err(error)) => self.error = Some(error),
                // Nothing more yet; a spurious wake-up later is harmless.
                Poll::Pending => {}
            }
            Poll::Ready(Ok(Filled::Quiet(PROBE_SIZE + rest.filled().len())))
        })
        .await?;
        match filled {
            Filled::Probe(n) => Ok(&self.probe[..n]),
            Filled::Quiet(n) => {
                self.grow = n == QUIET_CHUNK_SIZE;
                Ok(&self.quiet[..n])
            }
            Filled::Busy(n) => match &self.busy {
                Some(busy) => Ok(&busy[..n]),
                // Invariant: a read into `busy` returns before anything takes it.
                None => Ok(&[]),
            },
        }
    }

    /// Bytes of buffer held on the heap now.
    pub fn held(&self) -> usize {
        self.quiet.len() + self.busy.as_ref().map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn grows_while_bytes_keep_coming_and_holds_nothing_while_a_read_waits() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut buf = ReadBuffer::default();
        assert_eq!(buf.held(), 0, "nothing before the first read");

        client.write_all(&[7; 4096]).await.unwrap();
        // The probe fills and the rest of the quiet buffer with it; the next read is
        // into the large one.
        let first = buf.read(&mut server).await.unwrap();
        assert_eq!(first.len(), QUIET_CHUNK_SIZE);
        assert!(first.iter().all(|&b| b == 7));
        assert_eq!(buf.held(), QUIET_CHUNK_SIZE);
        let rest = buf.read(&mut server).await.unwrap();
        assert_eq!(rest.len(), 4096 - QUIET_CHUNK_SIZE);
        assert!(rest.iter().all(|&b| b == 7));
        assert_eq!(buf.held(), QUIET_CHUNK_SIZE + BUSY_CHUNK_SIZE);

        // The next read has to wait: both buffers are given back before the bytes come,
        // and a short message is read into the probe alone.
        let write_later = async {
            tokio::task::yield_now().await;
            client.write_all(b"select 1").await.unwrap();
        };
        let (read, ()) = tokio::join!(buf.read(&mut server), write_later);
        assert_eq!(read.unwrap(), b"select 1");
        assert_eq!(buf.held(), 0);

        drop(client);
        assert!(buf.read(&mut server).await.unwrap().is_empty(), "EOF");
    }

    #[tokio::test]
    async fn a_message_longer_than_the_probe_comes_whole() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut buf = ReadBuffer::default();
        let message: Vec<u8> = (0..PROBE_SIZE * 3).map(|i| (i % 251) as u8).collect();
        client.write_all(&message).await.unwrap();
        assert_eq!(buf.read(&mut server).await.unwrap(), &message[..]);
        assert_eq!(buf.held(), QUIET_CHUNK_SIZE);

        // Exactly the probe's size: the read behind it finds nothing and does not wait.
        client.write_all(&message[..PROBE_SIZE]).await.unwrap();
        assert_eq!(buf.read(&mut server).await.unwrap(), &message[..PROBE_SIZE]);
        drop(client);
        assert!(buf.read(&mut server).await.unwrap().is_empty(), "EOF");
    }
}
