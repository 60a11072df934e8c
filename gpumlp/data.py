"""MNIST: find, download, verify and decode the four IDX files, then lay the digits out as the paper's
net sees them (29x29 = 841 inputs in [-1, 1]).

Every fault in the files becomes one `DataError` line naming the file and the fault, so the command
can print it without a traceback and never trains on a silently wrong array."""
from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import sys
import tempfile
import urllib.parse
import urllib.request
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class DataError(Exception):
    """MNIST files that are missing, unreadable or not what they should be."""


TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"

# SHA-256 of the uncompressed content: the .gz bytes vary with whoever compressed them.
CANONICAL_SHA256 = {
    TRAIN_IMAGES: "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    TRAIN_LABELS: "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    TEST_IMAGES: "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    TEST_LABELS: "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Each serves <name>.gz; tried in turn.
MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
DOWNLOAD_TIMEOUT_S = 10
DEFAULT_DATA_DIR = Path("~/.cache/gpumlp")
DATA_DIR_ENV = "GPUMLP_DATA"
SHARED_MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "mnist"

DIGIT_SIDE, PADDED_SIDE = 28, 29
INPUTS = PADDED_SIDE * PADDED_SIDE
NUM_CLASSES = 10
GZIP_MAGIC = b"\x1f\x8b"
IDX_UNSIGNED_BYTE = 0x08
# v / 127.5 - 1 for every pixel value, computed in float64 and rounded once to float32.
PIXEL_TO_INPUT = (np.arange(256) / 127.5 - 1.0).astype(np.float32)


@dataclass(frozen=True)
class MNIST:
    train_images: np.ndarray = field(repr=False)  # (60000, 841) float32 in [-1, 1]
    train_labels: np.ndarray = field(repr=False)  # (60000,) int32
    test_images: np.ndarray = field(repr=False)   # (10000, 841) float32 in [-1, 1]
    test_labels: np.ndarray = field(repr=False)   # (10000,) int32
    source: Path


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """Where MNIST is looked for and downloaded to: `data_dir` (--data-dir), else $GPUMLP_DATA,
    else ~/.cache/gpumlp."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def load_mnist(data_dir: str | os.PathLike | None = None, download: bool = True,
               checksums: Mapping[str, str] | None = CANONICAL_SHA256) -> MNIST:
    """The training and test sets, verified against `checksums` (None skips that check), padded and
    scaled. Files missing from the directory are downloaded into it when `download` is true.
    Only the default directory is ever created: one named by --data-dir or $GPUMLP_DATA must exist,
    so a typo is an error rather than a fresh folder and a download."""
    directory = resolve_data_dir(data_dir)
    if directory != DEFAULT_DATA_DIR.expanduser() and not directory.is_dir():
        origin = "--data-dir" if data_dir else f"${DATA_DIR_ENV}"
        raise DataError(f"the MNIST directory {directory} ({origin}) does not exist: check the path, or create "
                        "the folder to download MNIST into it")
    train_images, train_labels = _load_pair(directory, TRAIN_IMAGES, TRAIN_LABELS, download, checksums)
    test_images, test_labels = _load_pair(directory, TEST_IMAGES, TEST_LABELS, download, checksums)
    return MNIST(train_images, train_labels, test_images, test_labels, directory)


def read_idx(path: str | os.PathLike, expected_ndim: int) -> np.ndarray:
    """The uint8 array in an IDX file, gzipped or raw (a read-only view of the decoded bytes)."""
    path = Path(path)
    return parse_idx(_read_content(path), expected_ndim, str(path))


def parse_idx(content: bytes, expected_ndim: int, where: str) -> np.ndarray:
    """Decodes IDX bytes after checking the magic number and that the header's dimensions account
    for exactly the bytes that follow it."""
    header_size = 4 + 4 * expected_ndim
    if len(content) < 4:
        raise DataError(f"{where}: truncated: {len(content)} bytes, too short for an IDX header")
    expected_magic = IDX_UNSIGNED_BYTE << 8 | expected_ndim
    magic = int.from_bytes(content[:4], "big")
    if magic != expected_magic:
        raise DataError(f"{where}: wrong magic number 0x{magic:08x}: not an IDX file of unsigned bytes "
                        f"with {expected_ndim} dimension(s) (expected 0x{expected_magic:08x})")
    if len(content) < header_size:
        raise DataError(f"{where}: truncated: the file ends inside its {header_size}-byte header")
    dims = tuple(int.from_bytes(content[i:i + 4], "big") for i in range(4, header_size, 4))
    expected_bytes, found_bytes = math.prod(dims), len(content) - header_size
    shape = "x".join(map(str, dims))
    if found_bytes < expected_bytes:
        raise DataError(f"{where}: truncated: the header says {shape} ({expected_bytes} bytes) "
                        f"but only {found_bytes} bytes follow")
    if found_bytes > expected_bytes:
        raise DataError(f"{where}: wrong count: the header says {shape} ({expected_bytes} bytes) "
                        f"but {found_bytes} bytes follow")
    return np.frombuffer(content, np.uint8, offset=header_size).reshape(dims)


def pad_and_scale(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 digits -> (N, 841) float32: one background row added at the bottom and one
    column at the right (29x29, as in the paper), pixels mapped to v / 127.5 - 1 (0 -> -1, 255 -> 1)."""
    if images.dtype != np.uint8 or images.shape[1:] != (DIGIT_SIDE, DIGIT_SIDE):
        raise ValueError(f"pad_and_scale wants (N, 28, 28) uint8 images, got {images.shape} {images.dtype}")
    padded = np.full((len(images), PADDED_SIDE, PADDED_SIDE), -1.0, np.float32)
    padded[:, :DIGIT_SIDE, :DIGIT_SIDE] = PIXEL_TO_INPUT[images]
    return padded.reshape(len(images), INPUTS)


def _load_pair(directory: Path, images_name: str, labels_name: str, download: bool,
               checksums: Mapping[str, str] | None) -> tuple[np.ndarray, np.ndarray]:
    images_path = _locate(directory, images_name, download, checksums)
    labels_path = _locate(directory, labels_name, download, checksums)
    images = _read_verified(images_path, images_name, checksums)
    labels = _read_verified(labels_path, labels_name, checksums)
    if images.shape[1:] != (DIGIT_SIDE, DIGIT_SIDE):
        raise DataError(f"{images_path}: wrong image size {images.shape[1]}x{images.shape[2]} (MNIST is 28x28)")
    if len(images) != len(labels):
        raise DataError(f"wrong count: {images_path} holds {len(images)} images "
                        f"but {labels_path} holds {len(labels)} labels")
    _check_labels(labels, labels_path)
    return pad_and_scale(images), labels.astype(np.int32)


def _check_labels(labels: np.ndarray, path: Path) -> None:
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if len(bad):
        raise DataError(f"{path}: label {labels[bad[0]]} at index {bad[0]} is outside 0-9 "
                        f"({len(bad)} such labels)")


def _locate(directory: Path, name: str, download: bool, checksums: Mapping[str, str] | None) -> Path:
    """The file `name` or `name.gz` in `directory` (the raw one if both, as it reads faster);
    downloaded there when neither exists."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    if not download:
        reason = "downloading is turned off"
    else:
        try:
            return _download(directory, name, checksums)
        except DataError as error:
            reason = str(error)
    raise DataError(f"{name} not found in {directory} and could not be downloaded ({reason}); "
                    "put the four MNIST files there or pass --data-dir")


def _read_verified(path: Path, name: str, checksums: Mapping[str, str] | None,
                   where: str | None = None) -> np.ndarray:
    """Decodes the file, then compares its uncompressed content with the checksum table, so that a
    recompressed .gz passes and a file with the right shape but wrong digits does not."""
    where = where or str(path)
    content = _read_content(path, where)
    array = parse_idx(content, _idx_ndim(name), where)
    if checksums is not None:
        found = hashlib.sha256(content).hexdigest()
        if found != checksums[name]:
            raise DataError(f"{where}: checksum mismatch: the SHA-256 of its uncompressed content is "
                            f"{found}, not {name}'s {checksums[name]}; replace or delete the file")
    return array


def _idx_ndim(name: str) -> int:
    """The number of dimensions the IDX naming convention puts in the name: 3 in `...-idx3-ubyte`."""
    return int(name.partition("-idx")[2][0])


def _read_content(path: Path, where: str | None = None) -> bytes:
    """The file's bytes, gunzipped when they start with the gzip magic (whatever the name says)."""
    where = where or str(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{where}: cannot read: {error.strerror or error}") from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{where}: corrupt or truncated gzip data ({error})") from None


def _download(directory: Path, name: str, checksums: Mapping[str, str] | None) -> Path:
    """Fetches `name.gz` from the first mirror that serves a valid copy; raises DataError with every
    mirror's reason otherwise."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot create {directory}: {error.strerror or error}") from None
    reasons = []
    for mirror in MIRRORS:
        url = urllib.parse.urljoin(mirror, f"{name}.gz")
        try:
            return _download_from(url, directory / f"{name}.gz", name, checksums)
        except DataError as error:  # the content was bad; the message names the url
            reasons.append(str(error))
        except (OSError, http.client.HTTPException, ValueError) as error:  # ValueError: a malformed url
            reasons.append(f"{url}: {_network_reason(error)}")
    raise DataError("; ".join(reasons) or "no mirrors configured")


def _download_from(url: str, destination: Path, name: str, checksums: Mapping[str, str] | None) -> Path:
    """Streams into a hidden temporary file beside `destination` and renames it only once verified,
    so an interrupted or corrupt download never sits where a later run would take it as valid."""
    print(f"downloading {url} to {destination.parent}", file=sys.stderr, flush=True)
    fd, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, _open_url(url) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        _read_verified(Path(temporary), name, checksums, where=url)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; it is a public data set
        os.replace(temporary, destination)
        return destination
    finally:
        Path(temporary).unlink(missing_ok=True)


def _open_url(url: str):
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)


def _network_reason(error: Exception) -> str:
    reason = getattr(error, "reason", None)  # URLError wraps the socket error
    return str(reason if reason is not None else error) or type(error).__name__
