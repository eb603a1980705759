//! Which gateways are alive: every gateway instance beats on its subject, and a request names
//! its gateway; when a gateway has missed [`MISSES`] beats, its requests have nobody to answer
//! and the engine loop stops them.
//!
//! A worker judges only while it is itself connected to NATS, and only after it has been
//! connected long enough to have heard every live gateway: a worker cut off from NATS hears no
//! beats, and that is not the gateways' death.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use async_nats::{Client, Subscriber, connection::State};
use futures::StreamExt;
use preble_protocol::{GatewayBeat, decode};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::engine_loop::Command;
use crate::metrics::Metrics;

/// Beats a gateway may miss before it is gone.
pub const MISSES: u32 = 3;

/// The period assumed for a gateway not heard from yet, and the bounds of announced periods.
const DEFAULT_PERIOD: Duration = Duration::from_secs(1);
const MIN_PERIOD: Duration = Duration::from_millis(50);
const MAX_PERIOD: Duration = Duration::from_secs(30);

/// How often the live set is sent to the engine loop.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// What is known of the gateways' beats.
#[derive(Debug, Default)]
pub struct Gateways {
    last: HashMap<String, (Instant, Duration)>,
}

impl Gateways {
    /// Records a beat heard at `now`.
    pub fn beat(&mut self, beat: &GatewayBeat, now: Instant) {
        let period = Duration::from_millis(beat.period_ms).clamp(MIN_PERIOD, MAX_PERIOD);
        self.last.insert(beat.gateway_id.clone(), (now, period));
    }

    /// The gateways that have not missed [`MISSES`] beats at `now`; forgets the others.
    pub fn live(&mut self, now: Instant) -> HashSet<String> {
        self.last
            .retain(|_, (at, period)| now.duration_since(*at) <= period.saturating_mul(MISSES));
        self.last.keys().cloned().collect()
    }

    /// How long after connecting a worker must listen before it can judge: long enough to
    /// hear every live gateway at least once within its allowance.
    pub fn listen_first(&self) -> Duration {
        self.last
            .values()
            .map(|(_, period)| *period)
            .max()
            .unwrap_or(DEFAULT_PERIOD)
            .max(DEFAULT_PERIOD)
            .saturating_mul(MISSES)
    }
}

/// Listens to the gateways' beats and tells the engine loop which are alive, until `stop`.
pub async fn watch_gateways(
    client: Client,
    mut beats: Subscriber,
    commands: mpsc::UnboundedSender<Command>,
    metrics: Metrics,
    stop: CancellationToken,
) {
    let mut gateways = Gateways::default();
    let mut connected_since = Some(Instant::now());
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            message = beats.next() => {
                let Some(message) = message else { return };
                match decode::<GatewayBeat>(&message.payload) {
                    Ok(beat) => gateways.beat(&beat, Instant::now()),
                    Err(e) => {
                        metrics.malformed_messages.inc();
                        debug!(error = %e, "malformed gateway beat");
                    }
                }
            }
            _ = check.tick() => {
                let now = Instant::now();
                if client.connection_state() != State::Connected {
                    connected_since = None;
                    continue;
                }
                let since = *connected_since.get_or_insert(now);
                let wait = gateways.listen_first();
                if now.duration_since(since) < wait {
                    continue;
                }
                let live = gateways.live(now);
                let accepted_before = now.checked_sub(wait).unwrap_or(since);
                if commands.send(Command::LiveGateways { live, accepted_before }).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(id: &str, period_ms: u64) -> GatewayBeat {
        GatewayBeat {
            v: preble_protocol::PROTOCOL_VERSION,
            gateway_id: id.into(),
            period_ms,
        }
    }

    #[test]
    fn a_gateway_is_gone_after_missing_three_beats() {
        let mut g = Gateways::default();
        let t0 = Instant::now();
        g.beat(&beat("a", 100), t0);
        g.beat(&beat("b", 1000), t0);
        let live = g.live(t0 + Duration::from_millis(250));
        assert!(live.contains("a") && live.contains("b"));
        let live = g.live(t0 + Duration::from_millis(400));
        assert!(!live.contains("a") && live.contains("b"));
        assert_eq!(g.listen_first(), Duration::from_secs(3));
        // An absurd period is bounded.
        g.beat(&beat("c", u64::MAX), t0);
        assert_eq!(g.listen_first(), MAX_PERIOD * MISSES);
    }
}
