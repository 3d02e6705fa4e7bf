//! The small, strict subset of DER that identity fields use: SEQUENCE, UTF8String and
//! OCTET STRING with definite, minimal lengths.
//!
//! Writing our own instead of pulling a general ASN.1 library keeps the decoder tiny,
//! total (it returns an error for every input, never panics) and easy to fuzz.

/// DER tag of a constructed SEQUENCE.
pub(crate) const TAG_SEQUENCE: u8 = 0x30;
/// DER tag of a UTF8String.
pub(crate) const TAG_UTF8_STRING: u8 = 0x0c;
/// DER tag of an OCTET STRING.
pub(crate) const TAG_OCTET_STRING: u8 = 0x04;
/// DER tag of a BIT STRING.
pub(crate) const TAG_BIT_STRING: u8 = 0x03;
/// DER tag of an INTEGER.
pub(crate) const TAG_INTEGER: u8 = 0x02;
/// DER tag of the `[0] EXPLICIT` version field of a TBSCertificate.
pub(crate) const TAG_CONTEXT_0: u8 = 0xa0;

/// Longest content we accept in one element. Certificates are far smaller; the limit
/// only bounds the length arithmetic.
const CONTENT_LEN_MAX: usize = 1 << 20;

/// Why a DER element could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DerError {
    /// The input ends before the element does.
    Truncated { have: usize, need: usize },
    /// A different element type was found.
    WrongTag { expected: u8, actual: u8 },
    /// Indefinite or non-minimal length encoding (BER, not DER).
    NotMinimalLength,
    /// The length exceeds [`CONTENT_LEN_MAX`].
    TooLong,
    /// Bytes are left after the last expected element.
    TrailingBytes,
}

impl std::fmt::Display for DerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Truncated { have, need } => {
                write!(f, "DER truncated: {have} bytes present, {need} needed")
            }
            Self::WrongTag { expected, actual } => {
                write!(
                    f,
                    "DER tag 0x{actual:02x} where 0x{expected:02x} was expected"
                )
            }
            Self::NotMinimalLength => f.write_str("DER length is not in minimal definite form"),
            Self::TooLong => write!(f, "DER element longer than {CONTENT_LEN_MAX} bytes"),
            Self::TrailingBytes => f.write_str("unexpected bytes after the last DER element"),
        }
    }
}

/// Appends one tag-length-value element.
pub(crate) fn write_tlv(out: &mut Vec<u8>, tag: u8, content: &[u8]) {
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        // Short form: fits in 7 bits, checked just above.
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        let significant = &bytes[skip..];
        // At most size_of::<usize>() (8) bytes, so the count fits in the low 7 bits.
        out.push(0x80 | significant.len() as u8);
        out.extend_from_slice(significant);
    }
    out.extend_from_slice(content);
}

/// Appends a UTF8String.
pub(crate) fn write_utf8(out: &mut Vec<u8>, s: &str) {
    write_tlv(out, TAG_UTF8_STRING, s.as_bytes());
}

/// Appends a SEQUENCE whose content is written by `body`.
pub(crate) fn write_sequence(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let mut content = Vec::new();
    body(&mut content);
    write_tlv(out, TAG_SEQUENCE, &content);
}

/// Reads consecutive elements from a byte slice.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(input: &'a [u8]) -> Self {
        Self { rest: input }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The tag of the next element, if any.
    pub(crate) fn peek_tag(&self) -> Option<u8> {
        self.rest.first().copied()
    }

    /// Reads the next element, which must carry `tag`, and returns its content.
    pub(crate) fn read(&mut self, tag: u8) -> Result<&'a [u8], DerError> {
        let (&actual, after_tag) = self
            .rest
            .split_first()
            .ok_or(DerError::Truncated { have: 0, need: 2 })?;
        if actual != tag {
            return Err(DerError::WrongTag {
                expected: tag,
                actual,
            });
        }
        let (len, after_len) = read_len(after_tag)?;
        if after_len.len() < len {
            return Err(DerError::Truncated {
                have: self.rest.len(),
                need: self.rest.len() - after_len.len() + len,
            });
        }
        let (content, rest) = after_len.split_at(len);
        self.rest = rest;
        Ok(content)
    }

    /// Reads a UTF8String.
    pub(crate) fn read_utf8(&mut self) -> Result<&'a str, Utf8OrDer> {
        let bytes = self.read(TAG_UTF8_STRING).map_err(Utf8OrDer::Der)?;
        std::str::from_utf8(bytes).map_err(|_| Utf8OrDer::NotUtf8)
    }

    /// Succeeds only if every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), DerError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(DerError::TrailingBytes)
        }
    }
}

/// A UTF8String that was not valid DER, or whose bytes were not UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Utf8OrDer {
    Der(DerError),
    NotUtf8,
}

impl std::fmt::Display for Utf8OrDer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Der(e) => e.fmt(f),
            Self::NotUtf8 => f.write_str("UTF8String is not valid UTF-8"),
        }
    }
}

impl From<DerError> for Utf8OrDer {
    fn from(e: DerError) -> Self {
        Self::Der(e)
    }
}

/// Reads a definite, minimal DER length; returns it and the bytes after it.
fn read_len(input: &[u8]) -> Result<(usize, &[u8]), DerError> {
    let (&first, rest) = input
        .split_first()
        .ok_or(DerError::Truncated { have: 0, need: 1 })?;
    if first < 0x80 {
        return Ok((usize::from(first), rest));
    }
    let count = usize::from(first & 0x7f);
    // 0x80 is BER's indefinite length; more than 4 length bytes cannot be under the limit.
    if count == 0 {
        return Err(DerError::NotMinimalLength);
    }
    if count > 4 {
        return Err(DerError::TooLong);
    }
    if rest.len() < count {
        return Err(DerError::Truncated {
            have: rest.len(),
            need: count,
        });
    }
    let (len_bytes, rest) = rest.split_at(count);
    if len_bytes[0] == 0 {
        return Err(DerError::NotMinimalLength);
    }
    let len = len_bytes
        .iter()
        .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
    if len < 0x80 {
        return Err(DerError::NotMinimalLength);
    }
    if len > CONTENT_LEN_MAX {
        return Err(DerError::TooLong);
    }
    Ok((len, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: lengths across the short/long boundary encode minimally and decode back.
    #[test]
    fn lengths_round_trip_at_boundaries() {
        for len in [0usize, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff, 0x1_0000] {
            let content = vec![7u8; len];
            let mut out = Vec::new();
            write_tlv(&mut out, TAG_OCTET_STRING, &content);
            let mut r = Reader::new(&out);
            assert_eq!(r.read(TAG_OCTET_STRING), Ok(&content[..]));
            assert!(r.finish().is_ok());
        }
    }

    // Goal: BER-only and hostile length forms are refused, not misread.
    #[test]
    fn rejects_non_der_lengths() {
        let cases: [(&[u8], DerError); 5] = [
            (&[0x04, 0x80], DerError::NotMinimalLength),
            (
                &[0x04, 0x81, 0x05, 0, 0, 0, 0, 0],
                DerError::NotMinimalLength,
            ),
            (&[0x04, 0x82, 0x00, 0x80], DerError::NotMinimalLength),
            (&[0x04, 0x85, 1, 1, 1, 1, 1], DerError::TooLong),
            (
                &[0x04, 0x02, 0x00],
                DerError::Truncated { have: 3, need: 4 },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(Reader::new(input).read(TAG_OCTET_STRING), Err(expected));
        }
    }
}
