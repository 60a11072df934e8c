"""The MNIST data layer on small synthetic IDX files (every fault a user can meet: bad files, no
network, broken downloads), plus the real set where ../shared/mnist is present."""
import gzip
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from gpumlp import data
from gpumlp.data import DataError, load_mnist, pad_and_scale, read_idx, resolve_data_dir

NAMES = (data.TRAIN_IMAGES, data.TRAIN_LABELS, data.TEST_IMAGES, data.TEST_LABELS)
SIZES = {data.TRAIN_IMAGES: 12, data.TRAIN_LABELS: 12, data.TEST_IMAGES: 5, data.TEST_LABELS: 5}


def idx_bytes(array: np.ndarray) -> bytes:
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_contents(seed=0) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    return {name: idx_bytes(rng.integers(0, 256, (n, 28, 28)) if "images" in name else rng.integers(0, 10, n))
            for name, n in SIZES.items()}


def sha256_table(contents: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(content).hexdigest() for name, content in contents.items()}


def write_set(directory: Path, contents: dict[str, bytes], compress=True, suffix=".gz") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        (directory / f"{name}{suffix}").write_bytes(gzip.compress(content) if compress else content)


def single_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def contents():
    return synthetic_contents()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(url):
        raise OSError("network is unreachable")
    monkeypatch.setattr(data, "_open_url", refuse)


# --- reading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress, suffix", [(True, ".gz"), (False, ""), (True, ""), (False, ".gz")],
                         ids=["gz", "raw", "gz-named-raw", "raw-named-gz"])
def test_gzip_is_detected_by_content_not_name(tmp_path, contents, compress, suffix):
    write_set(tmp_path, contents, compress, suffix)
    mnist = load_mnist(tmp_path, download=False, checksums=sha256_table(contents))
    labels = np.frombuffer(contents[data.TRAIN_LABELS], np.uint8, offset=8)
    np.testing.assert_array_equal(mnist.train_labels, labels)
    assert mnist.source == tmp_path


def test_recompressed_gz_is_accepted_because_the_checksum_is_of_the_content(tmp_path, contents):
    checksums = sha256_table(contents)
    write_set(tmp_path / "a", contents)
    for name, content in contents.items():
        (tmp_path / "b" / f"{name}.gz").parent.mkdir(exist_ok=True)
        (tmp_path / "b" / f"{name}.gz").write_bytes(gzip.compress(content, compresslevel=1, mtime=12345))
    assert (tmp_path / "a" / f"{data.TRAIN_IMAGES}.gz").read_bytes() != \
        (tmp_path / "b" / f"{data.TRAIN_IMAGES}.gz").read_bytes()
    first, second = (load_mnist(tmp_path / d, download=False, checksums=checksums) for d in "ab")
    np.testing.assert_array_equal(first.train_images, second.train_images)


def test_loaded_arrays_have_the_documented_shapes_and_types(tmp_path, contents):
    write_set(tmp_path, contents)
    mnist = load_mnist(tmp_path, download=False, checksums=None)
    assert mnist.train_images.shape == (12, 841) and mnist.train_images.dtype == np.float32
    assert mnist.test_images.shape == (5, 841) and mnist.test_images.dtype == np.float32
    assert mnist.train_labels.shape == (12,) and mnist.train_labels.dtype == np.int32
    assert mnist.test_labels.shape == (5,) and mnist.test_labels.dtype == np.int32


def test_read_idx_returns_the_array(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x").write_bytes(idx_bytes(array))
    np.testing.assert_array_equal(read_idx(tmp_path / "x", 3), array)


# --- padding and scaling --------------------------------------------------------------------------

def test_pad_and_scale_adds_a_background_row_and_column_and_maps_to_minus_one_one():
    images = np.zeros((2, 28, 28), np.uint8)
    images[0, 0, 0], images[0, 27, 27], images[1, 5, 7], images[1, 27, 0] = 255, 255, 51, 128
    out = pad_and_scale(images)
    assert out.shape == (2, 841) and out.dtype == np.float32
    grid = out.reshape(2, 29, 29)
    assert grid[0, 0, 0] == 1.0 and grid[0, 27, 27] == 1.0
    assert grid[1, 5, 7] == np.float32(51 / 127.5 - 1) and grid[1, 27, 0] == np.float32(128 / 127.5 - 1)
    assert np.all(grid[:, 28, :] == -1.0) and np.all(grid[:, :, 28] == -1.0)  # the padding
    assert np.count_nonzero(out != -1.0) == 4  # background 0 is exactly -1


def test_pad_and_scale_is_monotonic_over_all_256_values():
    values = pad_and_scale(np.arange(256, dtype=np.uint8).repeat(28 * 28).reshape(256, 28, 28))[:, 0]
    assert values[0] == -1.0 and values[-1] == 1.0 and np.all(np.diff(values) > 0)


def test_pad_and_scale_rejects_other_shapes():
    with pytest.raises(ValueError, match="28, 28"):
        pad_and_scale(np.zeros((1, 29, 29), np.uint8))


# --- bad files ------------------------------------------------------------------------------------

def corrupt(contents, name, content):
    return {**contents, name: content}


BAD_FILES = {
    "wrong magic": lambda c: corrupt(c, data.TRAIN_IMAGES, c[data.TRAIN_LABELS]),
    "truncated header": lambda c: corrupt(c, data.TRAIN_IMAGES, c[data.TRAIN_IMAGES][:10]),
    "truncated pixels": lambda c: corrupt(c, data.TRAIN_IMAGES, c[data.TRAIN_IMAGES][:-1]),
    "too short for a header": lambda c: corrupt(c, data.TEST_LABELS, b"\x00\x00"),
    "extra bytes": lambda c: corrupt(c, data.TEST_LABELS, c[data.TEST_LABELS] + b"\x01"),
    "images vs labels": lambda c: corrupt(c, data.TRAIN_LABELS, idx_bytes(np.zeros(11, np.uint8))),
    "label outside 0-9": lambda c: corrupt(c, data.TEST_LABELS, idx_bytes(np.array([1, 2, 10, 3, 4]))),
    "not 28x28": lambda c: corrupt(c, data.TEST_IMAGES, idx_bytes(np.zeros((5, 27, 27), np.uint8))),
}
EXPECTED_FAULT = {
    "wrong magic": (data.TRAIN_IMAGES, "wrong magic number 0x00000801"),
    "truncated header": (data.TRAIN_IMAGES, "truncated: the file ends inside its 16-byte header"),
    "truncated pixels": (data.TRAIN_IMAGES, "truncated: the header says 12x28x28 (9408 bytes) but only 9407"),
    "too short for a header": (data.TEST_LABELS, "truncated: 2 bytes"),
    "extra bytes": (data.TEST_LABELS, "wrong count: the header says 5 (5 bytes) but 6 bytes follow"),
    "images vs labels": (data.TRAIN_LABELS, "holds 12 images but"),
    "label outside 0-9": (data.TEST_LABELS, "label 10 at index 2 is outside 0-9"),
    "not 28x28": (data.TEST_IMAGES, "wrong image size 27x27"),
}


@pytest.mark.parametrize("fault", BAD_FILES)
def test_a_bad_file_gives_one_line_naming_file_and_fault(tmp_path, contents, fault):
    bad = BAD_FILES[fault](contents)
    write_set(tmp_path, bad)
    with pytest.raises(DataError) as excinfo:
        load_mnist(tmp_path, download=False, checksums=None)
    message = single_line_error(excinfo)
    name, expected = EXPECTED_FAULT[fault]
    assert f"{tmp_path / name}.gz" in message and expected in message


def test_checksum_mismatch_is_rejected_even_when_the_file_is_well_formed(tmp_path, contents):
    write_set(tmp_path, contents)
    other = sha256_table(synthetic_contents(seed=1))
    with pytest.raises(DataError) as excinfo:
        load_mnist(tmp_path, download=False, checksums={**sha256_table(contents), data.TEST_IMAGES: other[data.TEST_IMAGES]})
    message = single_line_error(excinfo)
    assert f"{tmp_path / data.TEST_IMAGES}.gz: checksum mismatch" in message
    assert other[data.TEST_IMAGES] in message


def test_synthetic_files_fail_the_canonical_checksums_by_default(tmp_path, contents):
    write_set(tmp_path, contents)
    with pytest.raises(DataError, match="checksum mismatch"):
        load_mnist(tmp_path, download=False)


def test_truncated_gzip_is_reported_not_decoded(tmp_path, contents):
    write_set(tmp_path, contents)
    path = tmp_path / f"{data.TRAIN_IMAGES}.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError) as excinfo:
        read_idx(path, 3)
    assert f"{path}: corrupt or truncated gzip data" in single_line_error(excinfo)


def test_unreadable_path_is_a_data_error(tmp_path):
    (tmp_path / data.TRAIN_IMAGES).mkdir()  # not a file: looked past, then reported missing
    with pytest.raises(DataError, match="not found"):
        load_mnist(tmp_path, download=False)
    with pytest.raises(DataError, match="cannot read"):
        read_idx(tmp_path / data.TRAIN_IMAGES, 3)


# --- where files are looked for -------------------------------------------------------------------

def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPUMLP_DATA", raising=False)
    assert resolve_data_dir(None) == tmp_path / "home" / ".cache" / "gpumlp"
    monkeypatch.setenv("GPUMLP_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError) as excinfo:
        load_mnist(tmp_path, download=False)
    assert single_line_error(excinfo) == (
        f"{data.TRAIN_IMAGES} not found in {tmp_path} and could not be downloaded (downloading is turned "
        "off); put the four MNIST files there or pass --data-dir")


def test_missing_files_with_no_network_gives_one_line(tmp_path, no_network):
    with pytest.raises(DataError) as excinfo:
        load_mnist(existing(tmp_path / "cache"))
    message = single_line_error(excinfo)
    assert message.startswith(f"{data.TRAIN_IMAGES} not found in {tmp_path / 'cache'} and could not be downloaded (")
    assert message.endswith("network is unreachable); put the four MNIST files there or pass --data-dir")
    assert all(mirror in message for mirror in data.MIRRORS)
    assert not any((existing(tmp_path / "cache")).iterdir())


def test_command_prints_one_error_line_and_exits_2(tmp_path, no_network, capsys):
    from gpumlp.cli import main
    assert main(["--data-dir", str(tmp_path), "--device", "cpu", "--epochs", "1"]) == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("downloading")]
    assert len(err_lines) == 1 and err_lines[0].startswith(f"error: {data.TRAIN_IMAGES} not found in {tmp_path}")


def existing(path: Path) -> Path:
    """A folder made beforehand: downloads go only into an existing folder (or the default cache)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.mark.parametrize("origin", ["--data-dir", "$GPUMLP_DATA"])
def test_a_data_dir_that_does_not_exist_is_an_error_and_is_not_created(tmp_path, monkeypatch, origin):
    typo = tmp_path / "mnsit"
    if origin == "--data-dir":
        call = lambda: load_mnist(typo)  # noqa: E731
    else:
        monkeypatch.setenv("GPUMLP_DATA", str(typo))
        call = load_mnist
    with pytest.raises(DataError) as excinfo:
        call()
    assert single_line_error(excinfo) == (f"the MNIST directory {typo} ({origin}) does not exist: check the "
                                          "path, or create the folder to download MNIST into it")
    assert not typo.exists()


def test_the_default_cache_is_created_for_the_download(tmp_path, contents, monkeypatch):
    write_set(tmp_path / "mirror", contents)
    serve(monkeypatch, tmp_path / "mirror")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("GPUMLP_DATA", raising=False)
    assert load_mnist(checksums=sha256_table(contents)).source == tmp_path / "home" / ".cache" / "gpumlp"
    assert len(list((tmp_path / "home" / ".cache" / "gpumlp").iterdir())) == 4


# --- downloading ----------------------------------------------------------------------------------

def serve(monkeypatch, *mirror_dirs: Path) -> None:
    monkeypatch.setattr(data, "MIRRORS", tuple(d.as_uri() + "/" for d in mirror_dirs))


def test_download_fills_the_cache_once(tmp_path, contents, monkeypatch):
    write_set(tmp_path / "mirror", contents)
    serve(monkeypatch, tmp_path / "mirror")
    cache = existing(tmp_path / "cache")
    first = load_mnist(cache, checksums=sha256_table(contents))
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"{name}.gz" for name in NAMES)
    serve(monkeypatch)  # no mirrors left: a second load must come from the cache
    second = load_mnist(cache, checksums=sha256_table(contents))
    np.testing.assert_array_equal(first.train_images, second.train_images)


def test_download_goes_to_the_environment_directory(tmp_path, contents, monkeypatch):
    write_set(tmp_path / "mirror", contents)
    serve(monkeypatch, tmp_path / "mirror")
    monkeypatch.setenv("GPUMLP_DATA", str(existing(tmp_path / "env")))
    assert load_mnist(checksums=sha256_table(contents)).source == tmp_path / "env"
    assert len(list((tmp_path / "env").iterdir())) == 4


def test_download_skips_a_mirror_with_bad_content(tmp_path, contents, monkeypatch):
    write_set(tmp_path / "bad", synthetic_contents(seed=1))
    write_set(tmp_path / "good", contents)
    serve(monkeypatch, tmp_path / "missing", tmp_path / "bad", tmp_path / "good")
    mnist = load_mnist(existing(tmp_path / "cache"), checksums=sha256_table(contents))
    assert mnist.test_labels.tolist() == list(np.frombuffer(contents[data.TEST_LABELS], np.uint8, offset=8))


def test_download_with_a_bad_checksum_is_rejected_and_leaves_nothing(tmp_path, contents, monkeypatch):
    write_set(tmp_path / "bad", synthetic_contents(seed=1))
    serve(monkeypatch, tmp_path / "bad")
    with pytest.raises(DataError) as excinfo:
        load_mnist(existing(tmp_path / "cache"), checksums=sha256_table(contents))
    message = single_line_error(excinfo)
    assert "could not be downloaded (" in message and "checksum mismatch" in message
    assert list((existing(tmp_path / "cache")).iterdir()) == []


class BrokenStream:
    """A response that delivers one chunk of a valid file and then fails."""

    def __init__(self, content: bytes, failure: BaseException):
        self.chunks, self.failure = [content[:1000]], failure

    def read(self, size):
        if self.chunks:
            return self.chunks.pop()
        raise self.failure

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("failure", [ConnectionResetError("connection reset by peer"), KeyboardInterrupt()],
                         ids=["connection-reset", "ctrl-c"])
def test_interrupted_download_leaves_no_file_behind(tmp_path, contents, monkeypatch, failure):
    gz = gzip.compress(contents[data.TRAIN_IMAGES])
    monkeypatch.setattr(data, "_open_url", lambda url: BrokenStream(gz, failure))
    cache = existing(tmp_path / "cache")
    with pytest.raises((DataError, KeyboardInterrupt)) as excinfo:
        load_mnist(cache, checksums=sha256_table(contents))
    if isinstance(failure, OSError):
        assert "connection reset by peer" in single_line_error(excinfo)
    assert list(cache.iterdir()) == []


def test_downloaded_file_is_readable_by_others(tmp_path, contents, monkeypatch):
    write_set(tmp_path / "mirror", contents)
    serve(monkeypatch, tmp_path / "mirror")
    load_mnist(existing(tmp_path / "cache"), checksums=sha256_table(contents))
    assert os.stat(existing(tmp_path / "cache") / f"{data.TRAIN_IMAGES}.gz").st_mode & 0o044 == 0o044


# --- the real set ---------------------------------------------------------------------------------

TRAIN_HISTOGRAM = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HISTOGRAM = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.mnist
def test_real_mnist(mnist):
    assert mnist.train_images.shape == (60000, 841) and mnist.test_images.shape == (10000, 841)
    assert mnist.train_images.dtype == mnist.test_images.dtype == np.float32
    assert mnist.train_labels.dtype == mnist.test_labels.dtype == np.int32
    assert np.bincount(mnist.train_labels).tolist() == TRAIN_HISTOGRAM and sum(TRAIN_HISTOGRAM) == 60000
    assert np.bincount(mnist.test_labels).tolist() == TEST_HISTOGRAM and sum(TEST_HISTOGRAM) == 10000
    assert mnist.train_labels[0] == 5
    for images in (mnist.train_images, mnist.test_images):
        assert images.min() == -1.0 and images.max() == 1.0
        grid = images.reshape(-1, 29, 29)
        assert np.all(grid[:, 28, :] == -1.0) and np.all(grid[:, :, 28] == -1.0)
