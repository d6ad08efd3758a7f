"""The wheel carries exactly the library and its Lua modules, as real files (no symlinks, no tools' data)."""

from __future__ import annotations

import stat
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "ipc_router"


def library_files() -> set[str]:
    """What the wheel must hold: the package's Python modules, its ``py.typed`` marker and its Lua modules."""
    found = {p for pattern in ("*.py", "*.lua", "py.typed") for p in PACKAGE.rglob(pattern)}
    return {p.relative_to(ROOT).as_posix() for p in found if "__pycache__" not in p.parts}


def test_the_wheel_holds_exactly_the_library_and_its_lua_files(tmp_path: Path) -> None:
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = tmp_path.glob("ipc_router-*.whl")
    with zipfile.ZipFile(wheel) as z:
        infos = [i for i in z.infolist() if not i.filename.startswith("ipc_router-") or ".dist-info/" not in i.filename]
        names = {i.filename for i in infos}
        expected = library_files()
        assert {"ipc_router/lua/ipc_router.lua", "ipc_router/lua/ipc_router_shm.lua"} <= expected
        assert names == expected, (sorted(names - expected), sorted(expected - names))
        for info in infos:
            mode = info.external_attr >> 16
            assert not stat.S_ISLNK(mode), f"{info.filename} is a symlink in the wheel"
            assert z.read(info) == (ROOT / info.filename).read_bytes(), f"{info.filename} differs from the checkout"
        entry_points = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        assert "ipc-router = ipc_router.cli:main" in z.read(entry_points).decode()
