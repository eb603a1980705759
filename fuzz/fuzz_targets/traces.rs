//! Any file given as a public trace (Azure CSV, Mooncake JSON lines): parsed into requests
//! or refused with the line at fault, never a panic; every parsed request has a prompt.
#![no_main]

use libfuzzer_sys::fuzz_target;
use preble_loadtest::workload::trace::{parse_azure, parse_mooncake};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for parsed in [parse_azure(text, "fuzz.csv"), parse_mooncake(text, "fuzz.jsonl")] {
        if let Ok(requests) = parsed {
            for r in requests {
                assert!(r.prompt_len() > 0);
                assert!(r.at_ms.is_finite());
            }
        }
    }
});
