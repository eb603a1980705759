//! End to end: several gateways on one subject prefix. The NATS API subject is a queue group,
//! so each API request is answered by exactly one gateway, and both gateways serve HTTP.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use preble_protocol::{ApiEvent, ApiEventBody, ApiRequest, Subjects, decode, encode};
use preble_tests::{NATS_URL, Options, TestCluster};
use serde_json::json;

#[tokio::test]
async fn two_gateways_answer_each_request_once() {
    let mut c = TestCluster::start(Options::default()).await.unwrap();
    let second_url = c.start_gateway().await.unwrap();
    for gateway in [&c.gateway, &second_url] {
        let (status, body) = post(
            gateway,
            "/v1/completions",
            &json!({"model": c.model, "prompt": "either door", "max_tokens": 3}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }

    let client = async_nats::connect(NATS_URL).await.unwrap();
    let subjects = Subjects::new(&c.prefix);
    for i in 0..5 {
        let inbox = client.new_inbox();
        let mut events = client.subscribe(inbox.clone()).await.unwrap();
        let mut request = ApiRequest::completion(&c.model, format!("once {i}"));
        request.max_tokens = Some(4);
        client
            .publish_with_reply(subjects.api_generate(), inbox, encode(&request).into())
            .await
            .unwrap();
        let mut seqs = Vec::new();
        let mut ends = 0;
        // Everything that arrives within a second: exactly one answer, numbered once.
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(1), events.next()).await
        {
            let event: ApiEvent = decode(&message.payload).unwrap();
            seqs.push(event.seq);
            if matches!(
                event.body,
                ApiEventBody::Done { .. } | ApiEventBody::Error { .. }
            ) {
                ends += 1;
            }
        }
        assert_eq!(ends, 1, "request {i}: {seqs:?}");
        let expected: Vec<u64> = (0..seqs.len() as u64).collect();
        assert_eq!(seqs, expected, "request {i}: every event once, in order");
    }
}
