"""Kernels rendered by kernelgen. Do not edit: run `kernelgen build`."""
