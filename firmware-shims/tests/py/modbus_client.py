#!/usr/bin/env python3
"""A pymodbus (independent implementation) Modbus TCP client for the Vigil
interop test: reads a table range from `device-sim modbus --listen` and
prints the raw registers, plus float32 values decoded by pymodbus.

usage: modbus_client.py HOST PORT UNIT TABLE START COUNT [F32 ADDR ORDER]...
  TABLE: holding | input. Each trailing triple "f32 ADDR big|little"
  decodes the two registers at ADDR with pymodbus's converter.
Output (one line): regs=a:v,a:v,... f32@ADDR=value ...
Exit status 2 on a Modbus error response.
"""
import sys

from pymodbus.client import ModbusTcpClient


def main():
    host, port, unit, table, start, count = sys.argv[1:7]
    port, unit, start, count = int(port), int(unit), int(start), int(count)
    c = ModbusTcpClient(host, port=port, timeout=3, retries=1)
    if not c.connect():
        print("connect failed", file=sys.stderr)
        sys.exit(1)
    read = c.read_holding_registers if table == "holding" else c.read_input_registers
    r = read(start, count=count, device_id=unit)
    c.close()
    if r.isError():
        print(f"modbus error: {r}", file=sys.stderr)
        sys.exit(2)
    regs = r.registers
    out = ["regs=" + ",".join(f"{start + i}:{v}" for i, v in enumerate(regs))]
    rest = sys.argv[7:]
    for i in range(0, len(rest), 3):
        _, addr, order = rest[i : i + 3]
        off = int(addr) - start
        v = ModbusTcpClient.convert_from_registers(
            regs[off : off + 2], ModbusTcpClient.DATATYPE.FLOAT32, word_order=order
        )
        out.append(f"f32@{addr}={v!r}")
    print(" ".join(out), flush=True)


if __name__ == "__main__":
    main()
