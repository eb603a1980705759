//! MessagePack codec with named fields and a version check.

use crate::{PROTOCOL_VERSION, messages::Message};

/// Why bytes could not be turned into a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not MessagePack, or not the expected shape (a required field missing, a wrong type).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A message from an incompatible protocol version.
    #[error("unsupported protocol version {found} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion {
        /// The `v` that was found.
        found: u16,
    },
}

/// Encodes a message as MessagePack with named fields.
pub fn encode<T: Message>(message: &T) -> Vec<u8> {
    // Serialising our own plain data types into a Vec cannot fail: no maps with non-string
    // keys, no custom serialisers, and writing to memory has no I/O errors.
    rmp_serde::to_vec_named(message).expect("protocol messages always serialise")
}

/// Decodes a message, rejecting malformed bytes and other protocol versions. Never panics.
pub fn decode<T: Message>(bytes: &[u8]) -> Result<T, DecodeError> {
    let message: T =
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if message.version() != PROTOCOL_VERSION {
        return Err(DecodeError::UnsupportedVersion {
            found: message.version(),
        });
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use proptest::prelude::*;

    fn request() -> GenerateRequest {
        GenerateRequest::new(
            "r1".into(),
            "m".into(),
            vec![1, 2, 3],
            SamplingParams::default(),
            "s".into(),
        )
    }

    #[test]
    fn round_trips() {
        let r = request();
        assert_eq!(decode::<GenerateRequest>(&encode(&r)).unwrap(), r);
        let s = StreamMessage {
            v: PROTOCOL_VERSION,
            request_id: "r".into(),
            seq: 3,
            body: StreamBody::Final {
                finish_reason: FinishReason::Length,
                usage: Usage {
                    prompt_tokens: 3,
                    cached_tokens: 1,
                    completion_tokens: 2,
                },
                timings: Timings::default(),
            },
        };
        assert_eq!(decode::<StreamMessage>(&encode(&s)).unwrap(), s);
        let e = WorkerEvent {
            v: PROTOCOL_VERSION,
            worker_id: "w".into(),
            seq: 9,
            at_ms: 1,
            body: WorkerEventBody::KvInserted(KvInserted {
                parent_hash: 1,
                path_hash: 2,
                tokens: vec![5],
            }),
        };
        assert_eq!(decode::<WorkerEvent>(&encode(&e)).unwrap(), e);
    }

    #[test]
    fn other_versions_are_rejected() {
        let mut r = request();
        r.v = 99;
        assert!(matches!(
            decode::<GenerateRequest>(&encode(&r)),
            Err(DecodeError::UnsupportedVersion { found: 99 })
        ));
    }

    #[test]
    fn missing_required_field_is_a_typed_error() {
        #[derive(serde::Serialize)]
        struct Partial {
            v: u16,
            request_id: String,
        }
        let bytes = rmp_serde::to_vec_named(&Partial {
            v: 1,
            request_id: "x".into(),
        })
        .unwrap();
        let err = decode::<GenerateRequest>(&bytes).unwrap_err();
        assert!(err.to_string().contains("model"), "{err}");
    }

    #[test]
    fn unknown_fields_are_ignored() {
        #[derive(serde::Serialize)]
        struct Newer {
            v: u16,
            request_id: String,
            reason: String,
            from_the_future: u64,
        }
        let bytes = rmp_serde::to_vec_named(&Newer {
            v: PROTOCOL_VERSION,
            request_id: "x".into(),
            reason: "r".into(),
            from_the_future: 7,
        })
        .unwrap();
        assert_eq!(decode::<Cancel>(&bytes).unwrap().request_id, "x");
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode::<GenerateRequest>(&bytes);
            let _ = decode::<Dispatch>(&bytes);
            let _ = decode::<DispatchReply>(&bytes);
            let _ = decode::<StreamMessage>(&bytes);
            let _ = decode::<Cancel>(&bytes);
            let _ = decode::<WorkerEvent>(&bytes);
            let _ = decode::<ApiRequest>(&bytes);
            let _ = decode::<ApiEvent>(&bytes);
        }

        #[test]
        fn corrupting_a_valid_message_never_panics(flip in 0usize..200, byte in any::<u8>()) {
            let mut bytes = encode(&request());
            let i = flip % bytes.len();
            bytes[i] = byte;
            let _ = decode::<GenerateRequest>(&bytes);
            bytes.truncate(i);
            let _ = decode::<GenerateRequest>(&bytes);
        }
    }
}
