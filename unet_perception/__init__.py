"""unet_perception: U-Net semantic segmentation for ROS 2 cameras (TensorRT / ONNX Runtime / torch)."""

__version__ = "0.1.0"
