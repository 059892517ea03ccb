"""The upload an agent accepts: an uncompressed tar of one bundle, packed and unpacked safely.

Layout: ``bundle/manifest.json`` and every file the manifest lists under
``bundle/``, plus an optional ``data.npz`` (the accuracy dataset). Nothing else.

Unpacking trusts nothing in the archive: only regular files and directories;
member names must be relative POSIX paths without ``..``, backslashes, NUL or
empty parts, at most `MAX_DEPTH` deep; every file is created with ``O_EXCL |
O_NOFOLLOW`` under a fresh directory, so a duplicate member or a link planted by
an earlier member cannot redirect a write; the archive is uncompressed, so what is
written is never more than what was uploaded. Then `verify_bundle` checks every
file against the manifest's SHA-256 and refuses files the manifest does not list.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import IO

from edgerep.errors import ConfigError, VerificationError

__all__ = [
    "BUNDLE_DIR",
    "DATA_NAME",
    "MAX_DEPTH",
    "UnsafeArchiveError",
    "pack_bundle",
    "safe_extract",
    "verify_bundle",
]

BUNDLE_DIR = "bundle"
DATA_NAME = "data.npz"
MAX_DEPTH = 16
MAX_MEMBERS = 10_000
_CHUNK = 1 << 20


class UnsafeArchiveError(ConfigError):
    """An archive member that must not be written (link, device, path outside, duplicate)."""


def _bundle_members(bundle: Path) -> list[str]:
    from edgerep.bundle import MANIFEST_NAME, read_manifest

    manifest = read_manifest(bundle)  # verifies the checksums before anything is sent
    return [MANIFEST_NAME, *sorted(manifest["files"])]


def pack_bundle(bundle: str | Path, out: IO[bytes], *, data: str | Path | None = None) -> int:
    """Write the upload for `bundle` (and the dataset `data`, an .npz) to `out`.

    Returns:
        The bytes written.

    Raises:
        VerificationError: the bundle does not match its manifest.
        ConfigError: `data` is not an .npz file.
    """
    root = Path(bundle)
    start = out.tell()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in _bundle_members(root):
            tar.add(root / rel, arcname=f"{BUNDLE_DIR}/{rel}", recursive=False, filter=_plain)
        if data is not None:
            d = Path(data)
            if d.suffix != ".npz" or not d.is_file():
                raise ConfigError(
                    f"only an .npz dataset can go to a remote device; got {str(d)!r} (save x and "
                    "y with numpy.savez)"
                )
            tar.add(d, arcname=DATA_NAME, recursive=False, filter=_plain)
    return out.tell() - start


def _plain(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def _check_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    bad = (
        not name
        or "\\" in name
        or "\x00" in name
        or p.is_absolute()
        or name.startswith("/")
        or any(part in ("", "..") for part in name.split("/") if part != ".")
        or len(p.parts) > MAX_DEPTH
        or any(len(part) > 255 for part in p.parts)
    )
    if bad:
        raise UnsafeArchiveError(
            f"archive member {name!r} would be written outside the job directory or has an "
            "invalid name; member names must be relative paths without '..'"
        )
    if p.parts[0] != BUNDLE_DIR and name != DATA_NAME:
        raise UnsafeArchiveError(
            f"archive member {name!r} is neither under {BUNDLE_DIR}/ nor {DATA_NAME}"
        )
    return p


def _open_new(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags, 0o600)
    except FileExistsError as e:
        raise UnsafeArchiveError(
            f"archive member {path.name!r} appears twice (or names an existing path)"
        ) from e


def _mkdirs(root: Path, rel: PurePosixPath) -> Path:
    here = root
    for part in rel.parts:
        here = here / part
        if here.is_symlink() or (here.exists() and not here.is_dir()):
            raise UnsafeArchiveError(f"archive directory {str(rel)!r} collides with a file")
        here.mkdir(mode=0o700, exist_ok=True)
    return here


def safe_extract(archive: IO[bytes], dest: str | Path, *, max_bytes: int) -> list[str]:
    """Unpack `archive` (an uncompressed tar) into the empty directory `dest`.

    Returns:
        The names of the files written, relative to `dest`.

    Raises:
        UnsafeArchiveError: a link, device, FIFO, path outside `dest`, duplicate, or
            more than `MAX_MEMBERS` members or `max_bytes` bytes in all.
        ConfigError: not an uncompressed tar archive (or a truncated one).
    """
    root = Path(dest)
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ConfigError(f"extraction directory {str(root)!r} is not empty")
    written: list[str] = []
    total = 0
    try:
        with tarfile.open(fileobj=archive, mode="r:") as tar:
            for i, member in enumerate(tar):
                if i >= MAX_MEMBERS:
                    raise UnsafeArchiveError(f"the archive has more than {MAX_MEMBERS} members")
                rel = _check_name(member.name)
                if member.isdir():
                    _mkdirs(root, rel)
                    continue
                if not member.isreg():
                    raise UnsafeArchiveError(
                        f"archive member {member.name!r} is a "
                        f"{'link' if member.issym() or member.islnk() else 'special file'}; "
                        "only regular files and directories are accepted"
                    )
                total += member.size
                if total > max_bytes:
                    raise UnsafeArchiveError(f"the archive unpacks to more than {max_bytes} bytes")
                parent = _mkdirs(root, rel.parent) if len(rel.parts) > 1 else root
                target = parent / rel.name
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isreg() members always have data
                    raise UnsafeArchiveError(f"archive member {member.name!r} has no data")
                fd = _open_new(target)
                with os.fdopen(fd, "wb") as f:
                    while chunk := source.read(_CHUNK):
                        f.write(chunk)
                written.append(rel.as_posix())
    except tarfile.TarError as e:
        raise ConfigError(f"the upload is not a valid uncompressed tar archive: {e}") from e
    except EOFError as e:
        raise ConfigError(f"the upload is a truncated tar archive: {e}") from e
    return written


def _files_on_disk(root: Path) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = Path(dirpath, name)
            mode = os.lstat(full).st_mode
            if not stat.S_ISREG(mode):
                raise UnsafeArchiveError(f"{str(full)!r} is not a regular file")
            yield full.relative_to(root).as_posix()


def verify_bundle(bundle: str | Path, *, key: bytes | None = None) -> dict:
    """Check an unpacked bundle: every file matches the manifest's SHA-256, none is extra,
    and, with `key`, the manifest carries a valid HMAC signature made with it
    (``edgerep sign``).

    Returns:
        The manifest.

    Raises:
        VerificationError: a missing, changed or unlisted file, or a bad manifest.
    """
    from edgerep.bundle import MANIFEST_NAME, read_manifest

    root = Path(bundle)
    manifest = read_manifest(root, verify_files=True, key=key)
    extra = sorted(set(_files_on_disk(root)) - set(manifest["files"]) - {MANIFEST_NAME})
    if extra:
        raise VerificationError(
            f"the bundle holds files its manifest does not list: {extra[:5]}; only listed, "
            "checksummed files are accepted"
        )
    return manifest
