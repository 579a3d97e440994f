//! `devicelink bench --quick`, started as a user starts it: it runs two agent processes of its
//! own and prints one JSON line with the figures the README's Performance section shows. The
//! figures' values are the bench's business (machine-dependent); this checks they are there and
//! consistent: the per-hop breakdown has every hop of every counted change, and the floor is
//! below what the agents take.

use std::process::Command;
use std::time::Duration;

#[test]
fn the_quick_bench_prints_every_figure_with_its_hops_and_floor() {
    let child = Command::new(env!("CARGO_BIN_EXE_devicelink"))
        .args(["bench", "--quick", "--docs", "0", "--large-mb", "0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("devicelink bench starts");
    // Bounded: the quick bench takes about half a minute; killed after four.
    let pid = child.id();
    let (finished, watch) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        let waited = watch.recv_timeout(Duration::from_secs(240));
        if waited == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    });
    let out = child.wait_with_output().expect("the bench's output");
    drop(finished);
    let _ = watchdog.join();
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(line.trim()).expect("one JSON line");

    let ours = &report["devicelink"];
    let latency = ours["latency_p50_us"].as_f64().expect("latency p50");
    assert!(latency > 0.0, "{ours}");
    assert!(ours["idle_wakeups_per_sec"].as_f64().is_some(), "{ours}");

    let breakdown = &report["hops"]["breakdown"];
    let counted = breakdown["samples"].as_u64().expect("breakdown samples");
    // 200 changes in the quick run; each carries all its stamps (a wall-clock step could
    // push a few out of their windows: they are counted apart, never silently).
    let unmatched = breakdown["samples_without_every_stamp"]
        .as_u64()
        .expect("unmatched");
    assert_eq!(counted + unmatched, 200, "{breakdown}");
    assert!(counted >= 190, "{breakdown}");
    let hops = breakdown["p50_us"].as_object().expect("per-hop times");
    for hop in [
        "app_to_agent",
        "apply_on_sender",
        "send",
        "wire",
        "apply_on_receiver",
        "to_app_queue",
        "agent_to_app",
    ] {
        assert!(hops[hop].as_u64().is_some(), "{hop} missing: {breakdown}");
    }
    let traced = breakdown["traced_total_p50_us"].as_u64().expect("total");
    let sum: u64 = hops.values().filter_map(|v| v.as_u64()).sum();
    // Medians of parts need not add up to the median of the whole, but not far from it.
    assert!(sum * 2 > traced && sum < traced * 2, "{breakdown}");

    let floor = &report["hops"]["floor"];
    let floor_p50 = floor["total_p50_us"].as_f64().expect("floor p50");
    assert!(
        floor_p50 > 0.0 && floor_p50 < latency,
        "{floor} vs {latency}"
    );
    let ratio = report["ratio_latency_over_floor_p50"]
        .as_f64()
        .expect("ratio to the floor");
    assert!(ratio > 1.0, "{report}");
}
