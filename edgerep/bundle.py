"""The output directory (bundle) and its manifest.

A bundle is written into a temporary directory next to the target
(``.<name>.tmp-XXXX``) and renamed into place only when complete, so a failed run
never leaves a half-written bundle and never damages an earlier one.

``manifest.json`` (schema version 1) lists the inputs and outputs, every artifact
with its checksum, tool versions and parity numbers, the SHA-256 of every file in
the bundle, and the ledger of what each stage did. Readers validate it against
`MANIFEST_SCHEMA` and never evaluate anything from it.

What the checksums protect, and what not:

- ``checksum`` (required) is the SHA-256 of the rest of the manifest, which lists
  the SHA-256 of every file. It proves **integrity**: a truncated copy, a disk
  error, or a hand edit of the manifest or of any file is detected on read. A
  manifest without it is refused unless the reader passes ``trust_unsigned``
  (for manifests written by other tools).
- It does **not** prove **authenticity**: anyone who can write the bundle can
  recompute every hash. For bundles shipped to devices, sign them: with a secret
  ``key``, `write_manifest` adds ``signature`` (HMAC-SHA256 of the manifest), and a
  reader given the same key refuses a bundle whose signature is missing or wrong.
  Keep the key off the bundle; anyone holding it can sign.
"""

from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from edgerep._json import schema_problems
from edgerep.errors import ConfigError, VerificationError

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_SCHEMA",
    "SCHEMA_VERSION",
    "atomic_output_dir",
    "check_output_dir",
    "private_dir",
    "read_manifest",
    "remove_stale",
    "read_key_file",
    "sha256_file",
    "sign_bundle",
    "write_manifest",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "dtype"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "shape": {"type": "array", "items": {"type": ["integer", "string"]}},
        "dtype": {"type": "string", "minLength": 1},
    },
}

_REL_PATH = {"type": "string", "minLength": 1}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "edgerep bundle manifest",
    "type": "object",
    "required": [
        "schema_version",
        "inputs",
        "outputs",
        "artifacts",
        "ledger",
        "files",
        "checksum",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "edgerep_version": {"type": "string"},
        "created": {"type": "string"},
        "source": {"type": "object"},
        "inputs": {"type": "array", "items": _TENSOR},
        "outputs": {"type": "array", "items": _TENSOR},
        "artifacts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["format", "file", "precision", "sha256", "tool_versions", "parity"],
                "properties": {
                    "format": {"type": "string", "minLength": 1},
                    "file": _REL_PATH,
                    "precision": {"type": "string", "minLength": 1},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "tool_versions": {
                        "type": "object",
                        "additionalProperties": {"type": ["string", "null"]},
                    },
                    "parity": {"type": "object"},
                    "files": {"type": "array", "items": _REL_PATH},
                    "notes": {"type": "array", "items": {"type": "string"}},
                    # verified, or kept without verification: its runtime cannot run
                    # here, or it is only the plan to build it (TensorRT without a GPU)
                    "status": {
                        "enum": ["verified", "exported-not-verified-here", "not-built-here"]
                    },
                    # a folder artifact (.mlpackage); "file" is a file inside it
                    "package": _REL_PATH,
                    "metadata": {"type": "object"},
                },
            },
        },
        "ledger": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["stage", "action", "detail", "error"],
                "properties": {
                    "stage": {"type": "string", "minLength": 1},
                    "action": {"type": "string", "minLength": 1},
                    "detail": {"type": "string"},
                    "error": {"type": ["number", "null"]},
                },
            },
        },
        "files": {
            "type": "object",
            "additionalProperties": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        },
        "checksum": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "signature": {
            "type": "object",
            "required": ["alg", "value"],
            "properties": {
                "alg": {"const": "hmac-sha256"},
                "value": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            },
        },
    },
}
#: the schema of manifests accepted with ``trust_unsigned`` (no checksum required)
_UNSIGNED_SCHEMA: dict[str, Any] = {
    **MANIFEST_SCHEMA,
    "required": [k for k in MANIFEST_SCHEMA["required"] if k != "checksum"],
}


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


# --- the atomic directory --------------------------------------------------------------


def check_output_dir(path: str | Path, *, overwrite: bool) -> Path:
    """Check that `path` may be written; call it before any expensive work.

    Returns:
        The path, resolved.

    Raises:
        ConfigError: it exists and `overwrite` is False, or it exists and is not a
            directory.
    """
    target = Path(path).expanduser().resolve()
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise ConfigError(
                f"output path {str(target)!r} exists and is not a directory; choose another path"
            )
        if not overwrite:
            raise ConfigError(
                f"output directory {str(target)!r} already exists; pass --force "
                "(overwrite=True) to replace it, or choose another path"
            )
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- temporary directories and what a killed run leaves ---------------------------------
#
# Every temporary directory beside a target is named ``.<target>.<kind>-<owner>-<random>``
# where <owner> is ``p<pid>s<start ticks>h<host hash>``: a later run (or the supervising
# parent of a crashed one) can tell that its owner is gone and remove it, and restore a
# previous output that was being swapped out (``.<target>.old-...``) when the target is
# missing. Directories whose owner cannot be read (other tools, older edgerep) are only
# reported.

_KINDS = ("tmp", "old", "float")


def _start_ticks(pid: int) -> int:
    """The process start time in clock ticks since boot (0 where /proc is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def _host_tag() -> str:
    import socket

    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _owner_tag() -> str:
    return f"p{os.getpid()}s{_start_ticks(os.getpid())}h{_host_tag()}"


def private_dir(target: str | Path, kind: str) -> Path:
    """A new directory beside `target` whose name records its owner (see above).

    Args:
        target: the output it belongs to.
        kind: ``"tmp"`` (the new output), ``"old"`` (the previous one being swapped
            out) or ``"float"`` (scratch work).
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    target = Path(target)
    return Path(
        tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{_owner_tag()}-", dir=target.parent)
    )


def _owner_alive(name: str) -> bool | None:
    """Whether the owner recorded in a private directory's name runs (None: unknown)."""
    m = re.search(r"-p(\d+)s(\d+)h([0-9a-f]{8})-", name)
    if not m:
        return None
    pid, ticks, host = int(m.group(1)), int(m.group(2)), m.group(3)
    if host != _host_tag():
        return None  # another machine's (shared filesystem): not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # runs, as another user
    # a reused pid is another process: compare start times where they can be read
    now = _start_ticks(pid)
    return not (ticks and now and now != ticks)


def remove_stale(target: str | Path) -> list[str]:
    """Clean what killed runs left beside `target`; returns what was done, as text.

    A temporary or scratch directory whose owner is gone is removed. A previous
    output that was being swapped out (``.old-``) is put back when `target` is
    missing, else removed. Directories whose owner is unknown or alive are left,
    and reported when their owner is unknown.
    """
    target = Path(target).expanduser().resolve()
    done: list[str] = []
    if not target.parent.is_dir():
        return done
    for kind in ("old", "tmp", "float"):
        for d in sorted(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*")):
            alive = _owner_alive(d.name)
            if alive is None:
                done.append(
                    f"left {str(d)!r}: it looks like an interrupted run's leftovers but its "
                    "owner is unknown; delete it if no edgerep run is writing it"
                )
                continue
            if alive:
                continue
            if kind == "old" and not target.exists() and not target.is_symlink():
                os.rename(d, target)
                done.append(f"restored the previous output {str(target)!r} from {d.name!r}")
                continue
            shutil.rmtree(d, ignore_errors=True)
            done.append(f"removed {str(d)!r}, left by an interrupted run")
    for line in done:
        logger.warning("%s", line)
    return done


@contextlib.contextmanager
def atomic_output_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` when the block succeeds.

    The temporary directory sits next to the target (same filesystem, so the
    final rename is atomic). If the block raises, the temporary directory is
    removed and any existing target is untouched. With `overwrite`, an existing
    target is moved aside, the new one renamed into place, and only then is the old
    one deleted; if the swap fails the old one is put back.

    Args:
        path: the final directory.
        overwrite: replace an existing directory.

    Raises:
        ConfigError: before the block runs, if the target exists and `overwrite`
            is False (or it is not a directory).
    """
    from edgerep import _interrupt

    target = check_output_dir(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = private_dir(target, "tmp")
    # mkdtemp makes the directory private (0700); a bundle gets the usual permissions
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        with _interrupt.signals_blocked():
            # an interrupt that a backend swallowed must not let the new output replace
            # the old one
            _interrupt.check()
            _commit(tmp, target, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, target: Path, *, overwrite: bool) -> None:
    if not target.exists():
        try:
            os.rename(tmp, target)
        except OSError as e:
            raise ConfigError(
                f"cannot move the finished bundle to {str(target)!r}: {e}; did another process "
                "create it meanwhile? Pass --force to replace it"
            ) from e
        return
    check_output_dir(target, overwrite=overwrite)
    old = target.parent / f".{target.name}.old-{_owner_tag()}-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- the manifest ------------------------------------------------------------------------


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k not in ("checksum", "signature")}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _signature(manifest: Mapping[str, Any], key: bytes) -> str:
    return hmac.new(bytes(key), _canonical(manifest), hashlib.sha256).hexdigest()


def _validate(manifest: Any, *, trust_unsigned: bool = False) -> list[str]:
    """Problems with `manifest` against `MANIFEST_SCHEMA` (empty when valid)."""
    schema = _UNSIGNED_SCHEMA if trust_unsigned else MANIFEST_SCHEMA
    return schema_problems(
        manifest, schema, lambda m: _validate_by_hand(m, required=schema["required"])
    )


def _validate_by_hand(manifest: Any, *, required: list[str] | None = None) -> list[str]:
    """The required keys and their types, for when jsonschema is not installed."""
    if not isinstance(manifest, dict):
        return [f"<root>: expected an object, got {type(manifest).__name__}"]
    problems = [
        f"<root>: {k!r} is a required property"
        for k in (required or MANIFEST_SCHEMA["required"])
        if k not in manifest
    ]
    if manifest.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        problems.append(f"schema_version: {SCHEMA_VERSION} was expected")
    sections = {
        "inputs": _TENSOR["required"],
        "outputs": _TENSOR["required"],
        "artifacts": MANIFEST_SCHEMA["properties"]["artifacts"]["items"]["required"],
        "ledger": MANIFEST_SCHEMA["properties"]["ledger"]["items"]["required"],
    }
    for section, required in sections.items():
        rows = manifest.get(section, [])
        if not isinstance(rows, list):
            problems.append(f"{section}: expected an array")
            continue
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                problems.append(f"{section}/{i}: expected an object")
                continue
            problems += [
                f"{section}/{i}: {k!r} is a required property" for k in required if k not in row
            ]
    if not isinstance(manifest.get("files", {}), dict):
        problems.append("files: expected an object")
    return problems


def _safe_relpath(rel: str, where: str) -> PurePosixPath:
    """A manifest path must stay inside the bundle: relative, no '..'."""
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or "\\" in rel or not p.parts:
        raise VerificationError(
            f"manifest {where} names {rel!r}, which is outside the bundle; a bundle's paths must "
            "be relative and stay inside it: the manifest is corrupt or was tampered with"
        )
    return p


def _bundle_files(directory: Path) -> dict[str, str]:
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def write_manifest(
    directory: str | Path, manifest: Mapping[str, Any], *, key: bytes | None = None
) -> dict[str, Any]:
    """Write ``manifest.json`` into `directory`, after validating it.

    Fills in ``schema_version`` if absent, ``files`` (the SHA-256 of every file in
    the directory but the manifest) and ``checksum`` (over the rest of the
    manifest); each artifact's ``sha256`` must already be right. The file is
    written to a temporary name and renamed.

    Args:
        directory: the bundle directory (usually the temporary one).
        manifest: inputs, outputs, artifacts, ledger and optional metadata.
        key: sign the manifest with this secret (HMAC-SHA256, stored as
            ``signature``); readers given the same key check it.

    Returns:
        The manifest as written.

    Raises:
        ConfigError: the manifest does not match the schema, an artifact's file is
            missing, or its checksum is wrong.
    """
    directory = Path(directory)
    data = {"schema_version": SCHEMA_VERSION, **copy.deepcopy(dict(manifest))}
    data["files"] = _bundle_files(directory)
    data.pop("checksum", None)
    data.pop("signature", None)
    problems = _validate(data, trust_unsigned=True)  # the checksum comes last
    if problems:
        raise ConfigError("manifest does not match its schema: " + "; ".join(problems[:10]))
    for art in data["artifacts"]:
        rel = art["file"]
        if data["files"].get(rel) != art["sha256"]:
            raise ConfigError(
                f"artifact {art['format']!r} names file {rel!r}, which is missing from "
                f"{str(directory)!r} or has another checksum"
            )
    try:
        data["checksum"] = hashlib.sha256(_canonical(data)).hexdigest()
    except ValueError as e:  # NaN or Inf in a number
        raise ConfigError(f"manifest holds a value JSON cannot represent: {e}") from e
    if key is not None:
        if not key:
            raise ConfigError("the signing key is empty; use a secret of at least 16 bytes")
        data["signature"] = {"alg": "hmac-sha256", "value": _signature(data, key)}
    tmp = directory / f".{MANIFEST_NAME}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
        os.replace(tmp, directory / MANIFEST_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    return data


def read_manifest(
    directory: str | Path,
    *,
    verify_files: bool = True,
    trust_unsigned: bool = False,
    key: bytes | None = None,
) -> dict[str, Any]:
    """Read and check a bundle's ``manifest.json``.

    Args:
        directory: the bundle directory.
        verify_files: also check the SHA-256 of every file the manifest lists.
        trust_unsigned: accept a manifest without ``checksum`` (written by another
            tool); its file hashes are still checked.
        key: the secret the bundle was signed with: its ``signature`` must be present
            and match (see the module docstring for what this protects).

    Returns:
        The manifest.

    Raises:
        VerificationError: the manifest is missing, not JSON, does not match the
            schema, was edited after it was written, or a file is missing or was
            changed.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise VerificationError(
            f"{str(directory)!r} has no {MANIFEST_NAME}; it is not an edgerep bundle, or an "
            "incomplete one"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VerificationError(
            f"{str(path)!r} is not valid JSON ({e}); the bundle is corrupt"
        ) from e
    if isinstance(data, dict) and "checksum" not in data and not trust_unsigned:
        raise VerificationError(
            f"{str(path)!r} has no checksum, so nothing proves it is the manifest edgerep "
            "wrote (a removed checksum lets a swapped model and its hash pass); re-create the "
            "bundle, or pass --trust-unsigned (trust_unsigned=True) for a manifest another "
            "tool wrote"
        )
    problems = _validate(data, trust_unsigned=trust_unsigned)
    if problems:
        raise VerificationError(
            f"{str(path)!r} does not match the manifest schema (version {SCHEMA_VERSION}): "
            + "; ".join(problems[:10])
        )
    if "checksum" in data and hashlib.sha256(_canonical(data)).hexdigest() != data["checksum"]:
        raise VerificationError(
            f"{str(path)!r} was modified after it was written (its checksum does not match); "
            "re-create the bundle instead of editing its manifest"
        )
    if key is not None:
        sig = data.get("signature")
        if not isinstance(sig, dict):
            raise VerificationError(
                f"{str(path)!r} is not signed, but a signing key was given: refusing an "
                "unsigned bundle; sign it when writing it (--sign-key-file)"
            )
        if not hmac.compare_digest(str(sig.get("value", "")), _signature(data, key)):
            raise VerificationError(
                f"{str(path)!r}: the signature does not match the key: the bundle was signed "
                "with another key or modified after signing"
            )
    for rel in data["files"]:
        _safe_relpath(rel, "files")
    for art in data["artifacts"]:
        _safe_relpath(art["file"], f"artifact {art['format']!r}")
        if "package" in art:
            _safe_relpath(art["package"], f"artifact {art['format']!r} package")
        if data["files"].get(art["file"]) != art["sha256"]:
            raise VerificationError(
                f"{str(path)!r}: artifact {art['format']!r} file {art['file']!r} has checksum "
                f"{art['sha256'][:12]}... but the file list says otherwise; the manifest is corrupt"
            )
    if verify_files:
        for rel, expected in data["files"].items():
            f = directory / rel
            if not f.is_file():
                raise VerificationError(
                    f"bundle {str(directory)!r} is missing {rel!r}, which its manifest lists"
                )
            if sha256_file(f) != expected:
                raise VerificationError(
                    f"{str(f)!r} was modified after the bundle was written (SHA-256 mismatch); "
                    "re-create the bundle"
                )
    return data


def read_key_file(path: str | Path) -> bytes:
    """The signing key stored in `path` (its bytes, surrounding whitespace stripped).

    Raises:
        ConfigError: the file is missing, unreadable, or holds fewer than 16 bytes.
    """
    p = Path(path).expanduser()
    try:
        key = p.read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"cannot read the key file {str(p)!r}: {e.strerror or e}") from e
    if len(key) < 16:
        raise ConfigError(
            f"the key file {str(p)!r} holds {len(key)} bytes; a signing key needs at least 16 "
            "(e.g. `head -c 32 /dev/urandom | base64 > key`)"
        )
    return key


def sign_bundle(directory: str | Path, key: bytes) -> dict[str, Any]:
    """Sign an existing bundle's manifest with `key` (HMAC-SHA256), after checking it.

    The bundle must pass `read_manifest` (checksum and every file hash) first, so
    only an intact bundle is signed. Returns the signed manifest.
    """
    data = read_manifest(directory)
    return write_manifest(directory, data, key=key)
