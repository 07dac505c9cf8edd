//! The `tollgate` command: serve MCP over stdio or HTTP, and manage
//! wallets, payment sessions, the ledger and receipts.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rmcp::ServiceExt;
use tollgate::{
    allowance,
    app::{self, DEFAULT_PRICING},
    config::Config,
    export,
    gate::{Caller, Gate, SESSION_END_GRACE, SHUTDOWN_GRACE},
    keys::{ApiKey, Scope},
    money::{Currency, Units, format_in, format_without_currency, to_minor_units},
    payment_report::PaymentRecord,
    receipt::ReceiptSigner,
    server::TollgateServer,
    statement,
    store::{
        AccountKind, AccountRef, RefundRequest, SessionStatus, Store, WalletBalance, now_ms,
        rfc3339,
    },
};

// The CLI's output goes through these, which shadow std's `print!` and
// `println!` in this file: std's panic when stdout's reader has gone
// (`tollgate sessions list | head -1`); these return `StdoutClosed`, on which
// `main` exits quietly, as ripgrep does. `serve` writes MCP to stdout through
// its own transport, not these.
macro_rules! print {
    ($($arg:tt)*) => {
        write_stdout(format_args!($($arg)*))?
    };
}

macro_rules! println {
    ($($arg:tt)*) => {
        write_stdout(format_args!("{}\n", format_args!($($arg)*)))?
    };
}

/// Stdout was closed by its reader: the rest of the output is not wanted.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed")]
struct StdoutClosed;

fn write_stdout(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    std::io::Write::write_fmt(&mut std::io::stdout(), args).map_err(stdout_error)
}

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to stdout")
    }
}

/// Stdout for `ledger export`, which writes through csv and serde_json:
/// their errors do not keep the io::Error's kind, so this notes a closed
/// stdout itself.
struct ExportOut {
    out: std::io::StdoutLock<'static>,
    closed: bool,
}

impl ExportOut {
    fn note<T>(&mut self, result: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &result {
            self.closed |= e.kind() == std::io::ErrorKind::BrokenPipe;
        }
        result
    }
}

impl std::io::Write for ExportOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.out.write(buf);
        self.note(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let flushed = self.out.flush();
        self.note(flushed)
    }
}

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An MCP server that charges for tool calls"
)]
struct Cli {
    /// Pricing file. Without it, ./pricing.toml, else the built-in demo pricing.
    #[arg(long, global = true, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Store URL or SQLite path; overrides [store] url.
    #[arg(long, global = true, env = "TOLLGATE_DB")]
    db: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve MCP over stdio, or over HTTP with --http.
    Serve {
        /// The principal who pays on stdio; without one, calls are anonymous.
        /// (Over HTTP the API key names the principal.)
        #[arg(long, env = "TOLLGATE_PAYER")]
        payer: Option<String>,
        /// Serve HTTP on this address instead of stdio: /mcp, /checkout,
        /// /v1/sessions, /metrics, /healthz. `-` takes [http] listen.
        #[arg(long, value_name = "ADDR")]
        http: Option<String>,
    },
    /// API keys for the HTTP service.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Prepaid wallets.
    Wallet {
        #[command(subcommand)]
        command: WalletCommand,
    },
    /// The local provider's payment sessions.
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// What became of one payment.
    Payment {
        #[command(subcommand)]
        command: PaymentCommand,
    },
    /// Gives back some or all of a captured payment, or of a session paid
    /// through the sessions API, to whoever paid it.
    Refund {
        payment_id: String,
        /// How much; all that is left to refund when left out.
        amount: Option<String>,
        /// Why: kept with the refund and shown in statements.
        #[arg(long)]
        reason: String,
        /// A refund is made once per key. Left out, the key is the payment
        /// id and amount, so running the same command twice refunds once.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// The double-entry ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Signed receipts.
    Receipt {
        #[command(subcommand)]
        command: ReceiptCommand,
    },
}

#[derive(Subcommand)]
enum WalletCommand {
    /// Adds prepaid credit.
    Topup {
        #[arg(value_parser = trimmed_name("wallet"))]
        wallet: String,
        amount: String,
        /// Defaults to the server's currency.
        #[arg(long)]
        currency: Option<String>,
        #[arg(long)]
        memo: Option<String>,
        /// A top-up is made once per key: the same command again (say,
        /// after a lost connection) credits nothing more. Left out, every
        /// run credits.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Balance, held and available amounts.
    Balance {
        #[arg(value_parser = trimmed_name("wallet"))]
        wallet: String,
    },
    /// Every entry on the wallet.
    Statement {
        #[arg(value_parser = trimmed_name("wallet"))]
        wallet: String,
    },
    /// Shows a wallet's spending limits, or changes them: a per-call
    /// maximum, daily and monthly caps (UTC days and months), and the tools
    /// it may pay for. Amounts, or `none`; what is not given stays.
    Limits {
        #[arg(value_parser = trimmed_name("wallet"))]
        wallet: String,
        /// Defaults to the server's currency.
        #[arg(long)]
        currency: Option<String>,
        #[arg(long, value_name = "AMOUNT|none")]
        per_call: Option<String>,
        #[arg(long, value_name = "AMOUNT|none")]
        daily: Option<String>,
        #[arg(long, value_name = "AMOUNT|none")]
        monthly: Option<String>,
        /// Comma-separated tool names, or `any`.
        #[arg(long, value_name = "TOOL,...|any")]
        tools: Option<String>,
    },
}

/// An account is named as the server names its principal: trimmed, and not
/// empty (` alice` is alice, not a wallet of its own). `what` is what it
/// names ("wallet", "beneficiary").
fn trimmed_name(
    what: &'static str,
) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |text| match text.trim() {
        "" => Err(format!("a {what} name cannot be empty")),
        name => Ok(name.to_owned()),
    }
}

#[derive(Subcommand)]
enum PaymentCommand {
    /// A call's payment by its id (a receipt's, or an answer's
    /// `payment_id`): the call, whether it was charged and why, and its
    /// ledger lines, even when no money moved.
    Show { payment_id: String },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// The most recent sessions.
    List {
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(i64).range(1..))]
        limit: i64,
    },
    /// Pays a pending session: from a wallet with --from, else settles it in dev mode.
    Pay {
        id: String,
        #[arg(long, value_parser = trimmed_name("wallet"))]
        from: Option<String>,
    },
    /// Cancels a pending session.
    Cancel { id: String },
    /// Marks a pending session failed, as a declined card would.
    Decline { id: String },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Creates a key; prints it once (only its hash is kept).
    Create {
        /// Who pays when this key calls.
        #[arg(long)]
        principal: String,
        /// mcp, sessions:create, sessions:read or admin; repeat for several.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        #[arg(long)]
        label: Option<String>,
    },
    List,
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Checks every invariant; exits non-zero on any break.
    Verify,
    /// One account's entries: a wallet (with the charges it was asked to
    /// approve), a tool author's (beneficiary's) revenue with each
    /// capture's split, or, with --tool alone, what one tool earned across
    /// accounts.
    Statement {
        #[command(flatten)]
        selection: LedgerSelection,
    },
    /// Every ledger entry with its audit data, to stdout, for reconciling
    /// payouts: one account's with --wallet or --beneficiary.
    Export {
        #[arg(long, value_enum)]
        format: export::Format,
        #[command(flatten)]
        selection: LedgerSelection,
        /// Only entries recorded after this `entry_id` (the last one a
        /// previous export gave): a reconciler that goes on from there
        /// misses nothing, not even a charge recorded late.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i64).range(0..))]
        after: i64,
    },
}

/// Which part of the ledger a statement or an export covers.
#[derive(clap::Args)]
struct LedgerSelection {
    #[arg(long, conflicts_with = "beneficiary", value_parser = trimmed_name("wallet"))]
    wallet: Option<String>,
    /// A tool author's revenue account (or platform, commissions, rounding).
    #[arg(long, value_parser = trimmed_name("beneficiary"))]
    beneficiary: Option<String>,
    /// Only this tool's lines.
    #[arg(long)]
    tool: Option<String>,
    /// From this date (2026-11-01) or RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    /// Up to and including this date, or before this RFC 3339 time.
    #[arg(long)]
    until: Option<String>,
}

impl LedgerSelection {
    /// The account `--wallet` or `--beneficiary` names.
    fn account(&self) -> Option<(AccountKind, String)> {
        match (&self.wallet, &self.beneficiary) {
            (Some(wallet), _) => Some((AccountKind::Wallet, wallet.clone())),
            (None, Some(beneficiary)) => Some((AccountKind::Revenue, beneficiary.clone())),
            (None, None) => None,
        }
    }

    /// `--tool`, `--since` and `--until`.
    fn filter(&self) -> anyhow::Result<statement::Filter> {
        let time = |text: &Option<String>, end_of_day| {
            text.as_deref()
                .map(|t| statement::parse_time(t, end_of_day))
                .transpose()
                .map_err(anyhow::Error::msg)
        };
        Ok(statement::Filter {
            tool: self.tool.clone(),
            since: time(&self.since, false)?,
            until: time(&self.until, true)?,
        })
    }
}

#[derive(Subcommand)]
enum ReceiptCommand {
    /// Checks a receipt's signature and prints what it attests.
    Verify { receipt: String },
}

fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(path) => Ok(Config::load(path)?),
        None if PathBuf::from("pricing.toml").exists() => {
            Ok(Config::load("pricing.toml".as_ref())?)
        }
        None => {
            tracing::info!("no pricing.toml here; using the built-in demo pricing");
            Ok(Config::parse(DEFAULT_PRICING, "<built-in pricing.toml>")?)
        }
    }
}

fn main() -> std::process::ExitCode {
    // stdout is the MCP transport: logs go to stderr.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TOLLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("tollgate=info")),
        )
        .init();
    let cli = Cli::parse();
    // The HTTP service serves many clients at once: all cores. Everything
    // else, stdio included, talks to one client: one thread, which saves a
    // cross-thread wake-up per step (measured: about 20% more paid calls per
    // second over stdio on the 2-core machine).
    let runtime = match &cli.command {
        Command::Serve { http: Some(_), .. } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    let outcome = match runtime {
        Ok(runtime) => {
            let outcome = runtime.block_on(run(cli));
            // Not waiting for a read of a terminal's stdin (tokio reads one
            // on a thread of its own, which nothing can interrupt), nor for
            // a call still running past its grace.
            runtime.shutdown_timeout(Duration::from_millis(100));
            outcome
        }
        Err(e) => Err(e.into()),
    };
    match outcome {
        Ok(code) => code,
        Err(e) if e.chain().any(|cause| cause.is::<StdoutClosed>()) => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}", said_once(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once. Library errors often repeat
/// their cause in their own words (sqlx's "error returned from database:
/// …" and then the database's message), and `{:#}` would print it again
/// after each.
fn said_once(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

impl Command {
    /// Whether the command only reads the store.
    fn reads_only(&self) -> bool {
        matches!(
            self,
            Command::Wallet {
                command: WalletCommand::Balance { .. }
                    | WalletCommand::Statement { .. }
                    | WalletCommand::Limits {
                        per_call: None,
                        daily: None,
                        monthly: None,
                        tools: None,
                        ..
                    }
            } | Command::Sessions {
                command: SessionsCommand::List { .. }
            } | Command::Keys {
                command: KeysCommand::List
            } | Command::Ledger { .. }
                | Command::Payment { .. }
        )
    }
}

/// `tollgate payment show`: fails (exit 1) for an id the store never
/// recorded.
async fn show_payment(store: &dyn Store, id: &str) -> anyhow::Result<std::process::ExitCode> {
    let hold = store.hold_record(id).await?;
    let intent = store.intent(id).await?;
    let session = store.session(id).await?;
    let result = match &intent {
        Some(_) => store.stored_result(id).await?,
        None => None,
    };
    let lines = store.payment_lines(id).await?;
    let record = PaymentRecord {
        id,
        hold: hold.as_ref(),
        intent: intent.as_ref(),
        session: session.as_ref(),
        result: result.as_ref(),
        lines: &lines,
    };
    if !record.is_known() {
        bail!(
            "no payment `{}` was ever recorded here (check the id, and --db)",
            tollgate::statement::printable(id)
        );
    }
    print!("{}", record.render());
    Ok(std::process::ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let config = load_config(cli.config.as_ref())?;
    if let Command::Receipt {
        command: ReceiptCommand::Verify { receipt },
    } = &cli.command
    {
        // The key only: the store is not opened (or created).
        verify_receipt(&config, receipt)?;
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let db = cli.db.clone().unwrap_or_else(|| config.store_url.clone());
    if cli.command.reads_only()
        && let Some(file) = app::sqlite_file(&db)
        && !file.exists()
    {
        // Opening it would create it: a mistyped --db would show empty
        // wallets and a sound ledger.
        bail!(
            "no database at {}: nothing was ever recorded there (check --db, TOLLGATE_DB or \
             [store] url)",
            file.display()
        );
    }
    let store = app::open_store(&db, &config)
        .await
        .with_context(|| format!("opening store {db}"))?;
    match cli.command {
        Command::Serve { payer, http: None } => serve(config, store, payer).await?,
        Command::Serve {
            http: Some(addr), ..
        } => serve_http(config, store, addr).await?,
        Command::Keys { command } => keys(store.as_ref(), command).await?,
        Command::Wallet { command } => wallet(&config, store.as_ref(), command).await?,
        Command::Sessions { command } => sessions(store.as_ref(), command).await?,
        Command::Payment {
            command: PaymentCommand::Show { payment_id },
        } => return show_payment(store.as_ref(), &payment_id).await,
        Command::Ledger {
            command: LedgerCommand::Verify,
        } => return ledger_verify(store.as_ref()).await,
        Command::Refund {
            payment_id,
            amount,
            reason,
            idempotency_key,
        } => {
            // Not held to whole minor units, unlike a top-up: a refund gives
            // back what a capture took, and a metered one can take 0.025 USD.
            let units = amount
                .as_deref()
                .map(|a| Units::parse(a).with_context(|| format!("amount `{a}`")))
                .transpose()?;
            let request = RefundRequest {
                // On the amount as parsed: `0.5` and `0.50` are one refund.
                // The payment's currency is not known yet, and the key must
                // read as earlier versions made it: no currency's digits.
                idempotency_key: idempotency_key.unwrap_or_else(|| {
                    let amount =
                        units.map_or_else(|| "rest".into(), |u| format_without_currency(u.0));
                    format!("{payment_id}:{amount}")
                }),
                payment_id,
                amount: units,
                reason,
                restores_allowance: false,
            };
            let refunded = store.refund(&request).await?;
            println!(
                "{} {} {} of payment {} ({}); {} of {} refunded in all",
                if refunded.replayed {
                    "already refunded"
                } else {
                    "refunded"
                },
                format_in(refunded.amount, &refunded.currency),
                refunded.currency,
                request.payment_id,
                refunded.txn_id,
                format_in(refunded.refunded, &refunded.currency),
                format_in(refunded.captured, &refunded.currency),
            );
        }
        Command::Ledger {
            command: LedgerCommand::Statement { selection },
        } => {
            let filter = selection.filter()?;
            match selection.account() {
                Some((kind, name)) => {
                    let lines = store.statement(kind, &name).await?;
                    let title = format!("{}:{name}", kind.as_str());
                    let approvals = match kind {
                        AccountKind::Wallet => store.approvals(&name).await?,
                        _ => Vec::new(),
                    };
                    if lines.is_empty() && approvals.is_empty() {
                        return Err(export::ExportError::UnknownAccount(title).into());
                    }
                    print!("{}", statement::render(&title, &lines, &filter));
                    if kind == AccountKind::Wallet {
                        print!(
                            "{}",
                            statement::render_approvals(&name, &approvals, &filter)
                        );
                    }
                }
                None => {
                    let Some(tool) = filter.tool.clone() else {
                        bail!("give --wallet, --beneficiary or --tool");
                    };
                    let lines = store.tool_statement(&tool).await?;
                    print!(
                        "{}",
                        statement::render(&format!("tool {tool}"), &lines, &filter)
                    );
                }
            }
        }
        Command::Ledger {
            command:
                LedgerCommand::Export {
                    format,
                    selection,
                    after,
                },
        } => {
            let selection = export::Selection {
                account: selection.account(),
                filter: selection.filter()?,
                after,
            };
            let mut out = ExportOut {
                out: std::io::stdout().lock(),
                closed: false,
            };
            let exported =
                export::export(store.as_ref(), &selection, format, &mut out, export::PAGE).await;
            if out.closed {
                return Err(StdoutClosed.into());
            }
            let count = exported?;
            tracing::info!(entries = count, "ledger exported");
        }
        Command::Receipt {
            command: ReceiptCommand::Verify { receipt },
        } => verify_receipt(&config, &receipt)?,
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// Checks a receipt with the server's key, which must exist.
fn verify_receipt(config: &Config, receipt: &str) -> anyhow::Result<()> {
    let signer = ReceiptSigner::load(&app::receipt_key_path(config)?)?;
    let claims = signer.verify(receipt)?;
    println!("valid receipt");
    println!("{}", serde_json::to_string_pretty(&claims)?);
    // The receipt proves the charge was made; whether some of it was given
    // back since is the ledger's to say.
    eprintln!(
        "refunds since are not part of a receipt: `tollgate payment show {}` shows them",
        tollgate::statement::printable(&claims.payment_id)
    );
    Ok(())
}

async fn serve(config: Config, store: Arc<dyn Store>, payer: Option<String>) -> anyhow::Result<()> {
    let payer = payer.map(|p| p.trim().to_owned()).filter(|p| !p.is_empty());
    let gate = app::build_gate(&config, store.clone()).await?;
    tracing::info!(
        server = config.server_name,
        payer = payer.as_deref().unwrap_or("anonymous"),
        "serving MCP over stdio"
    );
    let server = TollgateServer::new(gate.clone(), Caller { principal: payer });
    let session = server.session_id().to_owned();
    let (transport, stdin_closed) = tollgate::stdio_guard::transport(
        tollgate::stdio::stdin(),
        tollgate::stdio::stdout(),
        config.max_message_bytes,
    );
    // The client closed stdin: it can answer nothing more, and the process
    // stops once rmcp has served what it read. Calls waiting for a payment
    // stop waiting and answer with their payment id (the client may still
    // read stdout), rather than be cancelled unanswered.
    tokio::spawn({
        let gate = gate.clone();
        async move {
            stdin_closed.cancelled().await;
            gate.end_inputs();
        }
    });
    let running = server.serve(transport).await?;
    let service = running.cancellation_token();
    let waiting = running.waiting();
    tokio::pin!(waiting);
    tokio::select! {
        // The client closed stdin: rmcp gave the calls in flight a few
        // seconds to answer, then cancelled the rest.
        quit = &mut waiting => {
            quit?;
            finish_calls(&gate).await;
        }
        () = shutdown_signal() => {
            finish_calls(&gate).await;
            service.cancel();
            waiting.await?;
        }
    }
    // The session is over: its dynamic payments are ended before the
    // process goes (here, or by its closing, which is then waited for).
    gate.end_session(&session).await;
    Ok(())
}

/// Closes the gate, and gives the calls under way [`SHUTDOWN_GRACE`] to
/// finish: to be charged or released, and answered if the transport is
/// still up. A call still running after that, or after another signal, is
/// dropped with the process, and its hold released by recovery within a
/// lease. True if another signal cut the wait short.
async fn finish_calls(gate: &Gate) -> bool {
    gate.close();
    let started = tokio::time::Instant::now();
    // A launcher that forwards a terminal's Ctrl-C to its child as well
    // delivers one keypress twice, a moment apart: that is not a second.
    let another_signal = async {
        loop {
            shutdown_signal().await;
            if started.elapsed() >= Duration::from_secs(1) {
                break;
            }
        }
    };
    let (left, cut_short) = tokio::select! {
        left = gate.calls_finished(SHUTDOWN_GRACE) => (left, false),
        () = another_signal => (gate.calls_finished(Duration::ZERO).await, true),
    };
    if left > 0 {
        tracing::warn!(
            "{left} call(s) still running after {}s{}; stopping anyway (their holds are released \
             by recovery once this instance's lease lapses)",
            started.elapsed().as_secs(),
            if cut_short {
                ", when another signal came"
            } else {
                ""
            },
        );
    }
    cut_short
}

async fn serve_http(mut config: Config, store: Arc<dyn Store>, addr: String) -> anyhow::Result<()> {
    if addr != "-" {
        config.http.listen = addr;
    }
    let listener = tokio::net::TcpListener::bind(&config.http.listen)
        .await
        .with_context(|| format!("listening on {}", config.http.listen))?;
    let local = listener.local_addr()?;
    if config.dev_settle {
        // Anyone who can reach the checkout page could settle a payment
        // there for nothing.
        if !local.ip().to_canonical().is_loopback() {
            bail!(
                "[provider] dev_settle = true lets anyone settle payments for nothing at the \
                 checkout page: it is for development, and refused on {local}, which is not a \
                 loopback address"
            );
        }
        tracing::warn!(
            "[provider] dev_settle = true: the checkout page settles payments for nothing \
             (development only)"
        );
    }
    // Payment URLs point here unless the config says otherwise (port 0
    // becomes the real port).
    config.http.listen = local.to_string();
    let gate = app::build_gate(&config, store).await?;
    tracing::info!(
        server = config.server_name,
        "serving HTTP on http://{local} (/mcp, /checkout, /v1/sessions)"
    );
    // Machine-readable for scripts and tests that ask for port 0.
    eprintln!("listening on http://{local}");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signal = shutdown.clone();
    let state = Arc::new(tollgate::http::HttpState::new(&config, gate.clone()));
    let closing = state.clone();
    let ending = gate.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing calls in flight");
        // The service stays up meanwhile, so that their answers go out
        // (and a checkout page can still be paid at). Then the MCP
        // sessions end, which would cut off an answer still being written.
        if !finish_calls(&gate).await {
            closing.answers_sent(Duration::from_secs(2)).await;
        }
        signal.cancel();
    });
    tollgate::http::serve(listener, state, &config.http, shutdown).await?;
    // The MCP sessions closed with the service, and end their dynamic
    // payments.
    ending.sessions_ended(SESSION_END_GRACE).await;
    Ok(())
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn keys(store: &dyn Store, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            principal,
            scopes,
            label,
        } => {
            let principal = principal.trim();
            if principal.is_empty() {
                bail!("--principal must not be empty");
            }
            let scopes = scopes
                .iter()
                .map(|s| s.parse::<Scope>().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let (key, presented) = ApiKey::generate(principal, scopes, label, now_ms());
            store.create_api_key(&key).await?;
            eprintln!(
                "created {} for {} with scopes: {}; it is shown only now:",
                key.id,
                key.principal,
                key.scopes_text()
            );
            println!("{presented}");
        }
        KeysCommand::List => {
            println!(
                "{:<22}  {:<16}  {:<40}  {:<20}  {:<20}  label",
                "id", "principal", "scopes", "created", "revoked"
            );
            for key in store.api_keys().await? {
                println!(
                    "{:<22}  {:<16}  {:<40}  {:<20}  {:<20}  {}",
                    key.id,
                    key.principal,
                    key.scopes_text(),
                    rfc3339(key.created_at),
                    key.revoked_at.map(rfc3339).unwrap_or_else(|| "-".into()),
                    key.label.as_deref().unwrap_or("-")
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if !store.revoke_api_key(&id, now_ms()).await? {
                bail!("no live key {id}");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}

async fn wallet(config: &Config, store: &dyn Store, command: WalletCommand) -> anyhow::Result<()> {
    match command {
        WalletCommand::Topup {
            wallet,
            amount,
            currency,
            memo,
            idempotency_key,
        } => {
            let currency = match currency {
                Some(c) => Currency::parse(&c)?,
                None => config.currency.clone(),
            };
            let units = Units::parse(&amount).with_context(|| format!("amount `{amount}`"))?;
            if units.is_zero() {
                bail!("amount must be above zero");
            }
            // Money coming in is whole minor units (cents, yen): a finer
            // balance would be money nobody paid in.
            to_minor_units(units, &currency)
                .with_context(|| format!("a top-up is whole minor units of {currency}"))?;
            let key = idempotency_key.as_deref().map(str::trim);
            if key == Some("") {
                bail!("an idempotency key cannot be empty");
            }
            let wallet_ref = AccountRef::wallet(&wallet, &currency);
            let topped = store.topup_with_key(&wallet_ref, units, memo, key).await?;
            println!(
                "{} {wallet} with {} {currency} ({})",
                if topped.replayed {
                    "already topped up"
                } else {
                    "topped up"
                },
                format_in(units, &currency),
                topped.posted.txn_id
            );
            print_balances(&wallet, &store.balances(&wallet).await?)?;
        }
        WalletCommand::Balance { wallet } => {
            print_balances(&wallet, &known_balances(store, &wallet).await?)?
        }
        WalletCommand::Statement { wallet } => {
            let balances = known_balances(store, &wallet).await?;
            let lines = store.statement(AccountKind::Wallet, &wallet).await?;
            let all = statement::Filter::default();
            print!(
                "{}",
                statement::render(&format!("wallet:{wallet}"), &lines, &all)
            );
            print_balances(&wallet, &balances)?;
        }
        WalletCommand::Limits {
            wallet,
            currency,
            per_call,
            daily,
            monthly,
            tools,
        } => {
            let current = store.limits(&wallet).await?;
            // A currency the wallet already holds is taken as recorded: a
            // ledger from before codes were checked may hold one not ISO's.
            let currency = match currency {
                Some(c) => match Currency::recorded(&c) {
                    Ok(held) if current.iter().any(|w| w.currency == held) => held,
                    _ => Currency::parse(&c)?,
                },
                None => config.currency.clone(),
            };
            let mut limits = current
                .iter()
                .find(|w| w.currency == currency)
                .map(|w| w.limits.clone())
                .unwrap_or_default();
            let changing =
                per_call.is_some() || daily.is_some() || monthly.is_some() || tools.is_some();
            let cap = |flag: &str, text: Option<String>, now: Option<Units>| match text {
                None => Ok(now),
                Some(t) => allowance::parse_cap(&t).map_err(|e| anyhow::anyhow!("--{flag} {e}")),
            };
            limits.per_call = cap("per-call", per_call, limits.per_call)?;
            limits.daily = cap("daily", daily, limits.daily)?;
            limits.monthly = cap("monthly", monthly, limits.monthly)?;
            if let Some(tools) = tools {
                limits.tools = match tools.trim() {
                    "any" => None,
                    list => {
                        let tools: Vec<String> = list
                            .split(',')
                            .map(|t| t.trim().to_owned())
                            .filter(|t| !t.is_empty())
                            .collect();
                        // An empty list would block every tool, silently.
                        if tools.is_empty() {
                            bail!("--tools needs tool names (or `any`)");
                        }
                        Some(tools)
                    }
                };
            }
            let shown = if changing {
                // Limits may be set before a wallet's first top-up (for a
                // principal who pays through sessions), so a new name is
                // taken, but said: it may be a mistyped one.
                // `current` has an entry for each account the wallet has.
                if current.is_empty() {
                    eprintln!(
                        "note: wallet {wallet} is new here (nothing was recorded for it before); \
                         check the name if you meant an existing one"
                    );
                }
                store
                    .set_limits(&AccountRef::wallet(&wallet, &currency), &limits)
                    .await?;
                // The limits themselves are printed below, as amounts.
                tracing::info!(wallet, %currency, "wallet limits set");
                store.limits(&wallet).await?
            } else {
                current
            };
            match shown.iter().find(|w| w.currency == currency) {
                Some(w) => print!("{}", allowance::describe(&wallet, w, now_ms())),
                None => println!("wallet {wallet} has no {currency} account and no limits"),
            }
        }
    }
    Ok(())
}

/// A wallet's balances, refusing a name nothing was ever recorded for: a
/// typo would otherwise read as a wallet with no funds.
async fn known_balances(store: &dyn Store, wallet: &str) -> anyhow::Result<Vec<WalletBalance>> {
    let balances = store.balances(wallet).await?;
    if balances.is_empty() {
        bail!(
            "no wallet named `{wallet}`: nothing was ever recorded for it (a wallet is made by \
             its first top-up)"
        );
    }
    Ok(balances)
}

fn print_balances(wallet: &str, balances: &[WalletBalance]) -> anyhow::Result<()> {
    for b in balances {
        println!(
            "{wallet}: balance {} {cur}, held {} {cur}, available {} {cur}",
            format_in(b.balance, &b.currency),
            format_in(b.held, &b.currency),
            format_in(b.available, &b.currency),
            cur = b.currency
        );
    }
    Ok(())
}

async fn sessions(store: &dyn Store, command: SessionsCommand) -> anyhow::Result<()> {
    match command {
        SessionsCommand::List { limit } => {
            println!(
                "{:<37}  {:<9}  {:>10}  {:<8}  {:<20}  description",
                "id", "status", "amount", "currency", "expires"
            );
            for s in store.list_sessions(limit).await? {
                println!(
                    "{:<37}  {:<9}  {:>10}  {:<8}  {:<20}  {}",
                    s.id,
                    s.status.as_str(),
                    format_in(s.amount, &s.currency),
                    s.currency.as_str(),
                    rfc3339(s.expires_at),
                    statement::printable(&s.description)
                );
            }
        }
        SessionsCommand::Pay { id, from } => {
            // A misspelt wallet is said so, not refused as one with no funds.
            if let Some(wallet) = &from {
                known_balances(store, wallet).await?;
            }
            let posted = store.pay_session(&id, from.as_deref(), now_ms()).await?;
            match &from {
                Some(wallet) => {
                    println!("session {id} paid from wallet {wallet} ({})", posted.txn_id)
                }
                None => println!("session {id} settled in dev mode ({})", posted.txn_id),
            }
        }
        SessionsCommand::Cancel { id } => end_session(store, &id, SessionStatus::Cancelled).await?,
        SessionsCommand::Decline { id } => end_session(store, &id, SessionStatus::Failed).await?,
    }
    Ok(())
}

async fn end_session(store: &dyn Store, id: &str, to: SessionStatus) -> anyhow::Result<()> {
    if store.end_session(id, to).await? {
        println!("session {id} is now {}", to.as_str());
        return Ok(());
    }
    match store.session(id).await? {
        None => bail!("no payment session {id}"),
        Some(s) => bail!(
            "session {id} is {}, not pending; left as it is",
            s.status.as_str()
        ),
    }
}

async fn ledger_verify(store: &dyn Store) -> anyhow::Result<std::process::ExitCode> {
    let report = store.verify(now_ms()).await?;
    if report.problems.is_empty() {
        println!(
            "ledger ok: {} transactions, {} accounts, {} open holds",
            report.transactions, report.accounts, report.open_holds
        );
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let print = || -> anyhow::Result<()> {
        println!("ledger BROKEN: {} problem(s)", report.problems.len());
        for problem in &report.problems {
            println!("  - {problem}");
        }
        Ok(())
    };
    match print() {
        // Still a failure when the reader stopped reading the report.
        Err(e) if !e.is::<StdoutClosed>() => Err(e),
        _ => Ok(std::process::ExitCode::FAILURE),
    }
}
