"""The learner: the policy's logprobs and one optimizer step for K adapters (or the whole model) on one frozen base.

learner.py holds `Learner`; the rest are its pieces, each with one job: batching.py (pure packing and routing),
logprobs.py and heads.py (the frozen output layer), prefix.py (one prompt forward per GRPO group), optim.py (the
adapters' fused AdamW), lora.py / moe.py / tinylora.py (what an adapter is, and its PEFT files), distributed.py
(torchrun). Nothing here imports vLLM.
"""
