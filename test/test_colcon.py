"""`colcon build` installs an ament_python package a ROS 2 system can `ros2 run` and `ros2 launch`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.skipif(shutil.which("colcon") is None,
                    reason="colcon is not installed (pip install colcon-common-extensions)")
def test_colcon_build_installs_executable_launch_config_models(tmp_path: Path) -> None:
    build, install = tmp_path / "build", tmp_path / "install"
    # --paths: exactly the repo's package (a recursive crawl would also find packages inside .venv)
    result = subprocess.run(["colcon", "--log-base", str(tmp_path / "log"), "build", "--paths", str(REPO),
                             "--build-base", str(build), "--install-base", str(install)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    executable = install / "unet_perception" / "lib" / "unet_perception" / "segmentation_node"
    assert executable.is_file() and os.access(executable, os.X_OK)
    share = install / "unet_perception" / "share" / "unet_perception"
    for path in ("package.xml", "launch/seg.launch.py", "config/seg.yaml", "config/seg.rviz",
                 "config/fastdds_large_frames.xml"):
        assert (share / path).is_file(), path
    assert (share / "models").is_dir()
    assert (install / "unet_perception" / "share" / "ament_index" / "resource_index" / "packages" /
            "unet_perception").is_file()
