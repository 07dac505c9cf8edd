//! What a call costs: a flat price, or a metered one that depends on the
//! call's arguments or on the usage the tool reports.
//!
//! A metered price is `base + per_unit × ⌈units / unit_size⌉`, never above
//! `max`. Units are counted in started blocks of `unit_size` ("0.002 per
//! 1,000 characters": 1,001 characters are two blocks), so every charge is
//! exact. The gate holds the most a call can cost, runs the tool, and
//! captures what it did cost; the rest of the hold is released.

use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Value, json};

use crate::money::{Currency, Units, format_in};

/// Where a tool reports the units a call used: `_meta["tollgate/usage"]`,
/// as a number or `{"units": n}`.
pub const USAGE_META: &str = "tollgate/usage";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tariff {
    Flat(Units),
    Metered(Metered),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    pub base: Units,
    pub per_unit: Units,
    /// Units per priced block (1 for "per item", 1000 for "per 1,000
    /// characters").
    pub unit_size: u64,
    pub measure: Measure,
    /// The most one call is charged, and what is held for it when the
    /// usage is only known afterwards.
    pub max: Units,
}

/// How a metered call's units are counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measure {
    /// From an argument: a string's characters, an array's items, or a
    /// number's value (rounded up).
    Argument(String),
    /// From the usage the tool reports in its result.
    Reported,
}

impl Tariff {
    /// The most a call with these arguments can be charged: what the gate
    /// holds (or asks to be paid) before it runs.
    pub fn most(&self, args: &JsonObject) -> Units {
        match self {
            Tariff::Flat(price) => *price,
            Tariff::Metered(m) => match &m.measure {
                Measure::Argument(name) => m.price_of(units_in(args.get(name))),
                Measure::Reported => m.max,
            },
        }
    }

    /// What a successful call is charged: never above [`Tariff::most`]. A
    /// tool priced by reported usage that reports none is charged the most.
    pub fn charge(&self, args: &JsonObject, result: &CallToolResult) -> Units {
        match self {
            Tariff::Metered(m) if m.measure == Measure::Reported => match reported_usage(result) {
                Some(units) => m.price_of(units),
                None => {
                    tracing::warn!(
                        "a tool priced by reported usage reported none; charged its maximum"
                    );
                    m.max
                }
            },
            _ => self.most(args),
        }
    }

    pub fn is_free(&self) -> bool {
        match self {
            Tariff::Flat(price) => price.is_zero(),
            Tariff::Metered(m) => m.max.is_zero(),
        }
    }

    /// `_meta["tollgate/price"]`: `amount` is what a call costs at most;
    /// a metered price adds its formula.
    pub fn to_json(&self, currency: &Currency) -> Value {
        let amount = |units| format_in(units, currency);
        match self {
            Tariff::Flat(price) => {
                json!({ "amount": amount(*price), "currency": currency.as_str() })
            }
            Tariff::Metered(m) => json!({
                "amount": amount(m.max),
                "currency": currency.as_str(),
                "metered": {
                    "base": amount(m.base),
                    "per_unit": amount(m.per_unit),
                    "unit_size": m.unit_size,
                    "units": match &m.measure {
                        Measure::Argument(name) => json!({ "argument": name }),
                        Measure::Reported => json!("reported"),
                    },
                    "max": amount(m.max),
                }
            }),
        }
    }

    /// For people: "0.05 USD per call", "0.01 USD + 0.002 USD per 1000
    /// characters of `text`, at most 1.00 USD".
    pub fn describe(&self, currency: &Currency) -> String {
        let amount = |units| format_in(units, currency);
        match self {
            Tariff::Flat(price) => format!("{} {currency} per call", amount(*price)),
            Tariff::Metered(m) => {
                let block = match (&m.measure, m.unit_size) {
                    (Measure::Argument(name), 1) => format!("unit of `{name}`"),
                    (Measure::Argument(name), n) => format!("{n} units of `{name}`"),
                    (Measure::Reported, 1) => "unit used".to_owned(),
                    (Measure::Reported, n) => format!("{n} units used"),
                };
                format!(
                    "{} {currency} + {} {currency} per {block}, at most {} {currency}",
                    amount(m.base),
                    amount(m.per_unit),
                    amount(m.max)
                )
            }
        }
    }
}

impl Metered {
    fn price_of(&self, units: u64) -> Units {
        let blocks = units.div_ceil(self.unit_size.max(1));
        let variable = i64::try_from(blocks)
            .ok()
            .and_then(|blocks| self.per_unit.0.checked_mul(blocks));
        let total = variable.and_then(|v| v.checked_add(self.base.0));
        Units(total.map_or(self.max.0, |total| total.min(self.max.0)))
    }
}

/// Units in an argument: a string's characters, an array's items, an
/// object's keys, a number rounded up; nothing else counts.
fn units_in(value: Option<&Value>) -> u64 {
    match value {
        Some(Value::String(s)) => s.chars().count() as u64,
        Some(Value::Array(items)) => items.len() as u64,
        Some(Value::Object(fields)) => fields.len() as u64,
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f > 0.0).map(|f| f.ceil() as u64))
            .unwrap_or(0),
        _ => 0,
    }
}

/// The units a tool reported using, if it did: a number not below zero
/// (written `3.0` by many JSON writers), a fraction rounded up as an
/// argument's is. Anything else is logged and counts as not reported.
pub fn reported_usage(result: &CallToolResult) -> Option<u64> {
    let reported = result.meta.as_ref()?.0.get(USAGE_META)?;
    let number = match reported {
        Value::Object(fields) => fields.get("units"),
        other => Some(other),
    };
    let units = number.and_then(Value::as_number).and_then(|n| {
        n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f.ceil() as u64)
        })
    });
    if units.is_none() {
        tracing::warn!(
            usage = %reported,
            "a tool reported usage that is not a number of units (0 or more): charged its maximum"
        );
    }
    units
}

#[cfg(test)]
mod tests {
    use rmcp::model::{ContentBlock, MetaObject};

    use super::*;

    fn units(text: &str) -> Units {
        Units::parse(text).unwrap()
    }

    fn per_kchar() -> Tariff {
        Tariff::Metered(Metered {
            base: units("0.01"),
            per_unit: units("0.002"),
            unit_size: 1000,
            measure: Measure::Argument("text".into()),
            max: units("0.05"),
        })
    }

    fn args(v: Value) -> JsonObject {
        v.as_object().cloned().unwrap()
    }

    fn reporting(usage: Value) -> CallToolResult {
        let mut result = CallToolResult::success(vec![ContentBlock::text("ok")]);
        let mut meta = MetaObject::new();
        meta.0.insert(USAGE_META.into(), usage);
        result.meta = Some(meta);
        result
    }

    #[test]
    fn argument_units_are_counted_in_started_blocks_up_to_the_maximum() {
        let t = per_kchar();
        let ok = CallToolResult::success(vec![]);
        assert_eq!(t.most(&args(json!({"text": ""}))), units("0.01"));
        assert_eq!(
            t.most(&args(json!({"text": "a".repeat(1000)}))),
            units("0.012")
        );
        assert_eq!(
            t.most(&args(json!({"text": "é".repeat(1001)}))),
            units("0.014")
        );
        assert_eq!(
            t.most(&args(json!({"text": "a".repeat(100_000)}))),
            units("0.05")
        );
        assert_eq!(t.charge(&args(json!({"text": "abc"})), &ok), units("0.012"));
    }

    #[test]
    fn reported_usage_is_charged_after_the_run_never_above_the_hold() {
        let t = Tariff::Metered(Metered {
            base: units("0.01"),
            per_unit: units("0.002"),
            unit_size: 1,
            measure: Measure::Reported,
            max: units("0.05"),
        });
        let a = args(json!({}));
        assert_eq!(t.most(&a), units("0.05"));
        assert_eq!(t.charge(&a, &reporting(json!(3))), units("0.016"));
        assert_eq!(t.charge(&a, &reporting(json!({"units": 0}))), units("0.01"));
        assert_eq!(t.charge(&a, &reporting(json!(1_000_000))), units("0.05"));
        assert_eq!(t.charge(&a, &reporting(json!(u64::MAX))), units("0.05"));
        // No usage reported: the most, which the payer agreed to.
        assert_eq!(
            t.charge(&a, &CallToolResult::success(vec![])),
            units("0.05")
        );
        assert_eq!(t.charge(&a, &reporting(json!("three"))), units("0.05"));
        // A whole number written as a float is that number; a fraction is
        // rounded up; a negative one is not a usage.
        assert_eq!(t.charge(&a, &reporting(json!(3.0))), units("0.016"));
        assert_eq!(
            t.charge(&a, &reporting(json!({"units": 2.5}))),
            units("0.016")
        );
        assert_eq!(t.charge(&a, &reporting(json!(-1))), units("0.05"));
        assert_eq!(t.charge(&a, &reporting(json!(-0.5))), units("0.05"));
    }

    #[test]
    fn the_formula_is_published() {
        let usd = Currency::parse("USD").unwrap();
        let published = per_kchar().to_json(&usd);
        assert_eq!(published["amount"], "0.05");
        assert_eq!(published["metered"]["per_unit"], "0.002");
        assert_eq!(published["metered"]["units"]["argument"], "text");
        assert_eq!(
            per_kchar().describe(&usd),
            "0.01 USD + 0.002 USD per 1000 units of `text`, at most 0.05 USD"
        );
    }
}
