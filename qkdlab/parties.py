"""``qkdlab alice`` and ``qkdlab bob``: the two parties' post-processing as two processes.

After a run, each party's sifted record of key block N is in
``DATA/sifted/<run>-b<NNNN>-alice.npz`` and ``-bob.npz`` (``--block N``, default 0).
Alice listens, Bob connects, over ZeroMQ; every message is authenticated with the
pre-shared key file both hold (``--preshared``, raw bytes).
Each party stores its own key in ``DATA/keys/<party>-2p`` and prints a JSON summary
(never key material).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for party, flag, help_text in (("alice", "--listen", "bind here (tcp://host:port)"),
                                   ("bob", "--connect", "Alice's address (tcp://host:port)")):
        p = sub.add_parser(party, help=f"{party}'s post-processing of a run, over ZeroMQ")
        p.add_argument(flag, dest="address", required=True, metavar="ADDR", help=help_text)
        p.add_argument("--run", required=True, help="run id")
        p.add_argument("--block", type=int, default=0, help="key block of the run (0, 1, ...)")
        p.add_argument("--data-dir", type=Path, default=Path("data"))
        p.add_argument("--preshared", type=Path, required=True,
                       help="pre-shared authentication key file (raw bytes, same for both)")
        p.add_argument("--timeout", type=float, default=60.0, help="peer timeout (s)")
        p.set_defaults(func=cmd_party, party=party)


def cmd_party(args: argparse.Namespace) -> int:
    from qkdlab.experiments.bb84.processing import BB84Settings
    from qkdlab.experiments.bb84.rawtags import RawTagReader
    from qkdlab.experiments.bb84.secure_key import (
        alice_seed,
        block_id,
        load_record,
        parameters,
    )
    from qkdlab.protocol import pipeline
    from qkdlab.protocol.authentication import AuthSession, KeyPool
    from qkdlab.protocol.channel import AuthenticatedChannel, ZmqChannel
    from qkdlab.protocol.keystore import KeyStore
    from qkdlab.station import StationError

    raw = args.data_dir / "raw" / f"bb84-{args.run}.qkt"
    if args.block < 0:
        raise StationError(f"--block must be >= 0, got {args.block}")
    key_id = block_id(args.run, args.block)
    record_path = args.data_dir / "sifted" / f"{key_id}-{args.party}.npz"
    for path in (raw, record_path, args.preshared):
        if not path.exists():
            raise StationError(f"{args.party}: {path} does not exist")
    metadata = RawTagReader(raw).metadata
    settings = BB84Settings(**metadata["settings"])
    # a simulated bench's run replays its seeded randomness; real hardware's is fresh
    seeded = bool(metadata.get("seeded_secrets", False))
    params = pipeline.PostProcessingParameters(
        **{**parameters(settings).__dict__, "timeout_s": args.timeout})
    record = load_record(record_path)
    pool = np.unpackbits(np.frombuffer(args.preshared.read_bytes(), dtype=np.uint8))
    inner = (ZmqChannel.bind(args.address, args.timeout) if args.party == "alice"
             else ZmqChannel.connect(args.address, args.timeout))
    peer = "bob" if args.party == "alice" else "alice"
    channel = AuthenticatedChannel(inner, AuthSession(KeyPool(pool)), local_id=args.party,
                                   peer_id=peer)
    try:
        if args.party == "alice":
            outcome = pipeline.alice(channel, record, params,
                                     np.random.default_rng(
                                         [alice_seed(settings, args.block, seeded), 1]))
        else:
            outcome = pipeline.bob(channel, record, params)
    finally:
        channel.close()
    summary: dict[str, Any] = {"party": args.party, "run_id": args.run, **outcome.summary(),
                               "key_file": None}
    if not outcome.aborted and outcome.key is not None:
        store = KeyStore(args.data_dir / "keys" / f"{args.party}-2p")
        rec = store.save(outcome.key, run_id=args.run, eps_sec=params.eps_sec,
                         eps_cor=params.eps_cor, key_id=key_id)
        summary["key_file"] = str(store.file_of(rec.key_id))
    print(json.dumps(summary))
    sys.stdout.flush()
    return 1 if outcome.aborted else 0
