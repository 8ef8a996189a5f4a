//! Payer keys: how silver tells a merchant's payers apart without keeping their tokens.
//!
//! A key is the portable 64-bit rapidhash (V3) of the `payer_ref` bytes: the same token
//! gives the same key on every machine and in every version of streetflow, so keys in
//! the lake never need rebuilding. Two different tokens of one merchant share a key with
//! probability about n² / 2^65 for n payers (3·10⁻¹² at 10,000 payers), so distinct
//! counts and top-payer sums over keys equal those over the tokens for all practical
//! purposes. The hash is fast, not secret: a key is as opaque as the token it stands for,
//! no more.

/// The payer key of a `payer_ref`, as stored in `merchant_daily_history.payers`.
pub fn payer_key(payer_ref: &str) -> i64 {
    rapidhash::v3::rapidhash_v3(payer_ref.as_bytes()) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payer_keys_never_change() {
        // Keys are stored in the lake: a dependency upgrade that changed them would make
        // one payer two. These values were computed once and are pinned here.
        assert_eq!(payer_key("wx-abcdefghijkl"), PINNED_WX);
        assert_eq!(payer_key(""), PINNED_EMPTY);
        assert_ne!(payer_key("a"), payer_key("b"));
    }

    const PINNED_WX: i64 = -3_934_080_325_457_161_041;
    const PINNED_EMPTY: i64 = 232_177_599_295_442_350;
}
