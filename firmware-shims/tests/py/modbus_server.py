#!/usr/bin/env python3
"""A pymodbus (independent implementation) Modbus TCP server holding the
registers of edge-agent/maps/sim-ventilator.toml with known values, for the
Vigil driver interop test (firmware-shims/tests/modbus_interop.rs).

usage: modbus_server.py PORT UNIT_ID

Values are encoded with pymodbus's own converters (convert_to_registers),
not Vigil's. Prints "ready" on stdout once serving; runs until killed.
Holding registers (0-based protocol addresses):
  0      RR    u16                 16
  1      VT    u16                 450
  2-3    PIP   f32, word order CDAB 22.5   (pymodbus word_order="little")
  4      PEEP  i16 x 0.1           0x7FFF  (the map's invalid sentinel)
  5      FiO2  u16 x 0.1           405     (40.5 %)
  8-9    Pmean f32, ABCD           11.25   (word_order="big")
"""
import asyncio
import sys

from pymodbus.client import ModbusTcpClient
from pymodbus.datastore import (
    ModbusDeviceContext,
    ModbusSequentialDataBlock,
    ModbusServerContext,
)
from pymodbus.server import StartAsyncTcpServer

DT = ModbusTcpClient.DATATYPE


def registers():
    regs = [0] * 16
    regs[0] = 16
    regs[1] = 450
    regs[2:4] = ModbusTcpClient.convert_to_registers(22.5, DT.FLOAT32, word_order="little")
    regs[4] = 0x7FFF
    regs[5] = 405
    regs[8:10] = ModbusTcpClient.convert_to_registers(11.25, DT.FLOAT32, word_order="big")
    return regs


async def main():
    port = int(sys.argv[1])
    unit = int(sys.argv[2])
    # pymodbus 3.16 data blocks are 1-based: block address 1 holds protocol
    # address 0 (the device context adds 1 to every request address).
    hr = ModbusSequentialDataBlock(1, registers())
    device = ModbusDeviceContext(hr=hr)
    context = ModbusServerContext(devices={unit: device}, single=False)
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, lambda: print("ready", flush=True))
    await StartAsyncTcpServer(context=context, address=("127.0.0.1", port))


if __name__ == "__main__":
    asyncio.run(main())
