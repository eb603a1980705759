//! API errors: a code, a client-safe message, the offending parameter, and the OpenAI body.

use std::time::Duration;

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use preble_protocol::ErrorCode;
use serde_json::json;

/// An error a client sees.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The code.
    pub code: ErrorCode,
    /// What went wrong, for the client.
    pub message: String,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// How long the client should wait before retrying (`Retry-After`); `overloaded` errors
    /// default to a second.
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// An error with a code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// The same error, telling the client to retry after `wait`.
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }

    /// An `invalid_request` error about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidRequest,
            message: message.into(),
            param: Some(param.into()),
            retry_after: None,
        }
    }

    /// The OpenAI error body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.code.openai_type(),
                "code": self.code.as_str(),
                "param": self.param,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry_after = match (self.retry_after, self.code) {
            (Some(wait), _) => Some(wait),
            (None, ErrorCode::Overloaded) => Some(Duration::from_secs(1)),
            (None, _) => None,
        };
        let mut response = (status, Json(self.body())).into_response();
        if let Some(wait) = retry_after {
            // Whole seconds, rounded up, at least one.
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
        }
        response
    }
}
