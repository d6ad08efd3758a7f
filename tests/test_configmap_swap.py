"""Hot reload of a config mounted from a Kubernetes ConfigMap, against the real sidecar (``ipc-router serve``).

The kubelet does not edit a mounted ConfigMap file in place. Its AtomicWriter lays the volume out as

    config.yaml -> ..data/config.yaml          (one symlink per key, written once)
    ..data      -> ..2026_12_01_08_30_00.123   (the only thing that changes)
    ..2026_12_01_08_30_00.123/config.yaml      (the payload, a new directory per update)

and an update writes the new payload into a new timestamped directory, points a ``..data_tmp`` symlink at it,
renames ``..data_tmp`` over ``..data`` (the atomic step) and removes the old directory. The sidecar is given the
path ``config.yaml``; its watcher must see through two symlinks that never change themselves. This reproduces
that sequence on disk, as the kubelet does it, several times in a row.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_server import Server, poll, rule_config, rule_of

_counter = itertools.count()


@pytest.fixture
def tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ipr", dir="/tmp"))  # short: the socket path must stay under 108 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _timestamped_dir(volume: Path) -> Path:
    # The kubelet's name: ".." + a timestamp + a random suffix, created with os.MkdirTemp (mode 0700, then 0755).
    stamp = time.strftime("%Y_%m_%d_%H_%M_%S", time.gmtime())
    d = volume / f"..{stamp}.{os.getpid()}{next(_counter):04d}"
    d.mkdir(mode=0o755)
    return d


def kubelet_write(volume: Path, files: dict[str, str]) -> None:
    """One AtomicWriter update of a ConfigMap volume: new payload dir, ``..data`` swapped by rename, old removed."""
    new = _timestamped_dir(volume)
    for name, text in files.items():
        (new / name).write_text(text)
    data = volume / "..data"
    old = Path(os.readlink(data)) if data.is_symlink() else None
    tmp_link = volume / "..data_tmp"
    tmp_link.symlink_to(new.name)  # relative, as the kubelet makes it
    os.rename(tmp_link, data)  # the atomic swap: rename(2) of a symlink over a symlink
    for name in files:  # the per-key symlinks are created on the first write only
        link = volume / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(volume / old)


def test_kubelet_swap_layout_is_what_the_sidecar_reads(tmp: Path) -> None:
    volume = tmp / "cm"
    volume.mkdir()
    kubelet_write(volume, {"config.yaml": "one"})
    first = os.readlink(volume / "..data")
    kubelet_write(volume, {"config.yaml": "two"})
    assert os.readlink(volume / "config.yaml") == "..data/config.yaml"
    assert os.readlink(volume / "..data") != first
    assert not (volume / first).exists(), "the old payload directory is removed"
    assert (volume / "config.yaml").read_text() == "two"
    assert sorted(p.name for p in volume.iterdir()) == sorted(["config.yaml", "..data", os.readlink(volume / "..data")])


def test_configmap_update_is_hot_reloaded(tmp: Path) -> None:
    volume = tmp / "cm"
    volume.mkdir()
    kubelet_write(volume, {"config.yaml": rule_config("m", "one")})
    server = Server(tmp, ("--config", str(volume / "config.yaml"), "--reload-interval", "0.1"))
    try:
        server.start()
        _updates_are_picked_up(server, volume)
    finally:
        server.stop()


def _updates_are_picked_up(server: Server, volume: Path) -> None:
    c = server.client()
    assert rule_of(c.route("m")) == "one"
    assert c.get_json("/stats")["reloads"] == {"ok": 1}

    # Each update only swaps ..data; the file the sidecar was given is the same unchanged symlink throughout.
    for generation, rule in enumerate(("two", "three", "four"), start=2):
        kubelet_write(volume, {"config.yaml": rule_config("m", rule)})
        poll(lambda rule=rule: rule_of(c.route("m")) == rule, timeout=3)
        stats = c.get_json("/stats")
        assert stats["reloads"] == {"ok": generation}
        assert stats["config"]["generation"] == generation

    # Same size, same content length: still a new payload directory, so still seen (the rule differs).
    kubelet_write(volume, {"config.yaml": rule_config("m", "fivE")})
    poll(lambda: rule_of(c.route("m")) == "fivE", timeout=3)

    # A broken update keeps the last good config and is counted, as for a plain file.
    kubelet_write(volume, {"config.yaml": "rules:\n- name: broken\n  headers: [{name: x-ai-eg-model}]\n"})
    poll(lambda: c.get_json("/stats")["reloads"].get("error") == 1, timeout=3)
    assert rule_of(c.route("m")) == "fivE"
    c.close()
