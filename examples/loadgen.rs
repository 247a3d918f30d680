//! Closed-loop HTTP load generator for `bench/run.sh`.
//!
//! `--concurrency` workers each own one keep-alive HTTP/1.1 connection (opened once, reused
//! for every request) and send the next request as soon as the previous answer is read, for
//! `--warmup` seconds (not recorded) and then `--duration` seconds. Latencies go into an HDR
//! histogram (microseconds, 3 significant digits). One JSON line per run goes to stdout.
//! `--target` may name several base URLs separated by commas (gateway replicas): worker `w`
//! connects to target `w % n`, so the connections are spread round robin over them.
//!
//! Modes:
//! - `direct`: signed Umeng unicast sends to `<target>/api/send`, signed like Umeng's own
//!   clients: `md5("POST" + url + body + secret)` over a body with a fresh 13-digit
//!   timestamp; `--target` must be the base URL the simulator signs against;
//! - `gateway`: the same unicast as `POST /v1/pushes` (test mode, so no quota), with
//!   `--unique-biz-no` a fresh `out_biz_no` per request;
//! - `groupcast-flood`: production groupcasts for one app, far over its quota (mostly 429).
//!
//! Being closed-loop, it measures latency at the throughput the system sustains (no
//! coordinated-omission correction: there is no target rate).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use md5::{Digest, Md5};
use serde_json::Value;
use tokio::net::TcpStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Direct,
    Gateway,
    GroupcastFlood,
}

#[derive(Debug, Parser)]
#[command(about = "Closed-loop load generator for umeng-push-gateway and its simulator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send load and print one JSON result line.
    Run(Box<RunArgs>),
    /// Turn pgbench per-transaction logs (`pgbench -l`) into a result line.
    Pgbench(PgbenchArgs),
    /// Print the markdown report of a file of result lines.
    Report {
        /// The JSON lines written by `run`, `pgbench` and bench/run.sh.
        file: std::path::PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    /// Base URL, `http://127.0.0.1:PORT` (plain HTTP, an IP address); several separated by
    /// commas spread the workers over them round robin (not in direct mode).
    #[arg(long)]
    target: String,
    /// Concurrent workers, one connection each.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Unrecorded seconds before the measurement.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Total requests per second over all workers; 0 = as fast as answers come back.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Runtime worker threads of the load generator itself.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// direct: the appkey and app master secret the simulator knows.
    #[arg(long, default_value = "")]
    appkey: String,
    #[arg(
        long,
        default_value = "",
        env = "LOADGEN_SECRET",
        hide_env_values = true
    )]
    secret: String,
    /// gateway, groupcast-flood: the bearer token and the configured app name.
    #[arg(
        long,
        default_value = "",
        env = "LOADGEN_TOKEN",
        hide_env_values = true
    )]
    token: String,
    #[arg(long, default_value = "")]
    app: String,
    /// gateway: a fresh `out_biz_no` on every request.
    #[arg(long)]
    unique_biz_no: bool,
    /// A unique name for this run (joins the CPU lines of bench/run.sh).
    #[arg(long, default_value = "")]
    label: String,
    /// Copied into the result: `sqlite`, `postgres` or empty.
    #[arg(long, default_value = "")]
    backend: String,
    /// Copied into the result: `main`, `quota-alone`, `quota-flood`, `flood`, `upstream`,
    /// `replicas`.
    #[arg(long, default_value = "main")]
    scenario: String,
    /// Copied into the result: the latency injected into the simulator's answers, ms.
    #[arg(long, default_value_t = 0)]
    upstream_ms: u64,
    /// Prefix of generated `out_biz_no`s (default: from the clock, unique per run).
    #[arg(long)]
    run_id: Option<String>,
    /// gateway: send `Prefer: respond-async` (the push is stored and answered 202).
    #[arg(long)]
    respond_async: bool,
    /// Processes whose CPU seconds over the measured window (warm-up left out) go into the
    /// result as `cpu_secs`, comma-separated PIDs.
    #[arg(long, value_delimiter = ',')]
    cpu_pids: Vec<u32>,
    /// A PostgreSQL database whose backends' CPU seconds over the measured window go into
    /// the result as `pg_cpu_secs` (backends found by their process title).
    #[arg(long)]
    cpu_pg_db: Option<String>,
}

#[derive(Debug, clap::Args)]
struct PgbenchArgs {
    #[arg(long, default_value = "pgbench")]
    label: String,
    #[arg(long)]
    concurrency: usize,
    /// The `-T` of the pgbench run, seconds.
    #[arg(long)]
    duration: f64,
    /// Log files (`pgbench -l --log-prefix`): `client_id tx_no latency_us script epoch us`.
    #[arg(required = true)]
    logs: Vec<std::path::PathBuf>,
}

/// One server the workers send to.
struct Target {
    addr: SocketAddr,
    /// `host:port` for the `Host` header.
    host: String,
}

/// Everything a worker needs, built once.
struct Plan {
    mode: Mode,
    /// Worker `w` sends to `targets[w % targets.len()]`.
    targets: Vec<Target>,
    /// `http://host:port/api/send`, what is signed in direct mode.
    sign_url: String,
    appkey: String,
    secret: String,
    auth: String,
    app: String,
    unique_biz_no: bool,
    respond_async: bool,
    run_id: String,
    /// Time between two requests of one worker (paced runs only).
    pace: Option<Duration>,
}

#[derive(Default)]
struct Stats {
    hist: Option<Histogram<u64>>,
    statuses: BTreeMap<u16, u64>,
    errors: u64,
    first_error: Option<String>,
}

impl Stats {
    fn new() -> Self {
        Stats {
            hist: Some(Histogram::new_with_bounds(1, 120_000_000, 3).expect("valid bounds")),
            ..Default::default()
        }
    }

    fn merge(&mut self, other: Stats) {
        if let (Some(h), Some(o)) = (self.hist.as_mut(), other.hist.as_ref()) {
            h.add(o).expect("same bounds");
        }
        for (k, v) in other.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => run(*args),
        Command::Pgbench(args) => pgbench(args),
        Command::Report { file } => report(&file),
    }
}

/// Reads one `http://IP:PORT` base URL.
fn parse_target(target: &str) -> anyhow::Result<Target> {
    let url = url::Url::parse(target.trim())?;
    anyhow::ensure!(url.scheme() == "http", "--target must be plain http://");
    let host = url
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("--target has no host"))?
        .to_owned();
    let port = url.port_or_known_default().unwrap_or(80);
    let addr: SocketAddr = format!("{host}:{port}")
        .parse()
        .map_err(|_| anyhow::anyhow!("--target host must be an IP address"))?;
    Ok(Target {
        addr,
        host: format!("{host}:{port}"),
    })
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let targets = args
        .target
        .split(',')
        .filter(|t| !t.trim().is_empty())
        .map(parse_target)
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!targets.is_empty(), "--target is empty");
    match args.mode {
        Mode::Direct => anyhow::ensure!(
            !args.appkey.is_empty() && !args.secret.is_empty() && targets.len() == 1,
            "direct mode needs --appkey, --secret and a single --target"
        ),
        Mode::Gateway | Mode::GroupcastFlood => anyhow::ensure!(
            !args.token.is_empty() && !args.app.is_empty(),
            "gateway modes need --token and --app"
        ),
    }
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let run_id = args.run_id.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("r{:x}", nanos % (1 << 48))
    });
    let target_count = targets.len();
    let plan = Arc::new(Plan {
        mode: args.mode,
        targets,
        sign_url: format!("{}/api/send", args.target.trim_end_matches('/')),
        appkey: args.appkey.clone(),
        secret: args.secret.clone(),
        auth: format!("Bearer {}", args.token),
        app: args.app.clone(),
        unique_biz_no: args.unique_biz_no,
        respond_async: args.respond_async,
        run_id,
        pace: (args.rate > 0.0)
            .then(|| Duration::from_secs_f64(args.concurrency as f64 / args.rate)),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    let warmup = Duration::from_secs_f64(args.warmup.max(0.0));
    let duration = Duration::from_secs_f64(args.duration.max(0.1));
    let watched = Watched {
        pids: args.cpu_pids.clone(),
        pg_db: args.cpu_pg_db.clone(),
    };
    let (stats, elapsed, cpu_before) = runtime.block_on(async {
        let start = Instant::now();
        let measure_from = start + warmup;
        let deadline = measure_from + duration;
        let mut tasks = Vec::with_capacity(args.concurrency);
        for w in 0..args.concurrency {
            let plan = Arc::clone(&plan);
            tasks.push(tokio::spawn(worker(plan, w, measure_from, deadline)));
        }
        // CPU counts from the end of the warm-up, as requests do.
        tokio::time::sleep_until(measure_from.into()).await;
        let cpu_before = watched.snapshot();
        let mut all = Stats::new();
        for t in tasks {
            match t.await {
                Ok(s) => all.merge(s),
                Err(e) => {
                    all.errors += 1;
                    all.first_error.get_or_insert(e.to_string());
                }
            }
        }
        let elapsed = Instant::now().saturating_duration_since(measure_from);
        (all, elapsed, cpu_before)
    });
    let cpu = watched.snapshot().since(&cpu_before);

    let hist = stats.hist.expect("histogram");
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let count = hist.len();
    let secs = elapsed.as_secs_f64().max(duration.as_secs_f64());
    let ok = stats
        .statuses
        .iter()
        .filter(|(s, _)| (200..300).contains(*s))
        .map(|(_, n)| n)
        .sum::<u64>();
    let statuses: serde_json::Map<String, serde_json::Value> = stats
        .statuses
        .iter()
        .map(|(k, v)| (k.to_string(), (*v).into()))
        .collect();
    let line = serde_json::json!({
        "kind": "run",
        "label": args.label,
        "backend": args.backend,
        "scenario": args.scenario,
        "rate": args.rate,
        "mode": match args.mode { Mode::Direct => "direct", Mode::Gateway => "gateway", Mode::GroupcastFlood => "groupcast-flood" },
        "unique_biz_no": args.unique_biz_no,
        "respond_async": args.respond_async,
        "concurrency": args.concurrency,
        "targets": target_count,
        "upstream_ms": args.upstream_ms,
        "duration_s": (secs * 100.0).round() / 100.0,
        "requests": count,
        "ok": ok,
        "rps": (count as f64 / secs * 10.0).round() / 10.0,
        "ok_rps": (ok as f64 / secs * 10.0).round() / 10.0,
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": hist.max() as f64 / 1000.0,
        "mean_ms": (hist.mean() / 10.0).round() / 100.0,
        "status": statuses,
        "errors": stats.errors,
        "first_error": stats.first_error,
        "loadgen_cpu_pct": (cpu.own / secs * 1000.0).round() / 10.0,
        "cpu_secs": (!args.cpu_pids.is_empty()).then_some(round2(cpu.pids)),
        "pg_cpu_secs": args.cpu_pg_db.is_some().then_some(round2(cpu.pg)),
    });
    println!("{line}");
    Ok(())
}

/// One connection, one request at a time, until `deadline`. Reconnects (after a short
/// pause) when the connection fails; such failures are counted as errors.
async fn worker(plan: Arc<Plan>, w: usize, measure_from: Instant, deadline: Instant) -> Stats {
    let mut stats = Stats::new();
    let hist = stats.hist.as_mut().expect("histogram");
    let mut body = String::with_capacity(1024);
    let mut path = String::with_capacity(128);
    let token = device_token(w);
    let target = &plan.targets[w % plan.targets.len()];
    let mut seq: u64 = 0;
    let mut sender: Option<http1::SendRequest<Full<Bytes>>> = None;
    // Paced workers start spread over one interval.
    let mut next = plan
        .pace
        .map(|p| Instant::now() + p.mul_f64((w % 64) as f64 / 64.0));
    while Instant::now() < deadline {
        if let (Some(at), Some(pace)) = (next.as_mut(), plan.pace) {
            tokio::time::sleep_until((*at).into()).await;
            *at += pace;
            if Instant::now() >= deadline {
                break;
            }
        }
        let s = match sender.as_mut() {
            Some(s) => s,
            None => match connect(target.addr).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    if Instant::now() >= measure_from {
                        stats.errors += 1;
                        stats.first_error.get_or_insert(format!("connect: {e}"));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        seq += 1;
        build_request(&plan, w, seq, &token, &mut path, &mut body);
        let mut req = hyper::Request::post(path.as_str())
            .header(hyper::header::HOST, target.host.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if plan.mode != Mode::Direct {
            req = req.header(hyper::header::AUTHORIZATION, plan.auth.as_str());
        }
        if plan.respond_async {
            req = req.header("prefer", "respond-async");
        }
        let req = req
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .expect("a valid request");
        let started = Instant::now();
        let result = async {
            s.ready().await?;
            let resp = s.send_request(req).await?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await?;
            Ok::<u16, hyper::Error>(status)
        }
        .await;
        let done = Instant::now();
        let recording = started >= measure_from && done <= deadline;
        match result {
            Ok(status) => {
                if recording {
                    let us = done.duration_since(started).as_micros() as u64;
                    hist.saturating_record(us.max(1));
                    *stats.statuses.entry(status).or_default() += 1;
                }
            }
            Err(e) => {
                sender = None;
                if recording {
                    stats.errors += 1;
                    stats.first_error.get_or_insert(format!("request: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    stats
}

async fn connect(addr: SocketAddr) -> anyhow::Result<http1::SendRequest<Full<Bytes>>> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A 44-character Android device token, distinct per worker.
fn device_token(w: usize) -> String {
    let mut t = format!("Bench{w:06}");
    while t.len() < 44 {
        t.push_str("AaBbCcDdEeFfGgHhIiJjKkLlMmNnOoPpQqRrSsTtUuVv");
    }
    t.truncate(44);
    t
}

/// Writes the request path and body into the reused buffers.
fn build_request(
    plan: &Plan,
    w: usize,
    seq: u64,
    token: &str,
    path: &mut String,
    body: &mut String,
) {
    path.clear();
    body.clear();
    match plan.mode {
        Mode::Direct => {
            let ts = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let _ = write!(
                body,
                r#"{{"appkey":"{}","timestamp":"{ts}","type":"unicast","device_tokens":"{token}","payload":{{"display_type":"notification","body":{{"ticker":"Your order shipped","title":"Your order shipped","text":"Order 42 is on its way","after_open":"go_url","url":"https://shop.example/orders/42"}},"extra":{{"order":"42"}}}},"production_mode":"false","description":"bench w{w} n{seq}"}}"#,
                plan.appkey
            );
            let mut h = Md5::new();
            h.update(b"POST");
            h.update(plan.sign_url.as_bytes());
            h.update(body.as_bytes());
            h.update(plan.secret.as_bytes());
            let _ = write!(path, "/api/send?sign={}", hex::encode(h.finalize()));
        }
        Mode::Gateway => {
            path.push_str("/v1/pushes");
            let _ = write!(
                body,
                r#"{{"app":"{}","type":"unicast","device_tokens":["{token}"],"notification":{{"title":"Your order shipped","text":"Order 42 is on its way","open":{{"url":"https://shop.example/orders/42"}},"extra":{{"order":"42"}}}},"production_mode":false,"description":"bench w{w} n{seq}""#,
                plan.app
            );
            if plan.unique_biz_no {
                let _ = write!(body, r#","out_biz_no":"{}-{w}-{seq}""#, plan.run_id);
            }
            body.push('}');
        }
        Mode::GroupcastFlood => {
            path.push_str("/v1/pushes");
            let _ = write!(
                body,
                r#"{{"app":"{}","type":"groupcast","filter":{{"where":{{"and":[{{"tag":"vip"}}]}}}},"notification":{{"title":"Flash sale","text":"Everything must go"}},"production_mode":true,"description":"flood w{w} n{seq}"}}"#,
                plan.app
            );
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// The processes whose CPU a run reports besides its own.
struct Watched {
    pids: Vec<u32>,
    pg_db: Option<String>,
}

/// CPU seconds used so far: this process, each watched PID, each backend of the watched
/// PostgreSQL database.
struct CpuSnapshot {
    own: f64,
    pids: BTreeMap<u32, f64>,
    pg: BTreeMap<u32, f64>,
}

/// CPU seconds over a window.
struct CpuUsed {
    own: f64,
    pids: f64,
    pg: f64,
}

impl Watched {
    fn snapshot(&self) -> CpuSnapshot {
        let of = |pids: &mut dyn Iterator<Item = u32>| {
            pids.filter_map(|pid| Some((pid, cpu_secs(&format!("/proc/{pid}/stat"))?)))
                .collect()
        };
        CpuSnapshot {
            own: cpu_secs("/proc/self/stat").unwrap_or(0.0),
            pids: of(&mut self.pids.iter().copied()),
            pg: match &self.pg_db {
                Some(db) => of(&mut pg_backends(db).into_iter()),
                None => BTreeMap::new(),
            },
        }
    }
}

impl CpuSnapshot {
    /// What was used since `before`; a process that started in between counts from zero.
    fn since(&self, before: &CpuSnapshot) -> CpuUsed {
        let delta = |now: &BTreeMap<u32, f64>, then: &BTreeMap<u32, f64>| {
            now.iter()
                .map(|(pid, s)| s - then.get(pid).copied().unwrap_or(0.0))
                .sum()
        };
        CpuUsed {
            own: self.own - before.own,
            pids: delta(&self.pids, &before.pids),
            pg: delta(&self.pg, &before.pg),
        }
    }
}

/// PIDs of the PostgreSQL backends connected to database `db` (process title
/// `postgres: [CLUSTER:] USER DB HOST(PORT) STATE`).
fn pg_backends(db: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: u32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let title = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let mut words = title.strip_prefix("postgres: ")?.split_whitespace();
        words.any(|w| w == db).then_some(pid)
    })
    .collect()
}

/// CPU seconds (user + system) of a process, from its `/proc/PID/stat`.
fn cpu_secs(stat_path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(stat_path).ok()?;
    // Fields after the `(comm)`: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some((ticks(14) + ticks(15)) / 100.0)
}

/// pgbench per-transaction logs to one result line.
fn pgbench(args: PgbenchArgs) -> anyhow::Result<()> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut failed = 0u64;
    for path in &args.logs {
        let text = std::fs::read_to_string(path)?;
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let latency = f.nth(2);
            match latency.and_then(|v| v.parse::<u64>().ok()) {
                Some(us) => hist.saturating_record(us.max(1)),
                None => failed += 1,
            }
        }
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let line = serde_json::json!({
        "kind": "pgbench",
        "label": args.label,
        "backend": "postgres",
        "scenario": "main",
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "requests": hist.len(),
        "ok": hist.len(),
        "rps": (hist.len() as f64 / args.duration * 10.0).round() / 10.0,
        "p50_ms": ms(0.50),
        "p90_ms": ms(0.90),
        "p99_ms": ms(0.99),
        "p999_ms": ms(0.999),
        "max_ms": hist.max() as f64 / 1000.0,
        "errors": failed,
    });
    println!("{line}");
    Ok(())
}

/// The markdown report: one table for the main runs, one for the quota path, one for the
/// realistic upstream and one for replicas (when those scenarios ran), then the targets.
fn report(file: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let r = Report { lines: &lines };
    let mut checks = Vec::new();
    r.main_table(&mut checks);
    r.quota_table();
    r.upstream_table(&mut checks);
    r.replicas_table();
    r.async_table(&mut checks);
    r.parts_table();
    r.purge_table();
    r.rss_checks(&mut checks);
    if !checks.is_empty() {
        println!();
        println!("Targets (issue 13):");
        println!();
        for c in checks {
            println!("- {c}");
        }
    }
    Ok(())
}

fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_owned()
}
fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN)
}
fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// The result lines of one bench run.
struct Report<'a> {
    lines: &'a [Value],
}

/// Server-side figures of one run: CPU per request of the process(es) under test and of
/// the PostgreSQL backends serving them, and the peak RSS during the run.
struct Cost {
    cpu_us: String,
    pg_us: String,
    rss_mib: String,
}

impl<'a> Report<'a> {
    fn runs(&self) -> impl Iterator<Item = &'a Value> + '_ {
        self.lines
            .iter()
            .filter(|v| s(v, "kind") == "run" || s(v, "kind") == "pgbench")
    }

    fn find(&self, pred: impl Fn(&Value) -> bool) -> Option<&'a Value> {
        self.runs().find(|v| pred(v))
    }

    /// Every result line of one kind (`parts`, `purge`, ...).
    fn lines_of(&self, kind: &str) -> Vec<&'a Value> {
        self.lines.iter().filter(|v| s(v, "kind") == kind).collect()
    }

    /// The line of `kind` that belongs to the run `label` (its `cpu`, its `drain`).
    fn line_of(&self, kind: &str, label: &str) -> Option<&'a Value> {
        self.lines
            .iter()
            .find(|v| s(v, "kind") == kind && s(v, "label") == label)
    }

    fn cpu_line(&self, label: &str) -> Option<&'a Value> {
        self.line_of("cpu", label)
    }

    /// CPU seconds `key` of a run: its own measurement over the measured window, or (files
    /// written before the load generator measured it) the `cpu` line's, which also counts
    /// the warm-up and so overstates the cost per request.
    fn cpu_secs(&self, run: &Value, key: &str) -> Option<f64> {
        run.get(key).and_then(Value::as_f64).or_else(|| {
            self.cpu_line(&s(run, "label"))
                .and_then(|l| l.get(key))
                .and_then(Value::as_f64)
        })
    }

    fn cost(&self, run: &Value) -> Cost {
        let per_req = |k: &str| {
            self.per_req(run, k)
                .map(|us| format!("{us:.0}"))
                .unwrap_or_default()
        };
        Cost {
            cpu_us: per_req("cpu_secs"),
            pg_us: per_req("pg_cpu_secs"),
            rss_mib: self
                .cpu_line(&s(run, "label"))
                .and_then(|l| l.get("rss_kib"))
                .and_then(Value::as_u64)
                .map(|k| format!("{:.1}", k as f64 / 1024.0))
                .unwrap_or_default(),
        }
    }

    /// Microseconds of CPU `key` per request of a run.
    fn per_req(&self, run: &Value, key: &str) -> Option<f64> {
        let n = u(run, "requests");
        (n > 0).then(|| self.cpu_secs(run, key).map(|c| c * 1e6 / n as f64))?
    }

    fn cpu_per_req(&self, run: &Value) -> Option<f64> {
        self.per_req(run, "cpu_secs")
    }

    fn main_table(&self, checks: &mut Vec<String>) {
        let main: Vec<&Value> = self.runs().filter(|v| s(v, "scenario") == "main").collect();
        if main.is_empty() {
            return;
        }
        let mut levels: Vec<u64> = main.iter().map(|v| u(v, "concurrency")).collect();
        levels.sort_unstable();
        levels.dedup();
        println!("| run | clients | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | added p50 | added p99 | × direct | × pgbench | CPU µs/req | PG CPU µs/req | peak RSS MiB | answers |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for &c in &levels {
            let at = |v: &Value| s(v, "scenario") == "main" && u(v, "concurrency") == c;
            let direct = self.find(|v| at(v) && s(v, "mode") == "direct");
            let pgb = self.find(|v| at(v) && s(v, "kind") == "pgbench");
            let gateways: Vec<&Value> = main
                .iter()
                .copied()
                .filter(|v| at(v) && s(v, "mode") == "gateway")
                .collect();
            let mut rows: Vec<&Value> = direct.into_iter().chain(pgb).collect();
            rows.extend(&gateways);
            for v in rows {
                let is_gw = s(v, "mode") == "gateway";
                let title = if is_gw {
                    gateway_title(v)
                } else if s(v, "kind") == "pgbench" {
                    "pgbench INSERT (1.5 KB row)".to_owned()
                } else {
                    "direct to simulator".to_owned()
                };
                let rel = |base: Option<&Value>, k: &str| match base {
                    Some(b) if is_gw => format!("{:+.2}", f(v, k) - f(b, k)),
                    _ => String::new(),
                };
                let ratio = |base: Option<&Value>| match base {
                    Some(b) if is_gw => format!("{:.2}", f(v, "ok_rps") / f(b, "rps")),
                    _ => String::new(),
                };
                let cost = self.cost(v);
                println!(
                    "| {title} | {c} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    f(v, "rps"),
                    f(v, "p50_ms"),
                    f(v, "p90_ms"),
                    f(v, "p99_ms"),
                    f(v, "p999_ms"),
                    rel(direct, "p50_ms"),
                    rel(direct, "p99_ms"),
                    ratio(direct),
                    ratio(pgb),
                    cost.cpu_us,
                    cost.pg_us,
                    cost.rss_mib,
                    statuses(v),
                );
            }
            self.main_checks(c, direct, pgb, &gateways, checks);
        }
    }

    fn main_checks(
        &self,
        c: u64,
        direct: Option<&Value>,
        pgb: Option<&Value>,
        gateways: &[&Value],
        checks: &mut Vec<String>,
    ) {
        let gw = |backend: &str, biz: bool| {
            gateways.iter().copied().find(|v| {
                s(v, "backend") == backend
                    && v.get("unique_biz_no").and_then(Value::as_bool) == Some(biz)
            })
        };
        if c == 16 {
            for backend in ["postgres", "postgres-relaxed"] {
                if let (Some(p), Some(b)) = (gw(backend, false), pgb) {
                    let r = f(p, "ok_rps") / f(b, "rps");
                    checks.push(format!(
                        "gateway + {backend} at 16 clients: {r:.2}× pgbench (target ≥ 0.6) {}",
                        verdict(r >= 0.6)
                    ));
                }
            }
            for biz in [false, true] {
                if let (Some(l), Some(p)) = (gw("sqlite", biz), gw("postgres", biz)) {
                    checks.push(format!(
                        "{} at 16 clients: {:.0} vs {:.0} req/s on postgres (target: at or above) {}",
                        gateway_title(l),
                        f(l, "ok_rps"),
                        f(p, "ok_rps"),
                        verdict(f(l, "ok_rps") >= f(p, "ok_rps"))
                    ));
                }
            }
        }
        for v in gateways {
            if let (Some(d), Some(limit)) =
                (direct, [(1, 1.0), (16, 5.0)].iter().find(|l| l.0 == c))
            {
                let added = f(v, "p99_ms") - f(d, "p99_ms");
                checks.push(format!(
                    "{} at {c} clients: added p99 {added:+.2} ms (target ≤ {}) {}",
                    gateway_title(v),
                    limit.1,
                    verdict(added <= limit.1)
                ));
            }
            if c == 16 {
                if let Some(us) = self.cpu_per_req(v) {
                    checks.push(format!(
                        "{} at 16 clients: gateway CPU {us:.0} µs per push (target ≤ 150) {}",
                        gateway_title(v),
                        verdict(us <= 150.0)
                    ));
                }
            }
        }
    }

    fn quota_table(&self) {
        let quota: Vec<&Value> = self
            .runs()
            .filter(|v| s(v, "scenario").starts_with("quota") || s(v, "scenario") == "flood")
            .collect();
        if quota.is_empty() {
            return;
        }
        println!();
        println!("Quota path: unicast pushes of one app, alone and during a flood of production groupcasts of another app (quota 5/minute).");
        println!();
        println!("| backend | unicast clients | alone req/s | alone p50 / p99 ms | with flood req/s | with flood p50 / p99 ms | flood sent req/s | flood answers |");
        println!("|---|---:|---:|---:|---:|---:|---:|---|");
        for backend in ["sqlite", "postgres"] {
            let pick = |scenario: &str| {
                quota
                    .iter()
                    .find(|v| s(v, "backend") == backend && s(v, "scenario") == scenario)
            };
            if let (Some(a), Some(w), Some(fl)) =
                (pick("quota-alone"), pick("quota-flood"), pick("flood"))
            {
                println!(
                    "| {backend} | {} | {:.0} | {:.2} / {:.2} | {:.0} | {:.2} / {:.2} | {:.0} | {} |",
                    u(a, "concurrency"),
                    f(a, "rps"),
                    f(a, "p50_ms"),
                    f(a, "p99_ms"),
                    f(w, "rps"),
                    f(w, "p50_ms"),
                    f(w, "p99_ms"),
                    f(fl, "rps"),
                    statuses(fl),
                );
            }
        }
    }

    fn upstream_table(&self, checks: &mut Vec<String>) {
        let runs: Vec<&Value> = self
            .runs()
            .filter(|v| s(v, "scenario") == "upstream")
            .collect();
        if runs.is_empty() {
            return;
        }
        println!();
        println!("Realistic upstream: the simulator answers every send after a fixed delay; the same clients call it directly or through the gateway (unicast, test mode).");
        println!();
        println!("| run | upstream ms | clients | req/s | p50 ms | p99 ms | p99.9 ms | added p50 | added p99 | × direct | CPU µs/req | PG CPU µs/req | peak RSS MiB | answers |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for v in &runs {
            let is_gw = s(v, "mode") == "gateway";
            let direct = runs.iter().copied().find(|d| {
                s(d, "mode") == "direct"
                    && u(d, "concurrency") == u(v, "concurrency")
                    && u(d, "upstream_ms") == u(v, "upstream_ms")
            });
            let title = if is_gw {
                gateway_title(v)
            } else {
                "direct to simulator".to_owned()
            };
            let rel = |k: &str| match direct {
                Some(d) if is_gw => format!("{:+.2}", f(v, k) - f(d, k)),
                _ => String::new(),
            };
            let ratio = match direct {
                Some(d) if is_gw => f(v, "ok_rps") / f(d, "rps"),
                _ => f64::NAN,
            };
            let cost = self.cost(v);
            println!(
                "| {title} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} | {} |",
                u(v, "upstream_ms"),
                u(v, "concurrency"),
                f(v, "rps"),
                f(v, "p50_ms"),
                f(v, "p99_ms"),
                f(v, "p999_ms"),
                rel("p50_ms"),
                rel("p99_ms"),
                if ratio.is_nan() { String::new() } else { format!("{ratio:.2}") },
                cost.cpu_us,
                cost.pg_us,
                cost.rss_mib,
                statuses(v),
            );
            if is_gw && !ratio.is_nan() {
                checks.push(format!(
                    "{} with a {} ms upstream at {} clients: {ratio:.2}× direct (target ≥ 0.9) {}",
                    gateway_title(v),
                    u(v, "upstream_ms"),
                    u(v, "concurrency"),
                    verdict(ratio >= 0.9)
                ));
            }
        }
    }

    fn replicas_table(&self) {
        let mut runs: Vec<&Value> = self
            .runs()
            .filter(|v| s(v, "scenario") == "replicas")
            .collect();
        if runs.is_empty() {
            return;
        }
        runs.sort_by_key(|v| (u(v, "concurrency"), u(v, "targets")));
        println!();
        println!("Replicas: gateway processes on one PostgreSQL, the clients' connections spread round robin over them (unicast, test mode). CPU is that of all replicas together; RSS the largest replica's.");
        println!();
        println!("| replicas | clients | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | × 1 replica | CPU µs/req | PG CPU µs/req | peak RSS MiB | answers |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for v in &runs {
            let one = runs
                .iter()
                .find(|o| u(o, "targets") == 1 && u(o, "concurrency") == u(v, "concurrency"));
            let cost = self.cost(v);
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
                u(v, "targets"),
                u(v, "concurrency"),
                f(v, "rps"),
                f(v, "p50_ms"),
                f(v, "p90_ms"),
                f(v, "p99_ms"),
                f(v, "p999_ms"),
                one.map(|o| format!("{:.2}", f(v, "ok_rps") / f(o, "ok_rps")))
                    .unwrap_or_default(),
                cost.cpu_us,
                cost.pg_us,
                cost.rss_mib,
                statuses(v),
            );
        }
    }

    /// Asynchronous intake (202s per second) and the drain that follows, beside the
    /// synchronous run of the same backend and clients.
    fn async_table(&self, checks: &mut Vec<String>) {
        let runs: Vec<&Value> = self
            .runs()
            .filter(|v| s(v, "scenario") == "async")
            .collect();
        if runs.is_empty() {
            return;
        }
        println!();
        println!("Asynchronous delivery: clients send `Prefer: respond-async` for the run's duration (unicast, test mode); the gateway's delivery worker drains the queue to the simulator meanwhile and after. Intake is 202s per second, × the synchronous rate of the main scenario (instant upstream); drain is pushes accepted by Umeng per second, from the first 202 until the queue is empty. With an upstream latency the worker's sends take as long as Umeng's do; that queue drains afterwards unmeasured.");
        println!();
        println!("| backend | upstream ms | clients | intake 202/s | × sync | p99 ms | pushes | drain s | drain/s | pushes/claim | peak queue depth | CPU µs/req | PG CPU µs/req | peak RSS MiB | answers |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        for v in &runs {
            let label = s(v, "label");
            let drain = self.line_of("drain", &label);
            let sync = self.find(|o| {
                s(o, "scenario") == "main"
                    && s(o, "backend") == s(v, "backend")
                    && u(o, "concurrency") == u(v, "concurrency")
                    && o.get("unique_biz_no").and_then(Value::as_bool) != Some(true)
                    && s(o, "mode") == "gateway"
            });
            let ratio = sync.map(|o| f(v, "ok_rps") / f(o, "ok_rps"));
            let cost = self.cost(v);
            let d = |k: &str, digits: usize| {
                drain.map_or_else(String::new, |d| format!("{:.digits$}", f(d, k)))
            };
            let rate = drain.map_or_else(String::new, |d| {
                format!("{:.0}", f(d, "pushes") / f(d, "drain_secs"))
            });
            // Absent for a build without the claims counter.
            let per_claim = self
                .line_of("claims", &label)
                .filter(|c| f(c, "claims") > 0.0)
                .map(|c| format!("{:.1}", f(c, "pushes") / f(c, "claims")))
                .unwrap_or_default();
            println!(
                "| {} | {} | {} | {:.0} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s(v, "backend"),
                u(v, "upstream_ms"),
                u(v, "concurrency"),
                f(v, "ok_rps"),
                ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
                f(v, "p99_ms"),
                d("pushes", 0),
                d("drain_secs", 1),
                rate,
                per_claim,
                d("peak_depth", 0),
                cost.cpu_us,
                cost.pg_us,
                cost.rss_mib,
                statuses(v),
            );
            if let Some(r) = ratio {
                checks.push(format!(
                    "asynchronous intake on {} at {} clients, upstream {} ms: {r:.2}x synchronous (target ≥ 2x) {}",
                    s(v, "backend"),
                    u(v, "concurrency"),
                    u(v, "upstream_ms"),
                    verdict(r >= 2.0)
                ));
            }
        }
    }

    /// One request for a large audience (the `parts` scenario): wall time per request,
    /// Umeng calls made, the gateway's peak RSS.
    fn parts_table(&self) {
        let rows = self.lines_of("parts");
        if rows.is_empty() {
            return;
        }
        println!();
        println!("One request, a large audience: a listcast of N tokens and a customizedcast of N aliases, sent synchronously (the answer comes once every part has its outcome), one at a time; test mode. Calls are /api/send calls the simulator received for all of them.");
        println!();
        println!("| backend | cast | audience | requests | answers | wall ms (median) | wall ms (max) | Umeng calls | calls/request | peak RSS MiB |");
        println!("|---|---|---:|---:|---|---:|---:|---:|---:|---:|");
        for v in rows {
            let mut wall: Vec<f64> = v
                .get("wall_ms")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_f64).collect())
                .unwrap_or_default();
            wall.sort_by(f64::total_cmp);
            let median = wall.get(wall.len() / 2).copied().unwrap_or(f64::NAN);
            let max = wall.last().copied().unwrap_or(f64::NAN);
            let requests = u(v, "requests").max(1);
            println!(
                "| {} | {} | {} | {} | {} | {median:.0} | {max:.0} | {} | {:.1} | {:.1} |",
                s(v, "backend"),
                s(v, "cast"),
                u(v, "audience"),
                u(v, "requests"),
                s(v, "statuses"),
                u(v, "umeng_calls"),
                u(v, "umeng_calls") as f64 / requests as f64,
                u(v, "rss_kib") as f64 / 1024.0,
            );
        }
    }

    /// The retention purge of old pushes (the `purge` scenario).
    fn purge_table(&self) {
        let rows = self.lines_of("purge");
        if rows.is_empty() {
            return;
        }
        println!();
        println!("Retention purge on PostgreSQL: pushes 100-110 days old (retention 90 days), deleted batch by batch by a gateway's first purge round. Seconds from the gateway's start to its purge report; WAL written meanwhile; the size of pushes and its indexes before and after (the space comes back to PostgreSQL after vacuum, not to the disk).");
        println!();
        println!("| pushes | with out_biz_no | purged | seconds | WAL MiB | size before MiB | size after MiB | gateway CPU s | PG CPU s |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        let f = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let mib = |v: &Value, k: &str| f(v, k) / 1_048_576.0;
        for v in rows {
            println!(
                "| {} | {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {:.1} |",
                u(v, "pushes"),
                u(v, "keys"),
                u(v, "purged"),
                f(v, "secs"),
                mib(v, "wal_bytes"),
                mib(v, "size_before"),
                mib(v, "size_after"),
                f(v, "cpu_secs"),
                f(v, "pg_cpu_secs"),
            );
        }
    }

    /// Peak RSS of every gateway measured, per run (new files) or per backend (old files).
    fn rss_checks(&self, checks: &mut Vec<String>) {
        let per_run: Vec<(String, u64)> = self
            .lines
            .iter()
            .filter(|v| s(v, "kind") == "cpu" && s(v, "proc") != "simulator")
            .filter_map(|v| Some((s(v, "label"), v.get("rss_kib")?.as_u64()?)))
            .collect();
        let old: Vec<(String, u64)> = self
            .lines
            .iter()
            .filter(|v| s(v, "kind") == "rss")
            .map(|v| (format!("gateway + {}", s(v, "backend")), u(v, "vmhwm_kib")))
            .collect();
        let all = if per_run.is_empty() { old } else { per_run };
        if let Some((label, kib)) = all.iter().max_by_key(|(_, k)| *k) {
            let mib = *kib as f64 / 1024.0;
            checks.push(format!(
                "peak RSS of a gateway over {} measured runs: at most {mib:.1} MiB ({label}) (target ≤ 64 in every scenario) {}",
                all.len(),
                verdict(mib <= 64.0)
            ));
        }
    }
}

fn gateway_title(v: &Value) -> String {
    let replicas = u(v, "targets");
    format!(
        "gateway + {}{}{}",
        s(v, "backend"),
        if v.get("unique_biz_no").and_then(Value::as_bool) == Some(true) {
            ", out_biz_no"
        } else {
            ""
        },
        if replicas > 1 {
            format!(", {replicas} replicas")
        } else {
            String::new()
        }
    )
}

fn statuses(v: &Value) -> String {
    let mut out = String::new();
    if let Some(m) = v.get("status").and_then(Value::as_object) {
        for (k, n) in m {
            if !out.is_empty() {
                out.push(' ');
            }
            let _ = write!(out, "{k}×{n}");
        }
    }
    let e = u(v, "errors");
    if e > 0 {
        let _ = write!(out, " err×{e}");
    }
    out
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "**met**"
    } else {
        "**not met**"
    }
}
