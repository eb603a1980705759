//! Any bytes on any NATS subject: every message type decodes them or refuses them, never
//! panics, and what decodes encodes back to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use preble_protocol::{
    ApiEvent, ApiRequest, Cancel, DigestRequest, Dispatch, DispatchReply, GatewayBeat,
    GenerateRequest, Message, StreamMessage, WorkerEvent, decode, encode,
};

/// Bytes compared, not values: a float field may hold NaN, which equals nothing.
fn round_trip<T: Message>(data: &[u8]) {
    if let Ok(message) = decode::<T>(data) {
        let bytes = encode(&message);
        let again: T = decode(&bytes).expect("what decoded encodes and decodes again");
        assert_eq!(encode(&again), bytes);
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<GenerateRequest>(data);
    round_trip::<Dispatch>(data);
    round_trip::<DispatchReply>(data);
    round_trip::<StreamMessage>(data);
    round_trip::<Cancel>(data);
    round_trip::<WorkerEvent>(data);
    round_trip::<DigestRequest>(data);
    round_trip::<ApiRequest>(data);
    round_trip::<ApiEvent>(data);
    round_trip::<GatewayBeat>(data);
});
