//! Approval rules: how much a charge may be before a person must say yes.
//!
//! `[server] approval_threshold` is the default. `[[approvals]]` rules
//! override it for a principal, a tool, or the tools carrying a tag, or
//! any mix of them. The most specific matching rule wins: one naming the
//! principal beats one that does not; then one naming the tool beats one
//! naming a tag, which beats one naming neither. Among equally specific
//! rules the lowest threshold wins. A charge at or under its threshold is
//! auto-approved (the fast path, when the wallet can pay); above it the
//! person is asked.

use crate::money::{Currency, Units, format_in};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRule {
    pub principal: Option<String>,
    pub tool: Option<String>,
    pub tag: Option<String>,
    pub threshold: Units,
    /// `approvals[N]`, for people reading an intent.
    pub name: String,
    /// 1-based line of the rule's `tool` (else its `threshold`) in its
    /// file, for later errors.
    pub line: Option<usize>,
}

impl ApprovalRule {
    fn matches(&self, principal: Option<&str>, tool: &str, tags: &[String]) -> bool {
        self.principal
            .as_deref()
            .is_none_or(|p| principal == Some(p))
            && self.tool.as_deref().is_none_or(|t| t == tool)
            && self.tag.as_ref().is_none_or(|tag| tags.contains(tag))
    }

    fn specificity(&self) -> (bool, u8) {
        let target = if self.tool.is_some() {
            2
        } else {
            u8::from(self.tag.is_some())
        };
        (self.principal.is_some(), target)
    }

    /// `approvals[0] (principal alice, tag costly): above 0.02`, the
    /// threshold in `currency`, the server's.
    pub fn describe(&self, currency: &Currency) -> String {
        let mut on = Vec::new();
        if let Some(p) = &self.principal {
            on.push(format!("principal {p}"));
        }
        if let Some(t) = &self.tool {
            on.push(format!("tool {t}"));
        }
        if let Some(t) = &self.tag {
            on.push(format!("tag {t}"));
        }
        format!(
            "{} ({}): above {}",
            self.name,
            on.join(", "),
            format_in(self.threshold, currency)
        )
    }
}

/// The threshold that applies to one call, and the rule that set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    pub amount: Units,
    /// `None`: the server's default.
    pub rule: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApprovalRules {
    pub default: Units,
    pub rules: Vec<ApprovalRule>,
}

impl ApprovalRules {
    /// The threshold for a call to `tool`, priced in `currency`.
    pub fn threshold(
        &self,
        principal: Option<&str>,
        tool: &str,
        tags: &[String],
        currency: &Currency,
    ) -> Threshold {
        let best = self
            .rules
            .iter()
            .filter(|r| r.matches(principal, tool, tags))
            .max_by(|a, b| {
                a.specificity()
                    .cmp(&b.specificity())
                    .then(b.threshold.cmp(&a.threshold))
            });
        match best {
            Some(rule) => Threshold {
                amount: rule.threshold,
                rule: Some(rule.describe(currency)),
            },
            None => Threshold {
                amount: self.default,
                rule: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(
        principal: Option<&str>,
        tool: Option<&str>,
        tag: Option<&str>,
        t: i64,
    ) -> ApprovalRule {
        ApprovalRule {
            principal: principal.map(Into::into),
            tool: tool.map(Into::into),
            tag: tag.map(Into::into),
            threshold: Units(t),
            name: "approvals[0]".into(),
            line: None,
        }
    }

    #[test]
    fn the_most_specific_rule_wins_then_the_lowest() {
        let rules = ApprovalRules {
            default: Units(5_000_000),
            rules: vec![
                rule(None, None, Some("costly"), 100),
                rule(None, Some("divide"), None, 200),
                rule(Some("alice"), None, None, 300),
                rule(Some("alice"), None, Some("costly"), 400),
                rule(Some("alice"), None, Some("slow"), 350),
            ],
        };
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let usd = Currency::parse("USD").unwrap();
        let at = |p, tool, t: &[&str]| rules.threshold(p, tool, &tags(t), &usd).amount.0;
        assert_eq!(at(None, "echo", &[]), 5_000_000);
        assert_eq!(at(None, "echo", &["costly"]), 100);
        assert_eq!(at(None, "divide", &["costly"]), 200);
        assert_eq!(at(Some("bob"), "divide", &["costly"]), 200);
        assert_eq!(at(Some("alice"), "divide", &[]), 300);
        assert_eq!(at(Some("alice"), "echo", &["costly"]), 400);
        assert_eq!(at(Some("alice"), "echo", &["costly", "slow"]), 350);
        let chosen = rules.threshold(Some("alice"), "echo", &tags(&["costly"]), &usd);
        assert_eq!(
            chosen.rule.as_deref(),
            Some("approvals[0] (principal alice, tag costly): above 0.0004")
        );
        let rules = ApprovalRules {
            rules: vec![rule(None, Some("echo"), None, 100_000_000)],
            ..rules
        };
        let yen = Currency::parse("JPY").unwrap();
        assert_eq!(
            rules.threshold(None, "echo", &[], &yen).rule.as_deref(),
            Some("approvals[0] (tool echo): above 100")
        );
    }
}
