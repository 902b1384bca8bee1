//! QUIC streams as byte streams (`AsyncRead + AsyncWrite`), and stream resets with codes.

use std::io;

/// A QUIC stream as one duplex byte stream.
pub type QuicIo = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

/// A bidirectional QUIC stream as a [`QuicIo`].
pub fn quic_io((send, recv): (quinn::SendStream, quinn::RecvStream)) -> QuicIo {
    tokio::io::join(recv, send)
}

/// Closes a QUIC stream both ways with an error code (the connection stays up).
pub fn reset(io: &mut QuicIo, code: u32) {
    let c = quinn::VarInt::from_u32(code);
    let _ = io.writer_mut().reset(c);
    let _ = io.reader_mut().stop(c);
}

/// The error code of a QUIC stream the far side reset, if that is what `e` is.
pub fn reset_code(e: &io::Error) -> Option<u32> {
    let inner = e.get_ref()?;
    if let Some(quinn::ReadError::Reset(c)) = inner.downcast_ref::<quinn::ReadError>() {
        return u32::try_from(c.into_inner()).ok();
    }
    if let Some(quinn::WriteError::Stopped(c)) = inner.downcast_ref::<quinn::WriteError>() {
        return u32::try_from(c.into_inner()).ok();
    }
    None
}
