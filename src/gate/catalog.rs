//! What tools exist, what they cost, and how they are listed to clients.

use std::{
    collections::{BTreeMap, HashMap, btree_map},
    sync::Arc,
};

use rmcp::model::{JsonObject, MetaObject, Tool};
use serde_json::{Value, json};

use crate::{
    config::{Config, ConfigError, Mode, Unpriced},
    money::{Currency, Units},
    tariff::{Measure, Tariff},
    terms::Terms,
    tools::{ToolBackend, schema::ToolSchema},
};

/// The price, terms and mode of one priced tool.
#[derive(Debug, Clone)]
pub struct Price {
    pub tariff: Tariff,
    pub terms: Terms,
    pub currency: Currency,
    pub mode: Mode,
    /// Labels approval rules match.
    pub tags: Vec<String>,
    /// The JSON type(s) the tool's schema declares for the argument a
    /// metered price counts, if it declares any.
    pub metered_type: Option<Value>,
}

/// The one countable type a metered argument's schema gives it (`null`
/// aside: a missing value is refused anyway), if it gives exactly one.
fn one_type(declared: Option<&Value>) -> Option<&str> {
    let kinds: Vec<&str> = match declared? {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many
            .iter()
            .filter_map(Value::as_str)
            .filter(|kind| *kind != "null")
            .collect(),
        _ => return None,
    };
    match kinds[..] {
        [kind @ ("string" | "array" | "object" | "number" | "integer")] => Some(kind),
        _ => None,
    }
}

impl Price {
    /// A metered argument must be there, of the type the tool declares, and
    /// not negative: the price is counted from the JSON as sent, and a tool
    /// (an upstream, say) that filled in a default or read `"100000"` as a
    /// number would do more than was paid for.
    pub fn check_metered_argument(&self, args: &JsonObject) -> Result<(), (String, String)> {
        let Tariff::Metered(metered) = &self.tariff else {
            return Ok(());
        };
        let Measure::Argument(name) = &metered.measure else {
            return Ok(());
        };
        let refuse = |why: String| Err((name.clone(), format!("invalid argument `{name}`: {why}")));
        let value = match args.get(name) {
            None | Some(Value::Null) => {
                return refuse("the price is counted from it, so it must be given".into());
            }
            Some(value) => value,
        };
        if value.as_f64().is_some_and(|n| n < 0.0) {
            return refuse("the price is counted from it, so it may not be negative".into());
        }
        // The catalog serves a metered price only where the schema gives
        // the argument one type (see [`one_type`]).
        let Some(kind) = one_type(self.metered_type.as_ref()) else {
            return refuse("its type is not known, so the price cannot be counted".into());
        };
        let is = match kind {
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            "number" => value.is_number(),
            // Not 3.0, though JSON Schema takes it: many tools read only
            // a whole number written as one.
            "integer" => value.is_i64() || value.is_u64(),
            _ => false,
        };
        if is {
            Ok(())
        } else {
            refuse(format!("expected {kind}"))
        }
    }
    /// What the payer is asked for before a call with these arguments
    /// runs: the most it can cost, plus the outgoing commission.
    pub fn upfront(&self, args: &JsonObject) -> Units {
        self.terms
            .payer_pays(self.tariff.most(args), &self.currency)
    }
}

pub struct Entry {
    pub backend: Arc<dyn ToolBackend>,
    /// `None`: free, passed through untouched.
    pub price: Option<Price>,
    /// The tool declares an `outputSchema`: the gate's own replies to it
    /// leave `structuredContent` out (see [`super::reply::for_tool`]).
    pub has_output_schema: bool,
    /// A priced tool's `outputSchema`, compiled (if it can be): a result
    /// that does not fit it counts as failed.
    pub output: Option<Arc<ToolSchema>>,
}

pub struct Catalog {
    entries: BTreeMap<String, Entry>,
    /// `confirm_<tool>_payment` → tool.
    confirms: HashMap<String, String>,
    listed: Vec<Tool>,
}

pub const PAYMENT_ID_ARG: &str = "payment_id";

pub fn confirm_tool_name(tool: &str) -> String {
    format!("confirm_{tool}_payment")
}

impl Catalog {
    /// Joins the backends' tools with `pricing.toml`. A priced tool no
    /// backend provides, or a name served twice, is a start-up error.
    pub fn build(config: &Config, backends: &[Arc<dyn ToolBackend>]) -> Result<Self, ConfigError> {
        Self::join(config, backends, None)
    }

    /// The same while running, after an upstream changed its tools: a priced
    /// tool that went away is simply not served (and logged), and a name
    /// two backends now share stays with the one that served it in
    /// `previous`: its price, and the payments already made for it, were
    /// for that backend's tool.
    pub fn build_lenient(
        config: &Config,
        backends: &[Arc<dyn ToolBackend>],
        previous: &Catalog,
    ) -> Result<Self, ConfigError> {
        Self::join(config, backends, Some(previous))
    }

    fn join(
        config: &Config,
        backends: &[Arc<dyn ToolBackend>],
        previous: Option<&Catalog>,
    ) -> Result<Self, ConfigError> {
        let strict = previous.is_none();
        // At start, a tool that cannot be served as configured stops it.
        // While running (an upstream changed its tools), only that tool is
        // left out, logged: refusing the whole list would keep every other
        // upstream's changes out too.
        let refuse = |message: String| {
            if strict {
                return Err(config.error(message));
            }
            tracing::error!("tool list changed upstream: {message}; that tool is not served");
            Ok(())
        };
        let mut described: BTreeMap<String, (Tool, Arc<dyn ToolBackend>)> = BTreeMap::new();
        for backend in backends {
            if let Some(why) = backend.misbuilt().filter(|_| strict) {
                return Err(config.error(why.to_owned()));
            }
            for tool in backend.tools() {
                let name = tool.name.to_string();
                let served_before = previous
                    .and_then(|p| p.entries.get(&name))
                    .is_some_and(|e| Arc::ptr_eq(&e.backend, backend));
                match described.entry(name) {
                    btree_map::Entry::Vacant(free) => {
                        free.insert((tool, backend.clone()));
                    }
                    btree_map::Entry::Occupied(mut taken) => {
                        let name = taken.key();
                        refuse(format!("two backends both provide a tool named `{name}`"))?;
                        if served_before {
                            taken.insert((tool, backend.clone()));
                        }
                    }
                }
            }
        }
        // A rule for a tool nobody serves would never ask anyone. The config
        // could not tell when an upstream prices its unlisted tools.
        if strict
            && let Some((rule, tool)) = config.approvals.rules.iter().find_map(|rule| {
                let tool = rule.tool.as_deref()?;
                (!described.contains_key(tool)).then_some((rule, tool))
            })
        {
            return Err(config.error_at(
                rule.line,
                format!(
                    "{}.tool: no backend provides a tool named `{tool}`",
                    rule.name
                ),
            ));
        }
        let mut prices: HashMap<&str, Price> = HashMap::new();
        let mut explicitly_free = std::collections::HashSet::new();
        for priced in &config.tools {
            if !described.contains_key(&priced.name) && !strict {
                // An error, not a warning: an upstream that renamed a priced
                // tool now serves it under a name its `unpriced` rule covers
                // (free, by default) until the new name is priced.
                tracing::error!(
                    tool = priced.name,
                    "a priced tool is no longer provided; not served. If its upstream renamed it, price \
                     the new name: unpriced, it is served as the upstream's `unpriced` says"
                );
                continue;
            }
            if !described.contains_key(&priced.name) {
                let known: Vec<&str> = described.keys().map(String::as_str).collect();
                let demo = !config.demo_tools
                    && (crate::tools::demo::demo_tools().tools())
                        .iter()
                        .any(|t| t.name == priced.name);
                return Err(config.tool_error(
                    priced,
                    format!(
                        "tools.name: no backend provides a tool named `{}` (known tools: {}){}",
                        priced.name,
                        known.join(", "),
                        if demo {
                            "; it is a demo tool, served beside [[upstreams]] only with \
                             [server] demo_tools = true"
                        } else {
                            ""
                        }
                    ),
                ));
            }
            if priced.price.is_free() {
                explicitly_free.insert(priced.name.as_str());
                continue;
            }
            let mut metered_type = None;
            if let Tariff::Metered(metered) = &priced.price
                && let Measure::Argument(argument) = &metered.measure
            {
                let (tool, _) = &described[&priced.name];
                let declared = tool
                    .input_schema
                    .get("properties")
                    .and_then(|p| p.get(argument));
                metered_type = declared.and_then(|d| d.get("type")).cloned();
                let problem = match declared {
                    None => Some(format!("has no argument `{argument}` to meter")),
                    Some(_) if one_type(metered_type.as_ref()).is_none() => Some(format!(
                        "meters argument `{argument}`, whose input schema gives it {}: it must give it one \
                         type (a string's characters and a number's value count differently, and \
                         a tool may read one as the other)",
                        match &metered_type {
                            Some(kinds) => format!("the types {kinds}"),
                            None => "no type".to_owned(),
                        }
                    )),
                    Some(_) => None,
                };
                if let Some(problem) = problem {
                    let message = format!("tools.price: `{}` {problem}", priced.name);
                    if strict {
                        return Err(config.tool_error(priced, message));
                    }
                    // Not served at a price it cannot be measured by, nor
                    // for free.
                    refuse(message)?;
                    described.remove(&priced.name);
                    continue;
                }
            }
            prices.insert(
                &priced.name,
                Price {
                    tariff: priced.price.clone(),
                    terms: priced.terms.clone(),
                    currency: config.currency.clone(),
                    mode: priced.mode.unwrap_or(config.mode),
                    tags: priced.tags.clone(),
                    metered_type,
                },
            );
        }

        let mut entries = BTreeMap::new();
        let mut confirms = HashMap::new();
        let mut listed = Vec::new();
        for (name, (tool, backend)) in described {
            let price = match prices.remove(name.as_str()) {
                Some(price) => Some(price),
                None if explicitly_free.contains(name.as_str()) => None,
                // Not in [[tools]]: the backend's default for unpriced tools.
                None => match backend.unpriced() {
                    Unpriced::Free => None,
                    Unpriced::Hidden => continue,
                    Unpriced::Price(amount) => Some(Price {
                        tariff: Tariff::Flat(amount),
                        terms: config.terms.clone(),
                        currency: config.currency.clone(),
                        mode: config.mode,
                        tags: Vec::new(),
                        metered_type: None,
                    }),
                },
            };
            if super::dynamic_confirm_payment_id(&name).is_some() {
                refuse(format!(
                    "tool `{name}` is named like the confirm tools dynamic_tools mode adds \
                     (`confirm_pay_…`), so it could never be called: rename it"
                ))?;
                continue;
            }
            if let Some(price) = &price
                && price.mode.resubmits()
                && tool
                    .input_schema
                    .get("properties")
                    .and_then(|p| p.get(PAYMENT_ID_ARG))
                    .is_some()
            {
                refuse(format!(
                    "tool `{name}` has its own `{PAYMENT_ID_ARG}` argument, which mode `{}` uses \
                     for the payment: give it mode two_step or dynamic_tools",
                    price.mode.as_str()
                ))?;
                continue;
            }
            let has_output_schema = tool.output_schema.is_some();
            let output = match (&price, &tool.output_schema) {
                (Some(_), Some(schema)) => match ToolSchema::compile(schema) {
                    Ok(schema) => Some(Arc::new(schema)),
                    Err(e) => {
                        tracing::warn!(
                            tool = name,
                            "output: {e}; its results are charged unchecked"
                        );
                        None
                    }
                },
                _ => None,
            };
            match &price {
                None => listed.push(tool),
                Some(price) => {
                    listed.push(priced_tool(tool, price));
                    if price.mode == Mode::TwoStep {
                        let confirm = confirm_tool_name(&name);
                        confirms.insert(confirm.clone(), name.clone());
                        listed.push(confirm_tool(&confirm, &name, price));
                    }
                }
            }
            entries.insert(
                name,
                Entry {
                    backend,
                    price,
                    has_output_schema,
                    output,
                },
            );
        }
        let colliding: Vec<String> = (confirms.keys())
            .filter(|confirm| entries.contains_key(*confirm))
            .cloned()
            .collect();
        for confirm in colliding {
            refuse(format!(
                "tool `{confirm}` collides with the confirm tool tollgate adds"
            ))?;
            // The confirm tool keeps the name: its priced call needs it.
            entries.remove(&confirm);
            listed.retain(|t| t.name != confirm);
            let tool = &confirms[&confirm];
            if let Some(price) = entries.get(tool).and_then(|e| e.price.as_ref()) {
                listed.push(confirm_tool(&confirm, tool, price));
            }
        }
        listed.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self {
            entries,
            confirms,
            listed,
        })
    }

    pub fn listed(&self) -> &[Tool] {
        &self.listed
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.get(name)
    }

    /// The priced tool a confirm tool belongs to.
    pub fn confirmed_tool(&self, confirm: &str) -> Option<&str> {
        self.confirms.get(confirm).map(String::as_str)
    }

    pub fn listed_tool(&self, name: &str) -> Option<Tool> {
        self.listed.iter().find(|t| t.name == name).cloned()
    }
}

/// `_meta["tollgate/price"]`: the price (a metered one's formula), and the
/// terms when there are fees, so a client can see what it will pay.
pub fn price_json(price: &Price) -> Value {
    let mut published = price.tariff.to_json(&price.currency);
    let terms = &price.terms;
    if terms.commission_out.is_some()
        || terms.platform_share.is_some()
        || terms.commission_in.is_some()
    {
        published["terms"] = terms.to_json(&price.currency);
    }
    published
}

fn price_note(price: &Price) -> String {
    let out = match price.terms.commission_out {
        Some(fee) => format!(" + a {} fee", fee.describe(&price.currency)),
        None => String::new(),
    };
    format!("(price: {}{out})", price.tariff.describe(&price.currency))
}

/// Adds the price to a tool's description and `_meta`; in resubmit mode (and
/// the modes that fall back to it) the schema gains an optional `payment_id`.
fn priced_tool(mut tool: Tool, price: &Price) -> Tool {
    let description = tool
        .description
        .as_deref()
        .unwrap_or("")
        .trim_end()
        .to_owned();
    tool.description = Some(if description.is_empty() {
        price_note(price).into()
    } else {
        format!("{description} {}", price_note(price)).into()
    });
    let mut meta = tool.meta.take().unwrap_or_default();
    meta.0.insert("tollgate/price".into(), price_json(price));
    tool.meta = Some(meta);
    if price.mode.resubmits() {
        let mut schema: JsonObject = (*tool.input_schema).clone();
        let properties = schema
            .entry("properties")
            .or_insert_with(|| Value::Object(JsonObject::new()));
        if let Value::Object(properties) = properties {
            properties.insert(
                PAYMENT_ID_ARG.into(),
                json!({
                    "type": "string",
                    "description": "Leave out on the first call. After paying, call again with the same arguments plus the payment_id you were given."
                }),
            );
        }
        tool.input_schema = Arc::new(schema);
    }
    tool
}

fn confirm_tool(confirm: &str, tool: &str, price: &Price) -> Tool {
    let schema = json!({
        "type": "object",
        "properties": {
            PAYMENT_ID_ARG: { "type": "string", "description": format!("The payment_id returned by `{tool}`.") }
        },
        "required": [PAYMENT_ID_ARG],
        "additionalProperties": false
    });
    let mut meta = MetaObject::new();
    meta.0.insert("tollgate/confirms".into(), json!(tool));
    Tool::new(
        confirm.to_owned(),
        format!(
            "Runs `{tool}` once its payment ({}) is made. Pass the payment_id that `{tool}` returned.",
            price.tariff.describe(&price.currency),
        ),
        Arc::new(schema.as_object().cloned().unwrap_or_default()),
    )
    .with_meta(meta)
}

#[cfg(test)]
mod tests {
    use schemars::JsonSchema;
    use serde::Deserialize;

    use super::*;
    use crate::tools::functions::FnTools;

    #[derive(Deserialize, JsonSchema)]
    struct Query {
        #[allow(dead_code)]
        q: String,
    }

    /// With an upstream that prices its unlisted tools, the config cannot
    /// tell whether an approval rule's tool exists; the catalog can. A rule
    /// for a misspelt tool would never ask anyone, and is refused at start.
    #[test]
    fn an_approval_rule_for_a_tool_nobody_serves_is_refused_at_start() {
        let text = "[server]\nname = \"t\"\ncurrency = \"USD\"\n\n\
                    [[upstreams]]\nname = \"u\"\nurl = \"http://127.0.0.1:1/mcp\"\nunpriced = \"0.02\"\n\n\
                    [[approvals]]\ntool = \"serach\"\nthreshold = \"1\"\n";
        let tools: Arc<dyn ToolBackend> =
            Arc::new(FnTools::new().tool("search", "Finds.", |_: Query| async { "found" }));
        let config = Config::parse(text, "p.toml").expect("the config alone cannot tell");
        let e = Catalog::build(&config, std::slice::from_ref(&tools))
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(
                "p.toml:11: approvals[0].tool: no backend provides a tool named `serach`"
            )),
            "{e:?}"
        );
        let fixed = Config::parse(&text.replace("serach", "search"), "p.toml").unwrap();
        assert!(Catalog::build(&fixed, &[tools]).is_ok());
    }

    /// A tool that cannot be served as configured stops the start; when an
    /// upstream's change brings one while running, only that tool is left
    /// out. (The whole list was refused, and every other change with it.)
    #[test]
    fn a_change_upstream_leaves_out_only_the_tools_that_cannot_be_served() {
        let text = "[server]\nname = \"t\"\ncurrency = \"USD\"\nmode = \"two_step\"\n\n\
                    [[tools]]\nname = \"ok\"\nprice = \"0.01\"\n";
        let config = Config::parse(text, "p.toml").unwrap();
        let first: Arc<dyn ToolBackend> = Arc::new(
            FnTools::new()
                .tool("ok", "Fine.", |_: Query| async { "ok" })
                .tool("clash", "The first.", |_: Query| async { "first" }),
        );
        let second: Arc<dyn ToolBackend> = Arc::new(
            FnTools::new()
                .tool("clash", "The second.", |_: Query| async { "second" })
                .tool("new", "Added upstream.", |_: Query| async { "new" })
                .tool(
                    "confirm_pay_0123",
                    "Named like a confirm tool.",
                    |_: Query| async { "" },
                )
                .tool(
                    "confirm_ok_payment",
                    "Named like ok's confirm.",
                    |_: Query| async { "" },
                ),
        );
        let backends = [first, second];
        assert!(
            Catalog::build(&config, &backends).is_err(),
            "refused at start"
        );

        // Served before: `clash` by the first backend (the second had not
        // got it yet).
        let before = Catalog::build(&config, &backends[..1]).expect("served");
        let catalog = Catalog::build_lenient(&config, &backends, &before).expect("served");
        let names: Vec<&str> = catalog.listed().iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(names, ["clash", "confirm_ok_payment", "new", "ok"]);
        let described = |catalog: &Catalog| {
            let clash = catalog.listed_tool("clash").unwrap();
            clash.description.as_deref().map(str::to_owned)
        };
        assert_eq!(described(&catalog).as_deref(), Some("The first."));

        // And the other way round: served by the second backend, listed
        // after the first, `clash` stays the second's when the first adds
        // one. (The first in config order took it, and with it the price
        // and the payments made for the second's tool.)
        let only_second = Catalog::build_lenient(&config, &backends[1..], &before).expect("served");
        assert_eq!(described(&only_second).as_deref(), Some("The second."));
        let catalog = Catalog::build_lenient(&config, &backends, &only_second).expect("served");
        assert_eq!(described(&catalog).as_deref(), Some("The second."));
        assert_eq!(catalog.confirmed_tool("confirm_ok_payment"), Some("ok"));
        assert!(catalog.get("confirm_ok_payment").is_none());
        assert!(catalog.get("confirm_pay_0123").is_none());
        assert!(catalog.get("new").is_some());
    }
}
