//! The checkout page in a real headless browser (Debian's chromium, driven
//! through chromedriver): open the payment URL an MCP call returned, pay or
//! decline there, see the final state, then finish the call over MCP.
//!
//! Needs `chromium` and `chromedriver` on the machine, so it is ignored by a
//! plain `cargo test`; `.ci/run` installs both and runs it with
//! `cargo test --test e2e browser -- --ignored`.

use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

use crate::{
    harness::{echo_args, error_code, payment_meta, structured, text},
    http_service::HttpServer,
};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

struct Driver(std::process::Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn browser(profile: &std::path::Path) -> (Driver, fantoccini::Client) {
    // Two TLS backends are linked in; the WebDriver client needs one chosen
    // (it only talks to chromedriver on loopback, over plain HTTP).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let driver = Driver(
        std::process::Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (install chromium and chromium-driver)"),
    );
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..100 {
        if let Ok(client) = ClientBuilder::rustls()
            .expect("tls")
            .capabilities(capabilities.clone())
            .connect(&url)
            .await
        {
            return (driver, client);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("chromedriver did not start");
}

async fn status_text(page: &fantoccini::Client) -> String {
    page.find(Locator::Id("status"))
        .await
        .expect("status cell")
        .text()
        .await
        .expect("text")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and chromedriver; .ci/run installs them and runs this"]
async fn browser_pays_and_declines_at_the_checkout_page() {
    let pricing = crate::harness::pricing("two_step", "")
        .replace("[store]", "[provider]\ndev_settle = true\n\n[store]");
    let server = HttpServer::start(&pricing).await;
    server.env.topup("alice", "1.00").await;
    let alice_wallet_key = server.key("alice", &["mcp"]).await;
    let bob = server.key("bob", &["mcp"]).await;
    let client = server.mcp(Some(&bob), ()).await;
    let profile = tempfile::tempdir().expect("profile");
    let (_driver, page) = browser(profile.path()).await;

    // Pay from a wallet, by its key, in the browser.
    let r = crate::http_service::call(&client, "echo", echo_args("browser")).await;
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    let url = structured(&r)["payment_url"].as_str().unwrap().to_owned();
    page.goto(&url).await.expect("open the payment URL");
    assert_eq!(status_text(&page).await, "pending");
    assert_eq!(
        page.find(Locator::Id("amount"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "0.01"
    );
    page.find(Locator::Id("api_key"))
        .await
        .unwrap()
        .send_keys(&alice_wallet_key)
        .await
        .unwrap();
    page.find(Locator::Id("pay_button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page.wait()
        .for_element(Locator::Id("final"))
        .await
        .expect("final state shown");
    assert_eq!(status_text(&page).await, "paid");
    assert!(page.source().await.unwrap().contains("Paid. Thank you."));
    let r =
        crate::http_service::call(&client, "confirm_echo_payment", json!({"payment_id": id})).await;
    assert_eq!(text(&r), "browser");
    assert_eq!(payment_meta(&r)["status"], "paid");
    assert_eq!(server.env.available("alice").await, "0.99");

    // Dev settlement.
    let r = crate::http_service::call(&client, "echo", echo_args("settled")).await;
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    page.goto(structured(&r)["payment_url"].as_str().unwrap())
        .await
        .unwrap();
    page.find(Locator::Id("settle_button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page.wait().for_element(Locator::Id("final")).await.unwrap();
    assert_eq!(status_text(&page).await, "paid");
    let r =
        crate::http_service::call(&client, "confirm_echo_payment", json!({"payment_id": id})).await;
    assert_eq!(text(&r), "settled");

    // Decline.
    let r = crate::http_service::call(&client, "echo", echo_args("no")).await;
    let id = structured(&r)["payment_id"].as_str().unwrap().to_owned();
    page.goto(structured(&r)["payment_url"].as_str().unwrap())
        .await
        .unwrap();
    page.find(Locator::Id("decline_button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    page.wait().for_element(Locator::Id("final")).await.unwrap();
    // A person's no: failed, as a declined card would.
    assert_eq!(status_text(&page).await, "failed");
    let r =
        crate::http_service::call(&client, "confirm_echo_payment", json!({"payment_id": id})).await;
    assert_eq!(error_code(&r), "payment_failed");

    page.close().await.ok();
    client.cancel().await.ok();
    server.env.assert_ledger_ok().await;
}
