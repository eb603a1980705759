//! Harness for the end-to-end tests: starts the real service binaries against the real NATS on
//! 127.0.0.1:4222, each cluster under its own subject prefix and ports so tests run in
//! parallel, and stops them when dropped.
//!
//! The binaries must be built first (`make test` does: `cargo build --workspace --bins`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod faults;

/// NATS URL the tests use.
pub const NATS_URL: &str = "nats://127.0.0.1:4222";

/// Path of a workspace binary; panics with a clear message when it is not built.
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let path = target.join(profile).join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`; `make test` does)",
        path.display()
    );
    path
}

/// The project's tiny Llama (`PREBLE_TINY_MODEL_DIR`, default `models/tiny-llama`); panics with
/// what to run when it has not been made.
pub fn tiny_model_dir() -> PathBuf {
    let dir = std::env::var_os("PREBLE_TINY_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-llama"));
    assert!(
        dir.join("model.safetensors").exists(),
        "{} has no tiny model: run `make tiny-model` (make test-torch does)",
        dir.display()
    );
    dir
}

/// A virtualenv with the `openai` package, created on first use (needs `python3 -m venv` and
/// access to PyPI; fails loudly without them).
pub fn openai_python() -> PathBuf {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/openai-venv");
    let python = venv.join("bin/python");
    let ready = Command::new(&python)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    if !ready {
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 runs");
        assert!(
            made.success(),
            "python3 -m venv {venv:?} failed (apt-get install python3-venv)"
        );
        let installed = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .status()
            .expect("pip runs");
        assert!(installed.success(), "pip install openai failed");
    }
    python
}

/// A cluster of `workers` torch workers serving `model_dir` (16,384 KV slots each).
pub fn torch_options(workers: usize, model_dir: PathBuf) -> Options {
    Options {
        workers,
        model_dir: Some(model_dir),
        worker_args: ["--engine", "torch", "--kv-capacity-tokens", "16384"]
            .map(String::from)
            .to_vec(),
        ..Options::default()
    }
}

/// The real model, SmolLM2-135M-Instruct (`PREBLE_REAL_MODEL_DIR`, default
/// `models/smollm2-135m-instruct`); panics with what to run when it has not been made.
pub fn real_model_dir() -> PathBuf {
    let dir = std::env::var_os("PREBLE_REAL_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/smollm2-135m-instruct")
        });
    assert!(
        dir.join("model.safetensors").exists(),
        "{} has no real model: run `make real-model` (make test-torch does)",
        dir.display()
    );
    dir
}

/// The PyTorch virtualenv the torch engine builds against (`PREBLE_TORCH_VENV`, default
/// `~/.cache/preble/torch-venv`, as `scripts/ensure-torch-venv.sh` makes it).
pub fn torch_venv() -> PathBuf {
    std::env::var_os("PREBLE_TORCH_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/preble/torch-venv")
        })
}

/// Makes, with openssl in `dir`, a CA (`ca.pem`) and a server certificate for 127.0.0.1 that it
/// signed (`server.pem`, key `server.key`), for tests of TLS connections.
pub fn make_test_certificates(dir: &std::path::Path) -> Result<()> {
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .current_dir(dir)
            .args(args)
            .output()
            .context("running openssl (scripts/ensure-test-tools.sh installs it)")?;
        if !out.status.success() {
            bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let key = ["-newkey", "rsa:2048", "-nodes", "-days", "2"];
    run(&[
        &["req", "-x509"][..],
        &key,
        &["-keyout", "ca.key", "-out", "ca.pem"],
        &["-subj", "/CN=preble-test-ca"],
    ]
    .concat())?;
    run(&[
        &["req"][..],
        &key[..3],
        &["-keyout", "server.key", "-out", "server.csr"],
        &["-subj", "/CN=127.0.0.1"],
    ]
    .concat())?;
    std::fs::write(
        dir.join("ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext",
    ])
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something listens on `port` on loopback (a server starting); panics after 10 s.
pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A `redis-server` of a test's own on `port` (no persistence to disk); stopped when dropped.
pub struct RedisServer {
    /// Its port.
    pub port: u16,
    child: Child,
}

impl RedisServer {
    /// Starts it and waits until it listens.
    pub fn start(port: u16) -> RedisServer {
        let child = Self::spawn(port);
        RedisServer { port, child }
    }

    fn spawn(port: u16) -> Child {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (scripts/ensure-services.sh installs it)");
        wait_for_port(port);
        child
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills it (everything it held is gone).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills it, waits `down`, and starts an empty one on the same port.
    pub async fn restart(&mut self, down: Duration) {
        self.stop();
        tokio::time::sleep(down).await;
        let port = self.port;
        self.child = tokio::task::spawn_blocking(move || Self::spawn(port))
            .await
            .expect("redis-server starts");
    }

    /// Length of the value at `key` (0 when absent).
    pub fn strlen(&self, key: &str) -> u64 {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "STRLEN", key])
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How to start a test cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Simulated workers.
    pub workers: usize,
    /// Whether to start a scheduler.
    pub scheduler: bool,
    /// Sim time multiplier.
    pub time_scale: f64,
    /// Extra gateway environment variables.
    pub gateway_env: Vec<(String, String)>,
    /// Extra scheduler flags.
    pub scheduler_args: Vec<String>,
    /// Extra flags for every worker.
    pub worker_args: Vec<String>,
    /// Model directory to serve; default: a fresh sim model directory.
    pub model_dir: Option<PathBuf>,
    /// Environment variables for every service (gateway, scheduler and workers).
    pub env: Vec<(String, String)>,
    /// Run on a NATS server of the cluster's own, started with the deployment's generated
    /// users and permissions (`preble-nats-auth`), every service with its own identity;
    /// otherwise on the shared server at [`NATS_URL`], without authentication.
    pub auth: bool,
    /// With `auth`: the server also requires TLS (certificates from
    /// [`make_test_certificates`]), and every service connects with `tls://` and the CA.
    pub nats_tls: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workers: 2,
            scheduler: true,
            time_scale: 0.05,
            gateway_env: Vec::new(),
            scheduler_args: Vec::new(),
            worker_args: Vec::new(),
            model_dir: None,
            env: Vec::new(),
            auth: false,
            nats_tls: false,
        }
    }
}

/// A running worker process.
pub struct Worker {
    /// Its id.
    pub id: String,
    /// Its `/metrics` URL.
    pub metrics_url: String,
    child: Child,
}

impl Worker {
    /// Kills the process at once (no drain), like a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running cluster: gateway, optional scheduler, sim workers.
pub struct TestCluster {
    /// Subject prefix.
    pub prefix: String,
    /// Gateway base URL (`http://127.0.0.1:PORT`).
    pub gateway: String,
    /// Scheduler `/metrics` URL.
    pub scheduler_metrics: String,
    /// Workers.
    pub workers: Vec<Worker>,
    /// Model name.
    pub model: String,
    children: Vec<Child>,
    scheduler: Option<Child>,
    scheduler_args: Vec<String>,
    env: Vec<(String, String)>,
    scheduler_starts: usize,
    gateway_args: Vec<String>,
    gateway_env: Vec<(String, String)>,
    more_gateways: Vec<Child>,
    /// The NATS server the cluster uses.
    pub nats_url: String,
    /// With `auth`: the cluster's own NATS server (users, permissions, credential files).
    pub nats: Option<NatsServer>,
    /// Where logs and the model live.
    pub dir: tempfile::TempDir,
}

/// A NATS server of a test's own, configured with a deployment's generated users and
/// permissions; stopped when dropped.
pub struct NatsServer {
    /// Its URL.
    pub url: String,
    /// With TLS: the CA that signed the server's certificate.
    pub tls_ca: Option<PathBuf>,
    /// Where `nats.conf` and the credential files are.
    pub auth_dir: PathBuf,
    port: u16,
    log: PathBuf,
    child: Child,
}

impl NatsServer {
    /// Generates the users of a deployment (`prefix`, `workers`) under `dir` and starts a
    /// server with them on a free port (JetStream stored under `dir` too).
    /// With `tls`, the server requires TLS.
    pub async fn start(
        dir: &std::path::Path,
        prefix: &str,
        workers: &[String],
        tls: bool,
    ) -> Result<Self> {
        let port = free_port();
        let auth_dir = dir.join("nats");
        let mut generate = Command::new(binary("preble-nats-auth"));
        if tls {
            let certs = dir.join("certs");
            std::fs::create_dir_all(&certs)?;
            make_test_certificates(&certs)?;
            generate
                .arg("--tls-cert")
                .arg(certs.join("server.pem"))
                .arg("--tls-key")
                .arg(certs.join("server.key"));
        }
        let generated = generate
            .args(["--out"])
            .arg(&auth_dir)
            .args(["--subject-prefix", prefix, "--bcrypt-cost", "4"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--workers")
            .arg(workers.join(","))
            .output()
            .context("running preble-nats-auth")?;
        if !generated.status.success() {
            bail!(
                "preble-nats-auth failed: {}",
                String::from_utf8_lossy(&generated.stderr)
            );
        }
        let log = dir.join("nats-server.log");
        let child = Self::spawn(&auth_dir, &log, port).await?;
        let scheme = if tls { "tls" } else { "nats" };
        Ok(Self {
            url: format!("{scheme}://127.0.0.1:{port}"),
            tls_ca: tls.then(|| dir.join("certs").join("ca.pem")),
            auth_dir,
            port,
            log,
            child,
        })
    }

    /// Starts the server of `auth_dir`'s configuration and waits until it listens on `port`.
    async fn spawn(auth_dir: &std::path::Path, log: &std::path::Path, port: u16) -> Result<Child> {
        let server = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("nats-server is not installed (apt-get install nats-server)")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = Command::new(server)
            .arg("-c")
            .arg(auth_dir.join("nats.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .context("starting nats-server")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("nats-server did not listen on port {port}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(child)
    }

    /// Kills the server (SIGKILL), keeps it down for `down`, and starts it again with the same
    /// configuration and JetStream store.
    pub async fn restart(&mut self, down: Duration) -> Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        tokio::time::sleep(down).await;
        self.child = Self::spawn(&self.auth_dir, &self.log, self.port).await?;
        Ok(())
    }

    /// The environment of one identity's credentials file (`gateway.env`, `scheduler.env`,
    /// `client.env`, `worker-<id>.env`), plus the CA to trust with TLS.
    pub fn env_of(&self, file: &str) -> Result<Vec<(String, String)>> {
        let path = self.auth_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let mut env: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(ca) = &self.tls_ca {
            env.push(("PREBLE_NATS_TLS_CA".into(), ca.display().to_string()));
        }
        Ok(env)
    }

    /// The user and password of one identity.
    pub fn user_of(&self, file: &str) -> Result<(String, String)> {
        let env = self.env_of(file)?;
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .with_context(|| format!("{k} missing from {file}"))
        };
        Ok((get("PREBLE_NATS_USER")?, get("PREBLE_NATS_PASSWORD")?))
    }

    /// Connects as the identity of credentials file `file`, replies under its inbox prefix
    /// (over TLS, trusting the test CA, when the server requires it).
    pub async fn connect_as(&self, file: &str, inbox_prefix: &str) -> Result<async_nats::Client> {
        let (user, password) = self.user_of(file)?;
        let mut options = async_nats::ConnectOptions::with_user_and_password(user, password)
            .custom_inbox_prefix(inbox_prefix);
        if let Some(ca) = &self.tls_ca {
            options = options.require_tls(true).add_root_certificates(ca.clone());
        }
        Ok(options.connect(self.url.as_str()).await?)
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestCluster {
    /// Starts a cluster and waits until the gateway answers and every worker is registered.
    pub async fn start(options: Options) -> Result<TestCluster> {
        let dir = tempfile::tempdir()?;
        let model_dir = match &options.model_dir {
            Some(dir) => dir.clone(),
            None => {
                let model_dir = dir.path().join("preble-sim");
                preble_modelgen::write_sim_model(
                    &model_dir,
                    &preble_modelgen::SimModelOptions::default(),
                )?;
                model_dir
            }
        };
        let model = model_dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let prefix = format!("t{}.preble.v2", uuid::Uuid::new_v4().simple());
        let worker_ids: Vec<String> = (0..options.workers).map(|i| format!("gpu-{i}")).collect();
        let nats = if options.auth {
            Some(NatsServer::start(dir.path(), &prefix, &worker_ids, options.nats_tls).await?)
        } else {
            None
        };
        let nats_url = nats
            .as_ref()
            .map_or_else(|| NATS_URL.to_string(), |n| n.url.clone());
        // Each service's NATS identity: its generated credentials, or no authentication on
        // the shared server.
        let identity = |file: &str| -> Result<Vec<(String, String)>> {
            match &nats {
                Some(n) => n.env_of(file),
                None => Ok(vec![("PREBLE_NATS_NO_AUTH".into(), "true".into())]),
            }
        };
        let log = |name: &str| -> Result<Stdio> {
            Ok(Stdio::from(std::fs::File::create(
                dir.path().join(format!("{name}.log")),
            )?))
        };
        let mut children = Vec::new();
        let scheduler_port = free_port();
        let mut scheduler_args: Vec<String> = [
            "--nats-url",
            &nats_url,
            "--subject-prefix",
            &prefix,
            "--no-worker-wait-ms",
            "500",
            "--dispatch-timeout-ms",
            "500",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        scheduler_args.push("--http-addr".into());
        scheduler_args.push(format!("127.0.0.1:{scheduler_port}"));
        scheduler_args.extend(options.scheduler_args.iter().cloned());
        let mut scheduler_env = identity("scheduler.env")?;
        scheduler_env.extend(options.env.iter().cloned());
        let scheduler = if options.scheduler {
            Some(spawn_scheduler(
                &scheduler_args,
                &scheduler_env,
                dir.path(),
                0,
            )?)
        } else {
            None
        };
        let mut workers = Vec::new();
        for id in worker_ids {
            let port = free_port();
            let child = Command::new(binary("preble-worker"))
                .args([
                    "--nats-url",
                    &nats_url,
                    "--subject-prefix",
                    &prefix,
                    "--worker-id",
                    &id,
                ])
                .arg("--model-dir")
                .arg(&model_dir)
                .args(["--http-addr", &format!("127.0.0.1:{port}")])
                .args([
                    "--time-scale",
                    &options.time_scale.to_string(),
                    "--heartbeat-ms",
                    "100",
                ])
                .args(&options.worker_args)
                .envs(identity(&format!("worker-{id}.env"))?)
                .envs(options.env.iter().cloned())
                .stdout(Stdio::null())
                .stderr(log(&id)?)
                .spawn()
                .context("starting a worker")?;
            workers.push(Worker {
                id,
                metrics_url: format!("http://127.0.0.1:{port}/metrics"),
                child,
            });
        }
        let mut gateway_args: Vec<String> = ["--nats-url", &nats_url, "--subject-prefix", &prefix]
            .map(String::from)
            .to_vec();
        gateway_args.push("--model-dir".into());
        gateway_args.push(model_dir.to_string_lossy().into_owned());
        gateway_args.extend(["--stream-idle-timeout-s", "20"].map(String::from));
        let mut gateway_env = identity("gateway.env")?;
        gateway_env.extend(options.env.iter().chain(&options.gateway_env).cloned());
        let gateway_port = free_port();
        children.push(spawn_gateway(
            &gateway_args,
            &gateway_env,
            gateway_port,
            log("gateway")?,
        )?);
        let cluster = TestCluster {
            prefix,
            gateway: format!("http://127.0.0.1:{gateway_port}"),
            scheduler_metrics: format!("http://127.0.0.1:{scheduler_port}/metrics"),
            workers,
            model,
            children,
            scheduler,
            scheduler_args,
            env: scheduler_env,
            scheduler_starts: 1,
            gateway_args,
            gateway_env,
            more_gateways: Vec::new(),
            nats_url,
            nats,
            dir,
        };
        cluster
            .wait_ready(options.scheduler, options.workers)
            .await?;
        Ok(cluster)
    }

    async fn wait_ready(&self, scheduler: bool, workers: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let http = reqwest::Client::new();
        loop {
            let gateway_up = http
                .get(format!("{}/health", self.gateway))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            let workers_up = !scheduler
                || scrape(&self.scheduler_metrics, "preble:scheduler_live_workers")
                    .await
                    .is_ok_and(|n| n as usize == workers);
            let workers_http = futures::future::join_all(
                self.workers
                    .iter()
                    .map(|w| scrape(&w.metrics_url, "preble:iterations_total")),
            )
            .await
            .iter()
            .all(Result::is_ok);
            if gateway_up && workers_up && workers_http {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "cluster did not become ready; logs in {}:\n{}",
                    self.dir.path().display(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Every log of the cluster, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path()) {
            for e in entries.flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    // Backtrace frames would push the error they follow out of the tail.
                    let tail: String = text
                        .lines()
                        .filter(|l| !is_backtrace_frame(l))
                        .rev()
                        .take(30)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n");
                    out.push_str(&format!("--- {}\n{}\n", e.path().display(), tail));
                }
            }
        }
        out
    }

    /// Runs `tests/python/<script>` with the official `openai` client against the gateway
    /// (arguments: gateway URL, model) and returns the JSON object it prints; panics with the
    /// script's output and the services' logs when it fails.
    pub async fn run_openai_script(&self, script: &str) -> serde_json::Value {
        let python = tokio::task::spawn_blocking(openai_python)
            .await
            .expect("making the openai venv");
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("python")
            .join(script);
        let output = tokio::process::Command::new(python)
            .arg(&script)
            .arg(&self.gateway)
            .arg(&self.model)
            .output()
            .await
            .expect("running the openai client");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "openai client failed:\n{stdout}\n{}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.logs()
        );
        serde_json::from_str(stdout.trim()).expect("the client script prints one JSON object")
    }

    /// Process ids of the running services, by role (`gateway`, `scheduler`, worker ids).
    pub fn pids(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = self
            .children
            .iter()
            .chain(&self.more_gateways)
            .map(|c| ("gateway".to_string(), c.id()))
            .collect();
        if let Some(s) = &self.scheduler {
            out.push(("scheduler".to_string(), s.id()));
        }
        out.extend(self.workers.iter().map(|w| (w.id.clone(), w.child.id())));
        out
    }

    /// `metric` on each worker, in worker order; panics if a worker's metrics cannot be read.
    pub async fn worker_values(&self, metric: &str) -> Vec<f64> {
        let mut values = Vec::with_capacity(self.workers.len());
        for w in &self.workers {
            values.push(
                scrape(&w.metrics_url, metric)
                    .await
                    .unwrap_or_else(|e| panic!("{metric} on {}: {e}", w.metrics_url)),
            );
        }
        values
    }

    /// Sum of a metric over every worker.
    pub async fn worker_sum(&self, metric: &str) -> f64 {
        let mut total = 0.0;
        for w in &self.workers {
            total += scrape(&w.metrics_url, metric).await.unwrap_or(0.0);
        }
        total
    }
}

impl TestCluster {
    /// Kills the first gateway at once (SIGKILL: no drain, its clients' connections die with
    /// it); gateways from [`Self::start_gateway`] live on.
    pub fn kill_gateway(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts one more gateway on the cluster's prefix (logging to `gateway-N.log`) and waits
    /// until it answers; returns its base URL.
    pub async fn start_gateway(&mut self) -> Result<String> {
        let port = free_port();
        let name = format!("gateway-{}.log", self.more_gateways.len() + 2);
        let log = Stdio::from(std::fs::File::create(self.dir.path().join(name))?);
        let child = spawn_gateway(&self.gateway_args, &self.gateway_env, port, log)?;
        self.more_gateways.push(child);
        let url = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !reqwest::get(format!("{url}/health"))
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if Instant::now() > deadline {
                bail!("the extra gateway did not start:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(url)
    }

    /// Kills the scheduler at once (no drain), like a crash.
    pub fn kill_scheduler(&mut self) {
        if let Some(mut child) = self.scheduler.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a scheduler again with the same flags (logging to `scheduler-N.log`).
    pub fn start_scheduler(&mut self) -> Result<()> {
        self.kill_scheduler();
        let child = spawn_scheduler(
            &self.scheduler_args,
            &self.env,
            self.dir.path(),
            self.scheduler_starts,
        )?;
        self.scheduler_starts += 1;
        self.scheduler = Some(child);
        Ok(())
    }
}

fn spawn_gateway(
    args: &[String],
    env: &[(String, String)],
    port: u16,
    log: Stdio,
) -> Result<Child> {
    Command::new(binary("preble-gateway"))
        .args(args)
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting a gateway")
}

fn spawn_scheduler(
    args: &[String],
    env: &[(String, String)],
    dir: &std::path::Path,
    start: usize,
) -> Result<Child> {
    let name = if start == 0 {
        "scheduler.log".to_string()
    } else {
        format!("scheduler-{start}.log")
    };
    let log = std::fs::File::create(dir.join(name))?;
    Command::new(binary("preble-scheduler"))
        .args(args)
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .spawn()
        .context("starting the scheduler")
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.kill_scheduler();
        for w in &mut self.workers {
            w.kill();
        }
        for c in self.children.iter_mut().chain(&mut self.more_gateways) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads one sample (the sum over all label sets) of `metric` from a Prometheus endpoint.
pub async fn scrape(url: &str, metric: &str) -> Result<f64> {
    scrape_where(url, metric, "").await
}

/// Reads the sum of `metric` over the label sets whose text contains `labels` (for example
/// `kind="evicted"`; empty for all).
pub async fn scrape_where(url: &str, metric: &str, labels: &str) -> Result<f64> {
    let text = reqwest::get(url).await?.text().await?;
    let mut found = false;
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if &line[..name_end] == metric {
            found = true;
            let label_text = line[name_end..].split('}').next().unwrap_or("");
            if !label_text.contains(labels) {
                continue;
            }
            let value = line.rsplit(' ').next().unwrap_or("0");
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    if !found {
        // A labelled counter with no samples yet, or a missing metric: report zero only when
        // the metric family is declared.
        if text.contains(&format!("# TYPE {metric} ")) {
            return Ok(0.0);
        }
        bail!("metric {metric} not found at {url}");
    }
    Ok(total)
}

/// Whether a log line is a frame of a printed backtrace (`  12: name` or `   at file:line`).
fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("at ")
        || t.split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}
