"""Alice and Bob as two processes over ZeroMQ on loopback produce the same key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from qkdlab.cli import main
from qkdlab.protocol.keystore import KeyStore


def _free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{sock.getsockname()[1]}"


def _load(key_file: str) -> np.ndarray:  # type: ignore[type-arg]
    path = Path(key_file)
    return KeyStore(path.parent).load(path.stem)


def test_two_processes_agree_on_the_key(tmp_path: Path,
                                        capsys: object) -> None:
    assert main(["run", "bb84", "--mock", "--duration", "4", "--data-dir", str(tmp_path),
                 "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]  # type: ignore[attr-defined]
    preshared = tmp_path / "preshared.bin"
    preshared.write_bytes(os.urandom(200_000))
    address = _free_address()
    common = ["--run", run_id, "--data-dir", str(tmp_path), "--preshared", str(preshared)]
    cmd = [sys.executable, "-m", "qkdlab.cli"]
    alice = subprocess.Popen([*cmd, "alice", "--listen", address, *common],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bob = subprocess.run([*cmd, "bob", "--connect", address, *common], capture_output=True,
                         text=True, timeout=300)
    a_out, a_err = alice.communicate(timeout=300)
    assert bob.returncode == 0, bob.stderr
    assert alice.returncode == 0, a_err
    a, b = json.loads(a_out), json.loads(bob.stdout)
    assert a["secure_key_bits"] == b["secure_key_bits"] > 0
    assert np.array_equal(_load(a["key_file"]), _load(b["key_file"]))


def test_a_wrong_preshared_key_is_caught_and_yields_no_key(tmp_path: Path,
                                                           capsys: object) -> None:
    assert main(["run", "bb84", "--mock", "--duration", "0.4", "--data-dir", str(tmp_path),
                 "--json"]) == 0
    run_id = json.loads(capsys.readouterr().out)["run_id"]  # type: ignore[attr-defined]
    address = _free_address()
    keys = []
    for name in ("a.bin", "b.bin"):  # Eve does not hold Alice's pre-shared key
        (tmp_path / name).write_bytes(os.urandom(200_000))
        keys.append(str(tmp_path / name))
    cmd = [sys.executable, "-m", "qkdlab.cli"]
    base = ["--run", run_id, "--data-dir", str(tmp_path), "--timeout", "10"]
    alice = subprocess.Popen([*cmd, "alice", "--listen", address, *base, "--preshared",
                              keys[0]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    bob = subprocess.run([*cmd, "bob", "--connect", address, *base, "--preshared", keys[1]],
                         capture_output=True, text=True, timeout=120)
    _, a_err = alice.communicate(timeout=120)
    assert alice.returncode != 0
    assert "Authentication" in a_err or "authentic" in a_err.lower()
    assert not (tmp_path / "keys" / "alice-2p").exists()
    assert bob.returncode != 0
