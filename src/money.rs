//! Exact money. Prices are `rust_decimal` values; the store keeps them as
//! integer micro-units (10^-6 of the currency's major unit) so that SQL can
//! compare and add them exactly. A price with more than six decimal places is
//! refused, never rounded.

use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// Decimal places kept by the store.
pub const SCALE: u32 = 6;
const UNITS_PER_MAJOR: i64 = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyError {
    #[error("`{0}` is not a decimal amount")]
    NotDecimal(String),
    #[error("amount {0} is negative")]
    Negative(Decimal),
    #[error("amount {0} has more than {SCALE} decimal places")]
    TooPrecise(String),
    #[error("amount {0} is too large")]
    TooLarge(Decimal),
    #[error("`{0}` is not an ISO 4217 currency code (three letters)")]
    BadCurrency(String),
    #[error(
        "`{0}` is not an ISO 4217 currency code with a minor unit (USD, EUR, JPY, …), nor one \
         left to private use (an unassigned X code such as XCR)"
    )]
    UnknownCurrency(String),
    #[error(
        "{amount} {currency} has more decimal places than {currency}'s minor unit ({exponent})"
    )]
    SubMinor {
        amount: String,
        currency: Currency,
        exponent: u32,
    },
}

/// An ISO 4217 currency code, upper case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

impl Currency {
    /// A currency given as input (configuration, CLI, HTTP): an ISO 4217
    /// code with a minor unit, in any case, or one ISO 4217 leaves to
    /// private use (an `X` code it does not assign, such as `XCR` for
    /// credits: in cents). A typo such as `UDS` would otherwise open
    /// wallets and prices in a currency nobody holds.
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        let recorded = Self::recorded(code)?;
        match iso_currency::Currency::from_code(&recorded.0) {
            Some(iso) if iso.exponent().is_some() => Ok(recorded),
            None if recorded.0.starts_with('X') => Ok(recorded),
            _ => Err(MoneyError::UnknownCurrency(recorded.0)),
        }
    }

    /// A currency as the store recorded it: any three letters. A ledger
    /// written before codes were checked may hold others, and must still
    /// be read.
    pub fn recorded(code: &str) -> Result<Self, MoneyError> {
        let code = code.trim();
        if code.len() == 3 && code.chars().all(|c| c.is_ascii_alphabetic()) {
            Ok(Self(code.to_ascii_uppercase()))
        } else {
            Err(MoneyError::BadCurrency(code.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// ISO 4217 minor-unit exponent: 2 (cents) for most currencies, and
    /// for a recorded code that is not ISO.
    pub fn minor_unit_exponent(&self) -> u32 {
        iso_currency::Currency::from_code(&self.0)
            .and_then(|iso| iso.exponent())
            .map_or(2, u32::from)
    }
}

impl TryFrom<String> for Currency {
    type Error = MoneyError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Currency> for String {
    fn from(c: Currency) -> String {
        c.0
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A non-negative amount in micro-units, as the store keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Units(pub i64);

impl Units {
    /// Parses a decimal string such as `"0.05"` exactly.
    ///
    /// ```
    /// use tollgate::money::{Currency, Units, format_in};
    /// let price = Units::parse("0.05").unwrap();
    /// assert_eq!(price, Units(50_000));
    /// assert_eq!(format_in(price, &Currency::parse("USD").unwrap()), "0.05");
    /// assert!(Units::parse("-1").is_err());
    /// assert!(Units::parse("0.0000001").is_err()); // refused, never rounded
    /// ```
    pub fn parse(text: &str) -> Result<Self, MoneyError> {
        let trimmed = text.trim();
        // Plain decimal notation only: rust_decimal would also take
        // exponents ("1e3") and underscores, which a price should not have.
        let digits = trimmed.strip_prefix('-').unwrap_or(trimmed);
        let plain = !digits.is_empty()
            && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
            && digits.matches('.').count() <= 1
            && digits.chars().any(|c| c.is_ascii_digit());
        if !plain {
            return Err(MoneyError::NotDecimal(text.to_owned()));
        }
        // Exact: `parse` would round digits past the 28th, not refuse them.
        let value = Decimal::from_str_exact(trimmed).map_err(|e| match e {
            rust_decimal::Error::Underflow => MoneyError::TooPrecise(trimmed.to_owned()),
            _ => MoneyError::NotDecimal(text.to_owned()),
        })?;
        Self::from_decimal(value)
    }

    pub fn from_decimal(value: Decimal) -> Result<Self, MoneyError> {
        if value.is_sign_negative() && !value.is_zero() {
            return Err(MoneyError::Negative(value));
        }
        let normalized = value.normalize();
        if normalized.scale() > SCALE {
            return Err(MoneyError::TooPrecise(value.to_string()));
        }
        let scaled = normalized
            .checked_mul(Decimal::from(UNITS_PER_MAJOR))
            .ok_or(MoneyError::TooLarge(value))?;
        let units: i64 = scaled
            .trunc()
            .try_into()
            .map_err(|_| MoneyError::TooLarge(value))?;
        Ok(Self(units))
    }

    pub fn to_decimal(self) -> Decimal {
        Decimal::new(self.0, SCALE).normalize()
    }

    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// Minor units (cents) at a provider's edge. An amount finer than the
/// currency's minor unit is refused, never rounded or truncated.
pub fn to_minor_units(amount: Units, currency: &Currency) -> Result<i64, MoneyError> {
    let exponent = currency.minor_unit_exponent();
    let per_minor = 10i64.pow(SCALE - exponent.min(SCALE));
    if amount.0 % per_minor != 0 {
        return Err(MoneyError::SubMinor {
            amount: format_in(amount, currency),
            currency: currency.clone(),
            exponent,
        });
    }
    Ok(amount.0 / per_minor)
}

/// The inverse of [`to_minor_units`].
pub fn from_minor_units(minor: i64, currency: &Currency) -> Result<Units, MoneyError> {
    let exponent = currency.minor_unit_exponent();
    let per_minor = 10i64.pow(SCALE - exponent.min(SCALE));
    if minor < 0 {
        return Err(MoneyError::Negative(Decimal::from(minor)));
    }
    minor
        .checked_mul(per_minor)
        .map(Units)
        .ok_or(MoneyError::TooLarge(Decimal::from(minor)))
}

/// Formats an amount of `currency` for people and JSON: at least the
/// currency's minor-unit digits (`12.00` USD, `107` JPY, `1.500` KWD), more
/// only when the amount has them (a metered `0.0025` USD or `0.5` JPY).
pub fn format_in(units: Units, currency: &Currency) -> String {
    format_signed_in(units.0, currency)
}

/// Same as [`format_in`] for ledger entries, which carry a sign.
pub fn format_signed_in(micros: i64, currency: &Currency) -> String {
    with_decimals(micros, currency.minor_unit_exponent())
}

/// An amount with no currency to go by, with at least two decimals (as
/// every amount was shown before amounts took their currency's digits).
/// Only for text that has no currency and must read as earlier versions
/// wrote it, such as `refund`'s default idempotency key; an amount shown
/// with its currency uses [`format_in`].
pub fn format_without_currency(micros: i64) -> String {
    with_decimals(micros, 2)
}

/// The exact amount, with at least `min` decimal places.
fn with_decimals(micros: i64, min: u32) -> String {
    let mut d = Decimal::new(micros, SCALE).normalize();
    if d.scale() < min {
        d.rescale(min.min(SCALE));
    }
    d.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exact_decimals() {
        assert_eq!(Units::parse("0.01"), Ok(Units(10_000)));
        assert_eq!(Units::parse("5"), Ok(Units(5_000_000)));
        assert_eq!(Units::parse("0.000001"), Ok(Units(1)));
        assert_eq!(Units::parse("1.500000000"), Ok(Units(1_500_000)));
    }

    #[test]
    fn refuses_bad_amounts() {
        assert!(matches!(Units::parse("-1"), Err(MoneyError::Negative(_))));
        assert!(matches!(
            Units::parse("NaN"),
            Err(MoneyError::NotDecimal(_))
        ));
        assert!(matches!(
            Units::parse("inf"),
            Err(MoneyError::NotDecimal(_))
        ));
        assert!(matches!(
            Units::parse("1e3"),
            Err(MoneyError::NotDecimal(_))
        ));
        assert!(matches!(
            Units::parse("abc"),
            Err(MoneyError::NotDecimal(_))
        ));
        assert!(matches!(
            Units::parse("0.0000001"),
            Err(MoneyError::TooPrecise(_))
        ));
        // Past the 28 digits a decimal holds: refused, not rounded to 0.01.
        assert_eq!(
            Units::parse("0.00999999999999999999999999999"),
            Err(MoneyError::TooPrecise(
                "0.00999999999999999999999999999".into()
            ))
        );
        assert!(matches!(
            Units::parse("99999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_for_people_in_the_currencys_minor_unit() {
        let usd = Currency::parse("USD").unwrap();
        let jpy = Currency::parse("JPY").unwrap();
        let kwd = Currency::parse("KWD").unwrap();
        // USD: cents, as ever.
        assert_eq!(format_in(Units(10_000), &usd), "0.01");
        assert_eq!(format_in(Units(500_000), &usd), "0.50");
        assert_eq!(format_in(Units(12_000_000), &usd), "12.00");
        assert_eq!(format_in(Units(0), &usd), "0.00");
        assert_eq!(format_signed_in(-10_000, &usd), "-0.01");
        // JPY has no minor unit: whole yen, no decimal point.
        assert_eq!(format_in(Units(1_000_000), &jpy), "1");
        assert_eq!(format_in(Units(107_000_000), &jpy), "107");
        assert_eq!(format_in(Units(0), &jpy), "0");
        assert_eq!(format_signed_in(-5_000_000, &jpy), "-5");
        // KWD has three decimals.
        assert_eq!(format_in(Units(1_000_000), &kwd), "1.000");
        assert_eq!(format_in(Units(1_500_000), &kwd), "1.500");
        assert_eq!(format_in(Units(1_234_000), &kwd), "1.234");
        // Finer than the minor unit (a metered charge): exact, never rounded.
        assert_eq!(format_in(Units(2_500), &usd), "0.0025");
        assert_eq!(format_in(Units(25_000), &usd), "0.025");
        assert_eq!(format_in(Units(107_500_000), &jpy), "107.5");
        assert_eq!(format_in(Units(1), &jpy), "0.000001");
        assert_eq!(format_in(Units(1_234_500), &kwd), "1.2345");
        // No currency: two decimals, as a refund's default key always had.
        assert_eq!(format_without_currency(500_000), "0.50");
        assert_eq!(format_without_currency(2_500), "0.0025");
    }

    #[test]
    fn minor_units_are_exact_or_refused() {
        let usd = Currency::parse("USD").unwrap();
        let jpy = Currency::parse("JPY").unwrap();
        let kwd = Currency::parse("KWD").unwrap();
        assert_eq!(to_minor_units(Units::parse("2.00").unwrap(), &usd), Ok(200));
        assert_eq!(to_minor_units(Units::parse("150").unwrap(), &jpy), Ok(150));
        assert_eq!(
            to_minor_units(Units::parse("1.234").unwrap(), &kwd),
            Ok(1234)
        );
        assert!(matches!(
            to_minor_units(Units::parse("0.005").unwrap(), &usd),
            Err(MoneyError::SubMinor { .. })
        ));
        assert!(to_minor_units(Units::parse("0.5").unwrap(), &jpy).is_err());
        assert_eq!(
            from_minor_units(250, &usd),
            Ok(Units::parse("2.50").unwrap())
        );
        assert!(from_minor_units(-1, &usd).is_err());
    }

    #[test]
    fn currency_codes() {
        assert_eq!(Currency::parse("usd").unwrap().as_str(), "USD");
        assert!(Currency::parse("US").is_err());
        assert!(Currency::parse("U$D").is_err());
        // Three letters, but no ISO 4217 currency: a typo, or a metal
        // with no minor unit.
        for code in ["UDS", "abc", "XAU"] {
            assert_eq!(
                Currency::parse(code),
                Err(MoneyError::UnknownCurrency(code.to_ascii_uppercase()))
            );
        }
        // Private use: an X code ISO 4217 does not assign, in cents.
        let credits = Currency::parse("xcr").unwrap();
        assert_eq!(credits.as_str(), "XCR");
        assert_eq!(credits.minor_unit_exponent(), 2);
        // What an older ledger recorded is still read, in cents.
        let recorded = Currency::recorded("abc").unwrap();
        assert_eq!(recorded.as_str(), "ABC");
        assert_eq!(recorded.minor_unit_exponent(), 2);
    }
}
