"""`colcon build` installs an ament_python package a ROS 2 system can `ros2 run` and `ros2 launch`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
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


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("make") is None, reason="cmake or make missing")
def test_make_builds_the_vision_msgs_stand_in(tmp_path: Path) -> None:
    """`make vision_msgs` (part of `make venv`) builds LabelInfo with the rosidl wheels; here into a scratch prefix."""
    prefix, build = tmp_path / "prefix", tmp_path / "build"
    result = subprocess.run(["make", "--no-print-directory", "vision_msgs", f"VM_PREFIX={prefix}",
                             f"VM_BUILD={build}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    site = next(prefix.glob("lib/python3*/site-packages"))
    # the ROS wheels' bootstrapper re-runs Python with its own library folders added to LD_LIBRARY_PATH
    env = {k: v for k, v in os.environ.items() if k != "_ROS_WHEELS_BOOTSTRAP_COMPLETE"} | {
        "PYTHONPATH": str(site), "LD_LIBRARY_PATH": str(prefix / "lib")}
    check = ("import vision_msgs.msg as m, rclpy.serialization as s; "
             "x = m.LabelInfo(class_map=[m.VisionClass(class_id=3, class_name='Road')], threshold=0.5); "
             "y = s.deserialize_message(s.serialize_message(x), m.LabelInfo); "
             f"assert y == x and m.__file__.startswith({str(site)!r}), m.__file__; print('ok')")
    run = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=120)
    assert run.stdout.strip() == "ok", run.stdout + run.stderr


def test_pip_install_not_editable_finds_its_share(tmp_path: Path) -> None:
    """`pip install .` (a wheel, not editable) into a fresh venv: the default model, params and Fast DDS profile
    are found in <venv>/share/unet_perception, never looked for in site-packages."""
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(wheels), str(REPO)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    subprocess.run([Path(sys.base_prefix) / "bin" / "python3", "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", *wheels.glob("*.whl")],
                   check=True, capture_output=True, timeout=300)
    probe = ("from unet_perception import launch_support as ls; "
             "print(ls.share_dir()); print(ls.default_model_path().is_file(), ls.default_params_file().is_file(), "
             "ls.fastdds_profile_path().is_file())")
    env = {k: v for k, v in os.environ.items() if k != "AMENT_PREFIX_PATH"}
    out = subprocess.run([python, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:2] == [str(venv / "share" / "unet_perception"), "True True True"], out.stderr
