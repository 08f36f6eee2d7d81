"""Generation next to provided (real) site directories: only what the generator generated is ever written,
replaced or removed; a provided directory keeps every byte and mtime, beside data.root or inside it."""

import os
from pathlib import Path

import pytest
import yaml

from fedkim.config import load_params
from fedkim.data.synth.federation import FEDERATION_FILE, GenerationError, generate_federation
from tests.helpers import small_params_dict

ALL = ["image", "ecg", "clinical"]
# As small as the generator allows: these tests are about which folders it touches, not about the data.
TINY_DATA = {"data.sizes": {"site_train": 8, "val_fraction": 0.25, "public": 8, "test": 8, "validation": 8},
             "data.image_size": 32,
             "data.ecg_seconds": 2}


def params_with(tmp_path: Path, members: list[dict], profiles: dict | None = None, **extra):
    raw = small_params_dict(tmp_path / "fed", **TINY_DATA, **{"federation.members": members,
                                                               "data.sites": profiles or {}}, **extra)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_params(path)


def hospital(folder: Path) -> dict:
    """A provided site directory stand-in (the generator never reads it), with old mtimes; returns its snapshot."""
    (folder / "images").mkdir(parents=True)
    (folder / "site.yaml").write_text("site_id: real\n")
    (folder / "images" / "scan.png").write_bytes(b"\x89PNG not really")
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return snapshot(folder)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
            for p in [folder, *folder.rglob("*")]}


def provided(site_id: str, path: Path, modalities=("image",)) -> dict:
    return {"id": site_id, "modalities": list(modalities), "data": "provided", "path": str(path)}


def test_provided_sites_inside_and_beside_the_root_survive_regeneration(tmp_path):
    inside, beside = tmp_path / "fed" / "charite", tmp_path / "hospitals" / "rigshospitalet"
    before = {inside: hospital(inside), beside: hospital(beside)}
    (tmp_path / "fed" / "notes").mkdir()
    (tmp_path / "fed" / "notes" / "todo.txt").write_text("unknown to fedkim")
    members = [{"id": "site-x", "modalities": ALL}, provided("charite", inside), provided("rigshospitalet", beside)]

    first = generate_federation(params_with(tmp_path, members))
    assert [m.site_id for m in first.sites] == ["site-x", "public", "test", "validation"]
    record = yaml.safe_load((tmp_path / "fed" / FEDERATION_FILE).read_text())
    assert record["directories"] == ["site-x", "public", "test", "validation"]  # only what it generated
    second = generate_federation(params_with(tmp_path, members, **{"data.seed": 9}))  # params change: regenerate
    assert not second.cached and second.params_hash != first.params_hash
    assert generate_federation(params_with(tmp_path, members, **{"data.seed": 9})).cached

    for folder, files in before.items():
        assert snapshot(folder) == files, folder  # every byte and mtime
    assert (tmp_path / "fed" / "notes" / "todo.txt").read_text() == "unknown to fedkim"
    assert sorted(p.name for p in (tmp_path / "fed").iterdir()) == [
        "charite", FEDERATION_FILE, "notes", "public", "site-x", "test", "validation"]  # no staging or old copies left


def test_a_member_that_becomes_provided_keeps_its_folder(tmp_path):
    """site-y was generated; declared provided at the same place, it is only forgotten by the record, never
    removed, while site-z, generated before and no longer a member, is removed."""
    members = [{"id": "site-x", "modalities": ALL}, {"id": "site-y", "modalities": ["ecg"]},
               {"id": "site-z", "modalities": ["ecg"]}]
    generate_federation(params_with(tmp_path, members))
    site_y = tmp_path / "fed" / "site-y"
    files = snapshot(site_y)
    generate_federation(params_with(tmp_path, [members[0], provided("site-y", site_y, ["ecg"])]))
    assert snapshot(site_y) == files and not (tmp_path / "fed" / "site-z").exists()
    assert yaml.safe_load((tmp_path / "fed" / FEDERATION_FILE).read_text())["directories"] == [
        "site-x", "public", "test", "validation"]


@pytest.mark.parametrize("where", ["site-x/nested", "public", "."])
def test_a_provided_directory_overlapping_a_generated_one_is_an_error(tmp_path, where):
    path = (tmp_path / "fed" / where).resolve()
    members = [{"id": "site-x", "modalities": ALL}, provided("charite", path)]
    with pytest.raises(GenerationError, match=r"federation\.members\.charite: .*(lies inside|holds) the generated "
                                              r"directory"):
        generate_federation(params_with(tmp_path, members))
    assert not (tmp_path / "fed" / "site-x").exists()  # checked before anything is written


def test_nothing_to_generate_when_everything_is_provided(tmp_path):
    real = {name: tmp_path / "real" / name for name in ("a1", "b2", "public", "test")}
    members = [provided("a1", real["a1"], ALL), provided("b2", real["b2"], ["ecg"])]
    splits = {"public": {"data": "provided", "path": str(real["public"])},
              "test": {"data": "provided", "path": str(real["test"])}}
    result = generate_federation(params_with(tmp_path, members, **{"federation.splits": splits}))
    assert result.sites == [] and not (tmp_path / "fed").exists() and not (tmp_path / "real").exists()


def test_generated_splits_need_a_generated_member(tmp_path):
    from fedkim.config import ConfigError

    with pytest.raises(ConfigError, match=r"federation\.splits\.public: generated, but no member is generated"):
        params_with(tmp_path, [provided("a1", tmp_path / "a1", ALL)])


def test_the_validation_split_leaves_the_other_directories_byte_identical(tmp_path):
    """The validation split is a directory of its own with its own random streams: generating it (the default)
    or not (provided elsewhere) writes the same members, public and test bytes."""
    from fedkim.data.catalogue import load_catalogue
    from fedkim.data.siteformat import read_index

    members = [{"id": "site-x", "modalities": ALL}]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with_it = generate_federation(params_with(tmp_path / "a", members))
    elsewhere = tmp_path / "real-validation"
    elsewhere.mkdir()
    splits = {"validation": {"data": "provided", "path": str(elsewhere)}}
    without = generate_federation(params_with(tmp_path / "b", members, **{"federation.splits": splits}))
    assert [m.site_id for m in without.sites] == ["site-x", "public", "test"]
    prints = {m.site_id: m.fingerprint for m in with_it.sites}
    assert {m.site_id: m.fingerprint for m in without.sites} == {k: v for k, v in prints.items() if k != "validation"}
    index = read_index(tmp_path / "a" / "fed" / "validation")
    assert set(index["task"]) == set(load_catalogue().train) and set(index["split"]) == {"validation"}
    assert index.groupby("task").size().eq(8).all() and not list(elsewhere.iterdir())
