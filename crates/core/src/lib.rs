//! The streetflow event contract and the rules every stage shares; no I/O.
//!
//! The entry point is [`decode`]: raw message bytes and the time they were received go
//! in, a typed [`PosEvent`] or a [`Rejection`] with a stable [`ReasonCode`] comes out.
//! Downstream stages place events on business dates with a [`BusinessCalendar`] and add
//! money as `i64` fen with the helpers in [`money`].

pub mod calendar;
pub mod card;
pub mod config;
pub mod csv_mapping;
pub mod decode;
pub mod event;
pub mod health;
pub mod knowledge;
pub mod money;
pub mod payer;
pub mod reason;
pub mod registry;
pub mod tables;
pub mod time;

pub use calendar::{
    BusinessCalendar, BusinessDateCache, CalendarError, DEFAULT_TIME_ZONE, LocalPlace,
    OperatorCalendars,
};
pub use config::PipelineConfig;
pub use decode::{
    DecodeOptions, MAX_FUTURE_SKEW, MAX_MESSAGE_BYTES, Rejection, decode, operator_hint,
};
pub use event::{Channel, Currency, EventKind, Field, PosEvent};
pub use knowledge::{Knowledge, KnowledgeRules, KnowledgeSource};
pub use payer::payer_key;
pub use reason::ReasonCode;
pub use registry::MerchantRecord;
