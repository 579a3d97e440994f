"""The embedded agent with the defaults an app gets (`AgentConfig(data_dir=...)` alone: every
interface, free ports, mDNS on) pairs by code alone with a daemon started with no flag on the same
LAN, and syncs both ways. tests/bindings.rs runs it inside one network namespace of a veth LAN,
with the daemon in the other (DEVICELINK_LAN_DAEMON); elsewhere it is skipped, since it would
announce on this machine's real network."""

import json
import os
import threading

import pytest

from conftest import Daemon, wait_for
from devicelink import Agent, AgentConfig, DocListener

LAN = os.environ.get("DEVICELINK_LAN_DAEMON")
pytestmark = pytest.mark.skipif(
    not LAN, reason="needs a LAN of network namespaces (tests/bindings.rs makes one)")


class Origins(DocListener):
    def __init__(self):
        self.lock, self.seen = threading.Lock(), []

    def on_update(self, update, origin):
        with self.lock:
            self.seen.append(origin)

    def has(self, origin):
        with self.lock:
            return origin in self.seen


def test_defaults_pair_by_code_alone_and_sync(tmp_path):
    lan = json.loads(LAN)
    daemon = Daemon(lan["data_dir"])
    daemon.socket, daemon.device_id = lan["socket"], lan["device_id"]

    agent = Agent.start(AgentConfig(data_dir=str(tmp_path / "embedded")))
    assert any("/198.51.100." in a for a in agent.listen_addrs()), agent.listen_addrs()
    host = agent.pair_open(120)
    joined = daemon.cli("pair", host.code())  # the code alone: found over mDNS
    paired = host.wait()
    assert paired.device_id == daemon.device_id
    assert f"verification: {paired.verification}" in joined.stdout

    notes = agent.doc("notes")
    heard = Origins()
    sub = notes.subscribe(heard)
    daemon.cli("doc", "set", "notes", "items", "from_daemon", "1")
    wait_for("the daemon's change at the callback", lambda: heard.has(daemon.device_id))
    notes.set("items", "from_python", "2")
    wait_for("the embedded change on the daemon",
             lambda: (daemon.doc_json("notes") or {}).get("items", {}).get("from_python") == 2)
    peers = json.loads(daemon.cli("status", "--json").stdout)["peers"]
    mine = [p for p in peers if p.get("device_id") == agent.device_id()]
    assert mine and "198.51.100." in json.dumps(mine[0]), peers  # linked over the LAN
    sub.cancel()
    agent.shutdown()
