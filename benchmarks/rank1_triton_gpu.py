"""For a lent GPU: one decode step's LoRA work at rank 1, vLLM's Triton path vs rl_lora/sampling/triton_rank1.py's fused kernel.

Per decode step a Llama-shaped model runs, per layer, 4 LoRA linear layers (qkv: 3 slices, o: 1, gate_up: 2,
down: 1). This replays them -- `--layers` times, captured in one CUDA graph, as vLLM's decode runs them -- for
    vLLM:   PunicaWrapperGPU.add_lora_linear (buffer, lora_shrink incl. its zero_, lora_expand), max_lora_rank 1
    fused:  rl_lora.sampling.triton_rank1.lora_rank1 (one kernel per layer)
    base:   the base GEMMs of the same layers (y = x @ W^T), for scale
over batch sizes (tokens) and active-adapter counts (rows assigned round-robin, every --base-every-th row none),
after checking that both LoRA paths give the same y (fp32 tolerance). Prints microseconds per decode step.

    python benchmarks/rank1_triton_gpu.py                          # SmolLM2-135M shapes
    python benchmarks/rank1_triton_gpu.py --hidden 4096 --inter 14336 --kv 1024 --layers 32   # Llama-3-8B
    TRITON_INTERPRET=1 python benchmarks/rank1_triton_gpu.py --device cpu --tokens 4 --layers 1 --check-only

Not measured yet (no GPU in this project's machines so far); rl-lora's GPU path stays vLLM's own until it is.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _shapes(hidden, inter, kv):
    return [("qkv", (hidden, kv, kv)), ("o", (hidden,)), ("gate_up", (inter, inter)), ("down", (hidden,))]


def _inputs(name, hidden, inter):
    return inter if name == "down" else hidden


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--inter", type=int, default=1536)
    ap.add_argument("--kv", type=int, default=192)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", default="1,16,64,256")
    ap.add_argument("--adapters", default="1,4,16")
    ap.add_argument("--base-every", type=int, default=0, help="every n-th row has no adapter (0: none)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--check-only", action="store_true")
    args = ap.parse_args()

    from vllm.config.lora import LoRAConfig
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_gpu import PunicaWrapperGPU

    from rl_lora.sampling.triton_rank1 import lora_rank1

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    print(f"{'tokens':>7s}{'adapters':>9s}{'base GEMMs us':>15s}{'vLLM LoRA us':>14s}{'fused us':>10s}"
          f"{'vLLM/fused':>12s}")
    for n_adapters in [int(v) for v in args.adapters.split(",")]:
        cfg = LoRAConfig(max_lora_rank=1, max_loras=n_adapters)
        for tokens in [int(v) for v in args.tokens.split(",")]:
            ids = [0 if args.base_every and i % args.base_every == 0 else 1 + i % n_adapters for i in range(tokens)]
            punica = PunicaWrapperGPU(max(256, tokens), 256, dev, lora_config=cfg)
            punica.update_metadata(LoRAMapping(ids, ids, is_prefill=False), list(range(1, n_adapters + 1)),
                                   n_adapters, 32000)
            slot = torch.tensor([i - 1 for i in ids], dtype=torch.int32, device=dev)
            layers = []
            for name, outs in _shapes(args.hidden, args.inter, args.kv):
                h = _inputs(name, args.hidden, args.inter)
                a = tuple(torch.randn(n_adapters, 1, 1, h, generator=gen, device=dev, dtype=dtype) * 0.05
                          for _ in outs)
                b = tuple(torch.randn(n_adapters, 1, o, 1, generator=gen, device=dev, dtype=dtype) * 0.05
                          for o in outs)
                a_f = torch.stack([t[:, 0, 0, :] for t in a]).contiguous()
                b_f = torch.cat([t[:, 0, :, 0] for t in b], dim=1).contiguous()
                ends = tuple(int(sum(outs[:i + 1])) for i in range(len(outs)))
                x = torch.randn(tokens, h, generator=gen, device=dev, dtype=dtype)
                w = torch.randn(sum(outs), h, generator=gen, device=dev, dtype=dtype) * 0.02
                layers.append((x, w, a, b, a_f, b_f, outs, ends))
            for x, w, a, b, a_f, b_f, outs, ends in layers:  # the two LoRA paths agree
                y0 = torch.zeros(tokens, sum(outs), device=dev, dtype=dtype)
                y1 = y0.clone()
                punica.add_lora_linear(y0, x, a, b, 1.0, outs)
                lora_rank1(y1, x, a_f, b_f, slot, 1.0, ends)
                tol = 1e-3 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(y1, y0, atol=tol, rtol=tol)
            if args.check_only:
                print(f"{tokens:7d}{n_adapters:9d}  vLLM's path and the fused kernel agree")
                continue
            ys = [torch.zeros(tokens, sum(lay[6]), device=dev, dtype=dtype) for lay in layers]

            def base(layers=layers, ys=ys):
                for (x, w, *_), y in zip(layers, ys):
                    torch.mm(x, w.t(), out=y)

            def vllm_lora(layers=layers, ys=ys, punica=punica):
                for (x, w, a, b, a_f, b_f, outs, ends), y in zip(layers, ys):
                    punica.add_lora_linear(y, x, a, b, 1.0, outs)

            def fused(layers=layers, ys=ys, slot=slot):
                for (x, w, a, b, a_f, b_f, outs, ends), y in zip(layers, ys):
                    lora_rank1(y, x, a_f, b_f, slot, 1.0, ends)

            times = [_graph_time(fn, args.layers, args.iters) for fn in (base, vllm_lora, fused)]
            print(f"{tokens:7d}{n_adapters:9d}{times[0]:15.1f}{times[1]:14.1f}{times[2]:10.1f}"
                  f"{times[1] / times[2]:11.2f}x")


def _graph_time(fn, layers, iters):
    """Microseconds per decode step: `layers` repetitions of fn captured in one CUDA graph, replayed."""
    for _ in range(3):
        fn()  # Triton compiles and autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(layers):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters


if __name__ == "__main__":
    main()
