//! The streetflow event contract and the rules every stage shares; no I/O.
//!
//! The entry point is [`decode`]: raw message bytes and the time they were received go
//! in, a typed [`PosEvent`] or a [`Rejection`] with a stable [`ReasonCode`] comes out.
//! Downstream stages place events on business dates with a [`BusinessCalendar`] and add
//! money as `i64` fen with the helpers in [`money`].

pub mod calendar;
pub mod card;
pub mod decode;
pub mod event;
pub mod money;
pub mod reason;
pub mod registry;
pub mod time;

pub use calendar::{BusinessCalendar, CalendarError, DEFAULT_TIME_ZONE};
pub use decode::{DecodeOptions, MAX_FUTURE_SKEW, MAX_MESSAGE_BYTES, Rejection, decode};
pub use event::{Channel, Currency, EventKind, Field, PosEvent};
pub use reason::ReasonCode;
pub use registry::MerchantRecord;
