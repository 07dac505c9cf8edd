//! The money model of one priced tool: who earns a charge, which fees apply,
//! and how a charge splits into ledger legs.
//!
//! A charge of `A` is split like this (the seed wallet API's commissions):
//! - the payer pays `A` plus the outgoing commission;
//! - the platform takes its share of `A`;
//! - the incoming commission is deducted from what the author receives;
//! - the author (the tool's beneficiary) receives the rest.
//!
//! Rounding is explicit. Every leg is a whole number of the currency's minor
//! unit (cents):
//! - the part of `A` below the minor unit (a metered price can charge
//!   0.0123 USD) goes to the rounding account;
//! - percentage shares of the rest are apportioned by largest remainder:
//!   each party gets its exact share rounded down, and the cents left over
//!   go one at a time to the largest dropped fractions (ties: author, then
//!   platform, then commission), so 0.03 split three ways is 0.01 each;
//! - fixed fees come out of the author's share, never more than it;
//! - a percentage outgoing commission is rounded down, in the payer's
//!   favour.
//!
//! So the legs always sum to what the payer pays, and nothing vanishes.

use rust_decimal::{Decimal, prelude::ToPrimitive};
use serde_json::{Value, json};

use crate::money::{Currency, MoneyError, SCALE, Units, format_in};

/// A fee: a percentage of the charge, or a fixed amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fee {
    /// Percent, from 0 to 100 (`"10%"`).
    Percent(Decimal),
    /// A fixed amount in whole minor units (`"0.02"`).
    Fixed(Units),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TermsError {
    #[error("`{0}` is neither a percentage (\"10%\") nor an amount (\"0.02\")")]
    NotAFee(String),
    #[error("percentage {0}% is not between 0 and 100")]
    PercentOutOfRange(Decimal),
    #[error(transparent)]
    Money(#[from] MoneyError),
    #[error("the platform share and incoming commission add up to {0}%, above 100%")]
    SharesAbove100(Decimal),
}

impl Fee {
    /// Parses `"10%"`, `"2.5%"` or `"0.02"`. A fixed fee must be a whole
    /// number of `currency`'s minor unit.
    pub fn parse(text: &str, currency: &Currency) -> Result<Self, TermsError> {
        let trimmed = text.trim();
        if let Some(number) = trimmed.strip_suffix('%') {
            let plain = !number.trim().is_empty()
                && number
                    .trim()
                    .chars()
                    .all(|c| c.is_ascii_digit() || c == '.');
            // Exact: `parse` would round digits past the 28th, not refuse them.
            let percent = Decimal::from_str_exact(number.trim())
                .ok()
                .filter(|_| plain)
                .ok_or_else(|| TermsError::NotAFee(text.to_owned()))?;
            if percent > Decimal::ONE_HUNDRED {
                return Err(TermsError::PercentOutOfRange(percent));
            }
            return Ok(Fee::Percent(percent.normalize()));
        }
        let amount = Units::parse(trimmed).map_err(|e| match e {
            MoneyError::NotDecimal(_) => TermsError::NotAFee(text.to_owned()),
            other => TermsError::Money(other),
        })?;
        crate::money::to_minor_units(amount, currency)?;
        Ok(Fee::Fixed(amount))
    }

    fn percent(self) -> Decimal {
        match self {
            Fee::Percent(p) => p,
            Fee::Fixed(_) => Decimal::ZERO,
        }
    }

    fn fixed(self) -> i64 {
        match self {
            Fee::Percent(_) => 0,
            Fee::Fixed(amount) => amount.0,
        }
    }

    /// For people and JSON: `2%`, or a fixed amount of `currency`.
    pub fn describe(self, currency: &Currency) -> String {
        match self {
            Fee::Percent(p) => format!("{p}%"),
            Fee::Fixed(amount) => format_in(amount, currency),
        }
    }
}

/// The revenue accounts charges are split into (all of kind `revenue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeeAccounts {
    pub platform: String,
    pub commissions: String,
    pub rounding: String,
}

impl Default for FeeAccounts {
    fn default() -> Self {
        Self {
            platform: "platform".into(),
            commissions: "commissions".into(),
            rounding: "rounding".into(),
        }
    }
}

/// Who earns one tool's charges, and the fees on them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Terms {
    /// The tool author's revenue account.
    pub beneficiary: String,
    pub platform_share: Option<Fee>,
    /// Deducted from what the beneficiary receives.
    pub commission_in: Option<Fee>,
    /// Added to what the payer pays.
    pub commission_out: Option<Fee>,
    pub accounts: FeeAccounts,
}

/// What one leg of a split is for; it names the leg in statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Author,
    Platform,
    CommissionIn,
    CommissionOut,
    Rounding,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Author,
        Role::Platform,
        Role::CommissionIn,
        Role::CommissionOut,
        Role::Rounding,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Author => "author",
            Role::Platform => "platform_share",
            Role::CommissionIn => "commission_in",
            Role::CommissionOut => "commission_out",
            Role::Rounding => "rounding",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// A charge split into legs: what the payer pays, and who gets what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// The price charged (before the outgoing commission).
    pub charge: Units,
    /// What leaves the payer's wallet: `charge` plus the outgoing commission.
    pub payer_pays: Units,
    /// Non-zero legs: (role, revenue account name, amount). They sum to
    /// `payer_pays`.
    pub legs: Vec<(Role, String, Units)>,
}

impl Split {
    pub fn leg(&self, role: Role) -> Units {
        Units(
            self.legs
                .iter()
                .filter(|(r, _, _)| *r == role)
                .map(|(_, _, a)| a.0)
                .sum(),
        )
    }
}

impl Terms {
    /// Terms with no fees: the beneficiary receives every charge whole.
    pub fn plain(beneficiary: impl Into<String>) -> Self {
        Self {
            beneficiary: beneficiary.into(),
            platform_share: None,
            commission_in: None,
            commission_out: None,
            accounts: FeeAccounts::default(),
        }
    }

    /// Whether the percentages leave the author something (checked when
    /// `pricing.toml` is read).
    pub fn check(&self) -> Result<(), TermsError> {
        let shares = self.platform_share.map_or(Decimal::ZERO, Fee::percent)
            + self.commission_in.map_or(Decimal::ZERO, Fee::percent);
        if shares > Decimal::ONE_HUNDRED {
            return Err(TermsError::SharesAbove100(shares));
        }
        Ok(())
    }

    /// The outgoing commission on a charge: added to what the payer pays.
    /// Nothing on nothing: a metered call that used nothing costs nothing,
    /// fixed fee included.
    pub fn commission_out(&self, charge: Units, currency: &Currency) -> Units {
        let minor = minor_unit(currency);
        match self.commission_out {
            None => Units(0),
            Some(Fee::Fixed(_)) if charge.0 <= 0 => Units(0),
            Some(Fee::Fixed(amount)) => amount,
            Some(Fee::Percent(p)) => {
                let whole = charge.0 / minor;
                Units(floor_i64(Decimal::from(whole) * p / Decimal::ONE_HUNDRED) * minor)
            }
        }
    }

    /// What the payer pays for a charge: the charge plus the outgoing
    /// commission. It never shrinks as the charge grows, so a hold of
    /// `payer_pays(max)` covers any charge up to `max`.
    pub fn payer_pays(&self, charge: Units, currency: &Currency) -> Units {
        Units(charge.0 + self.commission_out(charge, currency).0)
    }

    /// Splits a charge into its legs (see the module's notes on rounding).
    pub fn split(&self, charge: Units, currency: &Currency) -> Split {
        let minor = minor_unit(currency);
        let rounding = charge.0 % minor;
        let whole = charge.0 / minor;
        // Percentage shares, in minor units, by largest remainder. Author
        // first, so that ties favour the author.
        let weights = [
            Decimal::ONE_HUNDRED
                - self.platform_share.map_or(Decimal::ZERO, Fee::percent)
                - self.commission_in.map_or(Decimal::ZERO, Fee::percent),
            self.platform_share.map_or(Decimal::ZERO, Fee::percent),
            self.commission_in.map_or(Decimal::ZERO, Fee::percent),
        ];
        let mut shares = [0i64; 3];
        let mut dropped = [Decimal::ZERO; 3];
        for (i, weight) in weights.iter().enumerate() {
            let exact = Decimal::from(whole) * weight.max(&Decimal::ZERO) / Decimal::ONE_HUNDRED;
            shares[i] = floor_i64(exact);
            dropped[i] = exact - Decimal::from(shares[i]);
        }
        // The weights sum to 100%, so what is left is the sum of the dropped
        // fractions: fewer cents than there are parties.
        let left = whole - shares.iter().sum::<i64>();
        let mut order = [0usize, 1, 2];
        // Stable: equal fractions keep author, platform, commission order.
        order.sort_by(|a, b| dropped[*b].cmp(&dropped[*a]));
        for i in order.iter().take(left.max(0) as usize) {
            shares[*i] += 1;
        }
        let [mut author, mut platform, mut commission_in] = shares.map(|s| s * minor);
        // Fixed fees come out of the author's share, never more than it.
        for (fee, into) in [
            (self.platform_share, &mut platform),
            (self.commission_in, &mut commission_in),
        ] {
            let take = fee.map_or(0, Fee::fixed).min(author);
            author -= take;
            *into += take;
        }
        let commission_out = self.commission_out(charge, currency).0;
        let accounts = &self.accounts;
        let legs = [
            (Role::Author, &self.beneficiary, author),
            (Role::Platform, &accounts.platform, platform),
            (Role::CommissionIn, &accounts.commissions, commission_in),
            (Role::CommissionOut, &accounts.commissions, commission_out),
            (Role::Rounding, &accounts.rounding, rounding),
        ]
        .into_iter()
        .filter(|(_, _, amount)| *amount != 0)
        .map(|(role, account, amount)| (role, account.clone(), Units(amount)))
        .collect();
        Split {
            charge,
            payer_pays: Units(charge.0 + commission_out),
            legs,
        }
    }

    /// The terms as `tools/list` publishes them, for a price in `currency`.
    pub fn to_json(&self, currency: &Currency) -> Value {
        let mut terms = json!({ "beneficiary": self.beneficiary });
        for (key, fee) in [
            ("platform_share", self.platform_share),
            ("commission_in", self.commission_in),
            ("commission_out", self.commission_out),
        ] {
            if let Some(fee) = fee {
                terms[key] = json!(fee.describe(currency));
            }
        }
        terms
    }
}

/// Splits `amount` in proportion to `weights`, exactly: each part is its
/// share rounded down, and the units left go one at a time to the largest
/// dropped fractions (ties: the earlier weight). A partial refund of a
/// split capture takes back from each leg this way.
pub fn pro_rata(amount: i64, weights: &[i64]) -> Vec<i64> {
    let total: i128 = weights.iter().map(|w| i128::from((*w).max(0))).sum();
    if total == 0 {
        return vec![0; weights.len()];
    }
    let exact: Vec<(i64, i128)> = weights
        .iter()
        .map(|w| {
            let product = i128::from(amount) * i128::from((*w).max(0));
            ((product / total) as i64, product % total)
        })
        .collect();
    let mut parts: Vec<i64> = exact.iter().map(|(part, _)| *part).collect();
    let left = amount - parts.iter().sum::<i64>();
    let mut order: Vec<usize> = (0..parts.len()).collect();
    order.sort_by(|a, b| exact[*b].1.cmp(&exact[*a].1));
    for i in order.into_iter().take(left.max(0) as usize) {
        parts[i] += 1;
    }
    parts
}

/// Micro-units per minor unit of `currency` (10,000 for cents).
pub fn minor_unit(currency: &Currency) -> i64 {
    10i64.pow(SCALE - currency.minor_unit_exponent().min(SCALE))
}

fn floor_i64(d: Decimal) -> i64 {
    d.floor().to_i64().unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn usd() -> Currency {
        Currency::parse("USD").unwrap()
    }

    fn fee(text: &str) -> Fee {
        Fee::parse(text, &usd()).unwrap()
    }

    fn terms(platform: Option<&str>, cin: Option<&str>, cout: Option<&str>) -> Terms {
        Terms {
            platform_share: platform.map(fee),
            commission_in: cin.map(fee),
            commission_out: cout.map(fee),
            ..Terms::plain("alice")
        }
    }

    fn units(text: &str) -> Units {
        Units::parse(text).unwrap()
    }

    #[test]
    fn fees_parse_as_percentages_or_whole_cents() {
        assert_eq!(fee("10%"), Fee::Percent(Decimal::TEN));
        // Past the 28 digits a decimal holds: refused, not rounded to 100%.
        assert!(Fee::parse("100.0000000000000000000000000001%", &usd()).is_err());
        assert_eq!(fee(" 2.5% "), Fee::Percent(Decimal::new(25, 1)));
        assert_eq!(fee("0.02"), Fee::Fixed(Units(20_000)));
        let usd = usd();
        assert!(matches!(
            Fee::parse("101%", &usd),
            Err(TermsError::PercentOutOfRange(_))
        ));
        assert!(matches!(
            Fee::parse("-1%", &usd),
            Err(TermsError::NotAFee(_))
        ));
        assert!(matches!(
            Fee::parse("ten", &usd),
            Err(TermsError::NotAFee(_))
        ));
        assert!(matches!(
            Fee::parse("0.005", &usd),
            Err(TermsError::Money(MoneyError::SubMinor { .. }))
        ));
        assert!(matches!(
            Fee::parse("-0.01", &usd),
            Err(TermsError::Money(MoneyError::Negative(_)))
        ));
    }

    #[test]
    fn the_seed_apis_commission_examples() {
        // Price 100 EUR, out 5, in 3: payer pays 105, beneficiary gets 97.
        let eur = Currency::parse("EUR").unwrap();
        let t = Terms {
            commission_in: Some(Fee::parse("3", &eur).unwrap()),
            commission_out: Some(Fee::parse("5", &eur).unwrap()),
            ..Terms::plain("seller")
        };
        let split = t.split(units("100"), &eur);
        assert_eq!(split.payer_pays, units("105"));
        assert_eq!(split.leg(Role::Author), units("97"));
        assert_eq!(
            split.leg(Role::CommissionIn).0 + split.leg(Role::CommissionOut).0,
            units("8").0
        );
    }

    #[test]
    fn a_cent_split_90_10_goes_to_the_author() {
        let split = terms(Some("10%"), None, None).split(units("0.01"), &usd());
        assert_eq!(
            split.legs,
            vec![(Role::Author, "alice".into(), units("0.01"))]
        );
        let split = terms(Some("10%"), None, None).split(units("1.00"), &usd());
        assert_eq!(split.leg(Role::Author), units("0.90"));
        assert_eq!(split.leg(Role::Platform), units("0.10"));
    }

    #[test]
    fn three_cents_split_three_ways_is_a_cent_each() {
        let split = terms(Some("33.33%"), Some("33.33%"), None).split(units("0.03"), &usd());
        assert_eq!(split.leg(Role::Author), units("0.01"));
        assert_eq!(split.leg(Role::Platform), units("0.01"));
        assert_eq!(split.leg(Role::CommissionIn), units("0.01"));
    }

    #[test]
    fn sub_cent_charges_leave_the_rest_to_the_rounding_account() {
        let split = terms(Some("10%"), None, None).split(units("0.0123"), &usd());
        assert_eq!(split.leg(Role::Author), units("0.01"));
        assert_eq!(split.leg(Role::Rounding), units("0.0023"));
        assert_eq!(split.payer_pays, units("0.0123"));
    }

    #[test]
    fn fixed_fees_never_take_more_than_the_author_has() {
        let split = terms(Some("0.05"), Some("0.02"), None).split(units("0.06"), &usd());
        assert_eq!(split.leg(Role::Platform), units("0.05"));
        assert_eq!(split.leg(Role::CommissionIn), units("0.01"));
        assert_eq!(split.leg(Role::Author), units("0"));
    }

    #[test]
    fn a_fixed_outgoing_commission_is_not_charged_on_nothing() {
        let t = terms(None, None, Some("0.01"));
        assert_eq!(t.payer_pays(units("0"), &usd()), units("0"));
        assert!(t.split(units("0"), &usd()).legs.is_empty());
        assert_eq!(t.payer_pays(units("0.0001"), &usd()), units("0.0101"));
    }

    #[test]
    fn shares_above_100_percent_are_refused() {
        assert!(terms(Some("60%"), Some("40%"), None).check().is_ok());
        assert_eq!(
            terms(Some("60%"), Some("40.01%"), None).check(),
            Err(TermsError::SharesAbove100(Decimal::new(10001, 2)))
        );
    }

    fn any_fee() -> impl Strategy<Value = Option<Fee>> {
        prop_oneof![
            Just(None),
            (0u32..=5000).prop_map(|bp| Some(Fee::Percent(Decimal::new(bp as i64, 2)))),
            (0i64..=500).prop_map(|cents| Some(Fee::Fixed(Units(cents * 10_000)))),
        ]
    }

    /// Awkward amounts: a cent, three cents, sub-cent metered charges, and
    /// values near the largest a wallet holds.
    fn any_charge() -> impl Strategy<Value = Units> {
        prop_oneof![
            Just(Units(10_000)),
            Just(Units(30_000)),
            (0i64..1_000_000).prop_map(Units),
            (0i64..=i64::MAX / 1_000).prop_map(Units),
        ]
    }

    #[test]
    fn pro_rata_is_exact() {
        assert_eq!(pro_rata(100, &[1, 1, 1]), vec![34, 33, 33]);
        assert_eq!(pro_rata(50, &[880, 100, 20]), vec![44, 5, 1]);
        assert_eq!(pro_rata(0, &[1, 2]), vec![0, 0]);
        assert_eq!(pro_rata(7, &[0, 0]), vec![0, 0]);
    }

    proptest! {
        #[test]
        fn pro_rata_parts_sum_to_the_amount_and_never_exceed_their_weight(
            weights in proptest::collection::vec(1i64..1_000_000_000, 1..6),
            permille in 0i64..=1000,
        ) {
            let total: i64 = weights.iter().sum();
            let amount = total / 1000 * permille;
            let parts = pro_rata(amount, &weights);
            prop_assert_eq!(parts.iter().sum::<i64>(), amount);
            for (part, weight) in parts.iter().zip(&weights) {
                prop_assert!(*part >= 0 && part <= weight);
            }
        }

        #[test]
        fn legs_sum_to_what_the_payer_pays(
            platform in any_fee(), cin in any_fee(), cout in any_fee(), charge in any_charge(),
        ) {
            let t = Terms { platform_share: platform, commission_in: cin, commission_out: cout,
                            ..Terms::plain("alice") };
            prop_assume!(t.check().is_ok());
            let usd = usd();
            let split = t.split(charge, &usd);
            let total: i64 = split.legs.iter().map(|(_, _, a)| a.0).sum();
            prop_assert_eq!(total, split.payer_pays.0);
            prop_assert_eq!(split.payer_pays, t.payer_pays(charge, &usd));
            for (role, _, amount) in &split.legs {
                prop_assert!(amount.0 > 0);
                // Every leg but rounding is whole cents; rounding is under a cent.
                if *role == Role::Rounding {
                    prop_assert!(amount.0 < 10_000);
                } else {
                    prop_assert_eq!(amount.0 % 10_000, 0);
                }
            }
            // The payer never pays less than the charge; the author never
            // gets more than it.
            prop_assert!(split.payer_pays >= charge);
            prop_assert!(split.leg(Role::Author) <= charge);
        }

        #[test]
        fn a_hold_of_the_maximum_covers_every_smaller_charge(
            cout in any_fee(), max in 0i64..100_000_000, frac in 0u32..=100,
        ) {
            let t = Terms { commission_out: cout, ..Terms::plain("alice") };
            let usd = usd();
            let charge = Units(max * frac as i64 / 100);
            prop_assert!(t.payer_pays(charge, &usd) <= t.payer_pays(Units(max), &usd));
        }
    }
}
