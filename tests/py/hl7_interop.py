#!/usr/bin/env python3
"""Interop check of the agent's HL7 v2 / MLLP listener with an independent
HL7 implementation: messages are built with the hl7apy library (pinned in
scripts/setup.sh) and sent by a minimal MLLP client written here (socket
code, MLLP release 2: 0x0B message 0x1C 0x0D), one ACK per message.

Usage: hl7_interop.py --port PORT --out results.json

Writes a JSON list: one entry per message with its control id, the ACK code
expected and received, the patient identifier it carried and the values.
Exit status 3 when hl7apy is missing (the Rust test turns that into a
failure naming scripts/setup.sh)."""

import argparse
import datetime
import json
import socket
import sys

try:
    from hl7apy.core import Message
except ImportError:  # pragma: no cover
    print("hl7apy is not installed: run scripts/setup.sh", file=sys.stderr)
    sys.exit(3)

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"

# PHI that must never appear on the agent's disk or in its logs.
PHI = ["Zebulonia", "Xerxesina", "19550505", "Yarrowfield", "Wolfsbanes"]


def now_hl7():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d%H%M%S+0000")


def oru(control_id, patient, authority, observations, name=("Zebulonia", "Xerxesina")):
    """An ORU^R01 (v2.6) built with hl7apy. observations: list of
    (value_type, code^text^system, value, unit, status)."""
    m = Message("ORU_R01", version="2.6")
    t = now_hl7()
    m.msh.msh_3 = "PYMON"
    m.msh.msh_4 = "PYWARD"
    m.msh.msh_5 = "VIGIL"
    m.msh.msh_6 = "HOSP"
    m.msh.msh_7 = t
    m.msh.msh_9 = "ORU^R01^ORU_R01"
    m.msh.msh_10 = control_id
    m.msh.msh_11 = "P"
    m.msh.msh_12 = "2.6"
    pr = m.add_group("ORU_R01_PATIENT_RESULT")
    pat = pr.add_group("ORU_R01_PATIENT")
    pid = pat.add_segment("PID")
    pid.pid_1 = "1"
    pid.pid_3 = f"{patient}^^^{authority}^MR" if authority else f"{patient}^^^^MR"
    pid.pid_5 = f"{name[0]}^{name[1]}"
    pid.pid_7 = "19550505"
    pid.pid_11 = "7 Yarrowfield Road^^Wolfsbanes"
    order = pr.add_group("ORU_R01_ORDER_OBSERVATION")
    order.obr.obr_1 = "1"
    order.obr.obr_4 = "182777000^monitoring of patient^SCT"
    order.obr.obr_7 = t
    for i, o in enumerate(observations, start=1):
        vt, code, value, unit, status = o[:5]
        obs = order.add_group("ORU_R01_OBSERVATION")
        obx = obs.add_segment("OBX")
        obx.obx_1 = str(i)
        obx.obx_2 = vt
        obx.obx_3 = code
        obx.obx_4 = f"1.1.1.{i}"
        obx.obx_5 = value
        obx.obx_6 = unit
        if len(o) > 5:
            obx.obx_8 = o[5]  # abnormal flag, HL7 table 0078
        obx.obx_11 = status
        obx.obx_14 = t
    return m.to_er7()


def adt(control_id, patient):
    m = Message("ADT_A01", version="2.6")
    m.msh.msh_3 = "PYADT"
    m.msh.msh_7 = now_hl7()
    m.msh.msh_9 = "ADT^A01^ADT_A01"
    m.msh.msh_10 = control_id
    m.msh.msh_11 = "P"
    m.msh.msh_12 = "2.6"
    m.evn.evn_2 = now_hl7()
    m.pid.pid_3 = f"{patient}^^^PYHOSP^MR"
    m.pid.pid_5 = "Zebulonia^Xerxesina"
    m.pv1.pv1_2 = "I"
    return m.to_er7()


def mllp_exchange(sock, payload, buf):
    sock.sendall(SB + payload + EB + CR)
    while True:
        start = buf.find(SB)
        end = buf.find(EB + CR, start + 1) if start >= 0 else -1
        if start >= 0 and end >= 0:
            ack = bytes(buf[start + 1 : end])
            del buf[: end + 2]
            return ack.decode("utf-8", "replace")
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("connection closed before the ACK")
        buf.extend(chunk)


def msa(ack):
    for seg in ack.replace("\n", "\r").split("\r"):
        if seg.startswith("MSA"):
            f = seg.split(seg[3])
            return f[1], (f[2] if len(f) > 2 else "")
    raise RuntimeError("ACK without MSA")


SPO2 = ("NM", "150456^MDC_PULS_OXIM_SAT_O2^MDC", "97", "262688^MDC_DIM_PERCENT^MDC", "F")
HR = ("NM", "8867-4^Heart rate^LN", "71", "/min^/min^UCUM", "F")
SYS = ("NM", "150021^MDC_PRESS_BLD_NONINV_SYS^MDC", "171", "mm[Hg]^mm[Hg]^UCUM", "F", "H")
TEMP = ("NM", "8310-5^Body temperature^LN", "37.2", "Cel^Cel^UCUM", "R")
RR = ("NM", "9279-1^Respiratory rate^LN", "16", "/min^/min^UCUM", "F")


def plan():
    """(control id, expected ACK, patient, raw message bytes, values)."""
    return [
        ("PY0001", "AA", "PY-MRN-501",
         oru("PY0001", "PY-MRN-501", "PYHOSP", [SPO2, HR, SYS, TEMP]).encode(),
         {"150456": 97.0, "147842": 71.0, "150021": 171.0, "150364": 37.2}),
        # No assigning authority: the agent's patient_id_system applies. The
        # SpO2 row has status X (cannot be obtained): a reading without value.
        ("PY0002", "AA", "PY-MRN-502",
         oru("PY0002", "PY-MRN-502", "", [RR, ("NM", SPO2[1], "", SPO2[3], "X")]).encode(),
         {"151562": 16.0}),
        # AE: an unknown observation code next to a good one; nothing stored.
        ("PY0003", "AE", "PY-MRN-503",
         oru("PY0003", "PY-MRN-503", "PYHOSP",
             [HR, ("NM", "99999-9^Mystery^LN", "5", "/min^/min^UCUM", "F")]).encode(), {}),
        # AE: SpO2 in mmHg, a unit the catalogue does not accept for it.
        ("PY0004", "AE", "PY-MRN-504",
         oru("PY0004", "PY-MRN-504", "PYHOSP",
             [("NM", SPO2[1], "97", "mm[Hg]^mm[Hg]^UCUM", "F")]).encode(), {}),
        # AE: an NM value that is not a number.
        ("PY0006", "AE", "PY-MRN-506",
         oru("PY0006", "PY-MRN-506", "PYHOSP", [("NM", HR[1], "seventy", HR[3], "F")]).encode(), {}),
        # AR: not an observation message.
        ("PY0005", "AR", "PY-MRN-505", adt("PY0005", "PY-MRN-505").encode(), {}),
        # AR: not HL7 at all (no control id to echo).
        ("", "AR", "", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", {}),
    ]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    results = []
    with socket.create_connection((a.host, a.port), timeout=20) as s:
        buf = bytearray()
        for control_id, expect, patient, payload, values in plan():
            ack = mllp_exchange(s, payload, buf)
            code, echoed = msa(ack)
            results.append({
                "control_id": control_id, "expect": expect, "ack": code,
                "echoed": echoed, "patient": patient, "values": values,
                "ack_has_err": "\rERR|" in ("\r" + ack.replace("\n", "\r")),
            })
    with open(a.out, "w") as f:
        json.dump({"results": results, "phi": PHI}, f, indent=1)


if __name__ == "__main__":
    main()
