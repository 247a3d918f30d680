//! Cheap checks of the deployment artefacts (Dockerfile, docker-compose.yml,
//! deploy/kubernetes/): they parse, the ports they name agree with each other and with the
//! `listen` of the configuration they carry, the probes use the health routes, every
//! subcommand they run exists, and their configuration passes `check-config` through the
//! real binary. Building the image itself takes minutes and is a manual check (README.md,
//! "Container image").

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_norway::Value as Yaml;

const BIN: &str = env!("CARGO_BIN_EXE_umeng-push-gateway");
/// Where the Kubernetes manifests mount the secret files (master_secret_file).
const K8S_SECRET_DIR: &str = "/etc/umeng-push-gateway/secrets";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The binary with an environment that holds only what the test gives it, so that
/// `UMENG_GATEWAY_*` variables of the machine running the tests do not leak in.
fn gateway(env: &BTreeMap<String, String>) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.envs(env);
    cmd
}

fn run(mut cmd: Command) -> Output {
    cmd.output().expect("the gateway binary runs")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ------------------------------------------------------------------------ YAML helpers

fn yaml_docs(rel: &str) -> Vec<Yaml> {
    let text = read(rel);
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let mut value: Yaml = serde::Deserialize::deserialize(doc)
            .unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"));
        value
            .apply_merge()
            .unwrap_or_else(|e| panic!("{rel}: bad merge key: {e}"));
        if !value.is_null() {
            docs.push(value);
        }
    }
    assert!(!docs.is_empty(), "{rel} holds no document");
    docs
}

/// `value[a][b]...`, panicking with the path when a key is missing.
fn at<'a>(value: &'a Yaml, path: &[&str]) -> &'a Yaml {
    let mut v = value;
    for (i, key) in path.iter().enumerate() {
        v = v
            .get(*key)
            .unwrap_or_else(|| panic!("missing key {}", path[..=i].join(".")));
    }
    v
}

fn str_of<'a>(value: &'a Yaml, path: &[&str]) -> &'a str {
    at(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{} is not a string", path.join(".")))
}

fn seq<'a>(value: &'a Yaml, path: &[&str]) -> &'a Vec<Yaml> {
    at(value, path)
        .as_sequence()
        .unwrap_or_else(|| panic!("{} is not a list", path.join(".")))
}

fn u64_of(value: &Yaml, path: &[&str]) -> u64 {
    at(value, path)
        .as_u64()
        .unwrap_or_else(|| panic!("{} is not a number", path.join(".")))
}

/// A command in list or string form, as words.
fn words(value: &Yaml) -> Vec<String> {
    match value {
        Yaml::String(s) => s.split_whitespace().map(str::to_owned).collect(),
        Yaml::Sequence(items) => items
            .iter()
            .map(|i| i.as_str().expect("command words are strings").to_owned())
            .collect(),
        other => panic!("a command must be a string or a list, not {other:?}"),
    }
}

// ------------------------------------------------------------------------ TOML helpers

fn toml_listen_port(toml_text: &str, what: &str) -> u16 {
    let value: toml::Value = toml::from_str(toml_text).unwrap_or_else(|e| panic!("{what}: {e}"));
    let listen = value
        .get("server")
        .and_then(|s| s.get("listen"))
        .and_then(|l| l.as_str())
        .unwrap_or_else(|| panic!("{what} sets no server.listen"));
    let addr: SocketAddr = listen
        .parse()
        .unwrap_or_else(|e| panic!("{what}: listen {listen:?}: {e}"));
    assert!(
        addr.ip().is_unspecified(),
        "{what}: a container must listen on 0.0.0.0, not {addr}"
    );
    addr.port()
}

fn port_of_addr(addr: &str) -> u16 {
    addr.parse::<SocketAddr>()
        .unwrap_or_else(|e| panic!("{addr:?}: {e}"))
        .port()
}

// ------------------------------------------------------------------------ Dockerfile

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (op, rest) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((op.to_ascii_uppercase(), rest.trim().to_owned()));
        current.clear();
    }
    out
}

fn instructions(op: &str) -> Vec<String> {
    dockerfile()
        .into_iter()
        .filter(|(o, _)| o == op)
        .map(|(_, r)| r)
        .collect()
}

fn exec_form(json: &str) -> Vec<String> {
    serde_json::from_str(json).unwrap_or_else(|e| panic!("not exec (JSON) form: {json}: {e}"))
}

/// The runtime stage's listen port, from its ENV UMENG_GATEWAY_SERVER__LISTEN.
fn dockerfile_listen_port() -> u16 {
    let env = instructions("ENV");
    let listen = env
        .iter()
        .find_map(|e| e.strip_prefix("UMENG_GATEWAY_SERVER__LISTEN="))
        .expect("the Dockerfile sets UMENG_GATEWAY_SERVER__LISTEN");
    let addr: SocketAddr = listen.trim().parse().expect("a socket address");
    assert!(
        addr.ip().is_unspecified(),
        "the image must listen on 0.0.0.0"
    );
    addr.port()
}

#[test]
fn dockerfile_is_pinned_non_root_and_ports_agree() {
    let froms = instructions("FROM");
    assert_eq!(froms.len(), 2, "a builder and a runtime stage: {froms:?}");
    let args: BTreeMap<String, String> = instructions("ARG")
        .iter()
        .filter_map(|a| a.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    for from in &froms {
        let image = from.split_whitespace().next().unwrap();
        let image = match image.strip_prefix("${").and_then(|i| i.strip_suffix('}')) {
            Some(arg) => args
                .get(arg)
                .unwrap_or_else(|| panic!("FROM uses unset ARG {arg}")),
            None => image,
        };
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            !tag.is_empty() && tag != "latest",
            "base image {image} is not pinned"
        );
    }
    assert!(
        args["RUST_IMAGE"].starts_with("rust:1."),
        "{:?}",
        args["RUST_IMAGE"]
    );
    assert!(
        args["RUST_IMAGE"].ends_with("-bookworm"),
        "builder and runtime share Debian 12"
    );
    assert!(
        args["RUNTIME_IMAGE"].contains("debian12") || args["RUNTIME_IMAGE"].contains("bookworm")
    );

    let users = instructions("USER");
    let user = users.last().expect("the runtime stage sets USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric USER (runAsNonRoot)");
    assert_ne!(uid, 0, "the image must not run as root");

    let exposed: Vec<u16> = instructions("EXPOSE")
        .iter()
        .map(|p| {
            p.trim_end_matches("/tcp")
                .parse()
                .expect("EXPOSE a port number")
        })
        .collect();
    assert_eq!(
        exposed,
        vec![dockerfile_listen_port()],
        "EXPOSE agrees with the listen address"
    );

    assert_eq!(
        exec_form(&instructions("ENTRYPOINT")[0]),
        vec!["umeng-push-gateway"]
    );
    assert_eq!(exec_form(&instructions("CMD")[0]), vec!["serve"]);
    let hc = instructions("HEALTHCHECK");
    let hc_cmd = hc[0]
        .split_once("CMD ")
        .expect("HEALTHCHECK ... CMD [...]")
        .1;
    assert_eq!(exec_form(hc_cmd), vec!["umeng-push-gateway", "healthcheck"]);

    // The binary is where the ENTRYPOINT finds it, and the SQLite directory is writable.
    let copies = instructions("COPY");
    assert!(copies
        .iter()
        .any(|c| c.ends_with("/usr/local/bin/umeng-push-gateway")));
    assert!(copies
        .iter()
        .any(|c| c.contains("--chown=65532:65532") && c.ends_with("/app/data")));
    assert_eq!(
        instructions("WORKDIR").last().map(String::as_str),
        Some("/app")
    );
    assert!(
        copies.iter().any(|c| c.contains("migrations")),
        "migrations are compiled in"
    );

    // The build context keeps what the build needs and drops local state.
    let ignore = read(".dockerignore");
    let ignored: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/'))
        .collect();
    for needed in ["src", "migrations", "config", "Cargo.toml", "Cargo.lock"] {
        assert!(!ignored.contains(needed), ".dockerignore drops {needed}");
    }
    for dropped in ["target", ".git", "data", "*.db"] {
        assert!(ignored.contains(dropped), ".dockerignore keeps {dropped}");
    }
}

// ------------------------------------------------------------------------ compose

struct Compose {
    services: BTreeMap<String, Yaml>,
}

fn compose() -> Compose {
    let doc = yaml_docs("docker-compose.yml").remove(0);
    let services = at(&doc, &["services"])
        .as_mapping()
        .expect("services is a map")
        .iter()
        .map(|(k, v)| (k.as_str().unwrap().to_owned(), v.clone()))
        .collect();
    Compose { services }
}

impl Compose {
    fn service(&self, name: &str) -> &Yaml {
        self.services
            .get(name)
            .unwrap_or_else(|| panic!("compose has no service {name}"))
    }

    fn env(&self, name: &str) -> BTreeMap<String, String> {
        let Some(env) = self.service(name).get("environment") else {
            return BTreeMap::new();
        };
        env.as_mapping()
            .expect("environment as a map")
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Yaml::String(s) => s.clone(),
                    Yaml::Bool(b) => b.to_string(),
                    Yaml::Number(n) => n.to_string(),
                    other => panic!("environment value {other:?}"),
                };
                (k.as_str().unwrap().to_owned(), v)
            })
            .collect()
    }

    /// host path -> container path of the bind mounts.
    fn mounts(&self, name: &str) -> BTreeMap<String, String> {
        let Some(volumes) = self.service(name).get("volumes") else {
            return BTreeMap::new();
        };
        volumes
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| {
                let parts: Vec<&str> = v.as_str()?.split(':').collect();
                parts[0]
                    .starts_with("./")
                    .then(|| (parts[0].to_owned(), parts[1].to_owned()))
            })
            .collect()
    }

    /// The file the service's UMENG_GATEWAY_CONFIG names, as a path in the repository.
    fn config_file(&self, name: &str) -> String {
        let in_container = self
            .env(name)
            .remove("UMENG_GATEWAY_CONFIG")
            .expect("UMENG_GATEWAY_CONFIG");
        let (host, _) = self
            .mounts(name)
            .into_iter()
            .find(|(_, c)| *c == in_container)
            .unwrap_or_else(|| panic!("{name}: nothing is mounted at {in_container}"));
        host.trim_start_matches("./").to_owned()
    }
}

#[test]
fn compose_ports_probes_and_simulator_agree() {
    let c = compose();
    for name in ["postgres", "simulator", "migrate", "gateway"] {
        c.service(name);
    }
    assert!(str_of(c.service("postgres"), &["image"]).starts_with("postgres:15"));
    let pg_test = words(at(c.service("postgres"), &["healthcheck", "test"]));
    assert!(pg_test.iter().any(|w| w == "pg_isready"), "{pg_test:?}");

    // Published port -> container port == the config's listen == the image's port.
    let config_rel = c.config_file("gateway");
    let config_text = read(&config_rel);
    let listen = toml_listen_port(&config_text, &config_rel);
    assert_eq!(listen, dockerfile_listen_port());
    let ports: Vec<String> = seq(c.service("gateway"), &["ports"])
        .iter()
        .map(|p| {
            p.as_str()
                .expect("ports as \"HOST:CONTAINER\" strings")
                .to_owned()
        })
        .collect();
    assert_eq!(
        ports,
        vec![format!("8080:{listen}")],
        "the gateway is on localhost:8080"
    );
    assert_eq!(
        c.config_file("migrate"),
        config_rel,
        "migrate uses the gateway's config"
    );

    // Start order: migrations after PostgreSQL is healthy, the gateway after migrations.
    let gw_deps = at(c.service("gateway"), &["depends_on"]);
    assert_eq!(
        str_of(gw_deps, &["migrate", "condition"]),
        "service_completed_successfully"
    );
    assert_eq!(
        str_of(gw_deps, &["postgres", "condition"]),
        "service_healthy"
    );
    assert_eq!(
        str_of(
            c.service("migrate"),
            &["depends_on", "postgres", "condition"]
        ),
        "service_healthy"
    );
    assert_eq!(
        words(at(c.service("migrate"), &["command"])),
        vec!["migrate"]
    );
    assert_eq!(words(at(c.service("gateway"), &["command"])), vec!["serve"]);

    // The simulator listens where the gateway sends, signs over the same URL, and knows
    // the same apps with the same secrets.
    let sim = words(at(c.service("simulator"), &["command"]));
    assert_eq!(sim[0], "simulator");
    let flag = |name: &str| -> Vec<&str> {
        sim.windows(2)
            .filter(|w| w[0] == name)
            .map(|w| w[1].as_str())
            .collect()
    };
    let sim_port = port_of_addr(flag("--listen")[0]);
    let public_url = flag("--public-url")[0];
    let config: toml::Value = toml::from_str(&config_text).unwrap();
    let base_url = config["umeng"]["base_url"].as_str().unwrap();
    assert_eq!(
        base_url.trim_end_matches('/'),
        public_url.trim_end_matches('/')
    );
    let url = url::Url::parse(base_url).unwrap();
    assert_eq!(
        url.host_str(),
        Some("simulator"),
        "base_url names the compose service"
    );
    assert_eq!(url.port_or_known_default(), Some(sim_port));
    let sim_apps: BTreeSet<String> = flag("--app").into_iter().map(str::to_owned).collect();
    let config_apps: BTreeSet<String> = config["apps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            format!(
                "{}:{}:{}",
                a["appkey"].as_str().unwrap(),
                a["master_secret"].as_str().unwrap(),
                a["platform"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        sim_apps, config_apps,
        "simulator --app values match the gateway's [[apps]]"
    );

    // The demo token the README gives is the one configured.
    let documented = "compose-demo-token";
    let hash = config["clients"][0]["token_sha256"].as_str().unwrap();
    assert_eq!(
        hash,
        umeng_push_gateway::config::token_sha256_hex(documented)
    );
    assert!(
        read("README.md").contains(documented),
        "README.md documents the demo token"
    );
}

#[test]
fn compose_config_passes_check_config() {
    let c = compose();
    let config = repo().join(c.config_file("gateway"));
    let mut env = c.env("gateway");
    env.insert("UMENG_GATEWAY_CONFIG".into(), config.display().to_string());
    let out = run({
        let mut cmd = gateway(&env);
        cmd.arg("check-config");
        cmd
    });
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 app(s), 1 client(s), database postgres"),
        "{stdout}"
    );
}

// ------------------------------------------------------------------------ Kubernetes

fn k8s_files() -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo().join("deploy/kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    files
}

/// Every manifest, by kind/name.
fn k8s() -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    for file in k8s_files() {
        for doc in yaml_docs(&format!("deploy/kubernetes/{file}")) {
            let kind = str_of(&doc, &["kind"]).to_owned();
            let key = if kind == "Kustomization" {
                kind
            } else {
                format!("{kind}/{}", str_of(&doc, &["metadata", "name"]))
            };
            assert!(
                out.insert(key.clone(), doc).is_none(),
                "{key} appears twice"
            );
        }
    }
    out
}

fn container<'a>(workload: &'a Yaml, name: &str) -> &'a Yaml {
    seq(workload, &["spec", "template", "spec", "containers"])
        .iter()
        .find(|c| c.get("name").and_then(Yaml::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// A container's environment: literal values, and secretKeyRef keys.
struct PodEnv {
    values: BTreeMap<String, String>,
    secret_refs: BTreeMap<String, String>,
}

fn pod_env(container: &Yaml) -> PodEnv {
    let mut values = BTreeMap::new();
    let mut secret_refs = BTreeMap::new();
    for var in container
        .get("env")
        .and_then(Yaml::as_sequence)
        .into_iter()
        .flatten()
    {
        let name = str_of(var, &["name"]).to_owned();
        if let Some(v) = var.get("value") {
            values.insert(
                name,
                v.as_str()
                    .expect("env values are quoted strings")
                    .to_owned(),
            );
        } else {
            secret_refs.insert(
                name,
                str_of(var, &["valueFrom", "secretKeyRef", "key"]).to_owned(),
            );
        }
    }
    PodEnv {
        values,
        secret_refs,
    }
}

fn configmap_toml(all: &BTreeMap<String, Yaml>) -> String {
    str_of(
        &all["ConfigMap/umeng-push-gateway"],
        &["data", "gateway.toml"],
    )
    .to_owned()
}

#[test]
fn kubernetes_manifests_agree() {
    let all = k8s();
    let deployment = &all["Deployment/umeng-push-gateway"];
    let service = &all["Service/umeng-push-gateway"];
    let job = &all["Job/umeng-push-gateway-migrate"];
    let secret = &all["Secret/umeng-push-gateway"];
    let pod = at(deployment, &["spec", "template", "spec"]);
    let gw = container(deployment, "gateway");

    assert!(
        u64_of(deployment, &["spec", "replicas"]) >= 2,
        "more than one replica"
    );
    assert_eq!(words(at(gw, &["args"])), vec!["serve"]);
    assert_eq!(
        words(at(container(job, "migrate"), &["args"])),
        vec!["migrate"]
    );

    // Ports: config listen == containerPort == what the Service and probes target.
    let toml_text = configmap_toml(&all);
    let listen = toml_listen_port(&toml_text, "the ConfigMap's gateway.toml");
    assert_eq!(listen, dockerfile_listen_port());
    let ports: BTreeMap<String, u64> = seq(gw, &["ports"])
        .iter()
        .map(|p| {
            (
                str_of(p, &["name"]).to_owned(),
                u64_of(p, &["containerPort"]),
            )
        })
        .collect();
    assert_eq!(
        ports,
        BTreeMap::from([("http".to_owned(), u64::from(listen))])
    );
    let resolve = |port: &Yaml| -> u64 {
        match port {
            Yaml::String(name) => *ports
                .get(name)
                .unwrap_or_else(|| panic!("no port named {name}")),
            Yaml::Number(n) => n.as_u64().unwrap(),
            other => panic!("port {other:?}"),
        }
    };
    for p in seq(service, &["spec", "ports"]) {
        assert_eq!(
            resolve(at(p, &["targetPort"])),
            u64::from(listen),
            "Service targetPort"
        );
    }
    let selector = at(service, &["spec", "selector"]);
    assert_eq!(
        selector,
        at(deployment, &["spec", "template", "metadata", "labels"])
    );
    assert_eq!(
        selector,
        at(deployment, &["spec", "selector", "matchLabels"])
    );

    // Probes: ready = database, alive = process.
    assert_eq!(
        str_of(gw, &["readinessProbe", "httpGet", "path"]),
        "/readyz"
    );
    assert_eq!(
        str_of(gw, &["livenessProbe", "httpGet", "path"]),
        "/healthz"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            resolve(at(gw, &[probe, "httpGet", "port"])),
            u64::from(listen),
            "{probe}"
        );
    }

    // Resources, non-root, and the shutdown window.
    for workload in [deployment, job] {
        let spec = at(workload, &["spec", "template", "spec"]);
        assert_eq!(
            at(spec, &["securityContext", "runAsNonRoot"]).as_bool(),
            Some(true)
        );
        assert_eq!(
            at(spec, &["enableServiceLinks"]).as_bool(),
            Some(false),
            "see deployment.yaml"
        );
        for c in seq(spec, &["containers"]) {
            for kind in ["requests", "limits"] {
                for res in ["cpu", "memory"] {
                    at(c, &["resources", kind, res]);
                }
            }
            assert_eq!(
                at(c, &["securityContext", "readOnlyRootFilesystem"]).as_bool(),
                Some(true)
            );
        }
    }
    let config: toml::Value = toml::from_str(&toml_text).unwrap();
    // The wait the gateway actually does (startup::shutdown_grace): the configured grace,
    // and never less than an upload plus a send plus 5 s.
    let setting = |section: &str, key: &str, default: i64| {
        config
            .get(section)
            .and_then(|s| s.get(key))
            .and_then(toml::Value::as_integer)
            .unwrap_or(default) as u64
    };
    let one_call_ms =
        setting("umeng", "connect_timeout_ms", 3000) + setting("umeng", "timeout_ms", 30000);
    let grace =
        setting("server", "shutdown_grace_secs", 30).max((2 * one_call_ms).div_ceil(1000) + 5);
    assert!(
        u64_of(pod, &["terminationGracePeriodSeconds"]) > grace,
        "SIGKILL after the gateway's shutdown wait of {grace} s"
    );

    // Migrations: the Job runs them, the replicas do not.
    let env = pod_env(gw);
    assert_eq!(
        env.values["UMENG_GATEWAY_DATABASE__MIGRATE_ON_START"],
        "false"
    );
    assert_eq!(
        env.secret_refs["UMENG_GATEWAY_DATABASE__URL"],
        "database-url"
    );
    assert_eq!(
        pod_env(container(job, "migrate")).secret_refs["UMENG_GATEWAY_DATABASE__URL"],
        "database-url"
    );

    // The config file is mounted where UMENG_GATEWAY_CONFIG says.
    let mounts: BTreeMap<String, String> = seq(gw, &["volumeMounts"])
        .iter()
        .map(|m| {
            (
                str_of(m, &["mountPath"]).to_owned(),
                str_of(m, &["name"]).to_owned(),
            )
        })
        .collect();
    let config_mount = &mounts[&env.values["UMENG_GATEWAY_CONFIG"]];
    let volumes = seq(pod, &["volumes"]);
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| str_of(v, &["name"]) == name)
            .unwrap()
    };
    assert_eq!(
        str_of(volume(config_mount), &["configMap", "name"]),
        "umeng-push-gateway"
    );

    // Every secret the config needs comes from the Secret: token hash variables, and
    // master secret files under the secret volume's mount.
    let secret_keys: BTreeSet<&str> = at(secret, &["stringData"])
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    for key in env.secret_refs.values() {
        assert!(
            secret_keys.contains(key.as_str()),
            "secret key {key} is not in the example"
        );
    }
    for client in config["clients"].as_array().unwrap() {
        let var = client["token_sha256_env"]
            .as_str()
            .expect("token hashes come from the Secret");
        assert!(
            env.secret_refs.contains_key(var),
            "{var} is not set from the Secret"
        );
    }
    let secret_volume = &mounts[K8S_SECRET_DIR];
    let items: BTreeMap<&str, &str> = seq(volume(secret_volume), &["secret", "items"])
        .iter()
        .map(|i| (str_of(i, &["path"]), str_of(i, &["key"])))
        .collect();
    for app in config["apps"].as_array().unwrap() {
        let file = app["master_secret_file"]
            .as_str()
            .expect("master secrets come from files");
        let name = file
            .strip_prefix(&format!("{K8S_SECRET_DIR}/"))
            .unwrap_or_else(|| panic!("{file} is not under the secret mount"));
        let key = items
            .get(name)
            .unwrap_or_else(|| panic!("{name} is not a mounted item"));
        assert!(
            secret_keys.contains(key),
            "secret key {key} is not in the example"
        );
    }

    // kustomization: every manifest but the example Secret, and nothing that is missing.
    let kustomization = &all["Kustomization"];
    let resources: BTreeSet<&str> = seq(kustomization, &["resources"])
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let expected: BTreeSet<String> = k8s_files()
        .into_iter()
        .filter(|f| f != "kustomization.yaml" && f != "secret.example.yaml")
        .collect();
    assert_eq!(resources, expected.iter().map(String::as_str).collect());
}

/// Writes the ConfigMap's gateway.toml with the secret mount moved to `dir`, and dummy
/// secret files there; returns the environment the Deployment would give it.
fn k8s_config_with(
    dir: &Path,
    secret_values: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let all = k8s();
    let gw = container(&all["Deployment/umeng-push-gateway"], "gateway");
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    let toml_text = configmap_toml(&all).replace(K8S_SECRET_DIR, &secrets.display().to_string());
    let config = dir.join("gateway.toml");
    std::fs::write(&config, toml_text).unwrap();
    for (key, value) in secret_values {
        std::fs::write(secrets.join(key), format!("{value}\n")).unwrap();
    }
    let env = pod_env(gw);
    let mut out = env.values;
    out.insert("UMENG_GATEWAY_CONFIG".into(), config.display().to_string());
    for (var, key) in env.secret_refs {
        out.insert(var, secret_values[&key].clone());
    }
    out
}

#[test]
fn kubernetes_config_passes_check_config_with_real_secrets_only() {
    let dir = tempfile::tempdir().unwrap();
    let dummy: BTreeMap<String, String> = [
        (
            "database-url",
            "postgres://gateway:dummy@postgres:5432/gateway".to_owned(),
        ),
        (
            "shop-android-master-secret",
            "dummy-android-master-secret".to_owned(),
        ),
        (
            "shop-ios-master-secret",
            "dummy-ios-master-secret".to_owned(),
        ),
        (
            "console-session-key",
            "dummy-console-session-key-0123456789abcdef".to_owned(),
        ),
        (
            "order-service-token-sha256",
            umeng_push_gateway::config::token_sha256_hex("order"),
        ),
        (
            "ops-token-sha256",
            umeng_push_gateway::config::token_sha256_hex("ops"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let env = k8s_config_with(dir.path(), &dummy);
    let out = run({
        let mut cmd = gateway(&env);
        cmd.arg("check-config");
        cmd
    });
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("2 app(s), 2 client(s), database postgres"),
        "{stdout}"
    );

    // The example Secret's placeholders are refused, so it cannot go live by mistake.
    let example = k8s().remove("Secret/umeng-push-gateway").unwrap();
    let placeholders: BTreeMap<String, String> = at(&example, &["stringData"])
        .as_mapping()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let env = k8s_config_with(dir.path(), &placeholders);
    let out = run({
        let mut cmd = gateway(&env);
        cmd.arg("check-config");
        cmd
    });
    assert!(
        !out.status.success(),
        "placeholders accepted: {}",
        describe(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("token_sha256"),
        "{}",
        describe(&out)
    );

    // The migrate Job gets only the database URL: that must be enough for its config.
    let job = &k8s()["Job/umeng-push-gateway-migrate"];
    let job_env = pod_env(container(job, "migrate"));
    assert!(!job_env.values.contains_key("UMENG_GATEWAY_CONFIG"));
    let mut env = job_env.values;
    for (var, key) in job_env.secret_refs {
        env.insert(var, dummy[&key].clone());
    }
    let out = run({
        let mut cmd = gateway(&env);
        cmd.arg("check-config");
        cmd
    });
    assert!(out.status.success(), "{}", describe(&out));
}

// ------------------------------------------------------------------------ subcommands

#[test]
fn every_subcommand_used_exists() {
    let mut used: BTreeSet<Vec<String>> = BTreeSet::new();
    used.insert(exec_form(&instructions("CMD")[0]));
    let hc = instructions("HEALTHCHECK");
    used.insert(exec_form(hc[0].split_once("CMD ").unwrap().1)[1..].to_vec());
    for svc in compose().services.values() {
        if let Some(cmd) = svc.get("command") {
            if str_of(svc, &["image"]).starts_with("umeng-push-gateway") {
                used.insert(words(cmd));
            }
        }
    }
    for (_, doc) in k8s() {
        if let Some(containers) = doc.get("spec").and_then(|s| s.get("template")) {
            for c in seq(containers, &["spec", "containers"]) {
                used.insert(words(at(c, &["args"])));
            }
        }
    }
    let subcommands: BTreeSet<&str> = used.iter().map(|w| w[0].as_str()).collect();
    assert_eq!(
        subcommands,
        BTreeSet::from(["healthcheck", "migrate", "serve", "simulator"]),
        "the artefacts run these"
    );
    // The README's image check runs check-config too.
    for sub in subcommands.iter().copied().chain(["check-config"]) {
        let out = run({
            let mut cmd = gateway(&BTreeMap::new());
            cmd.args([sub, "--help"]);
            cmd
        });
        assert!(out.status.success(), "{sub} --help: {}", describe(&out));
        // Every --flag passed to it is one it knows.
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        for invocation in used.iter().filter(|w| w[0] == sub) {
            for flag in invocation.iter().filter(|w| w.starts_with("--")) {
                assert!(help.contains(flag.as_str()), "{sub} has no {flag}:\n{help}");
            }
        }
    }
}

/// The image's HEALTHCHECK runs `umeng-push-gateway healthcheck` with no argument: it must
/// find a server listening on 0.0.0.0 through UMENG_GATEWAY_SERVER__LISTEN alone.
#[test]
fn healthcheck_finds_the_server_from_the_listen_variable() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let env = BTreeMap::from([(
        "UMENG_GATEWAY_SERVER__LISTEN".to_owned(),
        format!("0.0.0.0:{port}"),
    )]);

    let healthcheck = || {
        let mut cmd = gateway(&env);
        cmd.current_dir(dir.path()).arg("healthcheck");
        run(cmd)
    };
    let down = healthcheck();
    assert!(!down.status.success(), "no server yet: {}", describe(&down));

    // Demo mode with SQLite under ./data, as the image runs with no configuration.
    let mut serve = gateway(&env);
    serve
        .current_dir(dir.path())
        .arg("serve")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = serve.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let result = loop {
        let out = healthcheck();
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("serve exited early: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(result.status.success(), "{}", describe(&result));
    assert!(
        dir.path().join("data/umeng-push-gateway.db").exists(),
        "SQLite under ./data"
    );
}
