"""What each party may do in the object store: the IAM policy documents (AWS JSON) of the store's roles.

    coordinator   reads everything under the store's prefix; writes and deletes everything except the sites'
                  prefixes (global model, aggregate, central model, evaluation, LATEST, round locks)
    site <id>     reads the rounds' global models (`rounds/*/global/*`, with their `.sig` and `.sha256`) and its
                  own prefix; writes only its own prefix `rounds/*/sites/<id>/` (package, signature, gate summary)

Both may list the bucket: S3 answers a HEAD of a missing key with 403 instead of 404, and HeadBucket at all, only
to a key with s3:ListBucket; a site thus sees the names of keys (round ids, site ids, file names), never their
content. The same documents serve AWS (IAM user policies), MinIO (`mc admin policy create`) and moto's IAM-enforcing
server. IAM's `*` also matches '/', so `rounds/*/sites/<id>/*` alone would let a site write
`rounds/<r>/sites/<other>/sites/<id>/x` into another site's folder: explicit Deny statements close that.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedkim.federation.store import SHA_SUFFIX

VERSION = "2012-10-17"
COORDINATOR_ROLE = "coordinator"
READ, WRITE, DELETE, LIST = "s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"
MOTO_HEAD_BUCKET = "s3:HeadBucket"  # moto's name for HeadBucket's permission; AWS and MinIO check s3:ListBucket


def _objects(bucket: str, prefix: str, pattern: str) -> str:
    """The ARN of the objects matching `pattern` under the store's prefix."""
    base = f"{bucket}/{prefix.strip('/')}/" if prefix.strip("/") else f"{bucket}/"
    return f"arn:aws:s3:::{base}{pattern}"


def _statement(sid: str, effect: str, actions: list[str], resources: list[str]) -> dict:
    return {"Sid": sid, "Effect": effect, "Action": actions, "Resource": resources}


def _check_id(site_id: str) -> str:
    # Member ids are checked by params (lowercase letters, digits, '-'); a wildcard here would widen a policy.
    if not site_id or any(c in site_id for c in "*?/$"):
        raise ValueError(f"site id {site_id!r} cannot name a store prefix in a policy")
    return site_id


def site_policy(bucket: str, prefix: str, site_id: str) -> dict:
    """Site `site_id`: list the bucket, read the global models and its own prefix, write only its own prefix."""
    own = _objects(bucket, prefix, f"rounds/*/sites/{_check_id(site_id)}/*")
    global_models = _objects(bucket, prefix, "rounds/*/global/*")
    return {"Version": VERSION, "Statement": [
        _statement("ListTheBucket", "Allow", [LIST], [f"arn:aws:s3:::{bucket}"]),
        _statement("ReadGlobalModels", "Allow", [READ], [global_models]),
        _statement("ReadWriteOwnPrefix", "Allow", [READ, WRITE], [own]),
        # `*` crosses '/': a key that only ends in sites/<id>/... or global/... deeper down is someone else's.
        _statement("DenyLookalikeKeys", "Deny", [READ, WRITE, DELETE],
                   [_objects(bucket, prefix, f"rounds/*/*/sites/{site_id}/*"),
                    _objects(bucket, prefix, "rounds/*/*/global/*")]),
    ]}


def coordinator_policy(bucket: str, prefix: str) -> dict:
    """The coordinator: list and read everything under the prefix, write and delete all but the sites' prefixes."""
    everything = _objects(bucket, prefix, "*")
    return {"Version": VERSION, "Statement": [
        _statement("ListTheBucket", "Allow", [LIST], [f"arn:aws:s3:::{bucket}"]),
        _statement("ReadAll", "Allow", [READ], [everything]),
        _statement("WriteAllButSites", "Allow", [WRITE, DELETE], [everything]),
        _statement("DenySitePrefixes", "Deny", [WRITE, DELETE], [_objects(bucket, prefix, "rounds/*/sites/*")]),
    ]}


def role_policies(bucket: str, prefix: str, site_ids: Iterable[str]) -> dict[str, dict]:
    """Role name (`role_name`) -> policy document: the coordinator's and one per member site."""
    policies = {COORDINATOR_ROLE: coordinator_policy(bucket, prefix)}
    policies.update({role_name(s): site_policy(bucket, prefix, s) for s in site_ids})
    return policies


def role_name(site_id: str | None) -> str:
    """`coordinator` (None), or `site.<id>` (a dot: no member id holds one, so no site's role is the coordinator's)."""
    return COORDINATOR_ROLE if site_id is None else f"site.{_check_id(site_id)}"


def for_moto(policy: dict) -> dict:
    """The document as moto's IAM check needs it: moto asks for s3:HeadBucket where AWS asks for s3:ListBucket."""
    statements = [dict(s, Action=[*s["Action"], MOTO_HEAD_BUCKET]) if LIST in s["Action"] else s
                  for s in policy["Statement"]]
    return {**policy, "Statement": statements}


def owner_of(key: str) -> str:
    """Whose object a store key is, in words, for an error message: in a site's prefix, or the coordinator's."""
    parts = key.removesuffix(SHA_SUFFIX).split("/")
    if len(parts) >= 4 and parts[0] == "rounds" and parts[2] == "sites":
        return (f"in the prefix of site {parts[3]!r} (rounds/{parts[1]}/sites/{parts[3]}/): only that site writes "
                f"there, and no other site reads there")
    if len(parts) >= 3 and parts[0] == "rounds" and parts[2] == "global":
        return f"in round {parts[1]}'s global model folder: the coordinator writes it, every site reads it"
    return "an object of the coordinator's: sites neither read nor write it"
