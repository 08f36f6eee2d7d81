"""LocalStore: round trips, sha256 verification, refusing overwrites, listing, and package keys."""

import pytest

from fedkim.digests import sha256_file
from fedkim.federation import (IntegrityError, KeyExistsError, LocalStore, check_package, package_key,
                               package_prefix, write_package)
from tests.helpers.packages import global_state, package_fields, site_state


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(b"knowledge" * 100)
    return path


def test_put_get_round_trip(tmp_path, store, src):
    key = package_key("r1", "site-a", "encoders.safetensors")
    assert key == "rounds/r1/sites/site-a/encoders.safetensors"
    uri = store.put_file(key, src)
    assert uri.startswith("file://") and uri.endswith(key) and uri == store.uri(key)
    assert store.exists(key) and store.sha256(key) == sha256_file(src)
    out = store.get_file(key, tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == src.read_bytes()
    (tmp_path / "dir").mkdir()
    assert store.get_file(key, tmp_path / "dir") == tmp_path / "dir" / "encoders.safetensors"


def test_tampered_object_fails_verification(tmp_path, store, src):
    store.put_file("a/b.bin", src)
    (store.root / "a" / "b.bin").write_bytes(b"evil")
    with pytest.raises(IntegrityError, match="sha256"):
        store.get_file("a/b.bin", tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_refuses_to_overwrite_different_content(tmp_path, store, src):
    store.put_file("a/b.bin", src)
    assert store.put_file("a/b.bin", src) == store.uri("a/b.bin")  # same content: idempotent
    other = tmp_path / "other.bin"
    other.write_bytes(b"different")
    with pytest.raises(KeyExistsError, match="overwrite=True"):
        store.put_file("a/b.bin", other)
    assert store.get_file("a/b.bin", tmp_path / "o1").read_bytes() == src.read_bytes()
    store.put_file("a/b.bin", other, overwrite=True)
    assert store.get_file("a/b.bin", tmp_path / "o2").read_bytes() == b"different"
    assert store.sha256("a/b.bin") == sha256_file(other)


def test_list_and_exists(store, src):
    for key in ["rounds/1/sites/a/x", "rounds/1/sites/ab/y", "rounds/10/z", "other/w"]:
        store.put_file(key, src)
    assert store.list() == sorted(["rounds/1/sites/a/x", "rounds/1/sites/ab/y", "rounds/10/z", "other/w"])
    assert store.list("rounds/1/") == ["rounds/1/sites/a/x", "rounds/1/sites/ab/y"]
    assert store.list("rounds/1") == ["rounds/1/sites/a/x", "rounds/1/sites/ab/y", "rounds/10/z"]  # like S3
    assert store.list("rounds/1/sites/a/") == ["rounds/1/sites/a/x"]
    assert store.list("nothing/") == []
    assert store.exists("other/w") and not store.exists("other/v") and not store.exists("rounds/1")


def test_upload_without_hash_record_does_not_exist(store, src):
    # The sidecar is written last: an object without it is an interrupted upload, invisible and replaceable.
    store.put_file("a/b.bin", src)
    (store.root / "a" / "b.bin.sha256").unlink()
    assert not store.exists("a/b.bin") and store.list() == []
    with pytest.raises(FileNotFoundError):
        store.get_file("a/b.bin", store.root.parent / "x")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a/b.sha256"])
def test_invalid_keys_are_refused(store, src, key):
    with pytest.raises(ValueError, match="invalid store key"):
        store.put_file(key, src)


def test_package_key_refuses_slashes():
    with pytest.raises(ValueError, match="site id"):
        package_key("r1", "../etc", "x")


def test_package_dir_round_trip_through_the_store(tmp_path, store):
    glob = global_state()
    write_package(tmp_path / "pkg", site_state(glob, ("image",), 1), **package_fields())
    uris = store.put_dir(package_prefix("r1", "site-a"), tmp_path / "pkg")
    assert sorted(uris) == [package_key("r1", "site-a", f) for f in ("encoders.safetensors", "manifest.json")]
    got = store.get_dir(package_prefix("r1", "site-a"), tmp_path / "server" / "site-a")
    assert check_package(got, glob, max_update_norm=100.0, expected_round="r1").accepted
    with pytest.raises(FileNotFoundError):
        store.get_dir("rounds/r9", tmp_path / "none")


def test_local_store_leaves_no_temporary_files(tmp_path, store, src):
    store.put_file("a/b.bin", src)
    store.put_file("a/b.bin", src)
    assert sorted(p.name for p in (store.root / "a").iterdir()) == ["b.bin", "b.bin.sha256"]
