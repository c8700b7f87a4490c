#!/usr/bin/env python3
"""Interop check of the hub's HL7 v2 ADT listener with an independent HL7
implementation: ADT messages are built with hl7apy (version pinned in
scripts/setup.sh) and sent over MLLP (release 2 framing: 0x0B, message,
0x1C 0x0D) on one connection, one ACK read per message.

Usage: adt_interop.py --port PORT --at YYYYMMDDHHMMSS+0000 --out results.json

Writes {"results": [{"control_id", "ack", "echoed"}...]}. Exit status 3
when hl7apy is missing (the Rust test then fails naming scripts/setup.sh)."""

import argparse
import json
import socket
import sys

try:
    from hl7apy.core import Message
except ImportError:  # pragma: no cover
    print("hl7apy is not installed: run scripts/setup.sh", file=sys.stderr)
    sys.exit(3)

START, END = b"\x0b", b"\x1c\x0d"


def adt_message(trigger, structure, control_id, at, mrn, location, visit):
    """ADT^<trigger> in v2.5 with MSH, EVN, PID and PV1 (chapter 3). The PID
    carries a name and birth date the hub must never keep."""
    m = Message(structure, version="2.5")
    m.msh.msh_3 = "PYADT"
    m.msh.msh_4 = "PYHOSP"
    m.msh.msh_5 = "VIGIL"
    m.msh.msh_6 = "HUB"
    m.msh.msh_7 = at
    m.msh.msh_9 = f"ADT^{trigger}^{structure}"
    m.msh.msh_10 = control_id
    m.msh.msh_11 = "P"
    m.msh.msh_12 = "2.5"
    m.evn.evn_1 = trigger
    m.evn.evn_2 = at
    m.pid.pid_3 = f"{mrn}^^^PYHOSP^MR"
    m.pid.pid_5 = "Quillfeather^Ottoline"
    m.pid.pid_7 = "19480229"
    m.pv1.pv1_2 = "I"
    if location:
        m.pv1.pv1_3 = location
    if visit:
        m.pv1.pv1_19 = visit
    return m.to_er7().encode()


def exchange(sock, payload, buf):
    sock.sendall(START + payload + END)
    while True:
        s = buf.find(START)
        e = buf.find(END, s + 1) if s >= 0 else -1
        if s >= 0 and e >= 0:
            ack = bytes(buf[s + 1:e]).decode("utf-8", "replace")
            del buf[:e + 2]
            return ack
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed before the ACK")
        buf.extend(chunk)


def msa_of(ack):
    for seg in ack.replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            fields = seg.split(seg[3])
            return fields[1], fields[2] if len(fields) > 2 else ""
    raise RuntimeError("ACK without an MSA segment")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--at", required=True, help="event time (HL7 DTM)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    plan = [
        ("PYA01", adt_message("A01", "ADT_A01", "PYA01", a.at, "PY-MRN-1", "ICU3^07^B", "PYV1")),
        ("PYA02", adt_message("A02", "ADT_A02", "PYA02", a.at[:10] + "30" + a.at[12:], "PY-MRN-1", "ICU3^08^A", "PYV1")),
        ("PYA01X", adt_message("A01", "ADT_A01", "PYA01X", a.at, "PY-MRN-2", "NOWARD^1^Z", None)),
    ]
    results = []
    with socket.create_connection(("127.0.0.1", a.port), timeout=20) as s:
        buf = bytearray()
        for control_id, payload in plan:
            code, echoed = msa_of(exchange(s, payload, buf))
            results.append({"control_id": control_id, "ack": code, "echoed": echoed})
    with open(a.out, "w") as f:
        json.dump({"results": results}, f, indent=1)


if __name__ == "__main__":
    main()
