"""The master key that wraps every model data key the service stores.

Two backends behind one small interface:

- :class:`LocalMasterKey`: AES-256-GCM keys in a 0600 key file, one line per version
  (``MODELSEAL-MASTER-KEY-V<n>:BASE64``). The wrapped blob is ``nonce ‖ ciphertext ‖ tag`` with the
  key id as associated data, so a blob copied to another key's row does not unwrap.
- :class:`TransitMasterKey`: OpenBao / Vault transit (``hvac``); the master key never leaves the
  vault. A *derived* transit key with ``context`` = key id gives the same row binding (transit
  takes no associated data).

Rotation makes a new version and re-wraps every stored blob under it; sealed files are not touched,
because they only carry key ids.
"""

from __future__ import annotations

import base64
import os
import re
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from modelseal import atomicfile
from modelseal.crypto.keys import wipe
from modelseal.encoding import b64e
from modelseal.errors import AuthenticationError, KeyFileError, UsageError
from modelseal.keyfile import key_lines, read_text

_LOCAL_LABEL = re.compile(r"MODELSEAL-MASTER-KEY-V(\d+)")


class MasterKey(Protocol):
    def wrap(self, dek: bytes | bytearray, key_id: str) -> tuple[bytes, str]:
        """Return (blob, version) for storage."""
        ...

    def unwrap(self, blob: bytes, version: str, key_id: str) -> bytearray: ...

    def rewrap(self, blob: bytes, version: str, key_id: str) -> tuple[bytes, str]:
        """Re-wrap a stored blob under the current version."""
        ...

    def rotate(self) -> str:
        """Make a new current version; return its name. Old versions stay usable until :meth:`retire`."""
        ...

    def retire_old(self) -> None:
        """Forget versions older than the current one (call after every blob is re-wrapped)."""
        ...

    def describe(self) -> str: ...


class LocalMasterKey:
    """Versioned AES-256-GCM master keys in one local key file (see module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._versions: dict[int, bytes] = {}
        self._load()

    @classmethod
    def create(cls, path: str | os.PathLike[str]) -> LocalMasterKey:
        _write_versions(Path(path), {1: os.urandom(32)}, exclusive=True)
        return cls(path)

    def _load(self) -> None:
        versions = {}
        for label, raw in key_lines(read_text(self.path), str(self.path)):
            match = _LOCAL_LABEL.fullmatch(label)
            if match is None or len(raw) != 32:
                raise KeyFileError(f"{self.path}: expected MODELSEAL-MASTER-KEY-V<n>: lines holding 32-byte keys")
            versions[int(match.group(1))] = raw
        self._versions = versions

    @property
    def current(self) -> int:
        return max(self._versions)

    def describe(self) -> str:
        return f"local key file {self.path} (version {self.current})"

    def wrap(self, dek: bytes | bytearray, key_id: str) -> tuple[bytes, str]:
        nonce = os.urandom(12)
        blob = nonce + AESGCM(self._versions[self.current]).encrypt(nonce, bytes(dek), key_id.encode())
        return blob, f"local:{self.current}"

    def unwrap(self, blob: bytes, version: str, key_id: str) -> bytearray:
        number = int(version.removeprefix("local:")) if version.startswith("local:") else -1
        if number not in self._versions:
            self._load()  # another replica may have rotated
        if number not in self._versions:
            raise UsageError(f"key {key_id} is wrapped by master key {version}, which {self.path} does not hold")
        try:
            return bytearray(AESGCM(self._versions[number]).decrypt(blob[:12], blob[12:], key_id.encode()))
        except InvalidTag:
            raise AuthenticationError(
                f"the stored wrapped key {key_id} does not unwrap: database tampered with"
            ) from None

    def rewrap(self, blob: bytes, version: str, key_id: str) -> tuple[bytes, str]:
        dek = self.unwrap(blob, version, key_id)
        try:
            return self.wrap(dek, key_id)
        finally:
            wipe(dek)

    def rotate(self) -> str:
        self._versions[self.current + 1] = os.urandom(32)
        _write_versions(self.path, self._versions)
        return f"local:{self.current}"

    def retire_old(self) -> None:
        self._versions = {self.current: self._versions[self.current]}
        _write_versions(self.path, self._versions)


def _write_versions(path: Path, versions: dict[int, bytes], exclusive: bool = False) -> None:
    """Write the key file atomically (see :mod:`modelseal.atomicfile`), mode 0600."""
    if exclusive and (path.exists() or path.is_symlink()):
        raise KeyFileError(f"{path} already exists; refusing to overwrite a master key")
    lines = ["# modelseal key-service master key: losing it loses every registered model key\n"]
    lines += [f"MODELSEAL-MASTER-KEY-V{number}:{b64e(key)}\n" for number, key in sorted(versions.items())]
    atomicfile.write_bytes(path, "".join(lines).encode(), atomicfile.PRIVATE, overwrite=not exclusive)


class TransitMasterKey:
    """A derived OpenBao/Vault transit key (see module docstring)."""

    def __init__(self, url: str, token: str, key_name: str = "modelseal", mount: str = "transit") -> None:
        try:
            import hvac
            import hvac.exceptions
        except ImportError:
            raise UsageError("the transit master key needs hvac: pip install 'modelseal[keyserver]'") from None
        self._exceptions = hvac.exceptions
        self.url, self.key_name, self.mount = url, key_name, mount
        self._client = hvac.Client(url=url, token=token)
        self._transit = self._client.secrets.transit

    def describe(self) -> str:
        return f"transit key {self.key_name!r} at {self.url}"

    def ensure(self) -> None:
        """Enable the transit engine and create the derived key if they do not exist yet."""
        try:
            if f"{self.mount}/" not in self._client.sys.list_mounted_secrets_engines():
                self._client.sys.enable_secrets_engine("transit", path=self.mount)
            self._transit.create_key(self.key_name, derived=True, key_type="aes256-gcm96", mount_point=self.mount)
        except Exception as exc:
            raise UsageError(f"cannot prepare transit key at {self.url}: {_vault_reason(exc)}") from None

    def _call(self, what: str, fn: object, **kwargs: object) -> dict:  # type: ignore[type-arg]
        try:
            return fn(name=self.key_name, mount_point=self.mount, **kwargs)["data"]  # type: ignore[operator,no-any-return]
        except self._exceptions.InvalidRequest as exc:
            raise AuthenticationError(f"transit refused to {what}: {_vault_reason(exc)}") from None
        except Exception as exc:
            raise UsageError(f"transit at {self.url} failed to {what}: {_vault_reason(exc)}") from None

    def wrap(self, dek: bytes | bytearray, key_id: str) -> tuple[bytes, str]:
        data = self._call(
            "encrypt", self._transit.encrypt_data, plaintext=_b64std(bytes(dek)), context=_b64std(key_id.encode())
        )
        ciphertext: str = data["ciphertext"]
        return ciphertext.encode(), "transit:" + ciphertext.split(":")[1]

    def unwrap(self, blob: bytes, version: str, key_id: str) -> bytearray:
        data = self._call(
            f"unwrap key {key_id}",
            self._transit.decrypt_data,
            ciphertext=blob.decode(),
            context=_b64std(key_id.encode()),
        )
        return bytearray(base64.b64decode(data["plaintext"]))

    def rewrap(self, blob: bytes, version: str, key_id: str) -> tuple[bytes, str]:
        """Re-wrap inside the vault (the data key never leaves it)."""
        data = self._call(
            f"rewrap key {key_id}",
            self._transit.rewrap_data,
            ciphertext=blob.decode(),
            context=_b64std(key_id.encode()),
        )
        ciphertext: str = data["ciphertext"]
        return ciphertext.encode(), "transit:" + ciphertext.split(":")[1]

    def rotate(self) -> str:
        try:
            self._transit.rotate_key(self.key_name, mount_point=self.mount)
            info = self._transit.read_key(self.key_name, mount_point=self.mount)["data"]
        except Exception as exc:
            raise UsageError(f"cannot rotate transit key at {self.url}: {_vault_reason(exc)}") from None
        return f"transit:v{info['latest_version']}"

    def retire_old(self) -> None:
        try:
            info = self._transit.read_key(self.key_name, mount_point=self.mount)["data"]
            self._transit.update_key_configuration(
                self.key_name, min_decryption_version=info["latest_version"], mount_point=self.mount
            )
        except Exception as exc:
            raise UsageError(f"cannot retire old transit key versions: {_vault_reason(exc)}") from None


def _b64std(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _vault_reason(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    return "; ".join(map(str, errors)) if errors else f"{type(exc).__name__}: {exc}"
