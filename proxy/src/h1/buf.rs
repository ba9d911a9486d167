//! Connection buffers that exist only while bytes are in flight (as HAProxy's and nginx's do):
//! a connection takes one from its thread's pool when its socket is readable or it has a
//! response to write, and gives it back as soon as it holds nothing, so an idle keep-alive
//! connection holds no buffer at all.

use std::cell::RefCell;

/// The size of a pooled buffer: a typical request head and a small body fit, and so does a
/// response head; a larger head grows its buffer (which then is not returned to the pool).
pub const SIZE: usize = 16 * 1024;
/// Buffers kept per thread; more than this in use at once are allocated and freed as needed.
const KEEP: usize = 64;

thread_local! {
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Bytes read from a connection and not yet used: `data[pos..]`.
#[derive(Debug, Default)]
pub struct ReadBuf {
    data: Vec<u8>,
    pos: usize,
}

impl ReadBuf {
    /// A buffer holding `bytes` (read before the HTTP/1 server took the connection over).
    pub fn with(bytes: &[u8]) -> ReadBuf {
        let mut b = ReadBuf::default();
        if !bytes.is_empty() {
            b.data = take();
            b.data.extend_from_slice(bytes);
        }
        b
    }

    pub fn pending(&self) -> &[u8] {
        &self.data[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.data.len()
    }

    /// Marks `n` pending bytes as used; a buffer left empty goes back to the pool.
    pub fn consume(&mut self, n: usize) {
        self.pos += n;
        debug_assert!(self.pos <= self.data.len());
        if self.pos == self.data.len() {
            self.release();
        }
    }

    /// Gives the buffer back (pending bytes are dropped: only for a connection being closed).
    pub fn release(&mut self) {
        self.pos = 0;
        give(std::mem::take(&mut self.data));
    }

    /// Room for at least `want` more bytes after the pending ones, taking a buffer from the
    /// pool if this one has none, and moving pending bytes to the front if that makes room.
    pub fn spare(&mut self, want: usize) -> &mut Vec<u8> {
        if self.data.capacity() == 0 {
            self.data = take();
        }
        if self.data.capacity() - self.data.len() < want && self.pos > 0 {
            self.data.drain(..self.pos);
            self.pos = 0;
        }
        if self.data.capacity() - self.data.len() < want {
            self.data.reserve(want);
        }
        &mut self.data
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if self.data.capacity() > 0 {
            give(std::mem::take(&mut self.data));
        }
    }
}

/// A buffer from this thread's pool (or a new one).
pub fn take() -> Vec<u8> {
    POOL.with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(SIZE))
}

/// Returns a buffer to this thread's pool; buffers that grew past the pool size are freed.
pub fn give(mut b: Vec<u8>) {
    if b.capacity() != SIZE {
        return;
    }
    b.clear();
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < KEEP {
            p.push(b);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_buffer_holds_no_memory() {
        let mut b = ReadBuf::default();
        b.spare(10).extend_from_slice(b"hello world");
        assert_eq!(b.pending(), b"hello world");
        b.consume(6);
        assert_eq!(b.pending(), b"world");
        b.consume(5);
        assert!(b.is_empty());
        assert_eq!(b.data.capacity(), 0, "returned to the pool");
    }

    #[test]
    fn pending_bytes_move_to_the_front_when_room_is_needed() {
        let mut b = ReadBuf::default();
        b.spare(SIZE).resize(SIZE, b'a');
        b.consume(SIZE - 4);
        let v = b.spare(SIZE - 8);
        assert_eq!(v.len(), 4);
        assert_eq!(v.capacity(), SIZE, "no growth: the used part was reclaimed");
    }
}
