"""A daemon agent process (the `devicelink` binary) for the embedded agent to link with."""

import json
import os
import pathlib
import subprocess
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[3]


def devicelink_bin():
    """The binary under test: $DEVICELINK_BIN (set by `cargo test`), else the release build."""
    path = os.environ.get("DEVICELINK_BIN") or str(REPO / "target" / "release" / "devicelink")
    if not os.path.exists(path):
        pytest.fail(f"no devicelink binary at {path}: run `cargo build --release` first")
    return path


def wait_for(what, check, timeout=15.0):
    """Polls `check` until it returns a truthy value; fails saying `what` did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


class Daemon:
    """`devicelink agent` on 127.0.0.1 in its own data dir, driven through the CLI."""

    def __init__(self, data_dir):
        self.data_dir = str(data_dir)
        self.socket = str(pathlib.Path(data_dir) / "agent.sock")
        self.proc = None
        self.device_id = None
        self.addr = None

    def cli(self, *args, check=True, timeout=30):
        cmd = [devicelink_bin(), "--data-dir", self.data_dir, "--socket", self.socket, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def start(self):
        os.makedirs(self.data_dir, exist_ok=True)
        cmd = [devicelink_bin(), "--data-dir", self.data_dir, "--socket", self.socket, "agent",
               "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns", "--no-ws", "--name", "daemon"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        deadline = time.monotonic() + 30
        while self.addr is None or self.device_id is None:
            if time.monotonic() > deadline:
                raise AssertionError("the daemon agent did not start within 30 s")
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError("the daemon agent exited at start-up")
            if line.startswith("device id: "):
                self.device_id = line.split(": ", 1)[1].strip()
            elif line.startswith("listening: ") and "/tcp/" in line:
                self.addr = line.split(": ", 1)[1].strip()
        wait_for("the daemon's IPC socket", lambda: self.cli("status", check=False).returncode == 0)
        return self

    def doc_json(self, name):
        done = self.cli("doc", "get", name, check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "daemon").start()
    yield d
    d.stop()
