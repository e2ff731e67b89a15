"""How the segmentation node is started: files, environment and arguments, without launch_ros.

``launch/seg.launch.py``, the demo (``tools/demo.py``), the tests and ``main()`` of the node all use
these functions, so ``ros2 launch``, ``ros2 run`` and ``make demo`` start the node the same way.
Files are looked up in the package's share folder: the ament index's (colcon, a ROS install), else
``<sys.prefix>/share/unet_perception`` (``pip install .``), else the source checkout this module lives
in (``pip install -e .``), never ``site-packages``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

PACKAGE = "unet_perception"
NODE_NAME = "segmentation_node"
EXECUTABLE = "segmentation_node"
PROFILE_ENV = "FASTRTPS_DEFAULT_PROFILES_FILE"
PROFILE_FILE = "fastdds_large_frames.xml"
PARAMS_FILE = "seg.yaml"
RVIZ_FILE = "seg.rviz"
MODEL_FILE = "unet_camvid.onnx"
BOOLEAN_TRUE = ("true", "1", "yes", "on")
BOOLEAN_FALSE = ("false", "0", "no", "off")
LOG_LEVELS = ("debug", "info", "warn", "error", "fatal")


def share_dir() -> Path:
    """The package's share folder: ament index, then ``<sys.prefix>/share/unet_perception``, then the checkout.

    When none has the package's files, the ``sys.prefix`` one is returned, so errors name where they belong.
    """
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE))
    except (ImportError, LookupError, OSError, ValueError):
        # not in an ament prefix on AMENT_PREFIX_PATH (a venv, a plain checkout): ament_index_python
        # raises PackageNotFoundError (a KeyError) or EnvironmentError here.
        pass
    installed = Path(sys.prefix) / "share" / PACKAGE  # setup.py's data_files under `pip install .`
    checkout = Path(__file__).resolve().parents[1]    # site-packages itself after `pip install .`
    for candidate in (installed, checkout):
        if (candidate / "package.xml").is_file():
            return candidate
    return installed


def fastdds_profile_path() -> Path:
    """The shipped Fast DDS profile that gives writers a 16 MiB shared-memory segment."""
    return share_dir() / "config" / PROFILE_FILE


def default_params_file() -> Path:
    """``config/seg.yaml``: the parameters the launch file and the demo start the node with."""
    return share_dir() / "config" / PARAMS_FILE


def rviz_config_path() -> Path:
    """``config/seg.rviz``: input, colour mask and overlay of the default camera."""
    return share_dir() / "config" / RVIZ_FILE


def default_model_path() -> Path:
    """The model shipped in the package share: ``models/unet_camvid.onnx``."""
    return share_dir() / "models" / MODEL_FILE


def node_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables the node needs on top of ``environ``: the Fast DDS profile, unless one is set.

    A user's own ``FASTRTPS_DEFAULT_PROFILES_FILE`` wins, so site-wide DDS tuning keeps working. A shipped
    profile that is missing is not named at all (Fast DDS would log an error for every participant).
    """
    environ = os.environ if environ is None else environ
    if environ.get(PROFILE_ENV):
        return {PROFILE_ENV: environ[PROFILE_ENV]}
    profile = fastdds_profile_path()
    return {PROFILE_ENV: str(profile)} if profile.is_file() else {}


def apply_node_env(environ: MutableMapping[str, str] | None = None) -> str:
    """Put :func:`node_env` into ``environ`` (the process's own by default); returns the profile in effect.

    Fast DDS reads the variable when the first participant is created, so this must run before
    ``rclpy.init``; the node's ``main()`` does it, which covers ``ros2 run`` as well as launch files.
    Returns "" when there is none (no user profile, shipped file missing): see :func:`missing_profile_note`.
    """
    environ = os.environ if environ is None else environ
    environ.update(node_env(environ))
    return environ.get(PROFILE_ENV, "")


def missing_profile_note() -> str:
    """What to tell the user when the shipped Fast DDS profile is not there."""
    return (f"the Fast DDS profile {fastdds_profile_path()} does not exist, so Fast DDS keeps its 512 KiB "
            f"shared-memory segments: large best-effort frames from other processes may not arrive. Reinstall "
            f"the package or set {PROFILE_ENV} (docs/node.md)")


def parse_bool(text: str | bool, what: str) -> bool:
    """A launch argument or CLI value as a boolean, with an error that names it."""
    if isinstance(text, bool):
        return text
    value = text.strip().lower()
    if value in BOOLEAN_TRUE:
        return True
    if value in BOOLEAN_FALSE:
        return False
    raise ValueError(f"{what} must be true or false, got '{text}'")


def parse_topics(text: str) -> list[str]:
    """``"a/image_raw, b/image_raw"`` or ``"[a/image_raw, b/image_raw]"`` -> list of topic names."""
    return [t.strip().strip("'\"") for t in text.strip().strip("[]").split(",") if t.strip().strip("'\"")]


def parameter_overrides(model: str = "", backend: str = "", image_topics: str = "",
                        use_sim_time: str | bool = False, autostart: str | bool = "") -> dict[str, Any]:
    """Launch-argument strings -> node parameters; an empty argument keeps the params file's value."""
    params: dict[str, Any] = {"use_sim_time": parse_bool(use_sim_time, "use_sim_time")}
    if autostart != "":
        params["autostart"] = parse_bool(autostart, "autostart")
    if model:
        params["model_path"] = model
    if backend:
        params["backend"] = backend
    if image_topics:
        topics = parse_topics(image_topics)
        if not topics:
            raise ValueError(f"image_topics '{image_topics}' names no topic; give e.g. 'camera/image_raw'")
        params["image_topics"] = topics
    return params


def node_action_kwargs(*, params_file: str = "", model: str = "", backend: str = "", image_topics: str = "",
                       namespace: str = "", use_sim_time: str | bool = False, autostart: str | bool = "",
                       respawn: str | bool = False,
                       respawn_delay: str | float = 2.0, log_level: str = "info",
                       environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``launch_ros.actions.Node`` from the launch file's (resolved) arguments."""
    level = log_level.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"log_level must be one of {LOG_LEVELS}, got '{log_level}'")
    params_path = Path(params_file) if params_file else default_params_file()
    if not params_path.is_file():
        raise ValueError(f"params_file '{params_path}' does not exist; give a YAML file with the node's "
                         "parameters (see config/seg.yaml)")
    return {
        "package": PACKAGE,
        "executable": EXECUTABLE,
        "name": NODE_NAME,
        "namespace": namespace,
        "output": "screen",
        "emulate_tty": True,
        "parameters": [str(params_path),
                       parameter_overrides(model, backend, image_topics, use_sim_time, autostart)],
        "arguments": ["--ros-args", "--log-level", f"{NODE_NAME}:={level}"],
        "additional_env": node_env(environ),
        "respawn": parse_bool(respawn, "respawn"),
        "respawn_delay": float(respawn_delay),
    }


def _param_value(value: Any) -> str:
    """A parameter value in ``-p name:=value`` syntax (YAML, as rcl parses it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(f"'{v}'" if isinstance(v, str) else _param_value(v) for v in value) + "]"
    return str(value)


def node_command(params_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                 namespace: str = "", python: str = sys.executable) -> list[str]:
    """The command line that runs the node as the launch file does (params file, then overrides).

    Uses ``python -m unet_perception.node`` so it works from a venv without a colcon install; run it
    with ``env=os.environ | node_env()``.
    """
    cmd = [python, "-m", "unet_perception.node", "--ros-args",
           "--params-file", str(params_file or default_params_file())]
    for name, value in (overrides or {}).items():
        cmd += ["-p", f"{name}:={_param_value(value)}"]
    if namespace:
        cmd += ["-r", f"__ns:={namespace}"]
    return cmd
