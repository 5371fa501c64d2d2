//! Bounds-checked big-endian reading and writing: the only way the codec touches bytes.
//!
//! Every read returns [`ProtoError::Truncated`] instead of indexing past the end, so no input can
//! make the codec panic; every write checks the output's room the same way.

use super::ProtoError;

/// Reads big-endian fields from the front of a byte slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    start_len: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader {
            buf,
            start_len: buf.len(),
        }
    }

    /// Bytes consumed so far.
    pub(crate) fn consumed(&self) -> usize {
        self.start_len - self.buf.len()
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let (head, tail) = self
            .buf
            .split_first_chunk::<N>()
            .ok_or(ProtoError::Truncated {
                needed: N,
                available: self.buf.len(),
            })?;
        self.buf = tail;
        Ok(*head)
    }

    pub(crate) fn bytes(&mut self, len: usize) -> Result<&'a [u8], ProtoError> {
        if len > self.buf.len() {
            return Err(ProtoError::Truncated {
                needed: len,
                available: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(len);
        self.buf = tail;
        Ok(head)
    }

    /// The rest of the input.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, ProtoError> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, ProtoError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, ProtoError> {
        self.array().map(u64::from_be_bytes)
    }

    /// Fails unless every byte was consumed: trailing bytes mean the peer and we disagree about
    /// the message layout, which the specification treats as invalid.
    pub(crate) fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::TrailingBytes {
                extra: self.buf.len(),
            })
        }
    }
}

/// Writes big-endian fields into a fixed output slice.
pub(crate) struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    pub(crate) fn new(buf: &'a mut [u8]) -> Writer<'a> {
        Writer { buf, pos: 0 }
    }

    pub(crate) fn put(&mut self, bytes: &[u8]) -> Result<(), ProtoError> {
        let room = self.buf.len() - self.pos;
        let dst = self
            .buf
            .get_mut(self.pos..self.pos + bytes.len())
            .ok_or(ProtoError::NoRoom {
                needed: bytes.len(),
                available: room,
            })?;
        dst.copy_from_slice(bytes);
        self.pos += bytes.len();
        Ok(())
    }

    pub(crate) fn u16(&mut self, v: u16) -> Result<(), ProtoError> {
        self.put(&v.to_be_bytes())
    }

    pub(crate) fn u32(&mut self, v: u32) -> Result<(), ProtoError> {
        self.put(&v.to_be_bytes())
    }

    pub(crate) fn u64(&mut self, v: u64) -> Result<(), ProtoError> {
        self.put(&v.to_be_bytes())
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> usize {
        self.pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_never_overruns() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.u16().unwrap(), 0x0102);
        assert!(matches!(
            r.u32(),
            Err(ProtoError::Truncated {
                needed: 4,
                available: 1
            })
        ));
        assert!(r.bytes(2).is_err());
        assert_eq!(r.consumed(), 2);
        assert_eq!(r.rest(), &[3]);
        r.finish().unwrap();
    }

    #[test]
    fn writer_never_overruns() {
        let mut buf = [0u8; 5];
        let mut w = Writer::new(&mut buf);
        w.u32(0xdead_beef).unwrap();
        assert!(w.u16(1).is_err());
        assert_eq!(w.written(), 4);
        assert_eq!(buf, [0xde, 0xad, 0xbe, 0xef, 0]);
    }
}
