//! The README's main command, `devicelink demo`, run as a library call: it must converge.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_converges_and_reports() {
    let mut out = Vec::new();
    devicelink::demo::run(&mut out)
        .await
        .expect("demo succeeds");
    let text = String::from_utf8(out).unwrap();
    for expected in [
        "merged in",
        "live edits",
        "caught up in",
        "result: converged",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
}
