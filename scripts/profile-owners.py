#!/usr/bin/env python3
"""Who owns meshgate's CPU: reads `perf script -F ip,sym` output (call chains, leaf first) and
charges each sample to the innermost frame of a component that decided to do the work.

Shared helpers (core, alloc, std, bytes, http, memmove, the allocator, hashing) belong to
whichever component called them: a HeaderMap insert made by h2's HPACK decoder is h2's work, the
same insert made by the pipeline is meshgate's. Samples whose leaf is in the kernel are the
kernel's (reads, writes, wake-ups: the same syscalls HAProxy makes).

With `--ratio R` (meshgate's CPU per request over HAProxy's in the same run), it also prints
the ratio left if the HTTP codecs cost nothing: the floor for any codec of our own.

usage: perf script -i perf.data --no-inline -F ip,sym | profile-owners.py [--ratio R]
"""

import argparse
import collections
import sys

# (component, symbol prefix). For a trait impl such as `<hyper::...::Server as Future>::poll`,
# the crate named first owns the frame.
OWNERS = [
    ("h2 (HTTP/2 codec)", "h2::"),
    ("hyper (HTTP/2 server)", "hyper::"),
    ("hyper (HTTP/2 server)", "hyper_util::"),
    ("meshgate h1 (HTTP/1.1 codec)", "meshgate::h1::"),
    ("meshgate h1 (HTTP/1.1 codec)", "httparse::"),
    ("meshgate (pipeline, pool, policy, metrics)", "meshgate::"),
    ("TLS (rustls, ring)", "rustls::"),
    ("TLS (rustls, ring)", "tokio_rustls::"),
    ("TLS (rustls, ring)", "ring::"),
    ("TLS (rustls, ring)", "ring_core_"),
    ("tokio (runtime, timers, I/O driver)", "tokio::"),
    ("tokio (runtime, timers, I/O driver)", "mio::"),
]
CODECS = {"h2 (HTTP/2 codec)", "hyper (HTTP/2 server)", "meshgate h1 (HTTP/1.1 codec)"}


def is_kernel(ip: str) -> bool:
    return len(ip) == 16 and ip.startswith("ffffffff")


def owner(frames):
    if is_kernel(frames[0][0]):
        return "kernel"
    for ip, sym in frames:
        if is_kernel(ip):
            continue
        hits = [(sym.find(prefix), name) for name, prefix in OWNERS if prefix in sym]
        if hits:
            # `meshgate::h1::` also contains `meshgate::`: the longer prefix at the same place wins
            # because it comes first in OWNERS and min() keeps the first of equal positions.
            return min(hits, key=lambda h: h[0])[1]
    return "unattributed"


def samples(lines):
    frames = []
    for line in lines:
        line = line.strip()
        if not line:
            if frames:
                yield frames
            frames = []
            continue
        parts = line.split(None, 1)
        frames.append((parts[0], parts[1] if len(parts) > 1 else ""))
    if frames:
        yield frames


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ratio", type=float, help="meshgate/HAProxy CPU per request, same run")
    args = ap.parse_args()
    counts = collections.Counter()
    for frames in samples(sys.stdin):
        counts[owner(frames)] += 1
    total = sum(counts.values())
    if total == 0:
        sys.exit("no samples: was perf recording meshgate, with call graphs?")
    print(f"{total} samples")
    for name, n in counts.most_common():
        print(f"{100 * n / total:6.1f}%  {name}")
    codecs = sum(n for name, n in counts.items() if name in CODECS) / total
    print(f"{100 * codecs:6.1f}%  all HTTP codecs together")
    if args.ratio:
        print(f"CPU per request {args.ratio:.2f}x HAProxy; with codecs that cost nothing: "
              f"{args.ratio * (1 - codecs):.2f}x")


if __name__ == "__main__":
    main()
