"""`mil extract finetune`: the HNM-WSI / ItS2CLR encoder fine-tuning loop (docs/finetune.md)."""
