//! Error codes a client can see, and how they map to HTTP and the OpenAI error body.

use serde::{Deserialize, Serialize};

/// Every failure a client can observe has one of these codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or a parameter is out of range.
    InvalidRequest,
    /// The API key is missing or unknown.
    InvalidApiKey,
    /// No served model has that name.
    ModelNotFound,
    /// Prompt plus requested output does not fit the model's context.
    ContextLengthExceeded,
    /// No worker could take the request in time, or the gateway is at its limit.
    Overloaded,
    /// The API key's request rate is exceeded.
    RateLimited,
    /// The worker serving the request died.
    WorkerLost,
    /// The request took longer than allowed.
    Timeout,
    /// The request was cancelled (client gone, server shutting down).
    Cancelled,
    /// A bug or an unexpected failure inside preble.
    Internal,
    /// No such route (HTTP only).
    NotFound,
    /// The route exists but not for this method (HTTP only).
    MethodNotAllowed,
    /// The request body is larger than allowed (HTTP only).
    RequestTooLarge,
    /// The client took too long to send its request (HTTP only).
    RequestTimeout,
}

impl ErrorCode {
    /// All codes, for exhaustive tests and documentation.
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::InvalidRequest,
        ErrorCode::InvalidApiKey,
        ErrorCode::ModelNotFound,
        ErrorCode::ContextLengthExceeded,
        ErrorCode::Overloaded,
        ErrorCode::RateLimited,
        ErrorCode::WorkerLost,
        ErrorCode::Timeout,
        ErrorCode::Cancelled,
        ErrorCode::Internal,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::RequestTooLarge,
        ErrorCode::RequestTimeout,
    ];

    /// The code as written in error bodies (`error.code`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::InvalidApiKey => "invalid_api_key",
            ErrorCode::ModelNotFound => "model_not_found",
            ErrorCode::ContextLengthExceeded => "context_length_exceeded",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::RateLimited => "rate_limit_exceeded",
            ErrorCode::WorkerLost => "worker_lost",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Internal => "internal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::RequestTimeout => "request_timeout",
        }
    }

    /// HTTP status the gateway answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest | ErrorCode::ContextLengthExceeded => 400,
            ErrorCode::InvalidApiKey => 401,
            ErrorCode::ModelNotFound | ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::RequestTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Cancelled => 499,
            ErrorCode::Internal => 500,
            ErrorCode::WorkerLost => 502,
            ErrorCode::Overloaded => 503,
            ErrorCode::Timeout => 504,
        }
    }

    /// The OpenAI `error.type` for this code.
    pub fn openai_type(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::ModelNotFound
            | ErrorCode::ContextLengthExceeded
            | ErrorCode::NotFound
            | ErrorCode::MethodNotAllowed
            | ErrorCode::RequestTooLarge
            | ErrorCode::RequestTimeout => "invalid_request_error",
            ErrorCode::InvalidApiKey => "authentication_error",
            ErrorCode::Overloaded => "overloaded_error",
            ErrorCode::RateLimited => "rate_limit_error",
            ErrorCode::Timeout => "timeout_error",
            ErrorCode::Cancelled => "cancelled_error",
            ErrorCode::WorkerLost | ErrorCode::Internal => "server_error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_map_to_error_statuses() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()));
            assert!(code.http_status() >= 400);
        }
    }
}
