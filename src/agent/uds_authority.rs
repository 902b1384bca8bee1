//! A fix-up of the HTTP/2 `:authority` that gRPC clients send over a Unix socket.
//!
//! gRPC C-core (grpcio, so py-spiffe; also grpc-java and grpc-swift) sends the percent-encoded
//! socket path as `:authority` on a `unix:` channel (`tmp%2Fagent.sock`), which is not an
//! RFC 3986 authority; the HTTP/2 stack under tonic (h2) refuses such a request with
//! `RST_STREAM(PROTOCOL_ERROR)` before any of our code sees it (hyperium/h2#487, open since
//! 2020; grpc/grpc#38142). The authority means nothing on a Unix socket, so this layer, between
//! the socket and h2, rewrites an invalid one to `localhost` (what grpc-go and Kubernetes send).
//!
//! Only the client-to-server direction is touched, and only its header blocks: HPACK state is
//! shared between the client's encoder and the server's decoder, so every header block is
//! decoded here (with the client's dynamic table) and encoded again (with a table of our own,
//! which h2's decoder follows); every other frame passes byte for byte. Bounded: a header block
//! (HEADERS plus CONTINUATIONs) over [`MAX_HEADER_BLOCK`] bytes, a frame over
//! [`MAX_FRAME`] bytes, or HPACK that does not decode ends the connection with an error.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Largest frame payload accepted from a client (h2's default SETTINGS_MAX_FRAME_SIZE).
pub const MAX_FRAME: usize = 16_384;
/// Largest header block accepted (h2's default is 16 KiB of decoded headers; tonic's larger).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// The HPACK dynamic table size both sides of this layer use: the SETTINGS_HEADER_TABLE_SIZE
/// h2 advertises (its default; the agent never changes it). A client's size update beyond it
/// is refused (without the cap the decoder would keep up to 2^28 bytes per connection).
pub const HEADER_TABLE_SIZE: usize = 4096;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A stream whose incoming HTTP/2 header blocks get a valid `:authority`.
pub struct UdsAuthority<S> {
    inner: S,
    /// Bytes read from `inner` and not yet parsed.
    raw: Vec<u8>,
    /// Bytes ready for h2.
    out: Vec<u8>,
    out_pos: usize,
    preface_done: bool,
    /// A HEADERS frame waiting for its CONTINUATIONs: stream, flags, priority bytes, block.
    pending: Option<(u32, u8, Vec<u8>, Vec<u8>)>,
    decoder: fluke_hpack::Decoder<'static>,
    encoder: fluke_hpack::Encoder<'static>,
    /// Set once the stream is malformed: every later read fails.
    broken: Option<String>,
}

impl<S> UdsAuthority<S> {
    pub fn new(inner: S) -> Self {
        UdsAuthority {
            inner,
            raw: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            preface_done: false,
            pending: None,
            decoder: {
                let mut d = fluke_hpack::Decoder::new();
                d.set_max_allowed_table_size(HEADER_TABLE_SIZE);
                d
            },
            encoder: {
                let mut e = fluke_hpack::Encoder::new();
                e.set_max_table_size(HEADER_TABLE_SIZE);
                e
            },
            broken: None,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Moves every complete unit (the preface, then frames) from `raw` to `out`.
    fn process(&mut self) -> Result<(), String> {
        let mut pos = 0;
        if !self.preface_done {
            if self.raw.len() < PREFACE.len() {
                if !PREFACE.starts_with(&self.raw) {
                    return Err("not an HTTP/2 connection preface".into());
                }
                return Ok(());
            }
            if &self.raw[..PREFACE.len()] != PREFACE {
                return Err("not an HTTP/2 connection preface".into());
            }
            self.out.extend_from_slice(PREFACE);
            pos = PREFACE.len();
            self.preface_done = true;
        }
        loop {
            let rest = &self.raw[pos..];
            if rest.len() < 9 {
                break;
            }
            let len =
                (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
            if len > MAX_FRAME {
                return Err(format!("a frame of {len} bytes (at most {MAX_FRAME})"));
            }
            if rest.len() < 9 + len {
                break;
            }
            let kind = rest[3];
            let flags = rest[4];
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]) & 0x7fff_ffff;
            let payload = rest[9..9 + len].to_vec();
            let whole = 9 + len;
            match (kind, self.pending.is_some()) {
                (CONTINUATION, true) => self.continuation(stream, flags, &payload)?,
                (_, true) => {
                    return Err("a frame other than CONTINUATION inside a header block".into())
                }
                (HEADERS, false) => self.headers(stream, flags, payload)?,
                (CONTINUATION, false) => return Err("CONTINUATION without HEADERS".into()),
                _ => self.out.extend_from_slice(&self.raw[pos..pos + whole]),
            }
            pos += whole;
        }
        self.raw.drain(..pos);
        Ok(())
    }

    fn headers(&mut self, stream: u32, flags: u8, mut p: Vec<u8>) -> Result<(), String> {
        if flags & PADDED != 0 {
            let pad = usize::from(*p.first().ok_or("PADDED HEADERS without a pad length")?);
            if pad + 1 > p.len() {
                return Err("HEADERS padding longer than the frame".into());
            }
            p.truncate(p.len() - pad);
            p.remove(0);
        }
        let prio = if flags & PRIORITY != 0 {
            if p.len() < 5 {
                return Err("PRIORITY HEADERS shorter than 5 bytes".into());
            }
            p.drain(..5).collect()
        } else {
            Vec::new()
        };
        let flags = flags & !PADDED;
        if flags & END_HEADERS != 0 {
            self.emit(stream, flags, prio, &p)
        } else {
            self.pending = Some((stream, flags, prio, p));
            Ok(())
        }
    }

    fn continuation(&mut self, stream: u32, flags: u8, p: &[u8]) -> Result<(), String> {
        let Some((s, f, prio, mut block)) = self.pending.take() else {
            return Err("CONTINUATION without HEADERS".into());
        };
        if s != stream {
            return Err("CONTINUATION for another stream".into());
        }
        if block.len() + p.len() > MAX_HEADER_BLOCK {
            return Err(format!("a header block over {MAX_HEADER_BLOCK} bytes"));
        }
        block.extend_from_slice(p);
        if flags & END_HEADERS != 0 {
            self.emit(stream, f | END_HEADERS, prio, &block)
        } else {
            self.pending = Some((s, f, prio, block));
            Ok(())
        }
    }

    /// Decodes one header block, fixes `:authority`, encodes it again and writes it out as
    /// HEADERS (and CONTINUATIONs past [`MAX_FRAME`]).
    fn emit(&mut self, stream: u32, flags: u8, prio: Vec<u8>, block: &[u8]) -> Result<(), String> {
        let mut headers: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let mut too_big = false;
        // fluke-hpack panics on some malformed integers (`decode_integer(..).ok().unwrap()` in
        // a size update): a panic is a malformed block like any other.
        let decoder = &mut self.decoder;
        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode_with_cb(block, |name, value| {
                size += name.len() + value.len() + 32;
                too_big |= size > MAX_HEADER_BLOCK;
                if !too_big {
                    headers.push((name.into_owned(), value.into_owned()));
                }
            })
        }));
        match decoded {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("HPACK: {e:?}")),
            Err(_) => return Err("HPACK: malformed integer".into()),
        }
        if too_big {
            return Err(format!("a header list over {MAX_HEADER_BLOCK} bytes"));
        }
        for (name, value) in &mut headers {
            if name.as_slice() == b":authority"
                && hyper::http::uri::Authority::try_from(value.as_slice()).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let encoded = self
            .encoder
            .encode(headers.iter().map(|(n, v)| (n.as_slice(), v.as_slice())));
        let mut first = true;
        let mut chunks = encoded.chunks(MAX_FRAME - prio.len()).peekable();
        if chunks.peek().is_none() {
            self.frame(HEADERS, flags, stream, &prio, &[]);
            return Ok(());
        }
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let end = if last { END_HEADERS } else { 0 };
            if first {
                self.frame(HEADERS, (flags & !END_HEADERS) | end, stream, &prio, chunk);
                first = false;
            } else {
                self.frame(CONTINUATION, end, stream, &[], chunk);
            }
        }
        Ok(())
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, prio: &[u8], payload: &[u8]) {
        let len = prio.len() + payload.len();
        self.out
            .extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        self.out.extend_from_slice(&stream.to_be_bytes());
        self.out.extend_from_slice(prio);
        self.out.extend_from_slice(payload);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for UdsAuthority<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(why) = &this.broken {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, why.clone())));
            }
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                    // End of stream: whatever is left unparsed is a truncated frame.
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Ok(())) => {
                    this.raw.extend_from_slice(rb.filled());
                    if this.raw.len() > MAX_HEADER_BLOCK + 9 + MAX_FRAME {
                        this.broken = Some("unparsed input over its bound".into());
                        continue;
                    }
                    if let Err(why) = this.process() {
                        tracing::debug!(%why, "malformed HTTP/2 from a Workload API client; connection closed");
                        this.broken = Some(why);
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for UdsAuthority<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn headers_frame(
        enc: &mut fluke_hpack::Encoder<'_>,
        h: &[(&[u8], &[u8])],
        flags: u8,
    ) -> Vec<u8> {
        let block = enc.encode(h.iter().copied());
        let mut f = Vec::new();
        let len = block.len();
        f.extend_from_slice(&[
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            HEADERS,
            flags,
        ]);
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(&block);
        f
    }

    async fn through(input: Vec<u8>) -> io::Result<Vec<u8>> {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        a.write_all(&input).await?;
        drop(a);
        let mut fixed = UdsAuthority::new(b);
        let mut out = Vec::new();
        fixed.read_to_end(&mut out).await?;
        Ok(out)
    }

    fn decode_headers(out: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let f = &out[PREFACE.len()..];
        let len = (usize::from(f[0]) << 16) | (usize::from(f[1]) << 8) | usize::from(f[2]);
        assert_eq!(f[3], HEADERS);
        let mut d = fluke_hpack::Decoder::new();
        d.decode(&f[9..9 + len]).unwrap()
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_the_rest_is_kept() {
        let mut enc = fluke_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        // The bytes grpcio sends for `unix:/tmp/agent.sock`.
        input.extend(headers_frame(
            &mut enc,
            &[
                (b":method", b"POST"),
                (b":authority", b"tmp%2Fagent.sock"),
                (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
                (b"workload.spiffe.io", b"true"),
            ],
            END_HEADERS,
        ));
        // A DATA frame passes unchanged.
        input.extend_from_slice(&[0, 0, 2, 0, 1, 0, 0, 0, 1, 0xab, 0xcd]);
        let out = through(input).await.unwrap();
        let h = decode_headers(&out);
        assert_eq!(h[1], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(h[3], (b"workload.spiffe.io".to_vec(), b"true".to_vec()));
        assert!(out.ends_with(&[0, 0, 2, 0, 1, 0, 0, 0, 1, 0xab, 0xcd]));
    }

    #[tokio::test]
    async fn a_valid_authority_is_left_alone() {
        let mut enc = fluke_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(headers_frame(
            &mut enc,
            &[(b":authority", b"localhost:1")],
            END_HEADERS,
        ));
        let h = decode_headers(&through(input).await.unwrap());
        assert_eq!(h[0].1, b"localhost:1".to_vec());
    }

    #[tokio::test]
    async fn malformed_input_ends_the_connection_with_an_error() {
        for bad in [
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            [PREFACE, &[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 1]].concat(),
            [
                PREFACE,
                &[0, 0, 1, CONTINUATION, END_HEADERS, 0, 0, 0, 1, 0],
            ]
            .concat(),
            [
                PREFACE,
                &[0, 0, 2, HEADERS, END_HEADERS, 0, 0, 0, 1, 0xff, 0xff],
            ]
            .concat(),
            // A dynamic table size update to about 2^28: refused, not honoured.
            [
                PREFACE,
                &[
                    0,
                    0,
                    5,
                    HEADERS,
                    END_HEADERS,
                    0,
                    0,
                    0,
                    1,
                    0x3f,
                    0xe1,
                    0xff,
                    0xff,
                    0x7f,
                ],
            ]
            .concat(),
            // A size update cut short (the library panics on it).
            [PREFACE, &[0, 0, 1, HEADERS, END_HEADERS, 0, 0, 0, 1, 0x3f]].concat(),
        ] {
            assert!(through(bad.clone()).await.is_err(), "{bad:?}");
        }
    }
}
