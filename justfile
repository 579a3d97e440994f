# Everyday recipes. `just --list` shows them.

# The two-agent demo: sync, live edits, offline catch-up.
demo:
    cargo run --release -- demo

# The whole test suite (what CI runs).
test:
    cargo test --release

# One minute under a slow reader, a reconnecting stranger and 1,000 half-open connections,
# while two linked agents keep syncing (prints RSS and latency figures).
soak:
    cargo test --release --test soak -- --ignored --nocapture

# One minute of attacks on the public always-on device (silent sockets, identity churn, lookup
# scans) while a phone restarts every 10 s and a laptop keeps syncing (prints the figures).
soak-edge:
    cargo test --release --test soak_edge -- --ignored --nocapture

# Lints and formatting, as CI expects them.
check:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

fmt:
    cargo fmt --all

# Run an agent in the foreground; pass extra flags, e.g. `just agent --peer /ip4/127.0.0.1/tcp/4001`.
agent *ARGS:
    cargo run --release -- agent {{ARGS}}

# Regenerate protocol/vectors after an intentional wire change.
vectors:
    DEVICELINK_WRITE_VECTORS=1 cargo test --release --test protocol_vectors

# End-to-end figures, with the Yjs + y-websocket comparison side by side (needs node and npm).
bench:
    cd bench/yjs && npm install --no-audit --no-fund
    cargo run --release -- bench --yjs bench/yjs
