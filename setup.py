"""ament_python package: `colcon build` on ROS 2 Jazzy, or `pip install -e .` in a venv."""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "unet_perception"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    package_data={PACKAGE: ["class_tables/*.json"]},
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml") + glob("config/*.rviz")),
        (f"share/{PACKAGE}/models", glob("models/*.onnx") + glob("models/*.md") + glob("models/*.json")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="unet_perception developers",
    maintainer_email="unet-perception@example.com",
    description="U-Net semantic segmentation node for ROS 2 cameras: TensorRT, ONNX Runtime or torch backends",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "segmentation_node = unet_perception.node:main",
            "unet-train = unet_perception.training.train:main",
            "unet-folds = unet_perception.training.folds:main",
            "unet-evaluate = unet_perception.training.evaluate:main",
            "unet-export = unet_perception.training.export:main",
            "unet-import = unet_perception.tools.import_model:main",
            "unet-quantize = unet_perception.training.quantize:main",
            "unet-build-engine = unet_perception.tools.build_engine:main",
            "unet-bag = unet_perception.tools.bag_cli:main",
            "unet-demo = unet_perception.tools.demo:main",
        ],
    },
)
