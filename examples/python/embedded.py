"""Two devices' notes, synced: two agents embedded in one Python process, linked by code.

    pip install ./bindings/python pycrdt && python examples/python/embedded.py
"""
import sys
import tempfile
import threading

from devicelink import Agent, AgentConfig, DocListener


class Arrived(DocListener):
    """Signals each change that came from the other device."""

    def __init__(self, other_id):
        self.other_id, self.event = other_id, threading.Event()

    def on_update(self, update, origin):
        if origin == self.other_id:
            self.event.set()


def device(name, folder):
    # Loopback only and no mDNS: the two "devices" meet at an address we give them.
    return Agent.start(AgentConfig(data_dir=folder, listen=["/ip4/127.0.0.1/tcp/0"], mdns=False,
                                   name=name))


with tempfile.TemporaryDirectory() as laptop_dir, tempfile.TemporaryDirectory() as phone_dir:
    laptop, phone = device("laptop", laptop_dir), device("phone", phone_dir)
    host = laptop.pair_open(60)  # the laptop shows a code...
    paired = phone.pair_join(host.code(), laptop.listen_addrs()[0])  # ...the phone types it
    print(f"linked with {paired.name}, verification {paired.verification}")
    host.wait()

    on_laptop, on_phone = laptop.doc("notes"), phone.doc("notes")
    to_phone = Arrived(laptop.device_id())
    to_laptop = Arrived(phone.device_id())
    subs = [on_phone.subscribe(to_phone), on_laptop.subscribe(to_laptop)]

    on_laptop.text_append("body", "Groceries: milk")
    if not to_phone.event.wait(10):
        sys.exit("the laptop's note did not reach the phone")
    print("phone sees:", on_phone.text("body"))

    on_phone.set("meta", "done", "false")
    if not to_laptop.event.wait(10):
        sys.exit("the phone's change did not reach the laptop")
    print("laptop sees:", on_laptop.get_json())

    for sub in subs:
        sub.cancel()
    laptop.shutdown()
    phone.shutdown()
