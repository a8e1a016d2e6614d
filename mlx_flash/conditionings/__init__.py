"""Conditionings: what a request adds to the loop (img2img, inpainting, ControlNets)."""

from .controlnet import ControlInput, ControlNets
from .img2img import Img2Img
from .inpaint import Inpaint

__all__ = ["ControlInput", "ControlNets", "Img2Img", "Inpaint"]
