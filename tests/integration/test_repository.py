"""The controller's repositories as a device sees them: tuf.ngclient over repo:// files."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from tuf.api.exceptions import ExpiredMetadataError
from tuf.ngclient import Updater  # type: ignore[attr-defined]

from agent.supplychain.fetcher import LocalDirectoryFetcher
from tools.fleetctl.keys import KeyStore
from tools.fleetctl.repository import DirectorRepository, ImageRepository, TargetEntry

PATH = "models/digits/1/model.tflite.enc"


def _updaters(state: Path, repo: Path, device_id: str) -> tuple[Updater, Updater]:
    fetcher = LocalDirectoryFetcher(repo)
    image = Updater(
        str(state / "image"),
        "repo://image/metadata/",
        str(state / "downloads"),
        "repo://image/targets/",
        fetcher=fetcher,
        bootstrap=None,
    )
    director = Updater(
        str(state / "director"),
        f"repo://director/{device_id}/metadata/",
        fetcher=fetcher,
        bootstrap=None,
    )
    return image, director


@pytest.fixture
def fleet(tmp_path: Path) -> tuple[ImageRepository, DirectorRepository, Path]:
    keys = KeyStore(tmp_path / "keys")
    repo = tmp_path / "repo"
    image = ImageRepository.create(repo / "image", keys, thresholds={"root": (2, 3)})
    director = DirectorRepository.create(repo / "director", tmp_path / "droot", keys)
    info = image.add_target(PATH, b"encrypted model bytes", {"card": "{}"})
    director.add_device("pi-01")
    director.assign("pi-01", {PATH: TargetEntry(info.length, info.hashes, {"device_id": "pi-01"})})
    state = tmp_path / "state"
    for name, root in (
        ("image", image.metadata_path("root", 1)),
        ("director", director.namespace("pi-01").metadata_path("root", 1)),
    ):
        (state / name).mkdir(parents=True)
        shutil.copy(root, state / name / "root.json")
    (state / "downloads").mkdir()
    return image, director, state


def test_device_downloads_and_follows_every_rotation(
    fleet: tuple[ImageRepository, DirectorRepository, Path],
) -> None:
    image, director, state = fleet
    repo = image.base_dir.parent
    image_updater, director_updater = _updaters(state, repo, "pi-01")
    image_updater.refresh()
    director_updater.refresh()
    director_info = director_updater.get_targetinfo(PATH)
    assert director_info is not None and director_info.custom == {"device_id": "pi-01"}
    target = image_updater.get_targetinfo(PATH)
    assert target is not None
    assert Path(image_updater.download_target(target)).read_bytes() == b"encrypted model bytes"

    for role in ("root", "targets", "snapshot", "timestamp"):
        image.rotate_keys(role, key_count=2, threshold=2 if role == "root" else 1)
        director.rotate_keys(role)
    image_updater, director_updater = _updaters(state, repo, "pi-01")
    image_updater.refresh()
    director_updater.refresh()
    assert image_updater.get_targetinfo(PATH) is not None
    assert director_updater.get_targetinfo(PATH) is not None
    trusted_root = (state / "image" / "root.json").read_bytes()
    assert trusted_root == image.metadata_path("root").read_bytes()


def test_device_refuses_an_expired_director_timestamp(
    fleet: tuple[ImageRepository, DirectorRepository, Path],
) -> None:
    image, director, state = fleet
    ns = director.namespace("pi-01")
    md = ns.open("timestamp")
    md.signed.version += 1
    ns.set_expiry(md, timedelta(seconds=-60))
    ns.sign(md, ns.signers("timestamp"))
    ns.write(md)
    _, director_updater = _updaters(state, image.base_dir.parent, "pi-01")
    with pytest.raises(ExpiredMetadataError):
        director_updater.refresh()
