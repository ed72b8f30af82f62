"""The output-safety rule: one place for every command that writes (``seggpt infer``,
``make-mapping``, ``tune-prompt``, ``train``'s run folder, ``reproduce``, every ``seggpt prepare``).

1. **Never into an input.** An output equal to, inside, or containing an input (a source folder
   or file) is refused; paths are compared after resolving symlinks (``~`` expanded too). The
   message names both paths and the option or setting each came from.
2. **Never over an existing output without ``overwrite``.** An existing file, or a non-empty
   folder, is refused unless ``overwrite``; an empty folder counts as new. A file where a folder
   is expected (or the other way round) is refused even with ``overwrite``.
3. **No half-made output.** The output is written to a temporary sibling (same parent, hidden
   name ``.<name>.tmp-*``) and renamed into place only when complete; a failure removes it and
   any parent folders made for it. With ``overwrite`` the old output is replaced only then (a
   folder's previous content is moved to ``.<name>.old-*`` for the swap and removed after).

Entry points: :func:`check_output` (the checks alone, before any work), :func:`output_dir` /
:func:`output_file` (context managers: check, yield the temporary path, commit on success), and
:class:`StagedDir` (the same as an object, for code that cannot wrap its work in a ``with``).
Refusals raise :class:`OutputError`, a :class:`ValueError`.

Inputs are given as ``{label: path}`` (label: the option, e.g. ``"--dataset-dir"``, or setting,
e.g. ``"train_dataset_dir"``), or as a sequence of paths (labelled ``"source"``); empty or
``None`` paths are skipped.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence, Union

__all__ = [
    "OutputError", "StagedDir", "check_not_inside", "check_output", "is_within", "output_dir", "output_file",
    "real_path",
]

PathLike = Union[str, "os.PathLike[str]"]
Inputs = Union[Mapping[str, "PathLike | None"], Sequence["PathLike | None"], None]

TMP_MARK = ".tmp-"
OLD_MARK = ".old-"


class OutputError(ValueError):
    """A refused output (inside an input, or an existing output without ``overwrite``)."""


# --------------------------------------------------------------------------------------------
# the rule
# --------------------------------------------------------------------------------------------
def real_path(path: PathLike) -> Path:
    """``path`` absolute, ``~`` expanded, every symlink resolved (the path need not exist)."""
    return Path(os.path.expanduser(os.fspath(path))).resolve()


def is_within(path: PathLike, parent: PathLike) -> bool:
    """True when ``path`` is ``parent`` or below it, after resolving both."""
    p, q = real_path(path), real_path(parent)
    return p == q or q in p.parents


def _labelled(inputs: Inputs) -> list[tuple[str, Path]]:
    if not inputs:
        return []
    items = inputs.items() if isinstance(inputs, Mapping) else (("source", p) for p in inputs)
    return [(str(label), Path(os.fspath(p))) for label, p in items if p is not None and os.fspath(p) != ""]


def _shown(label: str, path: Path) -> str:
    real = real_path(path)
    extra = f" (resolved: {real})" if real != Path(os.path.abspath(os.path.expanduser(path))) else ""
    return f"{label} {path}{extra}"


def check_not_inside(out: PathLike, inputs: Inputs, what: str = "output") -> None:
    """Refuse ``out`` when it is, lies inside, or contains an input (symlinks resolved)."""
    out_p = Path(os.fspath(out))
    out_r = real_path(out_p)
    for label, src in _labelled(inputs):
        src_r = real_path(src)
        kind = "folder" if src_r.is_dir() or not src_r.exists() else "file"
        if out_r == src_r:
            rel = "is the source"
        elif src_r in out_r.parents:
            rel = "is inside the source"
        elif out_r in src_r.parents:
            rel = "contains the source"
        else:
            continue
        raise OutputError(f"{_shown(what, out_p)} {rel} {kind} {_shown(label, src)}; refusing: outputs are "
                          f"never written into an input (choose a place outside it)")


def check_output(out: PathLike, inputs: Inputs = None, *, what: str = "output", overwrite: bool = False,
                 folder: bool = True) -> None:
    """The whole rule, checked before any work: not inside / equal to / containing an input;
    no existing file or non-empty folder unless ``overwrite``; the right kind (``folder`` or a
    file) when it exists."""
    out = Path(os.fspath(out))
    check_not_inside(out, inputs, what)
    if not (out.exists() or out.is_symlink()):
        return
    if folder:
        if not out.is_dir():
            raise OutputError(f"{what} {out} exists and is not a folder")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"{what} {out} exists and is not empty; refusing to replace it "
                              "(choose a new one, or pass --overwrite to replace it)")
    else:
        if out.is_dir():
            raise OutputError(f"{what} {out} exists and is a folder, not a file")
        if not overwrite:
            raise OutputError(f"{what} {out} exists; refusing to replace it (pass --overwrite to replace it)")


# --------------------------------------------------------------------------------------------
# writing through a temporary sibling
# --------------------------------------------------------------------------------------------
def _make_parent(parent: Path) -> Path | None:
    """Create ``parent`` (and missing ancestors); return the top-most folder made, or None."""
    top = None
    p = parent
    while not p.exists():
        top = p
        if p.parent == p:
            break
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    return top


def _remove_made(parent: Path, top: Path | None) -> None:
    """Remove the (empty) folders :func:`_make_parent` made, deepest first."""
    if top is None:
        return
    p = parent
    while True:
        try:
            p.rmdir()
        except OSError:
            return
        if p == top:
            return
        p = p.parent


class StagedDir:
    """An output folder built in a hidden temporary sibling and moved into place by :meth:`commit`.

    ``replace``: the names this command owns inside the folder. ``None`` (default): the whole
    folder is the output (an existing one is swapped out entirely). A tuple of names: only those
    entries of an existing folder are replaced (removed when the new output lacks them); other
    files in it stay. :meth:`discard` (or a failure in :meth:`commit`) leaves the previous
    output as it was and no temporary folder behind."""

    def __init__(self, out: PathLike, inputs: Inputs = None, *, what: str = "output", overwrite: bool = False,
                 replace: Sequence[str] | None = None) -> None:
        self.out = Path(os.fspath(out))
        self.inputs, self.what, self.overwrite = inputs, what, overwrite
        self.replace = tuple(replace) if replace is not None else None
        self.tmp: Path | None = None
        self._made: Path | None = None

    def check(self) -> None:
        check_output(self.out, self.inputs, what=self.what, overwrite=self.overwrite, folder=True)

    def open(self) -> Path:
        """Check again (cheap), create the temporary sibling and return it."""
        self.check()
        self._made = _make_parent(self.out.parent)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{TMP_MARK}", dir=self.out.parent))
        return self.tmp

    def discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
        _remove_made(self.out.parent, self._made)
        self._made = None

    def commit(self) -> Path:
        """Move the finished output into place (the old one is replaced only now)."""
        if self.tmp is None:
            raise RuntimeError("StagedDir.commit() without open()")
        tmp, out = self.tmp, self.out
        try:
            if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
                out.rmdir()  # an empty folder counts as new
            if not (out.exists() or out.is_symlink()):
                os.replace(tmp, out)
            elif self.replace is None:
                _swap_folder(tmp, out)
            else:
                _merge_names(tmp, out, self.replace)
        except BaseException:
            self.discard()
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        self.tmp = self._made = None
        return out

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


def _swap_folder(tmp: Path, out: Path) -> None:
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD_MARK}", dir=out.parent))
    old.rmdir()
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _merge_names(tmp: Path, out: Path, names: Sequence[str]) -> None:
    """Replace ``out/<name>`` by ``tmp/<name>`` for every owned name (old ones set aside first,
    put back if a move fails); other entries of ``out`` are left alone."""
    new = {p.name for p in tmp.iterdir()}
    stray = sorted(new - set(names))
    if stray:
        raise RuntimeError(f"staged output has entries it does not own: {stray}")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}{OLD_MARK}", dir=out.parent))
    moved_old: list[str] = []
    moved_new: list[str] = []
    try:
        for name in names:
            if (out / name).exists() or (out / name).is_symlink():
                os.replace(out / name, old / name)
                moved_old.append(name)
        for name in names:
            if name in new:
                os.replace(tmp / name, out / name)
                moved_new.append(name)
    except BaseException:
        for name in moved_new:
            with contextlib.suppress(OSError):
                os.replace(out / name, tmp / name)
        for name in moved_old:
            with contextlib.suppress(OSError):
                os.replace(old / name, out / name)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def output_dir(out: PathLike, inputs: Inputs = None, *, what: str = "output", overwrite: bool = False,
               replace: Sequence[str] | None = None) -> Iterator[Path]:
    """Check the rule, yield a fresh temporary sibling folder; on success it becomes ``out``
    (see :class:`StagedDir`); on failure it is removed and ``out`` is left as it was."""
    with StagedDir(out, inputs, what=what, overwrite=overwrite, replace=replace) as tmp:
        yield tmp


@contextlib.contextmanager
def output_file(out: PathLike, inputs: Inputs = None, *, what: str = "output",
                overwrite: bool = False) -> Iterator[Path]:
    """Check the rule, yield a temporary sibling file path (hidden, same folder) to write; on
    success it is renamed onto ``out`` (atomic), on failure removed."""
    out = Path(os.fspath(out))
    check_output(out, inputs, what=what, overwrite=overwrite, folder=False)
    made = _make_parent(out.parent)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}{TMP_MARK}", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        _remove_made(out.parent, made)
        raise
