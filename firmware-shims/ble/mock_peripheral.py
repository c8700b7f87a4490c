#!/usr/bin/python3
"""A mocked BlueZ (org.bluez on a private D-Bus) with one BLE health device.

Run with Debian's /usr/bin/python3 (python3-dbus, python3-gi; installed with
python3-dbusmock by scripts/setup.sh) and DBUS_SYSTEM_BUS_ADDRESS pointing at
a private dbus-daemon. It implements just enough of the BlueZ D-Bus API for
btleplug 0.13 / bluez-async (see shared notes "Bluetooth LE without radio
hardware"):

- ObjectManager at "/" (GetManagedObjects, InterfacesAdded/Removed);
- Adapter1 hci0 (StartDiscovery/StopDiscovery/SetDiscoveryFilter) with
  Address, AddressType, Name, Alias, Powered, Discovering, Modalias;
- Device1 (Connect/Disconnect) with Address, AddressType, Paired,
  Connected, ServicesResolved, Trusted, Blocked, LegacyPairing, UUIDs;
- on Connect: Connected = true, the GATT objects are exported (service*,
  char*), then ServicesResolved = true, each with its signal;
- GattCharacteristic1 (ReadValue, StartNotify, StopNotify) with UUID,
  Service, Flags, Notifying, Value: while notifying, a value every
  --interval-ms arrives as PropertiesChanged(Value), as BlueZ sends them.

Objects are plain dbus-python objects: their introspection XML lists the
interfaces before the child nodes, as real BlueZ does (python-dbusmock's
bluez5 template lists property-only interfaces after the child nodes, which
bluez-async's XML parser rejects).

The measurement values are the byte-commented test vectors of
device-drivers/src/ble/gatt (written independently of the driver's decoders).
After --drop-after-s seconds connected the device drops the link
(Connected = false, GATT objects removed) to exercise reconnection: on the
first --cycles connections (default 1), printing "DROPPED" each time. Then
it refuses the next --refuse connects (org.bluez.Error.Failed, as BlueZ
answers a device that does not respond), printing "REFUSED" each time.

Prints "READY" on stdout once org.bluez is owned.
"""
import argparse
import sys

import dbus
import dbus.mainloop.glib
import dbus.service
from gi.repository import GLib

BLUEZ = "org.bluez"
OM = "org.freedesktop.DBus.ObjectManager"
PROPS = "org.freedesktop.DBus.Properties"
ADAPTER = "org.bluez.Adapter1"
DEVICE = "org.bluez.Device1"
SERVICE = "org.bluez.GattService1"
CHAR = "org.bluez.GattCharacteristic1"


def uuid16(u):
    return "0000%04x-0000-1000-8000-00805f9b34fb" % u


# Heart Rate Measurement (HRS 1.0 §3.1): flags 0x16 (uint8, contact
# supported+detected, RR present), 72 bpm, RR 1024/1024 s.
HR_VALUES = [bytes([0x16, 72, 0x00, 0x04]), bytes([0x16, 73, 0x00, 0x04])]
# Blood Pressure Measurement (BLS 1.0 §3.1): flags 0x1E (mmHg, time stamp,
# pulse, user id, status), 121/81/94 mmHg SFLOAT, 2026-11-24 10:05:30,
# pulse 72, user 1, status 0x0001 (body movement).
BP_VALUES = [bytes([0x1E, 0x79, 0x00, 0x51, 0x00, 0x5E, 0x00, 0xEA, 0x07, 11, 24, 10, 5, 30,
                    0x48, 0x00, 0x01, 0x01, 0x00])]
# PLX Continuous Measurement (PLXS 1.0 §3.2): flags 0x00, SpO2 97 %, PR 72.
PLX_VALUES = [bytes([0x00, 0x61, 0x00, 0x48, 0x00])]
# Temperature Measurement (HTS 1.0 §3.1): flags 0x00 (°C), FLOAT 36.7.
TEMP_VALUES = [bytes([0x00, 0x6F, 0x01, 0x00, 0xFF])]

# (service uuid, characteristic uuid, flags, values)
PROFILES = {
    "hr": (0x180D, 0x2A37, ["notify"], HR_VALUES),
    "bp": (0x1810, 0x2A35, ["indicate"], BP_VALUES),
    "plx": (0x1822, 0x2A5F, ["notify"], PLX_VALUES),
    "temp": (0x1809, 0x2A1C, ["indicate"], TEMP_VALUES),
}


def variant_props(d):
    return dbus.Dictionary(d, signature="sv")


class Obj(dbus.service.Object):
    """An object with BlueZ-style properties on one interface."""

    def __init__(self, bus, path, iface, props):
        super().__init__(bus, path)
        self.path = path
        self.iface = iface
        self.props = props

    @dbus.service.method(PROPS, in_signature="ss", out_signature="v")
    def Get(self, iface, name):
        if iface != self.iface or name not in self.props:
            raise dbus.exceptions.DBusException(
                "org.freedesktop.DBus.Error.InvalidArgs", "no property %s.%s" % (iface, name))
        return self.props[name]

    @dbus.service.method(PROPS, in_signature="s", out_signature="a{sv}")
    def GetAll(self, iface):
        return variant_props(self.props if iface == self.iface else {})

    @dbus.service.method(PROPS, in_signature="ssv")
    def Set(self, iface, name, value):
        self.set(name, value)

    @dbus.service.signal(PROPS, signature="sa{sv}as")
    def PropertiesChanged(self, iface, changed, invalidated):
        pass

    def set(self, name, value):
        self.props[name] = value
        self.PropertiesChanged(self.iface, variant_props({name: value}), dbus.Array([], "s"))

    def managed(self):
        return {self.iface: variant_props(self.props)}


class Root(dbus.service.Object):
    def __init__(self, bus):
        super().__init__(bus, "/")
        self.objects = []

    @dbus.service.method(OM, out_signature="a{oa{sa{sv}}}")
    def GetManagedObjects(self):
        return dbus.Dictionary({o.path: o.managed() for o in self.objects}, signature="oa{sa{sv}}")

    @dbus.service.signal(OM, signature="oa{sa{sv}}")
    def InterfacesAdded(self, path, interfaces):
        pass

    @dbus.service.signal(OM, signature="oas")
    def InterfacesRemoved(self, path, interfaces):
        pass

    def add(self, o):
        self.objects.append(o)
        self.InterfacesAdded(o.path, o.managed())

    def remove(self, o):
        self.objects.remove(o)
        o.remove_from_connection()
        self.InterfacesRemoved(o.path, dbus.Array([o.iface], "s"))


class Adapter(Obj):
    def __init__(self, bus):
        super().__init__(bus, "/org/bluez/hci0", ADAPTER, {
            "Address": dbus.String("00:11:22:33:44:55"),
            "AddressType": dbus.String("public"),
            "Name": dbus.String("vigil-mock"),
            "Alias": dbus.String("vigil-mock"),
            "Powered": dbus.Boolean(True),
            "Discovering": dbus.Boolean(False),
            "Modalias": dbus.String("usb:v1D6Bp0246d0537"),
            "UUIDs": dbus.Array([], "s"),
        })

    @dbus.service.method(ADAPTER)
    def StartDiscovery(self):
        self.set("Discovering", dbus.Boolean(True))

    @dbus.service.method(ADAPTER)
    def StopDiscovery(self):
        self.set("Discovering", dbus.Boolean(False))

    @dbus.service.method(ADAPTER, in_signature="a{sv}")
    def SetDiscoveryFilter(self, _filter):
        pass


class Characteristic(Obj):
    def __init__(self, bus, path, service_path, uuid, flags, values, interval_ms):
        super().__init__(bus, path, CHAR, {
            "UUID": dbus.String(uuid16(uuid)),
            "Service": dbus.ObjectPath(service_path),
            "Flags": dbus.Array(flags, "s"),
            "Notifying": dbus.Boolean(False),
            "Value": dbus.Array([], "y"),
        })
        self.values = values
        self.interval_ms = interval_ms
        self.timer = None
        self.n = 0

    @dbus.service.method(CHAR, in_signature="a{sv}", out_signature="ay")
    def ReadValue(self, _options):
        return dbus.Array(self.values[0], "y")

    @dbus.service.method(CHAR)
    def StartNotify(self):
        if self.timer is None:
            self.set("Notifying", dbus.Boolean(True))
            self.timer = GLib.timeout_add(self.interval_ms, self.tick)

    @dbus.service.method(CHAR)
    def StopNotify(self):
        self.stop()

    def stop(self):
        if self.timer is not None:
            GLib.source_remove(self.timer)
            self.timer = None

    def tick(self):
        v = self.values[self.n % len(self.values)]
        self.n += 1
        self.set("Value", dbus.Array(v, "y"))
        return True


class Device(Obj):
    def __init__(self, bus, root, address, profiles, interval_ms, drop_after_s, cycles, refuse):
        path = "/org/bluez/hci0/dev_" + address.replace(":", "_")
        super().__init__(bus, path, DEVICE, {
            "Address": dbus.String(address),
            "AddressType": dbus.String("random"),
            "Alias": dbus.String("Vigil mock health device"),
            "Name": dbus.String("Vigil mock health device"),
            "Adapter": dbus.ObjectPath("/org/bluez/hci0"),
            "Paired": dbus.Boolean(False),
            "Connected": dbus.Boolean(False),
            "ServicesResolved": dbus.Boolean(False),
            "Trusted": dbus.Boolean(False),
            "Blocked": dbus.Boolean(False),
            "LegacyPairing": dbus.Boolean(False),
            "RSSI": dbus.Int16(-50),
            "UUIDs": dbus.Array([uuid16(PROFILES[p][0]) for p in profiles], "s"),
        })
        self.bus = bus
        self.root = root
        self.profiles = profiles
        self.interval_ms = interval_ms
        self.drop_after_s = drop_after_s
        self.drops_left = cycles if drop_after_s > 0 else 0
        self.refuse_left = refuse
        self.connections = 0
        self.gatt = []

    @dbus.service.method(DEVICE)
    def Connect(self):
        if self.props["Connected"]:
            return
        if self.connections > 0 and self.drops_left == 0 and self.refuse_left > 0:
            self.refuse_left -= 1
            print("REFUSED", flush=True)
            raise dbus.exceptions.DBusException("org.bluez.Error.Failed", "le-connection-abort-by-local")
        self.connections += 1
        self.set("Connected", dbus.Boolean(True))
        handle = 0x0a
        for p in self.profiles:
            s_uuid, c_uuid, flags, values = PROFILES[p]
            s_path = "%s/service%04x" % (self.path, handle)
            service = Obj(self.bus, s_path, SERVICE, {
                "UUID": dbus.String(uuid16(s_uuid)),
                "Primary": dbus.Boolean(True),
                "Device": dbus.ObjectPath(self.path),
                "Includes": dbus.Array([], "o"),
            })
            self.root.add(service)
            char = Characteristic(self.bus, "%s/char%04x" % (s_path, handle + 1), s_path,
                                  c_uuid, flags, values, self.interval_ms)
            self.root.add(char)
            self.gatt += [service, char]
            handle += 0x10
        self.set("ServicesResolved", dbus.Boolean(True))
        if self.drops_left > 0:
            self.drops_left -= 1
            GLib.timeout_add(int(self.drop_after_s * 1000), self.drop)

    @dbus.service.method(DEVICE)
    def Disconnect(self):
        self.drop()

    def drop(self):
        if not self.props["Connected"]:
            return False
        for o in reversed(self.gatt):
            if isinstance(o, Characteristic):
                o.stop()
            self.root.remove(o)
        self.gatt = []
        self.set("ServicesResolved", dbus.Boolean(False))
        self.set("Connected", dbus.Boolean(False))
        print("DROPPED", flush=True)
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", default="C0:FF:EE:00:00:01")
    ap.add_argument("--profiles", default="hr,bp", help="comma list of hr, bp, plx, temp")
    ap.add_argument("--interval-ms", type=int, default=200)
    ap.add_argument("--drop-after-s", type=float, default=0.0)
    ap.add_argument("--cycles", type=int, default=1, help="connections dropped after --drop-after-s")
    ap.add_argument("--refuse", type=int, default=0, help="connects refused after the cycles")
    args = ap.parse_args()
    profiles = [p for p in args.profiles.split(",") if p]
    for p in profiles:
        if p not in PROFILES:
            ap.error("unknown profile %r" % p)

    dbus.mainloop.glib.DBusGMainLoop(set_as_default=True)
    bus = dbus.SystemBus()
    root = Root(bus)
    root.add(Adapter(bus))
    root.add(Device(bus, root, args.address, profiles, args.interval_ms, args.drop_after_s,
                    args.cycles, args.refuse))
    _name = dbus.service.BusName(BLUEZ, bus, do_not_queue=True)
    print("READY", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    sys.exit(main())
