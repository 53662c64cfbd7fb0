"""Generates the XEdDSA signing vectors frozen in proto/src/xeddsa.rs, with an independent Signal
implementation: python-axolotl-curve25519 (the C curve25519/XEdDSA code of libsignal-protocol-c).

    pip install python-axolotl-curve25519==0.4.1.post2
    python3 docs/vectors/xeddsa_crosscheck.py

Run once on 2026-11-22; its output is what the Rust known-answer test asserts. It is not part of
CI: the vectors are frozen so the test needs no Python.
"""
import hashlib

import axolotl_curve25519 as curve


def det(label: str, n: int) -> bytes:
    """Deterministic test bytes, so anyone can rerun this and get the same vectors."""
    out = b""
    counter = 0
    while len(out) < n:
        out += hashlib.sha512(f"{label}/{counter}".encode()).digest()
        counter += 1
    return out[:n]


for i in range(6):
    private = curve.generatePrivateKey(det(f"private/{i}", 32))  # clamps
    public = curve.generatePublicKey(private)
    message = b"\x05" + det(f"message/{i}", 32)  # a serialized prekey, as signed in practice
    random = det(f"random/{i}", 64)
    signature = curve.calculateSignature(random, private, message)
    assert curve.verifySignature(public, message, signature) == 0
    print(f'("{private.hex()}", "{message.hex()}", "{random.hex()}", "{signature.hex()}"),')
