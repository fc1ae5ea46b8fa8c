#!/usr/bin/python3
"""Reads a VHD through libvhdi (python3-libvhdi), the reference reader for the differencing disks cowherd
writes (qemu-img ignores their parent).

Usage: vhd_read.py [--out FILE] IMAGE [PARENT...]

libvhdi itself never looks for a parent: the caller opens it and calls set_parent, which only checks that the
parent's identifier equals the child's parent identifier. Parents given on the command line are used nearest
first; missing ones are found as vhdimount finds them: the header's parent filename (after its last
backslash) in the child's directory.

Prints one JSON object: {"chain": [{"path", "disk_type", "identifier", "parent_identifier",
"parent_filename", "media_size"}...]}. With --out, writes the whole virtual disk of IMAGE, read through
the chain, to FILE.
"""
import json
import os
import sys

import pyvhdi

DISK_TYPES = {
    pyvhdi.disk_types.FIXED: "fixed",
    pyvhdi.disk_types.DYNAMIC: "dynamic",
    pyvhdi.disk_types.DIFFERENTIAL: "differencing",
}
CHUNK = 4 * 1024 * 1024


def describe(path, vhd_file):
    return {
        "path": path,
        "disk_type": DISK_TYPES.get(vhd_file.disk_type, str(vhd_file.disk_type)),
        "identifier": vhd_file.identifier,
        "parent_identifier": vhd_file.parent_identifier,
        "parent_filename": vhd_file.parent_filename,
        "media_size": vhd_file.media_size,
    }


def main(argv):
    out = None
    if len(argv) >= 2 and argv[0] == "--out":
        out, argv = argv[1], argv[2:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    image, given_parents = argv[0], argv[1:]

    files, chain, path = [], [], image
    while True:
        vhd_file = pyvhdi.file()
        vhd_file.open(path)
        files.append(vhd_file)
        chain.append(describe(path, vhd_file))
        if vhd_file.disk_type != pyvhdi.disk_types.DIFFERENTIAL:
            break
        if len(files) > 64:
            raise SystemExit("parent chain longer than 64")
        index = len(files) - 1
        if index < len(given_parents):
            path = given_parents[index]
        else:
            name = (vhd_file.parent_filename or "").split("\\")[-1]
            path = os.path.join(os.path.dirname(os.path.abspath(path)), name)
    # set_parent from the bottom up, so every file reads through a complete chain.
    for child, parent in reversed(list(zip(files, files[1:]))):
        child.set_parent(parent)

    if out is not None:
        top = files[0]
        with open(out, "wb") as target:
            offset, size = 0, top.media_size
            while offset < size:
                data = top.read_buffer_at_offset(min(CHUNK, size - offset), offset)
                if not data:
                    raise SystemExit("short read at %d" % offset)
                target.write(data)
                offset += len(data)
    for vhd_file in files:
        vhd_file.close()
    print(json.dumps({"chain": chain}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
