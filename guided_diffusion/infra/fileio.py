"""File input/output shared by every stage: atomic writes and image/array/JSON/.mat readers.

Outputs are always written to a temporary name in the destination folder and then renamed, so
an interrupted run never leaves a half-written file under the final name (resumable stages
treat "the final file exists" as "this output is complete"). Paths may be local or remote
(``gs://``, ``az://`` via blobfile); remote writes go through blobfile directly, which uploads
whole objects.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np

from .errors import DiffMixError

# blobfile (remote paths), PIL and scipy.io are imported inside the functions that need them: this
# module sits under every command, label-only ones included, and most runs use one or none of them.

_REMOTE_PREFIXES = ("gs://", "az://", "https://", "http://")


def is_remote(path: str) -> bool:
    return str(path).startswith(_REMOTE_PREFIXES)


def exists(path: str) -> bool:
    if is_remote(path):
        import blobfile

        return blobfile.exists(path)
    return os.path.exists(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        import blobfile

        blobfile.makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: str) -> list[str]:
    """Sorted entries (names, not paths) of a local or remote folder."""
    if is_remote(path):
        import blobfile

        return sorted(name.rstrip("/") for name in blobfile.listdir(path))
    return sorted(os.listdir(path))


def join(*parts: str) -> str:
    if is_remote(parts[0]):
        import blobfile

        return blobfile.join(*parts)
    return os.path.join(*parts)


def read_bytes(path: str) -> bytes:
    try:
        if is_remote(path):
            import blobfile

            with blobfile.BlobFile(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DiffMixError(f"{path}: file not found") from None
    except OSError as err:
        raise DiffMixError(f"{path}: cannot read ({err.strerror or err})") from None


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb") -> Iterator[Any]:
    """Open ``path`` for writing through a temporary file that is renamed on success.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    if is_remote(path):
        import blobfile

        with blobfile.BlobFile(path, mode) as f:
            yield f
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    except OSError as err:  # name the file the user asked for, not the hidden temporary name
        raise OSError(err.errno, err.strerror, path) from None
    try:
        # mkstemp creates 0600 files; give the final file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if err.filename is None or err.filename == tmp:  # a write, or the rename: name the destination
            raise OSError(err.errno, err.strerror, path) from None
        raise
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def check_output_dir(path: str, flag: str) -> None:
    """Refuse an output folder that cannot be written, before any long work starts.

    ``path`` may not exist yet (it is created later); then its nearest existing parent must be a
    writable folder. Remote paths are not checked (permissions are the store's).

    Raises:
        DiffMixError naming ``path`` and ``flag``: an existing file, a parent that is a file, a
        symbolic link on the way that dangles or loops, or a folder this process may not write
        (permissions, read-only file system).
    """
    if is_remote(path):
        return
    if not str(path):
        raise DiffMixError(f"{flag} is empty: give an output folder")
    full = os.path.abspath(path)
    if os.path.exists(full) and not os.path.isdir(full):
        raise DiffMixError(f"{path}: {flag} is an existing file, not a folder")
    _check_creatable(full, path, flag)


def _check_creatable(full: str, path: str, flag: str) -> None:
    """The nearest existing folder at or above ``full`` must be a writable folder, and no link on
    the way may dangle or loop (creating through it fails with a bare "File exists")."""
    probe = full
    while not os.path.exists(probe):
        if os.path.islink(probe):
            raise DiffMixError(f"{path}: {flag} cannot be created: {probe} is a symbolic link to "
                               f"{os.readlink(probe)}, which does not resolve (a missing target or a loop)")
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise DiffMixError(f"{path}: {flag} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DiffMixError(f"{path}: {flag} is not writable ({probe}: permission denied or read-only)")


def check_output_file(path: str, flag: str) -> None:
    """Refuse an output file that cannot be written, before any long work starts.

    ``path`` may not exist yet (its folders are created when it is written). An existing file is
    fine: it is replaced by a rename (:func:`atomic_open`), so only its folder must be writable.

    Raises:
        DiffMixError naming ``path`` and ``flag``: an existing folder (or a name ending in '/'), a
        parent that is a file, or a folder this process may not write.
    """
    if is_remote(path):
        return
    if not str(path):
        raise DiffMixError(f"{flag} is empty: give an output file")
    full = os.path.abspath(path)
    if os.path.isdir(full) or str(path).endswith(("/", os.sep)):
        raise DiffMixError(f"{path}: {flag} is a folder, not a file: give a file name")
    _check_creatable(os.path.dirname(full), path, flag)


def check_not_input(out_dir: str, inputs: dict, flag: str) -> None:
    """Refuse an output folder that is, is inside, or contains an input folder of the same command.

    Writing there could overwrite the inputs (ground-truth labels replaced by predictions, say).
    Local paths are compared as real paths (symbolic links and ``..`` resolved, the output folder
    need not exist yet); remote ones as written.

    Args:
        out_dir: the output folder (``''``/None: nothing to check).
        inputs: ``{input flag: folder}``; empty folders are skipped.
        flag: the output folder's flag, for the message.

    Raises:
        DiffMixError naming ``out_dir``, ``flag`` and the input flag and folder.
    """
    if not out_dir:
        return

    def key(path: str) -> str:
        return str(path).rstrip("/") if is_remote(path) else os.path.realpath(path)

    def within(inner: str, outer: str) -> bool:
        return inner == outer or inner.startswith(outer.rstrip("/" + os.sep) + ("/" if is_remote(outer) else os.sep))

    out = key(out_dir)
    for in_flag, path in inputs.items():
        if not path or is_remote(path) != is_remote(out_dir):
            continue
        src = key(path)
        if out == src:
            relation = "is"
        elif within(out, src):
            relation = "is inside"
        elif within(src, out):
            relation = "contains"
        else:
            continue
        raise DiffMixError(f"{out_dir}: {flag} {relation} the input folder {in_flag} {path}; writing there "
                           "could overwrite the inputs: choose an output folder outside them")


def write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_json(path: str, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (numpy scalars/arrays converted)."""
    write_bytes(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def read_json(path: str) -> Any:
    try:
        return json.loads(read_bytes(path).decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiffMixError(f"{path}: not valid JSON ({err})") from None


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def read_image(path: str) -> np.ndarray:
    """Read an RGB image (png, tif/tiff, jpg) as uint8 [H, W, 3] (alpha dropped, grey expanded).

    16-bit images keep their high byte (value >> 8), as Pillow itself reads 16-bit RGB PNGs;
    32-bit integer or float images are refused (their value range is not defined).
    """
    from PIL import Image, UnidentifiedImageError

    data = read_bytes(path)
    if not data:
        raise DiffMixError(f"{path}: not a readable image (empty file, 0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode.startswith("I;16"):
                # convert("RGB") would clip 16-bit values at 255 (an all-white image).
                grey = (np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8)
                arr = np.repeat(grey[..., None], 3, axis=2)
            elif im.mode in ("I", "F"):
                raise DiffMixError(
                    f"{path}: a 32-bit {'float' if im.mode == 'F' else 'integer'} image; "
                    "save it as 8-bit (or 16-bit) RGB"
                )
            else:
                arr = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    except UnidentifiedImageError:
        raise DiffMixError(f"{path}: not a readable image (unknown or corrupt image format)") from None
    except (OSError, ValueError) as err:
        raise DiffMixError(f"{path}: not a readable image ({err})") from None
    return np.ascontiguousarray(arr)


def png_bytes(image: np.ndarray, compress_level: int = 6) -> bytes:
    """A uint8 [H, W] or [H, W, 3] array as PNG bytes (``compress_level`` 1 encodes several times
    faster than the default 6, for ~10 % larger files)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def write_png(path: str, image: np.ndarray) -> None:
    """Atomically write a uint8 [H, W] or [H, W, 3] array as PNG."""
    write_bytes(path, png_bytes(image))


def write_npy(path: str, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(path, buf.getvalue())


def read_npy(path: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)
    except ValueError as err:
        raise DiffMixError(f"{path}: not a readable .npy array ({err})") from None


def read_mat(path: str) -> dict[str, Any]:
    """Read a MATLAB v5 ``.mat`` file into a dict (MATLAB header keys dropped)."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(io.BytesIO(read_bytes(path)))
    except Exception as err:  # scipy raises many types (IndexError, MatReadError, ...) on corrupt files
        raise DiffMixError(f"{path}: not a readable .mat file ({err})") from None
    return {k: v for k, v in mat.items() if not k.startswith("__")}


def write_mat(path: str, arrays: dict[str, Any]) -> None:
    import scipy.io

    buf = io.BytesIO()
    scipy.io.savemat(buf, arrays, do_compression=True)
    write_bytes(path, buf.getvalue())
