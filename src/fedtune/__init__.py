"""fedtune: federated fine-tuning of large language models (FedIT, FedDPO) with LoRA."""

__version__ = "0.1.0"
