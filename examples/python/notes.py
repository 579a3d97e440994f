#!/usr/bin/env python3
"""A tiny notes app talking to a devicelink agent over its local socket, with no Rust at all.

The protocol is JSON lines (see protocol/README.md, "Local IPC"): each request carries an "id",
the agent answers each with {"id", "ok", "result" | "error"} and pushes {"event": ...} lines for
subscriptions. Only the Python standard library is used.

    notes.py --socket PATH add "buy milk"     append a note (returns once durable on the agent)
    notes.py --socket PATH show               print the notes document as JSON
    notes.py --socket PATH watch [--count N]  print each change as it arrives (N changes, or forever)
"""

import argparse
import base64
import json
import socket
import sys
import time

DOC = "notes"


class Agent:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            sys.exit(f"no devicelink agent is running at {path}")
        self.file = self.sock.makefile("rwb")
        self.next_id = 1
        self.events = []

    def request(self, op, **args):
        req_id = self.next_id
        self.next_id += 1
        self.file.write(json.dumps({"id": req_id, "op": op, **args}).encode() + b"\n")
        self.file.flush()
        while True:
            msg = self.read()
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != req_id:
                continue
            if not msg["ok"]:
                raise RuntimeError(f"{op}: {msg['error']['code']}: {msg['error']['message']}")
            return msg.get("result")

    def read(self):
        line = self.file.readline()
        if not line:
            raise ConnectionError("the agent closed the connection")
        return json.loads(line)

    def next_event(self):
        return self.events.pop(0) if self.events else self.read()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True)
    sub = parser.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add")
    add.add_argument("text")
    sub.add_parser("show")
    watch = sub.add_parser("watch")
    watch.add_argument("--count", type=int, default=0)
    args = parser.parse_args()

    agent = Agent(args.socket)
    if args.command == "add":
        agent.request("doc_text", doc=DOC, name="body", insert=args.text + "\n")
        agent.request("doc_set", doc=DOC, map="meta", key="updated", value=time.time())
        print("saved")
    elif args.command == "show":
        print(json.dumps(agent.request("doc_get", doc=DOC), sort_keys=True))
    elif args.command == "watch":
        sub_id = agent.request("doc_subscribe", doc=DOC)["subscription"]
        print(json.dumps({"subscribed": sub_id}), flush=True)
        seen = 0
        while args.count == 0 or seen < args.count:
            event = agent.next_event()
            if event.get("event") != "update":
                continue
            update = base64.b64decode(event["update"])
            body = agent.request("doc_get", doc=DOC).get("body", "")
            print(json.dumps({"origin": event["origin"], "bytes": len(update), "body": body}), flush=True)
            seen += 1


if __name__ == "__main__":
    main()
