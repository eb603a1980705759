//! The gateway instance's presence: it beats on its subject at a fixed period, and every
//! request it submits names it, so workers can stop the requests of a gateway that died (its
//! clients' connections died with it).

use std::time::Duration;

use async_nats::Client;
use preble_protocol::{GatewayBeat, PROTOCOL_VERSION, Subjects, encode};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// A fresh gateway instance id.
pub fn new_gateway_id() -> String {
    format!("gw-{}", uuid::Uuid::new_v4().simple())
}

/// Beats every `period` until `stop` is cancelled.
pub async fn beat(
    client: Client,
    subjects: Subjects,
    gateway_id: String,
    period: Duration,
    stop: CancellationToken,
) {
    let subject = subjects.gateway_beat(&gateway_id);
    let message = GatewayBeat {
        v: PROTOCOL_VERSION,
        gateway_id,
        period_ms: period.as_millis() as u64,
    };
    let payload: bytes::Bytes = encode(&message).into();
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = client.publish(subject.clone(), payload.clone()).await {
            warn!(error = %e, "could not publish the gateway's beat");
        }
    }
}
