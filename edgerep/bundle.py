"""The output directory (bundle) and its manifest.

A bundle is written into a temporary directory next to the target
(``.<name>.tmp-XXXX``) and renamed into place only when complete, so a failed run
never leaves a half-written bundle and never damages an earlier one.

``manifest.json`` (schema version 1) lists the inputs and outputs, every artifact
with its checksum, tool versions and parity numbers, the SHA-256 of every file in
the bundle, and the ledger of what each stage did. It carries its own checksum, so
editing it by hand (or a truncated copy) is detected on read. Readers validate it
against `MANIFEST_SCHEMA` and never evaluate anything from it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
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
    "read_manifest",
    "sha256_file",
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
    "required": ["schema_version", "inputs", "outputs", "artifacts", "ledger", "files"],
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
                    # the kind of verification where a format has several, e.g. Core ML:
                    # "Core ML framework" (macOS) or "reference evaluator" (elsewhere)
                    "verified_by": {"type": "string"},
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
    },
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
    target = check_output_dir(path, overwrite=overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the directory private (0700); a bundle gets the usual permissions
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
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
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --- the manifest ------------------------------------------------------------------------


def _canonical(manifest: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _validate(manifest: Any) -> list[str]:
    """Problems with `manifest` against `MANIFEST_SCHEMA` (empty when valid)."""
    return schema_problems(manifest, MANIFEST_SCHEMA, _validate_by_hand)


def _validate_by_hand(manifest: Any) -> list[str]:
    """The required keys and their types, for when jsonschema is not installed."""
    if not isinstance(manifest, dict):
        return [f"<root>: expected an object, got {type(manifest).__name__}"]
    problems = [
        f"<root>: {k!r} is a required property"
        for k in MANIFEST_SCHEMA["required"]
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


def write_manifest(directory: str | Path, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``manifest.json`` into `directory`, after validating it.

    Fills in ``schema_version`` if absent, ``files`` (the SHA-256 of every file in
    the directory but the manifest) and ``checksum`` (over the rest of the
    manifest); each artifact's ``sha256`` must already be right. The file is
    written to a temporary name and renamed.

    Args:
        directory: the bundle directory (usually the temporary one).
        manifest: inputs, outputs, artifacts, ledger and optional metadata.

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
    problems = _validate(data)
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
    tmp = directory / f".{MANIFEST_NAME}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
        os.replace(tmp, directory / MANIFEST_NAME)
    finally:
        tmp.unlink(missing_ok=True)
    return data


def read_manifest(directory: str | Path, *, verify_files: bool = True) -> dict[str, Any]:
    """Read and check a bundle's ``manifest.json``.

    Args:
        directory: the bundle directory.
        verify_files: also check the SHA-256 of every file the manifest lists.

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
    problems = _validate(data)
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
