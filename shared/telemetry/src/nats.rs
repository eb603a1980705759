//! How a service connects to NATS: the flags every service shares (URL, credentials, TLS),
//! validated once, and the connection. A service authenticates with its own identity; an
//! unauthenticated connection needs the explicit `--nats-no-auth` and logs a warning.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use tracing::warn;

/// NATS connection flags, shared by every service (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Debug)]
pub struct NatsArgs {
    /// NATS server URL (`tls://` requires TLS).
    #[arg(long, env = "PREBLE_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// NATS user of this service (with `--nats-password`; `preble-nats-auth` generates both).
    #[arg(long, env = "PREBLE_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password of this service.
    #[arg(long, env = "PREBLE_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// A NATS credentials file (JWT and nkey seed), instead of a user and password.
    #[arg(long, env = "PREBLE_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with; implies TLS.
    #[arg(long, env = "PREBLE_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for TLS client authentication (with `--nats-tls-key`).
    #[arg(long, env = "PREBLE_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// Key of the client certificate (PEM).
    #[arg(long, env = "PREBLE_NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// Connect without credentials: any client of the server can then act as any part of the
    /// system. For local experiments only.
    #[arg(long, env = "PREBLE_NATS_NO_AUTH", default_value_t = false)]
    pub nats_no_auth: bool,
}

/// How this service proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatsAuth {
    /// No credentials (`--nats-no-auth`).
    None,
    /// A user and password.
    Password {
        /// The user.
        user: String,
        /// The password.
        password: String,
    },
    /// A credentials file.
    Creds(PathBuf),
}

/// Validated NATS connection settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsConfig {
    /// Server URL.
    pub url: String,
    /// Credentials.
    pub auth: NatsAuth,
    /// CA certificate to trust.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key.
    pub tls_client: Option<(PathBuf, PathBuf)>,
}

impl NatsArgs {
    /// Validates the flags: exactly one way to authenticate (or the explicit opt-out).
    pub fn config(&self) -> Result<NatsConfig> {
        let auth = match (
            &self.nats_user,
            &self.nats_password,
            &self.nats_creds,
            self.nats_no_auth,
        ) {
            (None, None, None, true) => NatsAuth::None,
            (Some(user), Some(password), None, false) => NatsAuth::Password {
                user: user.clone(),
                password: password.clone(),
            },
            (None, None, Some(creds), false) => NatsAuth::Creds(creds.clone()),
            (None, None, None, false) => bail!(
                "NATS credentials are required: --nats-user and --nats-password (or \
                 PREBLE_NATS_USER/PREBLE_NATS_PASSWORD; `preble-nats-auth` generates them), or \
                 --nats-creds; --nats-no-auth connects without, for local experiments only"
            ),
            (Some(_), None, None, false) | (None, Some(_), None, false) => {
                bail!("--nats-user and --nats-password go together")
            }
            _ => {
                bail!("choose one of --nats-user/--nats-password, --nats-creds and --nats-no-auth")
            }
        };
        let tls_client = match (&self.nats_tls_cert, &self.nats_tls_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => bail!("--nats-tls-cert and --nats-tls-key go together"),
        };
        Ok(NatsConfig {
            url: self.nats_url.clone(),
            auth,
            tls_ca: self.nats_tls_ca.clone(),
            tls_client,
        })
    }
}

/// Connects to NATS as `service`, with replies under `inbox_prefix` (the prefix the server
/// lets this identity read; ignored without credentials); the error says where it tried.
pub async fn connect(
    config: &NatsConfig,
    service: &str,
    inbox_prefix: &str,
) -> Result<async_nats::Client> {
    let mut options = match &config.auth {
        NatsAuth::None => {
            warn!(
                url = %config.url,
                "connecting to NATS without authentication (--nats-no-auth): any client of \
                 the server can act as any part of the system"
            );
            async_nats::ConnectOptions::new()
        }
        NatsAuth::Password { user, password } => {
            async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
                .custom_inbox_prefix(inbox_prefix)
        }
        NatsAuth::Creds(path) => async_nats::ConnectOptions::with_credentials_file(path.clone())
            .await
            .with_context(|| format!("reading NATS credentials {}", path.display()))?
            .custom_inbox_prefix(inbox_prefix),
    };
    options = options.name(service);
    if let Some(ca) = &config.tls_ca {
        options = options.require_tls(true).add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls_client {
        options = options
            .require_tls(true)
            .add_client_certificate(cert.clone(), key.clone());
    }
    options
        .connect(config.url.as_str())
        .await
        .with_context(|| format!("connecting to NATS at {}", config.url))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        nats: NatsArgs,
    }

    fn parse(args: &[&str]) -> Result<NatsConfig> {
        let mut argv = vec!["x"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv)?.nats.config()
    }

    #[test]
    fn credentials_are_required_unless_explicitly_waived() {
        let e = parse(&[]).unwrap_err().to_string();
        assert!(e.contains("credentials are required"), "{e}");
        assert_eq!(parse(&["--nats-no-auth"]).unwrap().auth, NatsAuth::None);
        let c = parse(&["--nats-user", "u", "--nats-password", "p"]).unwrap();
        assert_eq!(
            c.auth,
            NatsAuth::Password {
                user: "u".into(),
                password: "p".into()
            }
        );
        assert!(parse(&["--nats-user", "u"]).is_err());
        assert!(parse(&["--nats-user", "u", "--nats-password", "p", "--nats-no-auth"]).is_err());
        assert!(parse(&["--nats-creds", "f", "--nats-no-auth"]).is_err());
        assert!(parse(&["--nats-no-auth", "--nats-tls-cert", "c"]).is_err());
    }
}
