#!/usr/bin/env bash
# Makes sure `cargo +nightly fuzz` works: a nightly toolchain (libFuzzer's instrumentation
# needs it) and cargo-fuzz, installed from crates.io when missing.
set -euo pipefail

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "installing the nightly toolchain (for cargo-fuzz)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz (a minute or two)"
  cargo install cargo-fuzz --locked --quiet
fi
