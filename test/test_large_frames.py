"""640x480 frames flow camera process -> node process -> subscriber process at rate (the Fast DDS profile).

With Fast DDS defaults a best-effort 921,600-byte frame rarely leaves its process (the writer's shared
memory segment is 512 KiB). The camera gets the shipped profile as a driver would (exported variable);
the node is started WITHOUT the variable, so this also proves that its main() applies the profile.
"""

from __future__ import annotations

import os
import subprocess
import sys

from sensor_msgs.msg import Image

from ros_graph import TIMEOUT_S, RosGraph, start_node_process, stop_process, wait_until
from unet_perception.launch_support import PROFILE_ENV, node_env

# Without the profile almost none of these frames leave the camera's process; with it, a loaded 2-core machine
# still drops some (best effort, and the node keeps only the latest frame), so the bar is a generous count.
FRAMES, RATE_HZ, MIN_FRAMES = 30, 10.0, 8


def test_640x480_frames_between_processes(tiny_model) -> None:  # type: ignore[no-untyped-def]
    bare_env = {k: v for k, v in os.environ.items() if k != PROFILE_ENV}
    node = start_node_process({"model_path": str(tiny_model), "image_topics": ["/big/image_raw"]}, env=bare_env)
    camera = None
    try:
        with RosGraph() as graph:
            overlay = graph.collect(Image, "/big/segmentation/overlay")
            color = graph.collect(Image, "/big/segmentation/color")
            wait_until(lambda: overlay.subscription.get_publisher_count() > 0
                       and color.subscription.get_publisher_count() > 0, what="the node's publishers")
            camera = subprocess.Popen(
                [sys.executable, "-m", "unet_perception.tools.camera_sim", "--topic", "/big/image_raw",
                 "--size", "640x480", "--rate", str(RATE_HZ), "--count", str(FRAMES), "--wait-subscribers", "1"],
                env=bare_env | node_env(bare_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            out, _ = camera.communicate(timeout=FRAMES / RATE_HZ + 30)
            assert camera.returncode == 0, out
            overlay.wait_for(MIN_FRAMES, timeout=TIMEOUT_S)
            color.wait_for(MIN_FRAMES, timeout=TIMEOUT_S)
        msg = overlay.messages[-1]
        assert (msg.width, msg.height, msg.encoding, len(msg.data)) == (640, 480, "rgb8", 921_600)
    finally:
        if camera is not None and camera.poll() is None:
            camera.kill()
        log = stop_process(node)
    assert node.returncode == 0, log
