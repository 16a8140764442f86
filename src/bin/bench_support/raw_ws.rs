//! The benchmarks' cheapest WebSocket subscriber: after a normal handshake
//! (tokio-tungstenite) and the `connected` frame, it reads the TCP socket
//! itself and splits the server's frames by hand, so that the clients take
//! as little as possible of the CPU the server is measured on. It is still
//! a complete client at the protocol level: it answers every Ping (or the
//! server's keepalive would cut it off) and stops at a Close.
//!
//! Included by `events-bench` and `proxy-bench-upstream` with `#[path]`.

use std::future::Future;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Free space kept for each socket read. Small, so a thousand subscribers'
/// buffers stay in cache; the kernel's copy is the only one.
const READ_SPACE: usize = 16 * 1024;

/// What the reader tells its caller.
pub enum Seen<'a> {
    /// A socket read returned data; the frames in it follow.
    Read,
    /// One text frame's payload.
    Text(&'a [u8]),
    /// A frame of another kind than text, ping or close.
    Other,
}

/// Why [`read_frames`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawEnd {
    /// `on_frame` asked to stop.
    Done,
    /// `stop` completed.
    Stopped,
    /// The server closed the connection (Close frame, end of stream, error).
    Closed,
}

/// Reads frames until `on_frame` returns `true`, `stop` completes or the
/// connection ends. Bytes tokio-tungstenite had already read past the
/// `connected` frame are not seen: call this before anything else is sent.
pub async fn read_frames(
    tcp: &mut TcpStream,
    stop: impl Future<Output = ()>,
    mut on_frame: impl FnMut(Seen<'_>) -> bool,
) -> RawEnd {
    tokio::pin!(stop);
    let mut buffer = BytesMut::with_capacity(READ_SPACE);
    loop {
        buffer.reserve(READ_SPACE);
        let read = tokio::select! {
            read = tcp.read_buf(&mut buffer) => read,
            _ = &mut stop => return RawEnd::Stopped,
        };
        if matches!(read, Ok(0) | Err(_)) {
            return RawEnd::Closed;
        }
        if on_frame(Seen::Read) {
            return RawEnd::Done;
        }
        let mut at = 0;
        while let Some((first, length, header)) = frame_header(&buffer[at..]) {
            let end = at + header + length;
            if end > buffer.len() {
                break;
            }
            let done = match first & 0x0f {
                0x1 => on_frame(Seen::Text(&buffer[at + header..end])),
                // A ping: answer with a masked, empty pong.
                0x9 => {
                    let _ = tcp.write_all(&[0x8a, 0x80, 0, 0, 0, 0]).await;
                    false
                }
                0x8 => return RawEnd::Closed,
                _ => on_frame(Seen::Other),
            };
            if done {
                return RawEnd::Done;
            }
            at = end;
        }
        buffer.advance(at);
    }
}

/// A WebSocket frame header from the server (never masked): FIN+opcode,
/// payload length, header length; `None` until `buffer` holds all of it.
pub fn frame_header(buffer: &[u8]) -> Option<(u8, usize, usize)> {
    let (&first, &second) = (buffer.first()?, buffer.get(1)?);
    let (length, header) = match second & 0x7f {
        126 => (
            u16::from_be_bytes(buffer.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buffer.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        short => (short as usize, 2),
    };
    Some((first, length, header))
}
