//! The stream header: the first bytes of every tunnel stream, saying where the stream goes.
//!
//! ```text
//! offset  size  field
//! 0       2     magic "TL"
//! 2       1     version (1)
//! 3       2     body length, big endian (at most MAX_BODY)
//! 5       ...   body:
//!               1 + n   destination region (1..=63 bytes of a-z, 0-9, '-')
//!               1 + n   destination service (1..=253 bytes of A-Z, a-z, 0-9, '.', '_', '-')
//!               1       address family (4 or 6)
//!               4 | 16  destination IP
//!               2       destination port, big endian (not 0)
//! ```
//!
//! Parsing is strict: an unknown version, a body over [`MAX_BODY`], a bad name, a trailing byte
//! or a truncated field is refused with the byte offset where it went wrong. A bad header closes
//! its own stream (with [`super::code::BAD_HEADER`]), never the tunnel.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::region::{NameError, Region, ServiceName};

/// The header magic.
pub const MAGIC: &[u8; 2] = b"TL";
/// The only version this build speaks.
pub const VERSION: u8 = 1;
/// The largest body accepted.
pub const MAX_BODY: usize = 512;
/// Bytes before the body.
pub const PREFIX: usize = 5;

/// Where one stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// The destination's region.
    pub region: Region,
    /// The destination service's name.
    pub service: ServiceName,
    /// The destination address, as the destination region's gateway reaches it.
    pub addr: SocketAddr,
}

/// Why a header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("byte 0: bad magic {0:02x?} (not a trustline tunnel stream)")]
    BadMagic([u8; 2]),
    #[error("byte 2: unsupported header version {0} (this build speaks {VERSION})")]
    Version(u8),
    #[error("byte 3: body of {0} bytes is over the limit of {MAX_BODY}")]
    TooLong(usize),
    #[error("byte {at}: truncated {field}")]
    Truncated { at: usize, field: &'static str },
    #[error("byte {at}: bad {field}: {why}")]
    Bad {
        at: usize,
        field: &'static str,
        why: String,
    },
    #[error("byte {at}: {n} unexpected trailing bytes")]
    Trailing { at: usize, n: usize },
    #[error("reading the header: {0}")]
    Io(String),
}

impl StreamHeader {
    /// Encodes the header (the names are valid by their types).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64);
        body.push(self.region.len() as u8);
        body.extend_from_slice(self.region.as_bytes());
        body.push(self.service.len() as u8);
        body.extend_from_slice(self.service.as_bytes());
        match self.addr.ip() {
            IpAddr::V4(ip) => {
                body.push(4);
                body.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                body.push(6);
                body.extend_from_slice(&ip.octets());
            }
        }
        body.extend_from_slice(&self.addr.port().to_be_bytes());
        let mut out = Vec::with_capacity(PREFIX + body.len());
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Checks the fixed prefix; returns the body length.
    pub fn parse_prefix(prefix: &[u8; PREFIX]) -> Result<usize, HeaderError> {
        if &prefix[..2] != MAGIC {
            return Err(HeaderError::BadMagic([prefix[0], prefix[1]]));
        }
        if prefix[2] != VERSION {
            return Err(HeaderError::Version(prefix[2]));
        }
        let len = u16::from_be_bytes([prefix[3], prefix[4]]) as usize;
        if len > MAX_BODY {
            return Err(HeaderError::TooLong(len));
        }
        Ok(len)
    }

    /// Parses a body (offsets in errors count from the start of the header).
    pub fn parse_body(body: &[u8]) -> Result<Self, HeaderError> {
        let mut r = Reader { buf: body, at: 0 };
        let region = r.name("region", Region::new)?;
        let service = r.name("service", ServiceName::new)?;
        let family_at = r.at;
        let ip = match r.take(1, "address family")?[0] {
            4 => IpAddr::V4(Ipv4Addr::from(
                <[u8; 4]>::try_from(r.take(4, "IPv4 address")?).expect("4 bytes"),
            )),
            6 => IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(r.take(16, "IPv6 address")?).expect("16 bytes"),
            )),
            f => {
                return Err(HeaderError::Bad {
                    at: PREFIX + family_at,
                    field: "address family",
                    why: format!("{f}, expected 4 or 6"),
                })
            }
        };
        let port_at = r.at;
        let p = r.take(2, "port")?;
        let port = u16::from_be_bytes([p[0], p[1]]);
        if port == 0 {
            return Err(HeaderError::Bad {
                at: PREFIX + port_at,
                field: "port",
                why: "0".into(),
            });
        }
        if r.at != body.len() {
            return Err(HeaderError::Trailing {
                at: PREFIX + r.at,
                n: body.len() - r.at,
            });
        }
        Ok(StreamHeader {
            region,
            service,
            addr: SocketAddr::new(ip, port),
        })
    }

    /// Reads and parses one header from the start of a stream.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Self, HeaderError> {
        let mut prefix = [0u8; PREFIX];
        read_exact(r, &mut prefix, 0, "header prefix").await?;
        let len = Self::parse_prefix(&prefix)?;
        let mut body = vec![0u8; len];
        read_exact(r, &mut body, PREFIX, "header body").await?;
        Self::parse_body(&body)
    }
}

async fn read_exact<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    at: usize,
    field: &'static str,
) -> Result<(), HeaderError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Err(HeaderError::Truncated { at, field })
        }
        Err(e) => Err(HeaderError::Io(e.to_string())),
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], HeaderError> {
        if self.buf.len() - self.at < n {
            return Err(HeaderError::Truncated {
                at: PREFIX + self.at,
                field,
            });
        }
        let s = &self.buf[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn name<T>(
        &mut self,
        field: &'static str,
        parse: fn(&str) -> Result<T, NameError>,
    ) -> Result<T, HeaderError> {
        let at = PREFIX + self.at;
        let n = self.take(1, field)?[0] as usize;
        let raw = self.take(n, field)?;
        let s = std::str::from_utf8(raw).map_err(|_| HeaderError::Bad {
            at,
            field,
            why: "not UTF-8".into(),
        })?;
        parse(s).map_err(|e| HeaderError::Bad {
            at,
            field,
            why: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StreamHeader {
        StreamHeader {
            region: Region::new("eu-west").unwrap(),
            service: ServiceName::new("checkout.shop").unwrap(),
            addr: "10.1.2.3:8080".parse().unwrap(),
        }
    }

    async fn parse(bytes: &[u8]) -> Result<StreamHeader, HeaderError> {
        let mut r = bytes;
        StreamHeader::read(&mut r).await
    }

    #[tokio::test]
    async fn round_trips_v4_and_v6() {
        for addr in ["10.1.2.3:8080", "[2001:db8::7]:443"] {
            let h = StreamHeader {
                addr: addr.parse().unwrap(),
                ..sample()
            };
            let bytes = h.encode();
            assert_eq!(parse(&bytes).await.unwrap(), h);
        }
    }

    #[tokio::test]
    async fn refuses_each_malformation_with_its_offset() {
        let good = sample().encode();
        let mut bad_magic = good.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            parse(&bad_magic).await,
            Err(HeaderError::BadMagic(_))
        ));
        let mut v2 = good.clone();
        v2[2] = 2;
        assert_eq!(parse(&v2).await, Err(HeaderError::Version(2)));
        let mut long = good.clone();
        long[3..5].copy_from_slice(&(MAX_BODY as u16 + 1).to_be_bytes());
        assert_eq!(parse(&long).await, Err(HeaderError::TooLong(MAX_BODY + 1)));
        // Truncated anywhere: the prefix, the body.
        assert!(matches!(
            parse(&good[..3]).await,
            Err(HeaderError::Truncated { at: 0, .. })
        ));
        assert!(matches!(
            parse(&good[..good.len() - 1]).await,
            Err(HeaderError::Truncated { at: 5, .. })
        ));
        // A length that claims more than the body holds: truncated field inside the body.
        let mut body = good[PREFIX..].to_vec();
        body.truncate(body.len() - 2);
        assert!(matches!(
            StreamHeader::parse_body(&body),
            Err(HeaderError::Truncated { field: "port", .. })
        ));
        // Trailing bytes.
        let mut body = good[PREFIX..].to_vec();
        body.push(0);
        assert!(matches!(
            StreamHeader::parse_body(&body),
            Err(HeaderError::Trailing { n: 1, .. })
        ));
        // Bad region characters, family and port.
        let mut upper = good[PREFIX..].to_vec();
        upper[1] = b'E';
        let e = StreamHeader::parse_body(&upper).unwrap_err();
        assert_eq!(
            e.to_string(),
            "byte 5: bad region: character 'E' (allowed: a-z 0-9 -)"
        );
        let fam = PREFIX + 1 + 7 + 1 + 13;
        let mut family = good.clone();
        family[fam] = 5;
        assert!(matches!(
            parse(&family).await,
            Err(HeaderError::Bad { field: "address family", at, .. }) if at == fam
        ));
        let mut port0 = good.clone();
        let n = port0.len();
        port0[n - 2..].copy_from_slice(&[0, 0]);
        assert!(matches!(
            parse(&port0).await,
            Err(HeaderError::Bad { field: "port", .. })
        ));
        // Names the parser refuses cannot be built to encode.
        assert!(Region::new("").is_err());
        assert!(ServiceName::new("a b").is_err());
    }

    #[test]
    fn any_byte_string_is_refused_or_parsed_without_panic() {
        // A cheap deterministic fuzz: every prefix and single-byte mutation of a good header.
        let good = sample().encode();
        for cut in 0..good.len() {
            let _ = StreamHeader::parse_body(&good[PREFIX.min(cut)..cut]);
        }
        for i in PREFIX..good.len() {
            for b in [0u8, 1, 4, 6, 63, 64, 0x7f, 0xff] {
                let mut m = good[PREFIX..].to_vec();
                m[i - PREFIX] = b;
                if let Ok(h) = StreamHeader::parse_body(&m) {
                    // Whatever parses must encode back to the same bytes.
                    assert_eq!(h.encode()[PREFIX..], m[..]);
                }
            }
        }
    }
}
