//! Any HTTP body for `/v1/completions` or `/v1/chat/completions`, and any NATS API request:
//! parsed and validated (parameters, conversation) into a clear error or a request, never a
//! panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use preble_gateway::openai::{
    ChatRequest, CompletionRequest, SamplingDefaults, parse_request,
};
use preble_gateway::prepare::ClientRequest;

fuzz_target!(|data: &[u8]| {
    let defaults = SamplingDefaults::default();
    if let Ok(request) = parse_request::<CompletionRequest>(data) {
        let _ = request.params.validate(16, &defaults);
    }
    if let Ok(request) = parse_request::<ChatRequest>(data) {
        let _ = request.params.validate(16, &defaults);
        let _ = request.conversation();
    }
    if let Ok(request) = preble_protocol::decode::<preble_protocol::ApiRequest>(data)
        && let Ok(ClientRequest::Chat(chat)) = ClientRequest::from_api(request)
    {
        let _ = chat.conversation();
    }
});
