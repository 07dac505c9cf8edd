//! Built-in demo tools, so the default `pricing.toml` works out of the box.

use std::{collections::BTreeMap, sync::Arc};

use async_trait::async_trait;
use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool};
use schemars::JsonSchema;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{ArgumentError, CallContext, ToolBackend};

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
    let mut result = CallToolResult::success(vec![ContentBlock::text(quotient.to_string())]);
    result.structured_content = Some(json!({ "quotient": quotient }));
    result
}

/// One typed tool: its schema comes from the argument type, and validation
/// is deserialisation into that type.
trait DemoTool: Send + Sync {
    fn describe(&self) -> Tool;
    fn validate(&self, args: &JsonObject) -> Result<(), ArgumentError>;
    fn run(&self, args: JsonObject) -> CallToolResult;
}

struct Typed<A> {
    name: &'static str,
    description: &'static str,
    run: fn(A) -> CallToolResult,
}

impl<A: DeserializeOwned + JsonSchema + Send + Sync> Typed<A> {
    fn parse(&self, args: JsonObject) -> Result<A, ArgumentError> {
        serde_path_to_error::deserialize(Value::Object(args)).map_err(|e| {
            let message = e.inner().to_string();
            let path = e.path().to_string();
            let field = if path == "." {
                named_field(&message).unwrap_or_else(|| "arguments".to_owned())
            } else {
                path
            };
            ArgumentError { field, message }
        })
    }
}

/// serde names a missing or unknown field only in its message.
fn named_field(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("missing field `")
        .or_else(|| message.strip_prefix("unknown field `"))?;
    rest.split('`').next().map(str::to_owned)
}

impl<A: DeserializeOwned + JsonSchema + Send + Sync> DemoTool for Typed<A> {
    fn describe(&self) -> Tool {
        let schema = serde_json::to_value(schemars::schema_for!(A))
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        Tool::new(self.name, self.description, Arc::new(schema))
    }

    fn validate(&self, args: &JsonObject) -> Result<(), ArgumentError> {
        self.parse(args.clone()).map(|_| ())
    }

    fn run(&self, args: JsonObject) -> CallToolResult {
        match self.parse(args) {
            Ok(args) => (self.run)(args),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(e.to_string())]),
        }
    }
}

/// `echo`, `word_count` and `divide`.
pub struct DemoTools {
    tools: BTreeMap<&'static str, Box<dyn DemoTool>>,
}

impl Default for DemoTools {
    fn default() -> Self {
        let list: Vec<(&'static str, Box<dyn DemoTool>)> = vec![
            (
                "echo",
                Box::new(Typed::<TextArgs> {
                    name: "echo",
                    description: "Returns the text it is given.",
                    run: echo,
                }),
            ),
            (
                "word_count",
                Box::new(Typed::<TextArgs> {
                    name: "word_count",
                    description: "Counts the words in a text.",
                    run: word_count,
                }),
            ),
            (
                "divide",
                Box::new(Typed::<DivideArgs> {
                    name: "divide",
                    description: "Divides a by b. Dividing by zero is a tool error.",
                    run: divide,
                }),
            ),
        ];
        Self {
            tools: list.into_iter().collect(),
        }
    }
}

#[async_trait]
impl ToolBackend for DemoTools {
    fn tools(&self) -> Vec<Tool> {
        self.tools.values().map(|t| t.describe()).collect()
    }

    fn validate(&self, tool: &str, args: &JsonObject) -> Result<(), ArgumentError> {
        match self.tools.get(tool) {
            Some(t) => t.validate(args),
            None => Err(ArgumentError {
                field: "name".into(),
                message: format!("no tool `{tool}`"),
            }),
        }
    }

    async fn call(&self, tool: &str, args: JsonObject, _context: &CallContext) -> CallToolResult {
        match self.tools.get(tool) {
            Some(t) => t.run(args),
            None => CallToolResult::error(vec![ContentBlock::text(format!("no tool `{tool}`"))]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(v: Value) -> JsonObject {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn validation_names_the_field() {
        let demo = DemoTools::default();
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
        let demo = DemoTools::default();
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
        assert_eq!(names, ["divide", "echo", "word_count"]);
    }
}
