"""Fine-tuning gpt-oss: LoRA on the packed MXFP4 base (or full fine-tuning of dequantized weights)."""
