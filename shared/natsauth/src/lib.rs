//! NATS users and permissions of one preble deployment: renders the `nats-server`
//! configuration that gives every role ([`preble_protocol::roles`]) its own user with exactly
//! its permissions, and writes each role's credentials as an environment file the service
//! reads (`PREBLE_NATS_USER`, `PREBLE_NATS_PASSWORD`).
//!
//! Passwords are random (244 bits) and only their bcrypt hashes go into the server
//! configuration, so the configuration can be shared; the credential files are the secrets
//! (mode 0600) and never belong in a repository.
//!
//! Layout: [`Deployment`] (who exists), [`Deployment::generate`] (passwords and hashes),
//! [`Generated::server_config`] (the configuration text), [`Generated::write`] (the files).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use preble_protocol::Subjects;
use preble_protocol::roles::{Permissions, Role};
use preble_protocol::subjects::valid_worker_id;

/// Who exists in a deployment, and where its NATS server listens and stores.
#[derive(Clone, Debug)]
pub struct Deployment {
    /// The deployment's subject prefix.
    pub subjects: Subjects,
    /// The worker ids (each gets its own identity).
    pub workers: Vec<String>,
    /// `host:port` the server listens on.
    pub listen: String,
    /// The JetStream store directory.
    pub store_dir: PathBuf,
    /// bcrypt cost of the password hashes (4..=31).
    pub bcrypt_cost: u32,
    /// The server's TLS certificate and key (PEM): with them, clients must use TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// One role's credentials.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The role.
    pub role: Role,
    /// Its password (secret).
    pub password: String,
    /// The bcrypt hash of the password (for the server).
    pub hash: String,
}

/// A deployment with generated credentials.
#[derive(Clone, Debug)]
pub struct Generated {
    /// What was generated for.
    pub deployment: Deployment,
    /// Every role's credentials: gateway, scheduler, client, then the workers.
    pub credentials: Vec<Credentials>,
}

impl Deployment {
    /// Every role of the deployment.
    pub fn roles(&self) -> Vec<Role> {
        let mut roles = vec![Role::Gateway, Role::Scheduler, Role::Client];
        roles.extend(self.workers.iter().cloned().map(Role::Worker));
        roles
    }

    /// Generates a random password for every role.
    pub fn generate(self) -> Result<Generated> {
        if let Some(bad) = self.workers.iter().find(|w| !valid_worker_id(w)) {
            bail!(
                "{bad:?} cannot name a worker (letters, digits, '-' and '_', not starting with '_')"
            );
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = self.workers.iter().find(|w| !seen.insert(*w)) {
            bail!("worker {dup:?} is named twice");
        }
        let credentials = self
            .roles()
            .into_iter()
            .map(|role| {
                let password = format!(
                    "{}{}",
                    uuid::Uuid::new_v4().simple(),
                    uuid::Uuid::new_v4().simple()
                );
                let hash =
                    bcrypt::hash(&password, self.bcrypt_cost).context("hashing a password")?;
                Ok(Credentials {
                    role,
                    password,
                    hash,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Generated {
            deployment: self,
            credentials,
        })
    }
}

/// A quoted string in the NATS configuration format (JSON-compatible escaping).
fn quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quoted(s)).collect();
    format!("[{}]", quoted.join(", "))
}

fn permissions_block(p: &Permissions) -> String {
    let mut block = format!(
        "publish: {{ allow: {} }}, subscribe: {{ allow: {} }}",
        list(&p.publish),
        list(&p.subscribe)
    );
    if p.answers_requests {
        // Any number of answers per request (digests come in parts), for a minute.
        block.push_str(", allow_responses: { max: -1, expires: \"1m\" }");
    }
    block
}

/// The environment file of one role's credentials.
pub fn env_file(credentials: &Credentials) -> String {
    format!(
        "PREBLE_NATS_USER={}\nPREBLE_NATS_PASSWORD={}\n",
        credentials.role.user(),
        credentials.password
    )
}

/// The file name of a role's credentials.
pub fn env_file_name(role: &Role) -> String {
    match role {
        Role::Gateway => "gateway.env".into(),
        Role::Scheduler => "scheduler.env".into(),
        Role::Client => "client.env".into(),
        Role::Worker(id) => format!("worker-{id}.env"),
    }
}

impl Generated {
    /// The `nats-server` configuration: listen address, JetStream store, and one user per
    /// role with its permissions. Anonymous clients are refused (there is no default user).
    pub fn server_config(&self) -> String {
        let d = &self.deployment;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Generated by preble-nats-auth for the deployment {:?}: one user per role,\n\
             # each allowed only its own subjects. Passwords are bcrypt hashes.",
            d.subjects.prefix()
        );
        let _ = writeln!(out, "listen: {}", quoted(&d.listen));
        let _ = writeln!(
            out,
            "jetstream {{ store_dir: {} }}",
            quoted(&d.store_dir.to_string_lossy())
        );
        if let Some((cert, key)) = &d.tls {
            let _ = writeln!(
                out,
                "tls {{ cert_file: {}, key_file: {}, timeout: 2 }}",
                quoted(&cert.to_string_lossy()),
                quoted(&key.to_string_lossy())
            );
        }
        let _ = writeln!(out, "authorization {{\n  users = [");
        for c in &self.credentials {
            let p = c.role.permissions(&d.subjects);
            let _ = writeln!(
                out,
                "    {{ user: {}, password: {}, permissions: {{ {} }} }}",
                quoted(&c.role.user()),
                quoted(&c.hash),
                permissions_block(&p)
            );
        }
        let _ = writeln!(out, "  ]\n}}");
        out
    }

    /// Writes `nats.conf` and one credentials file per role (mode 0600) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_file(&dir.join("nats.conf"), &self.server_config(), 0o644)?;
        for c in &self.credentials {
            write_file(&dir.join(env_file_name(&c.role)), &env_file(c), 0o600)?;
        }
        Ok(())
    }
}

fn write_file(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // An existing file keeps its mode through `open`: set it explicitly.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(workers: &[&str]) -> Deployment {
        Deployment {
            subjects: Subjects::new("t.preble.v2"),
            workers: workers.iter().map(|w| w.to_string()).collect(),
            listen: "127.0.0.1:4223".into(),
            store_dir: "/tmp/x".into(),
            bcrypt_cost: 4,
            tls: None,
        }
    }

    #[test]
    fn every_role_gets_a_user_with_a_hashed_password() {
        let g = deployment(&["gpu-0", "gpu-1"]).generate().unwrap();
        assert_eq!(g.credentials.len(), 5);
        let config = g.server_config();
        for c in &g.credentials {
            assert!(config.contains(&quoted(&c.role.user())));
            assert!(
                !config.contains(&c.password),
                "no plain password in the config"
            );
            assert!(bcrypt::verify(&c.password, &c.hash).unwrap());
        }
        assert!(config.contains("\"t.preble.v2.events.gpu-1\""));
        assert_eq!(config.matches("allow_responses").count(), 2);
    }

    #[test]
    fn bad_worker_ids_are_refused() {
        assert!(deployment(&["_scheduler"]).generate().is_err());
        assert!(deployment(&["a.b"]).generate().is_err());
        assert!(deployment(&["a", "a"]).generate().is_err());
    }

    #[test]
    fn credential_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let g = deployment(&["gpu-0"]).generate().unwrap();
        g.write(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("worker-gpu-0.env"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let env = std::fs::read_to_string(dir.path().join("gateway.env")).unwrap();
        assert!(env.starts_with("PREBLE_NATS_USER=preble-gateway\n"));
    }
}
