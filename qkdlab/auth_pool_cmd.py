"""``qkdlab auth-pool``: the pre-shared authentication key of a data folder.

Every classical message of the post-processing is authenticated from a pool of secret
key (Wegman–Carter); each key block draws its pool from ``DATA/keys/auth_pool`` and pays
back what it used from its own key.  On real hardware the very first secret must be
pre-shared: the same random bytes on Alice's and Bob's side (for a run distilled in one
process, one data folder serves both)::

    head -c 1048576 /dev/urandom > preshared.bin       # once, on one side
    qkdlab auth-pool add preshared.bin --data-dir DATA  # on both sides, then shred it
    qkdlab auth-pool show --data-dir DATA

Key material is never printed, only bit counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pool = sub.add_parser("auth-pool", help="the pre-shared authentication key of a data "
                                            "folder (key material is never printed)")
    actions = pool.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a pre-shared secret (raw bytes) to the pool")
    add.add_argument("file", type=Path, help="file of random bytes, the same on both sides")
    show = actions.add_parser("show", help="bits available in the pool")
    for p in (add, show):
        p.add_argument("--data-dir", type=Path, default=Path("data"))
        p.add_argument("--json", action="store_true", help="print one JSON object")
    add.set_defaults(func=cmd_add)
    show.set_defaults(func=cmd_show)


def _store_dir(data_dir: Path) -> Path:
    return data_dir / "keys" / "auth_pool"


def _available(directory: Path) -> int:
    from qkdlab.protocol.keystore import KeyStore

    return sum(r.available_bits for r in KeyStore(directory).list())


def cmd_add(args: argparse.Namespace) -> int:
    """Store ``args.file``'s bytes (8 bits each) as one pool key."""
    from qkdlab.experiments.bb84.secure_key import POOL_BITS
    from qkdlab.protocol.keystore import KeyStore
    from qkdlab.station import StationError

    path: Path = args.file
    if not path.is_file():
        raise StationError(f"auth-pool add: {path} is not a file")
    data = path.read_bytes()
    if len(data) * 8 < POOL_BITS:
        raise StationError(f"auth-pool add: {path} holds {len(data) * 8} bits; one key "
                           f"block draws {POOL_BITS} bits, so give at least "
                           f"{POOL_BITS // 8} bytes")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    store = KeyStore(_store_dir(args.data_dir))
    record = store.save(bits, run_id="preshared", eps_sec=0.0, eps_cor=0.0)
    available = _available(store.path)
    if args.json:
        print(json.dumps({"pool": str(store.path), "added_bits": record.n_bits,
                          "available_bits": available}))
    else:
        print(f"added {record.n_bits} bits to {store.path} ({available} available, "
              f"{available // POOL_BITS} key block(s) before any key is paid back); "
              f"now delete {path} securely")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Bits available in the pool, and how many key blocks they authenticate."""
    from qkdlab.experiments.bb84.secure_key import POOL_BITS

    directory = _store_dir(args.data_dir)
    available = _available(directory) if directory.is_dir() else 0
    if args.json:
        print(json.dumps({"pool": str(directory), "available_bits": available,
                          "blocks": available // POOL_BITS}))
    else:
        print(f"{directory}: {available} bits available ({available // POOL_BITS} key "
              "block(s))")
    return 0
