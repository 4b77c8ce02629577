"""cifar-dist: configurable ResNets on CIFAR-10, trained with Accelerate from one laptop to a SLURM cluster."""
__version__ = "0.1.0"
