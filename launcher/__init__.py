"""Builds distributed launches (local and SLURM) of cifar_dist/train.py."""
