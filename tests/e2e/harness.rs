//! Test harness: a temporary tollgate installation (config, database on the
//! test's backend, receipt key) driven through the real binary, over stdio,
//! with rmcp's client.

use std::{
    path::PathBuf,
    process::{Output, Stdio},
};

use rmcp::{
    RoleClient, ServiceExt,
    model::{CallToolRequestParams, CallToolResult, JsonObject},
    service::RunningService,
    transport::{
        ConfigureCommandExt, StreamableHttpClientTransport, TokioChildProcess,
        streamable_http_client::StreamableHttpClientTransportConfig,
    },
};
use serde_json::{Value, json};

use tollgate::testing::TestDb;

pub type Client = RunningService<RoleClient, ()>;

pub const EXE: &str = env!("CARGO_BIN_EXE_tollgate");

pub struct Env {
    /// Kept so the database and the directory live as long as the environment.
    _database: TestDb,
    _dir: tempfile::TempDir,
    pub config: PathBuf,
    /// The store: a SQLite path or a PostgreSQL URL.
    pub db: String,
    pub key: PathBuf,
}

/// A pricing file with the demo tools in `mode`, plus extra `[server]` lines.
pub fn pricing(mode: &str, server_extra: &str) -> String {
    format!(
        r#"[server]
name = "test-server"
mode = "{mode}"
currency = "USD"
payment_ttl = "15m"
approval_threshold = "5.00"
{server_extra}

[store]
synchronous = "normal"

[[tools]]
name = "echo"
price = "0.01"

[[tools]]
name = "divide"
price = "0.05"
"#
    )
}

impl Env {
    pub fn new(mode: &str) -> Self {
        Self::with_pricing(&pricing(mode, ""))
    }

    pub fn with_pricing(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("pricing.toml");
        std::fs::write(&config, text).expect("write pricing");
        let database = TestDb::fresh(dir.path());
        Self {
            db: database.url.clone(),
            key: dir.path().join("keys/receipt.key"),
            config,
            _database: database,
            _dir: dir,
        }
    }

    pub fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(EXE);
        cmd.env("TOLLGATE_CONFIG", &self.config)
            .env("TOLLGATE_DB", &self.db)
            .env("TOLLGATE_RECEIPT_KEY", &self.key)
            .env("TOLLGATE_LOG", "tollgate=warn")
            .env_remove("TOLLGATE_PAYER");
        cmd
    }

    /// Runs a CLI command to completion.
    pub async fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run tollgate")
    }

    /// Runs a CLI command to completion on another store (`TOLLGATE_DB`),
    /// from the directory `cwd`.
    pub async fn cli_on(&self, db: &str, cwd: &std::path::Path, args: &[&str]) -> Output {
        self.command()
            .current_dir(cwd)
            .env("TOLLGATE_DB", db)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run tollgate")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub async fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(
            out.status.success(),
            "tollgate {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `tollgate serve` as a child process, with an MCP client on its stdio.
    pub async fn client(&self, payer: Option<&str>) -> Client {
        self.client_with_env(payer, &[]).await
    }

    /// Like [`Env::client`], with extra environment for the server process.
    pub async fn client_with_env(&self, payer: Option<&str>, vars: &[(&str, &str)]) -> Client {
        self.client_and_pid(payer, vars).await.0
    }

    /// A client, and the process id of its `tollgate serve` (to kill it).
    pub async fn client_and_pid(
        &self,
        payer: Option<&str>,
        vars: &[(&str, &str)],
    ) -> (Client, u32) {
        let cmd = self.command().configure(|cmd| {
            cmd.arg("serve").envs(vars.iter().copied());
            if let Some(payer) = payer {
                cmd.args(["--payer", payer]);
            }
        });
        let (transport, _stderr) = TokioChildProcess::builder(cmd)
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tollgate serve");
        let pid = transport.id().expect("a running child");
        (().serve(transport).await.expect("initialize"), pid)
    }

    /// `tollgate serve --http` on a free loopback port, as a real process
    /// on this environment's config and store.
    pub async fn serve_http(&self) -> Served {
        let (child, base) = tollgate::testing::serve_http(self.command())
            .await
            .expect("tollgate serve --http");
        Served { child, base }
    }

    /// An API key with the `mcp` scope for `principal`, made with the CLI.
    pub async fn mcp_key(&self, principal: &str) -> String {
        self.ok(&["keys", "create", "--principal", principal, "--scope", "mcp"])
            .await
            .trim()
            .to_owned()
    }

    pub async fn topup(&self, wallet: &str, amount: &str) {
        self.ok(&["wallet", "topup", wallet, amount]).await;
    }

    /// `(balance, held, available)` of a USD wallet, as printed; zeros for
    /// a wallet nothing was recorded for (which the CLI refuses).
    pub async fn balance(&self, wallet: &str) -> (String, String, String) {
        let out = self.cli(&["wallet", "balance", wallet]).await;
        if String::from_utf8_lossy(&out.stderr).contains("no wallet named") {
            return ("0.00".into(), "0.00".into(), "0.00".into());
        }
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = String::from_utf8_lossy(&out.stdout);
        let line = out
            .lines()
            .find(|l| l.contains("balance"))
            .unwrap_or_default()
            .to_owned();
        let nums: Vec<String> = line
            .split(' ')
            .filter(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))
            .map(|w| w.trim_end_matches(',').to_owned())
            .collect();
        assert_eq!(nums.len(), 3, "unexpected balance line: {line}");
        (nums[0].clone(), nums[1].clone(), nums[2].clone())
    }

    pub async fn available(&self, wallet: &str) -> String {
        self.balance(wallet).await.2
    }

    /// `ledger verify` must pass: run at the end of every test.
    pub async fn assert_ledger_ok(&self) {
        let out = self.cli(&["ledger", "verify"]).await;
        assert!(
            out.status.success(),
            "ledger verify failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A `tollgate serve --http` process (killed when dropped).
pub struct Served {
    pub child: tokio::process::Child,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl Served {
    /// An MCP client over streamable HTTP, calling with `key`.
    pub async fn mcp(&self, key: &str) -> Client {
        let transport = StreamableHttpClientTransport::from_config(
            StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", self.base))
                .auth_header(key.to_owned()),
        );
        ().serve(transport).await.expect("MCP over HTTP")
    }
}

pub fn args(v: Value) -> JsonObject {
    v.as_object().cloned().unwrap_or_default()
}

pub async fn call(client: &Client, tool: &str, arguments: Value) -> CallToolResult {
    client
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args(arguments)))
        .await
        .unwrap_or_else(|e| panic!("call {tool} failed at the protocol level: {e}"))
}

pub fn structured(r: &CallToolResult) -> Value {
    r.structured_content.clone().unwrap_or(Value::Null)
}

/// The `error` code of a payment error result (asserting it is one).
pub fn error_code(r: &CallToolResult) -> String {
    assert_eq!(
        r.is_error,
        Some(true),
        "expected an isError result, got {r:?}"
    );
    structured(r)["error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

pub fn payment_meta(r: &CallToolResult) -> Value {
    r.meta
        .as_ref()
        .and_then(|m| m.0.get("tollgate/payment").cloned())
        .unwrap_or(Value::Null)
}

pub fn text(r: &CallToolResult) -> String {
    r.content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.clone()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// First call of a priced tool that must go to the slow path: its payment id.
pub fn payment_id_of(r: &CallToolResult) -> String {
    let id = structured(r)["payment_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(id.starts_with("pay_"), "no payment id in {r:?}");
    id
}

pub fn echo_args(text: &str) -> Value {
    json!({ "text": text })
}

/// An rmcp client on an in-process pipe to an embedded tollgate's server,
/// calling as `principal`.
pub async fn embedded_client(tollgate: &tollgate::Tollgate, principal: &str) -> Client {
    let (server_io, client_io) = tokio::io::duplex(64 * 1024);
    let server = tollgate.server(tollgate::Caller {
        principal: Some(principal.into()),
    });
    tokio::spawn(async move {
        if let Ok(running) = server.serve(server_io).await {
            let _ = running.waiting().await;
        }
    });
    ().serve(client_io).await.expect("connect")
}
