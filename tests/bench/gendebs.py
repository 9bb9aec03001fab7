#!/usr/bin/env python3
"""Make N tiny, valid .deb files fast, for repository scale tests and benchmarks.

    python3 tests/bench/gendebs.py OUT N [--prefix gpkg] [--start 1] [--version 1.0-1]

Each package is `<prefix><i>` (zero-padded to the width of the largest number), one small
file under /usr/share/<name>/, Architecture amd64, with a control file like dpkg-deb
writes. Every .deb is an ar archive of debian-binary, control.tar.gz and data.tar.gz, which
dpkg, apt-ftparchive and `keepup publish` accept. The bytes depend only on the arguments
(fixed times and owners), so two runs make the same files.
"""

import argparse
import gzip
import io
import os
import sys
import time

MTIME = 1_700_000_000


def ar_member(name: bytes, data: bytes) -> bytes:
    header = b"%-16s%-12d%-6d%-6d%-8s%-10d`\n" % (name, MTIME, 0, 0, b"100644", len(data))
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def tar_header(path: str, size: int, mode: int, directory: bool) -> bytes:
    """A ustar header (owner root, fixed time): what tarfile writes, without its overhead."""
    h = bytearray(512)

    def put(off: int, width: int, value: bytes) -> None:
        h[off : off + len(value)] = value[:width]

    def octal(off: int, width: int, n: int) -> None:
        put(off, width, b"%0*o\0" % (width - 1, n))

    put(0, 100, path.encode())
    octal(100, 8, mode)
    octal(108, 8, 0)
    octal(116, 8, 0)
    octal(124, 12, size)
    octal(136, 12, MTIME)
    h[148:156] = b" " * 8
    h[156] = ord("5" if directory else "0")
    put(257, 8, b"ustar\x0000")
    put(265, 32, b"root")
    put(297, 32, b"root")
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def targz(files) -> bytes:
    out = []
    for path, content, mode in files:
        if content is None:
            out.append(tar_header(path, 0, 0o755, True))
        else:
            out.append(tar_header(path, len(content), mode, False))
            out.append(content + b"\0" * (-len(content) % 512))
    out.append(b"\0" * 1024)
    return gzip.compress(b"".join(out), compresslevel=6, mtime=0)


def deb(name: str, version: str, i: int) -> bytes:
    payload = f"package {i}\n".encode()
    data = targz(
        [
            ("./", None, 0),
            ("./usr/", None, 0),
            ("./usr/share/", None, 0),
            (f"./usr/share/{name}/", None, 0),
            (f"./usr/share/{name}/data", payload, 0o644),
        ]
    )
    control = (
        f"Package: {name}\n"
        f"Version: {version}\n"
        "Architecture: amd64\n"
        "Maintainer: Scale Test <scale@example.org>\n"
        "Installed-Size: 1\n"
        "Section: misc\n"
        "Priority: optional\n"
        f"Description: generated package {i}\n"
        " A tiny package made by tests/bench/gendebs.py for repository scale tests.\n"
    ).encode()
    ctrl = targz([("./", None, 0), ("./control", control, 0o644)])
    return (
        b"!<arch>\n"
        + ar_member(b"debian-binary", b"2.0\n")
        + ar_member(b"control.tar.gz", ctrl)
        + ar_member(b"data.tar.gz", data)
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="directory to write the .deb files into (created)")
    p.add_argument("n", type=int, help="how many packages")
    p.add_argument("--prefix", default="gpkg", help="package name prefix (default gpkg)")
    p.add_argument("--start", type=int, default=1, help="first package number (default 1)")
    p.add_argument("--version", default="1.0-1", help="version of every package")
    p.add_argument("--width", type=int, default=0, help="digits of the number (default: of the largest)")
    a = p.parse_args()
    if a.n < 1 or a.start < 0:
        p.error("N must be at least 1 and --start at least 0")
    os.makedirs(a.out, exist_ok=True)
    last = a.start + a.n - 1
    width = a.width or len(str(last))
    tty = sys.stderr.isatty()
    t0 = time.monotonic()
    for k, i in enumerate(range(a.start, last + 1)):
        name = f"{a.prefix}{i:0{width}d}"
        path = os.path.join(a.out, f"{name}_{a.version}_amd64.deb")
        with open(path, "wb") as f:
            f.write(deb(name, a.version, i))
        if (k + 1) % 10_000 == 0 or k + 1 == a.n:
            msg = f"gendebs: {k + 1}/{a.n} packages, {time.monotonic() - t0:.1f}s"
            print(msg, end="\r" if tty and k + 1 < a.n else "\n", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
