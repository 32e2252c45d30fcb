#!/usr/bin/env python3
"""PEFT on the cases of `loftq-bench suite`, for `cargo xtask bench --compare-peft`.

Runs `peft.utils.loftq_utils.loftq_init` (exact SVD, as PEFT always does) on the same Gaussian
matrices as the Rust suite (the same SplitMix64 + Box-Muller stream, std 0.02), and the suite's
training step with transformers + PEFT: SmolLM2-135M's shapes (random weights, f32), LoRA r16
alpha16 on all linear layers, AdamW, `batch × seq` random ids, with and without gradient
checkpointing. The base is dense f32, as the reference QLoRA-style step on a CPU dequantizes it;
the rows carry the Rust cases' names so that the report puts them side by side. It writes the
same JSON record, so `loftq-bench report` puts PEFT next to the Rust back ends: time, error or
rate, peak memory.

Environment (CPU only; PEFT 0.18 is the last release whose LoftQ runs without CUDA and
bitsandbytes):

    python3 -m venv ~/.venvs/peft-loftq
    ~/.venvs/peft-loftq/bin/pip install torch --index-url https://download.pytorch.org/whl/cpu
    ~/.venvs/peft-loftq/bin/pip install "peft==0.18.1" transformers numpy
    cargo xtask bench --compare-peft --python ~/.venvs/peft-loftq/bin/python

`--self-test` checks the matrix generator and exits (needs only numpy).
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M30, M27 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)

# The suite's training steps: (decoder layers or None for all, [(batch, seq)], timed steps).
TRAIN = {
    "smoke": (1, [(1, 16)], 1),
    "quick": (None, [(4, 128)], 2),
    "full": (None, [(4, 128), (2, 256)], 3),
}

SHAPES = {
    "smoke": ([(128, 128)], [8]),
    "quick": ([(768, 768), (1024, 1024), (4096, 4096)], [16, 64]),
    "full": ([(768, 768), (1024, 1024), (4096, 4096), (4096, 11008)], [16, 64]),
}


def gaussian(count, seed):
    """`loftq_core::lowrank::Gaussian::new(seed).values(count)` as float32."""
    pairs = (count + 1) // 2
    with np.errstate(over="ignore"):
        state0 = np.uint64(seed) ^ GOLDEN
        steps = np.arange(1, 2 * pairs + 1, dtype=np.uint64)
        z = state0 + steps * GOLDEN
        z = (z ^ (z >> np.uint64(30))) * M30
        z = (z ^ (z >> np.uint64(27))) * M27
        z = z ^ (z >> np.uint64(31))
    u = ((z >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    t = 2.0 * np.pi * u2
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = r * np.cos(t)
    out[1::2] = r * np.sin(t)
    return out[:count].astype(np.float32)


def weight(rows, cols):
    """The matrix `loftq-bench` measures for this shape."""
    seed = rows * 31 + cols
    return gaussian(rows * cols, seed).reshape(rows, cols) * np.float32(0.02)


def machine(gpu=None):
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": mem,
        "os": platform.platform(),
        "nvidia": gpu,
        "vulkan_drivers": [],
    }


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def train_cases(profile, device="cpu"):
    """The suite's `train` cases, run by transformers + PEFT on `device` (cpu or cuda)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, shapes, repeats = TRAIN[profile]
    layers = layers or 30
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
        tie_word_embeddings=True, max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    cases = []
    for checkpointing in (True, False):
        base = LlamaForCausalLM(config).float().to(device)
        if checkpointing:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                                                target_modules="all-linear"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for batch, seq in shapes:
            ids = torch.randint(0, config.vocab_size, (batch, seq)).to(device)
            if device != "cpu":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if device != "cpu":
                    # CUDA queues the work: the step ends when the update is computed.
                    torch.cuda.synchronize()
                if i > 0:
                    times.append(time.perf_counter() - t0)
            times.sort()
            median = times[len(times) // 2]
            mode = "layers" if checkpointing else "none"
            name = f"smollm2-135m shapes ({layers} layers) nf4 r16 {batch}×{seq} recompute={mode}"
            rate = batch * (seq - 1) / median
            metric = f"tokens/s {rate:.0f}"
            if device != "cpu":
                metric += f", GPU peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
            print(f"{name} on {device}: {median:.3f} s, {metric}", file=sys.stderr)
            cases.append({
                "suite": "train",
                "name": name,
                "size": float(batch * seq),
                "timing": {"median_s": median, "min_s": times[0], "max_s": times[-1],
                           "repeats": len(times)},
                "error": None,
                "metric": metric,
                "memory": {"rss_before_bytes": 0, "peak_rss_bytes": peak_rss()},
            })
        del model, base, opt
    return cases


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", choices=sorted(SHAPES), default="quick")
    ap.add_argument("--json", help="the record to write")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--suites", default="train,loftq",
                    help="comma-separated: train (the training step), loftq (loftq_init)")
    ap.add_argument("--device", default="cpu",
                    help="device of the training step: cpu or cuda (loftq_init stays on the CPU)")
    args = ap.parse_args()

    if args.self_test:
        # The first values of Gaussian::new(0), pinned by the Rust test
        # `lowrank::host::tests::gaussian_stream_is_pinned`.
        want = [1.2786336, 0.21434058, 0.1908241, 0.15062167]
        got = gaussian(4, 0).tolist()
        assert all(abs(a - b) < 1e-6 for a, b in zip(got, want)), got
        w = weight(128, 128)
        assert w.shape == (128, 128) and abs(float(w.std()) - 0.02) < 0.001, w.std()
        print("generator ok:", got)
        return 0

    try:
        import torch
        import peft
        from peft.utils.loftq_utils import loftq_init
    except ImportError as e:
        print(f"torch and peft are not importable by {sys.executable}: {e}", file=sys.stderr)
        return 2
    if not args.json:
        ap.error("--json is required")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    shapes, ranks = SHAPES[args.profile]
    started = int(time.time())
    cases = []
    # First, while the process's peak resident memory (all `getrusage` reports) is still the
    # training step's own: with checkpointing, then without.
    suites = set(args.suites.split(","))
    if suites - {"train", "loftq"}:
        ap.error(f"--suites: unknown {sorted(suites - {'train', 'loftq'})} (train, loftq)")
    if args.device != "cpu" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if "train" in suites:
        try:
            cases += train_cases(args.profile, args.device)
        except ImportError as e:
            print(f"training step skipped: transformers is not importable: {e}", file=sys.stderr)
    for rows, cols in shapes if "loftq" in suites else []:
        w = torch.from_numpy(weight(rows, cols))
        norm = torch.linalg.norm(w).item()
        for bits in (4, 2):
            for rank in ranks:
                for iters in (1, 5):
                    times, err = [], None
                    runs = 1 if rows * cols > 1024 * 1024 else args.repeats + 1
                    for i in range(runs):
                        t0 = time.perf_counter()
                        q, a, b = loftq_init(w, num_bits=bits, reduced_rank=rank, num_iter=iters)
                        dt = time.perf_counter() - t0
                        if runs == 1 or i > 0:
                            times.append(dt)
                        err = torch.linalg.norm(w - q - b @ a).item() / norm
                    times.sort()
                    name = f"{rows}x{cols} nf{bits}-b64 r{rank} T{iters} exact"
                    print(f"{name}: {times[len(times) // 2]:.2f} s, err {err:.4f}", file=sys.stderr)
                    cases.append({
                        "suite": "loftq",
                        "name": name,
                        "size": float(rows * cols),
                        "timing": {
                            "median_s": times[len(times) // 2],
                            "min_s": times[0],
                            "max_s": times[-1],
                            "repeats": len(times),
                        },
                        "error": err,
                        "metric": "‖W−Q−s·BA‖/‖W‖",
                        "memory": {"rss_before_bytes": 0, "peak_rss_bytes": peak_rss()},
                    })
    record = {
        "backend": f"peft {peft.__version__}" + ("" if args.device == "cpu" else f" {args.device}"),
        "profile": args.profile,
        "machine": machine(torch.cuda.get_device_name() if args.device != "cpu" else None),
        "commit": f"torch {torch.__version__}",
        "started_unix": started,
        "cases": cases,
    }
    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
