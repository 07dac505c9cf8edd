//! Fuzzing the gate's handling of `tools/call` (proptest: a gate needs a
//! store and a runtime, which a libFuzzer target does not fit). Random
//! calls (known and unknown tools, arguments of any shape, hostile strings,
//! SQL- and path-looking payment ids, other principals' payment ids, odd
//! `_meta`) go through an rmcp client to a real gate on SQLite. Each must
//! get an answer within `CALL_TIMEOUT` (a hang fails, rather than stalls
//! the run): a result, or, for a tool that does not exist, a JSON-RPC
//! error "invalid params" or "method not found" (not a closed transport,
//! nor any other error). An error result carries a known code, or is a
//! tool's own error: with its hold released (or refunded), or of a free
//! tool. A tool that panics (answered "failed unexpectedly", logged "the
//! tool panicked") fails the run, as does any ERROR the gate logs. Only
//! answers that say `paid` are charged; no hold stays open; the server
//! keeps answering; the ledger stays sound.
//!
//! A plain `cargo test` runs 32 sequences; `TOLLGATE_FUZZ_SECS` runs as
//! many as fit in that time (`scripts/fuzz`). A failing sequence is printed
//! whole: keep it as a regression below.

use std::time::{Duration, Instant};

use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config as RunnerConfig, TestRunner},
};
use rmcp::{
    ServiceError,
    model::{CallToolRequestParams, ErrorCode, MetaObject, RequestMetaObject},
};
use serde_json::{Map, Value, json};
use tollgate::{gate::reply::code, money::Units, testing::LogCapture};

use crate::{
    harness::{args, payment_meta, structured, text},
    inproc::{Elicitation, InProcess, Person},
};

/// How long a call may take. The slowest take well under a second (a
/// payment id whose session is checked with the provider); a call still
/// unanswered after this hangs.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
enum PaymentRef {
    Literal(String),
    /// The newest payment id issued to the other caller.
    Others,
    /// The newest one issued to this caller (for another call, maybe).
    Own,
}

#[derive(Debug, Clone)]
struct FuzzCall {
    /// 0: alice (funded wallet: fast path); 1: bob (no wallet: resubmit).
    caller: usize,
    tool: String,
    arguments: Map<String, Value>,
    /// Keep only the fields the tool takes (so most calls get past
    /// validation to the payment path).
    fit: bool,
    payment: Option<PaymentRef>,
    meta: Option<Map<String, Value>>,
}

const TOOLS: [&str; 6] = [
    "echo",
    "divide",
    "search",
    "sleep",
    "word_count",
    "confirm_echo_payment",
];

/// The served tools `pricing()` leaves unpriced.
const FREE_TOOLS: [&str; 1] = ["word_count"];

fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z ]{0,12}",
        Just("x' OR '1'='1".to_owned()),
        Just("pay_1'; DROP TABLE intents; --".to_owned()),
        Just("../../../etc/passwd".to_owned()),
        Just("pay_%00%2e%2e/".to_owned()),
        Just("\u{0}\u{202e}\u{feff}".to_owned()),
        "[a-z]{1,4}".prop_map(|s| s.repeat(20_000)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        hostile_string().prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(hostile_string(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Arguments near a tool's schema (so calls get past validation), or of
/// any shape at all.
fn arguments() -> impl Strategy<Value = Map<String, Value>> {
    let near = || {
        (
            hostile_string(),
            any::<i32>(),
            -2i32..3,
            0u64..20,
            prop::option::of(("[a-z_]{1,10}", json_value())),
        )
            .prop_map(|(text, a, b, n, extra)| {
                let mut m = Map::new();
                m.insert("text".into(), json!(text));
                m.insert("a".into(), json!(a));
                m.insert("b".into(), json!(b));
                m.insert("query".into(), json!("an"));
                m.insert("limit".into(), json!(n));
                m.insert("ms".into(), json!(n));
                if let Some((k, v)) = extra {
                    m.insert(k, v);
                }
                m
            })
    };
    prop_oneof![
        3 => near(),
        1 => prop::collection::btree_map(hostile_string(), json_value(), 0..4)
            .prop_map(|m| m.into_iter().collect()),
    ]
}

fn fuzz_call() -> impl Strategy<Value = FuzzCall> {
    let tool = prop_oneof![
        8 => prop::sample::select(&TOOLS[..]).prop_map(str::to_owned),
        1 => hostile_string(),
    ];
    let payment = prop::option::of(prop_oneof![
        hostile_string().prop_map(PaymentRef::Literal),
        Just(PaymentRef::Others),
        Just(PaymentRef::Own),
    ]);
    let meta = prop::option::of(prop_oneof![
        json_value().prop_map(|v| {
            let mut m = Map::new();
            m.insert("tollgate/metadata".into(), v);
            m
        }),
        json_value().prop_map(|v| {
            let mut m = Map::new();
            m.insert("tollgate/agent".into(), v);
            m
        }),
    ]);
    (
        0usize..2,
        tool,
        arguments(),
        prop::bool::weighted(0.7),
        payment,
        meta,
    )
        .prop_map(|(caller, tool, arguments, fit, payment, meta)| FuzzCall {
            caller,
            tool,
            arguments,
            fit,
            payment,
            meta,
        })
}

/// echo in two_step (so `confirm_echo_payment` exists), the rest resubmit.
fn pricing() -> String {
    r#"[server]
name = "fuzz"
mode = "resubmit"
currency = "USD"
payment_ttl = "15m"
approval_threshold = "5.00"

[store]
synchronous = "normal"

[[tools]]
name = "echo"
price = "0.01"
mode = "two_step"

[[tools]]
name = "divide"
price = "0.05"

[[tools]]
name = "search"
price = "0.02"

[[tools]]
name = "sleep"
price = "0.03"
"#
    .to_owned()
}

struct Fuzzer {
    server: InProcess,
    /// What the gate logs (the test runs on one thread, so all of it).
    logs: LogCapture,
    /// The slowest answer so far.
    slowest: Duration,
    clients: [crate::inproc::Client; 2],
    issued: [Option<String>; 2],
    /// What alice's answers said she was charged, in micro-units.
    charged: i64,
}

impl Fuzzer {
    async fn new(logs: LogCapture) -> Self {
        let server = InProcess::new(&pricing()).await;
        server.env.topup("alice", "1000.00").await;
        let alice = server
            .connect(
                Some("alice"),
                server.client(Person::Ignores, Elicitation::None),
                false,
            )
            .await;
        let bob = server
            .connect(
                Some("bob"),
                server.client(Person::Ignores, Elicitation::None),
                false,
            )
            .await;
        Self {
            server,
            logs,
            slowest: Duration::ZERO,
            clients: [alice, bob],
            issued: [None, None],
            charged: 0,
        }
    }

    async fn run(&mut self, call: &FuzzCall) -> Result<(), String> {
        let mut arguments = call.arguments.clone();
        if call.fit {
            let fields: &[&str] = match call.tool.as_str() {
                "echo" | "word_count" => &["text"],
                "divide" => &["a", "b"],
                "search" => &["query", "limit"],
                "sleep" => &["ms"],
                _ => &["payment_id"],
            };
            arguments.retain(|k, _| fields.contains(&k.as_str()));
        }
        if let Some(payment) = &call.payment {
            let id = match payment {
                PaymentRef::Literal(id) => Some(id.clone()),
                PaymentRef::Others => self.issued[1 - call.caller].clone(),
                PaymentRef::Own => self.issued[call.caller].clone(),
            };
            if let Some(id) = id {
                arguments.insert("payment_id".into(), json!(id));
            }
        }
        let mut params = CallToolRequestParams::new(call.tool.clone())
            .with_arguments(args(Value::Object(arguments)));
        if let Some(meta) = &call.meta {
            params.meta = Some(RequestMetaObject(MetaObject(meta.clone())));
        }
        let known = TOOLS.contains(&call.tool.as_str());
        let started = Instant::now();
        let answer =
            tokio::time::timeout(CALL_TIMEOUT, self.clients[call.caller].call_tool(params)).await;
        self.slowest = self.slowest.max(started.elapsed());
        self.logged_nothing_wrong()?;
        let r = match answer {
            Err(_) => return Err(format!("no answer within {CALL_TIMEOUT:?}: the call hangs")),
            Ok(Ok(r)) => r,
            Ok(Err(ServiceError::McpError(e)))
                if !known
                    && (e.code == ErrorCode::INVALID_PARAMS
                        || e.code == ErrorCode::METHOD_NOT_FOUND) =>
            {
                return Ok(());
            }
            Ok(Err(e)) if !known => {
                return Err(format!(
                    "an unknown tool got an error other than invalid params or method not \
                     found: {e:?}"
                ));
            }
            Ok(Err(e)) => return Err(format!("a known tool got a protocol error: {e}")),
        };
        if text(&r).contains("failed unexpectedly") {
            return Err(format!("the tool panicked: {r:?}"));
        }
        let body = structured(&r);
        if let Some(id) = body["payment_id"].as_str()
            && (body["error"] == "payment_required" || body["status"] == "payment_required")
        {
            self.issued[call.caller] = Some(id.to_owned());
        }
        let payment = payment_meta(&r);
        let status = payment["status"].as_str().unwrap_or_default();
        if status == "paid" {
            if call.caller != 0 {
                return Err(format!("bob has no money, yet was charged: {r:?}"));
            }
            let amount = Units::parse(payment["amount"].as_str().unwrap_or_default())
                .map_err(|e| format!("paid amount: {e}"))?;
            self.charged += amount.0;
        }
        if r.is_error == Some(true) {
            let code_known = body["error"]
                .as_str()
                .is_some_and(|c| code::ALL.contains(&c));
            // A paid tool's own error has its hold released or its payment
            // refunded. Only a free tool's has no payment at all: a paid
            // tool's error with neither a code nor a payment is unexplained.
            let tool_error = ["released", "refunded"].contains(&status)
                || (payment.is_null() && FREE_TOOLS.contains(&call.tool.as_str()));
            if !code_known && !tool_error {
                return Err(format!("an error result with no known code: {r:?}"));
            }
        }
        Ok(())
    }

    /// Fails on a panicking tool's log line, and on any ERROR logged
    /// since the last look.
    fn logged_nothing_wrong(&self) -> Result<(), String> {
        let logged = self.logs.take();
        let wrong: Vec<&str> = logged
            .lines()
            .filter(|l| l.contains("the tool panicked") || l.contains(" ERROR "))
            .collect();
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(format!("the gate logged:\n{}", wrong.join("\n")))
        }
    }

    /// What must hold between sequences.
    async fn check(&self) -> Result<(), String> {
        let store = self.server.gate.store();
        let available = store
            .balances("alice")
            .await
            .map_err(|e| e.to_string())?
            .first()
            .map_or(0, |b| b.available.0);
        if available != 1_000_000_000 - self.charged {
            return Err(format!(
                "alice has {available} µ available, but her answers charged {} µ of 1000",
                self.charged
            ));
        }
        let stats = store.stats().await.map_err(|e| e.to_string())?;
        if stats.open_holds != 0 {
            return Err(format!("{} holds left open", stats.open_holds));
        }
        for client in &self.clients {
            tokio::time::timeout(CALL_TIMEOUT, client.list_tools(None))
                .await
                .map_err(|_| format!("tools/list unanswered within {CALL_TIMEOUT:?}"))?
                .map_err(|e| format!("the server stopped answering: {e}"))?;
        }
        self.logged_nothing_wrong()
    }
}

fn budget() -> (Option<Duration>, usize) {
    match std::env::var("TOLLGATE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(secs) => (Some(Duration::from_secs(secs)), usize::MAX),
        None => (None, 32),
    }
}

/// On one thread, so that the log capture sees everything the gate logs.
#[tokio::test]
async fn random_tool_calls_get_clear_answers_and_charge_only_what_they_say() {
    tollgate::testing::select(tollgate::testing::Backend::Sqlite);
    let (logs, _guard) = LogCapture::start();
    let mut fuzzer = Fuzzer::new(logs).await;
    let mut runner = TestRunner::new(RunnerConfig::default());
    let strategy = prop::collection::vec(fuzz_call(), 1..8);
    let (time, cases) = budget();
    let started = Instant::now();
    let mut ran = 0;
    while ran < cases && time.is_none_or(|t| started.elapsed() < t) {
        let sequence = strategy
            .new_tree(&mut runner)
            .expect("a sequence")
            .current();
        for call in &sequence {
            if let Err(why) = fuzzer.run(call).await {
                panic!("{why}\nthe sequence: {sequence:#?}");
            }
        }
        if let Err(why) = fuzzer.check().await {
            panic!("{why}\nafter the sequence: {sequence:#?}");
        }
        ran += 1;
    }
    eprintln!(
        "gate fuzz: {ran} sequences in {:.0?}; alice charged {} µ; slowest answer {:.0?}",
        started.elapsed(),
        fuzzer.charged,
        fuzzer.slowest
    );
    fuzzer.server.env.assert_ledger_ok().await;
}
