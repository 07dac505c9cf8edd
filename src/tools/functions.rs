//! Tools written as Rust functions: the way a Rust author prices their own
//! tools with tollgate (see [`crate::Tollgate`]), and how the demo tools are
//! built. A tool's input schema comes from its argument type (schemars), and
//! arguments are checked by deserialising into that type before any money
//! moves, so a bad argument is an `isError` naming the field and costs
//! nothing.

use std::{
    collections::BTreeMap, future::Future, marker::PhantomData, pin::Pin, sync::Arc, time::Duration,
};

use async_trait::async_trait;
use rmcp::model::{CallToolResult, ContentBlock, JsonObject, Tool};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{ArgumentError, CallContext, ToolBackend, schema::ToolSchema};

/// What a tool function may return.
pub trait IntoToolResult {
    fn into_tool_result(self) -> CallToolResult;
}

impl IntoToolResult for CallToolResult {
    fn into_tool_result(self) -> CallToolResult {
        self
    }
}

impl IntoToolResult for String {
    fn into_tool_result(self) -> CallToolResult {
        CallToolResult::success(vec![ContentBlock::text(self)])
    }
}

impl IntoToolResult for &'static str {
    fn into_tool_result(self) -> CallToolResult {
        self.to_owned().into_tool_result()
    }
}

/// `Err` is a tool error: the caller is told why and charged nothing.
impl<T: IntoToolResult, E: std::fmt::Display> IntoToolResult for Result<T, E> {
    fn into_tool_result(self) -> CallToolResult {
        match self {
            Ok(value) => value.into_tool_result(),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(e.to_string())]),
        }
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = CallToolResult> + Send>>;

/// One tool, its argument type erased.
trait FnTool: Send + Sync {
    fn describe(&self) -> Tool;
    fn validate(&self, args: &JsonObject) -> Result<(), ArgumentError>;
    fn run(&self, args: JsonObject) -> BoxFuture;
}

struct Typed<A, F> {
    name: String,
    description: String,
    handler: Arc<F>,
    /// The input schema, from `A`, made once.
    schema: Arc<JsonObject>,
    /// It compiled, to check what deserialising does not (a length, a
    /// range, a pattern, at any depth) before any money moves.
    checked: ToolSchema,
    args: PhantomData<fn(A)>,
}

impl<A, F, Fut, R> Typed<A, F>
where
    A: DeserializeOwned + JsonSchema + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoToolResult,
{
    fn parse(args: JsonObject) -> Result<A, ArgumentError> {
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

impl<A, F, Fut, R> FnTool for Typed<A, F>
where
    A: DeserializeOwned + JsonSchema + Send + 'static,
    F: Fn(A) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoToolResult,
{
    fn describe(&self) -> Tool {
        Tool::new(
            self.name.clone(),
            self.description.clone(),
            self.schema.clone(),
        )
    }

    fn validate(&self, args: &JsonObject) -> Result<(), ArgumentError> {
        // serde's error first: it names the field in Rust's terms.
        Self::parse(args.clone())?;
        self.checked.check(args)
    }

    fn run(&self, args: JsonObject) -> BoxFuture {
        match Self::parse(args) {
            Ok(args) => {
                let future = (self.handler)(args);
                Box::pin(async move { future.await.into_tool_result() })
            }
            Err(e) => {
                Box::pin(
                    async move { CallToolResult::error(vec![ContentBlock::text(e.to_string())]) },
                )
            }
        }
    }
}

/// A set of tools written as async Rust functions.
///
/// ```
/// use schemars::JsonSchema;
/// use serde::Deserialize;
/// use tollgate::tools::functions::FnTools;
///
/// #[derive(Deserialize, JsonSchema)]
/// struct Greet { name: String }
///
/// let tools = FnTools::new().tool("greet", "Says hello.", |args: Greet| async move {
///     format!("Hello, {}!", args.name)
/// });
/// ```
#[derive(Default, Clone)]
pub struct FnTools {
    tools: BTreeMap<String, Arc<dyn FnTool>>,
    run_limit: Option<Duration>,
    /// Why these tools cannot be served as given, the first reason found:
    /// two under one name (the second would silently have replaced the
    /// first), or arguments that are not an object. Building refuses them.
    misbuilt: Option<String>,
}

impl FnTools {
    pub fn new() -> Self {
        Self::default()
    }

    /// The longest any of these tools may run. A run past it is stopped
    /// and fails, charging nothing; and a fast-path hold is made to outlive
    /// it. Without one, a run may take as long as it likes, but a hold
    /// lasts 15 minutes (or the payment TTL, if longer): a run longer than
    /// that finds its hold expired, and its result is withheld.
    pub fn run_limit(mut self, limit: Duration) -> Self {
        self.run_limit = Some(limit);
        self
    }

    /// Adds a tool. `handler` takes the deserialised arguments and returns a
    /// [`CallToolResult`], a `String`, or a `Result` of either (`Err` is a
    /// tool error, which charges nothing).
    pub fn tool<A, F, Fut, R>(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        handler: F,
    ) -> Self
    where
        A: DeserializeOwned + JsonSchema + Send + 'static,
        F: Fn(A) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoToolResult + 'static,
    {
        let name = name.into();
        let schema = serde_json::to_value(schemars::schema_for!(A))
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        // MCP sends arguments as an object: a tool taking a string or a
        // number could never be called. (A schema with no `type`, such as
        // a tagged enum's `oneOf`, is left to serde and the schema.)
        let not_an_object = match schema.get("type") {
            None => false,
            Some(Value::String(one)) => one != "object",
            Some(Value::Array(any)) => !any.iter().any(|t| t == "object"),
            Some(_) => true,
        };
        let checked = if not_an_object {
            Err(format!(
                "its arguments must be a struct (a JSON object), not {}",
                std::any::type_name::<A>()
            ))
        } else {
            ToolSchema::compile(&schema).map_err(|e| e.to_string())
        };
        let checked = match checked {
            Ok(checked) => checked,
            Err(why) => {
                self.misbuilt
                    .get_or_insert_with(|| format!("tool `{name}`: {why}"));
                return self;
            }
        };
        let tool = Typed {
            name: name.clone(),
            description: description.into(),
            handler: Arc::new(handler),
            schema: Arc::new(schema),
            checked,
            args: PhantomData,
        };
        if self.tools.insert(name.clone(), Arc::new(tool)).is_some() {
            self.misbuilt.get_or_insert_with(|| {
                format!("two tools are named `{name}`: each tool needs a name of its own")
            });
        }
        self
    }
}

#[async_trait]
impl ToolBackend for FnTools {
    fn tools(&self) -> Vec<Tool> {
        self.tools.values().map(|t| t.describe()).collect()
    }

    fn misbuilt(&self) -> Option<&str> {
        self.misbuilt.as_deref()
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
        let Some(t) = self.tools.get(tool) else {
            return CallToolResult::error(vec![ContentBlock::text(format!("no tool `{tool}`"))]);
        };
        let Some(limit) = self.run_limit else {
            return t.run(args).await;
        };
        let started = tokio::time::Instant::now();
        // A run that awaited and finished in time may be polled a little
        // late on a busy runtime: not held against it.
        let slack = (limit / 4).min(Duration::from_secs(1));
        match tokio::time::timeout(limit, t.run(args)).await {
            // A handler that blocks (no await) cannot be stopped, only
            // found late once it returns: well past the limit, it fails
            // all the same.
            Ok(result) if started.elapsed() <= limit.saturating_add(slack) => result,
            Ok(_) => CallToolResult::error(vec![ContentBlock::text(format!(
                "`{tool}` ran past its limit of {}s without yielding; nothing was charged",
                limit.as_secs_f64()
            ))]),
            Err(_) => CallToolResult::error(vec![ContentBlock::text(format!(
                "`{tool}` did not finish within {}s, so it was stopped; nothing was charged",
                limit.as_secs_f64()
            ))]),
        }
    }

    fn run_limit(&self) -> Option<Duration> {
        self.run_limit
    }
}
