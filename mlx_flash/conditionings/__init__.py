"""Conditionings: what a request adds to the loop (img2img; inpainting and ControlNet plug in the same way)."""

from .img2img import Img2Img

__all__ = ["Img2Img"]
