"""Launchers for multi-host CrossPool (TPU pod slices, SLURM and Kubernetes GPU clusters)."""
