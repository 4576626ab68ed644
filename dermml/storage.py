"""One interface for local paths and ``s3://`` URIs.

Every stage reads inputs and writes outputs through these functions, so a stage never needs to
know whether its data lives on a laptop disk or in an object store. S3 goes through
``pyarrow.fs.S3FileSystem``; the endpoint comes from ``DERMML_S3_ENDPOINT`` or
``AWS_ENDPOINT_URL`` (MinIO, moto, or a cloud region when unset).
"""

from __future__ import annotations

import contextlib
import functools
import os
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs


class StorageError(RuntimeError):
    """A URI could not be read or written; the message names the URI and what to do."""


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def _strip_file_scheme(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host or scheme
        kwargs["scheme"] = scheme if host else "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    uri = str(uri)
    if uri.startswith("s3://"):
        endpoint = os.environ.get("DERMML_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
        return _s3(endpoint, region), uri[len("s3://") :]
    if is_remote(uri):
        raise StorageError(f"{uri}: unsupported URI scheme; use a local path or s3://bucket/key")
    return pafs.LocalFileSystem(), str(Path(_strip_file_scheme(uri)).absolute())


def join(base: str, *parts: str) -> str:
    """Join path segments onto a local path or URI."""
    base = str(base)
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return str(Path(_strip_file_scheme(base)).joinpath(*parts))


def parent(uri: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        scheme, _, rest = uri.partition("://")
        return f"{scheme}://{posixpath.dirname(rest.rstrip('/'))}"
    return str(Path(_strip_file_scheme(uri)).parent)


def resolve(uri: str, base_dir: str) -> str:
    """Resolve a possibly relative ``uri`` against ``base_dir`` (the manifest's folder)."""
    uri = str(uri)
    if is_remote(uri) or os.path.isabs(_strip_file_scheme(uri)):
        return _strip_file_scheme(uri)
    return join(base_dir, uri)


def exists(uri: str) -> bool:
    fs, path = _filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise StorageError(f"{uri}: cannot reach storage ({exc})") from exc


def missing_files(uris: list[str]) -> list[str]:
    """The URIs in ``uris`` that are not files, in order; one metadata call per filesystem."""
    by_fs: dict[tuple, tuple[pafs.FileSystem, list[tuple[str, str]]]] = {}
    for uri in dict.fromkeys(uris):
        fs, path = _filesystem(uri)
        key = (fs.type_name, 0 if fs.type_name == "local" else id(fs))  # S3 ones are cached
        by_fs.setdefault(key, (fs, []))[1].append((uri, path))
    missing = set()
    for fs, pairs in by_fs.values():
        try:
            infos = fs.get_file_info([path for _, path in pairs])
        except OSError as exc:
            raise StorageError(f"{pairs[0][0]}: cannot reach storage ({exc})") from exc
        missing.update(uri for (uri, _), info in zip(pairs, infos, strict=True)
                       if info.type != pafs.FileType.File)
    return [uri for uri in dict.fromkeys(uris) if uri in missing]


def is_dir(uri: str) -> bool:
    fs, path = _filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = _filesystem(uri)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: file not found") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read ({exc})") from exc


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically: readers see the old file or the whole new one."""
    fs, path = _filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    try:
        with fs.open_output_stream(path) as stream:  # an S3 PUT is atomic
            stream.write(data)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write ({exc})") from exc


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files below ``uri`` (recursively), as URIs of the same kind, sorted."""
    fs, path = _filesystem(uri)
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    out = []
    for info in fs.get_file_info(selector):
        if info.type != pafs.FileType.File:
            continue
        if suffixes and not info.path.lower().endswith(suffixes):
            continue
        out.append(f"s3://{info.path}" if str(uri).startswith("s3://") else info.path)
    return sorted(out)


def delete(uri: str) -> None:
    fs, path = _filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """Yield a local path holding the content at ``uri`` (the path itself when local)."""
    if not is_remote(uri):
        yield _strip_file_scheme(str(uri))
        return
    with tempfile.TemporaryDirectory(prefix="dermml-") as tmp:
        dest = os.path.join(tmp, posixpath.basename(uri.rstrip("/")))
        download(uri, dest)
        yield dest


def download(uri: str, dest: str) -> str:
    """Copy a file or a folder from ``uri`` to the local path ``dest``."""
    if not is_remote(uri):
        src = _strip_file_scheme(uri)
        if os.path.isdir(src):
            shutil.copytree(src, dest, dirs_exist_ok=True)
        else:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        return dest
    if is_dir(uri):
        prefix = uri.rstrip("/") + "/"
        for file_uri in list_files(uri):
            rel = file_uri[len(prefix) :]
            write_local = Path(dest, rel)
            write_local.parent.mkdir(parents=True, exist_ok=True)
            write_local.write_bytes(read_bytes(file_uri))
    else:
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(read_bytes(uri))
    return dest


def upload_dir(local_dir: str, uri: str) -> None:
    """Copy a local folder to ``uri`` (local or s3), file by file."""
    for path in sorted(Path(local_dir).rglob("*")):
        if path.is_file():
            write_bytes(join(uri, str(path.relative_to(local_dir))), path.read_bytes())
