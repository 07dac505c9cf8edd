//! A light MCP client for the side-by-side benchmark (`scripts/bench-paymcp`):
//! the Rust counterpart of `bench/paymcp/client.py`, with the same flows, the
//! same checks and the same last line, but costing a few microseconds per
//! call instead of the Python client's hundreds, so that the servers' own
//! cost, not the client's, sets the figures.
//!
//! It starts the server given after `--` on stdio, speaks newline-delimited
//! JSON-RPC to it (initialize, then `tools/call`), answers the server's
//! `elicitation/create` with "accept" and its `ping`, runs `--warmup`
//! untimed flows and then `--flows` timed ones, one after another. A flow is
//! one completed paid call, however many requests it takes:
//!
//! - `two_step`: `echo` gives a payment id and the next tool; that tool with
//!   the payment id gives the text;
//! - `resubmit`: `echo` fails with a payment id; `echo` again with it gives
//!   the text;
//! - `fast`: `echo` gives the text (PayMCP's elicitation flow adds one
//!   elicitation round trip, accepted at once);
//! - `free`: `word_count`, a tool neither server prices, gives the count:
//!   no payment at all, so the server's MCP round trip alone, the floor
//!   under every paid flow.
//!
//! A flow counts only if its own text ("hi-<n>") comes back, not as an
//! error, with evidence that it was paid: tollgate's
//! `_meta["tollgate/payment"].status == "paid"`, PayMCP's confirm step or
//! resubmission (it runs the tool only once its provider says paid), or an
//! elicitation the server sent during this very call.
//!
//! `cargo bench --bench side_by_side -- --workload fast [--flows N]
//! [--warmup N] [--label L] [--server-log FILE] -- SERVER [ARGS…]`
//!
//! Last line: `RESULT <label> <workload> <flows> <seconds> <flows/s>
//! <server CPU µs per flow|na>`, as the Python client prints it.

use std::{
    fs::File,
    io::{BufRead, BufReader, BufWriter, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, anyhow, bail, ensure};
use serde_json::{Value, json};

#[path = "support/cpu.rs"]
mod cpu;
use cpu::cpu_time;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    TwoStep,
    Resubmit,
    Fast,
    Free,
}

impl Workload {
    fn parse(s: &str) -> anyhow::Result<Self> {
        [Self::TwoStep, Self::Resubmit, Self::Fast, Self::Free]
            .into_iter()
            .find(|workload| workload.name() == s)
            .with_context(|| format!("unknown workload {s:?}: two_step, resubmit, fast or free"))
    }

    fn name(self) -> &'static str {
        match self {
            Self::TwoStep => "two_step",
            Self::Resubmit => "resubmit",
            Self::Fast => "fast",
            Self::Free => "free",
        }
    }

    fn calls_per_flow(self) -> u32 {
        match self {
            Self::TwoStep | Self::Resubmit => 2,
            Self::Fast | Self::Free => 1,
        }
    }
}

struct Args {
    workload: Workload,
    flows: usize,
    warmup: usize,
    label: String,
    server_log: Option<String>,
    server: Vec<String>,
}

fn args() -> anyhow::Result<Args> {
    let mut workload = None;
    let mut flows = 2000;
    let mut warmup = 20;
    let mut label = "server".to_owned();
    let mut server_log = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            // cargo bench adds it.
            "--bench" => {}
            "--workload" => workload = Some(value()?),
            "--flows" => flows = value()?.parse()?,
            "--warmup" => warmup = value()?.parse()?,
            "--label" => label = value()?,
            "--server-log" => server_log = Some(value()?),
            "--" => break,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let server: Vec<String> = it.collect();
    ensure!(!server.is_empty(), "give the server command after --");
    Ok(Args {
        workload: Workload::parse(&workload.context("--workload is required")?)?,
        flows,
        warmup,
        label,
        server_log,
        server,
    })
}

/// One MCP session over a child's stdin and stdout.
struct Session {
    child: Child,
    to_server: BufWriter<ChildStdin>,
    from_server: BufReader<ChildStdout>,
    next_id: u64,
    line: String,
    /// `elicitation/create` requests answered so far.
    elicitations: u64,
}

impl Session {
    fn start(server: &[String], log: Option<&str>) -> anyhow::Result<Self> {
        let stderr = match log {
            Some(path) => Stdio::from(File::options().create(true).append(true).open(path)?),
            None => Stdio::inherit(),
        };
        let mut child = Command::new(&server[0])
            .args(&server[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", server[0]))?;
        let to_server = BufWriter::new(child.stdin.take().context("no stdin")?);
        let from_server = BufReader::new(child.stdout.take().context("no stdout")?);
        let mut session = Self {
            child,
            to_server,
            from_server,
            next_id: 0,
            line: String::new(),
            elicitations: 0,
        };
        session.request(
            "initialize",
            json!({
                "protocolVersion": "2025-06-18",
                "capabilities": { "elicitation": {} },
                "clientInfo": { "name": "side-by-side", "version": "1" },
            }),
        )?;
        session.send(&json!({ "jsonrpc": "2.0", "method": "notifications/initialized" }))?;
        Ok(session)
    }

    fn send(&mut self, message: &Value) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.to_server, message)?;
        self.to_server.write_all(b"\n")?;
        self.to_server.flush()?;
        Ok(())
    }

    /// Sends a request and reads until its answer, answering what the
    /// server asks meanwhile.
    fn request(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        self.send(&json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params }))?;
        loop {
            self.line.clear();
            if self.from_server.read_line(&mut self.line)? == 0 {
                bail!("the server closed stdout while {method} was under way");
            }
            let mut message: Value = serde_json::from_str(&self.line)
                .with_context(|| format!("not JSON-RPC: {}", self.line.trim_end()))?;
            match (
                message.get("method").and_then(Value::as_str),
                message.get("id"),
            ) {
                // A request from the server.
                (Some(asked), Some(asked_id)) => {
                    let asked_id = asked_id.clone();
                    let answer = match asked {
                        "elicitation/create" => {
                            self.elicitations += 1;
                            json!({ "action": "accept", "content": {} })
                        }
                        "ping" => json!({}),
                        "roots/list" => json!({ "roots": [] }),
                        other => bail!("the server asked for {other}, which this client lacks"),
                    };
                    self.send(&json!({ "jsonrpc": "2.0", "id": asked_id, "result": answer }))?;
                }
                // A notification (progress, logging): nothing to answer.
                (Some(_), None) => {}
                (None, Some(answered)) if answered.as_u64() == Some(id) => {
                    if let Some(error) = message.get("error") {
                        bail!("{method} failed: {error}");
                    }
                    return message
                        .get_mut("result")
                        .map(Value::take)
                        .ok_or_else(|| anyhow!("{method}: an answer with no result"));
                }
                _ => bail!("unexpected message: {}", self.line.trim_end()),
            }
        }
    }

    fn call(&mut self, tool: &str, arguments: Value) -> anyhow::Result<Value> {
        self.request(
            "tools/call",
            json!({ "name": tool, "arguments": arguments }),
        )
    }

    /// One paid flow whose text is `want`.
    fn flow(&mut self, workload: Workload, want: &str) -> anyhow::Result<()> {
        match workload {
            Workload::TwoStep => {
                let asked = self.call("echo", json!({ "text": want }))?;
                ensure!(!is_error(&asked), "the first call failed: {asked}");
                let fields = payment_request(&asked, "status")?;
                let next = ["next_step", "next_tool"]
                    .iter()
                    .find_map(|key| fields.get(*key).and_then(Value::as_str))
                    .with_context(|| format!("no next step in: {asked}"))?
                    .to_owned();
                let paid = self.call(&next, json!({ "payment_id": fields["payment_id"] }))?;
                check_paid_text(&paid, want, true)
            }
            Workload::Resubmit => {
                let asked = self.call("echo", json!({ "text": want }))?;
                ensure!(
                    is_error(&asked),
                    "the first call was not a payment error: {asked}"
                );
                let fields = payment_request(&asked, "error")?;
                let paid = self.call(
                    "echo",
                    json!({ "text": want, "payment_id": fields["payment_id"] }),
                )?;
                check_paid_text(&paid, want, true)
            }
            Workload::Fast => {
                let before = self.elicitations;
                let result = self.call("echo", json!({ "text": want }))?;
                check_paid_text(&result, want, self.elicitations > before)
            }
            Workload::Free => {
                let result = self.call("word_count", json!({ "text": want }))?;
                ensure!(!is_error(&result), "an error result: {result}");
                // PayMCP's FastMCP also puts the number in structured
                // content; the text, "1", is common to both.
                ensure!(text_of(&result) == "1", "expected 1 word, got: {result}");
                ensure!(
                    result["_meta"]["tollgate/payment"].is_null(),
                    "a free call carried a payment: {result}"
                );
                Ok(())
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_error(result: &Value) -> bool {
    result.get("isError").and_then(Value::as_bool) == Some(true)
}

fn text_of(result: &Value) -> String {
    result
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("text").and_then(Value::as_str))
        .collect()
}

/// The payment-required answer's fields, whichever server sent it:
/// tollgate's `structuredContent`, PayMCP's JSON text (two_step) or its
/// "Payment ID: …" error text (resubmit).
fn payment_fields(result: &Value) -> anyhow::Result<Value> {
    if let Some(structured) = result.get("structuredContent") {
        for candidate in [structured, &structured["result"]] {
            if candidate.get("payment_id").is_some() {
                return Ok(candidate.clone());
            }
        }
    }
    let text = text_of(result);
    if let Ok(parsed) = serde_json::from_str::<Value>(&text)
        && parsed.get("payment_id").is_some()
    {
        return Ok(parsed);
    }
    if let Some((_, rest)) = text.split_once("Payment ID:")
        && let Some(id) = rest.split_whitespace().next()
    {
        return Ok(json!({ "payment_id": id }));
    }
    bail!("no payment id in: {result}")
}

/// The payment request's fields, checking that `kind_key` (tollgate's
/// `status` in two_step, `error` in resubmit), where present, says so.
fn payment_request(asked: &Value, kind_key: &str) -> anyhow::Result<Value> {
    let fields = payment_fields(asked)?;
    let kind = fields.get(kind_key).and_then(Value::as_str);
    ensure!(
        kind.unwrap_or("payment_required") == "payment_required",
        "not a payment request: {asked}"
    );
    Ok(fields)
}

/// The paid result: the flow's own text, no error, and evidence of payment
/// (tollgate's payment status, else `other_evidence`).
fn check_paid_text(result: &Value, want: &str, other_evidence: bool) -> anyhow::Result<()> {
    ensure!(!is_error(result), "an error result: {result}");
    ensure!(text_of(result) == want, "expected {want:?}, got: {result}");
    match result["_meta"]["tollgate/payment"]["status"].as_str() {
        Some(status) => ensure!(
            status == "paid",
            "tollgate payment status {status}: {result}"
        ),
        None => ensure!(other_evidence, "no evidence the call was paid: {result}"),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    let mut session = Session::start(&args.server, args.server_log.as_deref())?;
    for i in 0..args.warmup {
        session
            .flow(args.workload, &format!("hi--{i}"))
            .with_context(|| format!("warm-up flow {i}"))?;
    }
    let server = session.child.id();
    let server_before = cpu_time(server);
    let client_before = cpu_time(std::process::id());
    let started = Instant::now();
    for i in 0..args.flows {
        session
            .flow(args.workload, &format!("hi-{i}"))
            .with_context(|| format!("flow {i}"))?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let per_flow = |before: Option<Duration>, after: Option<Duration>| match (before, after) {
        (Some(b), Some(a)) => format!(
            "{:.0}",
            a.saturating_sub(b).as_secs_f64() / args.flows.max(1) as f64 * 1e6
        ),
        _ => "na".to_owned(),
    };
    let server_us = per_flow(server_before, cpu_time(server));
    let client_us = per_flow(client_before, cpu_time(std::process::id()));
    let rate = args.flows as f64 / elapsed;
    eprintln!(
        "{} {}: {} flows in {elapsed:.3}s = {rate:.1} flows/s ({} tools/call per flow{}); \
         server CPU {server_us} µs/flow, this client's {client_us} µs/flow",
        args.label,
        args.workload.name(),
        args.flows,
        args.workload.calls_per_flow(),
        if session.elicitations > 0 {
            " + 1 elicitation"
        } else {
            ""
        },
    );
    println!(
        "RESULT {} {} {} {elapsed:.4} {rate:.1} {server_us}",
        args.label,
        args.workload.name(),
        args.flows
    );
    Ok(())
}
