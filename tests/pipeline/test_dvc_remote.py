"""DVC data versioning with an S3 remote: push to and pull back from a real moto S3 server on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import boto3
import pytest

from tests.helpers.servers import moto_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BUCKET = "dvc-store"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
         "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def env(tmp_path):
    """The subprocesses' environment: fake AWS keys, no analytics, a git identity, no user config."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "DVC_", "GIT_")) and k != "FEDKIM_S3_ENDPOINT_URL"}
    home = tmp_path / "home"
    home.mkdir()
    env.update(CREDS)
    env.update({
        "AWS_EC2_METADATA_DISABLED": "true",  # never look for credentials on the network
        "AWS_CONFIG_FILE": str(home / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-creds"),
        "DVC_NO_ANALYTICS": "1", "DVC_GLOBAL_CONFIG_DIR": str(home / "dvc-global"),
        "DVC_SYSTEM_CONFIG_DIR": str(home / "dvc-system"), "DVC_SITE_CACHE_DIR": str(home / "dvc-site"),
        "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),
        "GIT_AUTHOR_NAME": "fedkim test", "GIT_AUTHOR_EMAIL": "test@fedkim.invalid",
        "GIT_COMMITTER_NAME": "fedkim test", "GIT_COMMITTER_EMAIL": "test@fedkim.invalid",
    })
    return env


def run(args, cwd, env):
    """Run a command; on failure the assertion message carries its full stdout and stderr."""
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"`{' '.join(map(str, args))}` exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout


def dvc(*args, cwd, env):
    return run([sys.executable, "-m", "dvc", *args], cwd, env)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dvc_push_and_pull_through_an_s3_remote(tmp_path, env, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket=BUCKET)
    repo = tmp_path / "repo"
    data = repo / "data"
    (data / "site-a").mkdir(parents=True)
    (data / "site-a" / "index.csv").write_text("sample_id,label\ns1,1\ns2,0\n")
    (data / "site-a" / "x.bin").write_bytes(bytes(range(256)) * 64)
    (data / "readme.txt").write_text("federation v1\n")
    before = snapshot(data)

    run(["git", "init", "-q"], repo, env)
    dvc("init", "-q", cwd=repo, env=env)
    dvc("add", "data", cwd=repo, env=env)
    assert (repo / "data.dvc").is_file()
    dvc("remote", "add", "-d", "s3remote", f"s3://{BUCKET}/dvcstore", cwd=repo, env=env)
    dvc("remote", "modify", "s3remote", "endpointurl", s3_endpoint, cwd=repo, env=env)
    dvc("push", cwd=repo, env=env)

    pushed = [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="dvcstore/")["Contents"]]
    # One object per file plus the folder's .dir listing, all content-addressed.
    assert len(pushed) == len(before) + 1
    assert all(k.startswith("dvcstore/files/md5/") for k in pushed)

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(data)
    dvc("pull", cwd=repo, env=env)
    assert snapshot(data) == before
