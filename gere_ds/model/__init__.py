"""The model and DeepSpeed's engine around it: hub ids resolved to folders, the DeepSpeed JSON
filled from the run config, the Engine (the only code touching DeepSpeed's engine) with its
non-finite step guard, the final-norm hook, LoRA adapters, and the Hugging Face export."""
