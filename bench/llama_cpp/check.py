"""llama.cpp itself (through llama-cpp-python, which builds it from PyPI) against loftq's GGUF
output. Offline; prints one JSON object per check.

  quantize SOURCE.gguf OURS.gguf FTYPE   llama.cpp's quantizer (llama_model_quantize) on the
      source's weights, dequantized to f32 by gguf-py, against the blocks of OURS (written by
      `loftq init --method qlora --bits FTYPE --backbone gguf`): identical blocks per tensor.
  f32 IN.gguf OUT.gguf   IN with every tensor dequantized to f32 by gguf-py: llama.cpp then
      computes in f32 (without its 8-bit activations for quantized weights).
  ppl LOFTQ BASE.gguf [ADAPTER.gguf] LOFTQ_MODEL [LOFTQ_ADAPTER]   llama.cpp's logits and
      perplexity on the first --tokens tokens of --text (llama.cpp's tokenizer, no BOS) against
      `LOFTQ eval --logits-for` on the same ids.
  generate MODEL.gguf --prompt P [--loftq LOFTQ]   llama.cpp's greedy continuation of P (its
      own tokenizer and BOS rule) and its tokens/s; with --loftq, `loftq generate` on the same
      file: identical tokens, and both speeds on the same CPU.

Build llama-cpp-python without AMX where the kernel does not grant AMX tiles (a sandbox):
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
      pip install llama-cpp-python==0.3.36 gguf safetensors numpy
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

FTYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "iq4_nl": 25,
          "q4_k": 14, "q5_k": 16, "q6_k": 18}
FALLBACK = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def f32_copy(source, path):
    """SOURCE with every tensor dequantized to f32 by gguf-py, metadata unchanged."""
    import gguf

    r = gguf.GGUFReader(source)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(path, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    w.add_file_type(0)
    for t in r.tensors:
        values = gguf.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, values.reshape([int(d) for d in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(args):
    import gguf
    import llama_cpp

    with tempfile.TemporaryDirectory() as tmp:
        f32 = os.path.join(tmp, "f32.gguf")
        theirs = os.path.join(tmp, "theirs.gguf")
        f32_copy(args.source, f32)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = FTYPES[args.ftype]
        # The K-quant file types are mixes (Q4_K_S gives some ffn_down Q5_K): `pure` makes
        # every tensor the type itself, or its fallback where rows are not whole super-blocks.
        params.pure = args.ftype.endswith("_k")
        params.nthread = 2
        rc = llama_cpp.llama_model_quantize(f32.encode(), theirs.encode(), params)
        assert rc == 0, f"llama_model_quantize returned {rc}"
        a = {t.name: t for t in gguf.GGUFReader(args.ours).tensors}
        b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
        # Every tensor of the type asked for, and of a K-quant's fallback type (rows that are
        # not whole super-blocks), in both files.
        types = [args.ftype] + [FALLBACK[args.ftype]] * (args.ftype in FALLBACK)
        for ty in types:
            tensors = blocks = same_blocks = same_tensors = 0
            for name, t in a.items():
                if t.tensor_type.name.lower() != ty or b[name].tensor_type != t.tensor_type:
                    continue
                x = np.asarray(t.data).reshape(-1, gguf.GGML_QUANT_SIZES[t.tensor_type][1])
                y = np.asarray(b[name].data).reshape(x.shape)
                same = (x == y).all(axis=1)
                tensors += 1
                same_tensors += int(same.all())
                blocks += len(same)
                same_blocks += int(same.sum())
            print(json.dumps({"check": "quantize", "ftype": args.ftype, "type": ty,
                              "tensors": tensors, "identical_tensors": same_tensors,
                              "blocks": blocks, "identical_blocks": same_blocks}))


def log_softmax(s):
    m = s.max(axis=-1, keepdims=True)
    return s - m - np.log(np.exp(s - m).sum(axis=-1, keepdims=True))


def ppl(args):
    from llama_cpp import Llama
    from safetensors.numpy import load_file, save_file

    # An f32 KV cache: the remaining difference is llama.cpp's arithmetic on quantized
    # weights (activations rounded to 8 bits for the dot products).
    llm = Llama(model_path=args.base, lora_path=args.lora, n_ctx=args.tokens, n_batch=512,
                logits_all=True, verbose=False, n_threads=2, seed=0, type_k=0, type_v=0)
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    ids = llm.tokenize(text.encode(), add_bos=False, special=False)[: args.tokens]
    assert len(ids) == args.tokens, "text too short"
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)], dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out = os.path.join(tmp, "ids.safetensors"), os.path.join(tmp, "logits.safetensors")
        save_file({"input_ids": np.array([ids], dtype=np.int64)}, ids_path)
        cmd = [args.loftq, "eval", "--model", args.model, "--logits-for", ids_path, "--out", out]
        if args.adapter:
            cmd += ["--adapter", args.adapter]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        ours = load_file(out)["logits"][0]
    t = np.array(ids[1:])
    nll = lambda s: -log_softmax(s[:-1].astype(np.float64))[np.arange(len(t)), t].mean()
    p_theirs, p_ours = float(np.exp(nll(theirs))), float(np.exp(nll(ours)))
    d = np.abs(theirs - ours)
    print(json.dumps({"check": "ppl", "base": args.base, "lora": args.lora, "tokens": len(ids),
                      "ppl_llama_cpp": p_theirs, "ppl_loftq": p_ours,
                      "ppl_rel_diff": abs(p_theirs - p_ours) / p_ours,
                      "logits_max_abs_diff": float(d.max()), "logits_mean_abs_diff": float(d.mean()),
                      "logit_scale": float(np.abs(ours).mean()),
                      "top1_agree": float((theirs.argmax(-1) == ours.argmax(-1)).mean())}))


def greedy(llm, ids, n):
    """llama.cpp's greedy continuation of ids (the first largest logit, as its greedy
    sampler), with the seconds of the prompt's pass and of the n - 1 later steps."""
    llm.reset()
    started = time.perf_counter()
    llm.eval(ids)
    out = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
    prefill = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(n - 1):
        llm.eval(out[-1:])
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    return out, prefill, time.perf_counter() - started


def chat_text(llm, prompt):
    """The prompt as one user turn in the file's chat template, rendered as transformers'
    apply_chat_template renders it (jinja2, trim_blocks, lstrip_blocks, loop controls)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    text = lambda t: llm._model.token_get_text(t)
    return env.from_string(llm.metadata["tokenizer.chat_template"]).render(
        messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
        bos_token=text(llm.token_bos()), eos_token=text(llm.token_eos()))


def generate(args):
    """Greedy text from the same prompt ids in llama.cpp and in `loftq generate`, and each
    one's prompt and decoding speed on this CPU."""
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, lora_path=args.lora, n_ctx=512, n_batch=512,
                logits_all=True, verbose=False, n_threads=args.threads, seed=0, type_k=0,
                type_v=0)
    ids = llm.tokenize(args.prompt.encode(), add_bos=llm._model.add_bos_token(), special=True)
    theirs, prefill, decode = greedy(llm, ids, args.tokens)
    row = {"check": "generate", "model": args.model, "lora": args.lora, "threads": args.threads,
           "prompt_ids": ids, "ids_llama_cpp": theirs,
           "llama_cpp_prefill_tok_s": len(ids) / prefill,
           "llama_cpp_decode_tok_s": (args.tokens - 1) / decode}
    if args.fixture:
        chat = chat_text(llm, args.prompt)
        chat_ids = llm.tokenize(chat.encode(), add_bos=False, special=True)
        with open(args.fixture, "w") as f:
            json.dump({"prompt": args.prompt, "prompt_ids": ids, "greedy_ids": theirs,
                       "chat_text": chat, "chat_ids": chat_ids,
                       "chat_greedy_ids": greedy(llm, chat_ids, args.tokens)[0]}, f)
            f.write("\n")
    if args.loftq:
        cmd = [args.loftq, "generate", "--model", args.model, "--prompt", args.prompt,
               "--max-tokens", str(args.tokens), "--ignore-eos", "--json"]
        if args.adapter:
            cmd += ["--adapter", args.adapter]
        ours = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        same = next((i for i, (a, b) in enumerate(zip(theirs, ours["ids"])) if a != b), None)
        row.update({"prompt_ids_equal": ours["prompt_ids"] == ids, "ids_loftq": ours["ids"],
                    "identical_tokens": len(theirs) if same is None else same,
                    "loftq_prefill_tok_s": ours["prefill_tokens_per_s"],
                    "loftq_decode_tok_s": ours["decode_tokens_per_s"]})
        row["decode_speed_ratio"] = row["loftq_decode_tok_s"] / row["llama_cpp_decode_tok_s"]
    print(json.dumps(row))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("source")
    q.add_argument("ours")
    q.add_argument("ftype", choices=sorted(FTYPES))
    c = sub.add_parser("f32")
    c.add_argument("input")
    c.add_argument("output")
    e = sub.add_parser("ppl")
    e.add_argument("--loftq", required=True)
    e.add_argument("--base", required=True)
    e.add_argument("--lora")
    e.add_argument("--model", required=True)
    e.add_argument("--adapter")
    e.add_argument("--text", required=True)
    e.add_argument("--tokens", type=int, default=2048)
    g = sub.add_parser("generate")
    g.add_argument("model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--tokens", type=int, default=64)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--lora")
    g.add_argument("--loftq")
    g.add_argument("--adapter")
    g.add_argument("--fixture", help="also write the prompt and llama.cpp's ids here")
    args = p.parse_args()
    if args.cmd == "quantize":
        quantize(args)
    elif args.cmd == "f32":
        f32_copy(args.input, args.output)
    elif args.cmd == "generate":
        generate(args)
    else:
        ppl(args)


if __name__ == "__main__":
    sys.exit(main())
