//! The ops console in a real browser: headless Chromium through WebDriver (chromedriver).
//!
//! Outside CI a machine without Chromium skips these tests with a message; with `CI=true`
//! they fail when the browser cannot start. With `UMGW_CONSOLE_SCREENSHOTS=1` the SQLite
//! runs write their screenshots to `docs/console/` (the README shows them).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use umeng_push_gateway::simulator::{Fault, FaultKind};

use crate::app::{
    on_both_backends, push_body, Backend, TestApp, TestEnv, ANDROID_APP, IOS_APP,
    TOKEN_ANDROID_ONLY, TOKEN_READER, TOKEN_SENDER,
};
use crate::helpers::TestDb;

on_both_backends!(
    console_signs_in_filters_opens_refreshes_cancels_and_signs_out,
    console_applies_scopes_app_lists_and_csrf,
    console_answers_carry_the_security_headers_and_cookie_flags,
    console_sign_in_needs_its_csrf_token_and_a_read_scope,
    console_sessions_carry_across_replicas_only_with_a_shared_key,
    console_can_be_turned_off,
    console_bad_input_gets_a_clear_page_not_a_500,
    console_queue_lists_waiting_pushes_and_withdraws_one,
    console_shows_a_parent_with_its_parts,
);

/// One browser test at a time: each starts its own Chromium.
static BROWSER_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A chromedriver process and a browser session on it (closed on [`Browser::close`];
/// chromedriver is killed on drop).
struct Browser {
    client: Client,
    _driver: tokio::process::Child,
    base: String,
    shots: Option<PathBuf>,
}

fn program(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    candidates.iter().map(PathBuf::from).find(|p| p.exists())
}

/// Start Chromium (`lang` sets Accept-Language). `None` (after saying why) when the browser
/// cannot start outside CI; a panic in CI.
async fn browser(app: &TestApp, lang: &str, backend: Backend) -> Option<Browser> {
    match start_browser(app, lang, backend).await {
        Ok(b) => Some(b),
        Err(why) if !in_ci() => {
            eprintln!(
                "SKIPPED: the browser cannot start ({why}); install chromium and chromium-driver"
            );
            None
        }
        Err(why) => panic!("CI=true and the browser cannot start: {why}"),
    }
}

async fn start_browser(app: &TestApp, lang: &str, backend: Backend) -> Result<Browser, String> {
    let driver_path = program("CHROMEDRIVER", &["/usr/bin/chromedriver"])
        .ok_or("no chromedriver (set CHROMEDRIVER)")?;
    let chrome = program(
        "CHROME_BIN",
        &["/usr/bin/chromium", "/usr/bin/chromium-browser"],
    )
    .ok_or("no chromium (set CHROME_BIN)")?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        l.local_addr().map_err(|e| e.to_string())?.port()
    };
    let driver = tokio::process::Command::new(&driver_path)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", driver_path.display()))?;
    let url = format!("http://127.0.0.1:{port}");
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chrome,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000", "--hide-scrollbars", format!("--lang={lang}")],
            "prefs": {"intl.accept_languages": lang},
        }),
    );
    let mut last = String::new();
    // chromedriver needs a moment to listen.
    for _ in 0..50 {
        match ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(client) => {
                let shots = (backend == Backend::Sqlite
                    && std::env::var("UMGW_CONSOLE_SCREENSHOTS").is_ok_and(|v| v == "1"))
                .then(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console"));
                return Ok(Browser {
                    client,
                    _driver: driver,
                    base: app.base.clone(),
                    shots,
                });
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("no WebDriver session: {last}"))
}

impl Browser {
    async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("goto {path}: {e}"));
    }

    async fn path(&self) -> String {
        let u = self.client.current_url().await.expect("current url");
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_owned(),
        }
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(Duration::from_secs(10))
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => e,
            Err(e) => panic!("no element {css} on {}: {e}", self.path().await),
        }
    }

    async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .expect("find_all")
            .is_empty()
    }

    /// Waits (up to 10 s) until the address contains `part` (a navigation has landed).
    async fn wait_for_path_containing(&self, part: &str) {
        for _ in 0..200 {
            if self.path().await.contains(part) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "the address never contained {part:?}: {}",
            self.path().await
        );
    }

    async fn click(&self, css: &str) {
        self.find(css).await.click().await.expect("click");
    }

    async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.expect("text")
    }

    /// The whole visible text of the page.
    async fn body(&self) -> String {
        self.text("body").await
    }

    async fn sign_in(&self, token: &str) {
        self.find("#token")
            .await
            .send_keys(token)
            .await
            .expect("type");
        self.click("#sign-in").await;
        self.find("#sign-out").await;
    }

    /// A PNG of the page, written to docs/console/<name>.png when asked for.
    async fn screenshot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        assert!(png.starts_with(b"\x89PNG"), "{name} is not a PNG");
        if let Some(dir) = &self.shots {
            std::fs::create_dir_all(dir).expect("docs/console");
            std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
        }
    }

    /// The browser's cookies as a `Cookie` header (the session cookie is HttpOnly, so only
    /// WebDriver can read it).
    async fn cookie_header(&self) -> String {
        self.client
            .get_all_cookies()
            .await
            .expect("cookies")
            .iter()
            .map(|c| format!("{}={}", c.name(), c.value()))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn close(self) {
        let _ = self.client.close().await;
    }
}

async fn create(app: &TestApp, token: &str, body: Value) -> String {
    let r = app.post_push_as(token, &body).await;
    let status = r.status();
    let v: Value = r.json().await.expect("json");
    assert!(status.is_success(), "{status} {v}");
    v["id"].as_str().expect("id").to_owned()
}

fn calls(env: &TestEnv, path: &str) -> usize {
    env.sim.requests().iter().filter(|r| r.path == path).count()
}

async fn post_form(app: &TestApp, path: &str, cookie: Option<&str>, form: &str) -> u16 {
    let mut req = app
        .http
        .post(format!("{}{path}", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_owned());
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.send().await.expect("answer").status().as_u16()
}

/// Pushes over the past day for the overview and history: nine Android unicasts, created
/// 18, 16 ... 2 hours ago, two of them failed with Umeng error 2018 and one unknown.
/// Returns how many.
async fn earlier_day(env: &TestEnv, app: &TestApp) -> usize {
    const TEXTS: [&str; 9] = [
        "会员日优惠提醒",
        "Order #1042 shipped",
        "直播开始提醒",
        "Password changed",
        "购物车商品降价",
        "Weekly summary",
        "每日签到提醒",
        "Flash sale starts",
        "物流状态更新",
    ];
    for (i, text) in TEXTS.iter().enumerate() {
        let mut body = push_body(ANDROID_APP, "unicast");
        body["description"] = json!(text);
        body["notification"] = json!({"title": text, "text": text});
        let id = create(app, TOKEN_SENDER, body).await;
        let hours = (TEXTS.len() - i) * 2;
        env.db
            .execute(&match env.db {
                TestDb::Sqlite(_) => format!(
                    "update pushes set created_at = created_at - {hours} * 3600000 where id = '{id}'"
                ),
                TestDb::Postgres(_) => format!(
                    "update pushes set created_at = created_at - interval '{hours} hours' where id = '{id}'"
                ),
            })
            .await;
        let outcome = match i {
            2 | 5 => "status = 'failed', error_code = '2018', error_msg = 'device token expired'",
            7 => "status = 'unknown'",
            _ => continue,
        };
        env.db
            .execute(&format!("update pushes set {outcome} where id = '{id}'"))
            .await;
    }
    TEXTS.len()
}

async fn console_signs_in_filters_opens_refreshes_cancels_and_signs_out(backend: Backend) {
    let _one = BROWSER_LOCK.lock().await;
    // Arrange: tasks that stay queued (so they can be cancelled), a Chinese unicast, a
    // broadcast, and a push of the other app.
    let env = TestEnv::with_task_step(backend, Duration::from_secs(3600)).await;
    let app = env.spawn_app().await;
    let earlier = earlier_day(&env, &app).await;
    let mut uni = push_body(ANDROID_APP, "unicast");
    uni["description"] = json!("订单已发货通知");
    uni["notification"] = json!({"title": "您的订单已发货", "text": "预计明天送达"});
    create(&app, TOKEN_SENDER, uni).await;
    let mut bc = push_body(ANDROID_APP, "broadcast");
    bc["out_biz_no"] = json!("console-bc-1");
    bc["description"] = json!("weekly digest");
    bc["production_mode"] = json!(true);
    let bc_id = create(&app, TOKEN_SENDER, bc).await;
    create(&app, TOKEN_SENDER, push_body(IOS_APP, "unicast")).await;
    let Some(b) = browser(&app, "en-US", backend).await else {
        return;
    };

    // Act + Assert: a page needs a sign-in, and comes back after it.
    b.goto("/ui/pushes").await;
    assert!(
        b.path().await.starts_with("/ui/login?next="),
        "{}",
        b.path().await
    );
    b.screenshot("login").await;
    b.find("#token")
        .await
        .send_keys("not-a-token")
        .await
        .expect("type");
    b.click("#sign-in").await;
    assert!(b.text(".notice.error").await.contains("not accepted"));
    b.sign_in(TOKEN_SENDER).await;
    assert_eq!(b.path().await, "/ui/pushes");

    // History: every push, CJK text intact, status badges.
    let page = b.body().await;
    assert!(page.contains("订单已发货通知"), "{page}");
    assert!(page.contains("console-bc-1"), "{page}");
    assert_eq!(
        b.client
            .find_all(Locator::Css("table.history tbody tr"))
            .await
            .unwrap()
            .len(),
        3 + earlier
    );
    assert!(b.has("span.badge[data-status=failed]").await);
    assert!(b.has("span.badge[data-status=accepted]").await);
    b.screenshot("history").await;

    // Filter by type: only the broadcast is left.
    b.find("#f-type")
        .await
        .select_by_value("broadcast")
        .await
        .expect("select");
    b.click("#apply").await;
    // The form's GET replaces the page: wait for the new address, not the old table.
    b.wait_for_path_containing("type=broadcast").await;
    b.find("table.history").await;
    let rows = b
        .client
        .find_all(Locator::Css("table.history tbody tr"))
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert!(!b.body().await.contains("订单已发货通知"));

    // Detail: what was sent to Umeng and what it answered.
    b.click("a.push-link").await;
    assert_eq!(b.path().await, format!("/ui/pushes/{bc_id}"));
    let page = b.body().await;
    assert!(page.contains("Body sent to Umeng"), "{page}");
    assert!(page.contains("\"type\": \"broadcast\""), "{page}");
    assert!(page.contains("task_id"), "{page}");
    assert!(
        !page.contains(crate::app::ANDROID_SECRET),
        "the master secret is shown"
    );

    // Refresh asks Umeng for the task's status: the timeline and the counters show it.
    let before = calls(&env, "/api/status");
    b.click("#refresh").await;
    assert!(b.text("#notice").await.contains("refreshed"));
    assert_eq!(calls(&env, "/api/status"), before + 1);
    assert!(b.text(".timeline").await.contains("Task status checked"));
    let counters = b.text(".counters").await;
    for label in ["Sent", "Opened", "Dismissed"] {
        assert!(counters.contains(label), "{counters}");
    }
    b.screenshot("push").await;

    // Cancel asks for confirmation first; keeping it changes nothing.
    b.click("#cancel").await;
    assert!(b.body().await.contains("Cancel this task?"));
    b.screenshot("cancel").await;
    b.click("#keep").await;
    assert_eq!(b.path().await, format!("/ui/pushes/{bc_id}"));
    assert_eq!(calls(&env, "/api/cancel"), 0);
    b.click("#cancel").await;
    b.click("#confirm-cancel").await;
    assert!(b.text("#notice").await.contains("Task cancelled"));
    assert!(b.has("#status[data-status=cancelled]").await);
    assert_eq!(calls(&env, "/api/cancel"), 1);
    let api = app.get_json(&format!("/v1/pushes/{bc_id}")).await;
    assert_eq!(api["status"], "cancelled", "{api}");
    assert!(
        !b.has("#cancel").await,
        "a cancelled task offers Cancel again"
    );
    b.goto(&format!("/ui/pushes/{bc_id}/cancel")).await;
    assert_eq!(b.path().await, format!("/ui/pushes/{bc_id}"));

    // Quotas: the production broadcast took one of the day's ten slots.
    b.click("nav a[href='/ui/quotas']").await;
    let page = b.body().await;
    assert!(page.contains("broadcast"), "{page}");
    assert!(page.contains("1 / 10"), "{page}");
    assert!(b.has("meter").await);
    b.screenshot("quotas").await;

    // Overview: the chart and the totals.
    b.click("nav a[href='/ui/']").await;
    assert!(b.has("svg.chart rect.seg-ok").await);
    let legend = b.text(".legend").await;
    assert!(legend.contains("Accepted 8"), "{legend}");
    assert!(legend.contains("Failed 2"), "{legend}");
    assert!(legend.contains("Unknown 1"), "{legend}");
    assert!(legend.contains("Cancelled 1"), "{legend}");
    let codes = b.text("#codes").await;
    assert!(codes.contains("2018 2"), "{codes}");
    b.screenshot("overview").await;

    // A phone-sized screen.
    b.client.set_window_size(375, 812).await.expect("resize");
    b.goto("/ui/pushes").await;
    let width: Value = b
        .client
        .execute("return document.documentElement.scrollWidth", vec![])
        .await
        .expect("scrollWidth");
    assert!(
        width.as_u64().is_some_and(|w| w <= 375),
        "page is {width} px wide at 375 px"
    );
    b.client
        .execute(
            "const t = document.querySelector('table.history'); \
             window.scrollTo(0, t.getBoundingClientRect().top + window.scrollY - 12);",
            vec![],
        )
        .await
        .expect("scroll");
    b.screenshot("history-phone").await;
    for path in [
        "/ui/".to_owned(),
        "/ui/quotas".to_owned(),
        format!("/ui/pushes/{bc_id}"),
        format!("/ui/pushes/{bc_id}/cancel"),
    ] {
        b.goto(&path).await;
        let width: Value = b
            .client
            .execute("return document.documentElement.scrollWidth", vec![])
            .await
            .expect("scrollWidth");
        assert!(
            width.as_u64().is_some_and(|w| w <= 375),
            "{path} is {width} px wide at 375 px"
        );
    }
    b.client.set_window_size(1280, 1000).await.expect("resize");

    // Sign out: the session is gone.
    b.click("#sign-out").await;
    assert!(b.text(".notice.ok").await.contains("signed out"));
    b.goto("/ui/pushes").await;
    assert!(
        b.path().await.starts_with("/ui/login"),
        "{}",
        b.path().await
    );
    b.close().await;
}

async fn console_applies_scopes_app_lists_and_csrf(backend: Backend) {
    let _one = BROWSER_LOCK.lock().await;
    // Arrange: a cancellable broadcast of the Android app, and an iOS push.
    let env = TestEnv::with_task_step(backend, Duration::from_secs(3600)).await;
    let app = env.spawn_app().await;
    let bc_id = create(&app, TOKEN_SENDER, push_body(ANDROID_APP, "broadcast")).await;
    let mut ios = push_body(IOS_APP, "unicast");
    ios["out_biz_no"] = json!("ios-only-1");
    let ios_id = create(&app, TOKEN_SENDER, ios).await;
    let Some(b) = browser(&app, "zh-CN", backend).await else {
        return;
    };

    // Chinese from Accept-Language; the reader (read scope only) sees no Cancel.
    b.goto("/ui/login").await;
    assert!(b.body().await.contains("登录"), "{}", b.body().await);
    b.sign_in(TOKEN_READER).await;
    b.goto(&format!("/ui/pushes/{bc_id}")).await;
    assert!(b.has("#refresh").await, "the reader may refresh");
    assert!(!b.has("#cancel").await, "the reader is offered Cancel");
    b.goto(&format!("/ui/pushes/{bc_id}/cancel")).await;
    assert!(b.body().await.contains("cancel"), "{}", b.body().await);
    assert!(!b.has("#confirm-cancel").await);

    // Forged POSTs: no CSRF token, a wrong one, no session; and the reader's own valid
    // token still lacks the cancel scope. Umeng is never asked to cancel.
    b.goto(&format!("/ui/pushes/{bc_id}")).await;
    let csrf = b
        .find("#refresh")
        .await
        .find(Locator::XPath("preceding-sibling::input[@name='csrf']"))
        .await
        .expect("csrf input")
        .attr("value")
        .await
        .expect("value")
        .expect("a csrf value");
    let cookie = b.cookie_header().await;
    let cancel = format!("/ui/pushes/{bc_id}/cancel");
    assert_eq!(post_form(&app, &cancel, Some(&cookie), "").await, 403);
    assert_eq!(
        post_form(&app, &cancel, Some(&cookie), "csrf=00ff").await,
        403
    );
    assert_eq!(
        post_form(&app, &cancel, None, &format!("csrf={csrf}")).await,
        403
    );
    assert_eq!(
        post_form(&app, &cancel, Some(&cookie), &format!("csrf={csrf}")).await,
        403
    );
    let refresh = format!("/ui/pushes/{bc_id}/refresh");
    let before = calls(&env, "/api/status");
    assert_eq!(
        post_form(&app, &refresh, Some(&cookie), "csrf=bad").await,
        403
    );
    assert_eq!(calls(&env, "/api/status"), before);
    assert_eq!(calls(&env, "/api/cancel"), 0);
    let api = app.get_json(&format!("/v1/pushes/{bc_id}")).await;
    assert_ne!(api["status"], "cancelled", "{api}");

    // The language switch.
    b.click("a.lang").await;
    assert!(b.body().await.contains("Sign out"), "{}", b.body().await);
    b.click("a.lang").await;
    assert!(b.body().await.contains("退出"));
    b.click("#sign-out").await;

    // A client limited to the Android app never sees the iOS push.
    b.sign_in(TOKEN_ANDROID_ONLY).await;
    b.goto("/ui/pushes").await;
    let page = b.body().await;
    assert!(!page.contains("ios-only-1"), "{page}");
    assert!(!page.contains(IOS_APP), "{page}");
    assert_eq!(
        b.client
            .find_all(Locator::Css("table.history tbody tr"))
            .await
            .unwrap()
            .len(),
        1
    );
    b.screenshot("history-zh").await;
    b.goto(&format!("/ui/pushes/{ios_id}")).await;
    assert!(!b.body().await.contains("ios-only-1"));
    let status = app
        .http
        .get(format!("{}/ui/pushes/{ios_id}", app.base))
        .header("cookie", b.cookie_header().await)
        .send()
        .await
        .expect("answer")
        .status();
    assert_eq!(status, 404);
    b.goto(&format!("/ui/pushes?app={IOS_APP}")).await;
    assert!(b.has("#filter-error").await);
    assert!(!b.body().await.contains("ios-only-1"));
    b.goto("/ui/quotas").await;
    assert!(!b.body().await.contains(IOS_APP));
    b.goto("/ui/").await;
    let legend = b.text(".legend").await;
    assert!(legend.contains("已接受 1"), "{legend}");
    b.close().await;
}

// ----- without a browser: what the answers carry -----

/// An HTTP client that does not follow redirects (to see the 303s and their cookies).
fn plain() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

fn set_cookies(r: &reqwest::Response) -> Vec<String> {
    r.headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect()
}

/// `name=value` of cookie `name` among `Set-Cookie` values.
fn cookie_pair(cookies: &[String], name: &str) -> Option<String> {
    cookies
        .iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .and_then(|c| c.split(';').next())
        .map(str::to_owned)
}

/// The value of the first hidden `csrf` input in `html`.
fn csrf_in(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let start = html.find(marker).expect("a csrf field") + marker.len();
    html[start..]
        .split('"')
        .next()
        .expect("csrf value")
        .to_owned()
}

/// Sign in through the form; the session cookie pair and all `Set-Cookie` values.
async fn sign_in_http(base: &str, token: &str) -> (Option<String>, Vec<String>, u16) {
    let http = plain();
    let r = http
        .get(format!("{base}/ui/login"))
        .send()
        .await
        .expect("login page");
    let nonce = cookie_pair(&set_cookies(&r), "umgw_signin").expect("a sign-in cookie");
    let csrf = csrf_in(&r.text().await.expect("html"));
    let r = http
        .post(format!("{base}/ui/login"))
        .header("cookie", nonce)
        .form(&[("token", token), ("csrf", &csrf), ("next", "/ui/pushes")])
        .send()
        .await
        .expect("sign in");
    let status = r.status().as_u16();
    let cookies = set_cookies(&r);
    (cookie_pair(&cookies, "umgw_session"), cookies, status)
}

async fn console_answers_carry_the_security_headers_and_cookie_flags(backend: Backend) {
    // Arrange
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    let mut settings = env.settings();
    settings.console.secure_cookies = true;
    let tls = env.spawn_app_with(settings).await;

    // Act
    let r = plain()
        .get(format!("{}/ui/login", app.base))
        .send()
        .await
        .expect("answer");
    let (session, cookies, status) = sign_in_http(&app.base, TOKEN_SENDER).await;
    let (_, tls_cookies, _) = sign_in_http(&tls.base, TOKEN_SENDER).await;

    // Assert: the page's headers
    assert_eq!(r.status(), 200);
    let h = r.headers();
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert!(!csp.contains("script-src"), "{csp}");
    assert_eq!(h["x-frame-options"], "DENY");
    assert_eq!(h["x-content-type-options"], "nosniff");
    assert_eq!(h["cache-control"], "no-store");
    assert!(h["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html; charset=utf-8"));
    let html = r.text().await.unwrap();
    assert!(!html.contains("<script"), "inline script in the page");
    assert!(!html.contains("style=\""), "inline style in the page");
    // ... and the session cookie's flags.
    assert_eq!(status, 303);
    assert!(session.is_some(), "{cookies:?}");
    let line = cookies
        .iter()
        .find(|c| c.starts_with("umgw_session="))
        .unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/ui", "Max-Age=28800"] {
        assert!(line.contains(flag), "{flag} missing: {line}");
    }
    assert!(!line.contains("Secure"), "{line}");
    let tls_line = tls_cookies
        .iter()
        .find(|c| c.starts_with("umgw_session="))
        .unwrap();
    assert!(tls_line.contains("; Secure"), "{tls_line}");
    // The stylesheet is served from the binary.
    let css = plain()
        .get(format!("{}/ui/assets/style.css", app.base))
        .send()
        .await
        .unwrap();
    assert_eq!(css.status(), 200);
    assert!(css.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/css"));
}

async fn console_sign_in_needs_its_csrf_token_and_a_read_scope(backend: Backend) {
    // Arrange
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings
        .clients
        .push(umeng_push_gateway::config::ClientSettings {
            name: "send-only".into(),
            token_sha256: Some(umeng_push_gateway::config::token_sha256_hex(
                "token-send-only",
            )),
            token_sha256_env: None,
            scopes: vec![umeng_push_gateway::config::Scope::Send],
            apps: None,
            ..Default::default()
        });
    let app = env.spawn_app_with(settings).await;
    let http = plain();
    let page = http
        .get(format!("{}/ui/login", app.base))
        .send()
        .await
        .unwrap();
    let nonce = cookie_pair(&set_cookies(&page), "umgw_signin").unwrap();
    let csrf = csrf_in(&page.text().await.unwrap());
    let post = |cookie: Option<String>, form: Vec<(&'static str, String)>| {
        let mut req = http.post(format!("{}/ui/login", app.base)).form(&form);
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        req.send()
    };

    // Act + Assert: a valid token without the form's CSRF token, with another nonce's, or
    // without the nonce cookie is refused and signs nobody in.
    for (cookie, form) in [
        (
            Some(nonce.clone()),
            vec![("token", TOKEN_SENDER.to_owned())],
        ),
        (
            Some("umgw_signin=00112233".to_owned()),
            vec![("token", TOKEN_SENDER.to_owned()), ("csrf", csrf.clone())],
        ),
        (
            None,
            vec![("token", TOKEN_SENDER.to_owned()), ("csrf", csrf.clone())],
        ),
    ] {
        let r = post(cookie, form).await.unwrap();
        assert_eq!(r.status(), 403);
        assert!(cookie_pair(&set_cookies(&r), "umgw_session").is_none());
    }
    // A wrong token is told so; a client without the read scope too.
    let r = post(
        Some(nonce.clone()),
        vec![("token", "wrong".to_owned()), ("csrf", csrf.clone())],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("This token is not accepted."));
    let r = post(
        Some(nonce.clone()),
        vec![
            ("token", "token-send-only".to_owned()),
            ("csrf", csrf.clone()),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert!(cookie_pair(&set_cookies(&r), "umgw_session").is_none());
    // A forged or tampered session is no session.
    let (session, _, _) = sign_in_http(&app.base, TOKEN_SENDER).await;
    let session = session.unwrap();
    let tampered = format!("{}0", session);
    for cookie in [tampered, "umgw_session=7b7d.00".to_owned()] {
        let r = http
            .get(format!("{}/ui/pushes", app.base))
            .header("cookie", cookie)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303);
        assert!(r.headers()["location"]
            .to_str()
            .unwrap()
            .starts_with("/ui/login"));
    }
    let r = http
        .get(format!("{}/ui/pushes", app.base))
        .header("cookie", session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn console_sessions_carry_across_replicas_only_with_a_shared_key(backend: Backend) {
    // Arrange: two replicas with one configured key, a third with its own.
    let env = TestEnv::new(backend).await;
    let mut shared = env.settings();
    shared.console.session_key = Some(umeng_push_gateway::secret::Secret::new(
        "0123456789abcdef0123456789abcdef-shared",
    ));
    let a = env.spawn_app_with(shared.clone()).await;
    let b = env.spawn_app_with(shared).await;
    let other = env.spawn_app().await;

    // Act
    let (session, _, _) = sign_in_http(&a.base, TOKEN_SENDER).await;
    let session = session.unwrap();
    let on = |base: String| {
        let session = session.clone();
        async move {
            plain()
                .get(format!("{base}/ui/quotas"))
                .header("cookie", session)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };

    // Assert
    assert_eq!(on(a.base.clone()).await, 200);
    assert_eq!(on(b.base.clone()).await, 200);
    assert_eq!(on(other.base.clone()).await, 303);
}

async fn console_can_be_turned_off(backend: Backend) {
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.console.enabled = false;
    let app = env.spawn_app_with(settings).await;

    for path in ["/ui/", "/ui/login", "/ui/assets/style.css"] {
        let r = plain()
            .get(format!("{}{path}", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    // The API is still there.
    assert_eq!(app.get("/v1/pushes").await.status(), 200);
}

async fn console_bad_input_gets_a_clear_page_not_a_500(backend: Backend) {
    // Arrange
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app().await;
    create(&app, TOKEN_SENDER, push_body(ANDROID_APP, "unicast")).await;
    let (session, _, _) = sign_in_http(&app.base, TOKEN_SENDER).await;
    let session = session.unwrap();
    let get = |path: &str| {
        let session = session.clone();
        let url = format!("{}{path}", app.base);
        async move {
            let r = plain()
                .get(url)
                .header("cookie", session)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };

    // Act + Assert: caller text is escaped, never markup.
    let mut evil = push_body(ANDROID_APP, "unicast");
    evil["description"] = json!("<script>alert(1)</script>");
    evil["notification"]["title"] = json!("<img src=x onerror=alert(1)>");
    let evil_id = create(&app, TOKEN_SENDER, evil).await;
    let (_, html) = get("/ui/pushes").await;
    assert!(html.contains("&lt;script&gt;alert(1)&lt;"), "{html}");
    assert!(!html.contains("<script>"), "{html}");
    let html = get(&format!("/ui/pushes/{evil_id}")).await.1;
    assert!(!html.contains("<img src=x"), "{html}");
    assert!(
        html.contains("&lt;img src=x onerror=alert(1)&gt;"),
        "{html}"
    );

    // Bad filters name the field; the page still renders.
    let (status, html) = get("/ui/pushes?from=yesterday").await;
    assert_eq!(status, 422);
    assert!(html.contains("from: must be an RFC 3339 time"), "{html}");
    let (status, html) = get("/ui/pushes?status=lost").await;
    assert_eq!(status, 422);
    assert!(html.contains("unknown status"), "{html}");
    let (status, _) = get("/ui/pushes?app=test-android&unknown=1").await;
    assert_eq!(status, 200);
    let (status, html) = get("/ui/pushes?app=test-android&cursor=zzz").await;
    assert_eq!(status, 422);
    assert!(html.contains("cursor"), "{html}");
    // A time from the form's datetime-local field is Beijing time: the push made just now
    // is after a start one hour ago, and not before it.
    let an_hour_ago = (time::OffsetDateTime::now_utc() - time::Duration::hours(1))
        .to_offset(time::macros::offset!(+8));
    let local = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}",
        an_hour_ago.year(),
        u8::from(an_hour_ago.month()),
        an_hour_ago.day(),
        an_hour_ago.hour(),
        an_hour_ago.minute()
    );
    let after = get(&format!("/ui/pushes?from={local}")).await.1;
    assert!(
        after.contains("push-link"),
        "nothing after {local}: {after}"
    );
    let before = get(&format!("/ui/pushes?to={local}")).await.1;
    assert!(!before.contains("push-link"), "a push before {local}");
    // Ids that cannot exist, and unknown pages.
    for path in ["/ui/pushes/%00", "/ui/pushes/nope", "/ui/nothing/here"] {
        let (status, html) = get(path).await;
        assert_eq!(status, 404, "{path}");
        assert!(html.contains("<!doctype html>"), "{path}: {html}");
    }
    let (status, _) = get("/ui/pushes/nope/cancel").await;
    assert_eq!(status, 404);
    // Refresh of a unicast: the API's 409, shown on the push page.
    let id = create(&app, TOKEN_SENDER, push_body(ANDROID_APP, "unicast")).await;
    let page = get(&format!("/ui/pushes/{id}")).await.1;
    let csrf = csrf_in(&page);
    let r = plain()
        .post(format!("{}/ui/pushes/{id}/refresh", app.base))
        .header("cookie", session.clone())
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("only for task-class pushes"));
    // An oversized form is refused before it is read.
    let r = plain()
        .post(format!("{}/ui/login", app.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={}", "a".repeat(64 * 1024)))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
}

/// A push held by the gateway until `send_at`, `minutes` from now.
async fn held(app: &TestApp, app_name: &str, minutes: i64, description: &str) -> String {
    let mut body = push_body(app_name, "unicast");
    let at = OffsetDateTime::now_utc() + time::Duration::minutes(minutes);
    body["send_at"] = json!(at.format(&Rfc3339).expect("rfc3339"));
    body["description"] = json!(description);
    body["notification"] = json!({"title": description, "text": description});
    create(app, TOKEN_SENDER, body).await
}

/// The text of the queue table's row for push `id`.
async fn queue_row(b: &Browser, id: &str) -> String {
    b.text(&format!("table#queue tr[data-id='{id}']")).await
}

async fn console_queue_lists_waiting_pushes_and_withdraws_one(backend: Backend) {
    let _one = BROWSER_LOCK.lock().await;
    // Arrange: a gateway whose delivery worker retries after up to an hour; Android pushes
    // held by send_at (10 minutes and an hour ahead), an iOS one held too, and an iOS push
    // sent at once that Umeng keeps refusing with 2028, so it waits for its next try.
    let env = TestEnv::new(backend).await;
    let mut settings = env.settings();
    settings.delivery.interval_ms = 50;
    settings.delivery.backoff_base_ms = 3_600_000;
    settings.delivery.backoff_cap_ms = 3_600_000;
    let app = env.spawn_app_with(settings).await;
    env.sim.add_fault(Fault {
        appkey: Some(crate::app::IOS_KEY.into()),
        path: Some("/api/send".into()),
        kind: FaultKind::ErrorCode {
            code: "2028".into(),
            message: None,
        },
        times: None,
    });
    let (session, _, _) = sign_in_http(&app.base, TOKEN_SENDER).await;
    let empty = plain()
        .get(format!("{}/ui/queue", app.base))
        .header("cookie", session.expect("a session"))
        .send()
        .await
        .expect("answer");
    assert_eq!(empty.status(), 200);
    assert!(empty
        .text()
        .await
        .expect("html")
        .contains("id=\"queue-empty\""));

    let soon = held(&app, ANDROID_APP, 10, "会员日预告").await;
    let later = held(&app, ANDROID_APP, 60, "Weekly digest").await;
    let ios_held = held(&app, IOS_APP, 30, "iOS launch teaser").await;
    let r = app
        .http
        .post(format!("{}/v1/pushes", app.base))
        .bearer_auth(TOKEN_SENDER)
        .header("prefer", "respond-async")
        .json(&push_body(IOS_APP, "unicast"))
        .send()
        .await
        .expect("answer");
    assert_eq!(r.status(), 202);
    let retried = r.json::<Value>().await.expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let mut tried = Value::Null;
    for _ in 0..300 {
        tried = app.get_json(&format!("/v1/pushes/{retried}")).await;
        if tried["status"] == "awaiting_send" && tried["error_code"] == "2028" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(tried["status"], "awaiting_send", "{tried}");
    let Some(b) = browser(&app, "en-US", backend).await else {
        return;
    };

    // Act + Assert: the Queue page counts each app's states and lists every waiting push.
    b.goto("/ui/").await;
    b.sign_in(TOKEN_SENDER).await;
    b.click("nav a[href='/ui/queue']").await;
    assert_eq!(b.path().await, "/ui/queue");
    let stat = |app: &str, state: &str| {
        format!("#queue-stats tr[data-app='{app}'][data-status='{state}'] a.count")
    };
    assert_eq!(b.text(&stat(ANDROID_APP, "awaiting_send_at")).await, "2");
    assert_eq!(b.text(&stat(IOS_APP, "awaiting_send_at")).await, "1");
    assert_eq!(b.text(&stat(IOS_APP, "awaiting_send")).await, "1");
    let rows = b
        .client
        .find_all(Locator::Css("table#queue tbody tr"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 4);
    let row = queue_row(&b, &soon).await;
    assert!(row.contains("held until send_at"), "{row}");
    assert!(
        row.contains("in 9 min") || row.contains("in 10 min"),
        "{row}"
    );
    assert!(row.contains("会员日预告"), "{row}");
    let row = queue_row(&b, &retried).await;
    assert!(
        row.contains("awaiting send") && row.contains("2028"),
        "{row}"
    );
    let attempts = b
        .text(&format!("table#queue tr[data-id='{retried}'] td.attempts"))
        .await;
    assert!(attempts.parse::<u32>().is_ok_and(|n| n >= 1), "{attempts}");
    assert!(queue_row(&b, &later).await.contains("Weekly digest"));
    assert!(queue_row(&b, &ios_held).await.contains(IOS_APP));
    b.screenshot("queue").await;

    // The detail page shows how the push is delivered, and withdraws it after a confirmation.
    b.click(&format!("table#queue tr[data-id='{soon}'] a.push-link"))
        .await;
    assert_eq!(b.path().await, format!("/ui/pushes/{soon}"));
    assert!(b.has("#status[data-status=awaiting_send_at]").await);
    assert!(b.text("#delivery").await.contains("asynchronous"));
    assert!(b.has("#send-at time").await && b.has("#deliver-by time").await);
    assert!(b.text("#cancel").await.contains("Withdraw"));
    b.click("#cancel").await;
    let page = b.body().await;
    assert!(page.contains("Withdraw this push?"), "{page}");
    assert!(page.contains("never reaches Umeng"), "{page}");
    b.click("#confirm-cancel").await;
    assert!(b
        .text("#notice")
        .await
        .contains("withdrawn before it was sent"));
    assert!(b.has("#status[data-status=withdrawn]").await);
    assert!(
        !b.has("#cancel").await,
        "a withdrawn push offers Withdraw again"
    );
    let api = app.get_json(&format!("/v1/pushes/{soon}")).await;
    assert_eq!(api["status"], "withdrawn", "{api}");
    assert_eq!(calls(&env, "/api/cancel"), 0, "Umeng is not asked");
    assert!(
        env.sends()
            .iter()
            .all(|r| r.appkey.as_deref() != Some(crate::app::ANDROID_KEY)),
        "an Android push was sent"
    );

    // The queue no longer lists it.
    b.click("nav a[href='/ui/queue']").await;
    assert_eq!(b.text(&stat(ANDROID_APP, "awaiting_send_at")).await, "1");
    assert!(!b.has(&format!("table#queue tr[data-id='{soon}']")).await);

    // In Chinese, and on a phone.
    b.click("a.lang").await;
    let page = b.body().await;
    assert!(
        page.contains("发送队列") && page.contains("等待定时发送"),
        "{page}"
    );
    b.click("a.lang").await;
    b.client.set_window_size(375, 812).await.expect("resize");
    b.goto("/ui/queue").await;
    let width: Value = b
        .client
        .execute("return document.documentElement.scrollWidth", vec![])
        .await
        .expect("scrollWidth");
    assert!(
        width.as_u64().is_some_and(|w| w <= 375),
        "the queue is {width} px wide at 375 px"
    );
    b.close().await;

    // A client limited to the Android app sees neither the iOS counts nor the iOS pushes.
    let (session, _, _) = sign_in_http(&app.base, TOKEN_ANDROID_ONLY).await;
    let html = plain()
        .get(format!("{}/ui/queue", app.base))
        .header("cookie", session.expect("a session"))
        .send()
        .await
        .expect("answer")
        .text()
        .await
        .expect("html");
    assert!(html.contains(&later), "{html}");
    assert!(!html.contains(IOS_APP), "{html}");
    assert!(
        !html.contains(&ios_held) && !html.contains(&retried),
        "{html}"
    );
}

async fn console_shows_a_parent_with_its_parts(backend: Backend) {
    let _one = BROWSER_LOCK.lock().await;
    // Arrange: a group unicast whose iOS part Umeng rejects: a partial parent.
    let env = TestEnv::new(backend).await;
    let app = env.spawn_app_with(env.settings_with_group()).await;
    env.sim.add_fault(Fault {
        appkey: Some(crate::app::IOS_KEY.into()),
        path: Some("/api/send".into()),
        kind: FaultKind::ErrorCode {
            code: "2003".into(),
            message: Some("bad token".into()),
        },
        times: Some(1),
    });
    let r = app
        .post_push(&json!({
            "app": crate::app::GROUP,
            "type": "unicast",
            "device_tokens": {"android": [crate::app::ANDROID_TOKEN], "ios": [crate::app::IOS_TOKEN]},
            "notification": {"title": "Order shipped", "text": "It is on its way"},
            "production_mode": false,
        }))
        .await;
    assert_eq!(r.status(), 207);
    let view: Value = r.json().await.expect("json");
    let id = view["id"].as_str().expect("id").to_owned();
    let part2 = view["parts"][1]["id"].as_str().expect("part id").to_owned();

    // The page lists the parts (plain HTTP: holds without a browser too).
    let (session, _, _) = sign_in_http(&app.base, TOKEN_SENDER).await;
    let html = plain()
        .get(format!("{}/ui/pushes/{id}", app.base))
        .header("cookie", session.expect("a session"))
        .send()
        .await
        .expect("answer")
        .text()
        .await
        .expect("html");
    assert!(html.contains("id=\"parts\""), "{html}");
    assert_eq!(html.matches("data-part=").count(), 2);
    assert!(html.contains("2003: bad token"), "{html}");

    let Some(b) = browser(&app, "en-US", backend).await else {
        return;
    };
    b.goto("/ui/").await;
    b.sign_in(TOKEN_SENDER).await;
    b.goto(&format!("/ui/pushes/{id}")).await;
    let status = b
        .find("#status")
        .await
        .attr("data-status")
        .await
        .expect("attr");
    assert_eq!(status.as_deref(), Some("partial"));
    let rows = b
        .client
        .find_all(Locator::Css("table#parts tbody tr"))
        .await
        .expect("rows");
    assert_eq!(rows.len(), 2);
    let part_status = b
        .find("table#parts tr[data-part='2'] .badge")
        .await
        .attr("data-status")
        .await
        .expect("attr");
    assert_eq!(part_status.as_deref(), Some("failed"));
    b.screenshot("parts").await;
    // A part links to its own page, which links back to the parent.
    b.click("table#parts tr[data-part='2'] a").await;
    b.wait_for_path_containing(&part2).await;
    assert_eq!(b.path().await, format!("/ui/pushes/{part2}"));
    assert!(b.text("#parent").await.contains(&id));
    b.close().await;
    app.stop().await;
}
