"""Writing files safely: inside the folder given, never through a symlink, never a silent overwrite.

Everything here works relative to an open directory, a :class:`Folder`. On POSIX every name below it
is opened with ``O_NOFOLLOW`` through the directory's file descriptor (``openat``), so a symlink
planted anywhere inside (a file, a sub-folder) makes the operation fail instead of reading, writing
or deleting somewhere else, and a folder swapped for a link after it was opened changes nothing.
Where the platform has no ``dir_fd`` support (Windows) the same rules are applied with ``lstat``
checks just before each operation.

The folder itself may be reached through a symlink: a user may deliberately put ``.nbimagine`` or an
export folder on another disk. It is resolved once, when it is opened.

Names that come from outside (provider call ids, prompts, notebook names) go through
:func:`safe_name` before they become a path component; every other name is checked by
:func:`check_name` (one component, no separator, not ``.``/``..``, no NUL).

Writes go to a temporary file in the same folder, are flushed (and fsync'd when ``durable``), then
renamed into place: a reader never sees half a file. Without ``overwrite`` the final name is taken
with ``link()``, which fails if the name exists, so there is no window where another file could be
replaced.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import unicodedata
from collections.abc import Iterator
from pathlib import Path

__all__ = ["Folder", "check_name", "safe_name"]

_DIR_FD = (
    hasattr(os, "O_NOFOLLOW")
    and hasattr(os, "O_DIRECTORY")
    and {os.open, os.mkdir, os.unlink, os.rename, os.stat, os.link} <= os.supports_dir_fd
)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_BINARY = getattr(os, "O_BINARY", 0)

# Characters that separate paths on some system, or look like a separator to a reader.
_LOOKALIKE_SEPARATORS = "\u2215\u2044\u29f8\u29f9\u2216\ufe68\uff3c\uff0f\u2571\u2572\u3033"
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f' + _LOOKALIKE_SEPARATORS + "]")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


def safe_name(text: str, *, fallback: str = "file", max_bytes: int = 100) -> str:
    """One harmless path component made from an untrusted string.

    NFKC-normalised (so a full-width solidus becomes ``/`` and is then replaced), every separator,
    look-alike separator, control or format character and Windows-special character replaced by
    ``_``; no leading dot (no hidden files, no ``..``), no trailing dot or space, not a Windows
    device name, at most ``max_bytes`` bytes of UTF-8 (file systems limit names to 255 bytes). An
    empty result becomes ``fallback``.
    """
    text = unicodedata.normalize("NFKC", str(text))
    text = "".join("_" if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") else ch for ch in text)
    text = _UNSAFE.sub("_", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = text.lstrip(". ").rstrip(". ")
    encoded = text.encode("utf-8")
    if len(encoded) > max_bytes:
        text = encoded[:max_bytes].decode("utf-8", "ignore").rstrip(". ")
    if text.split(".")[0].upper() in _WINDOWS_RESERVED:
        text = f"_{text}"
    return text or fallback


def check_name(name: str) -> str:
    """``name`` if it is exactly one path component, else ``ValueError``."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\x00" in name
            or (os.sep != "/" and os.sep in name) or (os.altsep and os.altsep in name)):
        raise ValueError(f"not a single file name: {name!r}")
    return name


def _write_all(fd: int, data: bytes, *, durable: bool) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    if durable:
        os.fsync(fd)


class Folder:
    """An open directory; every operation stays inside it and never follows a symlink below it.

    Use as a context manager (or call :meth:`close`) so the directory handle is released.
    """

    def __init__(self, path: Path | None, fd: int | None, parent: Folder | None = None, name: str = "") -> None:
        self._path, self._fd, self._parent, self._name = path, fd, parent, name

    @property
    def path(self) -> Path:
        """Where this folder is (the real path of the folder opened, and the names below it)."""
        if self._path is None:
            assert self._parent is not None
            self._path = self._parent.path / self._name
        return self._path

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, create: bool = True) -> Folder:
        """Open ``path`` (created with its parents when ``create``); it may itself be a symlink."""
        target = Path(path).expanduser()
        if create:
            target.mkdir(parents=True, exist_ok=True)
        real = target.resolve(strict=True)
        if not real.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(target))
        fd = os.open(real, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC) if _DIR_FD else None
        return cls(real, fd)

    def child(self, name: str, *, create: bool = False) -> Folder:
        """The sub-folder ``name``; ``OSError`` if it is a symlink or not a folder."""
        check_name(name)
        if create and self.lstat(name) is None:
            try:
                if self._fd is not None:
                    os.mkdir(name, 0o755, dir_fd=self._fd)
                else:
                    os.mkdir(self.path / name, 0o755)
            except FileExistsError:
                pass
            else:
                self.sync()  # the new folder's name survives a power cut, like the files written into it
        if self._fd is not None:
            fd = os.open(name, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=self._fd)
            return Folder(None, fd, self, name)
        st = os.lstat(self.path / name)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder (or a symlink)", str(self.path / name))
        return Folder(self.path / name, None)

    @contextlib.contextmanager
    def descend(self, *names: str, create: bool = False) -> Iterator[Folder]:
        """``with folder.descend("images", "ab") as sub:`` each level opened as :meth:`child` does."""
        opened: list[Folder] = []
        try:
            current = self
            for name in names:
                current = current.child(name, create=create)
                opened.append(current)
            yield current
        finally:
            for folder in reversed(opened):
                folder.close()

    def still_at(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` (links followed) is still this open folder (not deleted, moved or replaced)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        if self._fd is None:
            return stat.S_ISDIR(st.st_mode)
        own = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Folder({str(self.path)!r})"

    # -- looking -------------------------------------------------------------------------------

    def lstat(self, name: str) -> os.stat_result | None:
        """The entry's own status (a symlink is not followed), or ``None`` when there is none."""
        check_name(name)
        try:
            if self._fd is not None:
                return os.stat(name, dir_fd=self._fd, follow_symlinks=False)
            return os.lstat(self.path / name)
        except FileNotFoundError:
            return None

    def names(self) -> list[str]:
        """The names in this folder (any kind of entry)."""
        if self._fd is not None:
            return os.listdir(self._fd)
        return os.listdir(self.path)

    # -- reading -------------------------------------------------------------------------------

    def read(self, name: str, *, limit: int | None = None) -> bytes:
        """The bytes of the regular file ``name`` (``OSError`` for a symlink or anything else).

        ``limit``: refuse (``OSError(EFBIG)``) a file larger than this many bytes, before reading it.
        """
        fd = self._open_file(name, os.O_RDONLY | _O_BINARY)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", str(self.path / name))
            if limit is not None and st.st_size > limit:
                raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(self.path / name))
            chunks = []
            while True:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def open_fd(self, name: str, flags: int, mode: int = 0o644) -> int:
        """``os.open`` of ``name`` in this folder, never through a symlink (the caller closes the fd)."""
        return self._open_file(name, flags, mode)

    def _open_file(self, name: str, flags: int, mode: int = 0o644) -> int:
        check_name(name)
        if self._fd is not None:
            return os.open(name, flags | _O_NOFOLLOW | _O_CLOEXEC, mode, dir_fd=self._fd)
        path = self.path / name
        st = self.lstat(name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "refusing to follow a symlink", str(path))
        return os.open(path, flags | _O_CLOEXEC, mode)

    # -- writing -------------------------------------------------------------------------------

    def write(self, name: str, data: bytes, *, overwrite: bool = False, durable: bool = True,
              atomic: bool = True, sync_folder: bool = True) -> str:
        """Write ``data`` as ``name`` and return ``name``.

        Without ``overwrite`` an existing entry of that name (file, folder or symlink) makes this
        fail with ``FileExistsError``; with it, the entry is replaced by a rename (so a symlink is
        replaced, never written through). ``durable``: fsync the file and (unless ``sync_folder`` is
        False: the caller calls :meth:`sync` itself, once for several files) the folder.
        ``atomic=False`` (only without ``overwrite``): create ``name`` and write it in place, one
        file-system operation less, for callers that can tell a torn file from a whole one.
        """
        check_name(name)
        if not atomic and not overwrite:
            fd = self._open_file(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY)
            try:
                _write_all(fd, data, durable=durable)
            finally:
                os.close(fd)
            if durable and sync_folder:
                self.sync()
            return name
        tmp = self._write_temp(name, data, durable=durable)
        try:
            if overwrite:
                self._rename(tmp, name)
                tmp = ""  # renamed: nothing left to remove
            else:
                self._link_new(tmp, name)
        finally:
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    self._unlink(tmp)
        if durable and sync_folder:
            self.sync()
        return name

    def write_unique(self, name: str, data: bytes, *, durable: bool = True, reuse_identical: bool = True) -> str:
        """Write ``data`` under ``name``, or ``stem-2.ext``, ``stem-3.ext``... whichever is free.

        Nothing existing is ever replaced. With ``reuse_identical`` a file already holding exactly
        these bytes is returned instead of writing a copy. Returns the name used.
        """
        check_name(name)
        stem, dot, ext = name.rpartition(".")
        if not stem:  # no extension ("README") or a leading-dot name
            stem, dot, ext = name, "", ""
        for n in range(1, 10_000):
            candidate = name if n == 1 else f"{stem}-{n}{dot}{ext}"
            st = self.lstat(candidate)
            if st is not None:
                if reuse_identical and stat.S_ISREG(st.st_mode) and st.st_size == len(data):
                    with contextlib.suppress(OSError):
                        if self.read(candidate) == data:
                            return candidate
                continue
            try:
                return self.write(candidate, data, durable=durable)
            except FileExistsError:  # taken meanwhile by someone else
                continue
        raise FileExistsError(errno.EEXIST, "no free name", str(self.path / name))

    def _write_temp(self, name: str, data: bytes, *, durable: bool) -> str:
        tmp = f".{name[:60]}.{secrets.token_hex(6)}.tmp"
        fd = self._open_file(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY)
        try:
            _write_all(fd, data, durable=durable)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                self._unlink(tmp)
            raise
        os.close(fd)
        return tmp

    def _rename(self, src: str, dst: str) -> None:
        if self._fd is not None:
            os.rename(src, dst, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        else:
            os.replace(self.path / src, self.path / dst)

    def _link_new(self, src: str, dst: str) -> None:
        try:
            if self._fd is not None:
                os.link(src, dst, src_dir_fd=self._fd, dst_dir_fd=self._fd, follow_symlinks=False)
            else:
                os.link(self.path / src, self.path / dst)
            return
        except FileExistsError:
            raise
        except OSError as exc:  # a file system without hard links (FAT, some network mounts)
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        fd = self._open_file(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_BINARY)
        try:
            _write_all(fd, self.read(src), durable=False)
        finally:
            os.close(fd)

    def _unlink(self, name: str) -> None:
        if self._fd is not None:
            os.unlink(name, dir_fd=self._fd)
        else:
            os.unlink(self.path / name)

    def sync(self) -> None:
        """fsync the folder itself, so that renames into it survive a power cut (POSIX only)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):  # some file systems refuse fsync on a directory
                os.fsync(self._fd)

    # -- deleting and moving -------------------------------------------------------------------

    def unlink_file(self, name: str) -> bool:
        """Delete ``name`` if it is a regular file (never a symlink, folder or device); True if deleted."""
        st = self.lstat(name)
        if st is None or not stat.S_ISREG(st.st_mode):
            return False
        try:
            self._unlink(name)
        except FileNotFoundError:
            return False
        return True

    def rename(self, name: str, new_name: str, *, into: Folder | None = None) -> None:
        """Move the entry ``name`` (whatever it is, a link is moved as a link) to ``new_name``.

        ``into``: another open folder on the same file system. Refuses to replace an existing entry.
        """
        check_name(name)
        check_name(new_name)
        target = into or self
        if target.lstat(new_name) is not None:
            raise FileExistsError(errno.EEXIST, "already exists", str(target.path / new_name))
        if self._fd is not None and target._fd is not None:
            os.rename(name, new_name, src_dir_fd=self._fd, dst_dir_fd=target._fd)
        else:
            os.rename(self.path / name, target.path / new_name)

    def link_from(self, source: Folder, name: str, new_name: str | None = None) -> bool:
        """Hard-link the regular file ``source/name`` here (copy where links are impossible).

        Returns False when ``new_name`` exists already (left alone). ``OSError`` if the source is
        not a regular file.
        """
        new_name = new_name or name
        st = source.lstat(name)
        if st is None or not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(source.path / name))
        try:
            if self._fd is not None and source._fd is not None:
                os.link(name, new_name, src_dir_fd=source._fd, dst_dir_fd=self._fd, follow_symlinks=False)
            else:
                os.link(source.path / name, self.path / new_name)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
        try:
            self.write(new_name, source.read(name), durable=False)
        except FileExistsError:
            return False
        return True
