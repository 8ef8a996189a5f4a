//! The typed `pos_transaction/v1` event and its enumerations.

use std::borrow::Cow;
use std::fmt;

use chrono::{DateTime, FixedOffset};

/// One accepted POS event. Strings borrow from the input message where it holds them
/// unescaped, so decoding a batch allocates little.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PosEvent<'a> {
    /// Idempotency key, unique per operator.
    pub event_id: Cow<'a, str>,
    /// District operator that delivered the event.
    pub operator_id: Cow<'a, str>,
    /// Merchant, scoped by the operator.
    pub merchant_id: Cow<'a, str>,
    /// POS terminal, when the operator sends it.
    pub terminal_id: Option<Cow<'a, str>>,
    /// Sale, refund or void.
    pub kind: EventKind,
    /// Amount in fen (1 yuan = 100 fen), always positive; `kind` gives the direction.
    pub amount_fen: i64,
    /// Currency; only CNY exists in v1.
    pub currency: Currency,
    /// When the sale happened, with the offset the POS reported.
    pub occurred_at: DateTime<FixedOffset>,
    /// Payment channel.
    pub channel: Channel,
    /// For refunds and voids: the `event_id` of the original sale.
    pub ref_event_id: Option<Cow<'a, str>>,
    /// Opaque payer token, never a raw card number.
    pub payer_ref: Option<Cow<'a, str>>,
}

impl PosEvent<'_> {
    /// Copies every borrowed string so the event outlives its input buffer.
    pub fn into_owned(self) -> PosEvent<'static> {
        PosEvent {
            event_id: Cow::Owned(self.event_id.into_owned()),
            operator_id: Cow::Owned(self.operator_id.into_owned()),
            merchant_id: Cow::Owned(self.merchant_id.into_owned()),
            terminal_id: self.terminal_id.map(|s| Cow::Owned(s.into_owned())),
            kind: self.kind,
            amount_fen: self.amount_fen,
            currency: self.currency,
            occurred_at: self.occurred_at,
            channel: self.channel,
            ref_event_id: self.ref_event_id.map(|s| Cow::Owned(s.into_owned())),
            payer_ref: self.payer_ref.map(|s| Cow::Owned(s.into_owned())),
        }
    }
}

/// What an event does to the merchant's cash flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    /// Money in.
    Sale,
    /// Money out, on the refund's own business date.
    Refund,
    /// Cancels the referenced sale entirely.
    Void,
}

impl EventKind {
    /// Every kind, in contract order.
    pub const ALL: [EventKind; 3] = [EventKind::Sale, EventKind::Refund, EventKind::Void];

    /// The contract spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventKind::Sale => "sale",
            EventKind::Refund => "refund",
            EventKind::Void => "void",
        }
    }

    /// Parses the contract spelling (case-sensitive).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Payment channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Channel {
    /// WeChat Pay.
    Wechat,
    /// Alipay.
    Alipay,
    /// UnionPay QR code.
    UnionpayQr,
    /// Bank card on a terminal.
    BankCard,
    /// Cash recorded at the till.
    Cash,
    /// Anything else (vouchers, prepaid cards…).
    Other,
}

impl Channel {
    /// Every channel, in contract order.
    pub const ALL: [Channel; 6] = [
        Channel::Wechat,
        Channel::Alipay,
        Channel::UnionpayQr,
        Channel::BankCard,
        Channel::Cash,
        Channel::Other,
    ];

    /// The contract spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Channel::Wechat => "wechat",
            Channel::Alipay => "alipay",
            Channel::UnionpayQr => "unionpay_qr",
            Channel::BankCard => "bank_card",
            Channel::Cash => "cash",
            Channel::Other => "other",
        }
    }

    /// Parses the contract spelling (case-sensitive).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == text)
    }
}

impl fmt::Display for Channel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Currency of the amount. v1 accepts only Chinese yuan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Currency {
    /// Chinese yuan renminbi.
    Cny,
}

impl Currency {
    /// ISO 4217 code.
    pub const fn as_str(self) -> &'static str {
        "CNY"
    }
}

/// The fields of `pos_transaction/v1`, in contract order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// `event_id`
    EventId,
    /// `operator_id`
    OperatorId,
    /// `merchant_id`
    MerchantId,
    /// `terminal_id`
    TerminalId,
    /// `kind`
    Kind,
    /// `amount_fen`
    AmountFen,
    /// `currency`
    Currency,
    /// `occurred_at`
    OccurredAt,
    /// `channel`
    Channel,
    /// `ref_event_id`
    RefEventId,
    /// `payer_ref`
    PayerRef,
}

impl Field {
    /// Every field, in contract order.
    pub const ALL: [Field; 11] = [
        Field::EventId,
        Field::OperatorId,
        Field::MerchantId,
        Field::TerminalId,
        Field::Kind,
        Field::AmountFen,
        Field::Currency,
        Field::OccurredAt,
        Field::Channel,
        Field::RefEventId,
        Field::PayerRef,
    ];

    /// The JSON key.
    pub const fn as_str(self) -> &'static str {
        match self {
            Field::EventId => "event_id",
            Field::OperatorId => "operator_id",
            Field::MerchantId => "merchant_id",
            Field::TerminalId => "terminal_id",
            Field::Kind => "kind",
            Field::AmountFen => "amount_fen",
            Field::Currency => "currency",
            Field::OccurredAt => "occurred_at",
            Field::Channel => "channel",
            Field::RefEventId => "ref_event_id",
            Field::PayerRef => "payer_ref",
        }
    }

    /// Looks a JSON key up; unknown keys are `None` (and ignored by the decoder).
    pub fn from_key(key: &str) -> Option<Self> {
        Some(match key {
            "event_id" => Field::EventId,
            "operator_id" => Field::OperatorId,
            "merchant_id" => Field::MerchantId,
            "terminal_id" => Field::TerminalId,
            "kind" => Field::Kind,
            "amount_fen" => Field::AmountFen,
            "currency" => Field::Currency,
            "occurred_at" => Field::OccurredAt,
            "channel" => Field::Channel,
            "ref_event_id" => Field::RefEventId,
            "payer_ref" => Field::PayerRef,
            _ => return None,
        })
    }

    /// Required in every event (the `ref_event_id` rule depends on `kind`).
    pub const fn is_always_required(self) -> bool {
        !matches!(
            self,
            Field::TerminalId | Field::RefEventId | Field::PayerRef
        )
    }
}
