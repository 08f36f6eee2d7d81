"""The stack's object-store credentials: one key pair for the coordinator and one per site, and the IAM users that
hold them on an S3 server that enforces policies (moto's server with IAM enforcement).

credentials.json (0600, in .fedkim/stack/) holds {"server": ..., "roles": {role: {access_key_id, secret_access_key}}}
with the roles of fedkim.federation.policies.role_name. For `rclone serve s3` the stack generates the pairs once and
keeps them across down/up; rclone takes every pair for the whole bucket (no roles). moto keeps its IAM users in
memory with its objects: on every `stack up` the server starts empty, and the pairs are the ones its IAM issues then.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

from fedkim.federation.policies import for_moto, role_name, role_policies
from fedkim.ops.processes import write_private

ADMIN_USER = "fedkim-admin"
# moto serves its first N requests unauthenticated (INITIAL_NO_AUTH_ACTION_COUNT): just enough to create the
# admin user, give it its policy and issue its key; every later request is checked against IAM.
BOOTSTRAP_REQUESTS = 3
ADMIN_POLICY = {"Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]}


def generated_pair() -> dict[str, str]:
    return {"access_key_id": f"fedkim-{secrets.token_hex(6)}", "secret_access_key": secrets.token_urlsafe(30)}


def read_credentials(path: Path) -> dict:
    """The stored credentials; an older file with one key pair for everyone becomes the coordinator's pair."""
    if not path.is_file():
        return {"server": None, "roles": {}}
    raw = json.loads(path.read_text())
    if "roles" not in raw:
        return {"server": "rclone", "roles": {role_name(None): {k: raw[k] for k in ("access_key_id",
                                                                                    "secret_access_key")}}}
    return raw


def rclone_credentials(path: Path, roles: list[str]) -> dict[str, dict[str, str]]:
    """One pair per role for rclone: generated once, kept across down/up (a site worker configured with its pair
    keeps working after a restart); a role that is new (a member added) gets a pair of its own."""
    stored = read_credentials(path)
    kept = stored["roles"] if stored["server"] == "rclone" else {}
    pairs = {role: kept.get(role) or generated_pair() for role in roles}
    write_private(path, {"server": "rclone", "roles": {**kept, **pairs}})
    return pairs


def _client(service: str, endpoint: str, region: str, pair: dict[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        service, endpoint_url=endpoint, region_name=region, aws_access_key_id=pair["access_key_id"],
        aws_secret_access_key=pair["secret_access_key"],
        config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))


def _issue_key(iam: Any, user: str, policy: dict) -> dict[str, str]:
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName=f"{user}-store", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return {"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}


def bootstrap_admin(endpoint: str, region: str) -> dict[str, str]:
    """The admin's pair, from the first BOOTSTRAP_REQUESTS (unauthenticated) requests of a fresh moto server."""
    iam = _client("iam", endpoint, region, {"access_key_id": "bootstrap", "secret_access_key": "bootstrap"})
    return _issue_key(iam, ADMIN_USER, ADMIN_POLICY)


def provision_roles(endpoint: str, region: str, admin: dict[str, str], bucket: str, prefix: str,
                    site_ids: list[str], *, moto: bool = True) -> dict[str, dict[str, str]]:
    """Create the bucket, and per role an IAM user with the role's policy (fedkim.federation.policies) and a key
    pair; returns role -> pair. `moto`: adapt the documents to moto's permission names (for_moto)."""
    s3 = _client("s3", endpoint, region, admin)
    extra = {"CreateBucketConfiguration": {"LocationConstraint": region}} if region != "us-east-1" else {}
    s3.create_bucket(Bucket=bucket, **extra)
    iam = _client("iam", endpoint, region, admin)
    return {role: _issue_key(iam, f"fedkim-{role}", for_moto(policy) if moto else policy)
            for role, policy in role_policies(bucket, prefix, site_ids).items()}


def moto_credentials(path: Path, endpoint: str, region: str, bucket: str, prefix: str,
                     site_ids: list[str]) -> dict[str, dict[str, str]]:
    """Provision a freshly started moto server and record the pairs it issued (replacing earlier ones)."""
    admin = bootstrap_admin(endpoint, region)
    pairs = provision_roles(endpoint, region, admin, bucket, prefix, site_ids)
    write_private(path, {"server": "moto", "roles": pairs})
    return pairs
