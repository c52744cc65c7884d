"""The sampler: vLLM engines serving the base with every live adapter, hot-swapped, never merged or restarted.

sampler.py holds one engine (`Sampler`: generate, push); fleet.py one engine in process or several as Ray
actors, rebuilt when one dies; vllm_plugin.py is the entry point vLLM loads in each of its processes, which
installs the CPU paths (vllm_cpu_lora.py: rank 1; vllm_cpu_moe.py: MoE LoRA) and nothing on GPU; triton_rank1.py
is the GPU rank-1 kernel (not wired in, docs/sampling.md).
"""
