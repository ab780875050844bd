//! The BITS upload and upload-reply protocol, without I/O.
//!
//! This crate turns the head of a `BITS_POST` request into a typed [`Packet`], decides what
//! a fragment means for a session ([`decide_fragment`]), and builds the [`Ack`] the client
//! expects. It knows nothing about sockets, files or async runtimes: parsed headers and
//! state go in, a decision comes out. Everything here follows `shared/protocol/BITS-UPLOAD.md`
//! (section numbers in the docs refer to it).
//!
//! ```
//! use bitsd_protocol::{ContentRange, UploadProgress, FragmentDecision, UploadLimits, decide_fragment};
//!
//! let progress = UploadProgress::new();
//! let range: ContentRange = "bytes 0-4095/10000".parse().unwrap();
//! match decide_fragment(&progress, &range, &UploadLimits::default()).unwrap() {
//!     FragmentDecision::Write(w) => assert_eq!((w.write_at, w.len, w.received_after), (0, 4096, 4096)),
//!     other => panic!("unexpected {other:?}"),
//! }
//! ```

mod ack;
mod error;
mod fragment;
pub mod header;
mod packet;
mod range;
mod session_id;
mod size;

pub use ack::Ack;
pub use error::{BitsError, ErrorContext, HResult};
pub use fragment::{
    decide_fragment, FragmentDecision, FragmentWrite, UploadLimits, UploadProgress,
};
pub use packet::{
    negotiate_protocol, FragmentPacket, Packet, PacketType, BITS_1_5_UPLOAD_PROTOCOL,
    MAX_HEADER_VALUE_LEN,
};
pub use range::{ContentRange, ContentRangeError, ReplyRange};
pub use session_id::{SessionId, SessionIdError};
pub use size::{parse_byte_size, ByteSizeError};
