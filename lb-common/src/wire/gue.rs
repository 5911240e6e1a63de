//! Generic UDP Encapsulation (draft-ietf-intarea-gue, variant 0) as the
//! balancer writes it and the backends' decapsulator reads it.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Ver|C|  Hlen   |  Proto/ctype  |             Flags             |   GUE header
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |  Kind = 1     |  Family 4|6   |          Reserved (0)         |   private data,
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+   only with a
//! |          Second hop address (16 bytes, IPv4 in the first 4)   |   second hop
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+   (Hlen = 5)
//! ```
//!
//! Without a second hop the header is 4 bytes with Hlen, C and Flags 0, the
//! form the Linux kernel's own FOU/GUE receive path decapsulates. With one,
//! no flag is set and the 20 bytes are GUE private data, which the kernel's
//! path accepts and skips (so a backend without our decapsulator still
//! serves the packet; it only cannot pass it on).

use super::Header;

pub const GUE_HDR_LEN: usize = 4;
/// The private block that names a second hop.
pub const GUE_SECOND_HOP_LEN: usize = 20;
/// `Hlen` (32-bit words after the first) of a header with a second hop.
pub const GUE_SECOND_HOP_HLEN: u8 = (GUE_SECOND_HOP_LEN / 4) as u8;
/// The private block's first byte: what follows is a second hop.
pub const GUE_KIND_SECOND_HOP: u8 = 1;
/// The documented default UDP destination port (as Katran's and the
/// examples of `ip fou` use).
pub const GUE_DEFAULT_PORT: u16 = 6080;

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueHdr {
    /// Version (2 bits), control (1 bit), Hlen (5 bits).
    pub ver_c_hlen: u8,
    /// The inner protocol: 4 (IPv4) or 41 (IPv6).
    pub proto: u8,
    pub flags: [u8; 2],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for GueHdr {}

impl GueHdr {
    #[inline(always)]
    pub const fn version(&self) -> u8 {
        self.ver_c_hlen >> 6
    }

    #[inline(always)]
    pub const fn control(&self) -> bool {
        self.ver_c_hlen & 0x20 != 0
    }

    /// Words of optional fields and private data after the first word.
    #[inline(always)]
    pub const fn hlen(&self) -> u8 {
        self.ver_c_hlen & 0x1f
    }

    /// A data header (variant 0, no control bit, no flags) carrying `proto`,
    /// followed by `hlen` words of private data.
    #[inline(always)]
    pub fn write(&mut self, proto: u8, hlen: u8) {
        self.ver_c_hlen = hlen & 0x1f;
        self.proto = proto;
        self.flags = [0, 0];
    }
}

/// The private block naming the backend a packet goes on to when the first
/// holds no socket for its flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GueSecondHop {
    pub kind: u8,
    /// 4 or 6.
    pub family: u8,
    pub _reserved: [u8; 2],
    pub addr: [u8; 16],
}

// SAFETY: plain bytes, alignment 1.
unsafe impl Header for GueSecondHop {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::PacketBytes;

    #[test]
    fn header_bits() {
        let mut h = GueHdr {
            ver_c_hlen: 0xff,
            proto: 0,
            flags: [0xff, 0xff],
        };
        h.write(4, GUE_SECOND_HOP_HLEN);
        assert_eq!(
            [h.ver_c_hlen, h.proto, h.flags[0], h.flags[1]],
            [0x05, 4, 0, 0]
        );
        assert_eq!((h.version(), h.control(), h.hlen()), (0, false, 5));
        h.write(41, 0);
        assert_eq!([h.ver_c_hlen, h.proto], [0, 41]);
    }

    #[test]
    fn second_hop_layout() {
        assert_eq!(core::mem::size_of::<GueHdr>(), GUE_HDR_LEN);
        assert_eq!(core::mem::size_of::<GueSecondHop>(), GUE_SECOND_HOP_LEN);
        let bytes: [u8; 20] = [
            1, 4, 0, 0, 198, 18, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        let hop: &GueSecondHop = bytes[..].header(0).unwrap();
        assert_eq!((hop.kind, hop.family), (GUE_KIND_SECOND_HOP, 4));
        assert_eq!(hop.addr[..4], [198, 18, 0, 20]);
    }
}
