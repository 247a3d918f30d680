//! Shared test helpers: fresh SQLite files and fresh PostgreSQL databases behind the store.

#![allow(dead_code)] // each area uses a different subset

use std::sync::Arc;
use std::time::Duration;

use sqlx::{Connection, PgConnection, SqliteConnection};
use tempfile::TempDir;
use umeng_push_gateway::store::{self, PoolOptions, Store};

/// The server test databases are created on (override with `UMGW_TEST_PG_URL`).
pub const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Pool settings for tests: small pools, so parallel tests stay well under the server's
/// connection limit.
pub fn test_pool_options() -> PoolOptions {
    PoolOptions {
        max_connections: 8,
        acquire_timeout: Duration::from_secs(10),
        ..PoolOptions::default()
    }
}

/// True when `UMGW_SKIP_POSTGRES=1`: PostgreSQL tests pass without running.
pub fn skip_postgres() -> bool {
    std::env::var("UMGW_SKIP_POSTGRES").is_ok_and(|v| v == "1")
}

fn pg_admin_url() -> String {
    std::env::var("UMGW_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// A SQLite database file in a temporary directory (removed on drop).
pub struct SqliteTestDb {
    _dir: TempDir,
    url: String,
}

impl SqliteTestDb {
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A second, independent store (its own pool) on the same file.
    pub async fn connect_again(&self) -> Arc<dyn Store> {
        self.connect_with(&test_pool_options()).await
    }

    pub async fn connect_with(&self, options: &PoolOptions) -> Arc<dyn Store> {
        match store::connect(&self.url, options).await {
            Ok(s) => s,
            Err(e) => panic!("cannot open test sqlite database {}: {e}", self.url),
        }
    }
}

/// A migrated SQLite store on a fresh file.
pub async fn sqlite_store() -> (Arc<dyn Store>, SqliteTestDb) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("cannot create a temporary directory: {e}"),
    };
    // A subdirectory that does not exist yet: connect must create it.
    let url = format!("sqlite://{}/data/gateway.db", dir.path().display());
    let db = SqliteTestDb { _dir: dir, url };
    let store = db.connect_again().await;
    if let Err(e) = store.migrate().await {
        panic!("sqlite migration failed: {e}");
    }
    (store, db)
}

/// A fresh PostgreSQL database (`umgw_t_<random>`), dropped when this guard is dropped.
pub struct PgTestDb {
    admin_url: String,
    name: String,
    url: String,
}

impl PgTestDb {
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server ends every session on this database, as a restart or a failover does;
    /// pools find out at their next statement.
    pub async fn drop_sessions(&self) {
        let mut admin = admin_connection(&pg_admin_url()).await;
        sqlx::query(
            "select pg_terminate_backend(pid) from pg_stat_activity
              where datname = $1 and pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .execute(&mut admin)
        .await
        .expect("terminate sessions");
    }

    /// A second, independent store (its own pool) on the same database: another replica.
    pub async fn connect_again(&self) -> Arc<dyn Store> {
        self.connect_with(&test_pool_options()).await
    }

    pub async fn connect_with(&self, options: &PoolOptions) -> Arc<dyn Store> {
        match store::connect(&self.url, options).await {
            Ok(s) => s,
            Err(e) => panic!("cannot connect to test database {}: {e}", self.name),
        }
    }

    /// Sessions on this database sitting `idle in transaction` (should always be 0).
    pub async fn idle_in_transaction(&self) -> i64 {
        let mut conn = admin_connection(&self.admin_url).await;
        let sql = "select count(*) from pg_stat_activity
                    where datname = $1 and state like 'idle in transaction%'";
        match sqlx::query_scalar(sql)
            .bind(&self.name)
            .fetch_one(&mut conn)
            .await
        {
            Ok(n) => n,
            Err(e) => panic!("cannot read pg_stat_activity: {e}"),
        }
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        // The name is generated here ([a-z0-9_]), so it is safe as an identifier.
        let sql = format!("drop database if exists {} with (force)", self.name);
        // Drop cannot await; use a private runtime on a plain thread. Best effort.
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect(&admin_url).await {
                    let _ = sqlx::query(&sql).execute(&mut conn).await;
                }
            });
        });
        let _ = dropper.join();
    }
}

async fn admin_connection(admin_url: &str) -> PgConnection {
    match PgConnection::connect(admin_url).await {
        Ok(c) => c,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {} ({e}). Start it, point UMGW_TEST_PG_URL at a \
             server, or set UMGW_SKIP_POSTGRES=1 to skip the PostgreSQL tests.",
            store::redact_url(admin_url)
        ),
    }
}

/// A migrated PostgreSQL store on a fresh database.
pub async fn postgres_store() -> (Arc<dyn Store>, PgTestDb) {
    let admin_url = pg_admin_url();
    let name = format!("umgw_t_{}", uuid::Uuid::now_v7().simple());
    let mut admin = admin_connection(&admin_url).await;
    if let Err(e) = sqlx::query(&format!("create database {name}"))
        .execute(&mut admin)
        .await
    {
        panic!("cannot create test database {name}: {e}");
    }
    let mut url = match url::Url::parse(&admin_url) {
        Ok(u) => u,
        Err(e) => panic!("UMGW_TEST_PG_URL is not a url: {e}"),
    };
    url.set_path(&format!("/{name}"));
    let db = PgTestDb {
        admin_url,
        name,
        url: url.to_string(),
    };
    let store = db.connect_again().await;
    if let Err(e) = store.migrate().await {
        panic!("postgres migration failed: {e}");
    }
    (store, db)
}

/// Either test database, for cases written once for both backends.
pub enum TestDb {
    Sqlite(SqliteTestDb),
    Postgres(PgTestDb),
}

impl TestDb {
    /// The database URL a gateway would be configured with.
    pub fn url(&self) -> &str {
        match self {
            TestDb::Sqlite(db) => db.url(),
            TestDb::Postgres(db) => db.url(),
        }
    }

    pub async fn connect_again(&self) -> Arc<dyn Store> {
        self.connect_with(&test_pool_options()).await
    }

    pub async fn connect_with(&self, options: &PoolOptions) -> Arc<dyn Store> {
        match self {
            TestDb::Sqlite(db) => db.connect_with(options).await,
            TestDb::Postgres(db) => db.connect_with(options).await,
        }
    }

    /// Run one raw statement (for arranging states the API cannot reach, such as an old
    /// quota window). Keep the SQL portable between the two backends.
    pub async fn execute(&self, sql: &str) {
        let result = match self {
            TestDb::Sqlite(db) => match SqliteConnection::connect(db.url()).await {
                Ok(mut c) => sqlx::query(sql).execute(&mut c).await.map(|_| ()),
                Err(e) => Err(e),
            },
            TestDb::Postgres(db) => match PgConnection::connect(db.url()).await {
                Ok(mut c) => sqlx::query(sql).execute(&mut c).await.map(|_| ()),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            panic!("raw statement failed: {e}\n{sql}");
        }
    }

    /// Run one raw query returning a single integer.
    pub async fn query_i64(&self, sql: &str) -> i64 {
        let result = match self {
            TestDb::Sqlite(db) => match SqliteConnection::connect(db.url()).await {
                Ok(mut c) => sqlx::query_scalar(sql).fetch_one(&mut c).await,
                Err(e) => Err(e),
            },
            TestDb::Postgres(db) => match PgConnection::connect(db.url()).await {
                Ok(mut c) => sqlx::query_scalar(sql).fetch_one(&mut c).await,
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(n) => n,
            Err(e) => panic!("raw query failed: {e}\n{sql}"),
        }
    }

    /// Sessions left `idle in transaction` (always 0 for SQLite, which has no server).
    pub async fn idle_in_transaction(&self) -> i64 {
        match self {
            TestDb::Sqlite(_) => 0,
            TestDb::Postgres(db) => db.idle_in_transaction().await,
        }
    }
}

/// Everything a store contract case gets: the store under test and its database.
pub struct StoreCtx {
    pub store: Arc<dyn Store>,
    pub db: TestDb,
}

impl StoreCtx {
    pub async fn sqlite() -> Self {
        let (store, db) = sqlite_store().await;
        Self {
            store,
            db: TestDb::Sqlite(db),
        }
    }

    pub async fn postgres() -> Self {
        let (store, db) = postgres_store().await;
        Self {
            store,
            db: TestDb::Postgres(db),
        }
    }
}

/// Write a store contract case once (`async fn name(ctx: StoreCtx)` in the calling module)
/// and get `sqlite::name` and `postgres::name` tests. PostgreSQL tests fail when the server
/// is unreachable unless `UMGW_SKIP_POSTGRES=1`.
#[macro_export]
macro_rules! store_cases {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::StoreCtx::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::helpers::skip_postgres() {
                        eprintln!("UMGW_SKIP_POSTGRES=1: skipped");
                        return;
                    }
                    super::$name($crate::helpers::StoreCtx::postgres().await).await;
                }
            )*
        }
    };
}

/// A PostgreSQL server of its own (`initdb` in a temporary directory, reached over a Unix
/// socket there; no TCP port), for tests that crash the server. Stopped and removed on
/// drop. Runs the server as `postgres` when the tests run as root (PostgreSQL refuses root).
pub struct PrivateCluster {
    dir: TempDir,
    bin: std::path::PathBuf,
    as_postgres: bool,
}

impl PrivateCluster {
    /// `initdb`, then start with `settings` (`name=value`, passed as `-c`).
    pub fn start(settings: &[&str]) -> PrivateCluster {
        let bin = pg_bin_dir();
        let dir = tempfile::tempdir().expect("a temporary directory");
        let as_postgres = running_as_root();
        let cluster = PrivateCluster {
            dir,
            bin,
            as_postgres,
        };
        std::fs::create_dir(cluster.dir.path().join("sock")).expect("socket directory");
        if as_postgres {
            cluster.run("chown", &["-R", "postgres", &cluster.path_str("")], false);
        }
        let data = cluster.path_str("data");
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ],
            true,
        );
        let mut options = format!(
            "-c listen_addresses='' -c unix_socket_directories='{}' -c port=5432 -c fsync=on",
            cluster.path_str("sock")
        );
        for s in settings {
            options.push_str(" -c ");
            options.push_str(s);
        }
        let log = cluster.path_str("server.log");
        cluster.run(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-t", "60", "-o", &options, "start",
            ],
            true,
        );
        cluster
    }

    /// The URL of database `postgres` on this server.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/postgres?host={}&port=5432",
            self.path_str("sock")
        )
    }

    /// The PID of the server process of `backend_type` (as in `pg_stat_activity`).
    pub async fn pid_of(&self, backend_type: &str) -> i32 {
        let mut conn = PgConnection::connect(&self.url())
            .await
            .expect("the private server answers");
        sqlx::query_scalar("select pid from pg_stat_activity where backend_type = $1")
            .bind(backend_type)
            .fetch_one(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("no {backend_type} process: {e}"))
    }

    /// Waits until the server accepts connections again (after a crash it restarts itself).
    pub async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = PgConnection::connect(&self.url()).await {
                if sqlx::query("select 1").execute(&mut c).await.is_ok() {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the private server did not come back:\n{}",
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn path_str(&self, sub: &str) -> String {
        self.dir.path().join(sub).display().to_string()
    }

    /// A command for `program` (from PostgreSQL's bin directory when `pg`), run as
    /// `postgres` when the tests run as root.
    fn command(&self, program: &str, pg: bool) -> std::process::Command {
        let program = if pg {
            self.bin.join(program).display().to_string()
        } else {
            program.to_owned()
        };
        if pg && self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--", &program]);
            c
        } else {
            std::process::Command::new(program)
        }
    }

    /// Runs [`Self::command`]; panics with its output when it fails.
    fn run(&self, program: &str, args: &[&str], pg: bool) {
        let out = self
            .command(program, pg)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let data = self.path_str("data");
        let _ = self
            .command("pg_ctl", true)
            .args(["-D", &data, "-m", "immediate", "stop"])
            .output();
    }
}

/// PostgreSQL's server programs: `UMGW_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` (Debian), else the directory of `pg_ctl` on the PATH.
fn pg_bin_dir() -> std::path::PathBuf {
    if let Some(dir) = std::env::var_os("UMGW_TEST_PG_BIN") {
        return dir.into();
    }
    let mut debian: Vec<std::path::PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    debian.sort();
    if let Some(dir) = debian.pop() {
        return dir;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .find(|p| p.join("pg_ctl").exists() && p.join("initdb").exists())
        .unwrap_or_else(|| {
            panic!(
                "PostgreSQL's server programs (initdb, pg_ctl) were not found: set \
                 UMGW_TEST_PG_BIN, or UMGW_SKIP_POSTGRES=1 to skip the PostgreSQL tests"
            )
        })
}

/// True when this process runs as root (uid 0).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}
