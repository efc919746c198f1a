#!/usr/bin/env python3
"""Writes a reproducible gzip-compressed newc cpio archive (a Linux initramfs) without root.

Usage: mkcpio.py OUTPUT < MANIFEST

MANIFEST has one entry a line, in the spirit of the kernel's usr/gen_init_cpio:
    dir  PATH MODE
    file PATH MODE SOURCE
    nod  PATH MODE c|b MAJOR MINOR
PATH is inside the archive (no leading slash, no '.' or '..' parts), MODE is octal permission bits.
Every entry is owned by root, has mtime 0 and is written in sorted path order; parent
directories of files must be listed. The gzip header carries no name and no timestamp.
"""

import gzip
import os
import stat
import sys

MAGIC = b"070701"


def fail(message):
    print(f"mkcpio: error: {message}", file=sys.stderr)
    sys.exit(1)


def check_path(path, lineno):
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        fail(f"manifest line {lineno}: bad archive path {path!r}")
    return path


def parse_mode(text, lineno):
    try:
        mode = int(text, 8)
    except ValueError:
        fail(f"manifest line {lineno}: bad mode {text!r}")
    if not 0 <= mode <= 0o7777:
        fail(f"manifest line {lineno}: mode {text} out of range")
    return mode


def parse_manifest(lines):
    entries = {}
    for lineno, line in enumerate(lines, 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        kind = fields[0]
        if kind == "dir" and len(fields) == 3:
            entry = (stat.S_IFDIR | parse_mode(fields[2], lineno), None, 0, 0)
        elif kind == "file" and len(fields) == 4:
            entry = (stat.S_IFREG | parse_mode(fields[2], lineno), fields[3], 0, 0)
        elif kind == "nod" and len(fields) == 6 and fields[3] in ("c", "b"):
            kind_bits = stat.S_IFCHR if fields[3] == "c" else stat.S_IFBLK
            try:
                major, minor = int(fields[4]), int(fields[5])
            except ValueError:
                fail(f"manifest line {lineno}: bad device number")
            entry = (kind_bits | parse_mode(fields[2], lineno), None, major, minor)
        else:
            fail(f"manifest line {lineno}: cannot parse {line.rstrip()!r}")
        path = check_path(fields[1], lineno)
        if path in entries:
            fail(f"manifest line {lineno}: {path} listed twice")
        entries[path] = entry
    for path, entry in entries.items():
        parent = os.path.dirname(path)
        if parent and not stat.S_ISDIR(entries.get(parent, (0,))[0]):
            fail(f"{path}: parent directory {parent} is not in the manifest")
    return entries


def header(ino, mode, nlink, size, rdev_major, rdev_minor, name):
    fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev_major, rdev_minor, len(name) + 1, 0]
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def pad4(length):
    return b"\0" * (-length % 4)


def archive(entries):
    out = bytearray()
    for ino, path in enumerate(sorted(entries), 1):
        mode, source, major, minor = entries[path]
        data = b""
        if source is not None:
            try:
                with open(source, "rb") as f:
                    data = f.read()
            except OSError as e:
                fail(f"{path}: cannot read {source}: {e.strerror}")
        name = path.encode()
        nlink = 2 if stat.S_ISDIR(mode) else 1
        out += header(ino, mode, nlink, len(data), major, minor, name) + name + b"\0"
        out += pad4(len(out))
        out += data + pad4(len(data))
    trailer = b"TRAILER!!!"
    out += header(0, 0, 1, 0, 0, 0, trailer) + trailer + b"\0"
    out += pad4(len(out))
    return bytes(out)


def main():
    if len(sys.argv) != 2:
        fail("usage: mkcpio.py OUTPUT < MANIFEST")
    entries = parse_manifest(sys.stdin.read().splitlines())
    with open(sys.argv[1], "wb") as f:
        f.write(gzip.compress(archive(entries), compresslevel=9, mtime=0))


if __name__ == "__main__":
    main()
