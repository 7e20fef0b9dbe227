"""Reasoning that survives stateless clients: `include: ["reasoning.encrypted_content"]` returns each
reasoning item's text sealed in `encrypted_content`, and a reasoning input item that carries it has it opened
and its analysis put back into the conversation (Codex and the Agents SDK with `store: false` send the
items back this way, with no summary or text).

Sealing is authenticated encryption (`cryptography`'s Fernet: AES-128-CBC and HMAC-SHA256), so a client can
neither read nor alter the reasoning; a blob that does not open (tampered with, or sealed under another key)
is a 400 naming `input[i].encrypted_content`. The key: `serve --reasoning-key`, else
$GPTOSS_JAX_REASONING_KEY, else one made at start, under which blobs do not survive a restart. Any string
serves as a key: it is stretched with SHA-256 into Fernet's 32 bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets

from cryptography.fernet import Fernet, InvalidToken

from .protocol import APIError

KEY_ENV = "GPTOSS_JAX_REASONING_KEY"
VERSION = 1


class ReasoningSealer:
    def __init__(self, key: str | None = None):
        key = key or os.environ.get(KEY_ENV)
        self.ephemeral = not key  # blobs sealed under a key made here do not survive a restart
        key = key or secrets.token_urlsafe(32)
        self._f = Fernet(base64.urlsafe_b64encode(hashlib.sha256(key.encode()).digest()))

    def seal(self, text: str) -> str:
        return self._f.encrypt(json.dumps({"v": VERSION, "analysis": text}).encode()).decode()

    def open(self, blob: str, where: str) -> str:
        """The analysis sealed in `blob`, or a 400 naming `where`."""
        try:
            data = json.loads(self._f.decrypt(blob.encode()))
            if (
                not isinstance(data, dict)
                or data.get("v") != VERSION
                or not isinstance(data["analysis"], str)
            ):
                raise ValueError
        except (InvalidToken, ValueError, KeyError, UnicodeError):
            raise APIError(
                f"{where}: the encrypted reasoning does not decrypt with this server's key (altered, or sealed "
                "by another server or before a restart without a fixed --reasoning-key)",
                param=where,
                code="invalid_encrypted_content",
            ) from None
        return data["analysis"]
