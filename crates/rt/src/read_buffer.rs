//! A read buffer for relays that holds little while its side is idle.

use std::pin::Pin;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};

/// Bytes read from one side at a time while bytes keep coming.
pub const BUSY_CHUNK_SIZE: usize = 16 * 1024;
/// Bytes read from one side at a time after it went quiet: what an idle session holds
/// per direction (statements and their answers in OLTP traffic fit it).
pub const QUIET_CHUNK_SIZE: usize = 1024;

/// A read buffer that is large only while its side is busy: a read that fills the small
/// buffer brings in a [`BUSY_CHUNK_SIZE`] one for the next reads, and a read that has to
/// wait gives it back, so idle sessions (most of them, on a busy proxy or agent) hold
/// [`QUIET_CHUNK_SIZE`] bytes per direction.
#[derive(Debug, Default)]
pub struct ReadBuffer {
    quiet: Vec<u8>,
    busy: Option<Vec<u8>>,
    /// The last read filled `quiet`.
    grow: bool,
}

impl ReadBuffer {
    /// Reads once from `from`: the bytes read, empty at EOF.
    pub async fn read<R: AsyncRead + Unpin>(&mut self, from: &mut R) -> std::io::Result<&[u8]> {
        if self.quiet.is_empty() {
            self.quiet = vec![0; QUIET_CHUNK_SIZE];
        }
        if std::mem::take(&mut self.grow) && self.busy.is_none() {
            self.busy = Some(vec![0; BUSY_CHUNK_SIZE]);
        }
        let (n, in_busy) = std::future::poll_fn(|cx| {
            if let Some(busy) = &mut self.busy {
                let mut read = ReadBuf::new(busy);
                match Pin::new(&mut *from).poll_read(cx, &mut read) {
                    Poll::Ready(result) => {
                        return Poll::Ready(result.map(|()| (read.filled().len(), true)));
                    }
                    // Nothing to read now: give the large buffer back; the next poll
                    // (after the wake this one registered) reads into the small one.
                    Poll::Pending => {
                        self.busy = None;
                        return Poll::Pending;
                    }
                }
            }
            let mut read = ReadBuf::new(&mut self.quiet);
            Pin::new(&mut *from)
                .poll_read(cx, &mut read)
                .map(|result| result.map(|()| (read.filled().len(), false)))
        })
        .await?;
        match (in_busy, &self.busy) {
            (true, Some(busy)) => Ok(&busy[..n]),
            _ => {
                self.grow = n == QUIET_CHUNK_SIZE;
                Ok(&self.quiet[..n])
            }
        }
    }

    /// Bytes of buffer held now.
    pub fn held(&self) -> usize {
        self.quiet.len() + self.busy.as_ref().map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test]
    async fn grows_while_bytes_keep_coming_and_shrinks_when_a_read_waits() {
        let (mut client, mut server) = tokio::io::duplex(64 * 1024);
        let mut buf = ReadBuffer::default();
        assert_eq!(buf.held(), 0, "nothing before the first read");

        client.write_all(&[7; 4096]).await.unwrap();
        // The first read fills the small buffer; the next one reads into the large one.
        assert_eq!(buf.read(&mut server).await.unwrap().len(), QUIET_CHUNK_SIZE);
        assert_eq!(buf.held(), QUIET_CHUNK_SIZE);
        let rest = buf.read(&mut server).await.unwrap();
        assert_eq!(rest.len(), 4096 - QUIET_CHUNK_SIZE);
        assert!(rest.iter().all(|&b| b == 7));
        assert_eq!(buf.held(), QUIET_CHUNK_SIZE + BUSY_CHUNK_SIZE);

        // The next read has to wait: the large buffer is given back before the bytes
        // come, and they are read into the small one.
        let write_later = async {
            tokio::task::yield_now().await;
            client.write_all(b"select 1").await.unwrap();
        };
        let (read, ()) = tokio::join!(buf.read(&mut server), write_later);
        assert_eq!(read.unwrap(), b"select 1");
        assert_eq!(buf.held(), QUIET_CHUNK_SIZE);

        drop(client);
        assert!(buf.read(&mut server).await.unwrap().is_empty(), "EOF");
    }
}
