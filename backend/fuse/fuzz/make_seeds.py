#!/usr/bin/env python3
"""Writes one well-formed request per opcode to seeds/dispatch (input = le16 capacity/32,
then the request), so the fuzzer starts from valid shapes."""
import os, struct

out = os.path.join(os.path.dirname(__file__), "seeds", "dispatch")
os.makedirs(out, exist_ok=True)

def req(op, nodeid, body):
    return struct.pack("<IIQQIIIHH", 40 + len(body), op, 7, nodeid, 0, 0, 1, 0, 0) + body

read_in = lambda off, size: struct.pack("<QQIIQII", 0, off, size, 0, 0, 0, 0)
seeds = {
    "lookup": req(1, 1, b"f\0"),
    "forget": req(2, 2, struct.pack("<Q", 1)),
    "getattr": req(3, 2, struct.pack("<IIQ", 0, 0, 0)),
    "readlink": req(5, 2, b""),
    "open": req(14, 2, struct.pack("<II", 0, 0)),
    "read": req(15, 2, read_in(0, 4096)),
    "read_pending": req(15, 2, read_in(1, 100)),
    "write": req(16, 2, struct.pack("<QQIIQII", 0, 0, 3, 0, 0, 0, 0) + b"abc"),
    "statfs": req(17, 1, b""),
    "release": req(18, 2, struct.pack("<QIIQ", 0, 0, 0, 0)),
    "getxattr": req(22, 2, struct.pack("<II", 0, 0) + b"user.x\0"),
    "getxattr_sz": req(22, 2, struct.pack("<II", 100, 0) + b"user.x\0"),
    "listxattr": req(23, 2, struct.pack("<II", 100, 0)),
    "flush": req(25, 2, struct.pack("<QIIQ", 0, 0, 0, 0)),
    "init": req(26, 0, struct.pack("<IIII", 7, 31, 65536, 0xffffffff) + b"\0" * 48),
    "opendir": req(27, 1, struct.pack("<II", 0, 0)),
    "readdir": req(28, 1, read_in(0, 4096)),
    "readdirplus": req(44, 1, read_in(0, 4096)),
    "releasedir": req(29, 1, struct.pack("<QIIQ", 0, 0, 0, 0)),
    "access": req(34, 2, struct.pack("<II", 4, 0)),
    "batch_forget": req(42, 0, struct.pack("<II", 2, 0) + struct.pack("<QQ", 2, 1) * 2),
    "lseek": req(46, 2, struct.pack("<QQII", 0, 10, 3, 0)),
    "destroy": req(38, 0, b""),
    "mkdir": req(9, 1, struct.pack("<II", 0o755, 0) + b"d\0"),
}
for name, r in seeds.items():
    with open(os.path.join(out, name), "wb") as f:
        f.write(struct.pack("<H", 200) + r)
