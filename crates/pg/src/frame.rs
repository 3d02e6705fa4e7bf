//! Framing: where one message ends and the next begins, in a caller-owned buffer.
//!
//! Tagged messages are a type byte, a 32-bit big-endian length that counts itself but not
//! the type byte, and a body. Start-up packets (the first message of a connection) have
//! no type byte. Both splitters return `Ok(None)` when the buffer does not yet hold the
//! whole message: read more bytes and call again.

use crate::error::{Direction, Error, InvalidMessage, Limit};

/// One tagged message: its type byte and its body, borrowed from the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The message type byte.
    pub tag: u8,
    /// Everything after the length word.
    pub body: &'a [u8],
}

impl Frame<'_> {
    /// Bytes this message occupies on the wire: type byte, length word and body.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.body.len()
    }
}

/// Type byte plus length word.
pub const HEADER_LEN: usize = 5;

/// Reads a tagged header: the type byte and the body length, checked against
/// `message_size_max` (which counts the whole message, header included).
///
/// `header` must hold at least [`HEADER_LEN`] bytes.
pub(crate) fn parse_header(
    direction: Direction,
    header: [u8; HEADER_LEN],
    message_size_max: usize,
) -> Result<(u8, usize), Error> {
    let tag = header[0];
    let length = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if length < 4 {
        return Err(Error::invalid(
            direction,
            Some(tag),
            InvalidMessage::LengthTooSmall {
                length: length.into(),
                min: 4,
            },
        ));
    }
    // `length` is at least 4 here, so the conversion and the subtraction cannot fail.
    let body_len = length as usize - 4;
    let wire_len = body_len + HEADER_LEN;
    if wire_len > message_size_max {
        return Err(Error::limit(Limit::MessageSize, wire_len, message_size_max));
    }
    Ok((tag, body_len))
}

/// Splits the first tagged message off `buf`.
///
/// Returns `Ok(None)` when `buf` holds only part of it. The tag is not checked here; the
/// message decoders reject unknown tags.
pub fn split_message(
    direction: Direction,
    buf: &[u8],
    message_size_max: usize,
) -> Result<Option<Frame<'_>>, Error> {
    let Some(header) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let (tag, body_len) = parse_header(direction, *header, message_size_max)?;
    Ok(buf
        .get(HEADER_LEN..HEADER_LEN + body_len)
        .map(|body| Frame { tag, body }))
}

/// Length word plus request code: the smallest start-up packet.
pub const STARTUP_HEADER_LEN: usize = 8;

/// Splits the first untagged start-up packet off `buf` and returns all of it, length word
/// included. Returns `Ok(None)` when `buf` holds only part of it.
pub fn split_startup_packet(
    buf: &[u8],
    startup_packet_size_max: usize,
) -> Result<Option<&[u8]>, Error> {
    let Some(length) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    let length = u32::from_be_bytes(*length);
    if (length as usize) < STARTUP_HEADER_LEN {
        return Err(Error::invalid(
            Direction::Frontend,
            None,
            InvalidMessage::LengthTooSmall {
                length: i64::from(length),
                min: STARTUP_HEADER_LEN as u32,
            },
        ));
    }
    if length as usize > startup_packet_size_max {
        return Err(Error::limit(
            Limit::StartupPacketSize,
            length as usize,
            startup_packet_size_max,
        ));
    }
    Ok(buf.get(..length as usize))
}

/// Where a stream of tagged messages (either direction, after start-up) stands, by
/// counting: each message is a type byte, a 4-byte big-endian length that counts itself,
/// and the body. Nothing is parsed or kept beyond the 5 header bytes, and no limit is
/// applied: for a relay that already forwards the bytes and only needs to stop between
/// two messages (the proxy and the agent ending a session with an ErrorResponse at
/// shutdown).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Boundaries {
    /// The current message's header bytes seen so far (`have` of 5).
    header: [u8; HEADER_LEN],
    have: u8,
    /// Body bytes of the current message still to come, once its header is complete.
    body_left: u32,
    /// A length below 4 was seen: boundaries are unknown from here on.
    lost: bool,
}

impl Boundaries {
    /// Accounts for `bytes`, which followed the bytes seen so far.
    pub fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if usize::from(self.have) < HEADER_LEN {
                let at = usize::from(self.have);
                let take = (HEADER_LEN - at).min(bytes.len());
                self.header[at..at + take].copy_from_slice(&bytes[..take]);
                // take <= 5.
                self.have += take as u8;
                bytes = &bytes[take..];
                if usize::from(self.have) == HEADER_LEN {
                    let [_, a, b, c, d] = self.header;
                    match u32::from_be_bytes([a, b, c, d]).checked_sub(4) {
                        Some(0) => self.have = 0,
                        Some(body) => self.body_left = body,
                        None => self.lost = true,
                    }
                }
            } else {
                let take = bytes.len().min(self.body_left as usize);
                // take <= body_left, a u32.
                self.body_left -= take as u32;
                bytes = &bytes[take..];
                if self.body_left == 0 {
                    self.have = 0;
                }
            }
        }
    }

    /// True between two messages.
    pub fn at_boundary(&self) -> bool {
        !self.lost && self.have == 0
    }

    /// How many bytes may be read next without passing the end of the current message
    /// (0 at a boundary); `None` once boundaries are lost.
    pub fn to_boundary(&self) -> Option<usize> {
        if self.lost {
            None
        } else if self.have == 0 {
            Some(0)
        } else if usize::from(self.have) < HEADER_LEN {
            Some(HEADER_LEN - usize::from(self.have))
        } else {
            Some(self.body_left as usize)
        }
    }
}

/// A cursor over a message body. Every read checks bounds; nothing here can panic.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], InvalidMessage> {
        if n > self.buf.len() {
            return Err(InvalidMessage::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], InvalidMessage> {
        let (head, tail) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(InvalidMessage::Truncated)?;
        self.buf = tail;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, InvalidMessage> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16, InvalidMessage> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, InvalidMessage> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, InvalidMessage> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, InvalidMessage> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A NUL-terminated string, returned without its NUL.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], InvalidMessage> {
        // `CStr` finds the NUL a word at a time, which matters for long SQL; the empty
        // string (unnamed statements and portals) is common enough to test first.
        let end = if self.buf.first() == Some(&0) {
            0
        } else {
            std::ffi::CStr::from_bytes_until_nul(self.buf)
                .map_err(|_| InvalidMessage::MissingNul)?
                .count_bytes()
        };
        // `end` indexes a byte of `buf`, so both slices are in bounds.
        let s = &self.buf[..end];
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// A value with a 32-bit length prefix; -1 means NULL.
    pub(crate) fn value(&mut self) -> Result<Option<&'a [u8]>, InvalidMessage> {
        match self.i32()? {
            -1 => Ok(None),
            length if length < 0 => Err(InvalidMessage::NegativeLength { length }),
            length => self.bytes(length as usize).map(Some),
        }
    }

    /// The bytes not read yet, without consuming them.
    pub(crate) fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Trailing garbage is an error: the length word and the fields must agree.
    pub(crate) fn finish(self) -> Result<(), InvalidMessage> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(InvalidMessage::TrailingBytes {
                count: self.buf.len(),
            })
        }
    }
}

/// Appends one message to a caller-owned buffer and fills in its length word at the end.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    out: &'a mut Vec<u8>,
    /// Where the length word starts.
    start: usize,
    /// Length of `out` before this message, restored on error.
    rollback: usize,
    direction: Direction,
    tag: Option<u8>,
}

impl<'a> Writer<'a> {
    /// Starts a tagged message.
    pub(crate) fn tagged(out: &'a mut Vec<u8>, direction: Direction, tag: u8) -> Self {
        let rollback = out.len();
        out.push(tag);
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        Writer {
            out,
            start,
            rollback,
            direction,
            tag: Some(tag),
        }
    }

    /// Starts an untagged start-up packet.
    pub(crate) fn untagged(out: &'a mut Vec<u8>) -> Self {
        let rollback = out.len();
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        Writer {
            out,
            start,
            rollback,
            direction: Direction::Frontend,
            tag: None,
        }
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.out.push(v);
    }

    pub(crate) fn i16(&mut self, v: i16) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn i32(&mut self, v: i32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    pub(crate) fn bytes(&mut self, v: &[u8]) {
        self.out.extend_from_slice(v);
    }

    /// A NUL-terminated string. A NUL inside `v` would end the string early on the
    /// reading side, so it is refused.
    pub(crate) fn cstr(&mut self, v: &[u8]) -> Result<(), Error> {
        if v.contains(&0) {
            self.abort();
            return Err(Error::invalid(
                self.direction,
                self.tag,
                InvalidMessage::MissingNul,
            ));
        }
        self.out.extend_from_slice(v);
        self.out.push(0);
        Ok(())
    }

    /// A count in 16 bits (the server reads these unsigned).
    pub(crate) fn count(&mut self, n: usize) -> Result<(), Error> {
        match u16::try_from(n) {
            Ok(n) => {
                self.out.extend_from_slice(&n.to_be_bytes());
                Ok(())
            }
            Err(_) => {
                self.abort();
                Err(Error::limit(Limit::WireCount, n, u16::MAX.into()))
            }
        }
    }

    /// A value with its 32-bit length prefix; `None` is NULL (-1).
    pub(crate) fn value(&mut self, v: Option<&[u8]>) -> Result<(), Error> {
        match v {
            None => self.i32(-1),
            Some(v) => match i32::try_from(v.len()) {
                Ok(len) => {
                    self.i32(len);
                    self.bytes(v);
                }
                Err(_) => {
                    self.abort();
                    return Err(Error::limit(Limit::WireLength, v.len(), i32::MAX as usize));
                }
            },
        }
        Ok(())
    }

    fn abort(&mut self) {
        self.out.truncate(self.rollback);
    }

    /// Writes the length word. Fails, leaving `out` as it was, if the message does not
    /// fit the 32-bit length.
    pub(crate) fn finish(self) -> Result<(), Error> {
        let length = self.out.len() - self.start;
        match i32::try_from(length) {
            Ok(length) => {
                // `tagged`/`untagged` pushed these 4 bytes at `start`.
                self.out[self.start..self.start + 4].copy_from_slice(&length.to_be_bytes());
                Ok(())
            }
            Err(_) => {
                self.out.truncate(self.rollback);
                Err(Error::limit(Limit::WireLength, length, i32::MAX as usize))
            }
        }
    }
}
