//! Static checks of `compose.yaml` and `docker/` (no container engine here): `docker-compose
//! config` accepts the file, every built service has its Dockerfile, runs a workspace binary,
//! sets only environment variables that binary reads, and publishes, exposes and health-checks
//! the port the binary listens on; Prometheus scrapes those ports.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `compose.yaml` as `docker-compose config` resolves it (anchors and merges applied), with
/// the NATS users and credentials `make nats-auth` would write generated into `auth_dir`.
fn resolved_compose(auth_dir: &Path) -> Yaml {
    let generated = Command::new(preble_tests::binary("preble-nats-auth"))
        .arg("--out")
        .arg(auth_dir)
        .args([
            "--listen",
            "0.0.0.0:4222",
            "--store-dir",
            "/data",
            "--bcrypt-cost",
            "4",
        ])
        .args(["--workers", "gpu-0,gpu-1,gpu-2,gpu-3,cuda-0"])
        .output()
        .expect("preble-nats-auth runs");
    assert!(generated.status.success(), "{generated:?}");
    let output = Command::new("docker-compose")
        .current_dir(repo())
        .env("PREBLE_NATS_AUTH_DIR", auth_dir)
        .args(["-f", "compose.yaml", "config"])
        .output()
        .expect("docker-compose runs (apt-get install docker-compose; make test installs it)");
    assert!(
        output.status.success(),
        "docker-compose config rejects compose.yaml:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    YamlLoader::load_from_str(&text).unwrap().remove(0)
}

/// What a Dockerfile's final stage declares.
#[derive(Debug, Default)]
struct Dockerfile {
    entrypoint: String,
    env: BTreeMap<String, String>,
    exposed: BTreeSet<u16>,
    healthcheck: String,
}

fn read_dockerfile(path: &Path) -> Dockerfile {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let joined = text.replace("\\\n", " ");
    let mut d = Dockerfile::default();
    for line in joined.lines().map(str::trim) {
        if line.starts_with("FROM ") {
            d = Dockerfile::default();
        } else if let Some(rest) = line.strip_prefix("ENTRYPOINT ") {
            d.entrypoint = rest
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .next()
                .unwrap()
                .trim()
                .trim_matches('"')
                .to_string();
        } else if let Some(rest) = line.strip_prefix("ENV ") {
            for pair in rest.split_whitespace() {
                let (k, v) = pair.split_once('=').expect("ENV KEY=VALUE");
                d.env.insert(k.to_string(), v.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("EXPOSE ") {
            d.exposed
                .extend(rest.split_whitespace().map(|p| p.parse::<u16>().unwrap()));
        } else if let Some(rest) = line.strip_prefix("HEALTHCHECK ") {
            d.healthcheck = rest.to_string();
        }
    }
    d
}

/// The environment variables a binary reads, from its `--help` (clap lists `[env: NAME=...]`).
fn env_vars_read_by(binary: &Path) -> BTreeSet<String> {
    let output = Command::new(binary).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    // `[env: NAME=value]`, or `[env: NAME]` for a variable whose value is hidden (a secret).
    help.split("[env: ")
        .skip(1)
        .map(|rest| rest.split(['=', ']']).next().unwrap().to_string())
        .collect()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn compose_services_match_their_dockerfiles_and_binaries() {
    let auth = tempfile::tempdir().unwrap();
    let compose = resolved_compose(auth.path());
    let services = compose["services"].as_hash().expect("services");
    let mut http_ports: BTreeMap<String, u16> = BTreeMap::new();
    let mut built = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap();
        let Some(dockerfile) = service["build"]["dockerfile"].as_str() else {
            continue;
        };
        built += 1;
        let d = read_dockerfile(&repo().join(dockerfile));
        let binary_name = Path::new(&d.entrypoint)
            .file_name()
            .unwrap_or_else(|| panic!("{name}: {dockerfile} has no ENTRYPOINT"))
            .to_string_lossy()
            .into_owned();
        let binary = preble_tests::binary(&binary_name);
        assert!(
            binary.exists(),
            "{name} runs {binary_name}, which the workspace does not build ({binary:?})"
        );
        let reads = env_vars_read_by(&binary);
        let mut env = d.env.clone();
        if let Some(vars) = service["environment"].as_hash() {
            for (k, v) in vars {
                let value = match v {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("{name}: environment value {other:?}"),
                };
                env.insert(k.as_str().unwrap().to_string(), value);
            }
        }
        for key in env.keys() {
            // Every binary installs preble-telemetry's tracing, which reads these.
            let telemetry = preble_telemetry::otlp::ENV_VARS.contains(&key.as_str());
            assert!(
                reads.contains(key) || telemetry,
                "{name} sets {key}, which {binary_name} does not read (it reads {reads:?})"
            );
        }
        // Every service connects to NATS as its own user (from its credentials file).
        let user = env
            .get("PREBLE_NATS_USER")
            .unwrap_or_else(|| panic!("{name} has no NATS identity"));
        let expected_user = match name {
            "gateway" | "scheduler" => format!("preble-{name}"),
            _ => format!(
                "preble-worker-{}",
                env.get("PREBLE_WORKER_ID").map_or("?", String::as_str)
            ),
        };
        assert_eq!(user, &expected_user, "{name}'s NATS user");
        assert!(
            env.contains_key("PREBLE_NATS_PASSWORD"),
            "{name}: no password"
        );
        assert!(
            !env.contains_key("PREBLE_NATS_NO_AUTH"),
            "{name} skips authentication"
        );
        let listen = port_of(
            env.get("PREBLE_HTTP_ADDR")
                .unwrap_or_else(|| panic!("{name}: no PREBLE_HTTP_ADDR")),
        );
        assert!(
            env["PREBLE_HTTP_ADDR"].starts_with("0.0.0.0:"),
            "{name} must listen on all interfaces inside its container"
        );
        assert!(
            d.exposed.contains(&listen),
            "{name}: EXPOSE {:?} vs {listen}",
            d.exposed
        );
        assert!(
            d.healthcheck.contains(&format!(":{listen}/health")),
            "{name}: healthcheck {:?} does not probe port {listen}",
            d.healthcheck
        );
        for port in service["ports"].as_vec().into_iter().flatten() {
            let spec = match port {
                Yaml::String(s) => s.clone(),
                Yaml::Hash(_) => port["target"].as_i64().unwrap().to_string(),
                other => panic!("{name}: port {other:?}"),
            };
            let target: u16 = spec
                .split('/')
                .next()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(
                target, listen,
                "{name} publishes {spec} but listens on {listen}"
            );
        }
        http_ports.insert(name.to_string(), listen);
    }
    assert!(
        built >= 7,
        "gateway, scheduler, 4 sim workers and the gpu profile's torch worker are built: {built}"
    );
    let gpu = &compose["services"]["worker-gpu-0"];
    assert_eq!(gpu["profiles"][0].as_str(), Some("gpu"));
    assert_eq!(gpu["environment"]["PREBLE_ENGINE"].as_str(), Some("torch"));
    assert_eq!(
        gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"].as_str(),
        Some("nvidia"),
        "the torch worker asks for an NVIDIA device"
    );
    for needed in [
        "nats",
        "redis",
        "jaeger",
        "prometheus",
        "gateway",
        "scheduler",
    ] {
        assert!(
            services.contains_key(&Yaml::String(needed.into())),
            "compose has {needed}"
        );
    }

    // NATS runs with the generated users and permissions.
    let nats = &compose["services"]["nats"];
    let command: Vec<&str> = nats["command"]
        .as_vec()
        .expect("nats command")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        command
            .windows(2)
            .any(|w| w == ["-c", "/etc/nats/nats.conf"]),
        "{command:?}"
    );
    let mounts: Vec<&str> = nats["volumes"]
        .as_vec()
        .expect("nats volumes")
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        mounts
            .iter()
            .any(|m| m.ends_with("nats.conf:/etc/nats/nats.conf:ro")),
        "{mounts:?}"
    );
    let config = std::fs::read_to_string(auth.path().join("nats.conf")).unwrap();
    assert!(config.contains("authorization") && config.contains("store_dir: \"/data\""));

    // Prometheus scrapes every preble service on the port it listens on.
    let text = std::fs::read_to_string(repo().join("docker/prometheus.yml")).unwrap();
    let prometheus = YamlLoader::load_from_str(&text).unwrap().remove(0);
    let mut scraped = BTreeSet::new();
    for job in prometheus["scrape_configs"].as_vec().unwrap() {
        for target in job["static_configs"][0]["targets"].as_vec().unwrap() {
            let (host, port) = target.as_str().unwrap().split_once(':').unwrap();
            assert_eq!(
                http_ports.get(host),
                Some(&port.parse().unwrap()),
                "prometheus scrapes {host}:{port}"
            );
            scraped.insert(host.to_string());
        }
    }
    let every: BTreeSet<String> = http_ports.keys().cloned().collect();
    assert_eq!(scraped, every, "every preble service is scraped");
}
