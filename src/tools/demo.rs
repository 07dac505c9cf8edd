//! Built-in demo tools, so the default `pricing.toml` works out of the box.

use rmcp::model::{CallToolResult, ContentBlock};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::functions::FnTools;

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct TextArgs {
    /// The text to work on.
    text: String,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct DivideArgs {
    /// Dividend.
    a: f64,
    /// Divisor; must not be zero.
    b: f64,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SearchArgs {
    /// What to look for (case-insensitive).
    query: String,
    /// The most results to return, 1 to 20.
    #[schemars(range(min = 1, max = 20))]
    limit: u32,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    /// How long to take, in milliseconds: 0 to 10000.
    #[schemars(range(min = 0, max = 10000))]
    ms: u64,
}

/// The longest `sleep`.
const MAX_SLEEP_MS: u64 = 10_000;

/// What `search` searches.
const FRUIT: [&str; 20] = [
    "apple",
    "apricot",
    "banana",
    "blackberry",
    "blueberry",
    "cherry",
    "coconut",
    "fig",
    "strawberry",
    "grape",
    "grapefruit",
    "kiwi",
    "lemon",
    "lime",
    "mango",
    "melon",
    "orange",
    "papaya",
    "peach",
    "pear",
];

/// Reports the results it returned as its usage: a metered tool is charged
/// per result, not per result it might have returned.
fn search(args: SearchArgs) -> CallToolResult {
    if !(1..=20).contains(&args.limit) {
        return CallToolResult::error(vec![ContentBlock::text("limit must be from 1 to 20")]);
    }
    let query = args.query.to_lowercase();
    let found: Vec<&str> = FRUIT
        .iter()
        .copied()
        .filter(|fruit| fruit.contains(&query))
        .take(args.limit as usize)
        .collect();
    let mut result = CallToolResult::success(vec![ContentBlock::text(found.join("\n"))]);
    result.structured_content = Some(json!({ "results": found }));
    let mut meta = rmcp::model::MetaObject::new();
    meta.0
        .insert(crate::tariff::USAGE_META.into(), json!(found.len()));
    result.meta = Some(meta);
    result
}

fn echo(args: TextArgs) -> CallToolResult {
    CallToolResult::success(vec![ContentBlock::text(args.text)])
}

fn word_count(args: TextArgs) -> CallToolResult {
    let words = args.text.split_whitespace().count();
    let mut result = CallToolResult::success(vec![ContentBlock::text(words.to_string())]);
    result.structured_content = Some(json!({ "words": words }));
    result
}

fn divide(args: DivideArgs) -> CallToolResult {
    if args.b == 0.0 {
        return CallToolResult::error(vec![ContentBlock::text("cannot divide by zero")]);
    }
    let quotient = args.a / args.b;
    // JSON has no infinity: it would be answered (and charged) as null.
    if !quotient.is_finite() {
        return CallToolResult::error(vec![ContentBlock::text(
            "the quotient is too large to represent",
        )]);
    }
    let mut result = CallToolResult::success(vec![ContentBlock::text(quotient.to_string())]);
    result.structured_content = Some(json!({ "quotient": quotient }));
    result
}

/// A slow tool: returns after `ms` milliseconds. For trying timeouts,
/// progress, and what a crash in the middle of a paid run does.
async fn sleep(args: SleepArgs) -> CallToolResult {
    if args.ms > MAX_SLEEP_MS {
        return CallToolResult::error(vec![ContentBlock::text(format!(
            "ms must be from 0 to {MAX_SLEEP_MS}"
        ))]);
    }
    tokio::time::sleep(std::time::Duration::from_millis(args.ms)).await;
    CallToolResult::success(vec![ContentBlock::text(format!("slept {} ms", args.ms))])
}

/// `echo`, `word_count`, `divide`, `search` and `sleep`.
pub fn demo_tools() -> FnTools {
    FnTools::new()
        .tool(
            "echo",
            "Returns the text it is given.",
            |args: TextArgs| async move { echo(args) },
        )
        .tool(
            "word_count",
            "Counts the words in a text.",
            |args: TextArgs| async move { word_count(args) },
        )
        .tool(
            "divide",
            "Divides a by b. Dividing by zero, or a quotient too large for a number, is a tool error.",
            |args: DivideArgs| async move { divide(args) },
        )
        .tool(
            "search",
            "Finds fruit whose name contains the query; reports the results returned as its usage.",
            |args: SearchArgs| async move { search(args) },
        )
        .tool(
            "sleep",
            "Returns after `ms` milliseconds (at most 10000): a slow tool.",
            sleep,
        )
}

#[cfg(test)]
mod tests {
    use rmcp::model::JsonObject;
    use serde_json::Value;

    use super::*;
    use crate::tools::{CallContext, ToolBackend};

    fn obj(v: Value) -> JsonObject {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn validation_names_the_field() {
        let demo = demo_tools();
        let e = demo.validate("echo", &obj(json!({}))).unwrap_err();
        assert_eq!(e.field, "text");
        let e = demo.validate("echo", &obj(json!({"text": 5}))).unwrap_err();
        assert_eq!(e.field, "text");
        let e = demo
            .validate("divide", &obj(json!({"a": 1, "b": "x"})))
            .unwrap_err();
        assert_eq!(e.field, "b");
        let e = demo
            .validate("echo", &obj(json!({"text": "x", "extra": 1})))
            .unwrap_err();
        assert_eq!(e.field, "extra");
        assert!(
            demo.validate("divide", &obj(json!({"a": 1, "b": 2})))
                .is_ok()
        );
    }

    #[tokio::test]
    async fn tools_run() {
        let demo = demo_tools();
        let r = demo
            .call(
                "divide",
                obj(json!({"a": 1, "b": 0})),
                &CallContext::default(),
            )
            .await;
        assert_eq!(r.is_error, Some(true));
        let r = demo
            .call(
                "divide",
                obj(json!({"a": 1e308, "b": 1e-308})),
                &CallContext::default(),
            )
            .await;
        assert_eq!(r.is_error, Some(true), "an infinite quotient: {r:?}");
        assert_eq!(r.structured_content, None);
        let r = demo
            .call(
                "divide",
                obj(json!({"a": -1e308, "b": 0.5})),
                &CallContext::default(),
            )
            .await;
        assert_eq!(r.is_error, Some(true), "-inf: {r:?}");
        let r = demo
            .call(
                "word_count",
                obj(json!({"text": "a b  c"})),
                &CallContext::default(),
            )
            .await;
        assert_eq!(r.structured_content, Some(json!({"words": 3})));
        let names: Vec<_> = demo
            .tools()
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        assert_eq!(names, ["divide", "echo", "search", "sleep", "word_count"]);
        let r = demo
            .call(
                "search",
                obj(json!({"query": "Berry", "limit": 10})),
                &CallContext::default(),
            )
            .await;
        assert_eq!(crate::tariff::reported_usage(&r), Some(3));
    }
}
