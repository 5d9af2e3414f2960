"""Fine-tuning diffusers video transformers on precomputed latents (pip install 'dsv[diffusers]').

    dsv precompute --videos clips/ --vae WAN/vae --text-encoder WAN/text_encoder --tokenizer WAN/tokenizer --out lat/
    dsv finetune --diffusers WAN/transformer --latents lat/ --flow.scheduler WAN/scheduler --sparse dsv --lora-rank 16

precompute.py (videos -> shards, format in dsv/data/latents.py), flow.py (the scheduler's
flow-matching objective), models.py (loading by _class_name, LoRA), config.py, trainer.py.
"""
