"""The agent embedded in Python, linked by code with a daemon agent process: sync both ways
through a subscription, updates made by pycrdt, restart from the data dir, pause/resume,
handoff and the typed errors."""

import json
import threading

import pytest
from pycrdt import Doc as YDoc
from pycrdt import Map as YMap
from pycrdt import Text as YText

from conftest import wait_for
from devicelink import Agent, AgentConfig, DeviceLinkError, DocListener


class Collect(DocListener):
    """Keeps every update the agent calls back with, and its origin."""

    def __init__(self):
        self.lock = threading.Lock()
        self.updates = []
        self.threads = set()

    def on_update(self, update, origin):
        with self.lock:
            self.updates.append((bytes(update), origin))
            self.threads.add(threading.get_native_id())

    def origins(self):
        with self.lock:
            return [origin for _, origin in self.updates]

    def mirror(self):
        """A pycrdt document built only from the updates received."""
        ydoc = YDoc()
        with self.lock:
            for update, _ in self.updates:
                ydoc.apply_update(update)
        return ydoc


def config(path, name="python"):
    return AgentConfig(data_dir=str(path), listen=["/ip4/127.0.0.1/tcp/0"], mdns=False, name=name)


def pair(agent, daemon):
    host = agent.pair_open(60)
    joined = daemon.cli("pair", host.code(), "--peer", agent.listen_addrs()[0])
    paired = host.wait()
    assert paired.device_id == daemon.device_id
    assert paired.name == "daemon"
    assert f"verification: {paired.verification}" in joined.stdout
    return paired


def items_of(ydoc):
    return dict(ydoc.get("items", type=YMap))


def test_sync_both_ways_pycrdt_restart_and_pause(tmp_path, daemon):
    agent = Agent.start(config(tmp_path / "embedded"))
    me = agent.device_id()
    pair(agent, daemon)
    assert [d.device_id for d in agent.devices()] == [daemon.device_id]

    notes = agent.doc("notes")
    heard = Collect()
    sub = notes.subscribe(heard)
    # A second subscription (another document): every callback comes from one thread.
    other = Collect()
    agent.doc("todo").subscribe(other)

    # Daemon -> embedded, delivered to the callback with the daemon as origin.
    daemon.cli("doc", "set", "notes", "items", "milk", "false")
    wait_for("the daemon's change at the callback", lambda: daemon.device_id in heard.origins())
    assert items_of(heard.mirror()) == {"milk": False}

    # Embedded -> daemon; the callback hears local changes too.
    notes.set("items", "eggs", "true")
    wait_for("the embedded change on the daemon",
             lambda: (daemon.doc_json("notes") or {}).get("items", {}).get("eggs") is True)
    assert "local" in heard.origins()
    agent.doc("todo").set("items", "call", "true")
    wait_for("the change to the other document at its callback", lambda: other.origins())
    assert len(heard.threads | other.threads) == 1, "one callback thread for every subscription"

    # An update made by pycrdt, applied through the agent, reaches the daemon.
    ydoc = YDoc()
    ydoc.apply_update(notes.diff(b""))
    before = ydoc.get_state()
    ydoc.get("items", type=YMap)["bread"] = 2
    notes.apply_update(ydoc.get_update(before))
    wait_for("pycrdt's update on the daemon",
             lambda: (daemon.doc_json("notes") or {}).get("items", {}).get("bread") == 2)

    # The agent's state read back with pycrdt, through diff and through the callbacks alike.
    notes.text_append("body", "hello from python")
    back = YDoc()
    back.apply_update(notes.diff(b""))
    assert items_of(back) == {"milk": False, "eggs": True, "bread": 2}
    assert str(back.get("body", type=YText)) == "hello from python"
    wait_for("every change at the callback",
             lambda: str(heard.mirror().get("body", type=YText)) == "hello from python")
    assert json.loads(notes.get_json()) == json.loads(json.dumps(
        {"items": {"milk": False, "eggs": True, "bread": 2}, "body": "hello from python"}))

    # A wrong-type write is refused and changes nothing; so is a corrupt update.
    with pytest.raises(DeviceLinkError.WrongType):
        notes.set("body", "x", "1")
    with pytest.raises(DeviceLinkError.InvalidArgument):
        notes.apply_update(b"\x01\x02\x03garbage")
    with pytest.raises(DeviceLinkError.InvalidArgument):
        notes.set("items", "x", "not json")
    assert str(back.get("body", type=YText)) == notes.text("body")

    # Pause (the app went to the background): nothing usable, changes wait on the daemon.
    # Resume listens where the agent was, so the daemon finds it at the address it knows.
    listening = agent.listen_addrs()
    agent.pause()
    with pytest.raises(DeviceLinkError.Paused):
        notes.get_json()
    daemon.cli("doc", "set", "notes", "items", "while_paused", "1")
    agent.resume()
    assert agent.listen_addrs() == listening
    wait_for("the change made while paused, at the same callback",
             lambda: items_of(heard.mirror()).get("while_paused") == 1, timeout=30)

    # Restart from the data dir: same device, same documents, still linked and syncing.
    sub.cancel()
    agent.shutdown()
    with pytest.raises(DeviceLinkError.Stopped):
        notes.get_json()
    agent = Agent.start(config(tmp_path / "embedded"))
    assert agent.device_id() == me
    notes = agent.doc("notes")
    assert json.loads(notes.get_json())["items"]["bread"] == 2
    again = Collect()
    notes.subscribe(again)
    daemon.cli("doc", "set", "notes", "items", "after_restart", '"yes"')
    wait_for("the daemon's change after the restart",
             lambda: items_of(again.mirror()).get("after_restart") == "yes", timeout=30)
    agent.shutdown()


def test_handoff_from_the_daemon(tmp_path, daemon):
    agent = Agent.start(config(tmp_path / "embedded"))
    pair(agent, daemon)
    daemon.cli("doc", "text", "draft", "body", "--append", "started on the daemon")
    published = json.loads(daemon.cli(
        "activity", "publish", "--type", "com.example.notes.edit", "--title", "Draft",
        "--doc", "draft", "--state", '{"cursor": 7}').stdout)
    activity_id = published.get("id") or published["activity"]["id"]

    listed = wait_for("the activity on the embedded agent",
                      lambda: [a for a in agent.activities() if a.id == activity_id])
    assert listed[0].holder == daemon.device_id

    done = agent.handoff(activity_id, 20)
    assert done.activity.holder == agent.device_id()
    assert json.loads(done.activity.app_state_json) == {"cursor": 7}
    assert json.loads(done.docs_json["draft"]) == {"body": "started on the daemon"}
    with pytest.raises(DeviceLinkError.NotFound):
        agent.handoff("no-such-activity", 1)
    agent.shutdown()


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(DeviceLinkError.InvalidArgument, match="did you mean"):
        Agent.start(AgentConfig(data_dir=str(tmp_path / "x"), listen=["127.0.0.1:4001"],
                                mdns=False))
