//! Checking values against a tool's JSON Schemas. Arguments against its
//! `inputSchema`, for tools tollgate only knows by their schema (an
//! upstream's): the gate checks a priced call's arguments before any money
//! moves, since a call its tool would refuse must not make anyone pay
//! first. And a priced call's `structuredContent` against its
//! `outputSchema`: a result its client would throw away is not charged.

use jsonschema::error::{TypeKind, ValidationErrorKind};
use rmcp::model::JsonObject;
use serde_json::Value;

use super::ArgumentError;

/// A tool's input or output schema, compiled once (when its tool list is
/// loaded).
pub struct ToolSchema(jsonschema::Validator);

/// A schema the validator cannot compile (a bad `pattern`, a remote `$ref`).
#[derive(Debug, thiserror::Error)]
#[error("its schema cannot be checked: {0}")]
pub struct UncheckableSchema(String);

/// How much of the validator's own words an error keeps: its messages can
/// quote the offending value, which may be large.
const MESSAGE_KEPT: usize = 200;

impl ToolSchema {
    pub fn compile(schema: &JsonObject) -> Result<Self, UncheckableSchema> {
        // Offline: no resolver fetches a remote `$ref`, so such a schema is
        // uncheckable rather than a request to somewhere at load time.
        jsonschema::validator_for(&Value::Object(schema.clone()))
            .map(Self)
            .map_err(|e| UncheckableSchema(e.to_string()))
    }

    /// The first way `args` break the schema, naming the field.
    pub fn check(&self, args: &JsonObject) -> Result<(), ArgumentError> {
        self.check_value(&Value::Object(args.clone()))
    }

    /// The first way `value` breaks the schema, naming the field
    /// (`arguments` for the whole value).
    pub fn check_value(&self, value: &Value) -> Result<(), ArgumentError> {
        // Most values fit: a yes or no is cheaper than collecting errors.
        if self.0.is_valid(value) {
            return Ok(());
        }
        let Some(error) = self.0.iter_errors(value).next() else {
            return Ok(());
        };
        let at: Vec<String> = error
            .instance_path()
            .segments()
            .map(|s| s.to_string())
            .collect();
        let (field, message) = match error.kind() {
            ValidationErrorKind::Required { property } => {
                let name = property
                    .as_str()
                    .map_or_else(|| property.to_string(), str::to_owned);
                (joined(&at, Some(&name)), format!("missing field `{name}`"))
            }
            ValidationErrorKind::AdditionalProperties { unexpected }
            | ValidationErrorKind::UnevaluatedProperties { unexpected }
                if !unexpected.is_empty() =>
            {
                let name = &unexpected[0];
                (joined(&at, Some(name)), format!("unknown field `{name}`"))
            }
            ValidationErrorKind::Type { kind } => {
                let expected: Vec<String> = match kind {
                    TypeKind::Single(one) => vec![one.to_string()],
                    TypeKind::Multiple(many) => many.iter().map(|t| t.to_string()).collect(),
                };
                (
                    joined(&at, None),
                    format!("expected {}", expected.join(" or ")),
                )
            }
            _ => {
                let mut message = error.masked_with("the value").to_string();
                if message.len() > MESSAGE_KEPT {
                    let cut = (0..=MESSAGE_KEPT)
                        .rev()
                        .find(|&i| message.is_char_boundary(i))
                        .unwrap_or(0);
                    message.truncate(cut);
                    message.push('…');
                }
                (joined(&at, None), message)
            }
        };
        Err(ArgumentError { field, message })
    }
}

/// A dotted path (`a.b[0].c`, as the function tools name fields), or
/// `arguments` for the whole object.
fn joined(at: &[String], last: Option<&str>) -> String {
    let mut path = String::new();
    for segment in at.iter().map(String::as_str).chain(last) {
        if segment.parse::<usize>().is_ok() {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(segment);
        }
    }
    if path.is_empty() {
        "arguments".to_owned()
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(v: Value) -> JsonObject {
        v.as_object().cloned().unwrap_or_default()
    }

    fn refusal(schema: &ToolSchema, args: Value) -> (String, String) {
        let e = schema.check(&object(args)).expect_err("refused");
        (e.field, e.message)
    }

    /// Each way of breaking a schema names the field, in the function
    /// tools' words where there are some.
    #[test]
    fn a_refusal_names_the_field() {
        let schema = ToolSchema::compile(&object(json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "nights": {"type": "integer", "minimum": 1},
                "guests": {"type": "array", "items": {
                    "type": "object",
                    "properties": {"age": {"type": ["integer", "null"]}},
                    "required": ["name"]
                }}
            },
            "required": ["city"],
            "additionalProperties": false
        })))
        .expect("compiles");
        assert!(
            schema
                .check(&object(json!({"city": "Oslo", "nights": 2})))
                .is_ok()
        );
        let missing = refusal(&schema, json!({"nights": 2}));
        assert_eq!(missing, ("city".into(), "missing field `city`".into()));
        let typed = refusal(&schema, json!({"city": "Oslo", "nights": "2"}));
        assert_eq!(typed, ("nights".into(), "expected integer".into()));
        let unknown = refusal(&schema, json!({"city": "Oslo", "nihgts": 2}));
        assert_eq!(unknown, ("nihgts".into(), "unknown field `nihgts`".into()));
        // Misspelt: one field unknown, one missing; either is named.
        let (field, _) = refusal(&schema, json!({"city": "Oslo", "nihgts": 2}));
        assert!(field == "nihgts" || field == "nights", "{field}");
        let (field, message) = refusal(&schema, json!({"city": "Oslo", "nights": 0}));
        assert_eq!(field, "nights");
        assert!(message.contains("minimum of 1"), "{message}");
        let nested = refusal(
            &schema,
            json!({"city": "Oslo", "guests": [{"name": "a", "age": "x"}]}),
        );
        assert_eq!(
            nested,
            ("guests[0].age".into(), "expected null or integer".into())
        );
        let nested = refusal(&schema, json!({"city": "Oslo", "guests": [{"age": 3}]}));
        assert_eq!(nested.0, "guests[0].name");
    }

    /// A value the message would quote is not echoed back at length.
    #[test]
    fn a_long_value_is_not_echoed_back() {
        let schema = ToolSchema::compile(&object(json!({
            "type": "object",
            "properties": {"code": {"enum": ["a", "b"]}}
        })))
        .expect("compiles");
        let (field, message) = refusal(&schema, json!({"code": "x".repeat(10_000)}));
        assert_eq!(field, "code");
        assert!(message.len() <= MESSAGE_KEPT + '…'.len_utf8(), "{message}");
    }

    /// A schema the validator cannot compile is reported, not a panic.
    #[test]
    fn an_uncompilable_schema_is_reported() {
        for schema in [
            json!({"type": "object", "properties": {"code": {"type": "string", "pattern": "(unclosed"}}}),
            json!({"type": "object", "properties": {"x": {"type": "nonsense"}}}),
            json!({"$ref": "https://schemas.example.com/args.json"}),
        ] {
            assert!(
                ToolSchema::compile(&object(schema.clone())).is_err(),
                "{schema}"
            );
        }
    }
}
