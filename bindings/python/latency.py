"""Change on an embedded agent to a subscriber callback on another device: two agents embedded
in this Python process, linked by code over 127.0.0.1. Prints one JSON line (milliseconds).

    python bindings/python/latency.py [SAMPLES]
"""
import json
import sys
import tempfile
import threading
import time

t0 = time.perf_counter()
from devicelink import Agent, AgentConfig, DocListener  # noqa: E402

import_ms = (time.perf_counter() - t0) * 1000


class Signal(DocListener):
    def __init__(self, origin):
        self.origin, self.event = origin, threading.Event()

    def on_update(self, update, origin):
        if origin == self.origin:
            self.event.set()


def main(samples):
    with tempfile.TemporaryDirectory() as da, tempfile.TemporaryDirectory() as db:
        started = time.perf_counter()
        a = Agent.start(AgentConfig(data_dir=da, listen=["/ip4/127.0.0.1/tcp/0"], mdns=False))
        start_ms = (time.perf_counter() - started) * 1000
        b = Agent.start(AgentConfig(data_dir=db, listen=["/ip4/127.0.0.1/tcp/0"], mdns=False))
        host = a.pair_open(60)
        b.pair_join(host.code(), a.listen_addrs()[0])
        host.wait()
        on_a, on_b = a.doc("latency"), b.doc("latency")
        signal = Signal(a.device_id())
        sub = on_b.subscribe(signal)
        times = []
        for i in range(samples + 20):
            signal.event.clear()
            t = time.perf_counter()
            on_a.set("m", "k", str(i))
            if not signal.event.wait(10):
                sys.exit(f"sample {i}: no callback within 10 s")
            if i >= 20:  # the first ones warm up the connection and the caches
                times.append((time.perf_counter() - t) * 1000)
        sub.cancel()
        a.shutdown()
        b.shutdown()
    times.sort()
    print(json.dumps({
        "samples": samples,
        "p50_ms": round(times[len(times) // 2], 3),
        "p99_ms": round(times[min(len(times) - 1, len(times) * 99 // 100)], 3),
        "import_ms": round(import_ms, 1),
        "start_ms": round(start_ms, 1),
    }))


main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
